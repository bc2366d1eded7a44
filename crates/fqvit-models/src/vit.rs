//! ViT and DeiT (one definition; DeiT is a ViT with other presets), after timm's
//! `VisionTransformer` and FQ-ViT's `models/vit_quant.py` (spec §8.1).

use tch::nn::{Init, Path};
use tch::{Device, Tensor};

use crate::Preprocess;
use crate::common::{Block, BlockAt, Mixer, act};
use crate::mode::Mode;
use crate::net::{self, Leaf, Net, Sim};
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

/// Self-attention: qkv, the heads, the projection.
#[derive(Debug)]
struct Attention {
    qkv: Linear,
    qkv_out: Act,
    heads: Heads,
    proj: Linear,
    proj_out: Act,
}

/// The heads between qkv and the projection: scores, softmax and context, one program op.
#[derive(Debug)]
struct Heads {
    scores: Act,
    softmax: Softmax,
    context: Act,
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
        let heads = Heads {
            softmax: Softmax::new(format!("{o}.softmax"), scores.site(), probs),
            scores,
            context,
            num_heads: cfg.num_heads,
            scale: (head_dim as f64).powf(-0.5),
        };
        Attention { qkv, qkv_out, heads, proj, proj_out }
    }
}

impl Mixer for Attention {
    fn run<'m, N: Net<'m>>(&'m self, n: &mut N, x: &N::V) -> N::V {
        let qkv = n.linear(&self.qkv, x, false, &self.qkv_out);
        let ctx = n.leaf(&self.heads, &qkv);
        n.linear(&self.proj, &ctx, false, &self.proj_out)
    }
}

impl Leaf for Heads {
    fn layers(&self) -> Vec<Layer<'_>> {
        vec![Layer::Softmax(&self.softmax)]
    }

    /// One op on the qkv codes.
    fn program(&self, b: &mut Builder, sites: &SiteTable, qkv: Value) -> Value {
        let name = |id: SiteId| sites.get(id).name.clone();
        b.push(Op::Attention {
            input: qkv,
            heads: self.num_heads as usize,
            lis_bits: b.lis_bits(),
            scores_site: name(self.scores.site()),
            out_site: name(self.context.site()),
        })
    }

    /// `(B, N, 3C)` qkv to the context `(B, N, C)` on its site.
    fn forward(&self, qkv: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        let (b, n, c3) = qkv.size3().expect("attention input is (B, N, 3C)");
        let c = c3 / 3;
        let qkv =
            qkv.reshape([b, n, 3, self.num_heads, c / self.num_heads]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        // FQ-ViT scales after the matmul (timm scales q before it; equal up to rounding).
        let attn = q.matmul(&k.transpose(-2, -1)) * self.scale;
        let attn = self.scores.forward(&attn, mode);
        let attn = self.softmax.forward(&attn, mode);
        let x = attn.matmul(&v).transpose(1, 2).reshape([b, n, c]);
        self.context.forward(&x, mode)
    }
}

/// The class token and the position embedding, added onto the embedding's sites.
#[derive(Debug)]
struct Embedding {
    cls_token: Tensor,
    pos_embed: Tensor,
    embed: Act,
    pos: Act,
    embed_sum: Act,
}

impl Leaf for Embedding {
    fn layers(&self) -> Vec<Layer<'_>> {
        Vec::new()
    }

    /// One op on the patch codes.
    fn program(&self, b: &mut Builder, sites: &SiteTable, x: Value) -> Value {
        let name = |id: SiteId| sites.get(id).name.clone();
        b.push(Op::Embed {
            input: x,
            cls: "cls_token".into(),
            pos: "pos_embed".into(),
            embed_site: name(self.embed.site()),
            pos_site: name(self.pos.site()),
            out_site: name(self.embed_sum.site()),
        })
    }

    /// `[cls, patches] + pos` of the patch tokens `(B, P, D)`.
    fn forward(&self, x: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        let cls = self.cls_token.expand([x.size()[0], -1, -1], false);
        let x = Tensor::cat(&[cls, x.shallow_clone()], 1);
        let x = self.embed.forward(&x, mode) + self.pos.forward(&self.pos_embed, mode);
        self.embed_sum.forward(&x, mode)
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
    embedding: Embedding,
    blocks: Vec<Block<Attention>>,
    norm: LayerNorm,
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
        let mut blocks: Vec<Block<Attention>> = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let (bp, prefix) = (p / "blocks" / i, format!("blocks.{i}"));
            let at = BlockAt {
                p: &bp,
                prefix: &prefix,
                dim: d,
                hidden: d * cfg.mlp_ratio,
                eps: cfg.eps,
                last_q: blocks.last().map_or(embed_sum.site(), Block::out_site),
            };
            blocks.push(Block::new(s, &at, |s| Attention::new(&(&bp / "attn"), s, &prefix, cfg)));
        }
        let last_q = blocks.last().map_or(embed_sum.site(), Block::out_site);
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
            embedding: Embedding { cls_token, pos_embed, embed, pos, embed_sum },
            blocks,
            norm,
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
        self.run(&mut Sim { mode }, xs)
    }
}

impl Vit {
    /// The network, once, for every interpreter ([`crate::net`]).
    fn run<'m, N: Net<'m>>(&'m self, n: &mut N, image: &N::V) -> N::V {
        let x = n.quantize_image(self.input.as_ref(), image);
        let x = n.patch_embed(&self.patch_proj, &self.patch_out, &x);
        let mut x = n.leaf(&self.embedding, &x);
        for (i, block) in self.blocks.iter().enumerate() {
            let _span = tracing::trace_span!("block", i).entered();
            x = block.run(n, &x);
        }
        let x = n.token_layer_norm(&self.norm, &x, 0);
        n.linear(&self.head, &x, false, &self.logits)
    }
}

impl Quantizable for Vit {
    fn sites(&self) -> &SiteTable {
        &self.sites
    }

    fn device(&self) -> Device {
        self.device
    }

    fn program(&self, lis_bits: Option<fqvit_ops::softmax::LisBits>) -> Option<Program> {
        let (mut p, image) =
            net::Program::new(&self.sites, lis_bits, self.cfg.img_size, self.cfg.preprocess);
        let logits = self.run(&mut p, &image);
        Some(p.finish(logits))
    }

    fn layers(&self) -> Vec<Layer<'_>> {
        let mut layers = net::Layers::default();
        self.run(&mut layers, &());
        layers.layers
    }
}
