//! Scalar reference of the integer LayerNorm, one token and one channel at a time (spec §6).
//!
//! Written straight from FQ-ViT `models/ptq/layers.py` `QIntLayerNorm.forward` (mode `'int'`)
//! and `get_MN`. The sums Σx and Σx² are exact integers (the original sums in float32, which
//! is exact for Σx but not always for Σx²); μ, σ and A are float32 in the original's order.

use super::LayerNormParams;
use crate::bits::Code;

/// `get_MN`: the dyadic approximation `|A| ≈ M / 2^N` with an 8-bit mantissa.
///
/// `N = clamp(7 − ⌊log2 |A|⌋, 0, 31)`, `M = clamp(⌊|A| · 2^N⌋, 0, 255)`.
/// `|A| ≥ 256` saturates to `(255, 0)`; `A = 0` gives `(0, 31)`.
pub fn get_mn(abs_a: f32) -> (i32, u32) {
    // FQ-ViT: torch.log2 in float32, floor, clamp (an infinite log clamps to a bound).
    let n = (7.0 - abs_a.log2().floor()).clamp(0.0, 31.0);
    let n = if n.is_nan() { 0 } else { n as u32 };
    let m = (abs_a * pow2(n)).floor().clamp(0.0, 255.0);
    (m as i32, n)
}

/// `2^n` as float32, exact for `n ≤ 127`.
#[inline]
pub(crate) fn pow2(n: u32) -> f32 {
    f32::from_bits((127 + n) << 23)
}

/// `round(v / 2^n)`, half to even, exactly on integers.
#[inline]
pub fn round_shift(v: i64, n: u32) -> i64 {
    if n == 0 {
        return v;
    }
    let q = v >> n;
    let rem = v - (q << n);
    let half = 1i64 << (n - 1);
    if rem > half || (rem == half && q & 1 == 1) { q + 1 } else { q }
}

/// Per-token statistics in the original's float32 order, from exact integer sums.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TokenStats {
    /// μ in real units.
    pub(crate) mean: f32,
    /// σ in real units (population, no eps).
    pub(crate) std: f32,
}

/// `C·Σx² − (Σx)²` in float32 as the original computes it from its sums (σ's radicand).
#[inline]
pub(crate) fn var_term(sum: i64, sum_sq: i64, n_channels: usize) -> f32 {
    let (c, sum_f) = (n_channels as f32, sum as f32);
    c * (sum_sq as f32) - sum_f * sum_f
}

/// `μ = (Σx / C) · s_min`, `σ = (s_min / C) · sqrt(C·Σx² − (Σx)²)`, or `None` for zero variance.
///
/// `root` is the square root of the radicand when the caller took it (another library's
/// `sqrt`, see [`Roots`](super::Roots)); `None` takes the correctly rounded one.
#[inline]
pub(crate) fn token_stats(
    sum: i64,
    sum_sq: i64,
    n_channels: usize,
    s_min: f32,
    root: Option<f32>,
) -> Option<TokenStats> {
    // Overflow: |x| < 2^15 and C ≤ 2^16 give C·Σx² < 2^16 · 2^16 · 2^30 < 2^63.
    let n = n_channels as i64;
    if n * sum_sq == sum * sum {
        return None;
    }
    let c = n_channels as f32;
    let mean = sum as f32 / c * s_min;
    let root = root.unwrap_or_else(|| var_term(sum, sum_sq, n_channels).sqrt());
    let std = s_min / c * root;
    // float32 cancellation can leave a tiny positive variance at 0 or below: it is zero variance too.
    (std > 0.0 && std.is_finite()).then_some(TokenStats { mean, std })
}

/// The output code of one channel given its token statistics: steps 6–9 of spec §6.
#[inline]
pub(crate) fn channel_code(
    x: i32,
    stats: TokenStats,
    s_min: f32,
    gamma: f32,
    beta: f32,
    out_scale: f32,
) -> i32 {
    let a = s_min / stats.std * gamma / out_scale;
    let (m, n) = get_mn(a.abs());
    let m = if a < 0.0 {
        -m
    } else if a > 0.0 {
        m
    } else {
        0
    };
    let b = ((beta - stats.mean / stats.std * gamma) / out_scale * pow2(n)).round_ties_even();
    // Saturates only for |B| ≥ 2^63, far outside any calibrated model.
    let b = b as i64;
    saturate_i32(round_shift(i64::from(m) * i64::from(x) + b, n))
}

/// The output of a zero-variance token: `round(β / s_out)`, the limit of LayerNorm as the
/// variance goes to zero (`x − μ = 0`). The original divides by σ = 0 and returns NaN here.
#[inline]
pub(crate) fn zero_variance_code(beta: f32, out_scale: f32) -> i32 {
    let y = (beta / out_scale).round_ties_even();
    if y.is_nan() { 0 } else { saturate_i32(y as i64) }
}

#[inline]
pub(crate) fn saturate_i32(v: i64) -> i32 {
    v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

/// Integer LayerNorm of `codes` (tokens × C, row-major) into `out`, one element at a time.
///
/// See [`ptf_layer_norm`](super::ptf_layer_norm) for the contract; this is its reference.
///
/// # Panics
/// As [`ptf_layer_norm`](super::ptf_layer_norm).
#[track_caller]
pub fn ptf_layer_norm<C: Code>(codes: &[C], params: &LayerNormParams<'_>, out: &mut [i32]) {
    let n_channels = params.check::<C>(codes.len(), out.len());
    let (s_min, shifts) = params.in_scale.min_and_shifts(n_channels);
    for (token, y) in codes.chunks_exact(n_channels).zip(out.chunks_exact_mut(n_channels)) {
        let x = |c: usize| (token[c].int() - params.zero_point) << shifts[c];
        let (mut sum, mut sum_sq) = (0i64, 0i64);
        for c in 0..n_channels {
            let xc = i64::from(x(c));
            sum += xc;
            sum_sq += xc * xc;
        }
        match token_stats(sum, sum_sq, n_channels, s_min, None) {
            Some(stats) => {
                for c in 0..n_channels {
                    y[c] = channel_code(
                        x(c),
                        stats,
                        s_min,
                        params.gamma[c],
                        params.beta[c],
                        params.out_scale,
                    );
                }
            }
            None => {
                for c in 0..n_channels {
                    y[c] = zero_variance_code(params.beta[c], params.out_scale);
                }
            }
        }
    }
}
