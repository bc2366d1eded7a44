//! The modes a model runs in, chosen per call (no flags mutated from outside).

use fqvit_ops::QParams;
use tch::Tensor;

use crate::quant::{Probe, Quantized};
use crate::site::SiteId;

/// Which integer paths the quantized model takes (the original's `--ptf` and `--lis`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QuantOptions {
    /// Integer LayerNorm on PTF codes (`--ptf`); otherwise float LayerNorm on fake-quantized input.
    pub int_layer_norm: bool,
    /// Log-Int-Softmax with this many bits (`--lis`, 4 by default); otherwise float softmax then uint8.
    pub lis_bits: Option<fqvit_ops::softmax::LisBits>,
    /// How much finer than its input's scale Log-Int-Softmax's exponential runs
    /// (`--lis-exp-shift`; 0, the original's).
    pub lis_exp_shift: fqvit_ops::softmax::ExpShift,
    /// The integer LayerNorm's square root: libtorch's (the original's) or correctly rounded.
    pub std_sqrt: fqvit_tensor::StdSqrt,
    /// What Log-Int-Softmax reads in the quantized forward: `X/S` in float32 (the original's)
    /// or rounded to the integer codes (what the integer engine reads). Calibration's last
    /// batch, on float logits, always takes the original's.
    pub lis_input: fqvit_tensor::LisInput,
    /// Sites left in float (none in the original): an activation site is the identity, a
    /// weight keeps its float values, and a LayerNorm or Log-Int-Softmax whose own site is
    /// float runs in float. Attention scores left in float still enter Log-Int-Softmax, which
    /// rounds them on its input scale, as in the original.
    pub float_sites: crate::site::SiteGroups,
}

/// Receives every site's tensor during calibration; implemented by `fqvit-calib`.
pub trait CalibrationSink {
    /// Observes the tensor at a site: an activation, or a weight at a weight site.
    fn observe(&mut self, site: SiteId, xs: &Tensor);
    /// Observes the input of the linear layer whose weight site is `site` (for bias
    /// correction); ignored by default.
    fn observe_input(&mut self, _site: SiteId, _xs: &Tensor) {}
    /// A site's parameters once it is frozen. The last calibration batch freezes sites in
    /// forward order, so with LIS the softmax already finds its input site frozen (spec §7.1).
    fn frozen(&self, site: SiteId) -> Option<&QParams>;
}

/// How a forward pass treats quantization sites.
pub enum Mode<'a> {
    /// Full precision, identical to timm.
    Float,
    /// Float forward with every site observed (and LIS once its input scale is frozen).
    Calibrate {
        /// Where observations go.
        sink: &'a mut dyn CalibrationSink,
        /// The integer paths of the experiment.
        options: QuantOptions,
    },
    /// Fake-quantized weights and activations, integer LayerNorm and LIS as configured.
    Quantized {
        /// The frozen state.
        state: &'a Quantized,
        /// Sees (and may replace) each module's tensors; `None` in a plain forward.
        probe: Option<&'a mut dyn Probe>,
    },
}

impl<'a> Mode<'a> {
    /// The quantized mode of `state`, without a probe.
    pub fn quantized(state: &'a Quantized) -> Self {
        Mode::Quantized { state, probe: None }
    }
}
