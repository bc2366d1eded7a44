//! `weight-rounding = "gptq"` (fqvit+): each linear layer's weight codes chosen from
//! calibration data, GPTQ's closed form (Frantar et al., 2023), instead of rounding each weight
//! to its nearest code.
//!
//! With `H = E[x xᵀ]` over the layer's inputs, the output error of a rounded weight row `ŵ` is
//! `(ŵ − w) H (ŵ − w)ᵀ`. Taking the input columns one at a time (largest `H_jj` first), each is
//! rounded to its nearest code on the row's own grid, and its error, scaled by the upper
//! Cholesky factor `U` of `H⁻¹`, is pushed onto the columns not yet rounded, which absorb it:
//! `w_k −= (w_j − ŵ_j)/U_jj · U_jk`. The grids (scales, zero points, bits) are the weight
//! observer's, frozen before; only which code each weight takes changes, so the forward, the
//! artifact and the integer engine see ordinary codes on the same grids.
//!
//! Two choices differ from GPTQ's language-model recipe, both measured on ViT-Tiny at 4/8/4
//! (docs/fqvit-plus.md, "GPTQ weight rounding"):
//! - `x` is the layer's input in the quantized forward (nearest codes everywhere), not the
//!   float one: 8-bit layer-wise grids crush the narrow channels beside the massive ones, so
//!   the float inputs' correlations do not hold for what the layer reads.
//! - each token enters `H` scaled to unit norm, so `H` weighs every token's relative error
//!   alike. Unweighted, the few tokens that carry a massive activation (ViT-Tiny's block 7 fc2
//!   output) own `H`, and the codes that serve them cost every other token more than nearest
//!   rounding does.
//!
//! The weights are replaced in place by their fake-quantized values, a fixed point of the
//! quantizer, so that every later reader (the quantized forward, bias correction, the artifact)
//! takes exactly these codes. The patch embedding, a convolution whose stride is its kernel, is
//! the linear layer of its patches: its inputs are the image's patches unfolded in the weight's
//! `(channel, row, column)` order, and its weight is rounded as the `(out, in·k·k)` matrix.

use fqvit_models::{Classifier, Layer, Mode, Probe, QParamTable, Quantized, SiteId};
use fqvit_ops::QParams;
use fqvit_tensor::{Axis, Quantizer};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Damping added to `H`'s diagonal, as a fraction of its mean (GPTQ's default): it keeps the
/// factorization defined where inputs are collinear and bounds the error pushed forward.
const DAMP: f64 = 0.01;

/// Columns rounded between two updates of the rest (GPTQ's lazy batch): the column loop runs
/// inside a block, and one matrix product carries the block's errors to the later columns.
const BLOCK: usize = 128;

/// GPTQ's pass: `Σ x xᵀ/‖x‖²` over the tokens `x` of every linear layer's input in the
/// quantized forward (the weights at their nearest codes), by weight site (module docs).
pub struct LinearInputs {
    /// The linear layers' module names (the probe's keys), weight sites and, for the patch
    /// convolution, its patch side.
    modules: Vec<(String, SiteId, Option<i64>)>,
    /// Per weight site, the running sum (float64) and its count of tokens.
    sums: Vec<Option<(Tensor, i64)>>,
}

impl LinearInputs {
    /// Sums for every linear layer of `model`.
    pub fn new(model: &dyn Classifier) -> Self {
        let sites = model.sites();
        let modules = model
            .layers()
            .into_iter()
            .filter_map(|l| match l {
                Layer::Linear(l) => Some((sites.get(l.site()).original.clone(), l.site(), None)),
                Layer::Conv2d(c) => {
                    Some((sites.get(c.site()).original.clone(), c.site(), Some(c.stride())))
                }
                _ => None,
            })
            .collect();
        LinearInputs { modules, sums: (0..sites.len()).map(|_| None).collect() }
    }

    /// One batch of normalized `images` through `model`'s quantized forward under `state`.
    pub fn batch(&mut self, model: &dyn Classifier, state: &Quantized, images: &Tensor) {
        let mode = &mut Mode::Quantized { state, probe: Some(self) };
        let _logits = tch::no_grad(|| model.forward(images, mode));
    }

    /// `E[x xᵀ/‖x‖²]` by weight site, in forward order.
    pub fn grams(self) -> Vec<(SiteId, Tensor)> {
        self.sums
            .into_iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|(sum, n)| (SiteId::from_index(i), sum / n as f64)))
            .collect()
    }
}

impl Probe for LinearInputs {
    /// Each batch's product in float32 (a few tens of thousands of terms), the sum in float64;
    /// an all-zero token stays zero.
    fn input(&mut self, module: &str, index: usize, xs: &Tensor) -> Option<Tensor> {
        let found = self.modules.iter().find(|(m, ..)| m == module).map(|&(_, s, p)| (s, p));
        if let (0, Some((site, patch))) = (index, found) {
            let size = xs.size();
            let rows = match (patch, &size[..]) {
                // (B, C, H, W) as rows of patches (B·H/k·W/k, C·k·k), each patch's values in
                // the weight's order; pixels past the last whole patch, which the strided
                // convolution never reads, left out.
                (Some(k), &[b, c, h, w]) => xs
                    .narrow(2, 0, h / k * k)
                    .narrow(3, 0, w / k * k)
                    .reshape([b, c, h / k, k, w / k, k])
                    .permute([0, 2, 4, 1, 3, 5])
                    .reshape([-1, c * k * k]),
                _ => xs.reshape([-1, *size.last().unwrap_or(&1)]),
            };
            let rows = rows.to_kind(Kind::Float);
            let norms = rows
                .square()
                .sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
                .sqrt()
                .clamp_min(1e-12);
            let rows = &rows / norms;
            let gram = rows.tr().mm(&rows).to_kind(Kind::Double);
            let n = rows.size()[0];
            let slot = &mut self.sums[site.index()];
            *slot = Some(match slot.take() {
                Some((total, count)) => (total + gram, count + n),
                None => (gram, n),
            });
        }
        None
    }

    fn output(&mut self, _: &str, _: &Tensor) -> Option<Tensor> {
        None
    }
}

/// GPTQ's weights for every linear layer with a gram matrix, by weight site (float32, each a
/// fixed point of its site's quantizer); nothing in `model` changes.
///
/// # Errors
/// [`Error::WeightRounding`] naming the first site whose inputs or weights are not finite, or
/// whose inputs are all zero.
pub fn round_weights(
    model: &dyn Classifier,
    table: &QParamTable,
    grams: &[(SiteId, Tensor)],
) -> Result<Vec<(SiteId, Tensor)>> {
    let sites = model.sites();
    let mut rounded = Vec::with_capacity(grams.len());
    for (site, h) in grams {
        let (Some(w), Some(p)) = (model.weight(*site), table.get(*site)) else { continue };
        let fail =
            |reason: String| Error::WeightRounding { site: sites.get(*site).name.clone(), reason };
        // A convolution's weight as the matrix of its patches, and back.
        let matrix = w.reshape([w.size()[0], -1]);
        let dequant = tch::no_grad(|| round_layer(&matrix, h, p)).map_err(fail)?;
        let dequant = dequant.to_kind(Kind::Float).to_device(w.device()).reshape(w.size());
        rounded.push((*site, Quantizer::new(p, Axis::First, w.device()).fake_quant(&dequant)));
        tracing::debug!(site = %sites.get(*site).name, "weights rounded by gptq");
    }
    Ok(rounded)
}

/// One layer: the dequantized GPTQ weights `(out, in)` in float64, from float32 weights `w`,
/// the inputs' gram matrix `h` `(in, in)` ([`LinearInputs::grams`]) and the frozen per-row
/// grids `p`.
fn round_layer(w: &Tensor, h: &Tensor, p: &QParams) -> std::result::Result<Tensor, String> {
    let (rows, cols) = match w.size()[..] {
        [r, c] => (r as usize, c as usize),
        _ => return Err("the weight is not a matrix".into()),
    };
    if h.size() != [cols as i64, cols as i64] {
        return Err(format!("the inputs have {:?} channels, the weight {cols}", h.size()));
    }
    let finite = |t: &Tensor| t.isfinite().all().int64_value(&[]) == 1;
    if !finite(w) {
        return Err("the weights are not finite".into());
    }
    if !finite(h) {
        return Err("the layer's inputs are not finite".into());
    }
    let h = h.to_kind(Kind::Double).to_device(tch::Device::Cpu);
    let diag = h.diagonal(0, 0, 1);
    let mean = diag.mean(Kind::Double).double_value(&[]);
    if mean <= 0.0 {
        return Err("the layer's inputs are all zero over the calibration images".into());
    }
    // A column whose input is always zero gets a unit diagonal: it then takes its nearest code
    // and passes no error on.
    let dead = diag.eq(0.0).to_kind(Kind::Double);
    let h = &h + (dead + DAMP * mean).diag_embed(0, 0, 1);
    // The columns with the most input energy first ("act order").
    let order = diag.argsort(0, true);
    let h = h.index_select(0, &order).index_select(1, &order);
    let u = h
        .f_linalg_cholesky(false)
        .and_then(|l| l.cholesky_inverse(false).f_linalg_cholesky(true))
        .map_err(|e| format!("H is not positive definite after damping: {e}"))?;
    let u = u.contiguous();
    let ut = u.shallow_clone();
    let u: Vec<f64> = Vec::try_from(u.view([-1])).map_err(|e: tch::TchError| e.to_string())?;
    let wt = w.to_device(tch::Device::Cpu).to_kind(Kind::Double).index_select(1, &order);
    let grid = Grid::new(p, rows)?;
    let q = Tensor::zeros([rows as i64, cols as i64], (Kind::Double, tch::Device::Cpu));
    for j0 in (0..cols).step_by(BLOCK) {
        let j1 = (j0 + BLOCK).min(cols);
        let b = j1 - j0;
        // The block column-major: column j's rows contiguous.
        let block = wt.narrow(1, j0 as i64, b as i64).tr().contiguous();
        let mut wb: Vec<f64> =
            Vec::try_from(block.view([-1])).map_err(|e: tch::TchError| e.to_string())?;
        let mut qb = vec![0.0f64; b * rows];
        let mut eb = vec![0.0f64; b * rows];
        for j in 0..b {
            let ujj = u[(j0 + j) * cols + j0 + j];
            for r in 0..rows {
                let x = wb[j * rows + r];
                let qx = grid.nearest(r, x);
                qb[j * rows + r] = qx;
                eb[j * rows + r] = (x - qx) / ujj;
            }
            let ej = &eb[j * rows..(j + 1) * rows];
            for k in j + 1..b {
                let ujk = u[(j0 + j) * cols + j0 + k];
                for (wk, e) in wb[k * rows..(k + 1) * rows].iter_mut().zip(ej) {
                    *wk -= e * ujk;
                }
            }
        }
        let as_rows = |v: Vec<f64>| Tensor::from_slice(&v).view([b as i64, rows as i64]).tr();
        q.narrow(1, j0 as i64, b as i64).copy_(&as_rows(qb));
        if j1 < cols {
            let u_rest = ut.narrow(0, j0 as i64, b as i64).narrow(1, j1 as i64, (cols - j1) as i64);
            let update = as_rows(eb).mm(&u_rest);
            let mut rest = wt.narrow(1, j1 as i64, (cols - j1) as i64);
            let _ = rest.g_sub_(&update);
        }
    }
    Ok(q.index_select(1, &order.argsort(0, false)))
}

/// The frozen per-row grids of one weight site, in float64.
struct Grid {
    scale: Vec<f64>,
    zero: Vec<f64>,
    lo: f64,
    hi: f64,
}

impl Grid {
    fn new(p: &QParams, rows: usize) -> std::result::Result<Self, String> {
        let per_row = |v: Vec<f64>, what: &str| match v.len() {
            1 => Ok(vec![v[0]; rows]),
            n if n == rows => Ok(v),
            n => Err(format!("{n} {what}s for {rows} output channels")),
        };
        let scale = per_row(p.scale.iter().map(|&s| f64::from(s)).collect(), "scale")?;
        let zero = per_row(p.zero_point.iter().map(|&z| f64::from(z)).collect(), "zero point")?;
        if scale.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err("a scale is not finite and positive".into());
        }
        Ok(Grid {
            scale,
            zero,
            lo: f64::from(p.bit_type.lower()),
            hi: f64::from(p.bit_type.upper()),
        })
    }

    /// Row `r`'s nearest code to `x`, dequantized.
    fn nearest(&self, r: usize, x: f64) -> f64 {
        let (s, z) = (self.scale[r], self.zero[r]);
        ((x / s + z).round_ties_even().clamp(self.lo, self.hi) - z) * s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fqvit_ops::{BitType, Bits};

    /// Per-row 4-bit grids for `w` `(out, in)`: each row's minmax, symmetric.
    fn grids(w: &Tensor) -> QParams {
        let bits = Bits::try_from(4).unwrap();
        let bit_type = BitType { bits, signed: true };
        let max: Vec<f32> = Vec::try_from(w.abs().amax([1i64].as_slice(), false)).unwrap();
        QParams {
            bit_type,
            scale: max.iter().map(|m| m / bit_type.upper() as f32).collect(),
            zero_point: vec![0; max.len()],
            ptf: None,
        }
    }

    /// `tr((Ŵ − W) H (Ŵ − W)ᵀ)`: the mean squared output error over the inputs of `H`.
    fn output_error(w: &Tensor, wq: &Tensor, h: &Tensor) -> f64 {
        let d = (wq.to_kind(Kind::Double) - w.to_kind(Kind::Double)).contiguous();
        (d.mm(h) * &d).sum(Kind::Double).double_value(&[])
    }

    fn nearest(w: &Tensor, p: &QParams) -> Tensor {
        Quantizer::new(p, Axis::First, tch::Device::Cpu).fake_quant(w)
    }

    fn gptq(w: &Tensor, h: &Tensor, p: &QParams) -> Tensor {
        let dequant = round_layer(w, h, p).unwrap().to_kind(Kind::Float);
        Quantizer::new(p, Axis::First, tch::Device::Cpu).fake_quant(&dequant)
    }

    /// Correlated inputs (mixed Gaussians) over more columns than one block: the codes GPTQ
    /// picks give a smaller output error than the nearest codes, by a wide margin (the
    /// published effect), and they are codes of the same grids.
    #[test]
    fn correlated_inputs_lower_the_output_error() {
        let (w, h) = fqvit_testkit::seeded(3, || {
            let opts = (Kind::Float, tch::Device::Cpu);
            let x = Tensor::randn([2048, 300], opts).mm(&Tensor::randn([300, 300], opts));
            let h = x.to_kind(Kind::Double).tr().mm(&x.to_kind(Kind::Double)) / 2048.0;
            (Tensor::randn([24, 300], opts), h)
        });
        let p = grids(&w);
        let (near, rounded) = (nearest(&w, &p), gptq(&w, &h, &p));
        let quantizer = Quantizer::new(&p, Axis::First, tch::Device::Cpu);
        assert!(quantizer.fake_quant(&rounded).equal(&rounded), "not codes of the grids");
        let (e_near, e_gptq) = (output_error(&w, &near, &h), output_error(&w, &rounded, &h));
        assert!(e_gptq < 0.5 * e_near, "gptq {e_gptq:e} against nearest {e_near:e}");
    }

    /// Uncorrelated inputs (a diagonal `H`) leave nothing to compensate: every code is the
    /// nearest one.
    #[test]
    fn a_diagonal_hessian_gives_the_nearest_codes() {
        let (w, d) = fqvit_testkit::seeded(4, || {
            let opts = (Kind::Float, tch::Device::Cpu);
            (Tensor::randn([16, 200], opts), Tensor::rand([200], opts) + 0.1)
        });
        let h = d.to_kind(Kind::Double).diag_embed(0, 0, 1);
        let p = grids(&w);
        assert!(gptq(&w, &h, &p).equal(&nearest(&w, &p)));
    }

    /// Bad input is refused with the reason, never a panic.
    #[test]
    fn non_finite_or_empty_inputs_are_refused() {
        let w = Tensor::ones([2, 3], (Kind::Float, tch::Device::Cpu));
        let p = grids(&w);
        let h = Tensor::eye(3, (Kind::Double, tch::Device::Cpu));
        let err = round_layer(&w, &(&h * f64::NAN), &p).unwrap_err();
        assert!(err.contains("inputs are not finite"), "{err}");
        let err = round_layer(&w, &(&h * 0.0), &p).unwrap_err();
        assert!(err.contains("all zero"), "{err}");
        let err = round_layer(&(&w * f64::INFINITY), &h, &p).unwrap_err();
        assert!(err.contains("weights are not finite"), "{err}");
        let err = round_layer(&w, &Tensor::eye(4, (Kind::Double, tch::Device::Cpu)), &p);
        assert!(err.unwrap_err().contains("channels"));
    }
}
