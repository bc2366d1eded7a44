//! Attention in integers (ViT's, and Swin's in windows), and its `attn · V` with
//! Log-Int-Softmax codes: `Σ_j 2^(K − k_ij) · (v_j − z)` for every query `i` and
//! channel `e`, with `K` the probabilities' fixed-point bits (`2^-k` is `2^(K − k)` steps of
//! `2^-K`) and codes `k > K` dropped.
//!
//! The reference adds shifted values. The fast path splits each weight `2^e` (`e = K − k`) into
//! byte planes: plane `b = ⌊e/8⌋` holds `2^(e mod 8) ∈ [1, 128]` and the other planes 0, so that
//! `Σ_j 2^e_ij (v_j − z) = Σ_b 2^(8b) Σ_j P_b[i][j] (v_j − 128) + (128 − z) Σ_j 2^e_ij`, and
//! each plane is a u8 × i8 GEMM of the int8 kernel (the planes' row sums, summed as they are
//! built, give `Σ_j 2^e_ij` with their `2^(8b)` weights). The upper planes (`e ≥ 8`,
//! probabilities of at least `2^(8−K)`) are mostly empty with 4-bit codes, as probabilities sum
//! to about 1; when at most one entry in 16 lies there, they are added as shifts instead.
//! Bounds: a plane's sum is at most
//! `N · 128 · 128 < 2^31` for `N < 2^17`; the total is at most `N · 2^K · 255 < 2^63` for
//! `K ≤ 30` and `N < 2^24`. Both compute the same integers.

use std::time::{Duration, Instant};

use fqvit_ops::softmax::{ExpTable, LisConstants, log_int_softmax_local};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gemm::{Kernel, Weights, gemm_local, gemm_wide_local};
use crate::grid::Grid;
use crate::load::{check_layer_wise, dyadic, small};
use crate::requant::Dyadic;
use crate::requant::{Columns, add_codes, clamp_code};
use fqvit_artifact::Artifact;
use fqvit_ops::softmax::{LisBits, MAX_ROW, MIN_SCALE};

/// The reference: `out[i·hd + e] = Σ_j (v[j·hd + e] − z) << (k_max − k[i·n + j])`, for the
/// query rows `i` of `k` over the `n` tokens of `v`.
pub fn attn_v_reference(k: &[u16], v: &[u8], z: i32, hd: usize, k_max: u32) -> Vec<i64> {
    let n = v.len() / hd.max(1);
    let mut out = vec![0i64; k.len() / n.max(1) * hd];
    for (i, o) in out.chunks_exact_mut(hd.max(1)).enumerate() {
        for (j, &kc) in k[i * n..][..n].iter().enumerate() {
            let kc = u32::from(kc);
            if kc > k_max {
                continue;
            }
            for (o, &x) in o.iter_mut().zip(&v[j * hd..][..hd]) {
                *o += (i64::from(x) - i64::from(z)) << (k_max - kc);
            }
        }
    }
    out
}

/// The sums of `attn · v`: i32 where [`fits_i32`] allows (4-bit codes on up to 255 tokens),
/// otherwise i64.
pub(crate) trait Acc:
    Copy
    + Default
    + From<i32>
    + Into<i64>
    + std::ops::Add<Output = Self>
    + std::ops::AddAssign
    + std::ops::Mul<Output = Self>
    + std::ops::Shl<u32, Output = Self>
{
}

impl Acc for i32 {}
impl Acc for i64 {}

/// Whether every sum of `attn · v` over `n` tokens, and every partial sum the fast path forms,
/// fits i32: each token's term `2^e · (v − z)` is at most `2^K · 255` in magnitude, and the
/// first plane's zero-point split (`Σ p·(v − 128)` and `(128 − z)·Σ p`, `p ≤ 128`) adds at most
/// `128 · 383` per token, so `n · (255 · 2^K + 128 · 383) < 2^31` bounds them all (`n ≤ 255`
/// at `K = 15`, 4-bit codes).
pub fn fits_i32(n: usize, k_max: u32) -> bool {
    k_max < 24 && (n as u64).saturating_mul((255u64 << k_max) + 128 * 383) < 1 << 31
}

/// The fast path: the byte planes through the int8 GEMM. Same arguments and result as
/// [`attn_v_reference`], and the kernel.
pub fn attn_v(kernel: &Kernel, k: &[u16], v: &[u8], z: i32, hd: usize, k_max: u32) -> Vec<i64> {
    let n = v.len() / hd.max(1);
    let rows = k.len() / n.max(1);
    let mut s = AttnVScratch::default();
    // The engine calls `attn_v_lanes` from its head tasks (`Head`); this entry serves the
    // property tests and the benchmark, compiled for the ISA the same way.
    if fits_i32(n, k_max) {
        let mut out = vec![0i32; rows * hd];
        let task = AttnV { kernel, k, v, z, hd, k_max, s: &mut s, out: &mut out };
        kernel.arch().dispatch(task);
        out.into_iter().map(i64::from).collect()
    } else {
        let mut out = vec![0i64; rows * hd];
        let task = AttnV { kernel, k, v, z, hd, k_max, s: &mut s, out: &mut out };
        kernel.arch().dispatch(task);
        out
    }
}

/// [`attn_v_lanes`] for [`pulp::Arch::dispatch`], whose `with_simd` is inlined into code
/// compiled for the detected instruction set (a closure's body would not be).
struct AttnV<'a, A> {
    kernel: &'a Kernel,
    k: &'a [u16],
    v: &'a [u8],
    z: i32,
    hd: usize,
    k_max: u32,
    s: &'a mut AttnVScratch,
    out: &'a mut [A],
}

impl<A: Acc> pulp::WithSimd for AttnV<'_, A> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let AttnV { kernel, k, v, z, hd, k_max, s, out } = self;
        attn_v_lanes(kernel, k, v, z, hd, k_max, s, out);
    }
}

/// Buffers of [`attn_v_lanes`] kept across calls.
#[derive(Debug, Default)]
pub(crate) struct AttnVScratch {
    p: Vec<u8>,
    row_sums: Vec<i64>,
    upper: Vec<u32>,
    vz: Vec<i32>,
    g: Vec<i32>,
    /// `v − 128` as int8, token rows.
    vt: Vec<i8>,
    /// Those packed as the GEMM's weights.
    w: Weights,
    /// The 16-bit plane ([`wide_plane`]) and the kernel's rows.
    p16: Vec<u16>,
    rows: Vec<u32>,
}

impl AttnVScratch {
    /// `v − 128` as int8 "weights" `(hd, n)` in `w`, packed from the token rows `v` (channel
    /// `e`'s weights are the tokens' values in it).
    #[inline(always)]
    fn pack_values(&mut self, kernel: &Kernel, v: &[u8], hd: usize) {
        refill(&mut self.vt, v.len());
        self.vt.iter_mut().zip(v).for_each(|(w, &x)| *w = (x ^ 0x80) as i8);
        self.w.repack_transposed(kernel, &self.vt, hd, v.len() / hd);
    }
}

/// Whether `attn · v` takes one 16-bit plane: the kernel multiplies 16-bit operands anyway (the
/// AVX2 pairs), the weights `2^e ≤ 2^15` (`K ≤ 15`: 4-bit codes) hold in it as `min(2^e, 2^15
/// − 1)`, and every sum of `n` terms `|a·(v − 128)| < 2^15 · 128 = 2^22` stays in i32 (`n <
/// 2^9`).
fn wide_plane(kernel: &Kernel, n: usize, k_max: u32) -> bool {
    kernel.takes_wide() && k_max <= 15 && n < 1 << 9
}

/// `v` emptied and refilled with `len` defaults, keeping its allocation.
fn refill<T: Clone + Default>(v: &mut Vec<T>, len: usize) {
    v.clear();
    v.resize(len, T::default());
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attn_v_lanes<A: Acc>(
    kernel: &Kernel,
    k: &[u16],
    v: &[u8],
    z: i32,
    hd: usize,
    k_max: u32,
    s: &mut AttnVScratch,
    out: &mut [A],
) {
    assert!(k_max <= 30, "attn·v: {k_max} fixed-point bits");
    let n = v.len() / hd.max(1);
    let rows = k.len() / n.max(1);
    assert_eq!(k.len(), rows * n, "attn·v: {} probabilities for {n} tokens", k.len());
    assert_eq!(out.len(), rows * hd, "attn·v: room for {} sums of {rows} × {hd}", out.len());
    if rows == 0 || hd == 0 {
        return;
    }
    if wide_plane(kernel, n, k_max) {
        return attn_v_wide(kernel, k, v, z, hd, k_max, s, out);
    }
    // The upper planes' entries: e = k_max − k in [8, k_max] (e wraps above k_max for the
    // dropped codes k > k_max).
    let is_upper = |e: u32| (8..=k_max).contains(&e);
    // Plane 0 holds 2^e where e < 8, else 0: one branch-free pass, which also sums each row
    // (at most n · 128) and counts its upper entries.
    refill(&mut s.p, rows * n);
    refill(&mut s.row_sums, rows);
    refill(&mut s.upper, rows);
    for (((plane, k), sum), upper) in
        s.p.chunks_exact_mut(n).zip(k.chunks_exact(n)).zip(&mut s.row_sums).zip(&mut s.upper)
    {
        let (mut total, mut count) = (0u32, 0u32);
        for (p, &kc) in plane.iter_mut().zip(k) {
            let e = k_max.wrapping_sub(u32::from(kc));
            // In u32 lanes: x86 has no byte shifts.
            let w = if e < 8 { 1u32 << e } else { 0 };
            *p = w as u8;
            total += w;
            count += u32::from(is_upper(e));
        }
        (*sum, *upper) = (i64::from(total), count);
    }
    // With 4-bit codes the upper planes are mostly empty, as probabilities sum to about 1:
    // when at most one entry in 16 lies there, they are added as shifts instead.
    let uppers: u64 = s.upper.iter().map(|&c| u64::from(c)).sum();
    let planes = if uppers * 16 <= (rows * n) as u64 { 1 } else { k_max as usize / 8 + 1 };
    s.p.resize(planes * rows * n, 0);
    s.row_sums.resize(planes * rows, 0);
    for b in 1..planes {
        // Plane b of row i holds 2^(e − 8b) where e lies in [8b, 8b + 8), else 0.
        let low = 8 * b as u32;
        let plane = &mut s.p[b * rows * n..][..rows * n];
        let sums = &mut s.row_sums[b * rows..][..rows];
        for ((plane, k), sum) in plane.chunks_exact_mut(n).zip(k.chunks_exact(n)).zip(sums) {
            let mut total = 0u32;
            for (p, &kc) in plane.iter_mut().zip(k) {
                let e = k_max.wrapping_sub(u32::from(kc)).wrapping_sub(low);
                let w = if e < 8 { 1u32 << e } else { 0 };
                *p = w as u8;
                total += w;
            }
            *sum = i64::from(total);
        }
    }
    s.pack_values(kernel, v, hd);
    refill(&mut s.g, planes * rows * hd);
    gemm_local(kernel, &s.p, &s.w, &mut s.g);
    let zero_point = A::from(128 - z);
    for (b, (plane, sums)) in
        s.g.chunks_exact(rows * hd).zip(s.row_sums.chunks_exact(rows)).enumerate()
    {
        for ((o, g), &sum) in out.chunks_exact_mut(hd).zip(plane.chunks_exact(hd)).zip(sums) {
            // `sum ≤ n · 128`, within i32 for any supported row.
            let row = zero_point * A::from(sum as i32);
            if b == 0 {
                o.iter_mut().zip(g).for_each(|(o, &x)| *o = A::from(x) + row);
            } else {
                o.iter_mut().zip(g).for_each(|(o, &x)| *o += (A::from(x) + row) << (8 * b as u32));
            }
        }
    }
    if planes == 1 && uppers > 0 {
        refill(&mut s.vz, n * hd);
        s.vz.iter_mut().zip(v).for_each(|(o, &x)| *o = i32::from(x) - z);
        for ((o, k), _) in
            out.chunks_exact_mut(hd).zip(k.chunks_exact(n)).zip(&s.upper).filter(|(_, c)| **c > 0)
        {
            // The row's upper entries as bits, 64 tokens a mask (compared in vector lanes), so
            // that only they are visited, without a branch per token.
            for (c, codes) in k.chunks(64).enumerate() {
                let mut mask = codes.iter().enumerate().fold(0u64, |m, (b, &kc)| {
                    m | u64::from(is_upper(k_max.wrapping_sub(u32::from(kc)))) << b
                });
                while mask != 0 {
                    let j = 64 * c + mask.trailing_zeros() as usize;
                    mask &= mask - 1;
                    let e = k_max - u32::from(k[j]);
                    let row = &s.vz[j * hd..][..hd];
                    o.iter_mut().zip(row).for_each(|(o, &x)| *o += A::from(x) << e);
                }
            }
        }
    }
}

/// [`attn_v_lanes`] in one 16-bit plane ([`wide_plane`]): `a_ij = 2^e` (`e = k_max − k_ij`),
/// except `2^15 − 1` for `e = 15`, whose missing step `v_j − z` is added after; `Σ_j a_ij (v_j −
/// z) = Σ_j a_ij (v_j − 128) + (128 − z) Σ_j a_ij`, the first a GEMM, each term below
/// `2^22` in magnitude and each of the other two below 2^31.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attn_v_wide<A: Acc>(
    kernel: &Kernel,
    k: &[u16],
    v: &[u8],
    z: i32,
    hd: usize,
    k_max: u32,
    s: &mut AttnVScratch,
    out: &mut [A],
) {
    let n = v.len() / hd;
    let rows = k.len() / n;
    refill(&mut s.p16, rows * n);
    refill(&mut s.row_sums, rows);
    refill(&mut s.upper, rows);
    for (((plane, k), sum), top) in
        s.p16.chunks_exact_mut(n).zip(k.chunks_exact(n)).zip(&mut s.row_sums).zip(&mut s.upper)
    {
        let (mut total, mut count) = (0u32, 0u32);
        for (p, &kc) in plane.iter_mut().zip(k) {
            // e wraps above k_max for the dropped codes.
            let e = k_max.wrapping_sub(u32::from(kc));
            let w = if e <= k_max { (1u32 << e).min((1 << 15) - 1) } else { 0 };
            *p = w as u16;
            total += w;
            count += u32::from(e == 15);
        }
        (*sum, *top) = (i64::from(total), count);
    }
    s.pack_values(kernel, v, hd);
    refill(&mut s.g, rows * hd);
    gemm_wide_local(kernel, &s.p16, &s.w, &mut s.rows, &mut s.g);
    let zero_point = A::from(128 - z);
    for ((o, g), &sum) in out.chunks_exact_mut(hd).zip(s.g.chunks_exact(hd)).zip(&s.row_sums) {
        // `Σ a ≤ n · 2^15 < 2^24`, times `|128 − z| ≤ 128`.
        let row = zero_point * A::from(sum as i32);
        o.iter_mut().zip(g).for_each(|(o, &x)| *o = A::from(x) + row);
    }
    // The probabilities of 1 (k = 0 with 15 fixed-point bits): rare, one step each.
    for ((o, k), _) in
        out.chunks_exact_mut(hd).zip(k.chunks_exact(n)).zip(&s.upper).filter(|(_, c)| **c > 0)
    {
        for (j, _) in
            k.iter().enumerate().filter(|&(_, &kc)| k_max.wrapping_sub(u32::from(kc)) == 15)
        {
            o.iter_mut()
                .zip(&v[j * hd..][..hd])
                .for_each(|(o, &x)| *o += A::from(i32::from(x) - z));
        }
    }
}

/// Multi-head attention compiled from an `attention` or `window-attention` op.
#[derive(Debug)]
pub(crate) struct Attention {
    pub(crate) heads: usize,
    /// qkv's zero point.
    pub(crate) z: i32,
    /// `s_qkv² · head_dim^-½ / s_scores`.
    pub(crate) m_scores: Dyadic,
    /// The scores' zero point and largest code.
    pub(crate) z_a: i32,
    pub(crate) hi_a: u8,
    /// The scale Log-Int-Softmax reads: the scores' (ViT) or the biased scores' (Swin).
    /// Log-Int-Softmax's integer exponential, from the scale of its input site.
    pub(crate) lis: ExpTable,
    pub(crate) bits: u32,
    /// Fixed-point bits of the probabilities `2^-k` in `attn · v`.
    pub(crate) k_max: u32,
    pub(crate) m_ctx: Vec<Dyadic>,
    /// `m_scores` in vector form (one column, shared by every score), where its shift allows.
    pub(crate) score_columns: Option<Columns>,
    /// `m_ctx` in vector form, one per head, where its shifts allow.
    pub(crate) ctx_columns: Option<Vec<Columns>>,
    pub(crate) z_c: Vec<i32>,
    /// The context's largest code.
    pub(crate) hi_c: u8,
    /// Swin's windows.
    pub(crate) windows: Option<Windows>,
}

/// Swin's windows: the grid token each windowed position holds, the bias and the mask.
#[derive(Debug)]
pub(crate) struct Windows {
    /// [`fqvit_program::windows::tokens`].
    pub(crate) tokens: Vec<usize>,
    /// Tokens per window.
    pub(crate) n: usize,
    /// The quantized bias of each head and token pair, `(heads, n, n)`.
    pub(crate) table: Vec<u8>,
    /// Scores plus bias on the biased site, as a residual add ([`add_codes`]).
    pub(crate) m_a: i64,
    pub(crate) z_t: i32,
    pub(crate) m_t: i64,
    pub(crate) z_b: i32,
    /// The biased site's largest code.
    pub(crate) hi_b: u8,
    /// The masked token pairs of each window, `(windows, n, n)`; `None` unshifted.
    pub(crate) mask: Option<Vec<bool>>,
    /// The mask (−100) in the biased site's steps, rounded: the integer twin of the
    /// simulation's `X/S`, which masked entries leave off the grid.
    pub(crate) mask_steps: i32,
}

impl Windows {
    /// Head `h`'s scores `x` (less their zero point) of window `w`, query rows from `r0` on,
    /// plus the bias, on the biased site less its zero point, then masked.
    fn bias_and_mask(&self, h: usize, w: usize, r0: usize, x: &mut [i32]) {
        let (nn, from, len) = (self.n * self.n, r0 * self.n, x.len());
        for (x, &t) in x.iter_mut().zip(&self.table[h * nn + from..][..len]) {
            let t = i64::from(t) - i64::from(self.z_t);
            let hi = i64::from(self.hi_b);
            let sum = add_codes(i64::from(*x), self.m_a, t, self.m_t, self.z_b, hi);
            *x = sum as i32 - self.z_b;
        }
        if let Some(mask) = &self.mask {
            for (x, &m) in x.iter_mut().zip(&mask[w * nn + from..][..len]) {
                if m {
                    *x += self.mask_steps;
                }
            }
        }
    }
}

/// One head's work for [`pulp::Arch::dispatch`], whose `with_simd` is inlined into code
/// compiled for the detected instruction set (a closure's body would not be).
struct Head<'a, I> {
    att: &'a Attention,
    kernel: &'a Kernel,
    s: &'a mut HeadScratch,
    rows: I,
    n: usize,
    queries: std::ops::Range<usize>,
    hd: usize,
    h: usize,
    window: Option<usize>,
}

impl<'a, 'b, I: Iterator<Item = &'b [u8]>> pulp::WithSimd for Head<'a, I> {
    type Output = (Vec<u8>, Duration, Duration);

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Self::Output {
        let Head { att, kernel, s, rows, n, queries, hd, h, window } = self;
        att.head(kernel, s, rows, n, queries, hd, h, window)
    }
}

/// Buffers one thread reuses across the heads it runs.
#[derive(Debug, Default)]
struct HeadScratch {
    q: Vec<u8>,
    k: Vec<i8>,
    /// The keys packed as the GEMM's weights.
    wk: Weights,
    v: Vec<u8>,
    sq: Vec<i64>,
    sk: Vec<i64>,
    raw: Vec<i32>,
    x: Vec<i32>,
    codes: Vec<u16>,
    av: AttnVScratch,
    sums32: Vec<i32>,
    sums64: Vec<i64>,
}

impl Attention {
    /// `(batch · N, 3D)` qkv codes of `batch` images of `n` tokens to `(batch · N, D)` context
    /// codes, with the time spent in matmuls and in the softmax (summed over threads). Every
    /// head of every image (and window) is a task of its own, its query rows split further
    /// where there are fewer than two tasks a thread (ViT-Tiny's three heads at batch 1: two
    /// chunks each, six tasks), so that the threads stay busy; each chunk packs its head's keys
    /// and values again, which more chunks would not repay (measured).
    pub(crate) fn run(
        &self,
        kernel: &Kernel,
        qkv: &[u8],
        batch: usize,
        n: usize,
    ) -> (Vec<u8>, Duration, Duration) {
        let c3 = qkv.len() / (batch * n).max(1);
        let (d, heads) = (c3 / 3, self.heads);
        let hd = d / heads;
        // Tokens per window, and the grid token of each window's row.
        let (wn, tokens) = match &self.windows {
            Some(win) => (win.n, Some(win.tokens.as_slice())),
            None => (n, None),
        };
        let windows = n / wn;
        let token = |w: usize, r: usize| tokens.map_or(r, |t| t[w * wn + r]);
        let units = batch * windows * heads;
        // At least 32 query rows a task.
        let chunks =
            (2 * rayon::current_num_threads()).div_ceil(units.max(1)).clamp(1, (wn / 32).max(1));
        // Task t: image b, window w, head h, query rows of chunk c.
        let split = |t: usize| {
            let (u, c) = (t / chunks, t % chunks);
            let (b, w, h) = (u / (windows * heads), u / heads % windows, u % heads);
            (b, w, h, c * wn / chunks..(c + 1) * wn / chunks)
        };
        let per_task: Vec<(Vec<u8>, Duration, Duration)> = (0..units * chunks)
            .into_par_iter()
            .map_init(HeadScratch::default, |s, t| {
                let (b, w, h, queries) = split(t);
                let image = &qkv[b * n * c3..][..n * c3];
                let rows = (0..wn).map(|r| &image[token(w, r) * c3..][..c3]);
                let window = self.windows.as_ref().map(|_| w);
                let task = Head { att: self, kernel, s, rows, n: wn, queries, hd, h, window };
                kernel.arch().dispatch(task)
            })
            .collect();
        let mut out = vec![0u8; batch * n * d];
        let (mut mm_all, mut sm_all) = (Duration::ZERO, Duration::ZERO);
        for (t, (codes, mm, sm)) in per_task.into_iter().enumerate() {
            let (b, w, h, queries) = split(t);
            for (r, codes) in queries.zip(codes.chunks_exact(hd)) {
                out[(b * n + token(w, r)) * d + h * hd..][..hd].copy_from_slice(codes);
            }
            mm_all += mm;
            sm_all += sm;
        }
        (out, mm_all, sm_all)
    }

    /// Head `h` of the `n` qkv rows `rows` (an image's tokens, or window `window` of Swin's),
    /// for the query rows `queries`: their `(queries, hd)` context codes, the time in matmuls
    /// and in the softmax.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn head<'a>(
        &self,
        kernel: &Kernel,
        s: &mut HeadScratch,
        rows: impl Iterator<Item = &'a [u8]>,
        n: usize,
        queries: std::ops::Range<usize>,
        hd: usize,
        h: usize,
        window: Option<usize>,
    ) -> (Vec<u8>, Duration, Duration) {
        let t = Instant::now();
        let d = hd * self.heads;
        let m = queries.len();
        // One pass over the tokens: q (the query rows), k − 128 as int8 "weights" (so that the
        // u8 × i8 GEMM takes q·kᵀ: Σ(q − z)(k − z) = Σ q·(k − 128) + (128 − z)·Σq − z·Σk +
        // hd·z², each term below 2^31 in magnitude for hd < 2^15), v, and the row sums of q
        // and k.
        refill(&mut s.q, m * hd);
        refill(&mut s.k, n * hd);
        refill(&mut s.v, n * hd);
        refill(&mut s.sq, m);
        refill(&mut s.sk, n);
        let sum = |x: &[u8]| x.iter().map(|&x| u32::from(x)).sum::<u32>();
        for (i, token) in rows.enumerate() {
            let part = |p: usize| &token[p * d + h * hd..][..hd];
            let ki = part(1);
            for (k, &x) in s.k[i * hd..][..hd].iter_mut().zip(ki) {
                *k = (x ^ 0x80) as i8;
            }
            s.v[i * hd..][..hd].copy_from_slice(part(2));
            s.sk[i] = i64::from(sum(ki));
            if queries.contains(&i) {
                let (qi, r) = (part(0), i - queries.start);
                s.q[r * hd..][..hd].copy_from_slice(qi);
                s.sq[r] = i64::from(sum(qi));
            }
        }
        refill(&mut s.raw, m * n);
        s.wk.repack(kernel, &s.k, n, hd);
        gemm_local(kernel, &s.q, &s.wk, &mut s.raw);
        refill(&mut s.x, m * n);
        self.scores(&s.raw, &s.sq, &s.sk, hd, &mut s.x);
        if let (Some(win), Some(w)) = (&self.windows, window) {
            win.bias_and_mask(h, w, queries.start, &mut s.x);
        }
        let mm = t.elapsed();
        let t = Instant::now();
        refill(&mut s.codes, m * n);
        log_int_softmax_local(kernel.isa(), &s.x, n, &self.lis, self.bits, &mut s.codes);
        let sm = t.elapsed();
        let t = Instant::now();
        let mut out = vec![0u8; m * hd];
        if fits_i32(n, self.k_max) {
            refill(&mut s.sums32, m * hd);
            attn_v_lanes(kernel, &s.codes, &s.v, self.z, hd, self.k_max, &mut s.av, &mut s.sums32);
            self.context(h, hd, &s.sums32, &mut out);
        } else {
            refill(&mut s.sums64, m * hd);
            attn_v_lanes(kernel, &s.codes, &s.v, self.z, hd, self.k_max, &mut s.av, &mut s.sums64);
            self.context(h, hd, &s.sums64, &mut out);
        }
        (out, mm + t.elapsed(), sm)
    }

    /// One head's score requantization: `Σ(q − z)(k − z)` from the raw `Σ q·(k − 128)` and
    /// the row sums, onto the scores site, less its zero point. `|Σ(q − z)(k − z)| ≤ 255²·hd <
    /// 2^31`, so [`Dyadic::apply_small`] holds it.
    #[inline(always)]
    fn scores(&self, raw: &[i32], sq: &[i64], sk: &[i64], hd: usize, out: &mut [i32]) {
        let n = sk.len();
        let z = i64::from(self.z);
        let constant = hd as i64 * z * z;
        let (m, z_a) = (self.m_scores, i64::from(self.z_a));
        let hi = i64::from(self.hi_a);
        for ((x, raw), &sq) in out.chunks_exact_mut(n).zip(raw.chunks_exact(n)).zip(sq) {
            let row = (128 - z) * sq + constant;
            let scores = x.iter_mut().zip(raw).zip(sk);
            match self.score_columns.as_ref().map(Columns::first) {
                Some(c) => scores.for_each(|((x, &r), &sk)| {
                    let t = c.apply((i64::from(r) + row - z * sk) as i32);
                    *x = ((t + z_a).clamp(0, hi) - z_a) as i32;
                }),
                None => scores.for_each(|((x, &r), &sk)| {
                    let t = m.apply_small(i64::from(r) + row - z * sk);
                    *x = ((t + z_a).clamp(0, hi) - z_a) as i32;
                }),
            }
        }
    }

    /// One head's context requantization: `Σ_j 2^(K − k_ij)(v_j − z)` onto the context site.
    /// Rows whose sums lie below 2^31 (all, with 4-bit Log-Int-Softmax, [`fits_i32`]) go
    /// through vector lanes, others through i128.
    #[inline(always)]
    fn context<A: Acc>(&self, h: usize, hd: usize, sums: &[A], out: &mut [u8]) {
        let (m, z) = (&self.m_ctx[h * hd..][..hd], &self.z_c[h * hd..][..hd]);
        let columns = self.ctx_columns.as_ref().map(|c| &c[h]);
        let (mut x, mut t) = (vec![0i32; hd], vec![0i64; hd]);
        for (o, row) in out.chunks_exact_mut(hd).zip(sums.chunks_exact(hd)) {
            let big = row.iter().fold(0u64, |b, &a| b | a.into().unsigned_abs());
            match columns {
                Some(columns) if big < 1 << 31 => {
                    x.iter_mut().zip(row).for_each(|(x, &a)| *x = a.into() as i32);
                    columns.row(&x, &mut t);
                }
                _ => t.iter_mut().zip(row).zip(m).for_each(|((t, &a), m)| *t = m.apply(a.into())),
            }
            for ((o, &t), &z) in o.iter_mut().zip(&t).zip(z) {
                *o = clamp_code(t + i64::from(z), self.hi_c);
            }
        }
    }
}

/// The sites of an attention op.
pub(crate) struct AttentionSites<'a> {
    pub(crate) qkv: &'a Grid,
    pub(crate) scores: &'a Grid,
    /// The site whose scale Log-Int-Softmax reads.
    pub(crate) lis: &'a Grid,
    pub(crate) out_site: &'a str,
}

/// Attention over `n` tokens (an image, or a window) of `c3` qkv channels.
#[allow(clippy::float_arithmetic)] // load time
pub(crate) fn compile(
    art: &Artifact,
    site: &AttentionSites<'_>,
    n: usize,
    c3: usize,
    heads: usize,
    lis_bits: LisBits,
    err: &impl Fn(String) -> Error,
) -> Result<(Attention, Grid)> {
    let layer_wise = |g: &Grid, what: &str| check_layer_wise(g, what, err);
    let (g, ga) = (site.qkv, site.scores);
    layer_wise(g, "qkv")?;
    layer_wise(ga, "scores")?;
    let d = c3 / 3;
    if !c3.is_multiple_of(3) || heads == 0 || !d.is_multiple_of(heads) {
        return Err(err(format!("{c3} qkv channels do not split into 3 × {heads} heads")));
    }
    if n > MAX_ROW {
        return Err(err(format!("{n} tokens exceed Log-Int-Softmax's {MAX_ROW}")));
    }
    let s_lis = site.lis.scale[0];
    if s_lis < MIN_SCALE {
        return Err(err(format!(
            "site {}: scale {s_lis} is below Log-Int-Softmax's {MIN_SCALE}",
            site.lis.name
        )));
    }
    let gc = Grid::read(art, site.out_site)?;
    if !gc.fits(d) {
        return Err(err(format!("site {} does not fit {d} channels", site.out_site)));
    }
    // The simulation multiplies a float32 tensor by head_dim^-½ as a float32 scalar.
    let head_scale = f64::from(((d / heads) as f64).powf(-0.5) as f32);
    let s = f64::from(g.scale[0]);
    let k_max = ((1u32 << lis_bits.get().min(5)) - 1).min(30);
    let m_ctx: Vec<Dyadic> = (0..d)
        .map(|c| dyadic(s * 2f64.powi(-(k_max as i32)) / f64::from(gc.scale(c)), err))
        .collect::<Result<_>>()?;
    let m_scores = small(dyadic(s * s * head_scale / f64::from(ga.scale[0]), err)?, err)?;
    let score_columns = Columns::new(&[m_scores.m], &[0], &[m_scores.shift]).ok();
    let hd = d / heads;
    let ctx_columns = (0..heads)
        .map(|h| {
            let m: &[Dyadic] = &m_ctx[h * hd..][..hd];
            let (mm, shift): (Vec<i64>, Vec<u32>) = m.iter().map(|d| (d.m, d.shift)).unzip();
            Columns::new(&mm, &vec![0; hd], &shift).ok()
        })
        .collect();
    let att = Attention {
        heads,
        z: g.zero_point[0],
        m_scores,
        score_columns,
        ctx_columns,
        z_a: ga.zero_point[0],
        hi_a: ga.hi(),
        lis: ExpTable::new(LisConstants::new(s_lis)),
        bits: lis_bits.get(),
        k_max,
        m_ctx,
        z_c: (0..d).map(|c| gc.zero_point(c)).collect(),
        hi_c: gc.hi(),
        windows: None,
    };
    Ok((att, gc))
}

#[allow(clippy::float_arithmetic)]
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn planes_equal_the_shifts(
            n in 0usize..40, hd in 1usize..20, k_max in prop_oneof![Just(15u32), Just(30), 0u32..31],
            z in 0i32..256, rare in 1u32..64, seed in any::<u64>(),
        ) {
            let mut lcg = fqvit_testkit::lcg(seed);
            let mut next = move || (lcg() >> 33) as u32;
            // Codes up to k_max + 2, so that dropped ones occur; one in `rare` drawn from the
            // whole range, the others within 7 of k_max (so the upper planes go sparse).
            let k: Vec<u16> = (0..n * n)
                .map(|_| {
                    let kc = if next() % rare == 0 { next() % (k_max + 3) } else {
                        (k_max + 2).saturating_sub(next() % 10)
                    };
                    kc as u16
                })
                .collect();
            let v: Vec<u8> = (0..n * hd).map(|_| next() as u8).collect();
            let want = attn_v_reference(&k, &v, z, hd, k_max);
            // A task's query rows alone: the first `rows` of them.
            let rows = (next() as usize) % (n + 1);
            for kernel in Kernel::supported() {
                prop_assert_eq!(attn_v(&kernel, &k, &v, z, hd, k_max), want.clone(), "{}", kernel.name());
                let part = attn_v(&kernel, &k[..rows * n], &v, z, hd, k_max);
                prop_assert_eq!(&part[..], &want[..rows * hd], "{} rows {}", kernel.name(), rows);
            }
        }
    }

    #[test]
    fn extremes_hold() {
        // Every weight the largest, every value the farthest from the zero point: in i64 (30
        // fixed-point bits), and in i32 on the most tokens it holds at 4-bit codes' 15.
        assert!(fits_i32(255, 15) && !fits_i32(256, 15) && !fits_i32(2, 30));
        for (n, k_max) in [(300, 30), (255, 15)] {
            let hd = 8;
            for kernel in Kernel::supported() {
                for (v, z) in [(255u8, 0), (0, 255)] {
                    let out = attn_v(&kernel, &vec![0; n * n], &vec![v; n * hd], z, hd, k_max);
                    let want = ((i64::from(v) - i64::from(z)) * (n as i64)) << k_max;
                    assert!(out.iter().all(|&x| x == want), "{} n {n}", kernel.name());
                }
            }
        }
    }

    /// One scratch serves heads of any size in turn, each sum as the reference's, on both
    /// sides of the i32 bound (sparse upper planes, then dense ones).
    #[test]
    fn scratch_is_reused_across_heads() {
        let mut next = fqvit_testkit::lcg(5);
        let mut s = AttnVScratch::default();
        for (n, hd, k_max, upper_every) in [(197, 64, 15, 40), (49, 32, 15, 2), (60, 16, 30, 3)] {
            let k: Vec<u16> = (0..n * n)
                .map(|i| {
                    if i % upper_every == 0 { (next() % 8) as u16 } else { 8 + (next() % 9) as u16 }
                })
                .collect();
            let v: Vec<u8> = (0..n * hd).map(|_| (next() >> 56) as u8).collect();
            let want = attn_v_reference(&k, &v, 37, hd, k_max);
            for kernel in Kernel::supported() {
                let got: Vec<i64> = if fits_i32(n, k_max) {
                    let mut out = vec![0i32; n * hd];
                    attn_v_lanes(&kernel, &k, &v, 37, hd, k_max, &mut s, &mut out);
                    out.into_iter().map(i64::from).collect()
                } else {
                    let mut out = vec![0i64; n * hd];
                    attn_v_lanes(&kernel, &k, &v, 37, hd, k_max, &mut s, &mut out);
                    out
                };
                assert_eq!(got, want, "{} n {n} hd {hd}", kernel.name());
            }
        }
    }
}
