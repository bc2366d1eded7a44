//! The quantization-aware layers (`quant::Act`, `quant::Linear`, ...). Each matches on [`Mode`]
//! in one place; in quantized mode each runs as one probed module (see [`Probe`](super::Probe)).

use fqvit_program::{Builder, Op, Value};
use tch::{Kind, Tensor};

use super::Wiring;
use super::probe::module;
use crate::mode::Mode;
use crate::site::{SiteId, SiteTable, TensorClass};

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
            Mode::Quantized { state, probe } => {
                module(probe, state.module_name(self.site), xs, |x| state.fake_quant(self.site, x))
            }
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

    /// Its integer op: `input` codes through this layer (and GELU) onto `out_site`'s grid.
    pub(crate) fn program(
        &self,
        b: &mut Builder,
        sites: &SiteTable,
        input: Value,
        gelu: bool,
        out_site: SiteId,
    ) -> Value {
        b.push(Op::Linear {
            input,
            layer: sites.get(self.site).name.clone(),
            bias: self.bias.is_some(),
            gelu,
            out_site: sites.get(out_site).name.clone(),
        })
    }

    /// `xs · Wᵀ + b`, with the fake-quantized weight when quantized.
    pub fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        match mode {
            Mode::Float => xs.linear(&self.weight, self.bias.as_ref()),
            Mode::Calibrate { sink, .. } => {
                sink.observe_input(self.site, xs);
                sink.observe(self.site, &self.weight);
                xs.linear(&self.weight, self.bias.as_ref())
            }
            Mode::Quantized { state, probe } => {
                module(probe, state.module_name(self.site), xs, |x| {
                    x.linear(state.weight(self.site), self.bias.as_ref())
                })
            }
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

    /// Its kernel side and stride (the patch side).
    pub fn stride(&self) -> i64 {
        self.stride
    }

    /// Convolution with stride = kernel, no padding.
    pub fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        let conv = |x: &Tensor, w: &Tensor| {
            x.conv2d(w, Some(&self.bias), [self.stride, self.stride], [0, 0], [1, 1], 1)
        };
        match mode {
            Mode::Float => conv(xs, &self.weight),
            Mode::Calibrate { sink, .. } => {
                sink.observe(self.site, &self.weight);
                conv(xs, &self.weight)
            }
            Mode::Quantized { state, probe } => {
                module(probe, state.module_name(self.site), xs, |x| {
                    conv(x, state.weight(self.site))
                })
            }
        }
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
    pub(crate) in_site: SiteId,
    pub(crate) out_site: SiteId,
    pub(crate) in_expand: i64,
    /// The parameter prefix (timm's name).
    prefix: String,
    /// The original's module name.
    original: String,
}

impl LayerNorm {
    /// A LayerNorm whose parameters live under `p` (named `prefix`, the original's module being
    /// `original`), reading `in_site` and `out_site`.
    pub(crate) fn new(
        p: &tch::nn::Path<'_>,
        prefix: String,
        original: String,
        dim: i64,
        eps: f64,
        in_site: SiteId,
        out_site: SiteId,
    ) -> Self {
        let weight = p.var("weight", &[dim], tch::nn::Init::Const(1.0));
        let bias = p.var("bias", &[dim], tch::nn::Init::Const(0.0));
        LayerNorm { weight, bias, eps, in_site, out_site, in_expand: 1, prefix, original }
    }

    /// Its output site.
    pub fn out_site(&self) -> SiteId {
        self.out_site
    }

    /// Reparameterizes output channel `c` as `(x_c + shift_c)/scale_c` and `next`, the linear
    /// layer that reads it, so that `next`'s output is unchanged (RepQ-ViT's reparameterization
    /// of post-LayerNorm activations): `γ ← γ/scale`, `β ← (β + shift)/scale`, `W[:, c] ←
    /// W[:, c]·scale_c`, `b ← b − W·shift` with the old `W`. In float64, then stored in the
    /// parameters' kind, in place.
    ///
    /// # Errors
    /// When `next` has no bias, or a shape does not fit.
    pub fn fold_into(
        &self,
        next: &Linear,
        scale: &Tensor,
        shift: &Tensor,
    ) -> Result<(), tch::TchError> {
        let bias = next.bias.as_ref().ok_or_else(|| {
            tch::TchError::Kind(format!("{}: the next layer has no bias", self.prefix))
        })?;
        tch::no_grad(|| {
            let d = |t: &Tensor| t.to_kind(tch::Kind::Double);
            let (scale, shift) = (d(scale), d(shift));
            let w = d(&next.weight);
            let gamma = d(&self.weight).f_div(&scale)?;
            let beta = (d(&self.bias) + &shift).f_div(&scale)?;
            let weight = w.f_mul(&scale.unsqueeze(0))?;
            let b = d(bias).f_sub(&w.f_mv(&shift)?)?;
            self.weight.shallow_clone().f_copy_(&gamma.to_kind(self.weight.kind()))?;
            self.bias.shallow_clone().f_copy_(&beta.to_kind(self.bias.kind()))?;
            next.weight.shallow_clone().f_copy_(&weight.to_kind(next.weight.kind()))?;
            bias.shallow_clone().f_copy_(&b.to_kind(bias.kind()))?;
            Ok(())
        })
    }

    /// Which sites it reads its scales from.
    pub(crate) fn wiring(&self) -> Wiring {
        Wiring {
            consumer: self.prefix.clone(),
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

    /// Its integer op: `input` codes (on its in-site) normalized onto `out_site`'s grid.
    pub(crate) fn program(&self, b: &mut Builder, sites: &SiteTable, input: Value) -> Value {
        let out_site = sites.get(self.out_site).name.clone();
        b.push(Op::LayerNorm { input, norm: self.prefix.clone(), out_site })
    }

    /// [`LayerNorm::forward`] onto its out-site.
    pub(crate) fn forward_onto(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        let x = self.forward(xs, mode);
        self.onto(&x, mode)
    }

    /// Its output onto its out-site.
    pub(crate) fn onto(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        Act { site: self.out_site }.forward(xs, mode)
    }

    /// Normalizes the last dimension.
    pub fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        let float = |x: &Tensor| {
            x.layer_norm(
                [self.weight.size()[0]],
                Some(&self.weight),
                Some(&self.bias),
                self.eps,
                false,
            )
        };
        match mode {
            Mode::Float | Mode::Calibrate { .. } => float(xs),
            Mode::Quantized { state, probe } => {
                module(probe, &self.original, xs, |x| match state.int_layer_norm(self.out_site) {
                    Some(ln) => ln.forward(x),
                    None => float(x),
                })
            }
        }
    }
}

/// The attention softmax (`QIntSoftmax`): float softmax then a uint8 site, or Log-Int-Softmax
/// with the scale of the site before it.
#[derive(Debug)]
pub struct Softmax {
    in_site: SiteId,
    out: Act,
    /// `<attention>.softmax`, its name in the wiring.
    consumer: String,
}

impl Softmax {
    pub(crate) fn new(consumer: String, in_site: SiteId, out: Act) -> Self {
        Softmax { in_site, out, consumer }
    }

    /// The site whose scale LIS uses.
    pub(crate) fn wiring(&self) -> Wiring {
        Wiring {
            consumer: self.consumer.clone(),
            in_site: self.in_site,
            out_site: None,
            in_expand: 1,
        }
    }

    /// Its output site (the uniform uint8 quantizer when LIS is off).
    pub(crate) fn out_site(&self) -> SiteId {
        self.out.site()
    }

    /// Softmax over the last dimension.
    pub fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        match mode {
            Mode::Float => xs.softmax(-1, Kind::Float),
            Mode::Calibrate { sink, options } => {
                match (options.lis_bits, sink.frozen(self.in_site)) {
                    // FQ-ViT runs LIS whenever the scale exists, so the last calibration batch
                    // already uses it, on logits that are not fake-quantized (spec §7.1).
                    (Some(bits), Some(params)) => {
                        fqvit_tensor::LogIntSoftmax::new(params.scale[0], bits, xs.device())
                            .with_exp_shift(options.lis_exp_shift)
                            .forward(xs)
                    }
                    (Some(_), None) => xs.softmax(-1, Kind::Float),
                    (None, _) => self.out.forward(&xs.softmax(-1, Kind::Float), mode),
                }
            }
            Mode::Quantized { state, probe } => {
                let site = self.out.site();
                let name = state.module_name(site);
                match state.log_int_softmax(site) {
                    Some(lis) => {
                        if let Some(p) = probe.as_mut() {
                            let scale = Tensor::from(lis.scale()).to_device(xs.device());
                            let _ = p.input(name, 1, &scale);
                        }
                        module(probe, name, xs, |x| lis.forward(x))
                    }
                    None => module(probe, name, xs, |x| {
                        state.fake_quant(site, &x.softmax(-1, Kind::Float))
                    }),
                }
            }
        }
    }
}
