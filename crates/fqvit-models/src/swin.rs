//! Swin Transformer, after timm's `SwinTransformer` (its key layout) and FQ-ViT's
//! `models/swin_quant.py` (its quantization sites, spec §8.2).
//!
//! Tokens stay `(B, L, C)` between blocks; a block views them as `(B, H, W, C)` for the cyclic
//! shift and the window partition. timm puts patch merging at the start of stages 1–3
//! (`layers.{s}.downsample`), the original at the end of stages 0–2; the forward order and the
//! quantization sites are the same, and each site keeps the original's module name.

use tch::nn::{Init, Path};
use tch::{Device, Tensor};

use crate::Preprocess;
use crate::common::{Block, BlockAt, Mixer, act, act_renamed};
use crate::mode::Mode;
use crate::net::{self, Leaf, Net, Sim};
use crate::quant::{Act, Classifier, Conv2d, Layer, LayerNorm, Linear, Quantizable, Softmax};
use crate::site::{SiteId, SiteTable, TensorClass};
use fqvit_program::{Builder, Op, Program, Value, windows};

/// Architecture hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    /// Channels of stage 0 (`C0`); stage `s` has `C0 · 2^s`.
    pub embed_dim: i64,
    /// Blocks per stage.
    pub depths: [usize; 4],
    /// Attention heads per stage.
    pub num_heads: [i64; 4],
    /// Window side (7); the shift is half of it.
    pub window_size: i64,
    /// Patch side (4).
    pub patch_size: i64,
    /// Input side (224).
    pub img_size: i64,
    /// MLP hidden width = `mlp_ratio · C`.
    pub mlp_ratio: i64,
    /// Classes.
    pub num_classes: i64,
    /// LayerNorm epsilon (1e-5).
    pub eps: f64,
    /// Input preprocessing.
    pub preprocess: Preprocess,
}

impl Config {
    const fn base(embed_dim: i64, depths: [usize; 4], num_heads: [i64; 4]) -> Self {
        Config {
            embed_dim,
            depths,
            num_heads,
            window_size: 7,
            patch_size: 4,
            img_size: 224,
            mlp_ratio: 4,
            num_classes: 1000,
            eps: 1e-5,
            preprocess: Preprocess::SWIN,
        }
    }

    /// timm `swin_tiny_patch4_window7_224`.
    pub const fn swin_tiny() -> Self {
        Config::base(96, [2, 2, 6, 2], [3, 6, 12, 24])
    }
    /// timm `swin_small_patch4_window7_224`.
    pub const fn swin_small() -> Self {
        Config::base(96, [2, 2, 18, 2], [3, 6, 12, 24])
    }
    /// timm `swin_base_patch4_window7_224`.
    pub const fn swin_base() -> Self {
        Config::base(128, [2, 2, 18, 2], [4, 8, 16, 32])
    }

    /// A small Swin for tests: four stages of two blocks, embedding 8, windows of 4 shifted by 2
    /// in stages 0 and 1 and one window in stages 2 and 3, on 64-pixel images, 10 classes. The
    /// variant whose timm logits `cargo xtask timm-fixtures` records.
    pub const fn test_variant() -> Self {
        Config {
            embed_dim: 8,
            depths: [2, 2, 2, 2],
            num_heads: [1, 1, 2, 2],
            window_size: 4,
            img_size: 64,
            num_classes: 10,
            ..Config::swin_tiny()
        }
    }

    /// The side of stage `s`'s token grid.
    pub const fn resolution(&self, stage: usize) -> i64 {
        (self.img_size / self.patch_size) >> stage
    }

    /// Stage `s`'s window side and shift: the stage-4 rule makes a grid no larger than the
    /// window one unshifted window (spec §8.2).
    pub const fn window(&self, stage: usize) -> (i64, i64) {
        let res = self.resolution(stage);
        if res <= self.window_size { (res, 0) } else { (self.window_size, self.window_size / 2) }
    }
}

/// Window attention with the relative position bias (spec §8.2, 6 sites).
#[derive(Debug)]
struct WindowAttention {
    qkv: Linear,
    qkv_out: Act,
    scores: Act,
    bias_table: Tensor,
    table_out: Act,
    biased: Act,
    softmax: Softmax,
    context: Act,
    proj: Linear,
    proj_out: Act,
    /// `(N·N,)` indices into the table's rows, computed.
    index: Tensor,
    /// The table's tensor name.
    table_name: String,
    window: i64,
    num_heads: i64,
    scale: f64,
    /// The side of the block's token grid.
    resolution: i64,
    /// The cyclic shift (0 or half a window).
    shift: i64,
    /// The shifted-window mask `(nW, N, N)` when `shift > 0`.
    mask: Option<Tensor>,
}

/// Where a block's attention sits: its stage's geometry.
struct Grid {
    resolution: i64,
    window: i64,
    shift: i64,
}

impl WindowAttention {
    fn new(
        p: &Path<'_>,
        sites: &mut SiteTable,
        prefix: &str,
        dim: i64,
        num_heads: i64,
        grid: Grid,
    ) -> Self {
        let Grid { resolution, window, shift } = grid;
        let o = format!("{prefix}.attn");
        let linear = |sites: &mut SiteTable, name: &str, out_dim| {
            let site = format!("{o}.{name}");
            Linear::new(&(p / name), sites, &site, &site, dim, out_dim, true)
        };
        let qkv = linear(sites, "qkv", 3 * dim);
        let qkv_out = act(sites, &o, "qkv_out", "qact1", TensorClass::Activation, 3 * dim);
        let scores =
            act(sites, &o, "attn_scores", "qact_attn1", TensorClass::Activation, num_heads);
        let rows = (2 * window - 1) * (2 * window - 1);
        let bias_table = p.var(
            "relative_position_bias_table",
            &[rows, num_heads],
            Init::Randn { mean: 0.0, stdev: 0.02 },
        );
        let table_out = act(
            sites,
            &o,
            "relative_position_bias",
            "qact_table",
            TensorClass::Activation,
            num_heads,
        );
        let biased = act(sites, &o, "attn_biased", "qact2", TensorClass::Activation, num_heads);
        let probs =
            act(sites, &o, "attn_probs", "log_int_softmax", TensorClass::Softmax, num_heads);
        let context = act(sites, &o, "context", "qact3", TensorClass::Activation, dim);
        let proj = linear(sites, "proj", dim);
        let proj_out = act(sites, &o, "proj_out", "qact4", TensorClass::Activation, dim);
        WindowAttention {
            qkv,
            qkv_out,
            scores,
            bias_table,
            table_out,
            // LIS takes its scale from the biased logits, before the mask (spec §8.3).
            softmax: Softmax::new(format!("{o}.softmax"), biased.site(), probs),
            biased,
            context,
            proj,
            proj_out,
            index: relative_position_index(window, p.device()),
            table_name: format!("{o}.relative_position_bias_table"),
            window,
            num_heads,
            scale: ((dim / num_heads) as f64).powf(-0.5),
            resolution,
            shift,
            mask: (shift > 0).then(|| shift_mask(resolution, window, shift, p.device())),
        }
    }

    /// Attention within windows `(B·nW, N, C)`; `mask` is `(nW, N, N)` for shifted windows.
    fn windows(&self, xs: &Tensor, mask: Option<&Tensor>, mode: &mut Mode<'_>) -> Tensor {
        let (b, n, c) = xs.size3().expect("window attention input is (B·nW, N, C)");
        let h = self.num_heads;
        let qkv = self.qkv_out.forward(&self.qkv.forward(xs, mode), mode);
        let qkv = qkv.reshape([b, n, 3, h, c / h]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        // Swin scales q before the matmul (ViT after it).
        let attn = (q * self.scale).matmul(&k.transpose(-2, -1));
        let attn = self.scores.forward(&attn, mode);
        let table = self.table_out.forward(&self.bias_table, mode);
        let bias = table.index_select(0, &self.index).view([n, n, h]).permute([2, 0, 1]);
        let attn = self.biased.forward(&(attn + bias.unsqueeze(0)), mode);
        let attn = match mask {
            Some(mask) => {
                let windows = mask.size()[0];
                (attn.view([b / windows, windows, h, n, n]) + mask.unsqueeze(1).unsqueeze(0))
                    .view([b, h, n, n])
            }
            None => attn,
        };
        let attn = self.softmax.forward(&attn, mode);
        let x = attn.matmul(&v).transpose(1, 2).reshape([b, n, c]);
        let x = self.context.forward(&x, mode);
        self.proj_out.forward(&self.proj.forward(&x, mode), mode)
    }
}

/// The block's attention from the LayerNorm's codes to the projection's.
impl Leaf for WindowAttention {
    fn layers(&self) -> Vec<Layer<'_>> {
        vec![Layer::Linear(&self.qkv), Layer::Softmax(&self.softmax), Layer::Linear(&self.proj)]
    }

    /// qkv, one op for the roll, windows, heads and their inverses, the projection.
    fn program(&self, b: &mut Builder, sites: &SiteTable, input: Value) -> Value {
        let name = |id: SiteId| sites.get(id).name.clone();
        let qkv = self.qkv.program(b, sites, input, false, self.qkv_out.site());
        let ctx = b.push(Op::WindowAttention {
            input: qkv,
            heads: self.num_heads as usize,
            lis_bits: b.lis_bits(),
            resolution: self.resolution as usize,
            window: self.window as usize,
            shift: self.shift as usize,
            scores_site: name(self.scores.site()),
            table: self.table_name.clone(),
            table_site: name(self.table_out.site()),
            biased_site: name(self.biased.site()),
            out_site: name(self.context.site()),
        });
        self.proj.program(b, sites, ctx, false, self.proj_out.site())
    }

    /// On the LayerNorm's codes `(B, L, C)` in token order: the cyclic shift, the windows,
    /// attention within them, and back.
    fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        let (b, l, c) = xs.size3().expect("Swin block input is (B, L, C)");
        let (res, s) = (self.resolution, self.shift);
        let h = xs.view([b, res, res, c]);
        let h = if s > 0 { h.roll([-s, -s], [1, 2]) } else { h };
        let windows = window_partition(&h, self.window);
        let windows = self.windows(&windows, self.mask.as_ref(), mode);
        let h = window_reverse(&windows, self.window, b, res, res);
        let h = if s > 0 { h.roll([s, s], [1, 2]) } else { h };
        h.view([b, l, c])
    }
}

/// The table row of each token pair ([`windows::relative_position_index`]).
fn relative_position_index(window: i64, device: Device) -> Tensor {
    let index: Vec<i64> =
        windows::relative_position_index(window as usize).into_iter().map(|i| i as i64).collect();
    Tensor::from_slice(&index).to_device(device)
}

/// The shifted-window mask `(nW, N, N)`: 0 within a region of the shifted grid, −100 across
/// (spec §8.2; [`windows::masked`], the same 9 regions and values as timm and the original).
fn shift_mask(res: i64, window: i64, shift: i64, device: Device) -> Tensor {
    let masked = windows::masked(res as usize, window as usize, shift as usize);
    let mask: Vec<f32> = masked.iter().map(|&m| if m { windows::MASK } else { 0.0 }).collect();
    let n = window * window;
    Tensor::from_slice(&mask).view([-1, n, n]).to_device(device)
}

/// `(B, H, W, C)` → `(B·nW, w·w, C)`, windows batch-major then row-major.
fn window_partition(xs: &Tensor, window: i64) -> Tensor {
    let (b, h, w, c) = xs.size4().expect("window partition input is (B, H, W, C)");
    xs.view([b, h / window, window, w / window, window, c]).permute([0, 1, 3, 2, 4, 5]).reshape([
        -1,
        window * window,
        c,
    ])
}

/// The inverse of [`window_partition`].
fn window_reverse(windows: &Tensor, window: i64, b: i64, h: i64, w: i64) -> Tensor {
    let c = *windows.size().last().expect("windows have channels");
    windows
        .view([b, h / window, w / window, window, window, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([b, h, w, c])
}

/// Window attention mixes a block's tokens as one leaf op.
impl Mixer for WindowAttention {
    fn run<'m, N: Net<'m>>(&'m self, n: &mut N, x: &N::V) -> N::V {
        n.leaf(self, x)
    }
}

/// Patch merging at the start of stages 1–3 (timm's place): 2×2 neighbours concatenated as
/// `[x(0,0), x(1,0), x(0,1), x(1,1)]` (row, column offsets), LayerNorm over 4C, reduction to 2C.
#[derive(Debug)]
struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
    out: Act,
    resolution: i64,
}

impl PatchMerging {
    /// `stage` is the stage it starts (≥ 1), `dim` the channels it receives.
    fn new(
        p: &Path<'_>,
        sites: &mut SiteTable,
        cfg: &Config,
        stage: usize,
        dim: i64,
        last_q: SiteId,
    ) -> Self {
        let o = format!("layers.{stage}.downsample");
        let original = format!("layers.{}.downsample", stage - 1);
        let norm_out = act_renamed(
            sites,
            &o,
            "norm_out",
            &original,
            "qact1",
            TensorClass::Activation,
            4 * dim,
        );
        let norm = LayerNorm::new(
            &(p / "norm"),
            format!("{o}.norm"),
            format!("{original}.norm"),
            4 * dim,
            cfg.eps,
            last_q,
            norm_out.site(),
        )
        .with_in_expand(4);
        let reduction = Linear::new(
            &(p / "reduction"),
            sites,
            &format!("{o}.reduction"),
            &format!("{original}.reduction"),
            4 * dim,
            2 * dim,
            false,
        );
        let out =
            act_renamed(sites, &o, "out", &original, "qact2", TensorClass::LayerNormInput, 2 * dim);
        PatchMerging { norm, reduction, out, resolution: cfg.resolution(stage - 1) }
    }

    fn run<'m, N: Net<'m>>(&'m self, n: &mut N, xs: &N::V) -> N::V {
        let x = n.patch_merge(self.resolution, xs);
        let x = n.layer_norm(&self.norm, &x);
        n.linear(&self.reduction, &x, false, &self.out)
    }
}

#[derive(Debug)]
struct Stage {
    downsample: Option<PatchMerging>,
    blocks: Vec<Block<WindowAttention>>,
}

/// A Swin classifier with its quantization sites.
#[derive(Debug)]
pub struct Swin {
    cfg: Config,
    sites: SiteTable,
    device: Device,
    input: Act,
    patch_proj: Conv2d,
    patch_proj_out: Act,
    patch_norm: LayerNorm,
    stages: Vec<Stage>,
    norm: LayerNorm,
    pooled: Act,
    head: Linear,
    logits: Act,
}

impl Swin {
    /// Builds the model with randomly initialised variables under `p` (timm key names).
    pub fn new(p: &Path<'_>, cfg: &Config) -> Self {
        let mut sites = SiteTable::default();
        let s = &mut sites;
        let c0 = cfg.embed_dim;
        let input = act(s, "", "input", "qact_input", TensorClass::Activation, 3);
        let pe = p / "patch_embed";
        let patch_proj = Conv2d::new(
            &(&pe / "proj"),
            s,
            "patch_embed.proj",
            "patch_embed.proj",
            3,
            c0,
            cfg.patch_size,
        );
        let patch_proj_out =
            act(s, "patch_embed", "proj_out", "qact_before_norm", TensorClass::Activation, c0);
        let patch_out = act(s, "patch_embed", "out", "qact", TensorClass::Activation, c0);
        let patch_norm = LayerNorm::new(
            &(&pe / "norm"),
            "patch_embed.norm".into(),
            "patch_embed.norm".into(),
            c0,
            cfg.eps,
            patch_proj_out.site(),
            patch_out.site(),
        );
        // The first block's LayerNorm reads the layer-wise patch_embed.qact (spec §8.3).
        let mut last_q = patch_out.site();
        let mut stages = Vec::with_capacity(4);
        for stage in 0..4 {
            let sp = p / "layers" / stage;
            let dim = c0 << stage;
            let downsample = (stage > 0).then(|| {
                let merge =
                    PatchMerging::new(&(&sp / "downsample"), s, cfg, stage, dim / 2, last_q);
                last_q = merge.out.site();
                merge
            });
            let mut blocks = Vec::with_capacity(cfg.depths[stage]);
            let (resolution, (window, shift)) = (cfg.resolution(stage), cfg.window(stage));
            for index in 0..cfg.depths[stage] {
                let (bp, prefix) =
                    (&sp / "blocks" / index, format!("layers.{stage}.blocks.{index}"));
                let at = BlockAt {
                    p: &bp,
                    prefix: &prefix,
                    dim,
                    hidden: dim * cfg.mlp_ratio,
                    eps: cfg.eps,
                    last_q,
                };
                // Every second block shifts its windows.
                let grid =
                    Grid { resolution, window, shift: if index % 2 == 1 { shift } else { 0 } };
                let heads = cfg.num_heads[stage];
                let block = Block::new(s, &at, |s| {
                    WindowAttention::new(&(&bp / "attn"), s, &prefix, dim, heads, grid)
                });
                last_q = block.out_site();
                blocks.push(block);
            }
            stages.push(Stage { downsample, blocks });
        }
        let dim = c0 << 3;
        let norm_out = act(s, "", "norm_out", "qact2", TensorClass::Activation, dim);
        let norm = LayerNorm::new(
            &(p / "norm"),
            "norm".into(),
            "norm".into(),
            dim,
            cfg.eps,
            last_q,
            norm_out.site(),
        );
        let pooled = act(s, "", "pooled", "qact3", TensorClass::Activation, dim);
        // A weight site is named by its parameter prefix (timm's `head.fc`); the artifact relies on it.
        let head =
            Linear::new(&(p / "head" / "fc"), s, "head.fc", "head", dim, cfg.num_classes, true);
        let logits = act(s, "", "logits", "act_out", TensorClass::Activation, cfg.num_classes);
        Swin {
            cfg: *cfg,
            sites,
            device: p.device(),
            input,
            patch_proj,
            patch_proj_out,
            patch_norm,
            stages,
            norm,
            pooled,
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

impl Classifier for Swin {
    fn preprocess(&self) -> Preprocess {
        self.cfg.preprocess
    }

    fn architecture(&self) -> crate::Architecture {
        crate::Architecture::Swin(self.cfg)
    }

    fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        let _span = tracing::trace_span!("swin.forward").entered();
        self.run(&mut Sim { mode }, xs)
    }
}

impl Swin {
    /// The network, once, for every interpreter ([`crate::net`]).
    fn run<'m, N: Net<'m>>(&'m self, n: &mut N, image: &N::V) -> N::V {
        let x = n.quantize_image(Some(&self.input), image);
        let x = n.patch_embed(&self.patch_proj, &self.patch_proj_out, &x);
        let mut x = n.layer_norm(&self.patch_norm, &x);
        for (s, stage) in self.stages.iter().enumerate() {
            let _span = tracing::trace_span!("stage", s).entered();
            if let Some(merge) = &stage.downsample {
                x = merge.run(n, &x);
            }
            for block in &stage.blocks {
                x = block.run(n, &x);
            }
        }
        let x = n.layer_norm(&self.norm, &x);
        let x = n.mean_tokens(&x, &self.pooled);
        n.linear(&self.head, &x, false, &self.logits)
    }
}

impl Quantizable for Swin {
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
