//! Log-Int-Softmax on float logits (spec §7), the original's `QIntSoftmax` with `log_i_softmax`.

use fqvit_ops::float::LisInput;
use fqvit_ops::softmax::reference::N;
use fqvit_ops::softmax::{ExpShift, LisBits, LisConstants};
use tch::{Device, Kind, Tensor};

/// Log-Int-Softmax of one attention site, its constants prepared on a device.
///
/// The float32 steps of `fqvit_ops::softmax::reference::log_int_softmax_f32`, written as tensor
/// operations so that the row sum is libtorch's own (its vectorised summation order, as in the
/// original: a different order moves `round(Σ/e)` at exact boundaries) and the work stays on
/// the tensor's device. The divisors `S` and `I0` are device tensors, as in the original.
#[derive(Debug)]
pub struct LogIntSoftmax {
    constants_scale: f32,
    scale: Tensor,
    i0: Tensor,
    constants: LisConstants,
    shift: ExpShift,
    bits: u32,
    input: LisInput,
}

impl LogIntSoftmax {
    /// LIS with the scale `S` of the quantizer before it and `bits`-bit log2 codes.
    ///
    /// # Panics
    /// If `S` is not positive and finite (checked by [`LisConstants::new`]).
    #[track_caller]
    pub fn new(scale: f32, bits: LisBits, device: Device) -> Self {
        let bits = bits.get();
        let constants = LisConstants::new(scale);
        LogIntSoftmax {
            constants_scale: scale,
            scale: Tensor::from_slice(&[scale]).to_device(device),
            i0: Tensor::from_slice(&[constants.i0 as f32]).to_device(device),
            constants,
            shift: ExpShift::NONE,
            bits,
            input: LisInput::Float,
        }
    }

    /// The same LIS reading `X/S` as `input` says (the original: float, unrounded).
    pub fn with_input(self, input: LisInput) -> Self {
        LogIntSoftmax { input, ..self }
    }

    /// The same LIS with its exponential on a grid `2^shift` times finer than `S` (the
    /// original: 0).
    ///
    /// # Panics
    /// If `S·2^-shift` is not a normal float (checked by [`LisConstants::shifted`]).
    #[track_caller]
    pub fn with_exp_shift(self, shift: ExpShift) -> Self {
        let constants = LisConstants::shifted(self.constants_scale, shift);
        let i0 = Tensor::from_slice(&[constants.i0 as f32]).to_device(self.i0.device());
        LogIntSoftmax { constants, shift, i0, ..self }
    }

    /// The scale it was made with.
    pub fn scale(&self) -> f32 {
        self.constants_scale
    }

    /// `2^−k` or 0 for each logit, softmax over the last dimension.
    ///
    /// A contiguous float32 CPU input takes two fused passes around libtorch's row sum
    /// (`fqvit_ops::float::lis_exp_rows` and `lis_powers`, the same float32 operations; the sum
    /// runs on a contiguous tensor of the same shape, as in the original); anything else runs
    /// as libtorch operations.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let Some(x) = crate::cpu::slice(xs) else { return self.forward_ops(xs) };
        let size = xs.size();
        let Some(&row_len) = size.last().filter(|&&n| n > 0) else { return self.forward_ops(xs) };
        let row_len = row_len as usize;
        let scale = self.constants_scale;
        let mut e = crate::cpu::Owned::zeros(&size);
        fqvit_ops::float::lis_exp_rows(x, row_len, scale, self.shift, self.input, e.as_mut_slice());
        let sums = e.tensor().sum_dim_intlist([-1i64].as_slice(), false, Kind::Float);
        let sums = crate::cpu::slice(&sums).expect("a new float32 CPU tensor is contiguous");
        fqvit_ops::float::lis_powers(e.as_mut_slice(), sums, row_len, self.bits);
        e.into_tensor()
    }

    /// [`forward`](Self::forward) in libtorch operations (any device).
    fn forward_ops(&self, xs: &Tensor) -> Tensor {
        let k = &self.constants;
        let (i0, ib, ic) = (k.i0 as f64, k.ib as f64, k.ic as f64);
        let n = f64::from(N);
        // int_exp: x = X/S − max, clipped at n·I0; q = ⌊x/I0⌋, r = x − I0·q.
        let mut x = xs.to_kind(Kind::Float) / &self.scale;
        if self.input == LisInput::Rounded {
            let _ = x.round_();
        }
        let _ = x.g_sub_(&x.amax([-1i64].as_slice(), true));
        // Exact: the exponential's finer grid (`ExpShift`).
        let _ = x.g_mul_scalar_(f64::from(1u32 << self.shift.get()));
        let _ = x.clamp_min_(n * i0);
        let mut q = (&x / &self.i0).floor_();
        // r = x − q·I0 (the product is an exact small integer, so this is the original's value).
        let _ = x.g_sub_(&(&q * i0));
        // int_polynomial: z = r·(r + I_b) + I_c, in the original's three steps.
        let mut z = &x + ib;
        let _ = z.g_mul_(&x);
        let _ = z.g_add_scalar_(ic);
        // e = max(⌊z · 2^(n − q)⌋, 0).
        let _ = q.neg_().g_add_scalar_(n).exp2_();
        let _ = z.g_mul_(&q);
        let _ = z.floor_().clamp_min_(0.0);
        let sum = z.sum_dim_intlist([-1i64].as_slice(), true, Kind::Float);
        let mut u = sum / &z;
        let _ = u.round_();
        // log_round: ⌊log2 u⌋, plus one where u − 2^k ≥ 2^(k−1).
        let mut big = u.log2().floor_();
        let extra = (&u - big.exp2()).ge_tensor(&(&big - 1.0).exp2_());
        let _ = big.g_add_(&extra.to_kind(Kind::Float));
        let zero = f64::from(1u32 << self.bits);
        let mask = big.ge(zero);
        let _ = big.clamp_(0.0, zero - 1.0).neg_().exp2_();
        big.masked_fill(&mask, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused CPU passes equal the libtorch operations bit for bit: fake-quantized logits,
    /// logits off the grid, Swin's −100 mask, rows of 49 and 197, 4 and 8 bits.
    #[test]
    fn fused_passes_equal_the_tensor_operations() {
        let cpu = (Kind::Float, Device::Cpu);
        for &(scale, row) in &[(0.0571f32, 197i64), (0.1, 49), (0.013, 197), (0.4, 49)] {
            let (codes, off_grid, mask) = fqvit_testkit::seeded(11 + row, || {
                let codes = Tensor::randint(256, [2, 3, row, row], (Kind::Int64, Device::Cpu));
                let off_grid = Tensor::randn([2, 3, row, row], cpu) * 3.0;
                let mask = Tensor::rand([1, 1, row, row], cpu).lt(0.3);
                (codes, off_grid, mask)
            });
            let on_grid = (codes.to_kind(Kind::Float) - 131.0) * f64::from(scale);
            let mask = mask.to_kind(Kind::Float) * -100.0;
            let masked = &on_grid + mask;
            for (bits, shift) in [(4, 0), (8, 0), (4, 3), (8, 5)] {
                let lis = LogIntSoftmax::new(scale, LisBits::try_from(bits).unwrap(), Device::Cpu)
                    .with_exp_shift(ExpShift::try_from(shift).unwrap());
                for (what, xs) in
                    [("on the grid", &on_grid), ("off it", &off_grid), ("masked", &masked)]
                {
                    let fused = lis.forward(xs);
                    let ops = lis.forward_ops(xs);
                    let differ = fused.ne_tensor(&ops).sum(Kind::Int64).int64_value(&[]);
                    assert_eq!(
                        differ, 0,
                        "S = {scale}, rows of {row}, {bits} bits, shift {shift}, logits {what}"
                    );
                }
            }
        }
    }
}
