//! The vectorised body of [`log_int_softmax`](super::log_int_softmax).
//!
//! The row loops have no branches or library calls, so they compile to SIMD for the
//! instruction set [`pulp::Arch`] detects, and each step is exact, so the codes are those of
//! [`reference::log_int_softmax`](super::reference::log_int_softmax).
//!
//! `int_exp` is read from the scale's [`ExpTable`] (exact integers below 2^52 in f64) by each
//! logit's distance below its row's maximum. `Σ` is summed in u64. The code needs `u = round(Σ/e)` (half to even) and then `log_round(u)`:
//! - while `Σ < 2^52`, `Σ/e` in f64 is exact enough ([`codes_by_division`], the common case:
//!   a ViT attention row of 197 at S = 0.05 sums below 2^48);
//! - above, up to 4 bits (the zero flag at `u ≥ 3·2^14`), an f32 estimate of `Σ/e` rounds to
//!   `u` or a neighbour, and the exact remainder `Σ − u·e` in integers picks `u`
//!   ([`codes_by_estimate`]); wider codes take the u64 reference.

use super::ExpTable;
use super::gather::Gather;
use super::reference::{int_exp, log_code};

/// Logits per rayon task: a few tens of microseconds of work.
pub(super) const ELEMENTS_PER_TASK: usize = 8192;

/// 2^52: integers below it are exact in f64, and adding it puts one in the low mantissa bits.
const TWO_52: f64 = 4_503_599_627_370_496.0;

/// A run of rows for [`pulp::Arch::dispatch`], whose `with_simd` is inlined into code compiled
/// for the detected instruction set (a closure would not be).
pub(super) struct Rows<'a> {
    pub(super) rows: &'a [i32],
    pub(super) k: &'a ExpTable,
    pub(super) gather: Gather,
    pub(super) bits: u32,
    pub(super) e: &'a mut [f64],
    pub(super) out: &'a mut [u16],
}

impl pulp::WithSimd for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let row_len = self.e.len();
        for (row, out) in self.rows.chunks_exact(row_len).zip(self.out.chunks_exact_mut(row_len)) {
            lis_row(row, self.k, self.gather, self.bits, self.e, out);
        }
    }
}

/// An integer-valued f64 in `[0, 2^52)` as u64 (this vectorises; a saturating `as` does not).
#[inline(always)]
fn to_u64(v: f64) -> u64 {
    (v + TWO_52).to_bits() - TWO_52.to_bits()
}

#[inline(always)]
fn lis_row(row: &[i32], k: &ExpTable, gather: Gather, bits: u32, e: &mut [f64], out: &mut [u16]) {
    let max = row.iter().copied().max().unwrap_or(0);
    // x − max ≤ 0: its distance below the maximum indexes the table, clipped at its end as
    // `int_exp` clips x at n·I0.
    gather.lookup(&k.e, row, max, e);
    // Eight partial sums so the reduction vectorises; u64 is exact in any order (Σ < 2^63).
    let mut lanes = [0u64; 8];
    let mut chunks = e.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &ej) in lanes.iter_mut().zip(chunk) {
            *lane += to_u64(ej);
        }
    }
    let sum =
        lanes.iter().sum::<u64>() + chunks.remainder().iter().map(|&ej| to_u64(ej)).sum::<u64>();
    if (sum as f64) < TWO_52 {
        codes_by_division(sum, e, bits, out);
    } else if bits <= 4 {
        codes_by_estimate(sum, e, bits, out);
    } else {
        let max = i64::from(max);
        for (o, &x) in out.iter_mut().zip(row) {
            *o = log_code(sum, int_exp(i64::from(x) - max, &k.k), bits);
        }
    }
}

/// `log_round(u)` for `1 ≤ u < 2^24` held in f32: its exponent, plus one at `u ≥ 1.5·2^k`.
#[inline(always)]
fn log_round_f32(u: f32) -> u32 {
    let bits = u.to_bits();
    (bits >> 23) - 127 + ((bits >> 22) & 1)
}

/// Codes up to 4 bits from an f32 estimate of `Σ/e` and an exact integer correction.
///
/// With `v = Σ/e` and the estimate `v'` within `v·2^-22` (three float32 roundings), `u' =
/// round(v')` is within one of `u` when `u' < 2^20`, and the exact remainder `ρ = Σ − u'·e`
/// (`|ρ| < e`, computed in wrapping u64) says which: `u' + 1` when `2ρ > e`, `u' − 1` when
/// `2ρ < −e`, ties to even. `u' ≥ 2^20` means `u ≥ 3·2^14`, the zero flag for 4 bits or fewer.
#[inline(always)]
fn codes_by_estimate(sum: u64, e: &[f64], bits: u32, out: &mut [u16]) {
    const LIMIT: f32 = 1_048_576.0; // 2^20
    let zero = 1u32 << bits;
    let sum_f = sum as f32;
    for (o, &ej) in out.iter_mut().zip(e) {
        let estimate = (sum_f / ej as f32).round_ties_even().min(LIMIT);
        // u' < 2^23 in the low mantissa bits of u' + 2^23.
        let u = u64::from((estimate + 8_388_608.0).to_bits() & 0x7f_ffff);
        let e_int = to_u64(ej);
        let twice_rem = (sum.wrapping_sub(u.wrapping_mul(e_int)) as i64).wrapping_mul(2);
        let odd = u & 1 == 1;
        let e_signed = e_int as i64;
        let up = twice_rem > e_signed || (twice_rem == e_signed && odd);
        let down = twice_rem < -e_signed || (twice_rem == -e_signed && odd);
        let u = u + u64::from(up) - u64::from(down);
        let code = log_round_f32(u as f32).min(zero);
        let saturated = estimate >= LIMIT || ej <= 0.0;
        *o = if saturated { zero as u16 } else { code as u16 };
    }
}

/// Codes of any width from `Σ/e` in f64, exact for `Σ < 2^52`: `e` and `Σ` are exact, and the
/// quotient is at least `1/(2e)` from any half-integer it is not equal to, more than its
/// rounding error `Σ/e·2^-53`, so rounding it half to even gives `u`; `log_round(u)` is its
/// exponent plus its top mantissa bit.
#[inline(always)]
fn codes_by_division(sum: u64, e: &[f64], bits: u32, out: &mut [u16]) {
    let zero = 1u64 << bits;
    let sum = sum as f64;
    for (o, &ej) in out.iter_mut().zip(e) {
        let u = (sum / ej).round_ties_even().to_bits();
        // u ≥ 1 because Σ ≥ e; e = 0 gives inf or NaN, both replaced by the zero flag.
        let code = ((u >> 52) - 1023 + ((u >> 51) & 1)).min(zero);
        *o = if ej > 0.0 { code as u16 } else { zero as u16 };
    }
}
