//! The integer LayerNorm on PTF codes (spec §6), the original's `QIntLayerNorm` in mode `'int'`.

use fqvit_ops::layer_norm::integer::{IntegerLayerNorm, PrepareError};
use fqvit_ops::layer_norm::{InScale, LayerNormParams, Roots, ptf_layer_norm_with, variance_terms};
use fqvit_ops::{Bits, Code, PtfFactor, QParams};
use tch::{Device, Kind, Tensor};

/// How σ's square root is taken.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum StdSqrt {
    /// libtorch's float32 `sqrt`, as the original: on CPU it is not correctly rounded (about
    /// 0.6 % of the integers below 2^24 on one AVX-512 machine, 20 % on another), so the codes
    /// can depend on the machine, as the original's do.
    #[default]
    Libtorch,
    /// Correctly rounded, as `f32::sqrt` in `fqvit_ops`: the same codes on every machine.
    Exact,
    /// σ by an integer square root and every per-token factor in integers
    /// (`fqvit_ops::layer_norm::integer`), as the integer engine computes it: the same codes on
    /// every machine, and no float arithmetic per token. Runs on the CPU (a tensor elsewhere
    /// is copied there and back).
    Integer,
}

impl StdSqrt {
    /// Every choice.
    pub const ALL: [StdSqrt; 3] = [StdSqrt::Libtorch, StdSqrt::Exact, StdSqrt::Integer];

    /// Its name in flags and configs (`--layer-norm-sqrt`, TOML `layer-norm-sqrt`).
    pub const fn as_str(self) -> &'static str {
        match self {
            StdSqrt::Libtorch => "libtorch",
            StdSqrt::Exact => "exact",
            StdSqrt::Integer => "integer",
        }
    }
}

/// The input side of an integer LayerNorm: the quantizer before it.
#[derive(Clone, Copy, Debug)]
pub struct LayerNormInput<'a> {
    /// Its parameters: layer-wise, or PTF (one scale per channel, powers of two apart).
    pub params: &'a QParams,
    /// How many times its channels repeat across the LayerNorm's (Swin's patch merging: 4).
    pub expand: usize,
}

/// One integer LayerNorm with every constant that does not change per batch prepared on the
/// device: the per-channel input scales and their power-of-two ratios, `s_min` and `s_min / C`
/// (computed there by the same operation as the original, so with its device's rounding),
/// γ, β, the output scale, and the zero-variance codes.
///
/// The result equals `fqvit_ops::layer_norm::ptf_layer_norm` on the same codes (with
/// [`StdSqrt::Exact`]; with [`StdSqrt::Libtorch`] wherever libtorch's square root is correctly
/// rounded) because each step is either the same float32 operation or provably exact:
/// - `x = round(X / s) · m` are integers with `|x| < 2^15` (exact in float32; `|x| ≤ 2040`
///   with the original's PTF factors up to 3);
/// - `Σx` and `Σx²` are summed in float64, exact below 2^53 (`C · 2^30` for
///   `C ≤ 2^16`), then rounded once to float32, as `fqvit_ops` converts its i64 sums;
///   `μ = (Σx / C) · s_min` is the original's `mean` wherever `Σx` is exact in float32 (with the
///   original's factors, `2040·C < 2^24`); its float32 `Σx²` agrees whenever `Σx² < 2^24` and
///   otherwise depends on its summation order;
/// - zero variance is all `x` of a token equal (max = min), exactly;
/// - `M·x + B` is formed in float64: `|M·x| < 255 · 2^15 < 2^23` and `B` is an integer-valued
///   float32, so the sum is exact below 2^53, the division by `2^N` is exact and rounding it
///   half to even is `fqvit_ops`' `round_shift`; the original adds in float32, which agrees
///   below 2^24.
#[derive(Debug)]
pub struct IntLayerNorm {
    host: Host,
    in_scale: Tensor,
    mask: Tensor,
    s_min: Tensor,
    s_min_over_c: Tensor,
    gamma: Tensor,
    beta: Tensor,
    out_scale: Tensor,
    zero_variance: Tensor,
    channels: i64,
    sqrt: StdSqrt,
    /// The integer constants, under [`StdSqrt::Integer`].
    integer: Option<IntegerLayerNorm>,
}

/// The constants on the host, for the fused CPU path (`fqvit_ops::layer_norm`).
#[derive(Debug)]
struct Host {
    /// The input scale of every channel (tiled), to recover the codes.
    scales: Vec<f32>,
    zero_point: i32,
    /// The input codes' width.
    bits: Bits,
    /// PTF factors (tiled), or `None` for one input scale.
    ptf: Option<Vec<PtfFactor>>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    out_scale: f32,
}

impl Host {
    fn params(&self) -> LayerNormParams<'_> {
        let scales = if self.ptf.is_some() { &self.scales[..] } else { &self.scales[..1] };
        LayerNormParams {
            in_scale: InScale::of(scales, self.ptf.as_deref(), self.gamma.len())
                .expect("tiled to the channels in new"),
            zero_point: self.zero_point,
            bits: self.bits,
            gamma: &self.gamma,
            beta: &self.beta,
            out_scale: self.out_scale,
        }
    }
}

/// The most channels, `fqvit_ops`' bound (its `C·Σx²` stays below 2^63).
pub const MAX_CHANNELS: i64 = fqvit_ops::layer_norm::MAX_CHANNELS as i64;

impl IntLayerNorm {
    /// Prepares the LayerNorm with γ and β (float32, `C`), the input quantizer and the output
    /// scale (layer-wise), on γ's device.
    ///
    /// # Errors
    /// Under [`StdSqrt::Integer`], when γ, β and the output scale give integer constants out of
    /// range, naming the channel.
    ///
    /// # Panics
    /// If γ and β differ in length, `C` exceeds [`MAX_CHANNELS`], or the input has neither one
    /// scale nor `C / expand` of them.
    #[track_caller]
    pub fn new(
        gamma: &Tensor,
        beta: &Tensor,
        input: LayerNormInput<'_>,
        out_scale: f32,
        sqrt: StdSqrt,
    ) -> Result<Self, PrepareError> {
        let device: Device = gamma.device();
        let channels = gamma.numel() as i64;
        assert_eq!(beta.numel() as i64, channels, "integer LayerNorm: γ and β differ in length");
        assert!(
            (1..=MAX_CHANNELS).contains(&channels),
            "integer LayerNorm: {channels} channels, expected 1..={MAX_CHANNELS}"
        );
        let scales = &input.params.scale;
        assert!(
            scales.len() == 1 || scales.len() * input.expand == channels as usize,
            "integer LayerNorm: {} input scales ×{} for {channels} channels",
            scales.len(),
            input.expand
        );
        // The original tiles the per-channel scales `expand` times (`in_scale_expand`).
        let tile = |n: usize| scales.len() * n;
        let host_scales: Vec<f32> =
            scales.iter().copied().cycle().take(tile(input.expand)).collect();
        let ptf = input.params.ptf.as_ref().filter(|_| scales.len() > 1).map(|f| {
            f.iter().copied().cycle().take(tile(input.expand)).collect::<Vec<PtfFactor>>()
        });
        let in_scale = Tensor::from_slice(&host_scales).to_device(device);
        let s_min = in_scale.min();
        let mask = (&in_scale / &s_min).round();
        let s_min_over_c = &s_min / channels as f64;
        let out_scale = Tensor::from_slice(&[out_scale]).to_device(device);
        let (gamma, beta) =
            (gamma.detach().to_kind(Kind::Float), beta.detach().to_kind(Kind::Float));
        // A token whose codes are all equal: round(β / s_out), the limit as the variance goes to 0
        // (the original divides by σ = 0 there and returns NaN).
        let zero_variance = (&beta / &out_scale).round();
        let to_host = |t: &Tensor| {
            Vec::<f32>::try_from(&t.to_device(Device::Cpu).contiguous().view(-1)).expect("float32")
        };
        let host = Host {
            // One per channel, also for a layer-wise input.
            scales: host_scales.iter().copied().cycle().take(channels as usize).collect(),
            zero_point: input.params.zero_point[0],
            bits: input.params.bit_type.bits,
            ptf,
            gamma: to_host(&gamma),
            beta: to_host(&beta),
            out_scale: out_scale.double_value(&[0]) as f32,
        };
        let integer = match sqrt {
            StdSqrt::Integer => Some(IntegerLayerNorm::new(&host.params())?),
            StdSqrt::Libtorch | StdSqrt::Exact => None,
        };
        Ok(IntLayerNorm {
            host,
            in_scale,
            mask,
            s_min,
            s_min_over_c,
            gamma,
            beta,
            out_scale,
            zero_variance,
            channels,
            sqrt,
            integer,
        })
    }

    /// The output codes `y` (not clamped) of the fake-quantized input `X` `(…, C)`, as float32,
    /// in libtorch operations (any device).
    pub fn codes(&self, xs: &Tensor) -> Tensor {
        if self.integer.is_some() {
            return self.integer_codes(xs);
        }
        self.codes_with_root(xs, &|var: &Tensor| match self.sqrt {
            StdSqrt::Libtorch | StdSqrt::Integer => var.sqrt(),
            // A faithful float64 root rounds to the correctly rounded float32 one: the root of a
            // float32 is never within 2^-50 (relative) of a float32 rounding midpoint.
            StdSqrt::Exact => var.to_kind(Kind::Double).sqrt().to_kind(Kind::Float),
        })
    }

    /// [`codes`](Self::codes) with σ's square root `sqrt(C·Σx² − (Σx)²)` taken by `root`
    /// (float32 in, float32 out): the one step whose rounding differs between libraries and
    /// CPUs, so that a check can replay another machine's rounding.
    pub fn codes_with_root(&self, xs: &Tensor, root: &dyn Fn(&Tensor) -> Tensor) -> Tensor {
        let c = *xs.size().last().expect("LayerNorm input has channels");
        assert_eq!(
            c, self.channels,
            "integer LayerNorm: input has {c} channels, expected {}",
            self.channels
        );
        let last = [-1i64];
        let last = last.as_slice();
        // x = round(X / s) · m: the codes minus the zero point, in units of s_min.
        let mut x = xs / &self.in_scale;
        let _ = x.round_().g_mul_(&self.mask);
        let sum = x.sum_dim_intlist(last, false, Kind::Double).to_kind(Kind::Float);
        let mean = &sum / self.channels as f64 * &self.s_min;
        let sum_sq_exact = x.square().sum_dim_intlist(last, false, Kind::Double);
        // Zero variance: every integer of the token equal.
        let flat = x.amax(last, false).eq_tensor(&x.amin(last, false));
        let var = sum_sq_exact.to_kind(Kind::Float) * self.channels as f64 - sum.square();
        let std = &self.s_min_over_c * root(&var);
        // A = (s_min / σ) · γ / s_out ≈ sign · M / 2^N (get_MN).
        let a = (&self.s_min / &std).unsqueeze(-1) * &self.gamma / &self.out_scale;
        let sign = a.sign();
        let abs = a.abs();
        let n = (abs.log2().floor().neg() + 7.0).clamp(0.0, 31.0);
        let pow = n.exp2();
        let m = (&abs * &pow).floor().clamp(0.0, 255.0);
        let b = ((&self.beta - (&mean / &std).unsqueeze(-1) * &self.gamma) / &self.out_scale
            * &pow)
            .round();
        // y = round((sign · M · x + B) / 2^N), exactly (see the type's docs).
        let mx = sign * m * x;
        let mut y = mx.to_kind(Kind::Double) + b.to_kind(Kind::Double);
        let _ = y.g_div_(&pow.to_kind(Kind::Double)).round_();
        let y = y.to_kind(Kind::Float);
        // Zero variance, or float32 cancellation that leaves σ ≤ 0 or not finite (as fqvit_ops).
        let regular = std.gt(0.0).logical_and(&std.isfinite()).logical_and(&flat.logical_not());
        y.where_self(&regular.unsqueeze(-1), &self.zero_variance)
    }

    /// The output `y · s_out`, what the original returns.
    ///
    /// A contiguous float32 CPU input whose codes `round(X / s) + z` are on its grid takes
    /// `fqvit_ops::layer_norm` (three passes instead of about twenty-five libtorch operations),
    /// with σ's root from libtorch's `sqrt` of the radicands laid out as the original's
    /// (`(…)`, contiguous: libtorch takes vector and scalar paths by position) or exact.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.forward_cpu(xs).unwrap_or_else(|| self.codes(xs) * &self.out_scale)
    }

    /// The codes of [`StdSqrt::Integer`], computed on the CPU and returned on `xs`'s device.
    ///
    /// # Panics
    /// If the input's codes `round(X / s) + z` are not codes of the input's width (not the
    /// quantizer's output).
    fn integer_codes(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        assert_eq!(
            size.last().copied(),
            Some(self.channels),
            "integer LayerNorm: input has {size:?} channels, expected {}",
            self.channels
        );
        let cpu = xs.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let x = crate::cpu::slice(&cpu).expect("a contiguous float32 CPU tensor");
        let y = self.host_codes(x, &size).unwrap_or_else(|| {
            panic!(
                "integer LayerNorm: the input is not on its quantizer's {}-bit grid",
                self.host.bits.get()
            )
        });
        let y: Vec<f32> = y.iter().map(|&v| v as f32).collect();
        Tensor::from_slice(&y).view(size.as_slice()).to_device(xs.device())
    }

    /// The output codes `y` of `fqvit_ops::layer_norm` on the host, or `None` where the input's
    /// codes `round(X / s) + z` are not codes of the input's width.
    fn host_codes(&self, x: &[f32], size: &[i64]) -> Option<Vec<i32>> {
        if self.host.bits.fits_byte() {
            self.host_codes_in::<u8>(x, size)
        } else {
            self.host_codes_in::<u16>(x, size)
        }
    }

    fn host_codes_in<C: Code>(&self, x: &[f32], size: &[i64]) -> Option<Vec<i32>> {
        let h = &self.host;
        let mut codes = vec![C::default(); x.len()];
        if !fqvit_ops::float::codes(x, &h.scales, h.zero_point, h.bits, &mut codes) {
            return None;
        }
        let params = h.params();
        let mut y = vec![0i32; x.len()];
        match (self.sqrt, &self.integer) {
            (_, Some(integer)) => integer.run(fqvit_ops::Isa::Native, &codes, &mut y),
            (StdSqrt::Exact, None) => ptf_layer_norm_with(&codes, &params, Roots::Exact, &mut y),
            (StdSqrt::Libtorch | StdSqrt::Integer, None) => {
                let mut var = crate::cpu::Owned::zeros(&size[..size.len() - 1]);
                variance_terms(&codes, &params, var.as_mut_slice());
                let roots = var.tensor().sqrt();
                let roots =
                    crate::cpu::slice(&roots).expect("a new float32 CPU tensor is contiguous");
                ptf_layer_norm_with(&codes, &params, Roots::Given(roots), &mut y);
            }
        }
        Some(y)
    }

    fn forward_cpu(&self, xs: &Tensor) -> Option<Tensor> {
        let x = crate::cpu::slice(xs)?;
        let size = xs.size();
        let c = *size.last()? as usize;
        if c != self.channels as usize {
            return None;
        }
        let y = self.host_codes(x, &size)?;
        let mut out = crate::cpu::Owned::zeros(&size);
        fqvit_ops::float::dequantize_i32(&y, self.host.out_scale, out.as_mut_slice());
        Some(out.into_tensor())
    }
}
