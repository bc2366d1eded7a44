//! The exact u8 × i8 kernel for x86 CPUs with AVX2 but without VNNI: 16-bit pairs through
//! `vpmaddwd`.
//!
//! AVX2's byte multiply-add, `vpmaddubsw`, adds two u8 · i8 products into a saturating i16:
//! `2 · 255 · 128 = 65,280` does not fit, so it is wrong on full-range codes. Here both operands
//! are widened to i16 once, when they are packed (weights at load, each task's activation rows
//! before its GEMM), and `vpmaddwd` multiplies 16 i16 pairs and adds each pair into an i32:
//! `|a·w + a'·w'| ≤ 2 · 255 · 128 < 2^17`, exact, and the i32 accumulators hold `K ≤ 2^16`
//! such products as the other kernels do ([`super::MAX_K`]). It issues as many multiplies per
//! multiply-add as the saturating `vpmaddubsw` + `vpmaddwd` pair, so it loses nothing to it.
//!
//! Register tile: [`MR`] rows × 16 output channels (two 8-lane i32 accumulators per row); per
//! pair of reduction steps it loads the panel's 16 weight pairs once and broadcasts each row's
//! activation pair.

use pulp::x86::V3;
use pulp::{WithSimd, i16x16, i32x8};

/// Output channels per panel: two AVX2 registers of i32 lanes.
pub(super) const NR: usize = 16;
/// Rows per register tile: 4 × 2 accumulators, 2 weight registers and a broadcast use 11 of
/// the 16 registers.
const MR: usize = 4;

/// Weights packed for this kernel: for panel `j` (channels `16j..16j + 16`) and reduction pair
/// `p`, `panels[j · pairs + p][lane]` holds `(w[16j + lane][2p], w[16j + lane][2p + 1])` as two
/// i16 in one u32 (zero past `N` and `K`).
#[derive(Default)]
pub(super) struct Packed {
    panels: Vec<[u32; NR]>,
    pairs: usize,
}

/// Two i16 in one u32, the low one first (the order `vpmaddwd` pairs them in).
#[inline(always)]
fn pair(lo: i16, hi: i16) -> u32 {
    u32::from(lo as u16) | (u32::from(hi as u16) << 16)
}

impl Packed {
    /// Packs `(n, k)` row-major codes.
    pub(super) fn new(codes: &[i8], n: usize, k: usize) -> Self {
        let mut p = Packed::default();
        p.fill(codes, n, k);
        p
    }

    /// Zeroed panels for `(n, k)`, keeping the allocation.
    fn reset(&mut self, n: usize, k: usize) {
        self.pairs = k.div_ceil(2);
        self.panels.clear();
        self.panels.resize(n.div_ceil(NR) * self.pairs, [0; NR]);
    }

    /// Packs `(n, k)` row-major codes into this buffer.
    pub(super) fn fill(&mut self, codes: &[i8], n: usize, k: usize) {
        self.reset(n, k);
        let pairs = self.pairs;
        for (c, row) in codes.chunks_exact(k.max(1)).enumerate().take(n) {
            let (panel, lane) = (&mut self.panels[c / NR * pairs..][..pairs], c % NR);
            for (dst, two) in panel.iter_mut().zip(row.chunks(2)) {
                let hi = two.get(1).copied().unwrap_or(0);
                dst[lane] = pair(i16::from(two[0]), i16::from(hi));
            }
        }
    }

    /// Packs the codes given transposed, `t` `(k, n)` row-major (`w[c][i] = t[i][c]`), into
    /// this buffer.
    pub(super) fn fill_transposed(&mut self, t: &[i8], n: usize, k: usize) {
        self.reset(n, k);
        let pairs = self.pairs;
        let zero = vec![0i8; n];
        for (p, steps) in t.chunks(2 * n.max(1)).enumerate() {
            let (r0, r1) = (&steps[..n], steps.get(n..2 * n).unwrap_or(&zero));
            for (j, c0) in (0..n).step_by(NR).enumerate() {
                let lanes = &mut self.panels[j * pairs + p][..NR.min(n - c0)];
                for (l, dst) in lanes.iter_mut().enumerate() {
                    *dst = pair(i16::from(r0[c0 + l]), i16::from(r1[c0 + l]));
                }
            }
        }
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.panels.len() * NR * 4
    }
}

/// The CPU's AVX2 token, if it has AVX2 (and the rest of x86-64-v3).
pub(super) fn available() -> Option<V3> {
    V3::try_new()
}

/// `out[i][c] = Σ_k a[i][k] · w[c][k]` for the rows `a` `(m, k)` and `w` packed, on this
/// thread; `rows` is scratch for the rows widened to i16 pairs. `a` holds u8 codes, or 16-bit
/// values below 2^15 (non-negative i16 operands: a PTF input's shifted codes, `|a·w + a'·w'| <
/// 2^23`, each row's sum bounded within i32 by the caller).
pub(super) fn block<T: Copy + Into<u16>>(
    v3: V3,
    a: &[T],
    w: &Packed,
    n: usize,
    k: usize,
    rows: &mut Vec<u32>,
    out: &mut [i32],
) {
    // Each row's values as i16, a zero after an odd row: in memory these are the u32 pairs of
    // `pair` (x86 is little-endian), written as u16 so that the widening vectorises.
    let kp = k.div_ceil(2);
    rows.clear();
    rows.resize(a.len() / k * kp, 0);
    let wide: &mut [u16] = pulp::bytemuck::cast_slice_mut(rows.as_mut_slice());
    for (row, wide) in a.chunks_exact(k).zip(wide.chunks_exact_mut(2 * kp)) {
        for (w, &x) in wide.iter_mut().zip(row) {
            *w = x.into();
        }
    }
    <V3 as pulp::Simd>::vectorize(v3, Task { v3, rows, w, n, out });
}

struct Task<'a> {
    v3: V3,
    /// The task's rows, `w.pairs` u32 pairs each.
    rows: &'a [u32],
    w: &'a Packed,
    n: usize,
    out: &'a mut [i32],
}

impl WithSimd for Task<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Task { v3, rows, w, n, out } = self;
        let kp = w.pairs;
        if kp == 0 {
            out.fill(0);
            return;
        }
        let m = rows.len() / kp;
        for (j, panel) in w.panels.chunks_exact(kp).enumerate() {
            let cols = NR.min(n - j * NR);
            let mut i = 0;
            while i + MR <= m {
                let a: [&[u32]; MR] = std::array::from_fn(|r| &rows[(i + r) * kp..][..kp]);
                let acc = tile(v3, a, panel);
                store(&acc, &mut out[i * n + j * NR..], n, cols);
                i += MR;
            }
            for i in i..m {
                let acc = tile(v3, [&rows[i * kp..][..kp]], panel);
                store(&acc, &mut out[i * n + j * NR..], n, cols);
            }
        }
    }
}

/// `R` rows of one panel: the register tile.
#[inline(always)]
fn tile<const R: usize>(v3: V3, a: [&[u32]; R], panel: &[[u32; NR]]) -> [[i32x8; 2]; R] {
    let zero = v3.splat_i32x8(0);
    let mut acc = [[zero; 2]; R];
    // Equal lengths let the compiler drop the bounds checks of the loop.
    assert!(a.iter().all(|r| r.len() == panel.len()));
    for (p, w) in panel.iter().enumerate() {
        let [w0, w1]: [i16x16; 2] = pulp::cast(*w);
        for r in 0..R {
            let x: i16x16 = pulp::cast(v3.splat_u32x8(a[r][p]));
            acc[r][0] =
                v3.wrapping_add_i32x8(acc[r][0], v3.multiply_wrapping_add_adjacent_i16x16(x, w0));
            acc[r][1] =
                v3.wrapping_add_i32x8(acc[r][1], v3.multiply_wrapping_add_adjacent_i16x16(x, w1));
        }
    }
    acc
}

/// Writes a tile's first `cols` channels of each row (rows `n` apart in `out`).
#[inline(always)]
fn store<const R: usize>(acc: &[[i32x8; 2]; R], out: &mut [i32], n: usize, cols: usize) {
    for (r, acc) in acc.iter().enumerate() {
        let lanes: [i32; NR] = pulp::cast(*acc);
        if cols == NR {
            // A whole panel: a fixed-size copy, two vector stores (a library call otherwise).
            let row: &mut [i32; NR] = (&mut out[r * n..][..NR]).try_into().expect("NR lanes");
            *row = lanes;
        } else {
            out[r * n..][..cols].copy_from_slice(&lanes[..cols]);
        }
    }
}
