//! The vectorised body of [`ptf_layer_norm`](super::ptf_layer_norm).
//!
//! The channel loop has no branches, divisions or library calls, so it compiles to SIMD for the
//! instruction set [`pulp::Arch`] detects. Each step is exact or flagged: a flagged channel is
//! recomputed in f64 ([`channel_code_f64`]) and, if still flagged, by the reference, so the
//! codes are always those of [`reference::ptf_layer_norm`](super::reference::ptf_layer_norm).

use super::LayerNormParams;
use super::reference::{TokenStats, channel_code, token_stats, var_term, zero_variance_code};
#[cfg(doc)]
use super::reference::{get_mn, round_shift};
use crate::bits::Code;

/// Tokens per rayon task: a few microseconds of work, so the task overhead stays small.
pub(super) const TOKENS_PER_TASK: usize = 16;

/// Channels summed in i32 before widening: `256 · 2^15 < 2^31` for Σx; each `x²` is below
/// 2^30 and goes into Σx² in i64.
const SUM_BLOCK: usize = 256;

/// 2^21 and 2^52 as f32/f64 bounds of `|B|` for the two exact paths.
const B_LIMIT_F32: f32 = 2_097_152.0;
const B_LIMIT_F64: f64 = 4_503_599_627_370_496.0;

/// A run of tokens for [`pulp::Arch::dispatch`], whose `with_simd` is inlined into code
/// compiled for the detected instruction set (a closure would not be).
pub(super) struct Tokens<'a, 'p, C> {
    pub(super) codes: &'a [C],
    /// Each token's root of σ's radicand, when the caller took them.
    pub(super) roots: Option<&'a [f32]>,
    pub(super) factors: &'a [i32],
    pub(super) s_min: f32,
    pub(super) params: &'a LayerNormParams<'p>,
    pub(super) x: &'a mut [i32],
    pub(super) y: &'a mut [i32],
}

impl<C: Code> pulp::WithSimd for Tokens<'_, '_, C> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let n_channels = self.x.len();
        let tokens = self.codes.chunks_exact(n_channels).zip(self.y.chunks_exact_mut(n_channels));
        for (t, (token, y)) in tokens.enumerate() {
            let root = self.roots.map(|r| r[t]);
            layer_norm_token(token, root, self.factors, self.s_min, self.params, self.x, y);
        }
    }
}

/// A run of tokens whose radicands `C·Σx² − (Σx)²` [`variance_terms`](super::variance_terms)
/// computes.
pub(super) struct Radicands<'a, C> {
    pub(super) codes: &'a [C],
    pub(super) factors: &'a [i32],
    pub(super) zero_point: i32,
    pub(super) x: &'a mut [i32],
    pub(super) out: &'a mut [f32],
}

impl<C: Code> pulp::WithSimd for Radicands<'_, C> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let n_channels = self.x.len();
        for (token, out) in self.codes.chunks_exact(n_channels).zip(self.out.iter_mut()) {
            let (sum, sum_sq) = token_sums(token, self.factors, self.zero_point, self.x);
            *out = var_term(sum, sum_sq, n_channels);
        }
    }
}

/// `x_c = (q_c − z)·2^(α_c − α_min)` into `x`, and the exact `Σx`, `Σx²`.
#[inline(always)]
fn token_sums<C: Code>(token: &[C], factors: &[i32], zero_point: i32, x: &mut [i32]) -> (i64, i64) {
    let (mut sum, mut sum_sq) = (0i64, 0i64);
    for ((x, token), factors) in
        x.chunks_mut(SUM_BLOCK).zip(token.chunks(SUM_BLOCK)).zip(factors.chunks(SUM_BLOCK))
    {
        let (mut block_sum, mut block_sum_sq) = (0i32, 0i64);
        for ((xc, &q), &factor) in x.iter_mut().zip(token).zip(factors) {
            *xc = (q.int() - zero_point) * factor;
            block_sum += *xc;
            block_sum_sq += i64::from(*xc * *xc);
        }
        sum += i64::from(block_sum);
        sum_sq += block_sum_sq;
    }
    (sum, sum_sq)
}

#[inline(always)]
fn layer_norm_token<C: Code>(
    token: &[C],
    root: Option<f32>,
    factors: &[i32],
    s_min: f32,
    params: &LayerNormParams<'_>,
    x: &mut [i32],
    y: &mut [i32],
) {
    let (sum, sum_sq) = token_sums(token, factors, params.zero_point, x);
    match token_stats(sum, sum_sq, x.len(), s_min, root) {
        Some(stats) => normalize_token(x, stats, s_min, params, y),
        None => {
            for (yc, &b) in y.iter_mut().zip(params.beta) {
                *yc = zero_variance_code(b, params.out_scale);
            }
        }
    }
}

/// What a token shares across its channels.
#[derive(Clone, Copy)]
struct TokenConsts {
    /// `s_min / σ`.
    k: f32,
    /// `μ / σ`.
    mean_over_std: f32,
    out_scale: f32,
    /// `1 / s_out`, correctly rounded.
    recip_out_scale: f32,
}

#[inline(always)]
fn normalize_token(
    x: &[i32],
    stats: TokenStats,
    s_min: f32,
    params: &LayerNormParams<'_>,
    y: &mut [i32],
) {
    let consts = TokenConsts {
        k: s_min / stats.std,
        mean_over_std: stats.mean / stats.std,
        out_scale: params.out_scale,
        recip_out_scale: 1.0 / params.out_scale,
    };
    let channels = || x.iter().zip(params.gamma).zip(params.beta);
    let mut any_flagged = !divides_exactly(params.out_scale);
    for (yc, ((&xc, &gamma), &beta)) in y.iter_mut().zip(channels()) {
        let (code, flagged) = channel_code_f32(xc, consts, gamma, beta);
        *yc = code;
        any_flagged |= flagged;
    }
    if any_flagged {
        let all = !divides_exactly(params.out_scale);
        for (yc, ((&xc, &gamma), &beta)) in y.iter_mut().zip(channels()) {
            if all || channel_code_f32(xc, consts, gamma, beta).1 {
                let (code, flagged) = channel_code_f64(xc, consts, gamma, beta);
                *yc = if flagged {
                    channel_code(xc, stats, s_min, gamma, beta, params.out_scale)
                } else {
                    code
                };
            }
        }
    }
}

/// Whether [`div`] is exact for this divisor: an exponent in `-40..=40` keeps the remainders
/// of quotients with exponents in `-41..=60` (where [`channel_code_f32`] relies on them)
/// representable.
#[inline(always)]
fn divides_exactly(d: f32) -> bool {
    d > 0.0 && (-40..=40).contains(&((d.to_bits() >> 23) as i32 - 127))
}

/// `p / d` correctly rounded from `recip_d = 1/d` (correctly rounded) without dividing:
/// one Newton step makes the quotient faithful, and Markstein's theorem makes the second,
/// `q + (p − q·d)·recip_d` with the remainder exact through FMA, the correctly rounded one
/// (Muller et al., *Handbook of Floating-Point Arithmetic*, 2nd ed., Theorem 4.10).
/// Needs the remainders normal (see [`divides_exactly`]); tested against `/` below.
#[inline(always)]
fn div(p: f32, d: f32, recip_d: f32) -> f32 {
    let q = p * recip_d;
    let q = (-q).mul_add(d, p).mul_add(recip_d, q);
    (-q).mul_add(d, p).mul_add(recip_d, q)
}

/// The exponent of `|a|` and whether [`get_mn`] can be read off it: not when `|a|` is zero,
/// subnormal, outside `[2^-40, 2^40]`, or within 2^-15 below a power of two (where `log2`
/// may round up to the power).
#[inline(always)]
fn exponent(a: f32) -> (i32, bool) {
    let bits = a.abs().to_bits();
    let exp = (bits >> 23) as i32 - 127;
    (exp, !(-40..=40).contains(&exp) || bits & 0x7f_ffff >= 0x7f_ff00)
}

/// One output code in f32, and whether it must be recomputed (then the code is meaningless).
///
/// Exact when not flagged: `A` and `B` are the reference's float32 values ([`div`]); `N`, `M`
/// come from the bits of `|A|` as [`get_mn`] computes them; with `|B| < 2^21` and `N ≤ 22`,
/// `B·2^-N = I + F` with `I` even and `F ∈ [0, 2)`; `|M·x| ≤ 255 · 32,640 < 2^23` is exact, so
/// `w = M·x·2^-N + F` is (`|w·2^N| < 2^23 + 2^23`), and `I + round(w)` is
/// [`round_shift`]`(M·x + B, N)` because `I` is even. The result's bits are read off the
/// mantissa, which needs `|y| < 2^22`: `|y| < |I| + |w| + 1/2 < 2^21 + 2 + |M·x|·2^-N + 5/2`,
/// so a channel with `|M·x| ≥ (2^21 − 8)·2^N` is flagged (only large PTF shifts reach it:
/// without them `|M·x| ≤ 255 · 2040 < 2^19`).
#[inline(always)]
fn channel_code_f32(x: i32, t: TokenConsts, gamma: f32, beta: f32) -> (i32, bool) {
    let a = div(t.k * gamma, t.out_scale, t.recip_out_scale);
    let (exp, flag_a) = exponent(a);
    let n = (7 - exp).clamp(0, 31);
    let two_n = f32::from_bits(((127 + n) as u32) << 23);
    let two_minus_n = f32::from_bits(((127 - n) as u32) << 23);
    let m = (a.abs() * two_n).floor().min(255.0);
    let m = if a < 0.0 { -m } else { m };
    let b = div(beta - t.mean_over_std * gamma, t.out_scale, t.recip_out_scale) * two_n;
    let b = b.round_ties_even();
    let flag_b = b.abs() >= B_LIMIT_F32 || b.is_nan() || n > 22;
    let mx = m * x as f32;
    let flag_x = mx.abs() >= (B_LIMIT_F32 - 8.0) * two_n;
    let b_frac = b * two_minus_n;
    let even = 2.0 * (b_frac * 0.5).floor();
    let w = mx * two_minus_n + (b_frac - even);
    let y = even + w.round_ties_even();
    // |y| < 2^22: plus 1.5 · 2^23, its value is in the low mantissa bits (this vectorises, a
    // saturating `as i32` does not).
    let y = ((y + 12_582_912.0).to_bits() & 0x7f_ffff) as i32 - 0x40_0000;
    (y, flag_a | flag_b | flag_x)
}

/// One output code in f64, for channels [`channel_code_f32`] flags; flagged again when
/// `|A|` is out of range ([`exponent`]) or `|B| ≥ 2^52`. `M·x + B` and its scaling by `2^-N`
/// are exact in f64, so rounding it half to even is [`round_shift`].
#[inline(always)]
fn channel_code_f64(x: i32, t: TokenConsts, gamma: f32, beta: f32) -> (i32, bool) {
    let a = t.k * gamma / t.out_scale;
    let (exp, flag_a) = exponent(a);
    let n = (7 - exp).clamp(0, 31);
    let two_n = f32::from_bits(((127 + n) as u32) << 23);
    let m = (a.abs() * two_n).floor().min(255.0);
    let m = if a < 0.0 { -m } else { m };
    let b = ((beta - t.mean_over_std * gamma) / t.out_scale * two_n).round_ties_even();
    let flag_b = b.abs() >= B_LIMIT_F64 as f32 || b.is_nan();
    let two_minus_n = f64::from_bits(((1023 - n) as u64) << 52);
    let y = ((f64::from(m) * f64::from(x) + f64::from(b)) * two_minus_n).round_ties_even();
    let y = y.clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32;
    (y, flag_a | flag_b)
}

#[cfg(test)]
mod tests {
    use super::{div, divides_exactly};

    /// SplitMix64, so the test needs no crate.
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A float with a random mantissa and an exponent in `lo..=hi`.
    fn float(state: &mut u64, lo: i32, hi: i32) -> f32 {
        let r = next(state);
        let exp = lo + (r >> 40) as i32 % (hi - lo + 1);
        let sign = (r >> 39) as u32 & 1;
        f32::from_bits(sign << 31 | ((exp + 127) as u32) << 23 | r as u32 & 0x7f_ffff)
    }

    #[test]
    fn division_without_dividing_is_correctly_rounded() {
        let mut state = 7;
        let mut checked = 0;
        for i in 0..2_000_000 {
            let d = float(&mut state, -40, 40).abs();
            // Divisors with all-ones and all-zeros mantissas are the classic hard cases.
            let d = match i % 4 {
                0 => f32::from_bits(d.to_bits() | 0x7f_ffff),
                1 => f32::from_bits(d.to_bits() & !0x7f_ffff),
                _ => d,
            };
            assert!(divides_exactly(d));
            let q = float(&mut state, -40, 60);
            // Numerators near q·d, so the quotient has exponent in [-40, 60].
            let p = q * d;
            if !p.is_normal() {
                continue;
            }
            assert_eq!(div(p, d, 1.0 / d).to_bits(), (p / d).to_bits(), "{p:e} / {d:e}");
            checked += 1;
        }
        assert!(checked > 1_900_000);
    }
}
