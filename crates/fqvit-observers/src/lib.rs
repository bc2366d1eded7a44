//! # fqvit-observers: FQ-ViT's calibration observers over tch tensors
//!
//! Sits on `fqvit-ops` (the [`QParams`] vocabulary) and `tch`; `fqvit-calib` feeds it. Each
//! observer sees a site's tensor on every calibration batch ([`Observer::update`]) and then
//! produces its parameters once ([`Observer::finish`], which consumes it: an observer that has
//! produced its parameters cannot be updated again). What omse and ptf search on, the last
//! batch, stays inside the observer. Statistics stay on the tensor's device.
//!
//! Exact update rules: spec §3 (minmax, ema σ = 0.01, percentile 1e-5/0.99999 with
//! torch.quantile's float32 arithmetic, omse's 90-step shrink, ptf's power-of-two factors).
//!
//! ```
//! use fqvit_observers::{ObserverConfig, ObserverKind, build};
//! use fqvit_ops::{BitType, Granularity};
//! use tch::Tensor;
//!
//! let cfg = ObserverConfig { kind: ObserverKind::MinMax, bit_type: BitType::UINT8, granularity: Granularity::LayerWise };
//! let mut obs = build(&cfg, false).unwrap();
//! obs.update(&Tensor::from_slice(&[-1.0f32, 0.5, 2.0]).view([1, 1, 3])).unwrap();
//! let p = obs.finish().unwrap();
//! assert_eq!((p.scale[0], p.zero_point[0]), (3.0 / 255.0, 85));
//! ```

mod observer;
mod ptf;
mod stats;

pub use observer::{Ema, MinMax, Omse, Percentile, WeightOmse, build};
pub use ptf::Ptf;

use fqvit_ops::{BitType, Granularity, PtfFactor, QParams};
use tch::Tensor;

/// The observers of the original implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObserverKind {
    /// Running min/max.
    MinMax,
    /// Exponential moving average of per-batch min/max (σ = 0.01).
    Ema,
    /// EMA of the 1e-5 and 0.99999 quantiles (layer-wise only).
    Percentile,
    /// Min/max shrunk towards 0 by the factor minimising MSE on the last batch (layer-wise only).
    Omse,
    /// Per-channel power-of-two factors `0..=max_factor` by MSE on the last batch (channel-wise,
    /// 3-D inputs; the original has `max_factor` [`PtfFactor::ORIGINAL_MAX`] and
    /// [`PtfRange::MinMax`]).
    Ptf {
        /// The largest factor α: the widest channel's scale is `2^α` times the narrowest's.
        max_factor: PtfFactor,
        /// The range the largest scale and the shared zero point come from.
        range: PtfRange,
    },
}

/// The global range from which a PTF observer takes its largest scale `s8` and its one zero
/// point (TOML `ptf-range`, `--ptf-range`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum PtfRange {
    /// `[m, M]`, the observed extremes over all channels (the original): one large value of one
    /// sign pushes the zero point to the end of the codes, and every other channel then has
    /// few codes on the other side of zero.
    #[default]
    MinMax,
    /// `[−a, a]` with `a = max(|m|, |M|)`: the zero point in the middle of the codes, so that each
    /// channel's power of two fits its own extent on both sides of zero.
    Symmetric,
}

impl PtfRange {
    /// Every range.
    pub const ALL: [PtfRange; 2] = [PtfRange::MinMax, PtfRange::Symmetric];

    /// The name in configs and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            PtfRange::MinMax => "min-max",
            PtfRange::Symmetric => "symmetric",
        }
    }
}

impl ObserverKind {
    /// The name in configs and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            ObserverKind::MinMax => "minmax",
            ObserverKind::Ema => "ema",
            ObserverKind::Percentile => "percentile",
            ObserverKind::Omse => "omse",
            ObserverKind::Ptf { .. } => "ptf",
        }
    }
}

/// What one site's observer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObserverConfig {
    /// The algorithm.
    pub kind: ObserverKind,
    /// The code type: signed means symmetric (minmax, ema, percentile).
    pub bit_type: BitType,
    /// One scale or one per channel.
    pub granularity: Granularity,
}

/// Errors of observers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An observer configuration the original does not support.
    #[error("{0}")]
    Unsupported(String),
    /// `finish` before any `update`.
    #[error("the observer never saw a tensor")]
    Empty,
    /// A tensor the observer cannot use.
    #[error("{0}")]
    BadInput(String),
    /// A libtorch error.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Observes one site's tensors during calibration, then yields its parameters.
pub trait Observer: std::fmt::Debug {
    /// Folds in one batch's tensor.
    fn update(&mut self, xs: &Tensor) -> Result<()>;
    /// The calibrated parameters; consumes the observer.
    fn finish(self: Box<Self>) -> Result<QParams>;
}
