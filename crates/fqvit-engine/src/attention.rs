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

use fqvit_ops::softmax::{LisConstants, log_int_softmax_with};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gemm::{Kernel, Weights, gemm_local};
use crate::grid::Grid;
use crate::load::{check_layer_wise, dyadic, small};
use crate::requant::Dyadic;
use crate::requant::{Columns, add_codes, clamp_code};
use fqvit_artifact::Artifact;
use fqvit_ops::softmax::{LisBits, MAX_ROW, MIN_SCALE};

/// The reference: `out[i·hd + e] = Σ_j (v[j·hd + e] − z) << (k_max − k[i·n + j])`.
pub fn attn_v_reference(k: &[u16], v: &[u8], z: i32, hd: usize, k_max: u32) -> Vec<i64> {
    let n = v.len() / hd.max(1);
    let mut out = vec![0i64; n * hd];
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

/// The fast path: the byte planes through the int8 GEMM. Same arguments and result as
/// [`attn_v_reference`], and the kernel.
pub fn attn_v(kernel: &Kernel, k: &[u16], v: &[u8], z: i32, hd: usize, k_max: u32) -> Vec<i64> {
    // Compiled for the kernel's instruction set: its loops are most of attention's time.
    kernel.arch().dispatch(|| attn_v_lanes(kernel, k, v, z, hd, k_max))
}

#[inline(always)]
fn attn_v_lanes(kernel: &Kernel, k: &[u16], v: &[u8], z: i32, hd: usize, k_max: u32) -> Vec<i64> {
    assert!(k_max <= 30, "attn·v: {k_max} fixed-point bits");
    let n = v.len() / hd.max(1);
    assert_eq!(k.len(), n * n, "attn·v: {} probabilities for {n} tokens", k.len());
    if n == 0 || hd == 0 {
        return vec![0; n * hd];
    }
    let planes = k_max as usize / 8 + 1;
    // e = k_max − k ≥ 8: the entries of the planes above the first.
    let upper = |kc: u16| u32::from(kc) + 8 <= k_max;
    let sparse = planes > 1 && k.iter().filter(|&&kc| upper(kc)).count() * 16 <= n * n;
    let planes = if sparse { 1 } else { planes };
    // Plane b of row i holds 2^(e − 8b) where e lies in [8b, 8b + 8), else 0: one branch-free
    // pass per plane, which also sums each row (at most n · 128).
    let mut p = vec![0u8; planes * n * n];
    let mut row_sums = vec![0i64; planes * n];
    for (b, (plane, sums)) in
        p.chunks_exact_mut(n * n).zip(row_sums.chunks_exact_mut(n)).enumerate()
    {
        let low = 8 * b as u32;
        for ((plane, k), sum) in plane.chunks_exact_mut(n).zip(k.chunks_exact(n)).zip(sums) {
            let mut total = 0u32;
            for (p, &kc) in plane.iter_mut().zip(k) {
                let e = k_max.wrapping_sub(u32::from(kc)).wrapping_sub(low);
                // In u32 lanes: x86 has no byte shifts.
                let w = if e < 8 { 1u32 << e } else { 0 };
                *p = w as u8;
                total += w;
            }
            *sum = i64::from(total);
        }
    }
    // (v − 128) as int8 "weights" `(hd, n)`: channel e's row holds token j's value.
    let mut w = vec![0i8; hd * n];
    for (j, row) in v.chunks_exact(hd).enumerate() {
        for (e, &x) in row.iter().enumerate() {
            w[e * n + j] = (i32::from(x) - 128) as i8;
        }
    }
    let mut g = vec![0i32; planes * n * hd];
    gemm_local(kernel, &p, &Weights::new(kernel, w, hd, n), &mut g);
    let zero_point = 128 - i64::from(z);
    let mut out = vec![0i64; n * hd];
    for (b, (plane, sums)) in g.chunks_exact(n * hd).zip(row_sums.chunks_exact(n)).enumerate() {
        for ((o, g), &sum) in out.chunks_exact_mut(hd).zip(plane.chunks_exact(hd)).zip(sums) {
            let row = zero_point * sum;
            for (o, &x) in o.iter_mut().zip(g) {
                *o += (i64::from(x) + row) << (8 * b);
            }
        }
    }
    if sparse {
        let z = i64::from(z);
        for (o, k) in out.chunks_exact_mut(hd).zip(k.chunks_exact(n)) {
            for (row, &kc) in v.chunks_exact(hd).zip(k).filter(|&(_, &kc)| upper(kc)) {
                let e = k_max - u32::from(kc);
                for (o, &x) in o.iter_mut().zip(row) {
                    *o += (i64::from(x) - z) << e;
                }
            }
        }
    }
    out
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
    /// Log-Int-Softmax's integer constants, from the scale of its input site.
    pub(crate) lis: LisConstants,
    pub(crate) bits: u32,
    /// Fixed-point bits of the probabilities `2^-k` in `attn · v`.
    pub(crate) k_max: u32,
    pub(crate) m_ctx: Vec<Dyadic>,
    /// `m_scores` in vector form over a row of `n` scores, where its shift allows.
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
    /// Head `h`'s scores `x` (less their zero point) of window `w` plus the bias, on the biased
    /// site less its zero point, then masked.
    fn bias_and_mask(&self, h: usize, w: usize, x: &mut [i32]) {
        let nn = self.n * self.n;
        for (x, &t) in x.iter_mut().zip(&self.table[h * nn..][..nn]) {
            let t = i64::from(t) - i64::from(self.z_t);
            let hi = i64::from(self.hi_b);
            let sum = add_codes(i64::from(*x), self.m_a, t, self.m_t, self.z_b, hi);
            *x = sum as i32 - self.z_b;
        }
        if let Some(mask) = &self.mask {
            for (x, &m) in x.iter_mut().zip(&mask[w * nn..][..nn]) {
                if m {
                    *x += self.mask_steps;
                }
            }
        }
    }
}

impl Attention {
    /// `(N, 3D)` qkv codes of one image to `(N, D)` context codes, with the time spent in
    /// matmuls and in the softmax (summed over threads).
    pub(crate) fn run(
        &self,
        kernel: &Kernel,
        qkv: &[u8],
        n: usize,
    ) -> (Vec<u8>, Duration, Duration) {
        let Some(win) = &self.windows else { return self.heads_of(kernel, qkv, n, None) };
        let (c3, wn) = (qkv.len() / n, win.n);
        let d = c3 / 3;
        let per_window: Vec<(Vec<u8>, Duration, Duration)> = (0..n / wn)
            .into_par_iter()
            .map(|w| {
                let mut x = Vec::with_capacity(wn * c3);
                for &t in &win.tokens[w * wn..][..wn] {
                    x.extend_from_slice(&qkv[t * c3..][..c3]);
                }
                self.heads_of(kernel, &x, wn, Some(w))
            })
            .collect();
        let (mut mm, mut sm) = (Duration::ZERO, Duration::ZERO);
        let mut windowed = Vec::with_capacity(n * d);
        for (ctx, a, b) in per_window {
            windowed.extend_from_slice(&ctx);
            mm += a;
            sm += b;
        }
        (fqvit_program::windows::scatter(&windowed, &win.tokens, d), mm, sm)
    }

    /// Every head of `n` tokens (an image, or window `window` of Swin's).
    fn heads_of(
        &self,
        kernel: &Kernel,
        qkv: &[u8],
        n: usize,
        window: Option<usize>,
    ) -> (Vec<u8>, Duration, Duration) {
        let d = qkv.len() / n / 3;
        let hd = d / self.heads;
        let arch = kernel.arch();
        let per_head: Vec<(Vec<u8>, Duration, Duration)> = (0..self.heads)
            .into_par_iter()
            .map(|h| {
                arch.dispatch(|| {
                    let t = Instant::now();
                    // One pass over the tokens: q, k − 128 as int8 "weights" (so that the
                    // u8 × i8 GEMM takes q·kᵀ: Σ(q − z)(k − z) = Σ q·(k − 128) + (128 − z)·Σq
                    // − z·Σk + hd·z², each term below 2^31 in magnitude for hd < 2^15), v, and
                    // the row sums of q and k.
                    let (mut q, mut k, mut v) =
                        (vec![0u8; n * hd], vec![0i8; n * hd], vec![0u8; n * hd]);
                    let (mut sq, mut sk) = (vec![0i64; n], vec![0i64; n]);
                    let sum = |x: &[u8]| x.iter().map(|&x| u32::from(x)).sum::<u32>();
                    for (i, token) in qkv.chunks_exact(3 * d).enumerate() {
                        let part = |p: usize| &token[p * d + h * hd..][..hd];
                        let (qi, ki) = (part(0), part(1));
                        q[i * hd..][..hd].copy_from_slice(qi);
                        for (k, &x) in k[i * hd..][..hd].iter_mut().zip(ki) {
                            *k = (x ^ 0x80) as i8;
                        }
                        v[i * hd..][..hd].copy_from_slice(part(2));
                        (sq[i], sk[i]) = (i64::from(sum(qi)), i64::from(sum(ki)));
                    }
                    let mut raw = vec![0i32; n * n];
                    gemm_local(kernel, &q, &Weights::new(kernel, k, n, hd), &mut raw);
                    let mut x = vec![0i32; n * n];
                    arch.dispatch(Scores {
                        att: self,
                        raw: &raw,
                        sq: &sq,
                        sk: &sk,
                        hd,
                        out: &mut x,
                    });
                    if let (Some(win), Some(w)) = (&self.windows, window) {
                        win.bias_and_mask(h, w, &mut x);
                    }
                    let mm = t.elapsed();
                    let t = Instant::now();
                    let mut k_codes = vec![0u16; n * n];
                    log_int_softmax_with(kernel.isa(), &x, n, &self.lis, self.bits, &mut k_codes);
                    let sm = t.elapsed();
                    let t = Instant::now();
                    let sums = attn_v(kernel, &k_codes, &v, self.z, hd, self.k_max);
                    let mut out = vec![0u8; n * hd];
                    arch.dispatch(Context { att: self, h, hd, sums: &sums, out: &mut out });
                    (out, mm + t.elapsed(), sm)
                })
            })
            .collect();
        let mut out = vec![0u8; n * d];
        let (mut mm_all, mut sm_all) = (Duration::ZERO, Duration::ZERO);
        for (h, (codes, mm, sm)) in per_head.into_iter().enumerate() {
            for i in 0..n {
                out[i * d + h * hd..][..hd].copy_from_slice(&codes[i * hd..][..hd]);
            }
            mm_all += mm;
            sm_all += sm;
        }
        (out, mm_all, sm_all)
    }
}

/// One head's score requantization: `Σ(q − z)(k − z)` from the raw `Σ q·(k − 128)` and the row
/// sums, onto the scores site, less its zero point. `|Σ(q − z)(k − z)| ≤ 255²·hd < 2^31`, so
/// [`Dyadic::apply_small`] holds it.
struct Scores<'a> {
    att: &'a Attention,
    raw: &'a [i32],
    sq: &'a [i64],
    sk: &'a [i64],
    hd: usize,
    out: &'a mut [i32],
}

impl pulp::WithSimd for Scores<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Scores { att, raw, sq, sk, hd, out } = self;
        let n = sk.len();
        let z = i64::from(att.z);
        let constant = hd as i64 * z * z;
        let (m, z_a) = (att.m_scores, i64::from(att.z_a));
        let columns = att.score_columns.as_ref().filter(|c| c.len() == n);
        let (mut s, mut t) = (vec![0i32; n], vec![0i64; n]);
        for ((x, raw), &sq) in out.chunks_exact_mut(n).zip(raw.chunks_exact(n)).zip(sq) {
            let row = (128 - z) * sq + constant;
            for ((s, &r), &sk) in s.iter_mut().zip(raw).zip(sk) {
                *s = (i64::from(r) + row - z * sk) as i32;
            }
            match columns {
                Some(columns) => columns.row(&s, &mut t),
                None => t.iter_mut().zip(&s).for_each(|(t, &s)| *t = m.apply_small(i64::from(s))),
            }
            for (x, &t) in x.iter_mut().zip(&t) {
                *x = (clamp_code(t + z_a, att.hi_a) as i32) - att.z_a;
            }
        }
    }
}

/// One head's context requantization: `Σ_j 2^(K − k_ij)(v_j − z)` onto the context site. Rows
/// whose sums lie below 2^30 (all, with 4-bit Log-Int-Softmax: `N · 2^15 · 255 < 2^30` for
/// `N ≤ 128`, and in practice far more) go through vector lanes, others through i128.
struct Context<'a> {
    att: &'a Attention,
    h: usize,
    hd: usize,
    sums: &'a [i64],
    out: &'a mut [u8],
}

impl pulp::WithSimd for Context<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Context { att, h, hd, sums, out } = self;
        let (m, z) = (&att.m_ctx[h * hd..][..hd], &att.z_c[h * hd..][..hd]);
        let columns = att.ctx_columns.as_ref().map(|c| &c[h]);
        let (mut x, mut t) = (vec![0i32; hd], vec![0i64; hd]);
        for (o, row) in out.chunks_exact_mut(hd).zip(sums.chunks_exact(hd)) {
            let big = row.iter().fold(0u64, |b, &a| b | a.unsigned_abs());
            match columns {
                Some(columns) if big < 1 << 30 => {
                    x.iter_mut().zip(row).for_each(|(x, &a)| *x = a as i32);
                    columns.row(&x, &mut t);
                }
                _ => t.iter_mut().zip(row).zip(m).for_each(|((t, &a), m)| *t = m.apply(a)),
            }
            for ((o, &t), &z) in o.iter_mut().zip(&t).zip(z) {
                *o = clamp_code(t + i64::from(z), att.hi_c);
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
    let score_columns =
        Columns::new(&vec![m_scores.m; n], &vec![0; n], &vec![m_scores.shift; n]).ok();
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
        lis: LisConstants::new(s_lis),
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
            for kernel in Kernel::supported() {
                prop_assert_eq!(attn_v(&kernel, &k, &v, z, hd, k_max), want.clone(), "{}", kernel.name());
            }
        }
    }

    #[test]
    fn extremes_hold() {
        // Every weight the largest, every value the farthest from the zero point.
        let (n, hd) = (300, 8);
        for kernel in Kernel::supported() {
            for (v, z) in [(255u8, 0), (0, 255)] {
                let out = attn_v(&kernel, &vec![0; n * n], &vec![v; n * hd], z, hd, 30);
                let want = ((i64::from(v) - i64::from(z)) * (n as i64)) << 30;
                assert!(out.iter().all(|&x| x == want), "{}", kernel.name());
            }
        }
    }
}
