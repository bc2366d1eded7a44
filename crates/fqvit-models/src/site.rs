//! Quantization sites: where a tensor is observed during calibration and fake-quantized after.
//!
//! Each site has a semantic dotted name (`blocks.3.attn.attn_scores`) that keys the qparams
//! artifact, the original implementation's module name (`blocks.3.attn.qact_attn1`) for parity
//! checks, and a [`TensorClass`] from which the experiment config picks bits and observer.

use fqvit_ops::QParams;

use crate::error::{Error, Result};

/// What kind of tensor a site quantizes (the original's config keys W, A, A_LN, S).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorClass {
    /// A conv or linear weight, per output channel.
    Weight,
    /// A generic activation (`A`).
    Activation,
    /// An activation that feeds a LayerNorm (`A_LN`): PTF channel-wise under `--ptf`.
    LayerNormInput,
    /// The attention softmax output (`S`), uniform uint8 when LIS is off.
    Softmax,
}

impl TensorClass {
    /// The name used in configs and artifacts.
    pub const fn as_str(self) -> &'static str {
        match self {
            TensorClass::Weight => "weight",
            TensorClass::Activation => "activation",
            TensorClass::LayerNormInput => "layer-norm-input",
            TensorClass::Softmax => "softmax",
        }
    }
}

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
