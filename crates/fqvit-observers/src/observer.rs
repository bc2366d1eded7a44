//! MinMax, EMA, Percentile and OMSE (spec §3.3–§3.6), and [`build`].

use fqvit_ops::{BitType, Granularity, QParams};
use fqvit_tensor::{Axis, Quantizer};
use tch::{Kind, Tensor};

use crate::stats::{candidate, channel_max_min, max_min, params_from_range, values};
use crate::{Error, Observer, ObserverConfig, ObserverKind, Ptf, Result};

/// Builds the observer for a site; `is_weight` selects the weight reshape (per output channel).
///
/// Refuses what the original cannot do: percentile channel-wise, omse channel-wise on
/// activations, ptf layer-wise or on weights. Omse channel-wise on weights is ours (fqvit+).
pub fn build(cfg: &ObserverConfig, is_weight: bool) -> Result<Box<dyn Observer + Send>> {
    let channel_wise = cfg.granularity == Granularity::ChannelWise;
    let unsupported =
        |what: &str| Err(Error::Unsupported(format!("the {} observer {what}", cfg.kind.as_str())));
    Ok(match cfg.kind {
        ObserverKind::MinMax => Box::new(MinMax::new(cfg.bit_type, cfg.granularity, is_weight)),
        ObserverKind::Ema => {
            Box::new(Ema { range: Range::new(cfg.granularity, is_weight), bit_type: cfg.bit_type })
        }
        ObserverKind::Percentile if channel_wise => {
            return unsupported("is layer-wise only (it ranks all elements together)");
        }
        ObserverKind::Percentile => Box::new(Percentile { bit_type: cfg.bit_type, range: None }),
        ObserverKind::Omse if channel_wise && is_weight => Box::new(WeightOmse(Omse {
            minmax: MinMax::new(cfg.bit_type, cfg.granularity, true),
            last: None,
        })),
        ObserverKind::Omse if channel_wise => {
            return unsupported("is layer-wise only on activations");
        }
        ObserverKind::Omse => Box::new(Omse {
            minmax: MinMax::new(cfg.bit_type, cfg.granularity, is_weight),
            last: None,
        }),
        ObserverKind::Ptf { .. } if !channel_wise || is_weight => {
            return unsupported("is channel-wise on activations only");
        }
        ObserverKind::Ptf { max_factor, range } => {
            Box::new(Ptf::new(cfg.bit_type, max_factor, range))
        }
    })
}

/// Running per-channel (or global) max and min, kept on the tensor's device.
#[derive(Debug)]
struct Range {
    granularity: Granularity,
    is_weight: bool,
    max: Option<Tensor>,
    min: Option<Tensor>,
}

impl Range {
    fn new(granularity: Granularity, is_weight: bool) -> Self {
        Range { granularity, is_weight, max: None, min: None }
    }

    /// Folds in a batch with `combine(old, current)`, then reduces to scalars if layer-wise
    /// (the original reduces after every update).
    fn update(
        &mut self,
        xs: &Tensor,
        combine: impl Fn(&Tensor, &Tensor, bool) -> Tensor,
    ) -> Result<()> {
        if xs.numel() == 0 {
            return Err(Error::BadInput("an empty tensor".into()));
        }
        let layer_wise = self.granularity == Granularity::LayerWise;
        // Layer-wise, the original combines per-channel values and then reduces them. Max and min
        // are exact and every `combine` (max, min, the EMA step) is monotone in the current value,
        // so reducing first gives the same result bit for bit, in one contiguous pass.
        let (cur_max, cur_min) = tch::no_grad(|| {
            if layer_wise { max_min(xs) } else { channel_max_min(xs, self.is_weight) }
        });
        // Layer-wise values are already single values here, channel-wise ones stay per channel.
        let (max, min) = match (&self.max, &self.min) {
            (Some(max), Some(min)) => (combine(max, &cur_max, true), combine(min, &cur_min, false)),
            _ => (cur_max, cur_min),
        };
        self.max = Some(max);
        self.min = Some(min);
        Ok(())
    }

    /// Parameters from the range, symmetric for signed types (spec §3.2).
    fn params(&self, bit_type: BitType) -> Result<QParams> {
        let (min, max) = self.values()?;
        params_from_range(&min, &max, bit_type, bit_type.signed)
    }

    fn values(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        match (&self.min, &self.max) {
            (Some(min), Some(max)) => Ok((values(min)?, values(max)?)),
            _ => Err(Error::Empty),
        }
    }
}

/// Running min/max (spec §3.3).
#[derive(Debug)]
pub struct MinMax {
    range: Range,
    bit_type: BitType,
}

impl MinMax {
    /// A min/max observer.
    pub fn new(bit_type: BitType, granularity: Granularity, is_weight: bool) -> Self {
        MinMax { range: Range::new(granularity, is_weight), bit_type }
    }

    pub(crate) fn update_range(&mut self, xs: &Tensor) -> Result<()> {
        self.range
            .update(xs, |old, cur, is_max| if is_max { old.maximum(cur) } else { old.minimum(cur) })
    }

    /// The running (min, max) values.
    pub(crate) fn range_values(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        self.range.values()
    }
}

impl Observer for MinMax {
    fn update(&mut self, xs: &Tensor) -> Result<()> {
        self.update_range(xs)
    }

    fn finish(self: Box<Self>) -> Result<QParams> {
        self.range.params(self.bit_type)
    }
}

/// EMA of the per-batch min/max with σ = 0.01 (spec §3.4).
#[derive(Debug)]
pub struct Ema {
    range: Range,
    bit_type: BitType,
}

/// The original's `ema_sigma`.
const EMA_SIGMA: f64 = 0.01;

impl Observer for Ema {
    fn update(&mut self, xs: &Tensor) -> Result<()> {
        self.range.update(xs, |old, cur, _| old + (cur - old) * EMA_SIGMA)
    }

    fn finish(self: Box<Self>) -> Result<QParams> {
        self.range.params(self.bit_type)
    }
}

/// EMA of the 1e-5 / 0.99999 quantiles of all elements (spec §3.5), layer-wise.
#[derive(Debug)]
pub struct Percentile {
    bit_type: BitType,
    /// (min, max) so far.
    range: Option<(f32, f32)>,
}

/// The original's hard-coded `percentile_alpha`.
const PERCENTILE_ALPHA: f64 = 0.99999;
/// torch.quantile refuses more elements than this; the original then calls numpy.percentile.
const TORCH_QUANTILE_MAX: i64 = 1 << 24;

impl Observer for Percentile {
    fn update(&mut self, xs: &Tensor) -> Result<()> {
        let flat = xs.to_kind(Kind::Float).reshape([-1]);
        let n = flat.size()[0];
        if n == 0 {
            return Err(Error::BadInput("an empty tensor".into()));
        }
        let (cur_max, cur_min) = tch::no_grad(|| -> Result<(f32, f32)> {
            Ok((quantile(&flat, PERCENTILE_ALPHA)?, quantile(&flat, 1.0 - PERCENTILE_ALPHA)?))
        })?;
        self.range = Some(match self.range {
            None => (cur_min, cur_max),
            Some((min, max)) => {
                (min + EMA_SIGMA as f32 * (cur_min - min), max + EMA_SIGMA as f32 * (cur_max - max))
            }
        });
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<QParams> {
        let (min, max) = self.range.ok_or(Error::Empty)?;
        params_from_range(&[min], &[max], self.bit_type, self.bit_type.signed)
    }
}

/// The `k`-th smallest (0-based) and the next of `flat`, found by a partial sort from the
/// nearer end (a full sort of every activation is what makes the original slow).
fn order_stats(flat: &Tensor, k: i64) -> Result<(f32, f32)> {
    let n = flat.size()[0];
    let hi = (k + 1).min(n - 1);
    let from_top = k > n / 2;
    let (count, largest) = if from_top { (n - k, true) } else { (hi + 1, false) };
    let (vals, _) = flat.f_topk(count, 0, largest, true)?;
    let vals = values(&vals)?;
    let at = |i: i64| if from_top { vals[(n - 1 - i) as usize] } else { vals[i as usize] };
    Ok((at(k), at(hi)))
}

/// `torch.quantile(v, p)` with linear interpolation in float32 (spec §3.5), or numpy's float64
/// `percentile` for tensors beyond torch's limit of 2^24 elements.
fn quantile(flat: &Tensor, p: f64) -> Result<f32> {
    let n = flat.size()[0];
    if n > TORCH_QUANTILE_MAX {
        // numpy: virtual index n·q + (1 − q) − 1 in float64, then _lerp on the float32 values
        // (b − a in float32, the rest in float64), cast back to float32.
        let q = p * 100.0 / 100.0;
        let virt = n as f64 * q + (1.0 - q) - 1.0;
        let lo = virt.floor();
        let (a, b) = order_stats(flat, lo as i64)?;
        let t = virt - lo;
        let diff = f64::from(b - a);
        let v = if t >= 0.5 { f64::from(b) - diff * (1.0 - t) } else { f64::from(a) + diff * t };
        return Ok(v as f32);
    }
    // torch: ranks = q · (n − 1) in float32, below = trunc, weights = ranks − below, then lerp.
    let rank = p as f32 * (n - 1) as f32;
    let below = rank as i64;
    let (a, b) = order_stats(flat, below)?;
    let b = if rank.ceil() as i64 == below { a } else { b };
    let w = rank - below as f32;
    Ok(if w < 0.5 { a + w * (b - a) } else { b - (b - a) * (1.0 - w) })
}

/// MinMax statistics, then on the last batch the shrink factor f ∈ {1.00, 0.99, …, 0.11} of both
/// bounds with the least MSE (spec §3.6).
#[derive(Debug)]
pub struct Omse {
    minmax: MinMax,
    last: Option<Tensor>,
}

impl Observer for Omse {
    fn update(&mut self, xs: &Tensor) -> Result<()> {
        self.minmax.update_range(xs)?;
        self.last = Some(xs.to_kind(Kind::Float));
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<QParams> {
        let (min, max) = self.minmax.range_values()?;
        let xs = self.last.ok_or(Error::Empty)?;
        let bit_type = self.minmax.bit_type;
        let mut best = (1e10f32, None);
        tch::no_grad(|| -> Result<()> {
            for i in 0..OMSE_FACTORS {
                let f = omse_factor(i);
                let p = params_from_range(&[min[0] * f], &[max[0] * f], bit_type, false)?;
                let score = candidate(&xs, p.scale[0], p.zero_point[0] as f32, bit_type)
                    .fake_quant_mse(&xs);
                // Strict: the earliest factor wins ties, as in the original.
                if score < best.0 {
                    best = (score, Some(p));
                }
            }
            Ok(())
        })?;
        best.1.ok_or_else(|| {
            Error::BadInput("every candidate range gave a NaN error (NaN activations)".into())
        })
    }
}

/// OMSE per output channel of a weight (fqvit+, not in the original): each channel's range
/// shrunk by its own factor f ∈ {1.00, 0.99, …, 0.11}, the one with the least squared error of
/// that channel's fake-quantized weights (the earliest on ties), so that a few large weights
/// do not coarsen the grid of the rest: what matters at 4 bits.
#[derive(Debug)]
pub struct WeightOmse(Omse);

/// The shrink factors OMSE tries, largest first.
fn omse_factor(i: usize) -> f32 {
    (1.0 - i as f64 * 0.01) as f32
}

/// OMSE's number of factors.
const OMSE_FACTORS: usize = 90;

impl Observer for WeightOmse {
    fn update(&mut self, xs: &Tensor) -> Result<()> {
        self.0.update(xs)
    }

    fn finish(self: Box<Self>) -> Result<QParams> {
        let Omse { minmax, last } = self.0;
        let (min, max) = minmax.range_values()?;
        let w = last.ok_or(Error::Empty)?;
        let bit_type = minmax.bit_type;
        let rows = w.reshape([min.len() as i64, -1]);
        let mut best: Vec<(f32, f32)> = vec![(f32::INFINITY, 1.0); min.len()];
        tch::no_grad(|| -> Result<()> {
            for i in 0..OMSE_FACTORS {
                let f = omse_factor(i);
                let shrunk = |v: &[f32]| v.iter().map(|x| x * f).collect::<Vec<f32>>();
                let p = params_from_range(&shrunk(&min), &shrunk(&max), bit_type, true)?;
                let err = values(&channel_error(&rows, &p))?;
                for (b, e) in best.iter_mut().zip(err) {
                    if e < b.0 {
                        *b = (e, f);
                    }
                }
            }
            Ok(())
        })?;
        if best.iter().any(|b| !b.0.is_finite()) {
            return Err(Error::BadInput("a channel's error is not finite (NaN weights)".into()));
        }
        let min: Vec<f32> = min.iter().zip(&best).map(|(m, b)| m * b.1).collect();
        let max: Vec<f32> = max.iter().zip(&best).map(|(m, b)| m * b.1).collect();
        params_from_range(&min, &max, bit_type, true)
    }
}

/// Per row of `rows`, the squared error of its fake-quantization at `params` (one scale per
/// row), as the quantized forward fake-quantizes weights.
fn channel_error(rows: &Tensor, params: &QParams) -> Tensor {
    let fq = Quantizer::new(params, Axis::First, rows.device()).fake_quant(rows);
    (fq - rows).square().sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
}
