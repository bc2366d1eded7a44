//! Uniform fake quantization of tensors (spec §4.1), the original's `UniformQuantizer`.

use fqvit_ops::{BitType, QParams};
use tch::{Device, Kind, Tensor};

/// Where the channels of a channel-wise quantizer are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// The last dimension: activations `(…, C)` (and PTF sites).
    Last,
    /// The first dimension: conv and linear weights `(C_out, …)`.
    First,
}

/// One site's uniform quantizer with its parameters on a device, ready for every call.
///
/// `codes(x) = clamp(round(x / s + z), lo, hi)` and `fake_quant(x) = (codes(x) − z) · s`, in
/// float32 with the original's operations in its order. Scale and zero point are tensors on the
/// device, like the original's quantizer buffers, so that division is a true division on every
/// device (libtorch's CUDA kernel multiplies by the reciprocal of a CPU scalar divisor).
#[derive(Debug)]
pub struct Quantizer {
    scale: Tensor,
    zero: Tensor,
    lo: f64,
    hi: f64,
    axis: Axis,
    /// Scales and the zero point on the host, for the fused CPU pass (channels last, one zero
    /// point).
    host: Option<(Vec<f32>, f32)>,
}

impl Quantizer {
    /// The quantizer of `params` (one scale, or one per channel along `axis`) on `device`.
    pub fn new(params: &QParams, axis: Axis, device: Device) -> Self {
        let zero: Vec<f32> = params.zero_point.iter().map(|&z| z as f32).collect();
        let host = (axis == Axis::Last && zero.len() == 1).then(|| (params.scale.clone(), zero[0]));
        Quantizer {
            scale: Tensor::from_slice(&params.scale).to_device(device),
            zero: Tensor::from_slice(&zero).to_device(device),
            lo: f64::from(params.bit_type.lower()),
            hi: f64::from(params.bit_type.upper()),
            axis,
            host,
        }
    }

    /// A layer-wise quantizer.
    pub fn layer_wise(bit_type: BitType, scale: f32, zero_point: f32, device: Device) -> Self {
        Quantizer {
            scale: Tensor::from_slice(&[scale]).to_device(device),
            zero: Tensor::from_slice(&[zero_point]).to_device(device),
            lo: f64::from(bit_type.lower()),
            hi: f64::from(bit_type.upper()),
            axis: Axis::Last,
            host: Some((vec![scale], zero_point)),
        }
    }

    /// A parameter shaped to broadcast against `xs` (channels on the first axis for weights).
    fn shaped(&self, p: &Tensor, xs: &Tensor) -> Tensor {
        match self.axis {
            Axis::First if p.numel() > 1 => {
                let mut shape = vec![-1i64];
                shape.resize(xs.dim().max(1), 1);
                p.view(shape.as_slice())
            }
            _ => p.shallow_clone(),
        }
    }

    /// `clamp(round(x / s + z), lo, hi)`: the integer codes, as float32.
    ///
    /// `z + x / s` in one pass (`addcdiv` with value 1: `1·x` is exact, so it is `x / s + z`
    /// rounded once, as the original's two operations), then rounding and clamping in place.
    pub fn codes(&self, xs: &Tensor) -> Tensor {
        let (s, z) = (self.shaped(&self.scale, xs), self.shaped(&self.zero, xs));
        let xs =
            if xs.kind() == Kind::Float { xs.shallow_clone() } else { xs.to_kind(Kind::Float) };
        let mut q = z.addcdiv(&xs, &s);
        let _ = q.round_();
        let _ = q.clamp_(self.lo, self.hi);
        q
    }

    /// `(codes(x) − z) · s`: one fused pass for a contiguous float32 CPU activation
    /// (`fqvit_ops::float::fake_quantize_into`, the same operations), else libtorch operations
    /// in place on the codes.
    pub fn fake_quant(&self, xs: &Tensor) -> Tensor {
        if let (Some((scales, zero)), Some(x)) = (&self.host, crate::cpu::slice(xs))
            && (scales.len() == 1 || xs.size().last() == Some(&(scales.len() as i64)))
        {
            let mut out = crate::cpu::Owned::zeros(&xs.size());
            let (lo, hi) = (self.lo as f32, self.hi as f32);
            fqvit_ops::float::fake_quantize_into(x, scales, *zero, lo, hi, out.as_mut_slice());
            return out.into_tensor();
        }
        self.fake_quant_ops(xs)
    }

    /// [`fake_quant`](Self::fake_quant) in libtorch operations (any device).
    fn fake_quant_ops(&self, xs: &Tensor) -> Tensor {
        let mut q = self.codes(xs);
        let _ = q.g_sub_(&self.shaped(&self.zero, xs));
        let _ = q.g_mul_(&self.shaped(&self.scale, xs));
        q
    }

    /// `mean((fake_quant(x) − x)²)` in one buffer: the original's `lp_loss(x, x̂, p = 2)`
    /// (`(x̂ − x)²` equals `|x − x̂|²` bit for bit: negation is exact and torch squares by `x·x`).
    pub fn fake_quant_mse(&self, xs: &Tensor) -> f32 {
        let mut t = self.fake_quant(xs);
        let _ = t.g_sub_(xs);
        let _ = t.square_();
        t.mean(Kind::Float).double_value(&[]) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The original's chain, out of place.
    fn chain(xs: &Tensor, s: &Tensor, z: &Tensor, lo: f64, hi: f64) -> Tensor {
        ((xs / s + z).round().clamp(lo, hi) - z) * s
    }

    /// Equal to the chain bit for bit, with values on rounding ties, outside the code range,
    /// and per-channel parameters on either axis.
    #[test]
    fn fake_quant_equals_the_original_chain() {
        let cpu = (Kind::Float, Device::Cpu);
        let (s, z) = (0.03125f32, 113i32);
        // Ties: x/s + z = k + 0.5 exactly for these x (s is a power of two).
        let ties = (Tensor::arange_start(-300, 300, cpu) + 0.5 - f64::from(z)) * f64::from(s);
        let xs =
            Tensor::cat(&[fqvit_testkit::seeded(7, || Tensor::randn([4000], cpu)) * 6.0, ties], 0);
        let layer = QParams::layer_wise(BitType::UINT8, s, z);
        let q = Quantizer::new(&layer, Axis::Last, Device::Cpu);
        let theirs = chain(&xs, &Tensor::from(s), &Tensor::from(z as f32), 0.0, 255.0);
        assert!(q.fake_quant(&xs).equal(&theirs), "layer-wise, fused");
        assert!(q.fake_quant_ops(&xs).equal(&theirs), "layer-wise, libtorch operations");

        let xs = xs.narrow(0, 0, 4096).reshape([16, 256]);
        let scales: Vec<f32> = (0..256).map(|c| s * (1 << (c % 4)) as f32).collect();
        let channel = QParams {
            bit_type: BitType::UINT8,
            scale: scales.clone(),
            zero_point: vec![z],
            ptf: None,
        };
        let ours = Quantizer::new(&channel, Axis::Last, Device::Cpu).fake_quant(&xs);
        let theirs = chain(&xs, &Tensor::from_slice(&scales), &Tensor::from(z as f32), 0.0, 255.0);
        assert!(ours.equal(&theirs), "channel-wise, last axis");

        let w = xs.transpose(0, 1).contiguous() * 0.01;
        let weight = QParams {
            bit_type: BitType::INT8,
            scale: scales[..].iter().map(|s| s * 0.01).collect(),
            zero_point: vec![0; 256],
            ptf: None,
        };
        let ours = Quantizer::new(&weight, Axis::First, Device::Cpu).fake_quant(&w);
        let s = Tensor::from_slice(&weight.scale).view([-1, 1]);
        let theirs = chain(&w, &s, &Tensor::zeros([256, 1], cpu), -128.0, 127.0);
        assert!(ours.equal(&theirs), "channel-wise, first axis");
    }
}
