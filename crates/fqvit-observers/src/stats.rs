//! Per-channel statistics and the shared scale/zero-point formulas (spec §3.1, §3.2).

use fqvit_ops::rounding::{asymmetric_params, symmetric_scale};
use fqvit_ops::{BitType, QParams};
use fqvit_tensor::Quantizer;
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Per-channel max and min, shape `(C)`: weights over `(out, −1)` rows; activations
/// channel-last, 4-D ones NHWC first (spec §3.1).
///
/// The original transposes activations to `(C, rest)` rows; reducing the `(rest, C)` view over
/// its first dimension gives the same values (max and min are exact) without a strided pass.
pub(crate) fn channel_max_min(xs: &Tensor, is_weight: bool) -> (Tensor, Tensor) {
    let xs = xs.to_kind(Kind::Float);
    if is_weight {
        let rows = xs.reshape([xs.size()[0], -1]);
        return (rows.amax(1, false), rows.amin(1, false));
    }
    let xs = if xs.dim() == 4 { xs.permute([0, 2, 3, 1]) } else { xs };
    let c = *xs.size().last().unwrap_or(&1);
    let rows = xs.reshape([-1, c]);
    (rows.amax(0, false), rows.amin(0, false))
}

/// The max and min of all elements, as 0-d tensors.
pub(crate) fn max_min(xs: &Tensor) -> (Tensor, Tensor) {
    let (min, max) = xs.to_kind(Kind::Float).aminmax(None::<i64>, false);
    (max, min)
}

/// A float tensor's values.
pub(crate) fn values(xs: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        xs.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous().view(-1),
    )?)
}

/// Scales and zero points from min/max values: symmetric (`m / 127.5`, zp 0) or asymmetric
/// (`(max − min) / span`, `zp = clamp(lower − round(min/s))`). Minmax, ema and percentile are
/// symmetric exactly for signed types; omse and ptf are always asymmetric (spec §1).
pub(crate) fn params_from_range(
    min: &[f32],
    max: &[f32],
    bit_type: BitType,
    symmetric: bool,
) -> Result<QParams> {
    if min.iter().chain(max).any(|v| !v.is_finite()) {
        return Err(Error::BadInput(
            "the observed range is not finite (NaN or infinite activations)".into(),
        ));
    }
    let (mut scale, mut zero_point) =
        (Vec::with_capacity(min.len()), Vec::with_capacity(min.len()));
    for (&lo, &hi) in min.iter().zip(max) {
        if symmetric {
            scale.push(symmetric_scale(lo, hi, bit_type));
            zero_point.push(0);
        } else {
            let (s, z) = asymmetric_params(lo, hi, bit_type);
            scale.push(s);
            zero_point.push(z);
        }
    }
    Ok(QParams { bit_type, scale, zero_point, ptf: None })
}

/// `lp_loss(x, x̂, p = 2, reduction = 'all')`: `mean(|x − x̂|²)` in float32.
pub(crate) fn mse(xs: &Tensor, fq: &Tensor) -> f32 {
    (xs - fq).abs().pow_tensor_scalar(2.0).mean(Kind::Float).double_value(&[]) as f32
}

/// The layer-wise quantizer of a candidate scale and zero point, on the data's device.
pub(crate) fn candidate(xs: &Tensor, scale: f32, zero_point: f32, bit_type: BitType) -> Quantizer {
    Quantizer::layer_wise(bit_type, scale, zero_point, xs.device())
}

#[cfg(test)]
mod tests {
    use fqvit_ops::BitType;
    use tch::{Device, Kind, Tensor};

    use super::{candidate, mse};

    /// The in-place score equals the plain one bit for bit at a model-sized activation, where
    /// libtorch's vectorised and parallel kernels are in play.
    #[test]
    fn in_place_score_equals_the_plain_one() {
        let xs = fqvit_testkit::seeded(3, || {
            Tensor::randn([100, 197, 192], (Kind::Float, Device::Cpu)) * 3.0
        });
        for bit_type in [BitType::UINT8, BitType::INT8] {
            for (scale, zero) in [(0.05f32, 128f32), (0.013, 97.0), (0.2, 0.0)] {
                let zero = if bit_type.signed { 0.0 } else { zero };
                let q = candidate(&xs, scale, zero, bit_type);
                let plain = mse(&xs, &q.fake_quant(&xs));
                let fused = q.fake_quant_mse(&xs);
                assert_eq!(plain.to_bits(), fused.to_bits(), "{bit_type:?} {scale} {zero}");
            }
        }
    }
}
