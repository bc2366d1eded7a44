//! Pieces ViT and Swin share: the MLP and the helper that names activation sites.

use tch::nn::Path;

use crate::net::Net;
use crate::quant::{Act, Linear};
use crate::site::{SiteTable, TensorClass};

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
