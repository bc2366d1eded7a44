//! Compiling program ops into integer constants, and executing them.
//!
//! Activations are u8 codes `(B, rows, cols)` on their site's grid (the image: rows = 3
//! channels, cols = pixels). Integer bounds per op are stated where the op is prepared.

use std::time::Instant;

use fqvit_artifact::Artifact;
use fqvit_ops::layer_norm::integer::IntegerLayerNorm;
use fqvit_ops::layer_norm::{LayerNormParams, MAX_CHANNELS};
use fqvit_ops::softmax::LisBits;
use fqvit_ops::{dequantize, quantize};
use fqvit_program::{Op, Program};
use rayon::prelude::*;

use crate::attention::{self, Attention, Windows};
use crate::error::{Error, Result};
use crate::gemm::Kernel;
use crate::grid::Grid;
mod add;
mod dense;
mod values;

use crate::load::{check_layer_wise, dyadic, ln_scale, wrap};
use crate::requant::{Dyadic, clamp_code};
use crate::timings::Timings;
use add::{AddConsts, add_consts};
use dense::{Dense, InGrid, LayerRef};
use values::{Stream, Val, add_into, codes, gather_stream, observe, stream};

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
        /// The embedding site's largest code.
        he: u8,
        cls: Vec<u8>,
        pos: Vec<u8>,
        add: AddConsts,
    },
    LayerNorm {
        /// Every per-token step in integers (σ by an integer square root).
        ln: IntegerLayerNorm,
        z_out: i32,
        hi: u8,
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
        hi: u8,
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

impl Compiled {
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Compiled::PatchEmbed { dense: d, .. } | Compiled::Linear { dense: d } => d.bytes(),
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
#[allow(clippy::float_arithmetic)] // load time
pub(crate) fn compile(art: &Artifact, program: &Program, kernel: &Kernel) -> Result<Built> {
    let mut shapes: Vec<(usize, usize)> = Vec::with_capacity(program.ops.len());
    let mut grids: Vec<Option<Grid>> = Vec::with_capacity(program.ops.len());
    let mut out = Vec::with_capacity(program.ops.len());
    let mut classes = 0;
    for (i, op) in program.ops.iter().enumerate() {
        let err = |reason: String| Error::Op { op: i, kind: kind(op), reason };
        let grid_of = |v: usize| grids[v].clone();
        let layer_wise = |g: &Grid, what: &str| check_layer_wise(g, what, &err);
        let lis = |bits: &Option<LisBits>| {
            bits.ok_or_else(|| {
                err("a uniform softmax (calibrated without --lis): the engine needs \
                     Log-Int-Softmax"
                    .into())
            })
        };
        check_widths(art, op, &grids).map_err(err)?;
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
                        quantize(x, g.scale(c), g.zero_point(c), g.bit_type) as u8
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
                let dense = dense::compile(
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
                let go = Grid::read_any(art, out_site)?;
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
                    quantize(x, g.scale(c), g.zero_point(c), g.bit_type) as u8
                };
                let cls: Vec<u8> = cls.iter().enumerate().map(|(c, &x)| q(x, &ge, c)).collect();
                let pos: Vec<u8> =
                    posv.iter().enumerate().map(|(i, &x)| q(x, &gp, i % d)).collect();
                let add = add_consts(&ge, &gp, &go, d, &err)?;
                let ze = (0..d).map(|c| ge.zero_point(c)).collect();
                (
                    Compiled::Embed { m, z_in: gin.zero_point[0], ze, he: ge.hi(), cls, pos, add },
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
                if !(1..=MAX_CHANNELS).contains(&c) {
                    return Err(err(format!("{c} channels, expected 1..={MAX_CHANNELS}")));
                }
                let in_scale = ln_scale(&gin, c).map_err(&err)?;
                let params = LayerNormParams {
                    in_scale,
                    zero_point: gin.zero_point[0],
                    bits: gin.bit_type.bits,
                    gamma: &gamma,
                    beta: &beta,
                    out_scale: go.scale[0],
                };
                let ln = IntegerLayerNorm::new(&params).map_err(|e| err(e.to_string()))?;
                let ln = Compiled::LayerNorm { ln, z_out: go.zero_point[0], hi: go.hi() };
                (ln, (rows, c), Some(go))
            }
            Op::Linear { input, layer, bias, gelu, out_site } => {
                let (rows, k) = shapes[*input];
                let gin = grid_of(*input).ok_or_else(|| err("its input has no grid".into()))?;
                let n = art.shape(&format!("{layer}.weight_int8"))?.first().copied().unwrap_or(0);
                let in_grid = InGrid::of(&gin, k).map_err(&err)?;
                let spec = LayerRef { name: layer, shape: &[n, k], bias: *bias };
                let dense = dense::compile(kernel, art, &spec, in_grid, out_site, *gelu)
                    .map_err(|e| wrap(e, &err))?;
                (Compiled::Linear { dense }, (rows, n), Some(Grid::read_any(art, out_site)?))
            }
            Op::Attention { input, heads, lis_bits, scores_site, out_site } => {
                let lis_bits = lis(lis_bits)?;
                let (rows, c3) = shapes[*input];
                let g = grid_of(*input).ok_or_else(|| err("its input has no grid".into()))?;
                let ga = Grid::read(art, scores_site)?;
                let site = attention::AttentionSites { qkv: &g, scores: &ga, lis: &ga, out_site };
                let (att, gc) = attention::compile(art, &site, rows, c3, *heads, lis_bits, &err)?;
                (Compiled::Attention(Box::new(att)), (rows, c3 / 3), Some(gc))
            }
            Op::WindowAttention {
                input,
                heads,
                lis_bits,
                resolution,
                window,
                shift,
                scores_site,
                table,
                table_site,
                biased_site,
                out_site,
            } => {
                let lis_bits = lis(lis_bits)?;
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
                let site = attention::AttentionSites { qkv: &g, scores: &ga, lis: &gb, out_site };
                let n = w * w;
                let (mut att, gc) = attention::compile(art, &site, n, c3, *heads, lis_bits, &err)?;
                let t = art.f32(table, Some(&[(2 * w - 1).pow(2), *heads]))?;
                let index = fqvit_program::windows::relative_position_index(w);
                let q = |x: f32| quantize(x, gt.scale[0], gt.zero_point[0], gt.bit_type) as u8;
                let table = (0..*heads)
                    .flat_map(|h| index.iter().map(move |&r| (r, h)))
                    .map(|(r, h)| q(t[r * heads + h]))
                    .collect();
                let mask = (shift > 0).then(|| fqvit_program::windows::masked(res, w, shift));
                att.windows = Some(Windows {
                    tokens: fqvit_program::windows::tokens(res, w, shift),
                    n,
                    table,
                    m_a: add::add_multiplier(&ga, &gb, 0, &err)?,
                    z_t: gt.zero_point[0],
                    m_t: add::add_multiplier(&gt, &gb, 0, &err)?,
                    z_b: gb.zero_point[0],
                    hi_b: gb.hi(),
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
                let mean = Compiled::MeanTokens {
                    m,
                    z_in: g.zero_point[0],
                    z_out: go.zero_point[0],
                    hi: go.hi(),
                };
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
                let go = Grid::read_any(art, out_site)?;
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

/// Codes wider than a byte are the residual stream's: only the ops that move or add it and the
/// LayerNorms take them, and only the ops that make it write them (the embedding, residual adds,
/// and a plain linear layer, Swin's patch-merging reduction; GELU's output is bytes).
fn check_widths(art: &Artifact, op: &Op, grids: &[Option<Grid>]) -> Result<(), String> {
    let (reads, writes) = match op {
        Op::LayerNorm { .. } => (true, false),
        Op::Add { .. } | Op::PatchMerge { .. } | Op::SelectToken { .. } => (true, true),
        Op::Embed { .. } => (false, true),
        Op::Linear { gelu, .. } => (false, !gelu),
        _ => (false, false),
    };
    let wide = op.inputs().into_iter().find_map(|v| {
        grids[v].as_ref().filter(|g| !g.bytes()).map(|g| (g.bit_type.bits, g.name.as_str()))
    });
    if !reads && let Some((bits, site)) = wide {
        return Err(format!(
            "reads the {}-bit codes of site {site}: only LayerNorms, residual adds, patch \
             merging and token selection take codes wider than a byte",
            bits.get()
        ));
    }
    let out = op.out_site().and_then(|site| Some((art.params(site)?.bit_type.bits, site)));
    if !writes && let Some((bits, site)) = out.filter(|(bits, _)| !bits.fits_byte()) {
        return Err(format!(
            "writes {}-bit codes on site {site}: only residual adds, the embedding and linear \
             layers write codes wider than a byte",
            bits.get()
        ));
    }
    Ok(())
}

/// ViT's unquantized image: `(p/255 − m)/s = (p − 255m) / (255s)`, one map for all channels,
/// with `2·255·m` an integer.
#[allow(clippy::float_arithmetic)] // load time
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
            Compiled::Embed { m, z_in, ze, he, cls, pos, add: consts } => {
                let x = codes(&vals[inputs[0]]);
                let d = cls.len();
                let rows = rows_of[inputs[0]] + 1;
                let mut e = vec![0u8; batch * rows * d];
                e.par_chunks_mut(rows * d).zip(x.par_chunks((rows - 1) * d)).for_each(|(e, x)| {
                    e[..d].copy_from_slice(cls);
                    for (j, (o, &c)) in e[d..].iter_mut().zip(x).enumerate() {
                        let ch = j % d;
                        let t = m[ch].apply(i64::from(c) - i64::from(*z_in));
                        *o = clamp_code(t + i64::from(ze[ch]), *he);
                    }
                });
                let pos_b: Vec<u8> = pos.iter().copied().cycle().take(e.len()).collect();
                let out = add_into(kernel.arch(), consts, &e, &pos_b);
                timings.add("add", t);
                (out, rows)
            }
            Compiled::LayerNorm { ln, z_out, hi } => {
                let v = inputs[0];
                let x = stream(&vals[v]);
                let mut y = vec![0i32; x.len()];
                match x {
                    Stream::Bytes(x) => ln.run(kernel.isa(), x, &mut y),
                    Stream::Wide(x) => ln.run(kernel.isa(), x, &mut y),
                }
                let mut out = vec![0u8; y.len()];
                // In chunks, each a vector loop (a per-element parallel collect is several
                // times slower).
                out.par_chunks_mut(1 << 14).zip(y.par_chunks(1 << 14)).for_each(|(o, y)| {
                    kernel.arch().dispatch(ClampCodes { y, z: *z_out, hi: *hi, out: o })
                });
                timings.add("layer-norm", t);
                (Val::Codes(out), rows_of[v])
            }
            Compiled::Linear { dense } => {
                let v = inputs[0];
                let x = codes(&vals[v]);
                let out = if dense.wide() {
                    Val::Wide(dense.run(kernel, x, timings))
                } else {
                    Val::Codes(dense.run(kernel, x, timings))
                };
                (out, rows_of[v])
            }
            Compiled::Attention(att) => {
                let v = inputs[0];
                let (x, n) = (codes(&vals[v]), rows_of[v]);
                let (out, mm, sm) = att.run(kernel, x, batch, n);
                timings.split("attention-matmul", "softmax", t.elapsed(), [(mm, sm)].into_iter());
                (Val::Codes(out), n)
            }
            Compiled::PatchMerge { resolution: res } => {
                let v = inputs[0];
                let x = stream(&vals[v]);
                let (half, c) = (res / 2, x.len() / batch / (res * res));
                // Output row r is part r % 4 of merged token r / 4: the 2 × 2 neighbours in
                // the order (0, 0), (1, 0), (0, 1), (1, 1).
                let pick = |r: usize| {
                    let (m, k) = (r / 4, r % 4);
                    let (b, t) = (m / (half * half), m % (half * half));
                    let (y, x0) = (2 * (t / half), 2 * (t % half));
                    (b * res + y + k % 2) * res + x0 + k / 2
                };
                let out = gather_stream(x, c, x.len() / c, pick);
                timings.add("other", t);
                (out, rows_of[v] / 4)
            }
            Compiled::MeanTokens { m, z_in, z_out, hi } => {
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
                        *o = clamp_code(m.apply(s) + i64::from(*z_out), *hi);
                    }
                }
                timings.add("other", t);
                (Val::Codes(out), 1)
            }
            Compiled::Add(consts) => {
                let (a, b) = (inputs[0], inputs[1]);
                let arch = kernel.arch();
                let out = match (stream(&vals[a]), stream(&vals[b])) {
                    (Stream::Bytes(x), Stream::Bytes(y)) => add_into(arch, consts, x, y),
                    (Stream::Bytes(x), Stream::Wide(y)) => add_into(arch, consts, x, y),
                    (Stream::Wide(x), Stream::Bytes(y)) => add_into(arch, consts, x, y),
                    (Stream::Wide(x), Stream::Wide(y)) => add_into(arch, consts, x, y),
                };
                timings.add("add", t);
                (out, rows_of[a])
            }
            Compiled::SelectToken { index } => {
                let v = inputs[0];
                let x = stream(&vals[v]);
                let rows = rows_of[v];
                let c = x.len() / batch / rows;
                let out = gather_stream(x, c, batch, |b| b * rows + index);
                timings.add("other", t);
                (out, 1)
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
        let val = match (program.ops[i].out_site(), observer.as_deref_mut()) {
            (Some(site), Some(obs)) => observe(obs, i, site, val)?,
            _ => val,
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

/// `clamp(y + z, 0, hi)` into codes, for [`pulp::Arch::dispatch`] (compiled for the
/// instruction set, which a closure's body would not be).
struct ClampCodes<'a> {
    y: &'a [i32],
    z: i32,
    hi: u8,
    out: &'a mut [u8],
}

impl pulp::WithSimd for ClampCodes<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let z = i64::from(self.z);
        for (o, &y) in self.out.iter_mut().zip(self.y) {
            *o = clamp_code(i64::from(y) + z, self.hi);
        }
    }
}
