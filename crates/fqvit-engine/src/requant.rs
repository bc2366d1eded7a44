//! Requantization by dyadic multipliers: a real ratio `r` becomes `m · 2^-shift` with a 31-bit
//! mantissa `m ∈ [2^30, 2^31)`, and `round(v · r)` becomes an integer product and a shift that
//! rounds half to even, as the simulation's `torch.round` does.
//!
//! Bounds: `|v| < 2^62` and `m < 2^31`, so the product fits i128 exactly; the result fits i64
//! whenever `|v · r| < 2^62`, which every caller's bound on its accumulator guarantees.

/// `m · 2^-shift`, the integer form of a positive real ratio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dyadic {
    /// The mantissa, in `[2^30, 2^31)`.
    pub m: i64,
    /// The right shift, in `1..=126`.
    pub shift: u32,
}

impl Dyadic {
    /// The closest dyadic number with a 31-bit mantissa to `r`, or `None` when `r` is not
    /// positive and finite or lies outside `[2^-95, 2^29]`.
    #[allow(clippy::float_arithmetic)] // load time
    pub fn new(r: f64) -> Option<Self> {
        if !(r.is_finite() && r > 0.0) {
            return None;
        }
        let e = r.log2().floor() as i32;
        let mut shift = 30 - e;
        let mut m = (r * 2f64.powi(shift)).round_ties_even();
        // log2 may round across a power of two; renormalise into [2^30, 2^31).
        while m >= 2f64.powi(31) {
            shift -= 1;
            m = (r * 2f64.powi(shift)).round_ties_even();
        }
        while m < 2f64.powi(30) {
            shift += 1;
            m = (r * 2f64.powi(shift)).round_ties_even();
        }
        if !(1..=126).contains(&shift) {
            return None;
        }
        Some(Dyadic { m: m as i64, shift: shift as u32 })
    }

    /// `round_half_even(v · m / 2^shift)`.
    #[inline(always)]
    pub fn apply(self, v: i64) -> i64 {
        round_shift(i128::from(v) * i128::from(self.m), self.shift) as i64
    }

    /// [`apply`](Self::apply) in i64 alone, for `|v| < 2^31` (then `|v·m| < 2^62`) and
    /// `shift ≤ 62`; the caller guarantees both.
    #[inline(always)]
    pub fn apply_small(self, v: i64) -> i64 {
        debug_assert!(v.abs() < 1 << 31 && self.shift <= 62);
        round_shift_i64(v * self.m, self.shift)
    }
}

/// `round_half_even(v / 2^shift)` for `1 ≤ shift ≤ 126` and `|v| < 2^125`, exactly, without
/// branches: with `v = k·2^shift + r` (`0 ≤ r < 2^shift`, arithmetic shifts floor),
/// `r + 2^(shift−1) − 1 + (k & 1)` carries into `k` exactly when `r` is above half, or at half
/// with `k` odd.
#[inline(always)]
pub fn round_shift(v: i128, shift: u32) -> i128 {
    (v + ((1i128 << (shift - 1)) - 1) + ((v >> shift) & 1)) >> shift
}

/// [`round_shift`] on i64, `1 ≤ shift ≤ 62`, `|v| < 2^62`.
#[inline(always)]
pub fn round_shift_i64(v: i64, shift: u32) -> i64 {
    (v + ((1i64 << (shift - 1)) - 1) + ((v >> shift) & 1)) >> shift
}

/// Per-column requantization of accumulators, `t_j = round_half_even((x·m_j + c_j) / 2^s_j)`,
/// in a form that compiles to vector instructions on AVX2 as on AVX-512: `x·m_j` is a signed
/// 32 × 32-bit product (`vpmuldq`), and the rounding shift is logical (`vpsrlvq`; AVX2 has no
/// 64-bit arithmetic shift) on `u = x·m_j + c_j + 2^62`, which is positive.
///
/// Exactness: with `|x| < 2^31`, `0 < m_j < 2^31` and `|c_j| < 2^61`, `|x·m_j + c_j| < 2^62`
/// (callers bound `x` tighter), so `0 < u < 2^63`; `⌊u/2^s⌋ = ⌊v/2^s⌋ + 2^(62−s)` adds an even
/// number for `s ≤ 61`, so the parity that decides ties is `v`'s, and
/// `t = ⌊(u + 2^(s−1) − 1 + parity)/2^s⌋ − 2^(62−s)` equals [`round_shift_i64`] of `v`.
#[derive(Clone, Debug)]
pub(crate) struct Columns {
    m: Vec<i32>,
    /// `c_j + 2^62`.
    c: Vec<i64>,
    /// `2^(s_j − 1) − 1`.
    half: Vec<u64>,
    shift: Vec<u64>,
    /// `2^(62 − s_j)`.
    offset: Vec<i64>,
}

/// The largest shift [`Columns`] takes.
pub(crate) const MAX_COLUMN_SHIFT: u32 = 61;

impl Columns {
    /// The columns `(m_j, c_j, s_j)`, or the first column outside `0 < m < 2^31`,
    /// `|c| < 2^61`, `1 ≤ s ≤ 61`.
    pub(crate) fn new(m: &[i64], c: &[i64], shift: &[u32]) -> Result<Self, usize> {
        let bad = (0..m.len()).find(|&j| {
            !(1..1 << 31).contains(&m[j])
                || c[j].unsigned_abs() >= 1 << 61
                || !(1..=MAX_COLUMN_SHIFT).contains(&shift[j])
        });
        if let Some(j) = bad {
            return Err(j);
        }
        Ok(Columns {
            m: m.iter().map(|&m| m as i32).collect(),
            c: c.iter().map(|&c| c + (1 << 62)).collect(),
            half: shift.iter().map(|&s| (1u64 << (s - 1)) - 1).collect(),
            shift: shift.iter().map(|&s| u64::from(s)).collect(),
            offset: shift.iter().map(|&s| 1i64 << (62 - s)).collect(),
        })
    }

    /// `t[j]` for the row `x` (`x[j]` the column's value, `|x| < 2^31`); inline it into a
    /// `pulp` dispatch to vectorise it.
    #[inline(always)]
    pub(crate) fn row(&self, x: &[i32], t: &mut [i64]) {
        let consts = self.m.iter().zip(&self.c).zip(self.half.iter().zip(&self.shift));
        for (((&x, t), ((&m, &c), (&half, &s))), &o) in
            x.iter().zip(t.iter_mut()).zip(consts).zip(&self.offset)
        {
            *t = lane(x, m, c, half, s, o);
        }
    }

    /// Column 0, for a requantization shared by every column (a one-column `Columns`).
    pub(crate) fn first(&self) -> Lane {
        Lane {
            m: self.m[0],
            c: self.c[0],
            half: self.half[0],
            s: self.shift[0],
            offset: self.offset[0],
        }
    }
}

/// One column of [`Columns`], its constants held by value so that a loop keeps them in
/// registers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lane {
    m: i32,
    c: i64,
    half: u64,
    s: u64,
    offset: i64,
}

impl Lane {
    /// `t` for `x`; inline it into a `pulp` dispatch to vectorise the caller's loop.
    #[inline(always)]
    pub(crate) fn apply(self, x: i32) -> i64 {
        lane(x, self.m, self.c, self.half, self.s, self.offset)
    }
}

/// One column of [`Columns`]: `x·m + c` shifted right by `s` with rounding half to even, from
/// `c + 2^62`, `2^(s−1) − 1` and `2^(62 − s)`.
#[inline(always)]
fn lane(x: i32, m: i32, c: i64, half: u64, s: u64, offset: i64) -> i64 {
    let u = (i64::from(x) * i64::from(m) + c) as u64;
    let parity = (u >> s) & 1;
    ((u + half + parity) >> s) as i64 - offset
}

/// Fraction bits of the residual multipliers: ratios below 2^20 keep `255 · m < 2^58`.
pub(crate) const ADD_SHIFT: u32 = 30;

/// `v` clamped to the codes `0..=hi` of an unsigned site of up to 8 bits.
#[inline]
pub(crate) fn clamp_code(v: i64, hi: u8) -> u8 {
    v.clamp(0, i64::from(hi)) as u8
}

/// The sum of two summands less their zero points, `a` and `b`, with their multipliers onto
/// the sum's grid (`ops::add`): `clamp(round((a·m_a + b·m_b) / 2^ADD_SHIFT) + z_o, 0, hi)`;
/// `|v| = |a·m_a + b·m_b| < 2^61` (checked where the constants are made: `2 · 255 · 2^50 <
/// 2^59` for bytes). As in [`Columns`], the rounding shift is a
/// logical one on `v + 2^62 > 0`, whose quotient differs from `v`'s by an even number, so that
/// the add vectorises on AVX2 too (it has no 64-bit arithmetic shift).
#[inline(always)]
pub(crate) fn add_codes(a: i64, m_a: i64, b: i64, m_b: i64, z_o: i32, hi: i64) -> i64 {
    let u = (a * m_a + b * m_b + (1 << 62)) as u64;
    let parity = (u >> ADD_SHIFT) & 1;
    let t =
        ((u + (1 << (ADD_SHIFT - 1)) - 1 + parity) >> ADD_SHIFT) as i64 - (1 << (62 - ADD_SHIFT));
    (t + i64::from(z_o)).clamp(0, hi)
}

#[allow(clippy::float_arithmetic)]
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rounds_half_to_even_like_torch_round() {
        for (v, s, want) in
            [(3i128, 1, 2), (1, 1, 0), (-1, 1, 0), (-3, 1, -2), (5, 1, 2), (6, 2, 2)]
        {
            assert_eq!(round_shift(v, s), want, "{v} >> {s}");
            assert_eq!(round_shift_i64(v as i64, s), want as i64, "{v} >> {s}");
        }
    }

    #[test]
    fn refuses_ratios_it_cannot_hold() {
        assert_eq!(Dyadic::new(0.0), None);
        assert_eq!(Dyadic::new(-1.0), None);
        assert_eq!(Dyadic::new(f64::NAN), None);
        assert_eq!(Dyadic::new(2f64.powi(40)), None);
        let one = Dyadic::new(1.0).unwrap();
        assert_eq!((one.m, one.shift), (1 << 30, 30));
    }

    /// The branch-free rounding equals the definition: floor, then up above half or at half
    /// with an odd floor.
    fn by_definition(v: i128, shift: u32) -> i128 {
        let q = v >> shift;
        let rem = v - (q << shift);
        let half = 1i128 << (shift - 1);
        q + i128::from(rem > half || (rem == half && q & 1 == 1))
    }

    proptest! {
        /// The add's logical-shift rounding equals the arithmetic one.
        #[test]
        fn add_codes_round_like_round_shift(
            a in -255i64..=255, b in -255i64..=255, m_a in 0i64..(1 << 50), m_b in 0i64..(1 << 50),
            z in 0i32..256, tie in any::<bool>(),
        ) {
            // Half the cases on a tie: b·m_b chosen so that the sum is k·2^30 + 2^29.
            let m_b = if tie && b != 0 {
                let target = ((a * m_a) >> 30 << 30) + (1 << 29) - a * m_a;
                if target % b == 0 && (0..1 << 50).contains(&(target / b)) { target / b } else { m_b }
            } else { m_b };
            let want = i64::from(clamp_code(round_shift_i64(a * m_a + b * m_b, ADD_SHIFT) + i64::from(z), 255));
            prop_assert_eq!(add_codes(a, m_a, b, m_b, z, 255), want);
        }

        /// The same on the residual stream's wide codes, up to the bound `|a·m_a + b·m_b| <
        /// 2^61` that `ops::add` checks.
        #[test]
        fn add_codes_round_like_round_shift_on_wide_codes(
            a in -32767i64..=32767, b in -32767i64..=32767, m_a in 0i64..(1 << 45),
            m_b in 0i64..(1 << 45), z in 0i32..32768, hi in 256i64..32768,
        ) {
            let want = (round_shift_i64(a * m_a + b * m_b, ADD_SHIFT) + i64::from(z)).clamp(0, hi);
            prop_assert_eq!(add_codes(a, m_a, b, m_b, z, hi), want);
        }

        /// The vector form equals the branch-free scalar rounding on every column.
        #[test]
        fn columns_equal_round_shift(
            x in proptest::collection::vec(-(1i32 << 30)..(1 << 30), 1..40),
            seed in any::<u64>(),
        ) {
            let n = x.len();
            let mut s = seed;
            let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); s >> 11 };
            let m: Vec<i64> = (0..n).map(|_| (1 << 30) + (next() % (1 << 30)) as i64).collect();
            let c: Vec<i64> = (0..n).map(|_| (next() % (1 << 61)) as i64 - (1 << 60)).collect();
            let shift: Vec<u32> = (0..n).map(|_| 1 + (next() % 61) as u32).collect();
            let cols = Columns::new(&m, &c, &shift).unwrap();
            let mut t = vec![0; n];
            cols.row(&x, &mut t);
            for j in 0..n {
                let want = round_shift_i64(i64::from(x[j]) * m[j] + c[j], shift[j]);
                prop_assert_eq!(t[j], want, "column {}: x {} m {} c {} s {}", j, x[j], m[j], c[j], shift[j]);
            }
        }

        #[test]
        fn apply_small_equals_apply(v in -(1i64 << 31) + 1..(1i64 << 31), r in 1e-9f64..1e3) {
            let d = Dyadic::new(r).unwrap();
            prop_assume!(d.shift <= 62);
            prop_assert_eq!(d.apply_small(v), d.apply(v));
        }

        #[test]
        fn round_shift_is_round_half_even(v in -(1i128 << 100)..(1i128 << 100), shift in 1u32..=100) {
            prop_assert_eq!(round_shift(v, shift), by_definition(v, shift));
        }

        #[test]
        fn round_shift_rounds_ties_to_even(k in -(1i64 << 40)..(1i64 << 40), shift in 1u32..=20) {
            for r in [-1i64, 0, 1] {
                let v = (k << shift) + (1i64 << (shift - 1)) + r;
                let want = by_definition(i128::from(v), shift) as i64;
                prop_assert_eq!(round_shift_i64(v, shift), want);
                prop_assert_eq!(round_shift(i128::from(v), shift) as i64, want);
            }
        }

        /// The product rounds like the real product, except within the mantissa's relative
        /// error 2^-31 of a tie (checked by a looser/tighter pair of bounds).
        #[test]
        fn apply_is_round_of_the_real_product(v in -(1i64 << 40)..(1i64 << 40), r in 1e-9f64..1e6) {
            let d = Dyadic::new(r).unwrap();
            let exact = v as f64 * r;
            let got = d.apply(v) as f64;
            let err = (exact.abs() * 2f64.powi(-30)).max(1e-9);
            prop_assert!((got - exact).abs() <= 0.5 + err, "{v}·{r}: {got} vs {exact}");
        }
    }
}
