//! The experiment settings (the original's `config.py` and flags) as data.
//!
//! [`Experiment::default`] is the paper's setting ("Ours 8/8/4"): int8 channel-wise minmax
//! weights, uint8 layer-wise activations, PTF on LayerNorm inputs, 4-bit Log-Int-Softmax.
//! [`Experiment::full_precision`] is the original command line without flags.

use fqvit_models::{QuantOptions, Site, SiteGroups, TensorClass};
pub use fqvit_observers::PtfRange;
use fqvit_observers::{ObserverConfig, ObserverKind};
use fqvit_ops::softmax::{ExpShift, LisBits};
use fqvit_ops::{BitType, Bits, Granularity, PtfFactor};
pub use fqvit_tensor::{LisInput, StdSqrt};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The activation observer (`--quant-method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Running min/max.
    Minmax,
    /// EMA of min/max.
    Ema,
    /// EMA of the 1e-5 / 0.99999 quantiles.
    Percentile,
    /// MSE-optimal shrink of min/max on the last batch.
    Omse,
}

impl Method {
    /// The observer.
    pub fn observer(self) -> ObserverKind {
        match self {
            Method::Minmax => ObserverKind::MinMax,
            Method::Ema => ObserverKind::Ema,
            Method::Percentile => ObserverKind::Percentile,
            Method::Omse => ObserverKind::Omse,
        }
    }
}

/// The weight observer (`--weight-method`, TOML `weight-method`), per output channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum WeightMethod {
    /// Each channel's min/max (the original).
    #[default]
    Minmax,
    /// Each channel's range shrunk by the factor with the least squared error of its
    /// fake-quantized weights (fqvit+).
    Omse,
}

impl WeightMethod {
    /// The observer.
    pub fn observer(self) -> ObserverKind {
        match self {
            WeightMethod::Minmax => ObserverKind::MinMax,
            WeightMethod::Omse => ObserverKind::Omse,
        }
    }
}

/// How each weight takes its code on the frozen grid (`--weight-rounding`, TOML
/// `weight-rounding`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum WeightRounding {
    /// The nearest code (the original).
    #[default]
    Nearest,
    /// GPTQ's closed form from each linear layer's (and the patch embedding's) inputs over the
    /// calibration images (fqvit+, [`crate::gptq`]).
    Gptq,
}

impl WeightRounding {
    /// The name in flags and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            WeightRounding::Nearest => "nearest",
            WeightRounding::Gptq => "gptq",
        }
    }
}

/// Layer-wise or channel-wise activation statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ActGranularity {
    /// One scale per tensor (the original's setting).
    #[default]
    LayerWise,
    /// One scale per channel (minmax and ema only).
    ChannelWise,
}

/// Which calibration images, in which order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum CalibOrder {
    /// `<DATA>/train` shuffled by [`crate::data::shuffle`] with the seed (the original shuffles too).
    #[default]
    Shuffled,
    /// `<DATA>/train` in sorted path order (the reproducible protocol of the parity checks).
    Sorted,
}

/// Calibration data settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Calibration {
    /// Images per batch (`--calib-batchsize`, 100).
    pub batch_size: usize,
    /// Batches (`--calib-iter`, 10); omse and ptf search on the last one.
    pub iterations: usize,
    /// Image order (`--calib-order`).
    pub order: CalibOrder,
    /// Shuffle seed (`--seed`, 0).
    pub seed: u64,
    /// Images of `<DATA>/train` held out of calibration for development (`--holdout`, 0): the
    /// last `holdout` of train shuffled with `seed`; `eval --on dev` evaluates them, so that
    /// settings are chosen without looking at `val/`.
    pub holdout: usize,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            batch_size: 100,
            iterations: 10,
            order: CalibOrder::Shuffled,
            seed: 0,
            holdout: 0,
        }
    }
}

/// One quantization experiment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Experiment {
    /// Quantize at all (`--quant`); otherwise full precision.
    pub quant: bool,
    /// PTF on LayerNorm inputs and integer LayerNorm (`--ptf`).
    pub ptf: bool,
    /// Log-Int-Softmax (`--lis`).
    pub lis: bool,
    /// Activation observer (`--quant-method`).
    pub quant_method: Method,
    /// Activation granularity (layer-wise in the original).
    pub activation_granularity: ActGranularity,
    /// Weight observer (`--weight-method`; minmax in the original).
    pub weight_method: WeightMethod,
    /// How each weight takes its code on its channel's grid (`--weight-rounding`; nearest in
    /// the original, GPTQ in fqvit+): the grids are the weight observer's either way.
    pub weight_rounding: WeightRounding,
    /// Fold each linear layer's expected weight-quantization error into its float bias
    /// (`--bias-correction`; fqvit+): `b ← b − (Ŵ − W)·E[x]`, `E[x]` the layer's mean input
    /// over the calibration images. The bias then enters the integer forms as any bias does.
    pub bias_correction: bool,
    /// Reparameterize the block LayerNorms' outputs before calibration (`--reparam-norm-out`;
    /// fqvit+, RepQ-ViT's scale reparameterization): a first float pass takes each channel's
    /// range, and γ, β and the next linear layer absorb per-channel scales and shifts so that a
    /// layer-wise grid acts as a per-channel one ([`crate::reparam`]).
    pub reparam_norm_out: bool,
    /// Weight bits (int8).
    pub weight_bits: u8,
    /// Activation bits (uint8); also the uniform softmax's bits without LIS.
    pub activation_bits: u8,
    /// Bits of the residual stream, the LayerNorm inputs (`--residual-bits`, TOML
    /// `residual-bits`; the activation bits when unset, as in the original): up to 15, since
    /// the integer LayerNorm and residual add take codes below 2^15; their PTF factors are
    /// capped at `15 − bits` ([`PtfFactor::cap`]).
    pub residual_bits: Option<u8>,
    /// Log2 code bits of LIS (`--attn-bits`: 4 for "8/8/4", 8 for "8/8/8 with LIS").
    pub attn_bits: LisBits,
    /// How much finer than its input's scale Log-Int-Softmax's integer exponential runs
    /// (`--lis-exp-shift`, TOML `lis-exp-shift`; 0 in the original, fqvit+): the integer logits
    /// `x` enter it as `x·2^K` on the scale `S·2^-K`, an exact shift, so coarse attention scores
    /// get an exponential whose base is right ([`ExpShift`]).
    pub lis_exp_shift: ExpShift,
    /// Run LIS in the last calibration batch once its input scale is known, as the original
    /// does (spec §7.1). `false` keeps calibration entirely float.
    pub lis_in_last_calibration_batch: bool,
    /// The integer LayerNorm's square root (`--layer-norm-sqrt`): libtorch's, as the original
    /// (its codes can depend on the CPU), correctly rounded (the same on every machine), or
    /// integer (every per-token step in integers, as the integer engine).
    pub layer_norm_sqrt: StdSqrt,
    /// What Log-Int-Softmax reads in the quantized forward (`--lis-input`): the float32 `X/S`,
    /// as the original, or its rounding, the integer codes the integer engine reads (a
    /// forward-only setting: calibration is the same either way).
    pub lis_input: LisInput,
    /// Activation site groups quantized with Power-of-Two Factors (per-channel `s · 2^k`, the
    /// PTF observer) instead of one layer-wise scale (`--ptf-sites`, TOML `ptf-sites`; none in
    /// the original, whose PTF covers the LayerNorm inputs only). Simulated here like every
    /// site; realisable in integers, since a PTF code shifted by its channel's power of two is
    /// an integer on one base scale.
    pub ptf_sites: SiteGroups,
    /// The largest PTF factor α (`--ptf-max-factor`, TOML `ptf-max-factor`; 3 in the original):
    /// every PTF site's channels get scales `base · 2^α` with α in `0..=ptf-max-factor`, so a
    /// larger value holds narrower channels beside wide ones (up to 7: shifted codes stay below
    /// 2^15 in the integer LayerNorm and residual add).
    pub ptf_max_factor: PtfFactor,
    /// The range every PTF site takes its largest scale and shared zero point from
    /// (`--ptf-range`, TOML `ptf-range`; `min-max` in the original, `symmetric` centres the zero
    /// point). Calibration only: the integer forms take any zero point.
    pub ptf_range: PtfRange,
    /// Site groups left in float in the quantized forward (`--float-sites`, TOML
    /// `float-sites = ["mlp-out"]`; none in the original): a research tool, not integer-only.
    pub float_sites: SiteGroups,
    /// Calibration data.
    pub calibration: Calibration,
}

impl Default for Experiment {
    /// The paper's setting, "Ours 8/8/4": `--quant --ptf --lis --quant-method minmax`.
    fn default() -> Self {
        Experiment {
            quant: true,
            ptf: true,
            lis: true,
            quant_method: Method::Minmax,
            activation_granularity: ActGranularity::LayerWise,
            weight_method: WeightMethod::Minmax,
            weight_rounding: WeightRounding::Nearest,
            bias_correction: false,
            reparam_norm_out: false,
            weight_bits: 8,
            activation_bits: 8,
            residual_bits: None,
            attn_bits: LisBits::FOUR,
            lis_exp_shift: ExpShift::NONE,
            lis_in_last_calibration_batch: true,
            layer_norm_sqrt: StdSqrt::Libtorch,
            lis_input: LisInput::Float,
            ptf_sites: SiteGroups::NONE,
            ptf_max_factor: PtfFactor::ORIGINAL_MAX,
            ptf_range: PtfRange::MinMax,
            float_sites: SiteGroups::NONE,
            calibration: Calibration::default(),
        }
    }
}

impl Experiment {
    /// The original's command line without flags: full precision, minmax if quantized.
    pub fn full_precision() -> Self {
        Experiment { quant: false, ptf: false, lis: false, ..Experiment::default() }
    }

    /// Checks the combination, naming the offending setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(Error::Settings(s));
        for (name, bits) in
            [("weight-bits", self.weight_bits), ("activation-bits", self.activation_bits)]
        {
            if !Bits::try_from(bits).is_ok_and(Bits::fits_byte) {
                return bad(format!(
                    "{name} = {bits}: codes stored in bytes are 2..={} bits wide",
                    Bits::BYTE.get()
                ));
            }
        }
        if let Some(bits) = self.residual_bits
            && let Err(e) = Bits::try_from(bits)
        {
            return bad(format!("residual-bits = {bits}: {e}"));
        }
        if self.lis_exp_shift != ExpShift::NONE && !(self.quant && self.lis) {
            return bad(format!(
                "lis-exp-shift = {}: it refines Log-Int-Softmax's exponential; turn on quant and lis",
                self.lis_exp_shift
            ));
        }
        if self.activation_granularity == ActGranularity::ChannelWise
            && matches!(self.quant_method, Method::Percentile | Method::Omse)
        {
            return bad(format!(
                "the {} observer is layer-wise only; use activation-granularity = \"layer-wise\" or quant-method minmax/ema",
                self.quant_method.observer().as_str()
            ));
        }
        use fqvit_models::SiteGroup;
        for g in
            [SiteGroup::Weights, SiteGroup::Residual, SiteGroup::AttnScores, SiteGroup::AttnProbs]
        {
            if self.ptf_sites.has(g) {
                return bad(format!(
                    "ptf-sites = {g}: PTF applies to plain activation groups (the residual stream has it with ptf; weights are per-channel already; the softmax's input and output have their own integer forms)"
                ));
            }
        }
        if self.float_sites.has(SiteGroup::Weights) {
            if self.bias_correction {
                return bad(
                    "bias-correction corrects the weights' quantization error, and float-sites \
                     keeps the weights in float: there is none to correct"
                        .into(),
                );
            }
            if self.weight_rounding != WeightRounding::Nearest {
                return bad(format!(
                    "weight-rounding = {} rounds the weights, and float-sites keeps them in float",
                    self.weight_rounding.as_str()
                ));
            }
        }
        if self.reparam_norm_out {
            for (group, set) in [("ptf-sites", &self.ptf_sites), ("float-sites", &self.float_sites)]
            {
                if set.has(SiteGroup::NormOut) {
                    return bad(format!(
                        "reparam-norm-out balances norm-out's channels for one layer-wise grid; {group} = norm-out takes that grid away"
                    ));
                }
            }
            if self.activation_granularity == ActGranularity::ChannelWise {
                return bad(
                    "reparam-norm-out folds per-channel grids into a layer-wise one; activation-granularity = \"channel-wise\" has them already"
                        .into(),
                );
            }
        }
        if self.ptf_sites.is_empty() && !self.ptf {
            if self.ptf_max_factor != PtfFactor::ORIGINAL_MAX {
                return bad(format!(
                    "ptf-max-factor = {} needs ptf or ptf-sites: there is no PTF site to apply it to",
                    self.ptf_max_factor.get()
                ));
            }
            if self.ptf_range != PtfRange::MinMax {
                return bad(format!(
                    "ptf-range = {} needs ptf or ptf-sites: there is no PTF site to apply it to",
                    self.ptf_range.as_str()
                ));
            }
        }
        if self.calibration.batch_size == 0 || self.calibration.iterations == 0 {
            return bad("calibration needs at least one batch of at least one image".into());
        }
        if !self.quant && (self.ptf || self.lis) {
            return bad(format!(
                "{} needs quant: without it the model runs in full precision and {} would do nothing",
                if self.ptf { "ptf" } else { "lis" },
                if self.ptf { "PTF" } else { "LIS" },
            ));
        }
        Ok(())
    }

    /// The observer of a site class, or `None` for a site that is not observed (the uniform
    /// softmax quantizer under LIS).
    pub fn observer(&self, site: &Site) -> Option<ObserverConfig> {
        let class = site.class;
        let bits = |b: u8| Bits::try_from(b).expect("validated");
        let act = BitType { bits: bits(self.activation_bits), signed: false };
        let residual = BitType { bits: self.residual_bits(), signed: false };
        let granularity = match self.activation_granularity {
            ActGranularity::LayerWise => Granularity::LayerWise,
            ActGranularity::ChannelWise => Granularity::ChannelWise,
        };
        let method =
            ObserverConfig { kind: self.quant_method.observer(), bit_type: act, granularity };
        let ptf = |bit_type: BitType| ObserverConfig {
            kind: ObserverKind::Ptf {
                max_factor: self.ptf_max_factor.cap(bit_type.bits),
                range: self.ptf_range,
            },
            bit_type,
            granularity: Granularity::ChannelWise,
        };
        Some(match class {
            TensorClass::Weight => ObserverConfig {
                kind: self.weight_method.observer(),
                bit_type: BitType { bits: bits(self.weight_bits), signed: true },
                granularity: Granularity::ChannelWise,
            },
            TensorClass::Activation if self.ptf_sites.contains(site) => ptf(act),
            TensorClass::Activation => method,
            TensorClass::LayerNormInput if self.ptf => ptf(residual),
            TensorClass::LayerNormInput => ObserverConfig { bit_type: residual, ..method },
            TensorClass::Softmax if self.lis => return None,
            // The softmax quantizer is layer-wise in every configuration of the original.
            TensorClass::Softmax => {
                ObserverConfig { granularity: Granularity::LayerWise, ..method }
            }
        })
    }

    /// How many times calibration reads its images: once for the observers, once more for
    /// `reparam-norm-out`'s ranges and once more for GPTQ's inputs.
    pub fn calibration_passes(&self) -> usize {
        1 + usize::from(self.reparam_norm_out)
            + usize::from(self.weight_rounding == WeightRounding::Gptq)
    }

    /// The width of the residual stream's codes (validated).
    pub fn residual_bits(&self) -> Bits {
        let bits = self.residual_bits.unwrap_or(self.activation_bits);
        Bits::try_from(bits).expect("validated")
    }

    /// The integer paths of the quantized model.
    pub fn quant_options(&self) -> QuantOptions {
        QuantOptions {
            int_layer_norm: self.ptf,
            lis_bits: self.lis.then_some(self.attn_bits),
            lis_exp_shift: self.lis_exp_shift,
            std_sqrt: self.layer_norm_sqrt,
            lis_input: self.lis_input,
            float_sites: self.float_sites,
        }
    }

    /// A short label: `8/8/4 ptf lis minmax`.
    pub fn label(&self) -> String {
        if !self.quant {
            return "full precision".into();
        }
        let attn = if self.lis { self.attn_bits.get() } else { u32::from(self.activation_bits) };
        let mut s = format!("{}/{}/{}", self.weight_bits, self.activation_bits, attn);
        for (on, name) in [(self.ptf, " ptf"), (self.lis, " lis")] {
            if on {
                s.push_str(name);
            }
        }
        s.push(' ');
        s.push_str(self.quant_method.observer().as_str());
        if self.weight_method != WeightMethod::Minmax {
            s.push_str(&format!(" (weights {})", self.weight_method.observer().as_str()));
        }
        if self.weight_rounding != WeightRounding::Nearest {
            s.push_str(&format!(" ({} rounding)", self.weight_rounding.as_str()));
        }
        if self.bias_correction {
            s.push_str(" (bias correction)");
        }
        if self.reparam_norm_out {
            s.push_str(" (reparam norm-out)");
        }
        if !self.ptf_sites.is_empty() {
            let groups: Vec<&str> = self.ptf_sites.iter().map(|g| g.as_str()).collect();
            s.push_str(&format!(" (ptf: {})", groups.join(", ")));
        }
        if self.ptf_max_factor != PtfFactor::ORIGINAL_MAX {
            s.push_str(&format!(" (ptf factors 0..={})", self.ptf_max_factor.get()));
        }
        if self.ptf_range != PtfRange::MinMax {
            s.push_str(&format!(" (ptf range {})", self.ptf_range.as_str()));
        }
        if let Some(bits) = self.residual_bits {
            s.push_str(&format!(" (residual {bits}-bit)"));
        }
        if self.lis_exp_shift != ExpShift::NONE {
            s.push_str(&format!(" (lis exp shift {})", self.lis_exp_shift));
        }
        if !self.float_sites.is_empty() {
            let groups: Vec<&str> = self.float_sites.iter().map(|g| g.as_str()).collect();
            s.push_str(&format!(" (float: {})", groups.join(", ")));
        }
        s
    }
}
