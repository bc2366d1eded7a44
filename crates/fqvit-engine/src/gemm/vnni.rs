//! The exact u8 × i8 kernel for x86 CPUs with AVX-512 VNNI: `vpdpbusd` multiplies 64 u8 × i8
//! pairs and adds each group of four products into an i32 lane, without saturation:
//! `|Σ of 4| ≤ 4 · 255 · 128 < 2^18`, and the i32 accumulators hold `K ≤ 2^16` products as the
//! other kernels do ([`super::MAX_K`]).
//!
//! Register tile: [`MR`] rows × [`NR`] output channels (two 16-lane i32 accumulators per row).
//! Per four reduction steps it loads the panel's 32 × 4 weight bytes once and broadcasts each
//! row's four activation bytes, so the activations need no packing: a row's bytes are read as
//! u32 words where `K` is a multiple of 4, and copied with zero padding otherwise.
//!
//! `std::arch`'s VNNI intrinsics have no safe wrapper in `pulp`; the one unsafe call below enters
//! the target-feature function with the CPU's features proven by [`Vnni`].
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m512i, _mm512_dpbusd_epi32, _mm512_set1_epi32, _mm512_setzero_si512};

/// Output channels per panel: two 512-bit registers of i32 lanes.
pub(super) const NR: usize = 32;
/// Rows per register tile: 12 × 2 accumulators, 2 weight registers and a broadcast use 27 of
/// the 32 registers.
const MR: usize = 12;

/// Proof that this CPU runs AVX-512 F, BW and VNNI (made only by [`available`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Vnni(());

/// The CPU's VNNI token, if it has AVX-512 VNNI.
pub(super) fn available() -> Option<Vnni> {
    #[cfg(target_arch = "x86_64")]
    {
        let has = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni");
        has.then_some(Vnni(()))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Weights packed for this kernel: for panel `j` (channels `32j..32j + 32`) and quad `q`
/// (reduction steps `4q..4q + 4`), `panels[j · quads + q][l]` holds lane `l`'s four codes
/// `w[32j + l][4q..4q + 4]` as the bytes of one little-endian word (zero past `N` and `K`).
#[derive(Default)]
pub(super) struct Packed {
    panels: Vec<[u32; NR]>,
    quads: usize,
}

/// Four codes as the word `vpdpbusd` reads, the first in the low byte.
#[inline(always)]
fn word(b: [i8; 4]) -> u32 {
    u32::from_le_bytes(b.map(|x| x as u8))
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
        self.quads = k.div_ceil(4);
        self.panels.clear();
        self.panels.resize(n.div_ceil(NR) * self.quads, [0; NR]);
    }

    /// Packs `(n, k)` row-major codes into this buffer.
    pub(super) fn fill(&mut self, codes: &[i8], n: usize, k: usize) {
        self.reset(n, k);
        let quads = self.quads;
        for (c, row) in codes.chunks_exact(k.max(1)).enumerate().take(n) {
            let (panel, lane) = (&mut self.panels[c / NR * quads..][..quads], c % NR);
            let (whole, tail) = row.split_at(k - k % 4);
            for (dst, four) in panel.iter_mut().zip(whole.chunks_exact(4)) {
                dst[lane] = word([four[0], four[1], four[2], four[3]]);
            }
            if !tail.is_empty() {
                let mut b = [0i8; 4];
                b[..tail.len()].copy_from_slice(tail);
                panel[quads - 1][lane] = word(b);
            }
        }
    }

    /// Packs the codes given transposed, `t` `(k, n)` row-major (`w[c][i] = t[i][c]`: an
    /// attention head's values, tokens by channels), into this buffer.
    pub(super) fn fill_transposed(&mut self, t: &[i8], n: usize, k: usize) {
        self.reset(n, k);
        let quads = self.quads;
        let zero = vec![0i8; n];
        for (q, steps) in t.chunks(4 * n.max(1)).enumerate() {
            let row = |i: usize| steps.get(i * n..(i + 1) * n).unwrap_or(&zero);
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            for (j, c0) in (0..n).step_by(NR).enumerate() {
                let lanes = &mut self.panels[j * quads + q][..NR.min(n - c0)];
                for (l, dst) in lanes.iter_mut().enumerate() {
                    let c = c0 + l;
                    *dst = word([r0[c], r1[c], r2[c], r3[c]]);
                }
            }
        }
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.panels.len() * 4 * NR
    }
}

/// `out[i][c] = Σ_k a[i][k] · w[c][k]` for the rows `a` `(m, k)`, on this thread; `quads`
/// is scratch for the rows as u32 words (zero-padded to whole words). `_cpu` is the proof that
/// the CPU runs the kernel.
pub(super) fn block(
    _cpu: Vnni,
    a: &[u8],
    w: &Packed,
    n: usize,
    k: usize,
    quads: &mut Vec<u32>,
    out: &mut [i32],
) {
    let kq = w.quads;
    let m = a.len() / k;
    quads.clear();
    quads.reserve(m * kq);
    for row in a.chunks_exact(k) {
        let (whole, tail) = row.split_at(k - k % 4);
        quads.extend(whole.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        if !tail.is_empty() {
            let mut b = [0u8; 4];
            b[..tail.len()].copy_from_slice(tail);
            quads.push(u32::from_le_bytes(b));
        }
    }
    // SAFETY: `Vnni` is made only by `available`, after the CPU reported AVX-512 F, BW and
    // VNNI, which are all that `run` is compiled for.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        run(quads, kq, &w.panels, n, out)
    }
}

/// Every panel of the rows `a` (`kq` quads each).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn run(a: &[u32], kq: usize, panels: &[[u32; NR]], n: usize, out: &mut [i32]) {
    if kq == 0 {
        out.fill(0);
        return;
    }
    let m = a.len() / kq;
    for (j, panel) in panels.chunks_exact(kq).enumerate() {
        let cols = NR.min(n - j * NR);
        let mut i = 0;
        while i + MR <= m {
            let rows: [&[u32]; MR] = std::array::from_fn(|r| &a[(i + r) * kq..][..kq]);
            let acc = tile(rows, panel);
            store(&acc, &mut out[i * n + j * NR..], n, cols);
            i += MR;
        }
        while i + 4 <= m {
            let rows: [&[u32]; 4] = std::array::from_fn(|r| &a[(i + r) * kq..][..kq]);
            let acc = tile(rows, panel);
            store(&acc, &mut out[i * n + j * NR..], n, cols);
            i += 4;
        }
        while i < m {
            let acc = tile([&a[i * kq..][..kq]], panel);
            store(&acc, &mut out[i * n + j * NR..], n, cols);
            i += 1;
        }
    }
}

/// `R` rows of one panel: the register tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
fn tile<const R: usize>(a: [&[u32]; R], panel: &[[u32; NR]]) -> [[__m512i; 2]; R] {
    let mut acc = [[_mm512_setzero_si512(); 2]; R];
    // Equal lengths let the compiler drop the bounds checks of the loop.
    assert!(a.iter().all(|r| r.len() == panel.len()));
    for (q, w) in panel.iter().enumerate() {
        let [w0, w1]: [__m512i; 2] = pulp::cast(*w);
        for r in 0..R {
            let x = _mm512_set1_epi32(a[r][q] as i32);
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], x, w0);
            acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], x, w1);
        }
    }
    acc
}

/// Writes a tile's first `cols` channels of each row (rows `n` apart in `out`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn store<const R: usize>(acc: &[[__m512i; 2]; R], out: &mut [i32], n: usize, cols: usize) {
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
