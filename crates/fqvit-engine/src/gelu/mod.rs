//! GELU in integers: the fc1 accumulator is requantized to a fine fixed-point grid `t · δ`
//! (`δ = s_h / 2^16`, `s_h` the hidden site's scale), and the output code is found by comparing
//! `t` with precomputed thresholds, one per code on each branch of GELU (it falls on
//! `(−∞, y_min]` and rises on `[y_min, ∞)`, `y_min ≈ −0.7518`). The thresholds are computed once
//! from the exact erf GELU in f64, so inference compares integers only; the codes equal
//! `clamp(round(gelu(t·δ)/s_h) + z_h)` for every `t`, by construction of the search below.
//!
//! The binary search over thresholds ([`GeluTable::code`], the reference) mispredicts a branch
//! per step; inference looks codes up in [`Buckets`] instead: `t`'s range cut into power-of-two
//! buckets no wider than the closest two thresholds, so that each holds at most one threshold
//! and a code is one load and one compare. Both give the same code for every `t` (tested).
//! A layer's tables (one, or one per PTF factor) sit in one array ([`ColumnTables`]), so that a
//! row's lookups are vector gathers ([`lanes`]).

mod lanes;

pub(crate) use lanes::Lanes;

/// Fixed-point sub-steps per hidden-code step.
pub(crate) const FRACTION_BITS: u32 = 16;

/// The argmin of GELU, in real units.
const Y_MIN: f64 = -0.751_791_524_693_564_5;

#[allow(clippy::float_arithmetic)] // load time
fn gelu(y: f64) -> f64 {
    0.5 * y * (1.0 + libm::erf(y / std::f64::consts::SQRT_2))
}

/// The thresholds of one hidden site.
#[derive(Clone, Debug)]
pub(crate) struct GeluTable {
    /// `t` below which the falling branch is used.
    t_min: i64,
    /// Rising branch: `(first t, code)` pairs, ascending; the code at `t` is that of the last
    /// pair whose first `t` is `≤ t`.
    rising: Vec<(i64, u8)>,
    /// Falling branch: `(last t, code)` pairs, descending in `t`; the code at `t < t_min` is that
    /// of the last pair whose `t` is `≥ t`.
    falling: Vec<(i64, u8)>,
}

impl GeluTable {
    /// The table for a hidden site with scale `s_h`, zero point `z_h` and largest code `hi`.
    #[allow(clippy::float_arithmetic)] // load time
    pub(crate) fn new(s_h: f32, z_h: i32, hi: u8) -> Self {
        let (s, z, top) = (f64::from(s_h), f64::from(z_h), f64::from(hi));
        let delta = s / f64::from(1u32 << FRACTION_BITS);
        let code = |t: i64| -> u8 {
            ((gelu(t as f64 * delta) / s).round_ties_even() + z).clamp(0.0, top) as u8
        };
        let t_min = (Y_MIN / delta).round() as i64;
        // Beyond ±t_far every code is saturated (hi above, z_h below: |gelu(−40)| ≈ 0).
        let t_far = (((top - z + 1.0) * s).max(40.0) / delta).ceil() as i64;
        // First t ≥ lo with code(t) ≥ q (code is non-decreasing on [t_min, ∞)).
        let first_at_least = |q: u8, mut lo: i64, mut hi: i64| {
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if code(mid) >= q { hi = mid } else { lo = mid + 1 }
            }
            lo
        };
        let mut rising = vec![(t_min, code(t_min))];
        for q in code(t_min) + 1..=code(t_far) {
            rising.push((first_at_least(q, t_min, t_far), q));
        }
        let far_left = code(-t_far);
        let mut falling = vec![(t_min - 1, code(t_min - 1))];
        // Left of t_min GELU rises towards 0 as t falls, so codes grow leftwards: record the
        // largest t at which each larger code holds.
        for q in code(t_min - 1) + 1..=far_left {
            let (mut lo, mut hi) = (-t_far, t_min - 1);
            while lo < hi {
                let mid = lo + (hi - lo + 1) / 2;
                if code(mid) >= q { lo = mid } else { hi = mid - 1 }
            }
            falling.push((lo, q));
        }
        GeluTable { t_min, rising, falling }
    }

    /// Every `t` at which the code differs from the code at `t − 1`, ascending.
    fn breakpoints(&self) -> Vec<i64> {
        let mut b: Vec<i64> = self.falling.iter().map(|&(last, _)| last + 1).collect();
        b.extend(self.rising.iter().map(|&(first, _)| first));
        b.sort_unstable();
        b.dedup();
        b.retain(|&t| self.code(t) != self.code(t - 1));
        b
    }

    /// The code of fixed-point input `t` (real input `t · s_h / 2^16`).
    #[inline]
    pub(crate) fn code(&self, t: i64) -> u8 {
        if t >= self.t_min {
            let i = self.rising.partition_point(|&(first, _)| first <= t);
            self.rising[i - 1].1
        } else {
            let i = self.falling.partition_point(|&(last, _)| last >= t);
            self.falling[i.max(1) - 1].1
        }
    }
}

/// The most buckets a site may need (4 bytes each): a hidden scale `s_h` needs about
/// `2·(255·s_h + 3)/s_h` buckets, so `2^18` covers `s_h > 2.3·10^-5`.
const MAX_BUCKETS: usize = 1 << 18;

/// The widest bucket, so that a threshold's offset in it fits 16 bits. Thresholds on one branch
/// lie about `2^16/gelu'` apart (at least `2^15.8`), so the cap rarely adds buckets; the two
/// branches' thresholds next to GELU's minimum may lie closer, which narrows the buckets.
const MAX_LOG2_WIDTH: u32 = 15;

/// [`GeluTable`]'s codes as buckets of `2^log2_width` consecutive `t`, from `base` on.
#[derive(Clone, Debug)]
pub(crate) struct Buckets {
    base: i64,
    last: i64,
    log2_width: u32,
    /// Per bucket, packed in one word so that one load (or a vector gather) reads it: the
    /// threshold's offset in the bucket (bits 0–15; the width when it holds none), the code
    /// below it (bits 16–23) and the code from it on (bits 24–31). Four bytes, so that a site's
    /// table stays in L2 (the lookups are random).
    entries: Vec<u32>,
}

impl Buckets {
    /// The buckets of `table`, or `None` when its thresholds lie too close for [`MAX_BUCKETS`].
    pub(crate) fn new(table: &GeluTable) -> Option<Self> {
        let b = table.breakpoints();
        let (Some(&first), Some(&last)) = (b.first(), b.last()) else {
            let code = table.code(0);
            return Some(Buckets {
                base: 0,
                last: 0,
                log2_width: 0,
                entries: vec![pack(1, code, code)],
            });
        };
        let gap = b.windows(2).map(|w| w[1] - w[0]).min().unwrap_or(1 << 16).min(1 << 30);
        let log2_width = gap.ilog2().min(MAX_LOG2_WIDTH);
        // Below the first threshold the code is that of `first − 1`, above the last that of
        // `last`: `t` is clamped into `[base, last]` with `base = first − 1`.
        let base = first - 1;
        let count = usize::try_from((last - base) >> log2_width).ok()? + 1;
        if count > MAX_BUCKETS {
            return None;
        }
        let width = 1i64 << log2_width;
        let mut next = b.iter().peekable();
        let entries = (0..count as i64)
            .map(|i| {
                let start = base + i * width;
                let lo = table.code(start);
                // At most one threshold per bucket, as `width` is at most the closest gap.
                match next.next_if(|&&t| t < start + width) {
                    Some(&t) => pack((t - start) as u32, lo, table.code(t)),
                    None => pack(width as u32, lo, lo),
                }
            })
            .collect();
        Some(Buckets { base, last, log2_width, entries })
    }

    /// The code of fixed-point input `t`, as [`GeluTable::code`] (the reference of
    /// [`ColumnTables::row`]).
    #[cfg(test)]
    pub(crate) fn code(&self, t: i64) -> u8 {
        let r = t.clamp(self.base, self.last) - self.base;
        let e = self.entries[(r >> self.log2_width) as usize];
        let offset = (r as u32) & ((1 << self.log2_width) - 1);
        let code = if offset >= e & 0xffff { e >> 24 } else { e >> 16 };
        code as u8
    }
}

/// The [`Buckets`] of every column of a layer (one table, or one per PTF factor) in one array,
/// with each column's bounds beside it, so that a row's lookups are vector gathers.
#[derive(Clone, Debug)]
pub(crate) struct ColumnTables {
    entries: Vec<u32>,
    /// Per column: its table's `base`, `last − base`, `log2_width` and first entry.
    base: Vec<i64>,
    span: Vec<i64>,
    log2_width: Vec<u32>,
    start: Vec<u32>,
}

impl ColumnTables {
    /// Column `j` looks codes up in `tables[which[j]]`.
    pub(crate) fn new(tables: &[Buckets], which: &[u8]) -> Self {
        let mut entries = Vec::new();
        let mut first = Vec::with_capacity(tables.len());
        for t in tables {
            first.push(entries.len() as u32);
            entries.extend_from_slice(&t.entries);
        }
        let col = |j: usize| &tables[usize::from(which[j])];
        let n = which.len();
        ColumnTables {
            base: (0..n).map(|j| col(j).base).collect(),
            span: (0..n).map(|j| col(j).last - col(j).base).collect(),
            log2_width: (0..n).map(|j| col(j).log2_width).collect(),
            start: which.iter().map(|&w| first[usize::from(w)]).collect(),
            entries,
        }
    }

    /// The codes of a row's fixed-point inputs `t`, as [`Buckets::code`] of each column's table
    /// (the reference of [`ColumnTables::row_lanes`]).
    #[cfg(test)]
    pub(crate) fn row(&self, t: &[i64], out: &mut [u8]) {
        self.row_from(0, t, out);
    }

    /// [`row`](Self::row) for the columns from `first` on.
    fn row_from(&self, first: usize, t: &[i64], out: &mut [u8]) {
        let last = self.entries.len() - 1;
        let bounds = self.base.iter().zip(&self.span).zip(self.log2_width.iter().zip(&self.start));
        for ((o, &t), ((&base, &span), (&log2, &start))) in
            out.iter_mut().zip(t).zip(bounds.skip(first))
        {
            let r = (t - base).clamp(0, span);
            // `min` keeps the index in the table, as the vector lanes' clamp does.
            let e = self.entries[(start as usize + (r >> log2) as usize).min(last)];
            let offset = (r as u32) & ((1 << log2) - 1);
            *o = (if offset >= e & 0xffff { e >> 24 } else { e >> 16 }) as u8;
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        4 * self.entries.len() + 24 * self.base.len()
    }
}

fn pack(threshold: u32, lo: u8, hi: u8) -> u32 {
    debug_assert!(threshold <= 1 << MAX_LOG2_WIDTH);
    threshold | u32::from(lo) << 16 | u32::from(hi) << 24
}

#[allow(clippy::float_arithmetic)]
#[cfg(test)]
mod tests {
    use super::*;

    /// Hidden sites' scales and zero points: ViT-Tiny's range and extremes.
    const SITES: [(f32, i32); 5] = [(0.031, 10), (0.012, 14), (0.2, 1), (0.05, 0), (0.0007, 200)];

    #[test]
    fn buckets_equal_the_search_at_every_threshold_and_between() {
        for (s, z) in SITES {
            let table = GeluTable::new(s, z, 255);
            let buckets = Buckets::new(&table).expect("fits");
            let b = table.breakpoints();
            assert!(b.len() > 10, "s {s}: {} thresholds", b.len());
            for &t in &b {
                for d in -3..=3 {
                    assert_eq!(buckets.code(t + d), table.code(t + d), "s {s} z {z} t {}", t + d);
                }
            }
            for w in b.windows(2) {
                let mid = w[0] + (w[1] - w[0]) / 2;
                assert_eq!(buckets.code(mid), table.code(mid), "s {s} z {z} t {mid}");
            }
            for t in [i64::MIN / 4, -(1 << 40), 0, 1 << 40, i64::MAX / 4] {
                assert_eq!(buckets.code(t), table.code(t), "s {s} z {z} t {t}");
            }
        }
    }

    /// Each column's code equals its own table's, across tables of several scales.
    #[test]
    fn column_tables_equal_each_columns_buckets() {
        let buckets: Vec<Buckets> =
            SITES.iter().map(|&(s, z)| Buckets::new(&GeluTable::new(s, z, 255)).unwrap()).collect();
        let which: Vec<u8> = (0..23).map(|j| (j * 3 % 5) as u8).collect();
        let tables = ColumnTables::new(&buckets, &which);
        let mut next = fqvit_testkit::lcg(7);
        let mut out = vec![0u8; which.len()];
        for round in 0..2000 {
            let t: Vec<i64> = (0..which.len())
                .map(|_| {
                    let span = [1i64 << 18, 1 << 24, 1 << 40][round % 3];
                    (next() >> 20) as i64 % span - span / 2
                })
                .collect();
            tables.row(&t, &mut out);
            for (j, (&t, &o)) in t.iter().zip(&out).enumerate() {
                assert_eq!(o, buckets[usize::from(which[j])].code(t), "column {j}, t {t}");
            }
            // Every instruction set's lanes, on the whole row and on a prefix (the tail).
            for isa in fqvit_ops::Isa::ALL.into_iter().filter(|isa| isa.available()) {
                let lanes = Lanes::of(isa.arch());
                for len in [which.len(), 13 + round % 7] {
                    let mut fast = vec![0u8; len];
                    tables.row_lanes(lanes, &t[..len], &mut fast);
                    assert_eq!(fast, out[..len], "{isa}, {len} columns, round {round}");
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn buckets_equal_the_search(t in -(1i64 << 36)..(1i64 << 36), site in 0usize..5) {
            let (s, z) = SITES[site];
            let table = GeluTable::new(s, z, 255);
            proptest::prop_assert_eq!(Buckets::new(&table).unwrap().code(t), table.code(t));
        }
    }

    #[test]
    fn codes_equal_the_real_gelu_everywhere() {
        for &(s, z) in &SITES[..4] {
            let table = GeluTable::new(s, z, 255);
            let delta = f64::from(s) / 65536.0;
            let step = 37;
            for t in (-(60.0 / delta) as i64..(20.0 / delta) as i64).step_by(step) {
                let y = t as f64 * delta;
                let want = ((gelu(y) / f64::from(s)).round_ties_even() + f64::from(z))
                    .clamp(0.0, 255.0) as u8;
                assert_eq!(table.code(t), want, "s {s} z {z} t {t} y {y}");
            }
        }
    }
}
