//! ViT and DeiT (one definition; DeiT is a ViT with other presets), after timm's
//! `VisionTransformer` and FQ-ViT's `models/vit_quant.py` (spec §8.1).

use tch::nn::{Init, Path};
use tch::{Device, Tensor};

use crate::Preprocess;
use crate::common::{Mlp, act};
use crate::mode::Mode;
use crate::quant::{Act, Classifier, Conv2d, Layer, LayerNorm, Linear, Quantizable, Softmax};
use crate::site::{SiteId, SiteTable, TensorClass};
use fqvit_program::{Builder, Op, Program, Value};

/// Architecture hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    /// Token width D.
    pub embed_dim: i64,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads (head dim = D / heads = 64 for every preset).
    pub num_heads: i64,
    /// MLP hidden width = `mlp_ratio · D`.
    pub mlp_ratio: i64,
    /// Patch side.
    pub patch_size: i64,
    /// Input side.
    pub img_size: i64,
    /// Classes.
    pub num_classes: i64,
    /// LayerNorm epsilon (1e-6).
    pub eps: f64,
    /// Whether the normalized image is quantized (`qact_input`): DeiT yes, ViT no (spec §8.1).
    pub input_quant: bool,
    /// Input preprocessing (DeiT or ViT family).
    pub preprocess: Preprocess,
}

impl Config {
    const fn base(embed_dim: i64, depth: usize, num_heads: i64, input_quant: bool) -> Self {
        // FQ-ViT quantizes the input of DeiT (ImageNet normalization) but not of ViT (0.5/0.5).
        let preprocess = if input_quant { Preprocess::DEIT } else { Preprocess::VIT };
        Config {
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4,
            patch_size: 16,
            img_size: 224,
            num_classes: 1000,
            eps: 1e-6,
            input_quant,
            preprocess,
        }
    }

    /// timm `vit_tiny_patch16_224`: DeiT-Tiny's shape, AugReg weights, no input quantization.
    pub const fn vit_tiny() -> Self {
        Config::base(192, 12, 3, false)
    }
    /// timm `deit_tiny_patch16_224` (FQ-ViT `deit_tiny_patch16_224`).
    pub const fn deit_tiny() -> Self {
        Config::base(192, 12, 3, true)
    }
    /// timm `deit_small_patch16_224`.
    pub const fn deit_small() -> Self {
        Config::base(384, 12, 6, true)
    }
    /// timm `deit_base_patch16_224`.
    pub const fn deit_base() -> Self {
        Config::base(768, 12, 12, true)
    }
    /// timm `vit_base_patch16_224` (AugReg).
    pub const fn vit_base() -> Self {
        Config::base(768, 12, 12, false)
    }
    /// timm `vit_large_patch16_224` (AugReg).
    pub const fn vit_large() -> Self {
        Config::base(1024, 24, 16, false)
    }

    /// Tokens: patches plus the class token.
    pub const fn num_tokens(&self) -> i64 {
        (self.img_size / self.patch_size) * (self.img_size / self.patch_size) + 1
    }
}

#[derive(Debug)]
struct Attention {
    qkv: Linear,
    qkv_out: Act,
    scores: Act,
    softmax: Softmax,
    context: Act,
    proj: Linear,
    proj_out: Act,
    num_heads: i64,
    scale: f64,
}

impl Attention {
    fn new(p: &Path<'_>, sites: &mut SiteTable, prefix: &str, cfg: &Config) -> Self {
        let (d, o) = (cfg.embed_dim, format!("{prefix}.attn"));
        let qkv = Linear::new(
            &(p / "qkv"),
            sites,
            &format!("{o}.qkv"),
            &format!("{o}.qkv"),
            d,
            3 * d,
            true,
        );
        let qkv_out = act(sites, &o, "qkv_out", "qact1", TensorClass::Activation, 3 * d);
        let scores =
            act(sites, &o, "attn_scores", "qact_attn1", TensorClass::Activation, cfg.num_heads);
        let probs =
            act(sites, &o, "attn_probs", "log_int_softmax", TensorClass::Softmax, cfg.num_heads);
        let context = act(sites, &o, "context", "qact2", TensorClass::Activation, d);
        let proj = Linear::new(
            &(p / "proj"),
            sites,
            &format!("{o}.proj"),
            &format!("{o}.proj"),
            d,
            d,
            true,
        );
        let proj_out = act(sites, &o, "proj_out", "qact3", TensorClass::Activation, d);
        let head_dim = d / cfg.num_heads;
        Attention {
            qkv,
            qkv_out,
            softmax: Softmax::new(format!("{o}.softmax"), scores.site(), probs),
            scores,
            context,
            proj,
            proj_out,
            num_heads: cfg.num_heads,
            scale: (head_dim as f64).powf(-0.5),
        }
    }

    /// The integer form of [`Attention::forward`] on `input` (the LayerNorm's out-site codes).
    fn program(&self, b: &mut Builder, sites: &SiteTable, input: Value) -> Value {
        let name = |id: SiteId| sites.get(id).name.clone();
        let qkv = self.qkv.program(b, sites, input, false, self.qkv_out.site());
        let ctx = b.push(Op::Attention {
            input: qkv,
            heads: self.num_heads as usize,
            lis_bits: b.lis_bits(),
            scores_site: name(self.scores.site()),
            out_site: name(self.context.site()),
        });
        self.proj.program(b, sites, ctx, false, self.proj_out.site())
    }

    fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        let (b, n, c) = xs.size3().expect("attention input is (B, N, C)");
        let qkv = self.qkv_out.forward(&self.qkv.forward(xs, mode), mode);
        let qkv =
            qkv.reshape([b, n, 3, self.num_heads, c / self.num_heads]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        // FQ-ViT scales after the matmul (timm scales q before it; equal up to rounding).
        let attn = q.matmul(&k.transpose(-2, -1)) * self.scale;
        let attn = self.scores.forward(&attn, mode);
        let attn = self.softmax.forward(&attn, mode);
        let x = attn.matmul(&v).transpose(1, 2).reshape([b, n, c]);
        let x = self.context.forward(&x, mode);
        let x = self.proj.forward(&x, mode);
        self.proj_out.forward(&x, mode)
    }
}

#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    norm1_out: Act,
    attn: Attention,
    residual1: Act,
    norm2: LayerNorm,
    norm2_out: Act,
    mlp: Mlp,
    residual2: Act,
}

impl Block {
    fn new(
        p: &Path<'_>,
        sites: &mut SiteTable,
        index: usize,
        cfg: &Config,
        last_q: SiteId,
    ) -> Self {
        let (d, o) = (cfg.embed_dim, format!("blocks.{index}"));
        let norm1_out = act(sites, &o, "norm1_out", "qact1", TensorClass::Activation, d);
        let ln = |name: &str| format!("{o}.{name}");
        let norm1 = LayerNorm::new(
            &(p / "norm1"),
            ln("norm1"),
            ln("norm1"),
            d,
            cfg.eps,
            last_q,
            norm1_out.site(),
        );
        let attn = Attention::new(&(p / "attn"), sites, &o, cfg);
        let residual1 = act(sites, &o, "residual1", "qact2", TensorClass::LayerNormInput, d);
        let norm2_out = act(sites, &o, "norm2_out", "qact3", TensorClass::Activation, d);
        let norm2 = LayerNorm::new(
            &(p / "norm2"),
            ln("norm2"),
            ln("norm2"),
            d,
            cfg.eps,
            residual1.site(),
            norm2_out.site(),
        );
        let mlp = Mlp::new(&(p / "mlp"), sites, &o, d, d * cfg.mlp_ratio);
        let residual2 = act(sites, &o, "residual2", "qact4", TensorClass::LayerNormInput, d);
        Block { norm1, norm1_out, attn, residual1, norm2, norm2_out, mlp, residual2 }
    }

    /// The integer form of [`Block::forward`].
    fn program(&self, b: &mut Builder, sites: &SiteTable, xs: Value) -> Value {
        let name = |id: SiteId| sites.get(id).name.clone();
        let h = self.norm1.program(b, sites, xs);
        let a = self.attn.program(b, sites, h);
        let x = b.push(Op::Add { a: xs, b: a, out_site: name(self.residual1.site()) });
        let h = self.norm2.program(b, sites, x);
        let m = self.mlp.program(b, sites, h);
        b.push(Op::Add { a: x, b: m, out_site: name(self.residual2.site()) })
    }

    fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        let h = self.norm1_out.forward(&self.norm1.forward(xs, mode), mode);
        let x = self.residual1.forward(&(xs + self.attn.forward(&h, mode)), mode);
        let h = self.norm2_out.forward(&self.norm2.forward(&x, mode), mode);
        self.residual2.forward(&(&x + self.mlp.forward(&h, mode)), mode)
    }
}

/// A ViT or DeiT classifier with its quantization sites.
#[derive(Debug)]
pub struct Vit {
    cfg: Config,
    sites: SiteTable,
    device: Device,
    input: Option<Act>,
    patch_proj: Conv2d,
    patch_out: Act,
    cls_token: Tensor,
    pos_embed: Tensor,
    embed: Act,
    pos: Act,
    embed_sum: Act,
    blocks: Vec<Block>,
    norm: LayerNorm,
    norm_out: Act,
    head: Linear,
    logits: Act,
}

impl Vit {
    /// Builds the model with randomly initialised variables under `p` (timm key names).
    pub fn new(p: &Path<'_>, cfg: &Config) -> Self {
        let mut sites = SiteTable::default();
        let d = cfg.embed_dim;
        let t = cfg.num_tokens();
        let s = &mut sites;
        let input =
            cfg.input_quant.then(|| act(s, "", "input", "qact_input", TensorClass::Activation, 3));
        let pe = p / "patch_embed";
        let patch_proj = Conv2d::new(
            &(&pe / "proj"),
            s,
            "patch_embed.proj",
            "patch_embed.proj",
            3,
            d,
            cfg.patch_size,
        );
        let patch_out = act(s, "patch_embed", "out", "qact", TensorClass::Activation, d);
        let cls_token = p.var("cls_token", &[1, 1, d], Init::Randn { mean: 0.0, stdev: 1e-6 });
        let pos_embed = p.var("pos_embed", &[1, t, d], Init::Randn { mean: 0.0, stdev: 0.02 });
        let embed = act(s, "", "embed", "qact_embed", TensorClass::Activation, d);
        let pos = act(s, "", "pos_embed", "qact_pos", TensorClass::Activation, d);
        let embed_sum = act(s, "", "embed_sum", "qact1", TensorClass::LayerNormInput, d);
        let mut blocks: Vec<Block> = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let last_q = blocks.last().map_or(embed_sum.site(), |b| b.residual2.site());
            blocks.push(Block::new(&(p / "blocks" / i), s, i, cfg, last_q));
        }
        let last_q = blocks.last().map_or(embed_sum.site(), |b| b.residual2.site());
        let norm_out = act(s, "", "norm_out", "qact2", TensorClass::Activation, d);
        let norm = LayerNorm::new(
            &(p / "norm"),
            "norm".into(),
            "norm".into(),
            d,
            cfg.eps,
            last_q,
            norm_out.site(),
        );
        let head = Linear::new(&(p / "head"), s, "head", "head", d, cfg.num_classes, true);
        let logits = act(s, "", "logits", "act_out", TensorClass::Activation, cfg.num_classes);
        Vit {
            cfg: *cfg,
            sites,
            device: p.device(),
            input,
            patch_proj,
            patch_out,
            cls_token,
            pos_embed,
            embed,
            pos,
            embed_sum,
            blocks,
            norm,
            norm_out,
            head,
            logits,
        }
    }

    /// The architecture.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Logits `(B, classes)` of normalized images `(B, 3, H, W)`.
    pub fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        Classifier::forward(self, xs, mode)
    }
}

impl Classifier for Vit {
    fn preprocess(&self) -> Preprocess {
        self.cfg.preprocess
    }

    fn architecture(&self) -> crate::Architecture {
        crate::Architecture::Vit(self.cfg)
    }

    fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        let _span = tracing::trace_span!("vit.forward").entered();
        let x = match &self.input {
            Some(input) => input.forward(xs, mode),
            None => xs.shallow_clone(),
        };
        let x = self.patch_proj.forward(&x, mode).flatten(2, -1).transpose(1, 2);
        let x = self.patch_out.forward(&x, mode);
        let cls = self.cls_token.expand([x.size()[0], -1, -1], false);
        let x = Tensor::cat(&[cls, x], 1);
        let x = self.embed.forward(&x, mode) + self.pos.forward(&self.pos_embed, mode);
        let mut x = self.embed_sum.forward(&x, mode);
        for (i, block) in self.blocks.iter().enumerate() {
            let _span = tracing::trace_span!("block", i).entered();
            x = block.forward(&x, mode);
        }
        let x = self.norm.forward(&x, mode).select(1, 0);
        let x = self.norm_out.forward(&x, mode);
        let x = self.head.forward(&x, mode);
        self.logits.forward(&x, mode)
    }
}

impl Quantizable for Vit {
    fn sites(&self) -> &SiteTable {
        &self.sites
    }

    fn device(&self) -> Device {
        self.device
    }

    /// Mirrors [`Classifier::forward`] op for op, except that the final LayerNorm runs on the
    /// class token only (it is per token, so selecting first gives the same codes).
    fn program(&self, lis_bits: Option<fqvit_ops::softmax::LisBits>) -> Option<Program> {
        let sites = &self.sites;
        let name = |id: SiteId| sites.get(id).name.clone();
        let mut b = Builder::new(lis_bits);
        let image = crate::common::image_op(&mut b, self.cfg.img_size, self.cfg.preprocess);
        let x = match &self.input {
            Some(input) => b.push(Op::QuantizeImage { input: image, site: name(input.site()) }),
            None => image,
        };
        let x = b.push(Op::PatchEmbed {
            input: x,
            layer: name(self.patch_proj.site()),
            patch: self.cfg.patch_size as usize,
            out_site: name(self.patch_out.site()),
        });
        let mut x = b.push(Op::Embed {
            input: x,
            cls: "cls_token".into(),
            pos: "pos_embed".into(),
            embed_site: name(self.embed.site()),
            pos_site: name(self.pos.site()),
            out_site: name(self.embed_sum.site()),
        });
        for block in &self.blocks {
            x = block.program(&mut b, sites, x);
        }
        let x = b.push(Op::SelectToken { input: x, index: 0 });
        let x = self.norm.program(&mut b, sites, x);
        let x = self.head.program(&mut b, sites, x, false, self.logits.site());
        b.push(Op::Output { input: x });
        Some(b.finish())
    }

    fn layers(&self) -> Vec<Layer<'_>> {
        let mut out = vec![Layer::Conv2d(&self.patch_proj)];
        for b in &self.blocks {
            out.extend([
                Layer::LayerNorm(&b.norm1),
                Layer::Linear(&b.attn.qkv),
                Layer::Softmax(&b.attn.softmax),
                Layer::Linear(&b.attn.proj),
                Layer::LayerNorm(&b.norm2),
                Layer::Linear(&b.mlp.fc1),
                Layer::Linear(&b.mlp.fc2),
            ]);
        }
        out.extend([Layer::LayerNorm(&self.norm), Layer::Linear(&self.head)]);
        out
    }
}
