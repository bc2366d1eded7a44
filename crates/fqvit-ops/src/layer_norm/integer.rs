//! The integer LayerNorm with every per-token step in integers: σ by an integer square root,
//! the factors `M`, `N` and `B` of spec §6 by integer multiplications and shifts.
//!
//! The original takes σ with a float32 square root and computes each token's `A = (s_min/σ) ·
//! γ/s_out` and `B` in float32. Here the float parameters become integer constants once
//! ([`IntegerLayerNorm::new`], the only float arithmetic), and [`IntegerLayerNorm::run`] is
//! integers only. With `x` the token's integers in units of `s_min` (as in
//! [`super::ptf_layer_norm`]), `S1 = Σx`, `S2 = Σx²`, `D = C·S2 − S1²`, the scale `s_min`
//! cancels: `A_c = C·h_c/√D` and `μ/σ = S1/√D`, with `h_c = γ_c/s_out`.
//!
//! Per token (one integer square root, two divisions):
//! 1. `D = C·S2 − S1²` exactly in i64 (`0 ≤ D ≤ C·S2 < 2^62`, see [`super`]); `D = 0` is the
//!    zero-variance token, `round(β_c/s_out)`.
//! 2. `d = D · 4^t` with the even shift that puts `d` in `[2^60, 2^62)`, `r = ⌊√d⌋ ∈ [2^30,
//!    2^31)`, so `√D ≈ r · 2^−t` within a relative 2^−30. Codes of `b` bits shifted by up
//!    to `15 − b` span less than 2^15, so `D = C²·Var(x) < C²·2^28 ≤ 2^60` and `1 ≤ t ≤ 30`;
//!    `t = −1` (two low bits dropped) is there for the bound `D < 2^62` alone.
//! 3. `inv = ⌊2^62 / r⌋ ∈ (2^31, 2^32]`, taken as `inv' · 2^e` with `inv' ∈ [2^31, 2^32)`:
//!    `1/√D ≈ inv' · 2^(t + e − 62)` within a relative 2^−29.
//! 4. `σ1 = ⌊S1 · 2^24 / C⌋`, the mean with 24 fractional bits (`|S1| < 2^31`).
//!
//! Per channel, with `C·|h_c| ≈ m_c · 2^(k_c − 31)`, `m_c ∈ [2^31, 2^32)` (prepared once):
//! 5. `Q = m_c · inv' ∈ [2^62, 2^64)` (u64): `|A_c| ≈ Q · 2^X`, `X = k_c + t + e − 93`;
//! 6. `N = clamp(7 − ⌊log2 Q⌋ − X, 0, 31)`, `s = −(X + N)` and `M = min(⌊Q / 2^s⌋, 255)`:
//!    get_MN on this `|A|` (`M ∈ [128, 255]` unless `N` is clamped);
//! 7. `B = round(2^N · (b_c − sign_c · |h_c| · μ/σ))`, half to even, saturated to i64: `b_c =
//!    β_c/s_out` in units of 2^−24, `A24 = ⌊Q · 2^(24 − s)⌋ = 2^N·|A_c|` with 24 fractional bits,
//!    and `2^N·|h_c|·μ/σ = 2^N·|A_c|·S1/C` as `⌊A24 · σ1 / 2^24⌋` in units of 2^−24;
//! 8. `y = round((±M·x + B) / 2^N)`, half to even, saturated to i32, as in the float path.
//!
//! So `A` is within a relative 2^−28 of its real value (the original's float32 `A` within about
//! 2^−21), and `B` within about `2^(N−25)` (β/s_out rounded to 2^−24) plus `2^−16 + |μ|·2^−24`
//! (the mean and `A24` in fixed point, `μ` in units of `s_min`) plus a relative 2^−28 of the
//! term `2^N·|h|·|μ/σ|`: the codes differ from the real numbers' only where a real value lies
//! that close to a rounding boundary.
//!
//! [`IntegerLayerNorm::run`] computes these with branch-free i64 lanes that compile to SIMD
//! (`Lanes`) wherever they are exact: `N` not clamped (then `s ∈ {55, 56}`, `A24 < 2^32`),
//! `|σ1| < 2^31` (so `A24·σ1 < 2^63`) and `|b_c| < 2^31` (so `b_c · 2^N < 2^62`); any other
//! channel or token takes the general form (`Channel::factors`, i128 where needed), so the
//! codes are always those of the steps above (tested against each other at the edges).

// Integers only from `run` on; the float parameters become constants in `new` alone.
#![deny(clippy::float_arithmetic)]

use super::reference::{round_shift, saturate_i32, zero_variance_code};
use rayon::prelude::*;

use super::{LayerNormParams, MAX_CHANNELS};
use crate::Isa;
use crate::bits::Code;

/// One channel's constants, read from the lanes ([`IntegerLayerNorm::channel`]).
#[derive(Clone, Copy, Debug)]
struct Channel {
    /// The sign of γ_c (0 where γ_c = 0, whose `A` is 0).
    sign: i8,
    /// `C·|γ_c/s_out| ≈ mant · 2^(exp − 31)`, `mant ∈ [2^31, 2^32)`.
    mant: u64,
    exp: i32,
    /// `β_c/s_out` in units of 2^−24, rounded half to even.
    beta: i64,
}

/// An integer LayerNorm prepared for one set of parameters: [`run`](Self::run) computes with
/// integers only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntegerLayerNorm {
    zero_point: i32,
    /// The input codes' width.
    bits: crate::Bits,
    /// `α_c − α_min`.
    shifts: Vec<u32>,
    /// The zero-variance codes `round(β_c/s_out)`.
    flat: Vec<i32>,
    /// Each channel's constants ([`Channel`]) as lanes for `Lanes`; `lane_ok` is 0 where a
    /// channel always takes the general form (γ_c = 0, or `|b_c| ≥ 2^31`).
    lane_mant: Vec<u32>,
    lane_exp: Vec<i64>,
    lane_beta: Vec<i64>,
    lane_sign: Vec<i64>,
    lane_ok: Vec<i64>,
}

/// Why a parameter set cannot be prepared.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PrepareError {
    /// γ, β or the output scale gives a constant outside the integer ranges, naming it.
    #[error("integer LayerNorm: {0}")]
    OutOfRange(String),
}

/// `v` as `mant · 2^(exp − 31)` with `mant ∈ [2^31, 2^32)`, rounded half to even (v > 0,
/// finite).
#[allow(clippy::float_arithmetic)]
fn normalize(v: f64) -> (u64, i32) {
    let e = v.log2().floor() as i32;
    // v · 2^(31 − e) in [2^31, 2^32) up to the log's rounding, corrected below.
    let mut exp = e;
    let mut mant = (v * 2f64.powi(31 - exp)).round_ties_even();
    if mant >= 4_294_967_296.0 {
        exp += 1;
        mant = (v * 2f64.powi(31 - exp)).round_ties_even();
    } else if mant < 2_147_483_648.0 {
        exp -= 1;
        mant = (v * 2f64.powi(31 - exp)).round_ties_even();
    }
    // Rounding up can reach 2^32 exactly.
    if mant >= 4_294_967_296.0 {
        return (1 << 31, exp + 1);
    }
    (mant as u64, exp)
}

/// What a token shares across its channels.
#[derive(Clone, Copy, Debug)]
struct Token {
    /// `inv' ∈ [2^31, 2^32)`.
    inv: u64,
    /// `t + e − 93`: `X = k_c + xt`.
    xt: i32,
    /// `⌊S1 · 2^24 / C⌋`.
    sigma1: i64,
}

impl IntegerLayerNorm {
    /// Prepares `params` (the float arithmetic of the integer LayerNorm, done once).
    ///
    /// # Errors
    /// If γ or β is not finite, `|β_c/s_out| ≥ 2^38` or `C·|γ_c/s_out|` lies outside
    /// `[2^−64, 2^64)`, naming the channel.
    ///
    /// # Panics
    /// As [`super::ptf_layer_norm`] for inconsistent lengths and scales.
    #[track_caller]
    #[allow(clippy::float_arithmetic)]
    pub fn new(params: &LayerNormParams<'_>) -> Result<Self, PrepareError> {
        // The storage type does not matter here; `run` takes any code of `params.bits`.
        let c = params.check::<u16>(params.gamma.len(), params.gamma.len());
        debug_assert!(c <= MAX_CHANNELS);
        let (_, shifts) = params.in_scale.min_and_shifts(c);
        let out = f64::from(params.out_scale);
        let mut ln = IntegerLayerNorm {
            zero_point: params.zero_point,
            bits: params.bits,
            shifts,
            flat: Vec::with_capacity(c),
            lane_mant: Vec::with_capacity(c),
            lane_exp: Vec::with_capacity(c),
            lane_beta: Vec::with_capacity(c),
            lane_sign: Vec::with_capacity(c),
            lane_ok: Vec::with_capacity(c),
        };
        for (i, (&g, &b)) in params.gamma.iter().zip(params.beta).enumerate() {
            let (g, b) = (f64::from(g), f64::from(b));
            if !g.is_finite() || !b.is_finite() {
                return Err(PrepareError::OutOfRange(format!("channel {i}: γ {g} or β {b}")));
            }
            let beta_over = b / out;
            if beta_over.abs() >= 2f64.powi(38) {
                return Err(PrepareError::OutOfRange(format!(
                    "channel {i}: β/s_out = {beta_over:e} is beyond ±2^38"
                )));
            }
            let beta = (beta_over * 2f64.powi(24)).round_ties_even() as i64;
            let flat = zero_variance_code(params.beta[i], params.out_scale);
            let h = c as f64 * g.abs() / out;
            let (sign, mant, exp) = if g == 0.0 {
                (0, 0, 0)
            } else if !(2f64.powi(-64)..2f64.powi(64)).contains(&h) {
                return Err(PrepareError::OutOfRange(format!(
                    "channel {i}: C·|γ|/s_out = {h:e} is outside [2^−64, 2^64)"
                )));
            } else {
                let (mant, exp) = normalize(h);
                (if g > 0.0 { 1 } else { -1 }, mant, exp)
            };
            ln.flat.push(flat);
            ln.lane_mant.push(mant as u32);
            ln.lane_exp.push(i64::from(exp));
            ln.lane_beta.push(beta);
            ln.lane_sign.push(sign);
            ln.lane_ok.push(i64::from(sign != 0 && beta.abs() < 1 << 31));
        }
        Ok(ln)
    }

    /// Channels.
    pub fn channels(&self) -> usize {
        self.flat.len()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.flat.len() * (4 + 4 + 4 * 8) + 4 * self.shifts.len()
    }

    /// Channel `i`'s constants for the general form.
    #[inline]
    fn channel(&self, i: usize) -> Channel {
        Channel {
            sign: self.lane_sign[i] as i8,
            mant: u64::from(self.lane_mant[i]),
            exp: self.lane_exp[i] as i32,
            beta: self.lane_beta[i],
        }
    }

    /// The output codes `y` (not clamped) of tokens of `C` codes, tokens in parallel, the
    /// channel loops vectorised up to `isa` (the codes do not depend on it).
    ///
    /// # Panics
    /// If `codes` and `out` are not the same whole number of tokens, or the prepared width does
    /// not fit `C`.
    #[track_caller]
    pub fn run<C: Code>(&self, isa: Isa, codes: &[C], out: &mut [i32]) {
        self.run_with(codes, out, Some(isa.arch()));
    }

    /// [`run`](Self::run) with the vector lanes on `lanes`, or with every channel in the
    /// general form (`None`): the reference the lanes are tested against.
    #[track_caller]
    fn run_with<C: Code>(&self, codes: &[C], out: &mut [i32], lanes: Option<pulp::Arch>) {
        let c = self.flat.len();
        assert!(
            self.bits <= C::BITS,
            "integer LayerNorm: {}-bit codes do not fit {}-bit storage",
            self.bits.get(),
            C::BITS.get()
        );
        assert!(
            codes.len().is_multiple_of(c) && codes.len() == out.len(),
            "integer LayerNorm: {} codes and room for {} are not tokens of {c}",
            codes.len(),
            out.len()
        );
        let task = c * super::fast::TOKENS_PER_TASK;
        codes.par_chunks(task).zip(out.par_chunks_mut(task)).for_each_init(
            || (vec![0i64; c], vec![0i64; c]),
            |(x, flags), (codes, out)| {
                for (token, y) in codes.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
                    // The statistics compiled for the lanes' instruction set too.
                    let tok = match lanes {
                        Some(arch) => arch.dispatch(Stats { ln: self, token, x, y }),
                        None => self.token(token, x, y),
                    };
                    let Some(tok) = tok else { continue };
                    if let Some(arch) = lanes.filter(|_| tok.sigma1.abs() < 1 << 31) {
                        // The scan for flagged channels only where the lanes flagged one.
                        if arch.dispatch(Lanes { ln: self, tok, x, y, flags }) {
                            for (i, _) in flags.iter().enumerate().filter(|&(_, &f)| f != 0) {
                                y[i] = self.channel(i).code(x[i], tok);
                            }
                        }
                    } else {
                        for (i, (y, &x)) in y.iter_mut().zip(x.iter()).enumerate() {
                            *y = self.channel(i).code(x, tok);
                        }
                    }
                }
            },
        );
    }

    /// The token's `x` and shared values, or `None` when its codes are all equal (then `y`
    /// holds the zero-variance codes).
    #[inline(always)]
    fn token<C: Code>(&self, token: &[C], x: &mut [i64], y: &mut [i32]) -> Option<Token> {
        let (mut s1, mut s2) = (0i64, 0i64);
        for ((x, &q), &shift) in x.iter_mut().zip(token).zip(&self.shifts) {
            // |x| < 2^15 (a b-bit code shifted by at most 15 − b), so x² < 2^30 is an i32 product,
            // which vectorises where an i64 one would not (AVX2 has no 64-bit multiply).
            let xi = (q.int() - self.zero_point) << shift;
            *x = i64::from(xi);
            s1 += i64::from(xi);
            s2 += i64::from(xi * xi);
        }
        let n = self.flat.len() as i64;
        // 0 ≤ D ≤ C·S2 < 2^62 (|x| < 2^15, C ≤ 2^16).
        let d = n * s2 - s1 * s1;
        if d == 0 {
            y.copy_from_slice(&self.flat);
            return None;
        }
        let d = d as u64;
        let bits = 64 - d.leading_zeros() as i32;
        let t = (62 - bits).div_euclid(2);
        let normalized = if t >= 0 { d << (2 * t) } else { d >> 2 };
        let inv = (1u64 << 62) / normalized.isqrt();
        let (inv, e) = if inv >> 32 != 0 { (inv >> 1, 1) } else { (inv, 0) };
        // |S1| < 2^31, so S1·2^24 < 2^55.
        let sigma1 = (s1 << 24).div_euclid(n);
        Some(Token { inv, xt: t + e - 93, sigma1 })
    }
}

impl Channel {
    /// `y` of one channel: steps 5–8 in their general form.
    fn code(&self, x: i64, tok: Token) -> i32 {
        let (m, n, b) = self.factors(tok);
        saturate_i32(round_shift((i64::from(m) * x).saturating_add(b), n))
    }

    /// `(±M, N, B)` of the token.
    fn factors(&self, tok: Token) -> (i32, u32, i64) {
        if self.sign == 0 {
            // A = 0: get_MN gives (0, 31), and B = round(2^31 · β/s_out).
            return (0, 31, round_sat(i128::from(self.beta) << 31, 24));
        }
        let q = self.mant * tok.inv;
        let x = self.exp + tok.xt;
        let log = 63 - q.leading_zeros() as i32;
        let n = (7 - log - x).clamp(0, 31);
        let s = -(x + n);
        let m = if s <= 0 {
            255
        } else if s >= 64 {
            0
        } else {
            (q >> s).min(255) as i32
        };
        // 2^n·|A| with 24 fractional bits, then 2^n·|h|·μ/σ in units of 2^−24.
        let a24 = shift(u128::from(q), 24 - s);
        let term = a24.and_then(|a| i128::try_from(a).ok()?.checked_mul(i128::from(tok.sigma1)));
        let b = match term {
            Some(term) => {
                let term = term >> 24;
                let beta = i128::from(self.beta) << n;
                let v = if self.sign > 0 { beta - term } else { beta + term };
                round_sat(v, 24)
            }
            // 2^n·|A|·|S1/C| ≥ 2^103: B is beyond any i64.
            None => {
                let neg = (self.sign > 0) == (tok.sigma1 > 0);
                if neg { i64::MIN } else { i64::MAX }
            }
        };
        (i32::from(self.sign) * m, n as u32, b)
    }
}

/// Steps 5–8 for a token's channels in i64 lanes where they are exact (see the module docs);
/// `flags[c] = 1` marks a channel left to [`Channel::code`].
struct Lanes<'a> {
    ln: &'a IntegerLayerNorm,
    tok: Token,
    x: &'a [i64],
    y: &'a mut [i32],
    flags: &'a mut [i64],
}

/// One token's statistics ([`IntegerLayerNorm::token`]) for [`pulp::Arch::dispatch`].
struct Stats<'a, C> {
    ln: &'a IntegerLayerNorm,
    token: &'a [C],
    x: &'a mut [i64],
    y: &'a mut [i32],
}

impl<C: Code> pulp::WithSimd for Stats<'_, C> {
    type Output = Option<Token>;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Option<Token> {
        self.ln.token(self.token, self.x, self.y)
    }
}

impl pulp::WithSimd for Lanes<'_> {
    /// Whether any channel is flagged.
    type Output = bool;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> bool {
        let Lanes { ln, tok, x, y, flags } = self;
        // Every product below is of two 32-bit operands (one instruction in vector lanes; a
        // 64-bit multiply is several, and none on AVX2): `inv' < 2^32`, `mant < 2^32`,
        // `A24 < 2^32`, `|σ1| < 2^31`, `M < 2^8`, `|x| < 2^15`.
        let (inv, xt) = (u64::from(tok.inv as u32), i64::from(tok.xt));
        let (sigma1_abs, sigma1_neg) = (tok.sigma1.unsigned_abs() & 0xffff_ffff, tok.sigma1 < 0);
        let mut any = 0i64;
        let consts = ln
            .lane_mant
            .iter()
            .zip(&ln.lane_exp)
            .zip(ln.lane_beta.iter().zip(&ln.lane_sign))
            .zip(&ln.lane_ok);
        for (((y, f), &x), (((&mant, &exp), (&beta, &sign)), &ok)) in
            y.iter_mut().zip(flags.iter_mut()).zip(x).zip(consts)
        {
            // Q ∈ [2^62, 2^64): ⌊log2 Q⌋ = 62 + hi.
            let q = u64::from(mant) * inv;
            let hi = (q >> 63) as i64;
            let n_raw = -55 - hi - exp - xt;
            *f = i64::from(!(0..=31).contains(&n_raw)) | (1 - ok);
            any |= *f;
            let n = n_raw.clamp(0, 31);
            // s = 55 + hi: M = Q >> s, A24 = Q >> (s − 24) < 2^32.
            let m = (q >> (55 + hi)) as i32;
            let a24 = (q >> (31 + hi)) & 0xffff_ffff;
            // ⌊A24·σ1 / 2^24⌋ from the unsigned product P = A24·|σ1| < 2^63: ⌊P/2^24⌋, or
            // −⌈P/2^24⌉ for σ1 < 0.
            let p = a24 * sigma1_abs;
            let term =
                if sigma1_neg { -(((p + 0xff_ffff) >> 24) as i64) } else { (p >> 24) as i64 };
            // ±v as (v ^ neg) − neg, neg = −1 where γ_c < 0 (sign 0 lanes are flagged).
            let neg = sign >> 63;
            let v = (beta << n).wrapping_sub((term ^ neg) - neg);
            let b = round_half_even(v, 24);
            let mx = i64::from(m) * i64::from(x as i32);
            let yv = round_half_even(((mx ^ neg) - neg).wrapping_add(b), n);
            *y = yv.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
        }
        any != 0
    }
}

/// `round(v / 2^n)`, half to even, branch-free, for `0 ≤ n ≤ 62`.
#[inline(always)]
fn round_half_even(v: i64, n: i64) -> i64 {
    let q = v >> n;
    let rem = v - (q << n);
    let half = (1i64 << n) >> 1;
    let up = (rem > half) | ((rem == half) & (n > 0) & (q & 1 == 1));
    q + i64::from(up)
}

/// `q · 2^e`, or `None` beyond 2^127.
#[inline]
fn shift(q: u128, e: i32) -> Option<u128> {
    if e >= 0 {
        let e = e as u32;
        (e < 128 && q.leading_zeros() > e).then(|| q << e)
    } else {
        Some(if -e >= 128 { 0 } else { q >> (-e) as u32 })
    }
}

/// `round(v / 2^n)`, half to even, saturated to i64.
#[inline]
fn round_sat(v: i128, n: u32) -> i64 {
    let q = v >> n;
    let rem = v - (q << n);
    let half = 1i128 << (n - 1);
    let q = if rem > half || (rem == half && q & 1 == 1) { q + 1 } else { q };
    q.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

#[cfg(test)]
#[allow(clippy::float_arithmetic)]
mod tests {
    use super::super::{InScale, LayerNormParams, ptf_layer_norm};
    use super::*;
    use crate::qparams::PtfFactor;

    #[test]
    fn normalize_keeps_the_mantissa_in_range() {
        for v in [1.0, 0.75, 3.0, 1e-12, 123456.789, 2f64.powi(40) - 1.0, 4294967295.9] {
            let (m, e) = normalize(v);
            assert!((1u64 << 31..1u64 << 32).contains(&m), "{v}: {m}");
            let back = m as f64 * 2f64.powi(e - 31);
            assert!(((back - v) / v).abs() <= 2f64.powi(-31), "{v}: {back}");
        }
    }

    fn params<'a>(
        gamma: &'a [f32],
        beta: &'a [f32],
        factors: &'a [PtfFactor],
    ) -> LayerNormParams<'a> {
        LayerNormParams {
            in_scale: InScale::Ptf { base: 0.01, factors },
            zero_point: 120,
            bits: crate::Bits::BYTE,
            gamma,
            beta,
            out_scale: 0.03,
        }
    }

    /// On ordinary tokens the integer path gives the float path's codes but where a value lies
    /// next to a rounding boundary (one code apart there).
    #[test]
    fn integer_codes_follow_the_exact_float_path() {
        let c = 192;
        let gamma: Vec<f32> =
            (0..c).map(|i| 0.5 + (i % 7) as f32 * 0.1 - if i == 5 { 1.5 } else { 0.0 }).collect();
        let beta: Vec<f32> = (0..c).map(|i| (i % 5) as f32 * 0.05 - 0.1).collect();
        let factors: Vec<PtfFactor> =
            (0..c).map(|i| PtfFactor::try_from((i % 4) as u8).unwrap()).collect();
        let p = params(&gamma, &beta, &factors);
        let ln = IntegerLayerNorm::new(&p).unwrap();
        let mut next = fqvit_testkit::lcg(7);
        let codes: Vec<u8> = (0..c * 200).map(|_| (next() >> 57) as u8 + 60).collect();
        let (mut a, mut b) = (vec![0; codes.len()], vec![0; codes.len()]);
        ln.run(Isa::Native, &codes, &mut a);
        ptf_layer_norm(&codes, &p, &mut b);
        let differ = a.iter().zip(&b).filter(|(a, b)| a != b).count();
        let max = a.iter().zip(&b).map(|(a, b)| (a - b).abs()).max().unwrap();
        assert!(max <= 1, "max |Δ| {max}");
        assert!(differ * 1000 <= codes.len(), "{differ} of {} differ", codes.len());
    }

    /// The edges: flat tokens, γ = 0, the widest shifts with extreme codes, one channel, the
    /// most channels, a variance term at its largest (2^62 − ε, the `t = −1` normalization).
    #[test]
    fn edges_stay_in_range_and_follow_the_float_path() {
        let run = |codes: &[u8], gamma: &[f32], beta: &[f32], factors: &[PtfFactor], out: f32| {
            let p = LayerNormParams { out_scale: out, ..params(gamma, beta, factors) };
            let (mut a, mut b) = (vec![0; codes.len()], vec![0; codes.len()]);
            IntegerLayerNorm::new(&p).unwrap().run(Isa::Native, codes, &mut a);
            ptf_layer_norm(codes, &p, &mut b);
            (a, b)
        };
        let f = |a: u8| PtfFactor::try_from(a).unwrap();
        // Flat tokens and γ = 0: exactly round(β/s_out), as the float path.
        let (a, b) =
            run(&[7, 7, 7, 200, 200, 200], &[1.0, 0.0, -2.0], &[0.3, -0.2, 0.05], &[f(0); 3], 0.03);
        assert_eq!(a, b);
        let (a, b) =
            run(&[7, 90, 7, 200, 3, 250], &[1.0, 0.0, -2.0], &[0.3, -0.2, 0.05], &[f(0); 3], 0.03);
        assert_eq!((a[1], a[4]), (b[1], b[4]));
        // One channel: always flat.
        let (a, b) = run(&[0, 255, 9], &[1.5], &[0.25], &[f(7)], 0.01);
        assert_eq!(a, b);
        // The most channels, codes 0 and 255 alternating with factor 7 and zero point 0: x is
        // 0 or 255·2^7, and D = C²·(255·2^6)², just below 2^60, the largest uint8 codes give.
        let c = super::MAX_CHANNELS;
        let codes: Vec<u8> = (0..c).map(|i| if i % 2 == 0 { 0 } else { 255 }).collect();
        let gamma = vec![0.7f32; c];
        let beta = vec![0.1f32; c];
        let factors = vec![f(7); c];
        let p =
            LayerNormParams { zero_point: 0, out_scale: 0.05, ..params(&gamma, &beta, &factors) };
        let (mut a, mut b) = (vec![0; c], vec![0; c]);
        IntegerLayerNorm::new(&p).unwrap().run(Isa::Native, &codes, &mut a);
        ptf_layer_norm(&codes, &p, &mut b);
        assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() <= 1), "{:?} {:?}", &a[..4], &b[..4]);
        // Mixed shifts 0..=7 with extreme codes, tiny and large output scales.
        let factors: Vec<PtfFactor> = (0..64).map(|i| f((i % 8) as u8)).collect();
        let codes: Vec<u8> = (0..64 * 8).map(|i| [0, 255, 1, 254, 128, 3][i % 6]).collect();
        let gamma: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 10.0).collect();
        let beta: Vec<f32> = (0..64).map(|i| (i % 9) as f32 - 4.0).collect();
        for out in [1e-4f32, 0.02, 3.0] {
            let (a, b) = run(&codes, &gamma, &beta, &factors, out);
            let max = a.iter().zip(&b).map(|(a, b)| (a - b).abs()).max().unwrap();
            // One step of M moves y by y/M ≤ y/128: a code or two at these output scales.
            let bound = a.iter().map(|a| 1 + a.abs() / 128).max().unwrap();
            assert!(max <= bound, "s_out {out}: max |Δ| {max} > {bound}");
        }
    }

    /// The SIMD lanes give the general form's codes at every instruction set this CPU has: ordinary channels and tokens, and every
    /// case the lanes leave to it (γ = 0, |β/s_out| ≥ 128, N clamped at 0 or 31, means of
    /// 2^7 and more in units of s_min).
    #[test]
    fn lanes_equal_the_general_form() {
        let mut lcg = fqvit_testkit::lcg(0x5eed);
        let mut next = move || lcg() >> 33;
        for case in 0..400 {
            let c = 1 + (next() % 96) as usize;
            let out = [1e-4f32, 0.01, 0.05, 3.0, 1e3][(next() % 5) as usize];
            let gamma: Vec<f32> = (0..c)
                .map(|_| match next() % 9 {
                    0 => 0.0,
                    1 => 1e-9,
                    2 => 5e4,
                    _ => (next() % 2000) as f32 / 500.0 - 2.0,
                })
                .collect();
            let beta: Vec<f32> = (0..c)
                .map(|_| if next() % 7 == 0 { 40.0 } else { (next() % 400) as f32 / 100.0 - 2.0 })
                .collect();
            let factors: Vec<PtfFactor> =
                (0..c).map(|_| PtfFactor::try_from((next() % 8) as u8).unwrap()).collect();
            let p = LayerNormParams {
                in_scale: InScale::Ptf { base: 0.01, factors: &factors },
                zero_point: (next() % 256) as i32,
                bits: crate::Bits::BYTE,
                gamma: &gamma,
                beta: &beta,
                out_scale: out,
            };
            let ln = IntegerLayerNorm::new(&p).unwrap();
            // Tokens around the zero point, skewed to one side (large means), flat ones.
            let codes: Vec<u8> = (0..c * 24)
                .map(|i| match (i / c) % 4 {
                    0 => (next() % 256) as u8,
                    1 => 250 + (next() % 6) as u8,
                    2 => (next() % 3) as u8,
                    _ => 77,
                })
                .collect();
            let mut b = vec![0; codes.len()];
            ln.run_with(&codes, &mut b, None);
            for isa in Isa::ALL.into_iter().filter(|isa| isa.available()) {
                let mut a = vec![0; codes.len()];
                ln.run(isa, &codes, &mut a);
                assert_eq!(a, b, "case {case}, {isa}");
            }
        }
    }

    #[test]
    fn out_of_range_constants_are_refused_by_channel() {
        let f = [PtfFactor::try_from(0).unwrap(); 2];
        let p = LayerNormParams { out_scale: 1e-30, ..params(&[0.0, 0.0], &[0.0, 1.0], &f) };
        let err = IntegerLayerNorm::new(&p).unwrap_err().to_string();
        assert!(err.contains("channel 1") && err.contains("β/s_out"), "{err}");
        let p = LayerNormParams { out_scale: 1e-30, ..params(&[1e20, 1.0], &[0.0, 0.0], &f) };
        let err = IntegerLayerNorm::new(&p).unwrap_err().to_string();
        assert!(err.contains("channel 0") && err.contains("C·|γ|/s_out"), "{err}");
        let p = params(&[f32::NAN, 1.0], &[0.0, 0.0], &f);
        let err = IntegerLayerNorm::new(&p).unwrap_err().to_string();
        assert!(err.contains("channel 0"), "{err}");
    }
}
