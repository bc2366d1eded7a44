//! The original's float32 element steps as fused passes over slices: what a float tensor path
//! computes in several libtorch operations (one pass each), here in one vectorised pass, with
//! the same IEEE operations in the same order and therefore the same bits.
//!
//! - [`fake_quantize_into`]: `(clamp(round(x / s + z), lo, hi) − z) · s` (spec §4.1);
//! - [`lis_exp_rows`] and [`lis_powers`]: Log-Int-Softmax around its row sum (spec §7), which
//!   the caller takes with the library whose summation order it must match (libtorch's `sum`).
//!
//! Rows and chunks run in parallel (rayon); each task is compiled for the detected instruction
//! set through [`pulp::Arch::dispatch`] (basic IEEE operations round the same on every one).

use rayon::prelude::*;

use crate::bits::{Bits, Code};

use crate::softmax::reference::N;
use crate::softmax::{ExpShift, LisConstants};

/// What Log-Int-Softmax computes on: the original divides the fake-quantized logits by their
/// scale in float32 and does not round (spec §12.5), so `X/S` can lie an ulp off the integer
/// `q − z` and the floors of its integer exponential flip wherever `x` is an exact multiple of
/// `I0`; an integer implementation reads `q − z` itself.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum LisInput {
    /// `X/S` in float32, as the original.
    #[default]
    Float,
    /// `X/S` rounded half to even: the integer codes an integer engine reads.
    Rounded,
}

impl LisInput {
    #[inline(always)]
    fn grid(self, x: f32, s: f32) -> f32 {
        match self {
            LisInput::Float => x / s,
            LisInput::Rounded => (x / s).round_ties_even(),
        }
    }
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 15;

/// `2^n` for an integer-valued `n` in `[−126, 127]`, from its bits (exact, and it vectorises;
/// `f32::exp2` is a library call).
#[inline(always)]
fn pow2(n: f32) -> f32 {
    f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `out = (clamp(round(x / s_c + z), lo, hi) − z) · s_c`, half to even, channels last
/// (`scales` has one entry, or one per channel of a row).
///
/// `x / s + z` is one rounding each, as libtorch's `div` then `add` (or `addcdiv`).
///
/// # Panics
/// If `xs` and `out` differ in length, `scales` is empty, or the length is not a multiple of
/// the number of scales.
#[track_caller]
pub fn fake_quantize_into(
    xs: &[f32],
    scales: &[f32],
    zero: f32,
    lo: f32,
    hi: f32,
    out: &mut [f32],
) {
    assert_eq!(xs.len(), out.len(), "fake_quantize_into: input and output lengths differ");
    let c = scales.len();
    assert!(
        c >= 1 && xs.len().is_multiple_of(c),
        "fake_quantize_into: {c} scales for {}",
        xs.len()
    );
    let chunk = CHUNK.div_ceil(c) * c;
    let arch = pulp::Arch::new();
    xs.par_chunks(chunk).zip(out.par_chunks_mut(chunk)).for_each(|(xs, out)| {
        arch.dispatch(FakeQuant { xs, scales, zero, lo, hi, out });
    });
}

struct FakeQuant<'a> {
    xs: &'a [f32],
    scales: &'a [f32],
    zero: f32,
    lo: f32,
    hi: f32,
    out: &'a mut [f32],
}

impl pulp::WithSimd for FakeQuant<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let (z, lo, hi) = (self.zero, self.lo, self.hi);
        let step = |x: f32, s: f32| ((x / s + z).round_ties_even().max(lo).min(hi) - z) * s;
        if let [s] = *self.scales {
            for (o, &x) in self.out.iter_mut().zip(self.xs) {
                *o = step(x, s);
            }
        } else {
            let c = self.scales.len();
            for (o, x) in self.out.chunks_exact_mut(c).zip(self.xs.chunks_exact(c)) {
                for ((o, &x), &s) in o.iter_mut().zip(x).zip(self.scales) {
                    *o = step(x, s);
                }
            }
        }
    }
}

/// The codes of `bits` of a fake-quantized activation, channels last: `q = round(x / s_c) + z`
/// (the integer LayerNorm's `round(X / s)`, plus the zero point). Returns whether every code
/// is in `0..2^bits` (otherwise `out` holds saturated values).
///
/// # Panics
/// If `xs` and `out` differ in length or are not whole rows of `scales.len()`, or `bits` does
/// not fit `C`.
#[track_caller]
pub fn codes<C: Code>(xs: &[f32], scales: &[f32], zero: i32, bits: Bits, out: &mut [C]) -> bool {
    assert_eq!(xs.len(), out.len(), "codes: input and output lengths differ");
    assert!(bits <= C::BITS, "codes: {}-bit codes in {}-bit storage", bits.get(), C::BITS.get());
    let c = scales.len();
    assert!(c >= 1 && xs.len().is_multiple_of(c), "codes: {c} scales for {}", xs.len());
    let chunk = CHUNK.div_ceil(c) * c;
    let hi = ((1u32 << bits.get()) - 1) as f32;
    let arch = pulp::Arch::new();
    xs.par_chunks(chunk)
        .zip(out.par_chunks_mut(chunk))
        .map(|(xs, out)| arch.dispatch(Codes { xs, scales, zero: zero as f32, hi, out }))
        .reduce(|| true, |a, b| a & b)
}

struct Codes<'a, C> {
    xs: &'a [f32],
    scales: &'a [f32],
    zero: f32,
    hi: f32,
    out: &'a mut [C],
}

impl<C: Code> pulp::WithSimd for Codes<'_, C> {
    type Output = bool;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> bool {
        let c = self.scales.len();
        let mut in_range = true;
        for (o, x) in self.out.chunks_exact_mut(c).zip(self.xs.chunks_exact(c)) {
            for ((o, &x), &s) in o.iter_mut().zip(x).zip(self.scales) {
                let q = (x / s).round_ties_even() + self.zero;
                in_range &= (0.0..=self.hi).contains(&q);
                *o = C::from_f32(q.clamp(0.0, self.hi));
            }
        }
        in_range
    }
}

/// `out = y · s` in float32 (`y` exact as float32 below 2^24).
///
/// # Panics
/// If the lengths differ.
#[track_caller]
pub fn dequantize_i32(y: &[i32], scale: f32, out: &mut [f32]) {
    assert_eq!(y.len(), out.len(), "dequantize_i32: input and output lengths differ");
    let arch = pulp::Arch::new();
    y.par_chunks(CHUNK).zip(out.par_chunks_mut(CHUNK)).for_each(|(y, out)| {
        arch.dispatch(Dequantize { y, scale, out });
    });
}

struct Dequantize<'a> {
    y: &'a [i32],
    scale: f32,
    out: &'a mut [f32],
}

impl pulp::WithSimd for Dequantize<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for (o, &y) in self.out.iter_mut().zip(self.y) {
            *o = y as f32 * self.scale;
        }
    }
}

/// The integer exponential of Log-Int-Softmax per row: `e_j = max(⌊z·2^(30−q)⌋, 0)` of
/// `x_j = X_j/S − max_k X_k/S`, in the original's float32 steps
/// (`fqvit_ops::softmax::reference::int_exp_f32`), with `X/S` as `input` says.
///
/// # Panics
/// If the lengths differ or are not whole rows, or `S` is not positive and finite.
#[track_caller]
pub fn lis_exp_rows(
    logits: &[f32],
    row_len: usize,
    scale: f32,
    shift: ExpShift,
    input: LisInput,
    e: &mut [f32],
) {
    assert_eq!(logits.len(), e.len(), "lis_exp_rows: input and output lengths differ");
    assert!(row_len > 0 && logits.len().is_multiple_of(row_len), "lis_exp_rows: rows of {row_len}");
    let k = LisConstants::shifted(scale, shift);
    let chunk = CHUNK.div_ceil(row_len) * row_len;
    let arch = pulp::Arch::new();
    logits.par_chunks(chunk).zip(e.par_chunks_mut(chunk)).for_each(|(rows, e)| {
        arch.dispatch(ExpRows { rows, row_len, scale, input, k: &k, e });
    });
}

struct ExpRows<'a> {
    rows: &'a [f32],
    row_len: usize,
    scale: f32,
    input: LisInput,
    k: &'a LisConstants,
    e: &'a mut [f32],
}

impl pulp::WithSimd for ExpRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let (i0, ib, ic) = (self.k.i0 as f32, self.k.ib as f32, self.k.ic as f32);
        let (n, s) = (N as f32, self.scale);
        let clip = n * i0;
        let fine = pow2(self.k.shift as f32);
        for (row, e) in
            self.rows.chunks_exact(self.row_len).zip(self.e.chunks_exact_mut(self.row_len))
        {
            // x = X/S first, as the original (the division is repeated: it is exact IEEE).
            let grid = |x: f32| self.input.grid(x, s);
            let max = row.iter().map(|&x| grid(x)).fold(f32::NEG_INFINITY, f32::max);
            for (ej, &x) in e.iter_mut().zip(row) {
                // Exact: the exponential's grid is 2^shift times finer (`ExpShift`).
                let x = ((grid(x) - max) * fine).max(clip);
                let q = (x / i0).floor();
                let r = x - q * i0;
                let z = (r + ib) * r + ic;
                *ej = (z * pow2(n - q)).floor().max(0.0);
            }
        }
    }
}

/// From the integer exponentials `e` (rows of `row_len`) and their row sums, the output of
/// Log-Int-Softmax in place: `2^−k` with `k = log_round(round(Σ/e))`, or 0 where `k ≥ 2^bits`
/// or `e = 0` (`fqvit_ops::softmax::reference::log_code_f32`).
///
/// `log_round` is read off the bits of `u = round(Σ/e)`: its exponent, plus one when the top
/// mantissa bit is set (`u ≥ 1.5·2^k`); `u < 2^64`, so `k ≤ 64` and `2^−k` is a normal float.
///
/// # Panics
/// If the lengths do not match or `bits` is not in `1..=16`.
#[track_caller]
pub fn lis_powers(e: &mut [f32], sums: &[f32], row_len: usize, bits: u32) {
    assert!(
        row_len > 0 && e.len() == sums.len() * row_len,
        "lis_powers: {} sums for {} values in rows of {row_len}",
        sums.len(),
        e.len()
    );
    assert!((1..=16).contains(&bits), "lis_powers: {bits} bits, expected 1..=16");
    let rows_per_chunk = CHUNK.div_ceil(row_len);
    let arch = pulp::Arch::new();
    e.par_chunks_mut(rows_per_chunk * row_len).zip(sums.par_chunks(rows_per_chunk)).for_each(
        |(e, sums)| {
            arch.dispatch(Powers { e, sums, row_len, bits });
        },
    );
}

struct Powers<'a> {
    e: &'a mut [f32],
    sums: &'a [f32],
    row_len: usize,
    bits: u32,
}

impl pulp::WithSimd for Powers<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let zero_flag = 1u32 << self.bits;
        for (row, &sum) in self.e.chunks_exact_mut(self.row_len).zip(self.sums) {
            for v in row.iter_mut() {
                let u = (sum / *v).round_ties_even();
                let b = u.to_bits();
                // k + 127 = exponent + top mantissa bit = ((b >> 22) + 1) >> 1 for u ≥ 1.
                let k = (((b >> 22) + 1) >> 1).wrapping_sub(127);
                let valid = (1.0..1.8e19).contains(&u) && k < zero_flag;
                *v = if valid { f32::from_bits((127 - k) << 23) } else { 0.0 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::softmax::reference::{int_exp_f32, log_code_f32};

    #[test]
    fn pow2_is_exact() {
        for n in -126..=127 {
            assert_eq!(pow2(n as f32), (n as f32).exp2(), "2^{n}");
        }
    }

    /// The fused steps equal the reference element functions bit for bit.
    #[test]
    fn lis_steps_equal_the_reference_elements() {
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for &scale in &[0.003f32, 0.02, 0.0571, 0.1, 0.7] {
            for (bits, shift) in [(4u32, 0u32), (8, 0), (4, 3), (8, 2)] {
                let shift = ExpShift::try_from(shift).unwrap();
                let row_len = 197;
                let logits: Vec<f32> = (0..row_len * 8)
                    .map(|_| {
                        ((next() % 256) as f32 - 128.0)
                            * scale
                            * if next() % 3 == 0 { 1.0000001 } else { 1.0 }
                    })
                    .collect();
                let mut e = vec![0f32; logits.len()];
                lis_exp_rows(&logits, row_len, scale, shift, LisInput::Float, &mut e);
                let mut rounded = vec![0f32; logits.len()];
                lis_exp_rows(&logits, row_len, scale, shift, LisInput::Rounded, &mut rounded);
                let k = LisConstants::shifted(scale, shift);
                let mut sums = Vec::new();
                for (row, er) in logits.chunks(row_len).zip(e.chunks(row_len)) {
                    let max = row.iter().map(|&x| x / scale).fold(f32::NEG_INFINITY, f32::max);
                    for (&x, &ej) in row.iter().zip(er) {
                        assert_eq!(ej.to_bits(), int_exp_f32(x / scale - max, &k).to_bits());
                    }
                    let round = |x: f32| (x / scale).round_ties_even();
                    let max = row.iter().map(|&x| round(x)).fold(f32::NEG_INFINITY, f32::max);
                    let er = &rounded[sums.len() * row_len..][..row_len];
                    for (&x, &ej) in row.iter().zip(er) {
                        assert_eq!(ej.to_bits(), int_exp_f32(round(x) - max, &k).to_bits());
                    }
                    sums.push(er.iter().sum::<f32>());
                }
                let mut p = e.clone();
                lis_powers(&mut p, &sums, row_len, bits);
                for (i, (&pv, &ev)) in p.iter().zip(&e).enumerate() {
                    let code = u32::from(log_code_f32(sums[i / row_len], ev, bits));
                    let want = if code >= 1 << bits { 0.0 } else { (-(code as f32)).exp2() };
                    assert_eq!(
                        pv.to_bits(),
                        want.to_bits(),
                        "S = {scale}, {bits} bits, element {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn fake_quantize_equals_the_scalar_steps() {
        let xs: Vec<f32> = (0..4096).map(|i| (i as f32 - 2048.5) * 0.0137).collect();
        let scales: Vec<f32> = (0..64).map(|c| 0.03125 * (1 << (c % 4)) as f32).collect();
        let mut out = vec![0f32; xs.len()];
        fake_quantize_into(&xs, &scales, 113.0, 0.0, 255.0, &mut out);
        for (i, (&x, &o)) in xs.iter().zip(&out).enumerate() {
            let s = scales[i % 64];
            let want = ((x / s + 113.0).round_ties_even().clamp(0.0, 255.0) - 113.0) * s;
            assert_eq!(o.to_bits(), want.to_bits());
        }
    }
}
