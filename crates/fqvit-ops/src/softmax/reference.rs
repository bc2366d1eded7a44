//! Scalar reference of Log-Int-Softmax (spec §7), named as FQ-ViT `models/ptq/layers.py`
//! `QIntSoftmax` (`int_polynomial`, `int_exp`, `int_softmax`, `log_round`, l.238-277).

use super::{LisConstants, check_row_args};

/// I-BERT's second-order fit of `exp` on `(−ln 2, 0]`: `a·(x + b/a)² + c` (spec §7 step 6).
pub const COEF: [f64; 3] = [0.35815147, 0.96963238, 1.0];
/// `x0 = −ln 2` as the original writes it (four digits, not `LN_2`: the constants must match).
#[allow(clippy::approx_constant)]
pub const X0: f64 = -0.6931;
/// `n`: the exponent range of the integer exponential (I-BERT's choice, spec §12.19).
pub const N: u32 = 30;

/// `int_polynomial`: `z = r·(r + I_b) + I_c`, the polynomial in grid units (exact in i64).
///
/// Bounds: `r ∈ (I0, 0]` and `|I0| < I_b` make `r·(r + I_b) ≤ 0`, so `0 < z ≤ I_c`.
#[inline]
pub fn int_polynomial(r: i64, k: &LisConstants) -> i64 {
    r * (r + k.ib) + k.ic
}

/// `int_exp`: `e = max(⌊z · 2^(n − q)⌋, 0)` with `x·2^shift = q·I0 + r`, clipped at `n·I0`.
///
/// `e · a·S'² / 2^30 ≈ exp(S·x)`, `S' = S·2^-shift`. Bounds: `e ≤ I_c · 2^30 < 2^52` for
/// `S' ≥ 2^-10` ([`super::MIN_SCALE`]); `x ≤ 0` is clipped before it is shifted, so `|x| < 2^32`
/// suffices.
#[inline]
pub fn int_exp(x: i64, k: &LisConstants) -> u64 {
    let clip = i64::from(N) * k.i0;
    let x = (x.max(clip) << k.shift).max(clip);
    // x ≤ 0 and I0 < 0: truncating division is floor division here.
    let q = x / k.i0;
    let r = x - k.i0 * q;
    let z = int_polynomial(r, k);
    if z <= 0 { 0 } else { (z as u64) << (N as i64 - q) }
}

/// `log_round(u)`: `k = ⌊log2 u⌋`, plus one when `u − 2^k ≥ 2^(k−1)`: log2 rounded at
/// `1.5 · 2^k` in the linear domain (u = 1, 2, 3, 5, 6 → 0, 1, 2, 2, 3).
///
/// # Panics
/// If `u` is 0.
#[inline]
pub fn log_round(u: u64) -> u32 {
    assert!(u > 0, "log_round(0)");
    let k = 63 - u.leading_zeros();
    if k > 0 && u - (1 << k) >= 1 << (k - 1) { k + 1 } else { k }
}

/// `round(Σ / e)` half to even, exactly.
#[inline]
pub fn round_div(sum: u64, e: u64) -> u64 {
    let (q, rem) = (sum / e, sum % e);
    // Compare 2·rem with e without overflow: rem < e.
    if rem > e - rem || (rem == e - rem && q & 1 == 1) { q + 1 } else { q }
}

/// The log2 code of one element: `min(log_round(round(Σ/e)), 2^bits)`, where `2^bits` is the
/// zero flag (`e = 0` too).
#[inline]
pub fn log_code(sum: u64, e: u64, bits: u32) -> u16 {
    let zero = 1u32 << bits;
    if e == 0 { zero as u16 } else { log_round(round_div(sum, e)).min(zero) as u16 }
}

/// Log-Int-Softmax on exact integer logits (`q − z`), one row of `row.len()` at a time.
///
/// See [`log_int_softmax`](super::log_int_softmax) for the contract; this is its reference.
///
/// # Panics
/// As [`log_int_softmax`](super::log_int_softmax).
#[track_caller]
pub fn log_int_softmax(codes: &[i32], row_len: usize, scale: f32, bits: u32, out: &mut [u16]) {
    super::check_integer_scale(scale);
    log_int_softmax_by(codes, row_len, &LisConstants::new(scale), bits, out);
}

/// [`log_int_softmax`] with the constants `k` of any [`ExpShift`](super::ExpShift).
///
/// # Panics
/// As [`log_int_softmax`], and if `k` is not within the integer bound.
#[track_caller]
pub fn log_int_softmax_by(
    codes: &[i32],
    row_len: usize,
    k: &LisConstants,
    bits: u32,
    out: &mut [u16],
) {
    super::check_constants(k);
    check_row_args(codes.len(), out.len(), row_len, bits);
    for (row, out) in codes.chunks_exact(row_len).zip(out.chunks_exact_mut(row_len)) {
        let max = row.iter().copied().max().map_or(0, i64::from);
        let mut sum = 0u64;
        for &x in row {
            sum += int_exp(i64::from(x) - max, k);
        }
        for (o, &x) in out.iter_mut().zip(row) {
            *o = log_code(sum, int_exp(i64::from(x) - max, k), bits);
        }
    }
}

/// Log-Int-Softmax on float logits `X` and the scale `S`, in the original's float32 arithmetic
/// (`x = X/S` not rounded, float floors, a float32 row sum), so it matches the original exactly
/// even where `X/S` lands an ulp off an integer (spec §12.5).
///
/// # Panics
/// As [`log_int_softmax`](super::log_int_softmax).
#[track_caller]
pub fn log_int_softmax_f32(logits: &[f32], row_len: usize, scale: f32, bits: u32, out: &mut [u16]) {
    let k = LisConstants::new(scale);
    check_row_args(logits.len(), out.len(), row_len, bits);
    let mut e = vec![0f32; row_len];
    for (row, out) in logits.chunks_exact(row_len).zip(out.chunks_exact_mut(row_len)) {
        row_f32(row, scale, &k, bits, &mut e, out);
    }
}

/// One row of [`log_int_softmax_f32`], with a scratch buffer `e` of the row's length.
#[inline]
pub(crate) fn row_f32(
    row: &[f32],
    scale: f32,
    k: &LisConstants,
    bits: u32,
    e: &mut [f32],
    out: &mut [u16],
) {
    let max = row.iter().map(|&x| x / scale).fold(f32::NEG_INFINITY, f32::max);
    for (ej, &x) in e.iter_mut().zip(row) {
        *ej = int_exp_f32(x / scale - max, k);
    }
    let sum = sum_f32(e);
    for (o, &ej) in out.iter_mut().zip(e.iter()) {
        *o = log_code_f32(sum, ej, bits);
    }
}

/// `int_exp` in float32 as the original computes it.
#[inline]
pub fn int_exp_f32(x: f32, k: &LisConstants) -> f32 {
    let (i0, ib, ic) = (k.i0 as f32, k.ib as f32, k.ic as f32);
    // Exact: a power of two (the shifted grid), then the original's steps.
    let x = (x * (k.shift as f32).exp2()).max(N as f32 * i0);
    let q = (x / i0).floor();
    let r = x - i0 * q;
    let z = r * (r + ib) + ic;
    (z * (N as f32 - q).exp2()).floor().max(0.0)
}

/// The row sum in float32, left to right.
///
/// The original uses `torch.sum`, whose CPU order for long rows is vectorised; the sequential sum
/// reproduces every golden case (rows of 33). The sum is only compared against `e` after
/// `round(Σ/e)`, so an order difference moves a code only at an exact rounding boundary.
pub fn sum_f32(xs: &[f32]) -> f32 {
    xs.iter().sum()
}

/// `round(Σ/e)` then `log_round`, in float32 as the original (`e = 0` gives the zero flag).
#[inline]
pub fn log_code_f32(sum: f32, e: f32, bits: u32) -> u16 {
    let zero = 1u32 << bits;
    let u = (sum / e).round_ties_even();
    if !(1.0..1.8e19).contains(&u) {
        return zero as u16;
    }
    log_round(u as u64).min(zero) as u16
}
