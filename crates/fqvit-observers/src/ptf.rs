//! The Power-of-Two-Factor observer (spec §3.7).

use fqvit_ops::{BitType, Granularity, PtfFactor, QParams};
use tch::{Kind, Tensor};

use crate::observer::MinMax;
use crate::stats::{candidate, mse, params_from_range};
use crate::{Error, Observer, PtfRange, Result};

/// Channel-wise min/max, then on the last batch (`(B, N, C)`) one scale `s8 = (M − m)/255` from
/// the global range ([`PtfRange`]), a shared zero point from s8, and per channel the factor
/// α ∈ `0..=K` whose scale `s8 · 2^α / 2^K` gives the least MSE (ties to the smaller scale).
/// The original has K = 3 (k ∈ {1, 2, 4, 8}, scales `s8 · k / 8`) and the min-max range.
#[derive(Debug)]
pub struct Ptf {
    minmax: MinMax,
    bit_type: BitType,
    max_factor: PtfFactor,
    range: PtfRange,
    last: Option<Tensor>,
}

impl Ptf {
    /// A PTF observer choosing factors in `0..=max_factor` under the largest scale of `range`.
    pub fn new(bit_type: BitType, max_factor: PtfFactor, range: PtfRange) -> Self {
        Ptf {
            minmax: MinMax::new(bit_type, Granularity::ChannelWise, false),
            bit_type,
            max_factor,
            range,
            last: None,
        }
    }
}

impl Observer for Ptf {
    fn update(&mut self, xs: &Tensor) -> Result<()> {
        if xs.dim() != 3 {
            return Err(Error::BadInput(format!(
                "the ptf observer needs (B, N, C) activations, got shape {:?}",
                xs.size()
            )));
        }
        self.minmax.update_range(xs)?;
        self.last = Some(xs.to_kind(Kind::Float));
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<QParams> {
        let xs = self.last.ok_or(Error::Empty)?;
        let bt = self.bit_type;
        let (min, max) = self.minmax.range_values()?;
        let global_max = max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let global_min = min.iter().copied().fold(f32::INFINITY, f32::min);
        let (global_min, global_max) = match self.range {
            PtfRange::MinMax => (global_min, global_max),
            PtfRange::Symmetric => {
                let a = global_min.abs().max(global_max.abs());
                (-a, a)
            }
        };
        // s8 and its zero point, then the smaller scales by halving (float32, as the original's
        // s4, s2, s1; halving a normal float32 is exact).
        let s8 = params_from_range(&[global_min], &[global_max], bt, false)?;
        let (s8, zero_point) = (s8.scale[0], s8.zero_point[0]);
        let k = self.max_factor.get();
        let scales: Vec<f32> = (0..=k).map(|a| (a..k).fold(s8, |s, _| s / 2.0)).collect();
        let z = zero_point as f32;
        let n_channels = xs.size()[2];
        let mut factors = Vec::with_capacity(n_channels as usize);
        tch::no_grad(|| {
            // Channel-major once, so that each channel's values are contiguous for the fused
            // fake quantization.
            let channels = xs.permute([2, 0, 1]).contiguous();
            for j in 0..n_channels {
                let data = channels.get(j).unsqueeze(-1);
                let scores: Vec<f32> = scales
                    .iter()
                    .map(|&s| mse(&data, &candidate(&data, s, z, bt).fake_quant(&data)))
                    .collect();
                // Python's list.index(min(list)): the first minimum.
                let best = scores
                    .iter()
                    .enumerate()
                    .fold(0, |b, (k, &v)| if v < scores[b] { k } else { b });
                factors.push(
                    PtfFactor::try_from(best as u8).expect("at most max_factor + 1 candidates"),
                );
            }
        });
        let scale = factors.iter().map(|f| scales[0] * f.multiplier() as f32).collect();
        Ok(QParams { bit_type: bt, scale, zero_point: vec![zero_point], ptf: Some(factors) })
    }
}
