//! Layer-wise minmax and ema reduce each batch to one max and min before combining; the original
//! combines per-channel values and reduces afterwards. Both must give the same parameters bit for
//! bit, on activations shaped like the models' (3-D tokens, 4-D attention scores), with outliers
//! in a few channels and a batch whose range shrinks.

use fqvit_observers::{ObserverConfig, ObserverKind, build};
use fqvit_ops::rounding::asymmetric_params;
use fqvit_ops::{BitType, Granularity};
use tch::{Kind, Tensor};

/// The original's update (`models/ptq/observer/{minmax,ema}.py`): per-channel rows, combine with
/// the running value, then reduce to one value.
fn original(batches: &[Tensor], ema: bool) -> (f32, f32) {
    let (mut max, mut min): (Option<Tensor>, Option<Tensor>) = (None, None);
    for xs in batches {
        let xs = if xs.dim() == 4 { xs.permute([0, 2, 3, 1]) } else { xs.shallow_clone() };
        let c = *xs.size().last().unwrap();
        let rows = xs.reshape([-1, c]).transpose(0, 1);
        let (cur_max, cur_min) = (rows.amax(1, false), rows.amin(1, false));
        let combine = |old: Option<Tensor>, cur: Tensor, is_max: bool| match old {
            None => cur,
            Some(old) if ema => &old + (&cur - &old) * 0.01,
            Some(old) if is_max => cur.maximum(&old),
            Some(old) => cur.minimum(&old),
        };
        max = Some(combine(max.take(), cur_max, true).max());
        min = Some(combine(min.take(), cur_min, false).min());
    }
    (min.unwrap().double_value(&[]) as f32, max.unwrap().double_value(&[]) as f32)
}

fn batches(shape: &[i64], seed: i64) -> Vec<Tensor> {
    fqvit_testkit::seeded(seed, || {
        (0..5)
            .map(|b| {
                let x = Tensor::randn(shape, (Kind::Float, tch::Device::Cpu));
                // Outliers in a few channels, and a last batch with a narrower range.
                if b == 2 {
                    let _ = x.narrow(-1, 0, 2).fill_(40.0);
                }
                if b == 4 { x * 0.25 } else { x * (1.0 + b as f64) }
            })
            .collect()
    })
}

#[test]
fn layer_wise_reduce_first_equals_the_original() {
    for (shape, seed) in [(vec![4i64, 17, 24], 1), (vec![3, 3, 11, 11], 2), (vec![2, 49, 96], 3)] {
        let xs = batches(&shape, seed);
        for kind in [ObserverKind::MinMax, ObserverKind::Ema] {
            let config = ObserverConfig {
                kind,
                bit_type: BitType::UINT8,
                granularity: Granularity::LayerWise,
            };
            let mut obs = build(&config, false).unwrap();
            for x in &xs {
                obs.update(x).unwrap();
            }
            let ours = obs.finish().unwrap();
            let (lo, hi) = original(&xs, kind == ObserverKind::Ema);
            let (scale, zero_point) = asymmetric_params(lo, hi, BitType::UINT8);
            assert_eq!(
                (ours.scale[0].to_bits(), ours.zero_point[0]),
                (scale.to_bits(), zero_point),
                "{kind:?} on {shape:?}: {ours:?} vs the original's range [{lo}, {hi}]"
            );
        }
    }
}
