//! Pieces ViT and Swin share: the MLP and the helper that names activation sites.

use fqvit_program::{Builder, Normalize, Op, Value};
use tch::Tensor;
use tch::nn::Path;

use crate::Preprocess;
use crate::mode::Mode;
use crate::quant::{Act, Linear};
use crate::site::{SiteTable, TensorClass};

/// fc1 → exact GELU → `mlp.hidden` → fc2 → `mlp.out` (spec §8.1 e; Swin's is the same).
#[derive(Debug)]
pub(crate) struct Mlp {
    pub(crate) fc1: Linear,
    hidden: Act,
    pub(crate) fc2: Linear,
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

    /// The integer form of [`Mlp::forward`]: GELU is part of fc1's op.
    pub(crate) fn program(&self, b: &mut Builder, sites: &SiteTable, input: Value) -> Value {
        let h = self.fc1.program(b, sites, input, true, self.hidden.site());
        self.fc2.program(b, sites, h, false, self.out.site())
    }

    pub(crate) fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> Tensor {
        let x = self.fc1.forward(xs, mode).gelu("none");
        let x = self.hidden.forward(&x, mode);
        self.out.forward(&self.fc2.forward(&x, mode), mode)
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

/// A program's first op: 8-bit images of side `size` and the normalization `pp` applies.
pub(crate) fn image_op(b: &mut Builder, size: i64, pp: Preprocess) -> Value {
    b.push(Op::Image { size: size as usize, normalize: Normalize { mean: pp.mean, std: pp.std } })
}
