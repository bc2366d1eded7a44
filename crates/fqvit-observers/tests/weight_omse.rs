//! OMSE per output channel of a weight (fqvit+): each channel gets the shrink factor whose
//! codes have the least squared error, checked against a search in plain Rust.

use fqvit_observers::{ObserverConfig, ObserverKind, build};
use fqvit_ops::rounding::symmetric_scale;
use fqvit_ops::{BitType, Bits, Granularity};
use tch::{Device, Kind, Tensor};

/// `Σ (x − s·clamp(round(x/s)))²` in f64, the reference of the observer's f32 score.
fn error(row: &[f32], scale: f32, bt: BitType) -> f64 {
    row.iter()
        .map(|&x| {
            let q = (x / scale).round_ties_even().clamp(bt.lower() as f32, bt.upper() as f32);
            (f64::from(x) - f64::from(q * scale)).powi(2)
        })
        .sum()
}

fn fit(w: &Tensor, kind: ObserverKind, bt: BitType) -> Vec<f32> {
    let cfg = ObserverConfig { kind, bit_type: bt, granularity: Granularity::ChannelWise };
    let mut obs = build(&cfg, true).unwrap();
    obs.update(w).unwrap();
    let p = obs.finish().unwrap();
    assert!(p.zero_point.iter().all(|&z| z == 0), "weights stay symmetric");
    p.scale
}

#[test]
fn each_channel_gets_the_scale_with_the_least_error() {
    let bt = BitType { bits: Bits::try_from(4u8).unwrap(), signed: true };
    let (rows, cols) = (8usize, 192usize);
    let w = fqvit_testkit::seeded(3, || {
        Tensor::randn([rows as i64, cols as i64], (Kind::Float, Device::Cpu)) * 0.02
    });
    // An outlier in every other channel: minmax spends the 16 codes on it.
    for c in (0..rows).step_by(2) {
        let _ = w.get(c as i64).get(5).fill_(0.3);
    }
    let omse = fit(&w, ObserverKind::Omse, bt);
    let minmax = fit(&w, ObserverKind::MinMax, bt);
    let data: Vec<f32> = Vec::try_from(w.contiguous().view(-1)).unwrap();
    for c in 0..rows {
        let row = &data[c * cols..][..cols];
        let (lo, hi) = row.iter().fold((0f32, 0f32), |(a, b), &x| (a.min(x), b.max(x)));
        let best = (0..90)
            .map(|i| {
                let f = (1.0 - f64::from(i) * 0.01) as f32;
                error(row, symmetric_scale(lo * f, hi * f, bt), bt)
            })
            .fold(f64::INFINITY, f64::min);
        let (got, plain) = (error(row, omse[c], bt), error(row, minmax[c], bt));
        assert!(got <= best * (1.0 + 1e-5), "channel {c}: {got:e} against the best {best:e}");
        assert!(got <= plain, "channel {c}: {got:e} against minmax {plain:e}");
        if c % 2 == 0 {
            assert!(got < plain, "channel {c} with an outlier: {got:e} against {plain:e}");
        }
    }
}

#[test]
fn activations_stay_layer_wise() {
    let cfg = ObserverConfig {
        kind: ObserverKind::Omse,
        bit_type: BitType::UINT8,
        granularity: Granularity::ChannelWise,
    };
    let err = build(&cfg, false).unwrap_err();
    assert!(err.to_string().contains("layer-wise only on activations"), "{err}");
}
