//! Compiling program ops into integer constants, and executing them.
//!
//! Activations are u8 codes `(B, rows, cols)` on their site's grid (the image: rows = 3
//! channels, cols = pixels). Integer bounds per op are stated where the op is prepared.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fqvit_ops::layer_norm::integer::IntegerLayerNorm;
use fqvit_ops::layer_norm::{InScale, LayerNormParams};
use fqvit_ops::softmax::{MAX_ROW, MIN_SCALE};
use fqvit_ops::{BitType, PtfFactor, dequantize, quantize};
use fqvit_program::{Op, Program};
use rayon::prelude::*;

use crate::artifact::Artifact;
use crate::attention::{Attention, Windows};
use crate::error::{Error, Result};
use crate::gelu::{Buckets, FRACTION_BITS, GeluTable};
use crate::gemm::{Kernel, Weights, gemm};
use crate::grid::Grid;
use crate::requant::{Dyadic, round_shift_i64};

/// Time spent per kind of work, summed over calls.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// Seconds by kind: `gemm`, `requant`, `gelu` (fc1's epilogue), `layer-norm`,
    /// `attention-matmul`, `softmax`, `add`, `other`.
    pub by_kind: BTreeMap<&'static str, Duration>,
    /// Multiply-adds done by the dense layers' GEMMs (the time of `gemm`).
    pub gemm_macs: u64,
}

impl Timings {
    fn add(&mut self, kind: &'static str, since: Instant) {
        *self.by_kind.entry(kind).or_default() += since.elapsed();
    }
}

/// The input side of a dense layer: real input = `scale · (code − zp_num / den)`, with the
/// accumulator kept as `den · Σ code·w − zp_num · Σ w` so that a half-integer zero point (ViT's
/// 0.5/0.5 normalization: zero point 127.5) stays integer.
///
/// A PTF input (GELU's output under `ptf-sites = ["mlp-hidden"]`) has per channel `k` the
/// scale `scale · 2^shift_k`: its codes enter the GEMM shifted, `code · 2^shift_k`, as two byte
/// planes ([`Dense::run`]).
#[derive(Clone, Debug)]
struct InGrid {
    scale: f64,
    zp_num: i64,
    den: i64,
    shifts: Option<Vec<u8>>,
}

impl InGrid {
    /// The grid of a code value: layer-wise, or PTF with one zero point (`k` channels).
    fn of(g: &Grid, k: usize) -> Result<InGrid, String> {
        let shifts = match ln_scale(g, k)? {
            LnScale::Layer(_) => None,
            LnScale::Ptf { factors, .. } => {
                let min = factors.iter().map(|f| f.get()).min().unwrap_or(0);
                Some(factors.iter().map(|f| f.get() - min).collect::<Vec<u8>>())
            }
        };
        if g.zero_point.len() != 1 {
            return Err(format!("input site {} has one zero point per channel", g.name));
        }
        let scale = match &shifts {
            None => f64::from(g.scale[0]),
            Some(shifts) => {
                let j = shifts.iter().position(|&s| s == 0).expect("the smallest factor");
                f64::from(g.scale[j])
            }
        };
        Ok(InGrid { scale, zp_num: i64::from(g.zero_point[0]), den: 1, shifts })
    }
}

/// What a dense layer does with its requantized accumulator `t`.
#[derive(Debug)]
enum Epilogue {
    /// `t` is on the out-site's grid: `clamp(t + z_o)`.
    Requant { zero_point: Vec<i32> },
    /// `t` is on GELU's fixed-point grid: its thresholds give the code.
    Gelu { table: Buckets },
    /// GELU onto a PTF site: column `j`'s `t` is on the grid of its own scale, whose
    /// thresholds are `tables[which[j]]` (one table per distinct factor).
    GeluPtf { tables: Vec<Buckets>, which: Vec<u8> },
}

impl Epilogue {
    /// Where its time is counted in [`Timings`].
    fn kind(&self) -> &'static str {
        match self {
            Epilogue::Gelu { .. } | Epilogue::GeluPtf { .. } => "gelu",
            Epilogue::Requant { .. } => "requant",
        }
    }

    /// The code of column `j` from its requantized accumulator `t`.
    #[inline(always)]
    fn code(&self, j: usize, t: i64) -> u8 {
        match self {
            Epilogue::Requant { zero_point } => clamp_u8(t + i64::from(zero_point[j])),
            Epilogue::Gelu { table } => table.code(t),
            Epilogue::GeluPtf { tables, which } => tables[usize::from(which[j])].code(t),
        }
    }
}

/// A convolution or linear layer in integers: per output column `j`,
/// `t = round_half_even((den·acc·m_j + c_j) / 2^shift_j)`, with `m_j · 2^-shift_j` the dyadic
/// form of `s_in·s_w/s_t` and `c_j = (b_j/(s_in·s_w) − zp_num·Σw_j)·m_j` rounded: the bias and
/// the input zero point's correction in one constant, the bias kept to `2^-shift` of a
/// step of `t`.
///
/// Bounds, checked at load: `K·den ≤ 2^14`, so `|den·acc| ≤ 255·128·2^14 < 2^29`;
/// `m < 2^31`, so `|den·acc·m| < 2^60`; `|c| < 2^61`; the sum stays below `2^62`, inside i64,
/// and `shift ≤ 62`.
#[derive(Debug)]
pub(crate) struct Dense {
    w: Weights,
    input: InGrid,
    m: Vec<i64>,
    c: Vec<i64>,
    shift: Vec<u32>,
    epilogue: Epilogue,
}

/// The dense epilogue over whole rows, compiled for the detected instruction set.
struct Epilogues<'a> {
    dense: &'a Dense,
    acc: &'a [i32],
    out: &'a mut [u8],
}

impl pulp::WithSimd for Epilogues<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Epilogues { dense: d, acc, out } = self;
        let n = d.w.n;
        let den = d.input.den;
        // Zipped slices of one length: no bounds checks, so the loop vectorises.
        let consts = || d.m.iter().zip(&d.c).zip(&d.shift);
        let t = |a: i32, ((&m, &c), &s): ((&i64, &i64), &u32)| {
            round_shift_i64(den * i64::from(a) * m + c, s)
        };
        for (o, acc) in out.chunks_exact_mut(n).zip(acc.chunks_exact(n)) {
            match &d.epilogue {
                Epilogue::Requant { zero_point } => {
                    for ((o, &a), (k, &z)) in o.iter_mut().zip(acc).zip(consts().zip(zero_point)) {
                        *o = clamp_u8(t(a, k) + i64::from(z));
                    }
                }
                Epilogue::Gelu { table } => {
                    for ((o, &a), k) in o.iter_mut().zip(acc).zip(consts()) {
                        *o = table.code(t(a, k));
                    }
                }
                Epilogue::GeluPtf { tables, which } => {
                    for ((o, &a), (k, &w)) in o.iter_mut().zip(acc).zip(consts().zip(which)) {
                        *o = tables[usize::from(w)].code(t(a, k));
                    }
                }
            }
        }
    }
}

/// A residual add: `clamp(round(((a − z_a)·m_a + (b − z_b)·m_b) / 2^ADD_SHIFT) + z_o)`.
#[derive(Debug)]
pub(crate) struct AddConsts {
    za: Vec<i32>,
    zb: Vec<i32>,
    ma: Vec<i64>,
    mb: Vec<i64>,
    zo: Vec<i32>,
}

/// Fraction bits of the residual multipliers: ratios below 2^20 keep `255 · m < 2^58`.
pub(crate) const ADD_SHIFT: u32 = 30;

/// One compiled op.
#[derive(Debug)]
pub(crate) enum Compiled {
    Image,
    QuantizeImage {
        table: Box<[[u8; 256]; 3]>,
    },
    PatchEmbed {
        dense: Dense,
        patch: usize,
        side: usize,
    },
    Embed {
        m: Vec<Dyadic>,
        z_in: i32,
        ze: Vec<i32>,
        cls: Vec<u8>,
        pos: Vec<u8>,
        add: AddConsts,
    },
    LayerNorm {
        /// Every per-token step in integers (σ by an integer square root).
        ln: IntegerLayerNorm,
        z_out: i32,
    },
    Linear {
        dense: Dense,
    },
    Attention(Box<Attention>),
    PatchMerge {
        resolution: usize,
    },
    MeanTokens {
        m: Dyadic,
        z_in: i32,
        z_out: i32,
    },
    Add(AddConsts),
    SelectToken {
        index: usize,
    },
    Output {
        scale: Vec<f32>,
        zero_point: Vec<i32>,
    },
}

#[derive(Debug)]
pub(crate) enum LnScale {
    Layer(f32),
    Ptf { base: f32, factors: Vec<PtfFactor> },
}

impl Compiled {
    pub(crate) fn bytes(&self) -> usize {
        let dense = |d: &Dense| {
            let table = match &d.epilogue {
                Epilogue::Gelu { table } => table.bytes(),
                Epilogue::GeluPtf { tables, which } => {
                    tables.iter().map(Buckets::bytes).sum::<usize>() + which.len()
                }
                Epilogue::Requant { .. } => 0,
            };
            d.w.bytes() + 24 * d.w.n + table
        };
        match self {
            Compiled::PatchEmbed { dense: d, .. } | Compiled::Linear { dense: d } => dense(d),
            Compiled::Embed { cls, pos, .. } => cls.len() + pos.len(),
            Compiled::LayerNorm { ln, .. } => ln.bytes(),
            Compiled::Attention(a) => a.windows.as_ref().map_or(0, |w| {
                w.table.len() + w.mask.as_ref().map_or(0, Vec::len) + 8 * w.tokens.len()
            }),
            _ => 0,
        }
    }
}

/// The compiled ops and the classes of the output.
#[derive(Debug)]
pub(crate) struct Built {
    pub(crate) ops: Vec<Compiled>,
    pub(crate) classes: usize,
}

fn kind(op: &Op) -> &'static str {
    match op {
        Op::Image { .. } => "image",
        Op::QuantizeImage { .. } => "quantize-image",
        Op::PatchEmbed { .. } => "patch-embed",
        Op::Embed { .. } => "embed",
        Op::LayerNorm { .. } => "layer-norm",
        Op::Linear { .. } => "linear",
        Op::Attention { .. } => "attention",
        Op::WindowAttention { .. } => "window-attention",
        Op::PatchMerge { .. } => "patch-merge",
        Op::MeanTokens { .. } => "mean-tokens",
        Op::Add { .. } => "add",
        Op::SelectToken { .. } => "select-token",
        Op::Output { .. } => "output",
    }
}

/// Compiles every op; `shapes[v]` is `(rows, cols)` of value `v` per image.
pub(crate) fn compile(
    art: &Artifact,
    program: &Program,
    lis_bits: u32,
    kernel: &Kernel,
) -> Result<Built> {
    let mut shapes: Vec<(usize, usize)> = Vec::with_capacity(program.ops.len());
    let mut grids: Vec<Option<Grid>> = Vec::with_capacity(program.ops.len());
    let mut out = Vec::with_capacity(program.ops.len());
    let mut classes = 0;
    for (i, op) in program.ops.iter().enumerate() {
        let err = |reason: String| Error::Op { op: i, kind: kind(op), reason };
        let grid_of = |v: usize| grids[v].clone();
        let layer_wise = |g: &Grid, what: &str| check_layer_wise(g, what, &err);
        let (compiled, shape, grid) = match op {
            Op::Image { size, .. } => (Compiled::Image, (3, size * size), None),
            Op::QuantizeImage { input, site } => {
                let g = Grid::read(art, site)?;
                if !g.fits(3) {
                    return Err(err(format!("site {site} does not fit 3 channels")));
                }
                let Some(Op::Image { normalize: n, .. }) = program.ops.get(*input) else {
                    return Err(err("its input is not the image".into()));
                };
                let table = Box::new(std::array::from_fn(|c| {
                    std::array::from_fn(|p| {
                        let x = (p as f32 / 255.0 - n.mean[c]) / n.std[c];
                        quantize(x, g.scale(c), g.zero_point(c), BitType::UINT8) as u8
                    })
                }));
                (Compiled::QuantizeImage { table }, shapes[*input], Some(g))
            }
            Op::PatchEmbed { input, layer, patch, out_site } => {
                let (rows, cols) = shapes[*input];
                let side = (cols as f64).sqrt() as usize;
                if rows != 3 || side * side != cols || *patch == 0 || !side.is_multiple_of(*patch) {
                    return Err(err(format!(
                        "input ({rows}, {cols}) is not a 3-channel image of whole {patch}-pixel patches"
                    )));
                }
                let in_grid = match grid_of(*input) {
                    Some(g) => {
                        layer_wise(&g, "input")?;
                        InGrid {
                            scale: f64::from(g.scale[0]),
                            zp_num: i64::from(g.zero_point[0]),
                            den: 1,
                            shifts: None,
                        }
                    }
                    None => {
                        let Some(Op::Image { normalize: n, .. }) = program.ops.first() else {
                            unreachable!()
                        };
                        image_grid(n).ok_or_else(|| {
                            err(format!(
                                "the image is not quantized and its normalization (mean {:?}, std {:?}) is not one \
                                 affine map with a half-integer zero point",
                                n.mean, n.std
                            ))
                        })?
                    }
                };
                let d = art.shape(&format!("{layer}.weight_int8"))?.first().copied().unwrap_or(0);
                let dense = dense(
                    kernel,
                    art,
                    &LayerRef { name: layer, shape: &[d, 3, *patch, *patch], bias: true },
                    in_grid,
                    out_site,
                    false,
                )
                .map_err(|e| wrap(e, &err))?;
                let g = Grid::read(art, out_site)?;
                (
                    (Compiled::PatchEmbed { dense, patch: *patch, side }),
                    ((side / patch).pow(2), d),
                    Some(g),
                )
            }
            Op::Embed { input, cls, pos, embed_site, pos_site, out_site } => {
                let (rows, d) = shapes[*input];
                let gin = grid_of(*input).ok_or_else(|| err("its input has no grid".into()))?;
                layer_wise(&gin, "input")?;
                let ge = Grid::read(art, embed_site)?;
                let gp = Grid::read(art, pos_site)?;
                let go = Grid::read(art, out_site)?;
                for g in [&ge, &gp, &go] {
                    if !g.fits(d) {
                        return Err(err(format!("site {} does not fit {d} channels", g.name)));
                    }
                }
                let cls = art.f32(cls, Some(&[1, 1, d]))?;
                let posv = art.f32(pos, Some(&[1, rows + 1, d]))?;
                let m = (0..d)
                    .map(|c| dyadic(f64::from(gin.scale[0]) / f64::from(ge.scale(c)), &err))
                    .collect::<Result<_>>()?;
                let q = |x: f32, g: &Grid, c: usize| {
                    quantize(x, g.scale(c), g.zero_point(c), BitType::UINT8) as u8
                };
                let cls: Vec<u8> = cls.iter().enumerate().map(|(c, &x)| q(x, &ge, c)).collect();
                let pos: Vec<u8> =
                    posv.iter().enumerate().map(|(i, &x)| q(x, &gp, i % d)).collect();
                let add = add_consts(&ge, &gp, &go, d, &err)?;
                let ze = (0..d).map(|c| ge.zero_point(c)).collect();
                (
                    Compiled::Embed { m, z_in: gin.zero_point[0], ze, cls, pos, add },
                    (rows + 1, d),
                    Some(go),
                )
            }
            Op::LayerNorm { input, norm, out_site } => {
                let (rows, c) = shapes[*input];
                let gin = grid_of(*input).ok_or_else(|| err("its input has no grid".into()))?;
                let gamma = art.f32(&format!("{norm}.weight"), Some(&[c]))?;
                let beta = art.f32(&format!("{norm}.bias"), Some(&[c]))?;
                let go = Grid::read(art, out_site)?;
                layer_wise(&go, "output")?;
                if gin.zero_point.len() != 1 {
                    return Err(err(format!(
                        "input site {} has one zero point per channel",
                        gin.name
                    )));
                }
                let scale = ln_scale(&gin, c).map_err(&err)?;
                let in_scale = match &scale {
                    LnScale::Layer(s) => InScale::Layer(*s),
                    LnScale::Ptf { base, factors } => InScale::Ptf { base: *base, factors },
                };
                let params = LayerNormParams {
                    in_scale,
                    zero_point: gin.zero_point[0],
                    gamma: &gamma,
                    beta: &beta,
                    out_scale: go.scale[0],
                };
                let ln = IntegerLayerNorm::new(&params).map_err(|e| err(e.to_string()))?;
                let ln = Compiled::LayerNorm { ln, z_out: go.zero_point[0] };
                (ln, (rows, c), Some(go))
            }
            Op::Linear { input, layer, bias, gelu, out_site } => {
                let (rows, k) = shapes[*input];
                let gin = grid_of(*input).ok_or_else(|| err("its input has no grid".into()))?;
                let n = art.shape(&format!("{layer}.weight_int8"))?.first().copied().unwrap_or(0);
                let in_grid = InGrid::of(&gin, k).map_err(&err)?;
                let spec = LayerRef { name: layer, shape: &[n, k], bias: *bias };
                let dense = dense(kernel, art, &spec, in_grid, out_site, *gelu)
                    .map_err(|e| wrap(e, &err))?;
                (Compiled::Linear { dense }, (rows, n), Some(Grid::read(art, out_site)?))
            }
            Op::Attention { input, heads, scores_site, out_site } => {
                let (rows, c3) = shapes[*input];
                let g = grid_of(*input).ok_or_else(|| err("its input has no grid".into()))?;
                let ga = Grid::read(art, scores_site)?;
                let site = AttentionSites { qkv: &g, scores: &ga, lis: &ga, out_site };
                let (att, gc) = attention(art, &site, rows, c3, *heads, lis_bits, &err)?;
                (Compiled::Attention(Box::new(att)), (rows, c3 / 3), Some(gc))
            }
            Op::WindowAttention {
                input,
                heads,
                resolution,
                window,
                shift,
                scores_site,
                table,
                table_site,
                biased_site,
                out_site,
            } => {
                let (rows, c3) = shapes[*input];
                let (res, w, shift) = (*resolution, *window, *shift);
                if rows != res * res || w == 0 || !res.is_multiple_of(w) || shift >= w {
                    return Err(err(format!(
                        "{rows} tokens are not a {res} × {res} grid of {w} × {w} windows shifted by {shift}"
                    )));
                }
                let g = grid_of(*input).ok_or_else(|| err("its input has no grid".into()))?;
                let ga = Grid::read(art, scores_site)?;
                let gb = Grid::read(art, biased_site)?;
                let gt = Grid::read(art, table_site)?;
                for (g, what) in [(&gb, "biased scores"), (&gt, "bias table")] {
                    layer_wise(g, what)?;
                }
                let site = AttentionSites { qkv: &g, scores: &ga, lis: &gb, out_site };
                let n = w * w;
                let (mut att, gc) = attention(art, &site, n, c3, *heads, lis_bits, &err)?;
                let t = art.f32(table, Some(&[(2 * w - 1).pow(2), *heads]))?;
                let index = fqvit_program::windows::relative_position_index(w);
                let q = |x: f32| quantize(x, gt.scale[0], gt.zero_point[0], BitType::UINT8) as u8;
                let table = (0..*heads)
                    .flat_map(|h| index.iter().map(move |&r| (r, h)))
                    .map(|(r, h)| q(t[r * heads + h]))
                    .collect();
                let mask = (shift > 0).then(|| fqvit_program::windows::masked(res, w, shift));
                att.windows = Some(Windows {
                    tokens: fqvit_program::windows::tokens(res, w, shift),
                    n,
                    table,
                    m_a: add_multiplier(&ga, &gb, 0, &err)?,
                    z_t: gt.zero_point[0],
                    m_t: add_multiplier(&gt, &gb, 0, &err)?,
                    z_b: gb.zero_point[0],
                    mask,
                    mask_steps: (f64::from(fqvit_program::windows::MASK) / f64::from(gb.scale[0]))
                        .round_ties_even() as i32,
                });
                (Compiled::Attention(Box::new(att)), (rows, c3 / 3), Some(gc))
            }
            Op::PatchMerge { input, resolution } => {
                let (rows, c) = shapes[*input];
                let res = *resolution;
                if rows != res * res || !res.is_multiple_of(2) {
                    return Err(err(format!(
                        "{rows} tokens are not a {res} × {res} grid of even side"
                    )));
                }
                let g = grid_of(*input).ok_or_else(|| err("its input has no grid".into()))?;
                (Compiled::PatchMerge { resolution: res }, (rows / 4, 4 * c), Some(g.tiled(4)))
            }
            Op::MeanTokens { input, out_site } => {
                let (rows, _) = shapes[*input];
                let g = grid_of(*input).ok_or_else(|| err("its input has no grid".into()))?;
                let go = Grid::read(art, out_site)?;
                layer_wise(&g, "input")?;
                layer_wise(&go, "output")?;
                // |Σ (q − z)| ≤ 255 · rows.
                let m =
                    dyadic(f64::from(g.scale[0]) / (rows as f64 * f64::from(go.scale[0])), &err)?;
                let mean =
                    Compiled::MeanTokens { m, z_in: g.zero_point[0], z_out: go.zero_point[0] };
                (mean, (1, shapes[*input].1), Some(go))
            }
            Op::Add { a, b, out_site } => {
                if shapes[*a] != shapes[*b] {
                    return Err(err(format!(
                        "summands of shapes {:?} and {:?}",
                        shapes[*a], shapes[*b]
                    )));
                }
                let c = shapes[*a].1;
                let (ga, gb) = (grid_of(*a), grid_of(*b));
                let (Some(ga), Some(gb)) = (ga, gb) else {
                    return Err(err("a summand has no grid".into()));
                };
                let go = Grid::read(art, out_site)?;
                for g in [&ga, &gb, &go] {
                    if !g.fits(c) {
                        return Err(err(format!("site {} does not fit {c} channels", g.name)));
                    }
                }
                (Compiled::Add(add_consts(&ga, &gb, &go, c, &err)?), shapes[*a], Some(go))
            }
            Op::SelectToken { input, index } => {
                let (rows, c) = shapes[*input];
                if *index >= rows {
                    return Err(err(format!("token {index} of {rows}")));
                }
                (Compiled::SelectToken { index: *index }, (1, c), grid_of(*input))
            }
            Op::Output { input } => {
                let (rows, c) = shapes[*input];
                let g = grid_of(*input).ok_or_else(|| err("its input has no grid".into()))?;
                if rows != 1 || !g.fits(c) {
                    return Err(err(format!(
                        "input ({rows}, {c}) is not one row of logits on its site"
                    )));
                }
                classes = c;
                let scale = (0..c).map(|i| g.scale(i)).collect();
                let zero_point = (0..c).map(|i| g.zero_point(i)).collect();
                (Compiled::Output { scale, zero_point }, (1, c), None)
            }
        };
        out.push(compiled);
        shapes.push(shape);
        grids.push(grid);
    }
    Ok(Built { ops: out, classes })
}

fn wrap(e: Error, err: &impl Fn(String) -> Error) -> Error {
    match e {
        Error::Op { reason, .. } => err(reason),
        other => other,
    }
}

/// Refuses a channel-wise `what` site where an op needs one scale.
fn check_layer_wise(g: &Grid, what: &str, err: &impl Fn(String) -> Error) -> Result<()> {
    if g.layer_wise() {
        Ok(())
    } else {
        Err(err(format!("{what} site {} is channel-wise; the engine needs one scale", g.name)))
    }
}

/// The sites of an attention op.
struct AttentionSites<'a> {
    qkv: &'a Grid,
    scores: &'a Grid,
    /// The site whose scale Log-Int-Softmax reads.
    lis: &'a Grid,
    out_site: &'a str,
}

/// Attention over `n` tokens (an image, or a window) of `c3` qkv channels.
fn attention(
    art: &Artifact,
    site: &AttentionSites<'_>,
    n: usize,
    c3: usize,
    heads: usize,
    lis_bits: u32,
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
    let k_max = ((1u32 << lis_bits.min(5)) - 1).min(30);
    let m_ctx = (0..d)
        .map(|c| dyadic(s * 2f64.powi(-(k_max as i32)) / f64::from(gc.scale(c)), err))
        .collect::<Result<_>>()?;
    let att = Attention {
        heads,
        z: g.zero_point[0],
        m_scores: small(dyadic(s * s * head_scale / f64::from(ga.scale[0]), err)?, err)?,
        z_a: ga.zero_point[0],
        s_lis,
        bits: lis_bits,
        k_max,
        m_ctx,
        z_c: (0..d).map(|c| gc.zero_point(c)).collect(),
        windows: None,
    };
    Ok((att, gc))
}

/// A dyadic multiplier for [`Dyadic::apply_small`]: shifts above 62 would round every value
/// below 2^31 to 0 or ±1 anyway, and are refused.
fn small(d: Dyadic, err: &impl Fn(String) -> Error) -> Result<Dyadic> {
    if d.shift <= 62 {
        Ok(d)
    } else {
        Err(err(format!("scale ratio 2^-{} is too small to requantize in i64", d.shift)))
    }
}

fn dyadic(r: f64, err: &impl Fn(String) -> Error) -> Result<Dyadic> {
    Dyadic::new(r).ok_or_else(|| err(format!("scale ratio {r:e} has no 31-bit dyadic form")))
}

/// ViT's unquantized image: `(p/255 − m)/s = (p − 255m) / (255s)`, one map for all channels,
/// with `2·255·m` an integer.
fn image_grid(n: &fqvit_program::Normalize) -> Option<InGrid> {
    let same = n.mean.iter().all(|&m| m == n.mean[0]) && n.std.iter().all(|&s| s == n.std[0]);
    let zp2 = 2.0 * 255.0 * f64::from(n.mean[0]);
    (same && n.std[0] > 0.0 && (zp2 - zp2.round()).abs() < 1e-3).then(|| InGrid {
        scale: 1.0 / (255.0 * f64::from(n.std[0])),
        zp_num: zp2.round() as i64,
        den: 2,
        shifts: None,
    })
}

fn ln_scale(g: &Grid, c: usize) -> Result<LnScale, String> {
    match &g.ptf {
        None if g.scale.len() == 1 => Ok(LnScale::Layer(g.scale[0])),
        None => Err(format!("input site {} is channel-wise without PTF factors", g.name)),
        Some(alpha) => {
            if alpha.len() != c {
                return Err(format!(
                    "input site {} has {} PTF factors for {c} channels",
                    g.name,
                    alpha.len()
                ));
            }
            let factors = alpha
                .iter()
                .map(|&a| PtfFactor::try_from(a).map_err(|e| format!("input site {}: {e}", g.name)))
                .collect::<Result<Vec<_>, _>>()?;
            let base = g.scale[0] / f32::from(1u8 << alpha[0]);
            if let Some(j) = (0..c).find(|&j| g.scale[j] != base * f32::from(1u8 << alpha[j])) {
                return Err(format!("input site {}: scale {j} is not base · 2^α", g.name));
            }
            Ok(LnScale::Ptf { base, factors })
        }
    }
}

/// A summand's multiplier onto the sum's grid at channel `j`: `s_in/s_out` with
/// [`ADD_SHIFT`] fraction bits; ratios below 2^20 keep `255 · m < 2^58`.
fn add_multiplier(from: &Grid, to: &Grid, j: usize, err: &impl Fn(String) -> Error) -> Result<i64> {
    let r = f64::from(from.scale(j)) / f64::from(to.scale(j));
    if r >= 2f64.powi(20) {
        return Err(err(format!("site {} is {r:e} times coarser than {}", from.name, to.name)));
    }
    Ok((r * 2f64.powi(ADD_SHIFT as i32)).round_ties_even() as i64)
}

fn add_consts(
    ga: &Grid,
    gb: &Grid,
    go: &Grid,
    c: usize,
    err: &impl Fn(String) -> Error,
) -> Result<AddConsts> {
    let m = |g: &Grid, j: usize| add_multiplier(g, go, j, err);
    Ok(AddConsts {
        za: (0..c).map(|j| ga.zero_point(j)).collect(),
        zb: (0..c).map(|j| gb.zero_point(j)).collect(),
        ma: (0..c).map(|j| m(ga, j)).collect::<Result<_>>()?,
        mb: (0..c).map(|j| m(gb, j)).collect::<Result<_>>()?,
        zo: (0..c).map(|j| go.zero_point(j)).collect(),
    })
}

/// The longest reduction, times the input's denominator: `255·128·2^14 < 2^29`.
const MAX_K_DEN: usize = 1 << 14;

/// A dense layer's weights in the artifact.
#[derive(Clone, Copy)]
struct LayerRef<'a> {
    /// The weight site (`<layer>.weight_int8`, `<layer>.scale`, `<layer>.bias`).
    name: &'a str,
    /// The weight's shape, output channels first.
    shape: &'a [usize],
    /// Whether it has a bias, which must then be there.
    bias: bool,
}

fn dense(
    kernel: &Kernel,
    art: &Artifact,
    layer: &LayerRef<'_>,
    input: InGrid,
    out_site: &str,
    gelu: bool,
) -> Result<Dense> {
    let LayerRef { name: layer, shape, bias } = *layer;
    let err = |reason: String| Error::Op { op: 0, kind: "dense", reason };
    let codes = art.i8(&format!("{layer}.weight_int8"), Some(shape))?;
    let n = shape[0];
    let k: usize = shape[1..].iter().product();
    if k * input.den as usize > MAX_K_DEN {
        return Err(err(format!("{layer}: reduction of {k} is too long for the accumulators")));
    }
    let ws = art.f32(&format!("{layer}.scale"), Some(&[n]))?;
    let b = if bias { art.f32(&format!("{layer}.bias"), Some(&[n]))? } else { vec![0.0; n] };
    let go = Grid::read(art, out_site)?;
    if !go.fits(n) {
        return Err(err(format!("site {out_site} does not fit {n} channels")));
    }
    let buckets = |scale: f32| {
        Buckets::new(&GeluTable::new(scale, go.zero_point[0])).ok_or_else(|| {
            err(format!(
                "GELU's site {out_site}: scale {scale} puts its code thresholds too close for a bucket table"
            ))
        })
    };
    let (epilogue, t_scale): (Epilogue, Vec<f64>) = if gelu {
        let delta = |j: usize| f64::from(go.scale(j)) / f64::from(1u32 << FRACTION_BITS);
        if go.layer_wise() {
            (Epilogue::Gelu { table: buckets(go.scale[0])? }, vec![delta(0); n])
        } else {
            // PTF: one table per distinct scale (factor), shared zero point.
            if go.ptf.is_none() || go.zero_point.len() != 1 {
                return Err(err(format!(
                    "GELU's site {out_site} is channel-wise without PTF factors and one zero point"
                )));
            }
            let mut scales: Vec<f32> = Vec::new();
            let mut which = Vec::with_capacity(n);
            for j in 0..n {
                let s = go.scale(j);
                let i = scales.iter().position(|&x| x == s).unwrap_or_else(|| {
                    scales.push(s);
                    scales.len() - 1
                });
                which.push(i as u8);
            }
            let tables = scales.iter().map(|&s| buckets(s)).collect::<Result<Vec<_>>>()?;
            (Epilogue::GeluPtf { tables, which }, (0..n).map(delta).collect())
        }
    } else {
        let zero_point = (0..n).map(|j| go.zero_point(j)).collect();
        (Epilogue::Requant { zero_point }, (0..n).map(|j| f64::from(go.scale(j))).collect())
    };
    // Σ_k w_jk · 2^shift_k, the input zero point's weight when the codes enter shifted.
    let shifted_sums: Option<Vec<i64>> = input.shifts.as_ref().map(|shifts| {
        codes
            .chunks_exact(k.max(1))
            .map(|row| row.iter().zip(shifts).map(|(&w, &s)| i64::from(w) << s).sum())
            .collect()
    });
    let w = Weights::new(kernel, codes, n, k);
    let (mut m, mut c, mut shift) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::new());
    for j in 0..n {
        let acc_scale = input.scale / input.den as f64 * f64::from(ws[j]);
        let d = dyadic(acc_scale / t_scale[j], &err)?;
        // The bias in accumulator steps with 16 fraction bits, then scaled by m exactly in i128.
        // Rounded to whole steps, it flipped about 4.5 codes in 10^4 at every linear site of
        // ViT-Tiny (a step is about 10^-3 of an output step there); now it moves outputs by
        // less than 10^-8 of a step.
        let steps = f64::from(b[j]) / acc_scale;
        let row_sum = shifted_sums.as_ref().map_or(i64::from(w.row_sums[j]), |s| s[j]);
        let zp_term = i128::from(input.zp_num) * i128::from(row_sum);
        let bias16 = (steps * 65536.0).round_ties_even();
        if bias16.is_nan() || bias16.abs() >= 2f64.powi(100) {
            return Err(err(format!("{layer}.bias[{j}]: {} is {steps:e} accumulator steps", b[j])));
        }
        let cj = crate::requant::round_shift(bias16 as i128 * i128::from(d.m), 16)
            - zp_term * i128::from(d.m);
        if cj.abs() >= 1i128 << 61 || d.shift > 62 {
            return Err(err(format!(
                "{layer}.bias[{j}]: {} ({steps:e} accumulator steps) or its requantization (2^-{}) is out of the i64 range",
                b[j], d.shift
            )));
        }
        m.push(d.m);
        c.push(cj as i64);
        shift.push(d.shift);
    }
    Ok(Dense { w, input, m, c, shift, epilogue })
}

/// A value at run time.
enum Val {
    Codes(Vec<u8>),
    Logits(Vec<f32>),
}

fn codes(v: &Option<Val>) -> &[u8] {
    match v {
        Some(Val::Codes(c)) => c,
        _ => unreachable!("the program was checked: inputs are earlier code values"),
    }
}

#[inline]
pub(crate) fn clamp_u8(v: i64) -> u8 {
    v.clamp(0, 255) as u8
}

impl Dense {
    /// `rows × K` codes to `rows × N` codes.
    fn run(&self, kernel: &Kernel, a: &[u8], timings: &mut Timings) -> Vec<u8> {
        if let Some(shifts) = &self.input.shifts {
            return self.run_shifted(kernel, a, shifts, timings);
        }
        let (n, rows) = (self.w.n, a.len() / self.w.k);
        let t = Instant::now();
        let mut acc = vec![0i32; rows * n];
        gemm(kernel, a, &self.w, &mut acc);
        timings.add("gemm", t);
        timings.gemm_macs += (rows * n * self.w.k) as u64;
        let t = Instant::now();
        let mut out = vec![0u8; rows * n];
        let rows_per_job = (4096 / n).max(1);
        let arch = pulp::Arch::new();
        out.par_chunks_mut(n * rows_per_job)
            .zip(acc.par_chunks(n * rows_per_job))
            .for_each(|(out, acc)| arch.dispatch(Epilogues { dense: self, acc, out }));
        timings.add(self.epilogue.kind(), t);
        out
    }

    /// A PTF input: `v = code · 2^shift_k < 2^15` is split into byte planes `v = lo + 256·hi`,
    /// each through the u8 × i8 GEMM with the same weights (`hi` only where some `v ≥ 256`),
    /// and `acc = acc_lo + 256·acc_hi`. Then `|acc| ≤ 128 · 32,640 · K < 2^36` (K ≤ 2^14), so
    /// the epilogue's `den·acc·m + c` is formed in i128.
    fn run_shifted(
        &self,
        kernel: &Kernel,
        a: &[u8],
        shifts: &[u8],
        timings: &mut Timings,
    ) -> Vec<u8> {
        let (n, k) = (self.w.n, self.w.k);
        let rows = a.len() / k;
        let t = Instant::now();
        let (mut lo, mut hi) = (vec![0u8; a.len()], vec![0u8; a.len()]);
        let mut any_hi = false;
        for ((row, lo), hi) in
            a.chunks_exact(k).zip(lo.chunks_exact_mut(k)).zip(hi.chunks_exact_mut(k))
        {
            for (((&q, &s), lo), hi) in row.iter().zip(shifts).zip(lo.iter_mut()).zip(hi.iter_mut())
            {
                let v = u16::from(q) << s;
                *lo = v as u8;
                *hi = (v >> 8) as u8;
                any_hi |= v >= 256;
            }
        }
        let mut acc_lo = vec![0i32; rows * n];
        gemm(kernel, &lo, &self.w, &mut acc_lo);
        let mut acc_hi = vec![0i32; if any_hi { rows * n } else { 0 }];
        if any_hi {
            gemm(kernel, &hi, &self.w, &mut acc_hi);
        }
        timings.add("gemm", t);
        timings.gemm_macs += ((1 + usize::from(any_hi)) * rows * n * k) as u64;
        let t = Instant::now();
        let den = i128::from(self.input.den);
        let mut out = vec![0u8; rows * n];
        // Rows in jobs of about 4096 outputs, as `run`'s epilogue.
        let job = n * (4096 / n).max(1);
        out.par_chunks_mut(job).enumerate().for_each(|(r, o)| {
            for (i, o) in o.iter_mut().enumerate().map(|(i, o)| (r * job + i, o)) {
                let j = i % n;
                let acc = i64::from(acc_lo[i]) + acc_hi.get(i).map_or(0, |&h| i64::from(h) << 8);
                let v = den * i128::from(acc) * i128::from(self.m[j]) + i128::from(self.c[j]);
                let t = crate::requant::round_shift(v, self.shift[j]);
                // Beyond ±2^40 every code is saturated already: clamping keeps the code and
                // leaves room for the zero point.
                let t = t.clamp(-(1 << 40), 1 << 40) as i64;
                *o = self.epilogue.code(j, t);
            }
        });
        timings.add(self.epilogue.kind(), t);
        out
    }
}

fn add(c: &AddConsts, a: &[u8], b: &[u8], out: &mut [u8]) {
    let ch = c.zo.len();
    out.par_chunks_mut(ch).zip(a.par_chunks(ch).zip(b.par_chunks(ch))).for_each(|(o, (a, b))| {
        for j in 0..ch {
            let (a, b) =
                (i64::from(a[j]) - i64::from(c.za[j]), i64::from(b[j]) - i64::from(c.zb[j]));
            o[j] = add_codes(a, c.ma[j], b, c.mb[j], c.zo[j]);
        }
    });
}

/// The sum of two summands less their zero points, `a` and `b`, with their multipliers onto
/// the sum's grid ([`add_multiplier`]): `clamp(round((a·m_a + b·m_b) / 2^ADD_SHIFT) + z_o)`;
/// `|a·m_a + b·m_b| ≤ 2 · 255 · 2^50 < 2^63`.
#[inline(always)]
pub(crate) fn add_codes(a: i64, m_a: i64, b: i64, m_b: i64, z_o: i32) -> u8 {
    clamp_u8(round_shift_i64(a * m_a + b * m_b, ADD_SHIFT) + i64::from(z_o))
}

/// The program (what each op reads, each op's site), the last op to read each value, and the
/// GEMM kernel its weights were prepared for.
pub(crate) struct Run<'a> {
    pub(crate) kernel: &'a Kernel,
    pub(crate) program: &'a Program,
    pub(crate) last_use: &'a [usize],
}

/// Runs the compiled ops on `pixels` `(B, 3, size, size)`.
pub(crate) fn execute(
    ops: &[Compiled],
    run: &Run<'_>,
    pixels: Vec<u8>,
    size: usize,
    timings: &mut Timings,
    mut observer: Option<&mut dyn crate::Observer>,
) -> Result<Vec<f32>> {
    let Run { kernel, program, last_use } = *run;
    let batch = pixels.len() / (3 * size * size);
    let mut vals: Vec<Option<Val>> = Vec::with_capacity(ops.len());
    let mut pixels = Some(pixels);
    let mut rows_of: Vec<usize> = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let t = Instant::now();
        let inputs = program.ops[i].inputs();
        let (val, rows) = match op {
            Compiled::Image => (Val::Codes(pixels.take().expect("one image op")), 3),
            Compiled::QuantizeImage { table } => {
                let x = codes(&vals[inputs[0]]);
                let plane = size * size;
                let q = x
                    .iter()
                    .enumerate()
                    .map(|(j, &p)| table[(j / plane) % 3][usize::from(p)])
                    .collect();
                timings.add("other", t);
                (Val::Codes(q), 3)
            }
            Compiled::PatchEmbed { dense, patch, side } => {
                let x = codes(&vals[inputs[0]]);
                let (p, g) = (*patch, side / patch);
                let k = 3 * p * p;
                let mut cols = vec![0u8; batch * g * g * k];
                cols.par_chunks_mut(k).enumerate().for_each(|(r, col)| {
                    let (b, t) = (r / (g * g), r % (g * g));
                    let (py, px) = (t / g, t % g);
                    for c in 0..3 {
                        for y in 0..p {
                            let src = &x[((b * 3 + c) * side + py * p + y) * side + px * p..][..p];
                            col[(c * p + y) * p..][..p].copy_from_slice(src);
                        }
                    }
                });
                timings.add("other", t);
                (Val::Codes(dense.run(kernel, &cols, timings)), g * g)
            }
            Compiled::Embed { m, z_in, ze, cls, pos, add: consts } => {
                let x = codes(&vals[inputs[0]]);
                let d = cls.len();
                let rows = rows_of[inputs[0]] + 1;
                let mut e = vec![0u8; batch * rows * d];
                e.par_chunks_mut(rows * d).zip(x.par_chunks((rows - 1) * d)).for_each(|(e, x)| {
                    e[..d].copy_from_slice(cls);
                    for (j, (o, &c)) in e[d..].iter_mut().zip(x).enumerate() {
                        let ch = j % d;
                        *o = clamp_u8(
                            m[ch].apply(i64::from(c) - i64::from(*z_in)) + i64::from(ze[ch]),
                        );
                    }
                });
                let pos_b: Vec<u8> = pos.iter().copied().cycle().take(e.len()).collect();
                let mut out = vec![0u8; e.len()];
                add(consts, &e, &pos_b, &mut out);
                timings.add("add", t);
                (Val::Codes(out), rows)
            }
            Compiled::LayerNorm { ln, z_out } => {
                let v = inputs[0];
                let x = codes(&vals[v]);
                let mut y = vec![0i32; x.len()];
                ln.run(x, &mut y);
                let out =
                    y.par_iter().map(|&y| clamp_u8(i64::from(y) + i64::from(*z_out))).collect();
                timings.add("layer-norm", t);
                (Val::Codes(out), rows_of[v])
            }
            Compiled::Linear { dense } => {
                let v = inputs[0];
                (Val::Codes(dense.run(kernel, codes(&vals[v]), timings)), rows_of[v])
            }
            Compiled::Attention(att) => {
                let v = inputs[0];
                let (x, n) = (codes(&vals[v]), rows_of[v]);
                // Images and their heads in parallel (3 heads alone leave one of 2 cores idle
                // half the time).
                let per_image: Vec<(Vec<u8>, Duration, Duration)> =
                    x.par_chunks(x.len() / batch).map(|x| att.run(kernel, x, n)).collect();
                // Wall time, split between matmuls and softmax as their thread times are.
                let wall = t.elapsed().as_secs_f64();
                let (mm, sm) = per_image.iter().fold((0.0, 0.0), |(a, b), (_, mm, sm)| {
                    (a + mm.as_secs_f64(), b + sm.as_secs_f64())
                });
                let share = if mm + sm > 0.0 { mm / (mm + sm) } else { 1.0 };
                *timings.by_kind.entry("attention-matmul").or_default() +=
                    Duration::from_secs_f64(wall * share);
                *timings.by_kind.entry("softmax").or_default() +=
                    Duration::from_secs_f64(wall * (1.0 - share));
                let out = per_image.into_iter().flat_map(|(codes, ..)| codes).collect();
                (Val::Codes(out), n)
            }
            Compiled::PatchMerge { resolution: res } => {
                let v = inputs[0];
                let x = codes(&vals[v]);
                let (half, c) = (res / 2, x.len() / batch / (res * res));
                let mut out = vec![0u8; x.len()];
                out.par_chunks_mut(4 * c).enumerate().for_each(|(r, o)| {
                    let (b, t) = (r / (half * half), r % (half * half));
                    let (y, x0) = (2 * (t / half), 2 * (t % half));
                    for (k, (dy, dx)) in [(0, 0), (1, 0), (0, 1), (1, 1)].into_iter().enumerate() {
                        let src = (b * res + y + dy) * res + x0 + dx;
                        o[k * c..][..c].copy_from_slice(&x[src * c..][..c]);
                    }
                });
                timings.add("other", t);
                (Val::Codes(out), rows_of[v] / 4)
            }
            Compiled::MeanTokens { m, z_in, z_out } => {
                let v = inputs[0];
                let x = codes(&vals[v]);
                let per = x.len() / batch;
                let c = per / rows_of[v];
                let mut out = vec![0u8; batch * c];
                for (o, x) in out.chunks_exact_mut(c).zip(x.chunks_exact(per)) {
                    let mut sums = vec![0i64; c];
                    for token in x.chunks_exact(c) {
                        for (s, &q) in sums.iter_mut().zip(token) {
                            *s += i64::from(q) - i64::from(*z_in);
                        }
                    }
                    for (o, &s) in o.iter_mut().zip(&sums) {
                        *o = clamp_u8(m.apply(s) + i64::from(*z_out));
                    }
                }
                timings.add("other", t);
                (Val::Codes(out), 1)
            }
            Compiled::Add(consts) => {
                let (a, b) = (inputs[0], inputs[1]);
                let mut out = vec![0u8; codes(&vals[a]).len()];
                add(consts, codes(&vals[a]), codes(&vals[b]), &mut out);
                timings.add("add", t);
                (Val::Codes(out), rows_of[a])
            }
            Compiled::SelectToken { index } => {
                let v = inputs[0];
                let x = codes(&vals[v]);
                let per = x.len() / batch;
                let c = per / rows_of[v];
                let out = (0..batch).flat_map(|b| x[b * per + index * c..][..c].to_vec()).collect();
                timings.add("other", t);
                (Val::Codes(out), 1)
            }
            Compiled::Output { scale, zero_point } => {
                let x = codes(&vals[inputs[0]]);
                let c = scale.len();
                let logits = x
                    .iter()
                    .enumerate()
                    .map(|(j, &q)| dequantize(i32::from(q), scale[j % c], zero_point[j % c]))
                    .collect();
                (Val::Logits(logits), 1)
            }
        };
        let val = match (val, program.ops[i].out_site(), observer.as_deref_mut()) {
            (Val::Codes(c), Some(site), Some(obs)) => match obs.codes(i, site, &c) {
                Some(r) if r.len() == c.len() => Val::Codes(r),
                Some(r) => {
                    return Err(Error::Input(format!(
                        "the observer replaced {} codes of op {i} ({site}) with {}",
                        c.len(),
                        r.len()
                    )));
                }
                None => Val::Codes(c),
            },
            (val, ..) => val,
        };
        vals.push(Some(val));
        rows_of.push(rows);
        for v in 0..i {
            if last_use[v] == i {
                vals[v] = None;
            }
        }
    }
    match vals.pop().flatten() {
        Some(Val::Logits(l)) => Ok(l),
        _ => unreachable!("the program ends with its output"),
    }
}
