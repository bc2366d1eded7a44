//! Pieces ViT and Swin share: the pre-norm block, the MLP and the helper that names activation
//! sites.

use tch::nn::Path;

use crate::net::Net;
use crate::quant::{Act, LayerNorm, Linear};
use crate::site::{SiteId, SiteTable, TensorClass};

/// What mixes the tokens inside a [`Block`]: ViT's attention, Swin's window attention.
pub(crate) trait Mixer {
    /// The mixed tokens, as `Net` ops.
    fn run<'m, N: Net<'m>>(&'m self, n: &mut N, x: &N::V) -> N::V;
}

/// The pre-norm residual block of both families (spec §8.1): `x + attn(LN₁(x))`, then
/// `x + mlp(LN₂(x))`, with its sites.
#[derive(Debug)]
pub(crate) struct Block<A> {
    norm1: LayerNorm,
    attn: A,
    residual1: Act,
    norm2: LayerNorm,
    mlp: Mlp,
    residual2: Act,
}

/// A block's place and widths.
pub(crate) struct BlockAt<'a> {
    /// Its parameters.
    pub(crate) p: &'a Path<'a>,
    /// Its site and module prefix (`blocks.3`, `layers.1.blocks.0`).
    pub(crate) prefix: &'a str,
    pub(crate) dim: i64,
    pub(crate) hidden: i64,
    pub(crate) eps: f64,
    /// The site of its input codes.
    pub(crate) last_q: SiteId,
}

impl<A: Mixer> Block<A> {
    /// The block at `at`, its attention made by `attn` (whose sites come between `norm1_out`
    /// and `residual1`, in the original's order of creation).
    pub(crate) fn new(
        sites: &mut SiteTable,
        at: &BlockAt<'_>,
        attn: impl FnOnce(&mut SiteTable) -> A,
    ) -> Self {
        let BlockAt { p, prefix: o, dim: d, hidden, eps, last_q } = *at;
        let ln = |short: &str, input: SiteId, out: SiteId| {
            let name = format!("{o}.{short}");
            LayerNorm::new(&(p / short), name.clone(), name, d, eps, input, out)
        };
        let norm1_out = act(sites, o, "norm1_out", "qact1", TensorClass::Activation, d);
        let norm1 = ln("norm1", last_q, norm1_out.site());
        let attn = attn(sites);
        let residual1 = act(sites, o, "residual1", "qact2", TensorClass::LayerNormInput, d);
        let norm2_out = act(sites, o, "norm2_out", "qact3", TensorClass::Activation, d);
        let norm2 = ln("norm2", residual1.site(), norm2_out.site());
        let mlp = Mlp::new(&(p / "mlp"), sites, o, d, hidden);
        let residual2 = act(sites, o, "residual2", "qact4", TensorClass::LayerNormInput, d);
        Block { norm1, attn, residual1, norm2, mlp, residual2 }
    }

    /// The site of its output codes (the next block's input).
    pub(crate) fn out_site(&self) -> SiteId {
        self.residual2.site()
    }

    pub(crate) fn run<'m, N: Net<'m>>(&'m self, n: &mut N, xs: &N::V) -> N::V {
        let h = n.layer_norm(&self.norm1, xs);
        let a = self.attn.run(n, &h);
        let x = n.add(xs, &a, &self.residual1);
        let h = n.layer_norm(&self.norm2, &x);
        let m = self.mlp.run(n, &h);
        n.add(&x, &m, &self.residual2)
    }
}

/// fc1 → exact GELU → `mlp.hidden` → fc2 → `mlp.out` (spec §8.1 e; Swin's is the same).
#[derive(Debug)]
pub(crate) struct Mlp {
    fc1: Linear,
    hidden: Act,
    fc2: Linear,
    out: Act,
}

impl Mlp {
    pub(crate) fn new(
        p: &Path<'_>,
        sites: &mut SiteTable,
        prefix: &str,
        dim: i64,
        hidden: i64,
    ) -> Self {
        let o = format!("{prefix}.mlp");
        let linear = |sites: &mut SiteTable, name: &str, i, o_dim| {
            let site = format!("{o}.{name}");
            Linear::new(&(p / name), sites, &site, &site, i, o_dim, true)
        };
        let fc1 = linear(sites, "fc1", dim, hidden);
        let hidden_act = act(sites, &o, "hidden", "qact1", TensorClass::Activation, hidden);
        let fc2 = linear(sites, "fc2", hidden, dim);
        let out = act(sites, &o, "out", "qact2", TensorClass::Activation, dim);
        Mlp { fc1, hidden: hidden_act, fc2, out }
    }

    /// fc1 with GELU, fc2 (in the program GELU is part of fc1's op).
    pub(crate) fn run<'m, N: Net<'m>>(&'m self, n: &mut N, x: &N::V) -> N::V {
        let h = n.linear(&self.fc1, x, true, &self.hidden);
        n.linear(&self.fc2, &h, false, &self.out)
    }
}

/// An activation site named `prefix.name` (original name `prefix.original`).
pub(crate) fn act(
    sites: &mut SiteTable,
    prefix: &str,
    name: &str,
    original: &str,
    class: TensorClass,
    channels: i64,
) -> Act {
    act_renamed(sites, prefix, name, prefix, original, class, channels)
}

/// An activation site whose original module lives under another prefix (Swin's patch merging
/// belongs to the stage before it in the original and to the stage after it in timm).
pub(crate) fn act_renamed(
    sites: &mut SiteTable,
    prefix: &str,
    name: &str,
    original_prefix: &str,
    original: &str,
    class: TensorClass,
    channels: i64,
) -> Act {
    let join = |p: &str, s: &str| if p.is_empty() { s.to_owned() } else { format!("{p}.{s}") };
    Act::new(sites, join(prefix, name), join(original_prefix, original), class, channels as usize)
}
