//! Quantization parameters shared by every crate: scales, zero points, PTF factors.

use std::fmt;

use crate::bits::{BitType, Bits};

/// One scale and zero point for the whole tensor, or one per channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// A single scale and zero point.
    LayerWise,
    /// One per channel: the last dimension of an activation, the first of a weight.
    ChannelWise,
}

/// What kind of tensor a site quantizes (the original's config keys W, A, A_LN, S).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
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

/// A Power-of-Two Factor α in `0..=7`: a channel's scale is `base · 2^α` (spec §3.7).
///
/// The original's observer picks α in `0..=3` ([`PtfFactor::ORIGINAL_MAX`]); a wider range is
/// an experiment option, and the integer kernels are exact up to [`PtfFactor::MAX`].
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(try_from = "u8", into = "u8")]
pub struct PtfFactor(u8);

impl PtfFactor {
    /// The largest factor: scales go up to `base · 128`, codes shifted by it stay below 2^15.
    pub const MAX: PtfFactor = PtfFactor(7);

    /// The original's largest factor: scales up to `base · 8`.
    pub const ORIGINAL_MAX: PtfFactor = PtfFactor(3);

    /// α as a number.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// `2^α` ∈ {1, 2, …, 128}.
    pub const fn multiplier(self) -> i32 {
        1 << self.0
    }

    /// This largest factor, lowered so that codes of `bits` shifted by it stay below 2^15
    /// (`(2^bits − 1) · 2^α < 2^15` ⇔ `bits + α ≤ 15`), the integer LayerNorm's and the residual
    /// add's bound: unchanged for bytes (8 + 7), 3 for 12-bit codes.
    pub const fn cap(self, bits: Bits) -> PtfFactor {
        let room = Bits::MAX.get() - bits.get();
        if self.0 < room { self } else { PtfFactor(room) }
    }
}

/// The error of a factor outside `0..=7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtfFactorOutOfRange(pub u8);

impl fmt::Display for PtfFactorOutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PTF factor {} is out of range 0..={}", self.0, PtfFactor::MAX.0)
    }
}

impl std::error::Error for PtfFactorOutOfRange {}

impl From<PtfFactor> for u8 {
    fn from(f: PtfFactor) -> u8 {
        f.0
    }
}

impl std::str::FromStr for PtfFactor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let alpha: u8 =
            s.parse().map_err(|_| format!("{s:?} is not a PTF factor 0..={}", PtfFactor::MAX.0))?;
        PtfFactor::try_from(alpha).map_err(|e| e.to_string())
    }
}

impl TryFrom<u8> for PtfFactor {
    type Error = PtfFactorOutOfRange;
    fn try_from(alpha: u8) -> Result<Self, Self::Error> {
        if alpha <= PtfFactor::MAX.0 {
            Ok(PtfFactor(alpha))
        } else {
            Err(PtfFactorOutOfRange(alpha))
        }
    }
}

/// Calibrated parameters of one quantization site.
///
/// `scale` and `zero_point` have length 1 (layer-wise) or C (channel-wise). A PTF site has C
/// scales `base · 2^α_c`, one shared zero point, and its factors in `ptf`.
#[derive(Clone, Debug, PartialEq)]
pub struct QParams {
    /// Code type.
    pub bit_type: BitType,
    /// Scales, one or one per channel.
    pub scale: Vec<f32>,
    /// Zero points (integers), one or one per channel.
    pub zero_point: Vec<i32>,
    /// PTF factors α_c, for PTF sites.
    pub ptf: Option<Vec<PtfFactor>>,
}

impl QParams {
    /// Layer-wise parameters.
    pub fn layer_wise(bit_type: BitType, scale: f32, zero_point: i32) -> Self {
        QParams { bit_type, scale: vec![scale], zero_point: vec![zero_point], ptf: None }
    }

    /// Layer-wise or channel-wise, from the number of scales.
    pub fn granularity(&self) -> Granularity {
        if self.scale.len() == 1 { Granularity::LayerWise } else { Granularity::ChannelWise }
    }

    /// The smallest scale, the PTF base `s8/8` when every factor is used.
    pub fn min_scale(&self) -> f32 {
        self.scale.iter().copied().fold(f32::INFINITY, f32::min)
    }
}
