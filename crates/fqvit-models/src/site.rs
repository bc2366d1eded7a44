//! Quantization sites: where a tensor is observed during calibration and fake-quantized after.
//!
//! Each site has a semantic dotted name (`blocks.3.attn.attn_scores`) that keys the qparams
//! artifact, the original implementation's module name (`blocks.3.attn.qact_attn1`) for parity
//! checks, and a [`TensorClass`] from which the experiment config picks bits and observer.

use fqvit_ops::QParams;
pub use fqvit_ops::TensorClass;

use crate::error::{Error, Result};

/// An index into a model's [`SiteTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteId(u32);

impl SiteId {
    /// The position in forward order.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The id of the site at a position of a [`SiteTable`].
    pub fn from_index(index: usize) -> Self {
        SiteId(u32::try_from(index).expect("fewer than 2^32 sites"))
    }
}

/// One quantization site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// Our dotted name.
    pub name: String,
    /// The original implementation's module name.
    pub original: String,
    /// Which tensor class it quantizes.
    pub class: TensorClass,
    /// Channels: output channels of a weight, the last dimension of an activation.
    pub channels: usize,
}

/// Every site of a model, in forward order.
#[derive(Clone, Debug, Default)]
pub struct SiteTable {
    sites: Vec<Site>,
}

impl SiteTable {
    /// Adds a site and returns its id.
    pub(crate) fn push(
        &mut self,
        name: impl Into<String>,
        original: impl Into<String>,
        class: TensorClass,
        channels: usize,
    ) -> SiteId {
        self.sites.push(Site { name: name.into(), original: original.into(), class, channels });
        SiteId(self.sites.len() as u32 - 1)
    }

    /// The site with this id.
    pub fn get(&self, id: SiteId) -> &Site {
        &self.sites[id.index()]
    }

    /// Ids and sites in forward order.
    pub fn iter(&self) -> impl Iterator<Item = (SiteId, &Site)> {
        self.sites.iter().enumerate().map(|(i, s)| (SiteId(i as u32), s))
    }

    /// The id of the site with this name.
    pub fn find(&self, name: &str) -> Option<SiteId> {
        self.sites.iter().position(|s| s.name == name).map(|i| SiteId(i as u32))
    }

    /// The number of sites.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }
}

/// Frozen parameters of every site, indexed by [`SiteId`]. A site has none when its quantizer
/// is never used (the uniform softmax quantizer under LIS).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct QParamTable {
    params: Vec<Option<QParams>>,
}

impl QParamTable {
    /// A table with no parameters for `n` sites.
    pub fn empty(n: usize) -> Self {
        QParamTable { params: vec![None; n] }
    }

    /// Sets a site's parameters.
    pub fn set(&mut self, id: SiteId, params: QParams) {
        self.params[id.index()] = Some(params);
    }

    /// A site's parameters, if it has any.
    pub fn get(&self, id: SiteId) -> Option<&QParams> {
        self.params.get(id.index()).and_then(Option::as_ref)
    }

    /// A site's parameters, or an error naming it.
    pub fn require(&self, id: SiteId, sites: &SiteTable) -> Result<&QParams> {
        self.get(id).ok_or_else(|| Error::Site {
            site: sites.get(id).name.clone(),
            reason: "has no calibrated parameters".into(),
        })
    }

    /// The number of slots.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
}

/// A group of sites that a quantized model can leave in float (a research tool: which
/// quantization costs the accuracy). Named by what the sites hold, for ViT and Swin alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SiteGroup {
    /// Every weight.
    Weights,
    /// The residual stream before each LayerNorm (the PTF sites under `--ptf`).
    Residual,
    /// LayerNorm outputs.
    NormOut,
    /// The qkv projection's output.
    QkvOut,
    /// Attention scores before the softmax (Swin: also the bias table and the biased scores).
    AttnScores,
    /// The softmax output (under `--lis`, the float softmax replaces Log-Int-Softmax).
    AttnProbs,
    /// Attention · V.
    Context,
    /// The attention's output projection.
    ProjOut,
    /// After GELU (fc1's activation).
    MlpHidden,
    /// fc2's output, before the residual add.
    MlpOut,
    /// The classifier's output.
    Logits,
}

impl SiteGroup {
    /// Every group.
    pub const ALL: [SiteGroup; 11] = [
        SiteGroup::Weights,
        SiteGroup::Residual,
        SiteGroup::NormOut,
        SiteGroup::QkvOut,
        SiteGroup::AttnScores,
        SiteGroup::AttnProbs,
        SiteGroup::Context,
        SiteGroup::ProjOut,
        SiteGroup::MlpHidden,
        SiteGroup::MlpOut,
        SiteGroup::Logits,
    ];

    /// The name in flags and TOML.
    pub const fn as_str(self) -> &'static str {
        match self {
            SiteGroup::Weights => "weights",
            SiteGroup::Residual => "residual",
            SiteGroup::NormOut => "norm-out",
            SiteGroup::QkvOut => "qkv-out",
            SiteGroup::AttnScores => "attn-scores",
            SiteGroup::AttnProbs => "attn-probs",
            SiteGroup::Context => "context",
            SiteGroup::ProjOut => "proj-out",
            SiteGroup::MlpHidden => "mlp-hidden",
            SiteGroup::MlpOut => "mlp-out",
            SiteGroup::Logits => "logits",
        }
    }

    /// Whether `site` belongs to the group (by class, then by the last parts of its name).
    pub fn contains(self, site: &Site) -> bool {
        let ends = |suffixes: &[&str]| {
            suffixes.iter().any(|s| site.name == *s || site.name.ends_with(&format!(".{s}")))
        };
        match self {
            SiteGroup::Weights => site.class == TensorClass::Weight,
            SiteGroup::Residual => site.class == TensorClass::LayerNormInput,
            SiteGroup::AttnProbs => site.class == TensorClass::Softmax,
            _ if site.class != TensorClass::Activation => false,
            SiteGroup::NormOut => ends(&["norm1_out", "norm2_out", "norm_out"]),
            SiteGroup::QkvOut => ends(&["attn.qkv_out"]),
            SiteGroup::AttnScores => {
                ends(&["attn.attn_scores", "attn.relative_position_bias", "attn.attn_biased"])
            }
            SiteGroup::Context => ends(&["attn.context"]),
            SiteGroup::ProjOut => ends(&["attn.proj_out"]),
            SiteGroup::MlpHidden => ends(&["mlp.hidden"]),
            SiteGroup::MlpOut => ends(&["mlp.out"]),
            SiteGroup::Logits => ends(&["logits"]),
        }
    }
}

impl std::fmt::Display for SiteGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SiteGroup {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        SiteGroup::ALL.into_iter().find(|g| g.as_str() == s).ok_or_else(|| {
            let known: Vec<&str> = SiteGroup::ALL.iter().map(|g| g.as_str()).collect();
            format!("unknown site group `{s}`; known: {}", known.join(", "))
        })
    }
}

/// A set of [`SiteGroup`]s (serialised as a list of their names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SiteGroups(u16);

impl SiteGroups {
    /// No group: everything quantized.
    pub const NONE: SiteGroups = SiteGroups(0);

    /// Adds a group.
    pub fn with(self, group: SiteGroup) -> Self {
        SiteGroups(self.0 | 1 << group as u16)
    }

    /// Whether the set holds `group`.
    pub fn has(self, group: SiteGroup) -> bool {
        self.0 & (1 << group as u16) != 0
    }

    /// Whether any group of the set holds `site`.
    pub fn contains(self, site: &Site) -> bool {
        SiteGroup::ALL.into_iter().any(|g| self.has(g) && g.contains(site))
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The groups, in [`SiteGroup::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = SiteGroup> {
        SiteGroup::ALL.into_iter().filter(move |g| self.has(*g))
    }
}

impl FromIterator<SiteGroup> for SiteGroups {
    fn from_iter<I: IntoIterator<Item = SiteGroup>>(iter: I) -> Self {
        iter.into_iter().fold(SiteGroups::NONE, SiteGroups::with)
    }
}

impl serde::Serialize for SiteGroups {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(SiteGroup::as_str))
    }
}

impl<'de> serde::Deserialize<'de> for SiteGroups {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        names.iter().map(|n| n.parse().map_err(serde::de::Error::custom)).collect()
    }
}
