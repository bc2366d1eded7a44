//! Quantization in the model: the quantization-aware layers ([`Act`], [`Linear`], …), the
//! frozen state of a quantized model ([`Quantized`], built once from a parameter table), and
//! what a model exposes so that it can be calibrated and quantized ([`Quantizable`]).
//!
//! The tensor arithmetic itself (fake quantization, integer LayerNorm, Log-Int-Softmax) lives
//! in `fqvit-tensor`; each layer matches on [`Mode`](crate::Mode) in one place.

mod layers;
mod probe;
mod state;

use fqvit_ops::softmax::LisBits;
use tch::{Device, Tensor};

pub use layers::{Act, Conv2d, LayerNorm, Linear, Softmax};
pub use probe::Probe;
pub use state::Quantized;

use crate::site::{SiteId, SiteTable};

/// A layer that carries more than one activation site, as [`Quantizable::layers`] lists it.
#[derive(Clone, Copy, Debug)]
pub enum Layer<'a> {
    /// A patch convolution.
    Conv2d(&'a Conv2d),
    /// A linear layer.
    Linear(&'a Linear),
    /// A LayerNorm (integer under `--ptf`).
    LayerNorm(&'a LayerNorm),
    /// An attention softmax (Log-Int-Softmax under `--lis`).
    Softmax(&'a Softmax),
}

/// What a model exposes so it can be quantized.
pub trait Quantizable {
    /// Its sites, in forward order.
    fn sites(&self) -> &SiteTable;
    /// The device its variables live on.
    fn device(&self) -> Device;
    /// Its convolutions, linear layers, LayerNorms and softmaxes, in forward order.
    fn layers(&self) -> Vec<Layer<'_>>;

    /// Its integer program (`fqvit-program`) with Log-Int-Softmax at `lis_bits` (`None`: the
    /// uniform softmax, which the engine refuses by op), from the same description as its
    /// forward; `None` for a model the integer engine cannot run.
    fn program(&self, _lis_bits: Option<LisBits>) -> Option<fqvit_program::Program> {
        None
    }

    /// The float weight of a weight site.
    fn weight(&self, site: SiteId) -> Option<&Tensor> {
        self.layers().into_iter().find_map(|layer| match layer {
            Layer::Conv2d(c) if c.site() == site => Some(&c.weight),
            Layer::Linear(l) if l.site() == site => Some(&l.weight),
            _ => None,
        })
    }

    /// The float bias of a linear layer's weight site (`None` without one).
    fn bias(&self, site: SiteId) -> Option<&Tensor> {
        self.layers().into_iter().find_map(|layer| match layer {
            Layer::Linear(l) if l.site() == site => l.bias.as_ref(),
            _ => None,
        })
    }

    /// Every LayerNorm and softmax with the sites it reads, in forward order.
    fn wiring(&self) -> Vec<Wiring> {
        self.layers()
            .into_iter()
            .filter_map(|layer| match layer {
                Layer::LayerNorm(ln) => Some(ln.wiring()),
                Layer::Softmax(s) => Some(s.wiring()),
                _ => None,
            })
            .collect()
    }
}

/// Where an integer LayerNorm or a Log-Int-Softmax takes its scales from (spec §8.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wiring {
    /// The LayerNorm's parameter prefix (`blocks.0.norm1`) or the attention's softmax
    /// (`blocks.0.attn.softmax`).
    pub consumer: String,
    /// The site whose codes and scale(s) it reads.
    pub in_site: SiteId,
    /// The site whose scale its output codes use (LayerNorm only).
    pub out_site: Option<SiteId>,
    /// How many times the in-site's channels repeat across the input (4 for patch merging).
    pub in_expand: i64,
}

/// A classifier: what evaluation and calibration need of a model.
pub trait Classifier: Quantizable {
    /// Logits `(B, classes)` of normalized images `(B, 3, H, W)`.
    fn forward(&self, xs: &Tensor, mode: &mut crate::Mode<'_>) -> Tensor;
    /// How its input images are prepared.
    fn preprocess(&self) -> crate::Preprocess;
    /// Its family and hyper-parameters.
    fn architecture(&self) -> crate::Architecture;
}
