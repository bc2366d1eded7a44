//! Attention in integers (ViT's, and Swin's in windows): q·kᵀ through the int8 GEMM, the
//! scores requantized, Log-Int-Softmax, and `attn · V` on its codes (`attn_v.rs`).

use std::time::{Duration, Instant};

use fqvit_ops::softmax::{ExpTable, LisConstants, log_int_softmax_local};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gemm::{Kernel, Weights, gemm_local, reuse};
use crate::grid::Grid;
use crate::load::{check_layer_wise, dyadic, small};
use crate::requant::Dyadic;
use crate::requant::{Columns, add_codes, clamp_code};
use fqvit_artifact::Artifact;
use fqvit_ops::softmax::{LisBits, MAX_ROW, MIN_SCALE};

mod attn_v;

use attn_v::{Acc, AttnVScratch, attn_v_lanes};
pub use attn_v::{attn_v, attn_v_reference, fits_i32};

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
    /// Log-Int-Softmax's integer exponential, from the scale of the site it reads (the
    /// scores' in ViT, the biased scores' in Swin) and the artifact's `lis_exp_shift`.
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
        reuse(&mut s.q, m * hd);
        reuse(&mut s.k, n * hd);
        reuse(&mut s.v, n * hd);
        reuse(&mut s.sq, m);
        reuse(&mut s.sk, n);
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
        reuse(&mut s.raw, m * n);
        s.wk.repack(kernel, &s.k, n, hd);
        gemm_local(kernel, &s.q, &s.wk, &mut s.raw);
        reuse(&mut s.x, m * n);
        self.scores(&s.raw, &s.sq, &s.sk, hd, &mut s.x);
        if let (Some(win), Some(w)) = (&self.windows, window) {
            win.bias_and_mask(h, w, queries.start, &mut s.x);
        }
        let mm = t.elapsed();
        let t = Instant::now();
        reuse(&mut s.codes, m * n);
        log_int_softmax_local(kernel.isa(), &s.x, n, &self.lis, self.bits, &mut s.codes);
        let sm = t.elapsed();
        let t = Instant::now();
        let mut out = vec![0u8; m * hd];
        if fits_i32(n, self.k_max) {
            reuse(&mut s.sums32, m * hd);
            attn_v_lanes(kernel, &s.codes, &s.v, self.z, hd, self.k_max, &mut s.av, &mut s.sums32);
            self.context(h, hd, &s.sums32, &mut out);
        } else {
            reuse(&mut s.sums64, m * hd);
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
    let (s_lis, shift) = (site.lis.scale[0], art.lis_exp_shift());
    // The exponential's grid, exact (a power of two).
    let s_exp = s_lis * (-(shift.get() as f32)).exp2();
    if s_exp < MIN_SCALE {
        return Err(err(format!(
            "site {}: scale {s_lis} (Log-Int-Softmax's exponential on {s_exp}, lis_exp_shift \
             {shift}) is below Log-Int-Softmax's {MIN_SCALE}",
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
        lis: ExpTable::new(LisConstants::shifted(s_lis, shift)),
        bits: lis_bits.get(),
        k_max,
        m_ctx,
        z_c: (0..d).map(|c| gc.zero_point(c)).collect(),
        hi_c: gc.hi(),
        windows: None,
    };
    Ok((att, gc))
}
