//! One description of each network, run by three interpreters.
//!
//! A model's composites (its top level, blocks, MLP, patch merging) are written once, as
//! generic `run` functions over a [`Net`], whose methods are the program's ops. Three
//! interpreters run them:
//!
//! - [`Sim`]: the tch simulation on float tensors in any [`Mode`] (the forward the
//!   conformance tests hold to the original, float order included);
//! - [`Program`]: the integer program (`fqvit-program`) the engine runs;
//! - [`Layers`]: the convolutions, linear layers, LayerNorms and softmaxes in forward order
//!   ([`Quantizable::layers`](crate::Quantizable::layers)).
//!
//! So the simulation and the program agree on structure by construction. An op particular to
//! one family (ViT's embedding and heads, Swin's window attention) is a [`Leaf`]: its tensor
//! arithmetic and its program op sit side by side on the type that owns it, and this module
//! names no model.

use fqvit_ops::softmax::LisBits;
use fqvit_program::{Builder, Op, Value};
use tch::{Kind, Tensor};

use crate::Preprocess;
use crate::mode::Mode;
use crate::quant::{Act, Conv2d, Layer, LayerNorm, Linear};
use crate::site::SiteTable;

/// An op with its two forms, owned by the model type that has it.
pub(crate) trait Leaf {
    /// The tensor arithmetic, in any mode.
    fn forward(&self, x: &Tensor, mode: &mut Mode<'_>) -> Tensor;
    /// The program op(s).
    fn program(&self, b: &mut Builder, sites: &SiteTable, x: Value) -> Value;
    /// The layers it holds, in forward order.
    fn layers(&self) -> Vec<Layer<'_>>;
}

/// The ops a network is written in; `V` is what flows between them.
pub(crate) trait Net<'m> {
    /// A tensor, a program value, or nothing.
    type V;

    /// The normalized image quantized at `site` (DeiT, Swin), or as it is (ViT).
    fn quantize_image(&mut self, site: Option<&'m Act>, x: &Self::V) -> Self::V;
    /// The patch convolution, flattened to tokens, onto `out`.
    fn patch_embed(&mut self, conv: &'m Conv2d, out: &'m Act, x: &Self::V) -> Self::V;
    /// A LayerNorm onto its out-site.
    fn layer_norm(&mut self, ln: &'m LayerNorm, x: &Self::V) -> Self::V;
    /// A LayerNorm onto its out-site, of token `index` only (the result has no token axis).
    fn token_layer_norm(&mut self, ln: &'m LayerNorm, x: &Self::V, index: usize) -> Self::V;
    /// A linear layer (then GELU) onto `out`.
    fn linear(&mut self, layer: &'m Linear, x: &Self::V, gelu: bool, out: &'m Act) -> Self::V;
    /// An op of one family ([`Leaf`]).
    fn leaf(&mut self, op: &'m dyn Leaf, x: &Self::V) -> Self::V;
    /// Swin's 2 × 2 neighbours concatenated on channels.
    fn patch_merge(&mut self, resolution: i64, x: &Self::V) -> Self::V;
    /// `a + b` onto `out`.
    fn add(&mut self, a: &Self::V, b: &Self::V, out: &'m Act) -> Self::V;
    /// The mean over tokens onto `out`.
    fn mean_tokens(&mut self, x: &Self::V, out: &'m Act) -> Self::V;
}

/// The tch simulation in `mode`.
pub(crate) struct Sim<'a, 'b> {
    pub(crate) mode: &'a mut Mode<'b>,
}

impl<'m> Net<'m> for Sim<'_, '_> {
    type V = Tensor;

    fn quantize_image(&mut self, site: Option<&'m Act>, x: &Tensor) -> Tensor {
        match site {
            Some(site) => site.forward(x, self.mode),
            None => x.shallow_clone(),
        }
    }

    fn patch_embed(&mut self, conv: &'m Conv2d, out: &'m Act, x: &Tensor) -> Tensor {
        let x = conv.forward(x, self.mode).flatten(2, -1).transpose(1, 2);
        out.forward(&x, self.mode)
    }

    fn layer_norm(&mut self, ln: &'m LayerNorm, x: &Tensor) -> Tensor {
        ln.forward_onto(x, self.mode)
    }

    fn token_layer_norm(&mut self, ln: &'m LayerNorm, x: &Tensor, index: usize) -> Tensor {
        // All tokens, then one: the original's order (the trace records the whole LayerNorm).
        let x = ln.forward(x, self.mode).select(1, index as i64);
        ln.onto(&x, self.mode)
    }

    fn linear(&mut self, layer: &'m Linear, x: &Tensor, gelu: bool, out: &'m Act) -> Tensor {
        let x = layer.forward(x, self.mode);
        let x = if gelu { x.gelu("none") } else { x };
        out.forward(&x, self.mode)
    }

    fn leaf(&mut self, op: &'m dyn Leaf, x: &Tensor) -> Tensor {
        op.forward(x, self.mode)
    }

    fn patch_merge(&mut self, resolution: i64, x: &Tensor) -> Tensor {
        // (B, L, C) → (B, L/4, 4C): each 2 × 2 neighbourhood as [x(0,0), x(1,0), x(0,1), x(1,1)].
        let (b, _, c) = x.size3().expect("patch merging input is (B, L, C)");
        let half = resolution / 2;
        x.view([b, half, 2, half, 2, c]).permute([0, 1, 3, 4, 2, 5]).reshape([
            b,
            half * half,
            4 * c,
        ])
    }

    fn add(&mut self, a: &Tensor, b: &Tensor, out: &'m Act) -> Tensor {
        out.forward(&(a + b), self.mode)
    }

    fn mean_tokens(&mut self, x: &Tensor, out: &'m Act) -> Tensor {
        out.forward(&x.mean_dim([1i64].as_slice(), false, Kind::Float), self.mode)
    }
}

/// The integer program's builder, naming sites from `sites`.
pub(crate) struct Program<'s> {
    pub(crate) b: Builder,
    pub(crate) sites: &'s SiteTable,
}

impl<'s> Program<'s> {
    /// A program of 8-bit images of side `size` normalized as `pp`, and that first value.
    pub(crate) fn new(
        sites: &'s SiteTable,
        lis_bits: Option<LisBits>,
        size: i64,
        pp: Preprocess,
    ) -> (Self, Value) {
        let mut b = Builder::new(lis_bits);
        let normalize = fqvit_program::Normalize { mean: pp.mean, std: pp.std };
        let image = b.push(Op::Image { size: size as usize, normalize });
        (Program { b, sites }, image)
    }

    /// The program, ending at `logits`.
    pub(crate) fn finish(mut self, logits: Value) -> fqvit_program::Program {
        self.b.push(Op::Output { input: logits });
        self.b.finish()
    }

    fn name(&self, act: &Act) -> String {
        self.sites.get(act.site()).name.clone()
    }
}

impl<'m> Net<'m> for Program<'_> {
    type V = Value;

    fn quantize_image(&mut self, site: Option<&'m Act>, x: &Value) -> Value {
        match site {
            Some(site) => {
                let site = self.name(site);
                self.b.push(Op::QuantizeImage { input: *x, site })
            }
            None => *x,
        }
    }

    fn patch_embed(&mut self, conv: &'m Conv2d, out: &'m Act, x: &Value) -> Value {
        let op = Op::PatchEmbed {
            input: *x,
            layer: self.sites.get(conv.site()).name.clone(),
            patch: conv.stride() as usize,
            out_site: self.name(out),
        };
        self.b.push(op)
    }

    fn layer_norm(&mut self, ln: &'m LayerNorm, x: &Value) -> Value {
        ln.program(&mut self.b, self.sites, *x)
    }

    fn token_layer_norm(&mut self, ln: &'m LayerNorm, x: &Value, index: usize) -> Value {
        // One token, then its LayerNorm: the same codes (it is per token), 1/197 of the work.
        let x = self.b.push(Op::SelectToken { input: *x, index });
        ln.program(&mut self.b, self.sites, x)
    }

    fn linear(&mut self, layer: &'m Linear, x: &Value, gelu: bool, out: &'m Act) -> Value {
        layer.program(&mut self.b, self.sites, *x, gelu, out.site())
    }

    fn leaf(&mut self, op: &'m dyn Leaf, x: &Value) -> Value {
        op.program(&mut self.b, self.sites, *x)
    }

    fn patch_merge(&mut self, resolution: i64, x: &Value) -> Value {
        self.b.push(Op::PatchMerge { input: *x, resolution: resolution as usize })
    }

    fn add(&mut self, a: &Value, b: &Value, out: &'m Act) -> Value {
        let out_site = self.name(out);
        self.b.push(Op::Add { a: *a, b: *b, out_site })
    }

    fn mean_tokens(&mut self, x: &Value, out: &'m Act) -> Value {
        let out_site = self.name(out);
        self.b.push(Op::MeanTokens { input: *x, out_site })
    }
}

/// The layers that carry more than one site, in forward order.
#[derive(Default)]
pub(crate) struct Layers<'m> {
    pub(crate) layers: Vec<Layer<'m>>,
}

impl<'m> Net<'m> for Layers<'m> {
    type V = ();

    fn quantize_image(&mut self, _: Option<&'m Act>, _: &()) {}

    fn patch_embed(&mut self, conv: &'m Conv2d, _: &'m Act, _: &()) {
        self.layers.push(Layer::Conv2d(conv));
    }

    fn layer_norm(&mut self, ln: &'m LayerNorm, _: &()) {
        self.layers.push(Layer::LayerNorm(ln));
    }

    fn token_layer_norm(&mut self, ln: &'m LayerNorm, _: &(), _: usize) {
        self.layers.push(Layer::LayerNorm(ln));
    }

    fn linear(&mut self, layer: &'m Linear, _: &(), _: bool, _: &'m Act) {
        self.layers.push(Layer::Linear(layer));
    }

    fn leaf(&mut self, op: &'m dyn Leaf, _: &()) {
        self.layers.extend(op.layers());
    }

    fn patch_merge(&mut self, _: i64, _: &()) {}

    fn add(&mut self, _: &(), _: &(), _: &'m Act) {}

    fn mean_tokens(&mut self, _: &(), _: &'m Act) {}
}
