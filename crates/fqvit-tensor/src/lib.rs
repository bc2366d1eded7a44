//! FQ-ViT's quantization on libtorch tensors, on whatever device the tensor lives: the one home
//! of tensor fake quantization ([`Quantizer`]), the integer LayerNorm ([`IntLayerNorm`]) and
//! Log-Int-Softmax ([`LogIntSoftmax`]).
//!
//! Each operation is the original's, op for op: the same float32 operations in the same order,
//! and the same kind of operand. That last point matters on CUDA, where libtorch divides by a
//! CPU scalar as a multiplication by its reciprocal but divides by a tensor exactly: every
//! divisor here is a tensor on the input's device, as the original's quantizer parameters are.
//! Where the original's float32 arithmetic is not exact (sums of squares past 2^24, `M·x + B`
//! past 2^24), these compute the exact integers of `fqvit_ops`; see [`IntLayerNorm`].

mod cpu;
mod layer_norm;
mod lis;
mod quantizer;

pub use fqvit_ops::float::LisInput;
pub use layer_norm::{IntLayerNorm, LayerNormInput, MAX_CHANNELS, StdSqrt};
pub use lis::LogIntSoftmax;
pub use quantizer::{Axis, Quantizer};
