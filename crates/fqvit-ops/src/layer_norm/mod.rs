//! Integer LayerNorm with Power-of-Two-Factor input scales (spec §6; paper §3.3, appendix A.1).
//!
//! Input: unsigned codes `q` of `b` bits (tokens × C; bytes, or `u16` for a wider residual
//! stream, [`Code`]) with zero point `z` and per-channel scales `s_c = base · 2^α_c`. Output:
//! integer codes `y` with `y · s_out ≈ LayerNorm(x)`:
//!
//! 1. `x_c = (q_c − z) · 2^(α_c − α_min)`, integers in units of `s_min = base · 2^α_min`;
//! 2. `μ = s_min·Σx/C`, `σ = (s_min/C)·sqrt(C·Σx² − (Σx)²)` (population std, no eps);
//! 3. `A_c = (s_min/σ)·γ_c/s_out ≈ ±M_c / 2^N_c` ([`reference::get_mn`]);
//! 4. `B_c = round((β_c − γ_c·μ/σ) / s_out · 2^N_c)`;
//! 5. `y_c = round((±M_c·x_c + B_c) / 2^N_c)`, half to even, not clamped.
//!
//! Integer bounds (checked at entry): `|q − z| < 2^b` and `α − α_min ≤ 15 − b`
//! ([`PtfFactor::cap`]; 7 for bytes) give `|x| < 2^15` (i32; 2040 with the original's uint8
//! codes and factors up to 8); Σx and Σx² are i64, and `C·Σx² ≤ C² · 2^30` stays below 2^63
//! for `C ≤ 2^16`;
//! `|M·x| ≤ 255 · 32,640 < 2^23` (i32); `B` is i64, saturating only at `|B| ≥ 2^63`; `y`
//! saturates to the i32 range.
//!
//! A token whose codes are all equal (zero variance) gets `y_c = round(β_c / s_out)`, the limit
//! of LayerNorm as the variance goes to zero; the original returns NaN there (its issue #31).

mod fast;
pub mod integer;
pub mod reference;

use rayon::prelude::*;

use crate::Bits;
use crate::bits::Code;
use crate::qparams::PtfFactor;
use fast::Tokens;

use reference::pow2;

/// The most channels a LayerNorm may have (keeps `C·Σx²` below 2^63).
pub const MAX_CHANNELS: usize = 1 << 16;

/// The input scale of an integer LayerNorm.
#[derive(Clone, Copy, Debug)]
pub enum InScale<'a> {
    /// One scale for every channel (a layer-wise quantizer).
    Layer(f32),
    /// PTF: channel `c` has scale `base · 2^α_c`.
    Ptf {
        /// The scale of α = 0 (`s8 / 8` of the PTF observer).
        base: f32,
        /// One factor per channel (tiled ×4 by the caller for Swin's patch merging).
        factors: &'a [PtfFactor],
    },
}

/// Why a quantizer's scales are not a LayerNorm input scale.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InScaleError {
    /// Several scales without PTF factors.
    #[error("{0} scales without PTF factors (a LayerNorm input is layer-wise or PTF)")]
    ChannelWise(usize),
    /// PTF factors, scales and channels that do not match.
    #[error("{factors} PTF factors and {scales} scales for {channels} channels")]
    Count {
        /// PTF factors.
        factors: usize,
        /// Scales.
        scales: usize,
        /// Channels of the LayerNorm.
        channels: usize,
    },
}

impl<'a> InScale<'a> {
    /// The input scale of a quantizer with `scales` and, for a PTF one, `factors` (its
    /// `scale[c] = base · 2^α_c`, as [`QParams`](crate::QParams) holds them), over `channels`.
    ///
    /// # Errors
    /// Several (or no) scales without factors, or counts that differ from `channels` (or none).
    pub fn of(
        scales: &[f32],
        factors: Option<&'a [PtfFactor]>,
        channels: usize,
    ) -> Result<Self, InScaleError> {
        match factors {
            None if scales.len() == 1 => Ok(InScale::Layer(scales[0])),
            None => Err(InScaleError::ChannelWise(scales.len())),
            Some(factors)
                if channels > 0 && factors.len() == channels && scales.len() == channels =>
            {
                let base = scales[0] / factors[0].multiplier() as f32;
                Ok(InScale::Ptf { base, factors })
            }
            Some(factors) => {
                Err(InScaleError::Count { factors: factors.len(), scales: scales.len(), channels })
            }
        }
    }
}

impl InScale<'_> {
    /// `s_min` and each channel's shift `α_c − α_min`.
    fn min_and_shifts(&self, n_channels: usize) -> (f32, Vec<u32>) {
        match *self {
            InScale::Layer(scale) => (scale, vec![0; n_channels]),
            InScale::Ptf { base, factors } => {
                let min = factors.iter().map(|f| f.get()).min().unwrap_or(0);
                let s_min = base * pow2(u32::from(min));
                (s_min, factors.iter().map(|f| u32::from(f.get() - min)).collect())
            }
        }
    }
}

/// Everything but the codes.
#[derive(Clone, Copy, Debug)]
pub struct LayerNormParams<'a> {
    /// Input scale(s).
    pub in_scale: InScale<'a>,
    /// Input zero point (it cancels in `x − μ`, but the codes are relative to it).
    pub zero_point: i32,
    /// The input codes' width `b`: the zero point is below `2^b`, and the PTF shifts
    /// `α_c − α_min` at most `15 − b`, so that shifted codes stay below 2^15.
    pub bits: Bits,
    /// γ, length C.
    pub gamma: &'a [f32],
    /// β, length C.
    pub beta: &'a [f32],
    /// The scale of the quantizer after the LayerNorm (layer-wise).
    pub out_scale: f32,
}

impl LayerNormParams<'_> {
    /// Checks the preconditions for codes of type `C` and returns C.
    #[track_caller]
    fn check<C: Code>(&self, n_codes: usize, n_out: usize) -> usize {
        let n_channels = self.gamma.len();
        assert!(
            (1..=MAX_CHANNELS).contains(&n_channels),
            "ptf_layer_norm: {n_channels} channels, expected 1..={MAX_CHANNELS}"
        );
        assert_eq!(
            self.beta.len(),
            n_channels,
            "ptf_layer_norm: β has {} channels, γ has {n_channels}",
            self.beta.len()
        );
        if let InScale::Ptf { factors, base } = self.in_scale {
            assert_eq!(
                factors.len(),
                n_channels,
                "ptf_layer_norm: {} PTF factors for {n_channels} channels",
                factors.len()
            );
            assert!(
                base > 0.0 && base.is_finite(),
                "ptf_layer_norm: base scale {base} is not positive"
            );
        }
        if let InScale::Layer(s) = self.in_scale {
            assert!(s > 0.0 && s.is_finite(), "ptf_layer_norm: in-scale {s} is not positive");
        }
        let bits = self.bits.get();
        assert!(
            self.bits <= C::BITS,
            "ptf_layer_norm: {bits}-bit codes do not fit {}-bit storage",
            C::BITS.get()
        );
        assert!(
            (0..1 << bits).contains(&self.zero_point),
            "ptf_layer_norm: zero point {} is not a {bits}-bit code",
            self.zero_point
        );
        let (_, shifts) = self.in_scale.min_and_shifts(n_channels);
        let room = u32::from(Bits::MAX.get() - bits);
        assert!(
            shifts.iter().all(|&s| s <= room),
            "ptf_layer_norm: PTF shifts above {room} take {bits}-bit codes beyond 2^15"
        );
        assert!(
            self.out_scale > 0.0 && self.out_scale.is_finite(),
            "ptf_layer_norm: out-scale {} is not positive",
            self.out_scale
        );
        assert_eq!(
            n_codes % n_channels,
            0,
            "ptf_layer_norm: {n_codes} codes are not whole tokens of {n_channels} channels"
        );
        assert_eq!(n_codes, n_out, "ptf_layer_norm: {n_codes} codes but room for {n_out} outputs");
        n_channels
    }
}

/// Integer LayerNorm over tokens of C codes, rows in parallel (the fast path).
///
/// Gives exactly the codes of [`reference::ptf_layer_norm`].
///
/// # Panics
/// If γ or β is empty or longer than [`MAX_CHANNELS`], their lengths or the number of PTF
/// factors differ, a scale is not positive and finite, the zero point is not a code of
/// `params.bits` (which must fit `C`), a PTF shift exceeds `15 − bits`, or `codes` and `out`
/// are not the same whole number of tokens.
///
/// # Examples
/// ```
/// use fqvit_ops::Bits;
/// use fqvit_ops::layer_norm::{InScale, LayerNormParams, ptf_layer_norm};
/// let gamma = [1.0; 4];
/// let beta = [0.0; 4];
/// let params = LayerNormParams { in_scale: InScale::Layer(0.1), zero_point: 128, bits: Bits::BYTE, gamma: &gamma, beta: &beta, out_scale: 0.05 };
/// let mut y = [0; 4];
/// ptf_layer_norm(&[118u8, 128, 128, 138], &params, &mut y);
/// assert_eq!(y, [-28, 0, 0, 28]); // ±√2 / 0.05
/// ```
#[track_caller]
pub fn ptf_layer_norm<C: Code>(codes: &[C], params: &LayerNormParams<'_>, out: &mut [i32]) {
    ptf_layer_norm_with(codes, params, Roots::Exact, out);
}

/// How σ's square root `sqrt(C·Σx² − (Σx)²)` is taken: the one step of the integer LayerNorm
/// whose rounding differs between libraries (libtorch's CPU `sqrt` is not correctly rounded).
#[derive(Clone, Copy, Debug)]
pub enum Roots<'a> {
    /// Correctly rounded (`f32::sqrt`).
    Exact,
    /// One per token, taken by the caller from [`variance_terms`] (to follow another library).
    Given(&'a [f32]),
}

/// [`ptf_layer_norm`] with σ's square root per [`Roots`].
///
/// # Panics
/// As [`ptf_layer_norm`], and if `Roots::Given` does not have one root per token.
#[track_caller]
pub fn ptf_layer_norm_with<C: Code>(
    codes: &[C],
    params: &LayerNormParams<'_>,
    roots: Roots<'_>,
    out: &mut [i32],
) {
    let n_channels = params.check::<C>(codes.len(), out.len());
    let roots = match roots {
        Roots::Exact => None,
        Roots::Given(r) => {
            assert_eq!(
                r.len() * n_channels,
                codes.len(),
                "ptf_layer_norm: {} roots for {} tokens",
                r.len(),
                codes.len() / n_channels
            );
            Some(r)
        }
    };
    let (s_min, shifts) = params.in_scale.min_and_shifts(n_channels);
    let factors: Vec<i32> = shifts.iter().map(|&shift| 1 << shift).collect();
    let task = n_channels * fast::TOKENS_PER_TASK;
    // Runs each task with the widest instruction set the CPU has, so the channel loops below
    // vectorise; IEEE arithmetic gives the same results on every one.
    let arch = pulp::Arch::new();
    codes.par_chunks(task).zip(out.par_chunks_mut(task)).enumerate().for_each_init(
        || vec![0i32; n_channels],
        |x, (i, (codes, y))| {
            let roots = roots.map(|r| &r[i * fast::TOKENS_PER_TASK..][..codes.len() / n_channels]);
            arch.dispatch(Tokens { codes, roots, factors: &factors, s_min, params, x, y })
        },
    );
}

/// σ's radicand `C·Σx² − (Σx)²` of each token in float32, as the original computes it (from
/// exact sums), for a caller that takes its square root with another library ([`Roots::Given`]).
///
/// # Panics
/// As [`ptf_layer_norm`], with `out` one value per token.
#[track_caller]
pub fn variance_terms<C: Code>(codes: &[C], params: &LayerNormParams<'_>, out: &mut [f32]) {
    let n_channels = params.check::<C>(codes.len(), codes.len());
    assert_eq!(
        out.len() * n_channels,
        codes.len(),
        "variance_terms: room for {} tokens, {} given",
        out.len(),
        codes.len() / n_channels
    );
    let (_, shifts) = params.in_scale.min_and_shifts(n_channels);
    let factors: Vec<i32> = shifts.iter().map(|&shift| 1 << shift).collect();
    let task = n_channels * fast::TOKENS_PER_TASK;
    let arch = pulp::Arch::new();
    codes.par_chunks(task).zip(out.par_chunks_mut(fast::TOKENS_PER_TASK)).for_each_init(
        || vec![0i32; n_channels],
        |x, (codes, out)| {
            arch.dispatch(fast::Radicands {
                codes,
                factors: &factors,
                zero_point: params.zero_point,
                x,
                out,
            })
        },
    );
}

/// Requantizes LayerNorm codes for the next uint8 quantizer: `clamp(y + z, 0, 255)`.
///
/// The original dequantizes `y · s_out` and quantizes again with the same scale, which is this.
///
/// # Panics
/// If the lengths differ.
#[track_caller]
pub fn requantize_u8(y: &[i32], zero_point: i32, out: &mut [u8]) {
    assert_eq!(y.len(), out.len(), "requantize_u8: {} codes but room for {}", y.len(), out.len());
    for (o, &v) in out.iter_mut().zip(y) {
        *o = (i64::from(v) + i64::from(zero_point)).clamp(0, 255) as u8;
    }
}
