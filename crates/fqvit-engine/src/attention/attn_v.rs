//! `attn · V` with Log-Int-Softmax codes: `Σ_j 2^(K − k_ij) · (v_j − z)` for every query `i`
//! and channel `e`, with `K` the probabilities' fixed-point bits (`2^-k` is `2^(K − k)` steps
//! of `2^-K`) and codes `k > K` dropped.
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
//! `K ≤ 30` and `N < 2^24`. With the AVX2 pair kernel, whose operands are 16 bits wide anyway,
//! 4-bit codes take one 16-bit plane instead ([`wide_plane`]). All compute the same integers.

use crate::gemm::{Kernel, Weights, gemm_local, gemm_wide_local, reuse};

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
pub(super) trait Acc:
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
pub(super) struct AttnVScratch {
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
        reuse(&mut self.vt, v.len());
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

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn attn_v_lanes<A: Acc>(
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
    reuse(&mut s.p, rows * n);
    reuse(&mut s.row_sums, rows);
    reuse(&mut s.upper, rows);
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
    reuse(&mut s.g, planes * rows * hd);
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
        let upper = |kc: u16| is_upper(k_max.wrapping_sub(u32::from(kc)));
        add_sparse(v, z, hd, k, &s.upper, &mut s.vz, out, upper, |kc| k_max - u32::from(kc));
    }
}

/// Adds `(v_j − z) << shift(k_ij)` to each row `i` of `out` for the tokens `j` whose code `k_ij`
/// is `picked`, visiting only the rows with a nonzero `counts[i]`; each row's picks are found
/// as bits, 64 tokens a mask (compared in vector lanes), without a branch per token.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn add_sparse<A: Acc>(
    v: &[u8],
    z: i32,
    hd: usize,
    k: &[u16],
    counts: &[u32],
    vz: &mut Vec<i32>,
    out: &mut [A],
    picked: impl Fn(u16) -> bool,
    shift: impl Fn(u16) -> u32,
) {
    let n = v.len() / hd;
    reuse(vz, n * hd);
    vz.iter_mut().zip(v).for_each(|(o, &x)| *o = i32::from(x) - z);
    for ((o, k), _) in
        out.chunks_exact_mut(hd).zip(k.chunks_exact(n)).zip(counts).filter(|(_, c)| **c > 0)
    {
        for (c, codes) in k.chunks(64).enumerate() {
            let mut mask =
                codes.iter().enumerate().fold(0u64, |m, (b, &kc)| m | u64::from(picked(kc)) << b);
            while mask != 0 {
                let j = 64 * c + mask.trailing_zeros() as usize;
                mask &= mask - 1;
                let e = shift(k[j]);
                let row = &vz[j * hd..][..hd];
                o.iter_mut().zip(row).for_each(|(o, &x)| *o += A::from(x) << e);
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
    reuse(&mut s.p16, rows * n);
    reuse(&mut s.row_sums, rows);
    reuse(&mut s.upper, rows);
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
    reuse(&mut s.g, rows * hd);
    gemm_wide_local(kernel, &s.p16, &s.w, &mut s.rows, &mut s.g);
    let zero_point = A::from(128 - z);
    for ((o, g), &sum) in out.chunks_exact_mut(hd).zip(s.g.chunks_exact(hd)).zip(&s.row_sums) {
        // `Σ a ≤ n · 2^15 < 2^24`, times `|128 − z| ≤ 128`.
        let row = zero_point * A::from(sum as i32);
        o.iter_mut().zip(g).for_each(|(o, &x)| *o = A::from(x) + row);
    }
    // The probabilities of 1 (k = 0 with 15 fixed-point bits): rare, one step each.
    if s.upper.iter().any(|&c| c > 0) {
        let one = |kc: u16| k_max.wrapping_sub(u32::from(kc)) == 15;
        add_sparse(v, z, hd, k, &s.upper, &mut s.vz, out, one, |_| 0);
    }
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
