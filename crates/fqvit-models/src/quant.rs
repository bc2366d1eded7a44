//! The quantization-aware layers (`quant::Act`, `quant::Linear`, ...) and the frozen state of a
//! quantized model ([`Quantized`]). Each layer matches on [`Mode`] in one place.

use fqvit_ops::QParams;
use fqvit_ops::layer_norm::{InScale, LayerNormParams, ptf_layer_norm};
use fqvit_ops::softmax::LisConstants;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::mode::{Mode, QuantOptions};
use crate::site::{QParamTable, SiteId, SiteTable, TensorClass};

/// An activation quantization site (the original's `QAct`).
#[derive(Debug)]
pub struct Act {
    site: SiteId,
}

impl Act {
    pub(crate) fn new(
        sites: &mut SiteTable,
        name: String,
        original: String,
        class: TensorClass,
        channels: usize,
    ) -> Self {
        Act { site: sites.push(name, original, class, channels) }
    }

    /// The site.
    pub fn site(&self) -> SiteId {
        self.site
    }

    /// Identity in float mode, observes when calibrating, fake-quantizes when quantized.
    pub fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        match mode {
            Mode::Float => xs.shallow_clone(),
            Mode::Calibrate { sink, .. } => {
                sink.observe(self.site, xs);
                xs.shallow_clone()
            }
            Mode::Quantized(q) => q.fake_quant(self.site, xs),
        }
    }
}

/// A linear layer with an int8 per-output-channel weight site (`QLinear`). The bias stays float.
#[derive(Debug)]
pub struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    site: SiteId,
}

impl Linear {
    pub(crate) fn new(
        p: &tch::nn::Path<'_>,
        sites: &mut SiteTable,
        name: &str,
        original: &str,
        in_dim: i64,
        out_dim: i64,
        bias: bool,
    ) -> Self {
        let weight =
            p.var("weight", &[out_dim, in_dim], tch::nn::Init::Randn { mean: 0.0, stdev: 0.02 });
        let bias = bias.then(|| p.var("bias", &[out_dim], tch::nn::Init::Const(0.0)));
        Linear {
            weight,
            bias,
            site: sites.push(name, original, TensorClass::Weight, out_dim as usize),
        }
    }

    /// The weight site.
    pub fn site(&self) -> SiteId {
        self.site
    }

    /// `xs · Wᵀ + b`, with the fake-quantized weight when quantized.
    pub fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        match mode {
            Mode::Float => xs.linear(&self.weight, self.bias.as_ref()),
            Mode::Calibrate { sink, .. } => {
                sink.observe(self.site, &self.weight);
                xs.linear(&self.weight, self.bias.as_ref())
            }
            Mode::Quantized(q) => xs.linear(q.weight(self.site), self.bias.as_ref()),
        }
    }
}

/// A 2-D convolution (the patch embedding) with an int8 weight site (`QConv2d`).
#[derive(Debug)]
pub struct Conv2d {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    stride: i64,
    site: SiteId,
}

impl Conv2d {
    pub(crate) fn new(
        p: &tch::nn::Path<'_>,
        sites: &mut SiteTable,
        name: &str,
        original: &str,
        in_ch: i64,
        out_ch: i64,
        kernel: i64,
    ) -> Self {
        let weight = p.var(
            "weight",
            &[out_ch, in_ch, kernel, kernel],
            tch::nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        );
        let bias = p.var("bias", &[out_ch], tch::nn::Init::Const(0.0));
        Conv2d {
            weight,
            bias,
            stride: kernel,
            site: sites.push(name, original, TensorClass::Weight, out_ch as usize),
        }
    }

    /// The weight site.
    pub fn site(&self) -> SiteId {
        self.site
    }

    /// Convolution with stride = kernel, no padding.
    pub fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        let weight = match mode {
            Mode::Float => &self.weight,
            Mode::Calibrate { sink, .. } => {
                sink.observe(self.site, &self.weight);
                &self.weight
            }
            Mode::Quantized(q) => q.weight(self.site),
        };
        xs.conv2d(weight, Some(&self.bias), [self.stride, self.stride], [0, 0], [1, 1], 1)
    }
}

/// LayerNorm (`QIntLayerNorm`): float, or integer on PTF codes when quantized with `--ptf`.
///
/// It reads its input scale from the site before it and its output scale from the site after.
#[derive(Debug)]
pub struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    eps: f64,
    in_site: SiteId,
    out_site: SiteId,
    in_expand: i64,
}

impl LayerNorm {
    pub(crate) fn new(
        p: &tch::nn::Path<'_>,
        dim: i64,
        eps: f64,
        in_site: SiteId,
        out_site: SiteId,
    ) -> Self {
        let weight = p.var("weight", &[dim], tch::nn::Init::Const(1.0));
        let bias = p.var("bias", &[dim], tch::nn::Init::Const(0.0));
        LayerNorm { weight, bias, eps, in_site, out_site, in_expand: 1 }
    }

    /// Which sites it reads its scales from, as `consumer`.
    pub(crate) fn wiring(&self, consumer: String) -> Wiring {
        Wiring {
            consumer,
            in_site: self.in_site,
            out_site: Some(self.out_site),
            in_expand: self.in_expand,
        }
    }

    /// The input is `expand` tensors of the in-site concatenated on channels (Swin's patch
    /// merging: 4), so its per-channel scales repeat `expand` times (spec §6 `in_scale_expand`).
    pub(crate) fn with_in_expand(self, expand: i64) -> Self {
        LayerNorm { in_expand: expand, ..self }
    }

    /// Normalizes the last dimension.
    pub fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        match mode {
            Mode::Quantized(q) if q.options.int_layer_norm => q.int_layer_norm(self, xs),
            _ => xs.layer_norm(
                [self.weight.size()[0]],
                Some(&self.weight),
                Some(&self.bias),
                self.eps,
                false,
            ),
        }
    }
}

/// The attention softmax (`QIntSoftmax`): float softmax then a uint8 site, or Log-Int-Softmax
/// with the scale of the site before it.
#[derive(Debug)]
pub struct Softmax {
    in_site: SiteId,
    out: Act,
}

impl Softmax {
    pub(crate) fn new(in_site: SiteId, out: Act) -> Self {
        Softmax { in_site, out }
    }

    /// The site whose scale LIS uses, as `consumer`.
    pub(crate) fn wiring(&self, consumer: String) -> Wiring {
        Wiring { consumer, in_site: self.in_site, out_site: None, in_expand: 1 }
    }

    /// Softmax over the last dimension.
    pub fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        match mode {
            Mode::Float => xs.softmax(-1, Kind::Float),
            Mode::Calibrate { sink, options } => {
                match (options.lis_bits, sink.frozen(self.in_site)) {
                    // FQ-ViT runs LIS whenever the scale exists, so the last calibration batch
                    // already uses it, on logits that are not fake-quantized (spec §7.1).
                    (Some(bits), Some(params)) => log_int_softmax(xs, params.scale[0], bits),
                    (Some(_), None) => xs.softmax(-1, Kind::Float),
                    (None, _) => self.out.forward(&xs.softmax(-1, Kind::Float), mode),
                }
            }
            Mode::Quantized(q) => match q.options.lis_bits {
                Some(bits) => log_int_softmax(
                    xs,
                    q.table.get(self.in_site).map_or(f32::NAN, |p| p.scale[0]),
                    bits,
                ),
                None => q.fake_quant(self.out.site, &xs.softmax(-1, Kind::Float)),
            },
        }
    }
}

/// Log-Int-Softmax on float logits with the original's semantics, as powers of two (or 0).
///
/// The same float32 steps as `fqvit_ops::softmax::reference::log_int_softmax_f32`, written as
/// tensor operations so that the row sum is libtorch's own (its vectorised summation order, as in
/// the original; a different order moves `round(Σ/e)` at exact boundaries) and the work stays on
/// the tensor's device. The integer constants come from `fqvit_ops`.
pub fn log_int_softmax(xs: &Tensor, scale: f32, bits: u32) -> Tensor {
    let k = LisConstants::new(scale);
    let (i0, ib, ic) = (k.i0 as f64, k.ib as f64, k.ic as f64);
    let n = f64::from(fqvit_ops::softmax::reference::N);
    let s = Tensor::from(scale).to_device(xs.device());
    let x = xs.to_kind(Kind::Float) / &s;
    let x = &x - x.amax([-1i64].as_slice(), true);
    let x = x.clamp_min(n * i0);
    let q = (&x / i0).floor();
    let r = &x - &q * i0;
    let z = &r * (&r + ib) + ic;
    let e = (z * (-&q + n).exp2()).floor().clamp_min(0.0);
    let sum = e.sum_dim_intlist([-1i64].as_slice(), true, Kind::Float);
    let u = (sum / &e).round();
    // log_round: ⌊log2 u⌋, plus one where u − 2^k ≥ 2^(k−1).
    let big = u.log2().floor();
    let extra = (&u - big.exp2()).ge_tensor(&(&big - 1.0).exp2());
    let big = &big + extra.to_kind(Kind::Float);
    let zero = f64::from(1u32 << bits);
    let mask = big.ge(zero);
    let qlog = big.clamp(0.0, zero - 1.0);
    (-qlog).exp2().masked_fill(&mask, 0.0)
}

fn to_vec_f32(xs: &Tensor) -> Vec<f32> {
    let flat = xs.to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view(-1);
    Vec::<f32>::try_from(&flat).expect("a float tensor converts to Vec<f32>")
}

/// Per-site fake-quantization constants on the model's device.
#[derive(Debug)]
enum ActParams {
    Layer { scale: f64, zero: f64, lo: f64, hi: f64 },
    Channel { scale: Tensor, zero: Tensor, lo: f64, hi: f64 },
}

impl ActParams {
    fn new(p: &QParams, device: Device) -> Self {
        let (lo, hi) = (f64::from(p.bit_type.lower()), f64::from(p.bit_type.upper()));
        if p.scale.len() == 1 && p.zero_point.len() == 1 {
            ActParams::Layer {
                scale: f64::from(p.scale[0]),
                zero: f64::from(p.zero_point[0]),
                lo,
                hi,
            }
        } else {
            let zero: Vec<f32> = p.zero_point.iter().map(|&z| z as f32).collect();
            ActParams::Channel {
                scale: Tensor::from_slice(&p.scale).to_device(device),
                zero: Tensor::from_slice(&zero).to_device(device),
                lo,
                hi,
            }
        }
    }

    /// `clamp(round(x / s + z), lo, hi)`, as float codes.
    ///
    /// One new tensor, then in-place steps: the same float32 operations in the same order as
    /// the original's chain (so the same values), without an allocation per step.
    fn codes(&self, xs: &Tensor) -> Tensor {
        let mut q = match self {
            ActParams::Layer { scale, zero, .. } => {
                let mut q = xs / *scale;
                let _ = q.g_add_scalar_(*zero);
                q
            }
            ActParams::Channel { scale, zero, .. } => {
                let mut q = xs / scale;
                let _ = q.g_add_(zero);
                q
            }
        };
        let (lo, hi) = self.range();
        let _ = q.round_();
        let _ = q.clamp_(lo, hi);
        q
    }

    fn range(&self) -> (f64, f64) {
        match self {
            ActParams::Layer { lo, hi, .. } | ActParams::Channel { lo, hi, .. } => (*lo, *hi),
        }
    }

    /// `(codes − z) · s`, in place on the codes.
    fn fake_quant(&self, xs: &Tensor) -> Tensor {
        let mut q = self.codes(xs);
        match self {
            ActParams::Layer { scale, zero, .. } => {
                let _ = q.g_sub_scalar_(*zero);
                let _ = q.g_mul_scalar_(*scale);
            }
            ActParams::Channel { scale, zero, .. } => {
                let _ = q.g_sub_(zero);
                let _ = q.g_mul_(scale);
            }
        }
        q
    }
}

/// What a model exposes so it can be quantized.
pub trait Quantizable {
    /// Its sites, in forward order.
    fn sites(&self) -> &SiteTable;
    /// The float weight of a weight site.
    fn weight(&self, site: SiteId) -> Option<&Tensor>;
    /// The device its variables live on.
    fn device(&self) -> Device;
    /// Every integer LayerNorm and softmax with the sites it reads, in forward order.
    fn wiring(&self) -> Vec<Wiring>;
}

/// Where an integer LayerNorm or a Log-Int-Softmax takes its scales from (spec §8.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wiring {
    /// The LayerNorm's parameter prefix (`blocks.0.norm1`) or the attention's softmax
    /// (`blocks.0.attn.softmax`).
    pub consumer: String,
    /// The site whose codes and scale(s) it reads.
    pub in_site: SiteId,
    /// The site whose scale its output codes use (LayerNorm only).
    pub out_site: Option<SiteId>,
    /// How many times the in-site's channels repeat across the input (4 for patch merging).
    pub in_expand: i64,
}

/// A classifier: what evaluation and calibration need of a model.
pub trait Classifier: Quantizable {
    /// Logits `(B, classes)` of normalized images `(B, 3, H, W)`.
    fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor;
    /// How its input images are prepared.
    fn preprocess(&self) -> crate::Preprocess;
    /// Its family and hyper-parameters.
    fn architecture(&self) -> crate::Architecture;
}

/// A model's frozen quantization state: the parameter table, the options, and the
/// fake-quantized weights (computed once; the original recomputes identical ones every call).
#[derive(Debug)]
pub struct Quantized {
    table: QParamTable,
    options: QuantOptions,
    sites: SiteTable,
    weights: Vec<Option<Tensor>>,
    acts: Vec<Option<ActParams>>,
}

impl Quantized {
    /// Checks `table` against the model's sites and prepares the quantized forward.
    ///
    /// Fails, naming the site, when a used site has no parameters, the wrong number of
    /// channels, or (with integer LayerNorm) a LayerNorm input that is neither layer-wise nor PTF.
    pub fn new(model: &dyn Quantizable, table: QParamTable, options: QuantOptions) -> Result<Self> {
        let sites = model.sites().clone();
        if table.len() != sites.len() {
            return Err(Error::Site {
                site: "*".into(),
                reason: format!("the table has {} sites, the model {}", table.len(), sites.len()),
            });
        }
        let device = model.device();
        let mut weights = Vec::with_capacity(sites.len());
        let mut acts = Vec::with_capacity(sites.len());
        for (id, site) in sites.iter() {
            let bad = |reason: String| Error::Site { site: site.name.clone(), reason };
            let used = !(site.class == TensorClass::Softmax && options.lis_bits.is_some());
            let Some(params) = table.get(id).filter(|_| used) else {
                if used {
                    return Err(bad("has no calibrated parameters".into()));
                }
                weights.push(None);
                acts.push(None);
                continue;
            };
            let n = params.scale.len();
            if params.zero_point.len() != n && params.zero_point.len() != 1 {
                return Err(bad(format!("{n} scales but {} zero points", params.zero_point.len())));
            }
            if params.scale.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                return Err(bad("has a scale that is not positive and finite".into()));
            }
            if site.class == TensorClass::Weight {
                if n != site.channels {
                    return Err(bad(format!(
                        "{n} weight scales for {} output channels",
                        site.channels
                    )));
                }
                let w =
                    model.weight(id).ok_or_else(|| bad("is not a weight of this model".into()))?;
                weights.push(Some(fake_quant_weight(w, params)));
                acts.push(None);
                continue;
            }
            if n != 1 && n != site.channels {
                return Err(bad(format!("{n} scales for {} channels", site.channels)));
            }
            if options.int_layer_norm
                && site.class == TensorClass::LayerNormInput
                && n != 1
                && params.ptf.is_none()
            {
                return Err(bad(
                    "feeds an integer LayerNorm but is channel-wise without PTF factors".into(),
                ));
            }
            weights.push(None);
            acts.push(Some(ActParams::new(params, device)));
        }
        Ok(Quantized { table, options, sites, weights, acts })
    }

    /// The parameter table.
    pub fn table(&self) -> &QParamTable {
        &self.table
    }

    /// The options.
    pub fn options(&self) -> QuantOptions {
        self.options
    }

    fn act(&self, site: SiteId) -> &ActParams {
        self.acts[site.index()].as_ref().unwrap_or_else(|| {
            panic!("site {} has no activation parameters", self.sites.get(site).name)
        })
    }

    fn fake_quant(&self, site: SiteId, xs: &Tensor) -> Tensor {
        self.act(site).fake_quant(xs)
    }

    fn weight(&self, site: SiteId) -> &Tensor {
        self.weights[site.index()]
            .as_ref()
            .unwrap_or_else(|| panic!("site {} has no weight", self.sites.get(site).name))
    }

    /// The integer LayerNorm of `fqvit_ops` on the codes of the input site (spec §6).
    fn int_layer_norm(&self, ln: &LayerNorm, xs: &Tensor) -> Tensor {
        let (p_in, p_out) = (&self.table.get(ln.in_site), &self.table.get(ln.out_site));
        let (Some(p_in), Some(p_out)) = (p_in, p_out) else {
            panic!("integer LayerNorm after {} lacks parameters", self.sites.get(ln.in_site).name)
        };
        let shape = xs.size();
        let channels = *shape.last().expect("LayerNorm input has channels");
        // Channel-wise in-scales cover one of the `in_expand` concatenated parts.
        let parts = xs.reshape([-1, ln.in_expand, channels / ln.in_expand]);
        let codes: Vec<u8> =
            to_vec_f32(&self.act(ln.in_site).codes(&parts)).into_iter().map(|q| q as u8).collect();
        let n_channels = *shape.last().expect("LayerNorm input has channels") as usize;
        let factors = p_in.ptf.as_ref().map(|f| crate::quant::tile(f, n_channels));
        let in_scale = match &factors {
            Some(f) => {
                InScale::Ptf { base: p_in.scale[0] / f32::from(1u8 << f[0].get()), factors: f }
            }
            None => InScale::Layer(p_in.scale[0]),
        };
        let (gamma, beta) = (to_vec_f32(&ln.weight), to_vec_f32(&ln.bias));
        let params = LayerNormParams {
            in_scale,
            zero_point: p_in.zero_point[0],
            gamma: &gamma,
            beta: &beta,
            out_scale: p_out.scale[0],
        };
        let mut y = vec![0i32; codes.len()];
        ptf_layer_norm(&codes, &params, &mut y);
        let out_scale = p_out.scale[0];
        let ys: Vec<f32> = y.into_iter().map(|v| v as f32 * out_scale).collect();
        Tensor::from_slice(&ys).view(shape.as_slice()).to_device(xs.device())
    }
}

/// The float weight of `site` among a model's patch convolution and linear layers.
pub(crate) fn find_weight<'a>(
    conv: &'a Conv2d,
    linears: impl IntoIterator<Item = &'a Linear>,
    site: SiteId,
) -> Option<&'a Tensor> {
    if conv.site() == site {
        return Some(&conv.weight);
    }
    linears.into_iter().find(|l| l.site() == site).map(|l| &l.weight)
}

/// Repeats per-channel factors to cover `n` channels (Swin's patch merging concatenates four
/// neighbours of one quantized tensor, spec §6 `in_scale_expand`).
pub(crate) fn tile<T: Copy>(xs: &[T], n: usize) -> Vec<T> {
    xs.iter().copied().cycle().take(n).collect()
}

/// `((w / s + z).round().clamp(lo, hi) − z) · s` per output channel (spec §4.1).
fn fake_quant_weight(w: &Tensor, p: &QParams) -> Tensor {
    let mut shape = vec![-1i64];
    shape.resize(w.dim(), 1);
    let scale = Tensor::from_slice(&p.scale).to_device(w.device()).view(shape.as_slice());
    let zero: Vec<f32> = p.zero_point.iter().map(|&z| z as f32).collect();
    let zero = Tensor::from_slice(&zero)
        .to_device(w.device())
        .view(if zero.len() == 1 { vec![1i64] } else { shape.clone() }.as_slice());
    let (lo, hi) = (f64::from(p.bit_type.lower()), f64::from(p.bit_type.upper()));
    tch::no_grad(|| ((w / &scale + &zero).round().clamp(lo, hi) - &zero) * &scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fqvit_ops::BitType;

    /// The in-place fake quantization equals the original's out-of-place chain bit for bit, with
    /// values on rounding ties, outside the code range, and per-channel parameters.
    #[test]
    fn in_place_fake_quant_equals_the_chain() {
        tch::manual_seed(7);
        let (s, z) = (0.03125f32, 113i32);
        // Ties: x/s + z = k + 0.5 exactly for these x (s is a power of two).
        let ties = (Tensor::arange_start(-300, 300, (Kind::Float, Device::Cpu)) + 0.5
            - f64::from(z))
            * f64::from(s);
        let xs = Tensor::cat(&[Tensor::randn([4000], (Kind::Float, Device::Cpu)) * 6.0, ties], 0);
        let layer = QParams::layer_wise(BitType::UINT8, s, z);
        let chain =
            |xs: &Tensor, s: &Tensor, z: &Tensor| ((xs / s + z).round().clamp(0.0, 255.0) - z) * s;
        let ours = ActParams::new(&layer, Device::Cpu).fake_quant(&xs);
        let theirs = chain(&xs, &Tensor::from(s), &Tensor::from(z as f32));
        assert!(ours.equal(&theirs), "layer-wise");
        let xs = xs.narrow(0, 0, 4096).reshape([16, 256]);
        let scales: Vec<f32> = (0..256).map(|c| s * (1 << (c % 4)) as f32).collect();
        let channel = QParams {
            bit_type: BitType::UINT8,
            scale: scales.clone(),
            zero_point: vec![z; 256],
            ptf: None,
        };
        let ours = ActParams::new(&channel, Device::Cpu).fake_quant(&xs);
        let theirs = chain(&xs, &Tensor::from_slice(&scales), &Tensor::from(z as f32));
        assert!(ours.equal(&theirs), "channel-wise");
    }
}
