//! The vectorised body of [`log_int_softmax`](super::log_int_softmax), in integers only.
//!
//! The row loops have no branches or library calls, so they compile to SIMD for the
//! instruction set the caller's [`Isa`](crate::Isa) allows, and each step is exact, so the
//! codes are those of [`reference::log_int_softmax`](super::reference::log_int_softmax).
//!
//! Per element, with `d = max − x` clipped at `N·|I0|` (< 2^15), `int_exp` in i32 lanes:
//! `q = ⌊d / |I0|⌋` by a multiply and a shift ([`Divisor`]), `r = |I0|·q − d ∈ (I0, 0]`,
//! `z = r·(r + I_b) + I_c ∈ (−2^21, 2^22)`, then `e = z · 2^(30 − q) < 2^52` in i64 lanes; `Σ`
//! in u64 (`< 2^63`). The code `min(log_round(round(Σ/e)), 2^bits)` needs no division per
//! element: it is the number of thresholds `E_c` (one per code `c` and row, a u64 quotient by
//! a multiplication, [`thresholds`]) that `e` does not exceed.

#![deny(clippy::float_arithmetic)]

use super::LisConstants;
use super::reference::N;

/// Logits per rayon task: a few tens of microseconds of work.
pub(super) const ELEMENTS_PER_TASK: usize = 8192;

/// Elements per block of the threshold count: one AVX-512 register of i64, two of AVX2.
const BLOCK: usize = 8;

/// `⌊d / v⌋ = (d · magic) >> shift` for every `d < 2^15`, by Granlund and Montgomery's bound:
/// with `2^ℓ ≥ v`, `shift = 15 + ℓ` and `magic = ⌈2^shift / v⌉`, `magic·v − 2^shift < v ≤
/// 2^(shift − 15)`, which makes the quotient exact below 2^15; `magic ≤ 2^16` keeps `d · magic`
/// below 2^31.
#[derive(Clone, Copy, Debug)]
struct Divisor {
    magic: u32,
    shift: u32,
}

impl Divisor {
    fn new(v: u32) -> Self {
        debug_assert!((1..=1 << 15).contains(&v));
        let l = 32 - (v - 1).leading_zeros();
        let shift = 15 + l;
        Divisor { magic: (1u32 << shift).div_ceil(v), shift }
    }
}

/// The row kernel's constants, from [`LisConstants`] (`I0 < 0`, `|I0| ≤ 710`, `I_b` and `I_c`
/// below 2^22 for scales of at least [`MIN_SCALE`](super::MIN_SCALE)).
#[derive(Clone, Copy, Debug)]
pub(super) struct RowConstants {
    /// `|I0|`.
    v: u32,
    /// `N · |I0|`: where `x − max` is clipped.
    clip: u32,
    div: Divisor,
    ib: i32,
    ic: i32,
}

impl RowConstants {
    pub(super) fn new(k: &LisConstants) -> Self {
        let v = u32::try_from(-k.i0).expect("I0 < 0 and |I0| ≤ 710 for S ≥ 2^-10");
        RowConstants {
            v,
            clip: N * v,
            div: Divisor::new(v),
            ib: i32::try_from(k.ib).expect("I_b < 2^12"),
            ic: i32::try_from(k.ic).expect("I_c < 2^22"),
        }
    }
}

/// A run of rows for [`pulp::Arch::dispatch`], whose `with_simd` is inlined into code compiled
/// for the chosen instruction set (a closure would not be).
pub(super) struct Rows<'a> {
    pub(super) rows: &'a [i32],
    pub(super) k: &'a RowConstants,
    pub(super) bits: u32,
    pub(super) e: &'a mut [i64],
    pub(super) out: &'a mut [u16],
}

impl pulp::WithSimd for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let row_len = self.e.len();
        for (row, out) in self.rows.chunks_exact(row_len).zip(self.out.chunks_exact_mut(row_len)) {
            lis_row(row, self.k, self.bits, self.e, out);
        }
    }
}

#[inline(always)]
fn lis_row(row: &[i32], k: &RowConstants, bits: u32, e: &mut [i64], out: &mut [u16]) {
    let max = row.iter().copied().max().unwrap_or(0) as u32;
    let Divisor { magic, shift } = k.div;
    for (ej, &x) in e.iter_mut().zip(row) {
        // max − x as u32 is exact (0 ≤ max − x < 2^32), then clipped below 2^15.
        let d = max.wrapping_sub(x as u32).min(k.clip);
        let q = (d * magic) >> shift;
        // r = x − I0·q with x = −d: in (I0, 0], |r| < 2^10.
        let r = (q * k.v) as i32 - d as i32;
        let z = r * (r + k.ib) + k.ic;
        // q ≤ N = 30: the shift is 0..=30, e < 2^22 · 2^30.
        let e_j = i64::from(z) << (N - q);
        *ej = if z > 0 { e_j } else { 0 };
    }
    // Σ < 2^63 for rows of at most MAX_ROW (each e < 2^52), in any order.
    let sum = e.iter().map(|&e| e as u64).sum::<u64>();
    let zero = 1u16 << bits;
    if sum == 0 {
        out.fill(zero);
        return;
    }
    // The largest e is I_c·2^30 (d = 0); the smallest non-zero bounds the codes the row needs.
    let e_max = i64::from(k.ic) << N;
    let e_min = e.iter().map(|&e| if e > 0 { e } else { i64::MAX }).min().unwrap_or(i64::MAX);
    let (base, ts) = thresholds(sum, bits, e_max, e_min);
    let ts = &ts.values[..ts.len];
    let (blocks, rest) = e.as_chunks::<BLOCK>();
    let (out_blocks, out_rest) = out.as_chunks_mut::<BLOCK>();
    for (e, out) in blocks.iter().zip(out_blocks) {
        let mut count = [0i64; BLOCK];
        for &t in ts {
            for (c, &e) in count.iter_mut().zip(e) {
                *c += i64::from(e <= t);
            }
        }
        for ((o, &c), &e) in out.iter_mut().zip(&count).zip(e) {
            *o = if e > 0 { base + c as u16 } else { zero };
        }
    }
    for (o, &e) in out_rest.iter_mut().zip(rest) {
        let c = ts.iter().filter(|&&t| e <= t).count() as u16;
        *o = if e > 0 { base + c } else { zero };
    }
}

/// `2T_c − 1` for each code `c` (index 0 unused) with its reciprocal, so that a row's
/// thresholds take a multiplication each rather than a division.
const DIVISORS: [Reciprocal; 64] = {
    let mut table = [Reciprocal { d: 1, r: 0 }; 64];
    let mut c = 1;
    while c < 64 {
        let t = if c == 1 { 2u64 } else { 3u64 << (c - 2) };
        let d = 2 * t - 1;
        table[c] = Reciprocal { d, r: (((1u128 << 64) - 1) / d as u128) as u64 };
        c += 1;
    }
    table
};

/// A divisor `d ≥ 3` and `r = ⌊(2^64 − 1)/d⌋`. For `x < 2^64`, `⌊x·r / 2^64⌋` lies in
/// `(x/d − 2, x/d]` (`x/d − x·r/2^64 = x·(2^64 − d·r)/(d·2^64)` and `2^64 − d·r ≤ d`), so it
/// is the quotient or one below; the remainder corrects it.
#[derive(Clone, Copy, Debug)]
struct Reciprocal {
    d: u64,
    r: u64,
}

impl Reciprocal {
    #[inline(always)]
    fn div_rem(self, x: u64) -> (u64, u64) {
        let q = ((u128::from(x) * u128::from(self.r)) >> 64) as u64;
        let rem = x - q * self.d;
        // rem < 2d: one correction at most.
        if rem >= self.d { (q + 1, rem - self.d) } else { (q, rem) }
    }
}

/// The codes' thresholds that some element of the row is on either side of.
struct Thresholds {
    values: [i64; 64],
    len: usize,
}

/// With `u = round(Σ/e)` (half to even) and `T_c` the least `u` of code `c` (`log_round(u) ≥
/// c`: `T_1 = 2`, `T_c = 3·2^(c−2)`), `code ≥ c ⟺ u ≥ T_c ⟺ 2Σ > (2T_c − 1)·e`, or equal with
/// `T_c` even. So `code ≥ c ⟺ e ≤ E_c` with `Q = ⌊2Σ / (2T_c − 1)⌋`: `E_c = Q − 1` on an exact
/// quotient with `T_c` odd (only `T_2 = 3`), else `Q`. `E_c` does not grow with `c`, so `e`'s
/// code is the number of `c ≤ min(2^bits, 63)` with `e ≤ E_c` (`u ≤ Σ < 2^63` keeps codes of
/// non-zero `e` below 63, and `2Σ`, `2T_c − 1` fit u64). Returned: the count of the codes every
/// non-zero element of the row reaches (`E_c ≥ e_max`), and the thresholds between `e_min` and
/// `e_max` that decide the rest (those below `e_min` are reached by none).
#[inline(always)]
fn thresholds(sum: u64, bits: u32, e_max: i64, e_min: i64) -> (u16, Thresholds) {
    let mut ts = Thresholds { values: [0; 64], len: 0 };
    let mut base = 0u16;
    let two_sum = 2 * sum;
    for c in 1..=(1u32 << bits).min(63) {
        let t = if c == 1 { 2u64 } else { 3u64 << (c - 2) };
        if t > sum {
            break; // u ≤ Σ: no non-zero e reaches code c or above.
        }
        let (q, rem) = DIVISORS[c as usize].div_rem(two_sum);
        // q < 2^64 / 3 < 2^63; rem = 0 implies q ≥ 1 (2Σ > 0).
        let limit = (if rem == 0 && t & 1 == 1 { q - 1 } else { q }) as i64;
        if limit >= e_max {
            base += 1;
        } else if limit >= e_min {
            ts.values[ts.len] = limit;
            ts.len += 1;
        } else {
            break;
        }
    }
    (base, ts)
}

#[cfg(test)]
mod tests {
    use super::Divisor;
    use crate::Isa;
    use crate::softmax::{LisConstants, MIN_SCALE, log_int_softmax_with, reference};

    /// Scales from the smallest to the coarsest, every width, rows of ViT's and Swin's lengths
    /// and odd ones (blocks and remainders), codes spread over the score range and bunched
    /// within a few steps (large `Σ`), at every instruction set: the reference's codes.
    #[test]
    fn integer_rows_equal_the_reference_everywhere() {
        let mut s = 0x1f_u64;
        let mut next = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as i32
        };
        for step in 0..60 {
            let scale = MIN_SCALE * 1.13f32.powi(step);
            let k = LisConstants::new(scale);
            for (len, spread) in [(1, 255), (7, 3), (49, 255), (197, 255), (197, 2), (61, 40)] {
                let rows = 5;
                let codes: Vec<i32> =
                    (0..len * rows).map(|_| next().rem_euclid(2 * spread + 1) - spread).collect();
                for bits in 2..=8 {
                    let mut want = vec![0u16; codes.len()];
                    reference::log_int_softmax(&codes, len, scale, bits, &mut want);
                    for isa in Isa::ALL.into_iter().filter(|isa| isa.available()) {
                        let mut got = vec![0u16; codes.len()];
                        log_int_softmax_with(isa, &codes, len, &k, bits, &mut got);
                        assert_eq!(got, want, "S {scale}, row {len}, {bits} bits, {isa}");
                    }
                }
            }
        }
    }

    /// The thresholds' quotients by multiplication: every divisor, dividends at the edges
    /// (multiples of `d` and their neighbours, the largest u64) and spread between.
    #[test]
    fn reciprocal_quotients_are_exact() {
        let mut s = 0x2545_f491_4f6c_dd1d_u64;
        for r in &super::DIVISORS[1..] {
            let mut xs = vec![0, 1, r.d - 1, r.d, r.d + 1, u64::MAX, u64::MAX - 1];
            let top = u64::MAX / r.d * r.d;
            xs.extend([top, top - 1, top.wrapping_add(1), top - r.d, top - r.d + 1]);
            for _ in 0..2000 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                xs.extend([s, s >> (s % 64), (s >> 40).wrapping_mul(r.d)]);
            }
            for x in xs {
                assert_eq!(r.div_rem(x), (x / r.d, x % r.d), "{x} / {}", r.d);
            }
        }
    }

    /// Every divisor the scales give, every dividend below 2^15.
    #[test]
    fn magic_division_is_exact_below_2_15() {
        for v in 1..=720u32 {
            let Divisor { magic, shift } = Divisor::new(v);
            assert!(magic <= 1 << 16, "v {v}: magic {magic}");
            for d in 0..1u32 << 15 {
                assert_eq!((d * magic) >> shift, d / v, "{d} / {v}");
            }
        }
    }
}
