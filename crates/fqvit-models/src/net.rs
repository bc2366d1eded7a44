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
//! So the simulation and the program agree on structure by construction. An op's own two forms
//! (its tensor arithmetic and its program op) sit side by side on the layer that owns it.

use fqvit_ops::softmax::LisBits;
use fqvit_program::{Builder, Op, Value};
use tch::{Kind, Tensor};

use crate::mode::Mode;
use crate::quant::{Act, Conv2d, Layer, LayerNorm, Linear};
use crate::site::SiteTable;
use crate::{Preprocess, swin, vit};

/// The ops a network is written in; `V` is what flows between them.
pub(crate) trait Net<'m> {
    /// A tensor, a program value, or nothing.
    type V;

    /// The normalized image quantized at `site` (DeiT, Swin), or as it is (ViT).
    fn quantize_image(&mut self, site: Option<&'m Act>, x: &Self::V) -> Self::V;
    /// The patch convolution, flattened to tokens, onto `out`.
    fn patch_embed(&mut self, conv: &'m Conv2d, out: &'m Act, x: &Self::V) -> Self::V;
    /// ViT's class token and position embedding.
    fn embed(&mut self, embedding: &'m vit::Embedding, x: &Self::V) -> Self::V;
    /// A LayerNorm onto its out-site.
    fn layer_norm(&mut self, ln: &'m LayerNorm, x: &Self::V) -> Self::V;
    /// A LayerNorm onto its out-site, of token `index` only (the result has no token axis).
    fn token_layer_norm(&mut self, ln: &'m LayerNorm, x: &Self::V, index: usize) -> Self::V;
    /// A linear layer (then GELU) onto `out`.
    fn linear(&mut self, layer: &'m Linear, x: &Self::V, gelu: bool, out: &'m Act) -> Self::V;
    /// ViT's heads: the qkv codes to the context, onto its site.
    fn attention(&mut self, heads: &'m vit::Heads, qkv: &Self::V) -> Self::V;
    /// Swin's shifted-window attention from the LayerNorm's codes to the projection's.
    fn window_attention(&mut self, attn: &'m swin::WindowAttention, x: &Self::V) -> Self::V;
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

    fn embed(&mut self, embedding: &'m vit::Embedding, x: &Tensor) -> Tensor {
        embedding.forward(x, self.mode)
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

    fn attention(&mut self, heads: &'m vit::Heads, qkv: &Tensor) -> Tensor {
        heads.forward(qkv, self.mode)
    }

    fn window_attention(&mut self, attn: &'m swin::WindowAttention, x: &Tensor) -> Tensor {
        attn.forward_tokens(x, self.mode)
    }

    fn patch_merge(&mut self, resolution: i64, x: &Tensor) -> Tensor {
        swin::merge_patches(x, resolution)
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

    fn embed(&mut self, embedding: &'m vit::Embedding, x: &Value) -> Value {
        embedding.program(&mut self.b, self.sites, *x)
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

    fn attention(&mut self, heads: &'m vit::Heads, qkv: &Value) -> Value {
        heads.program(&mut self.b, self.sites, *qkv)
    }

    fn window_attention(&mut self, attn: &'m swin::WindowAttention, x: &Value) -> Value {
        attn.program(&mut self.b, self.sites, *x)
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

    fn embed(&mut self, _: &'m vit::Embedding, _: &()) {}

    fn layer_norm(&mut self, ln: &'m LayerNorm, _: &()) {
        self.layers.push(Layer::LayerNorm(ln));
    }

    fn token_layer_norm(&mut self, ln: &'m LayerNorm, _: &(), _: usize) {
        self.layers.push(Layer::LayerNorm(ln));
    }

    fn linear(&mut self, layer: &'m Linear, _: &(), _: bool, _: &'m Act) {
        self.layers.push(Layer::Linear(layer));
    }

    fn attention(&mut self, heads: &'m vit::Heads, _: &()) {
        self.layers.push(Layer::Softmax(heads.softmax()));
    }

    fn window_attention(&mut self, attn: &'m swin::WindowAttention, _: &()) {
        self.layers.extend(attn.layers());
    }

    fn patch_merge(&mut self, _: i64, _: &()) {}

    fn add(&mut self, _: &(), _: &(), _: &'m Act) {}

    fn mean_tokens(&mut self, _: &(), _: &'m Act) {}
}
