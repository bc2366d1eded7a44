//! # fqvit-ops: the integer kernels of FQ-ViT
//!
//! The bottom of the fqvit workspace: plain Rust (rayon, no libtorch), usable alone. It holds
//! the kernels that make FQ-ViT *fully* quantized (Lin et al., IJCAI 2022):
//!
//! - [`layer_norm::ptf_layer_norm`]: LayerNorm on unsigned codes (bytes, or [`Code`] `u16`
//!   for a residual stream wider than a byte) whose channels carry Power-of-Two-Factor scales
//!   (paper §3.3);
//! - [`softmax::log_int_softmax`]: softmax whose output is a log2 code (paper §3.4);
//!
//! and the quantization vocabulary the other crates share: [`BitType`], [`QParams`],
//! [`PtfFactor`], round-half-to-even [`quantize`] / [`dequantize`] on slices.
//!
//! Each kernel has a scalar `reference` written from the equations, one element at a time,
//! and a fast path (rows in parallel) that gives exactly the same integer codes. Both follow
//! the original implementation's arithmetic (`fqvit-spec.md` §6, §7) and agree with its golden
//! vectors bit for bit.
//!
//! ```
//! use fqvit_ops::{BitType, quantize, dequantize};
//! use fqvit_ops::softmax::{log_int_softmax, dequantize_log2};
//!
//! // uint8 codes of attention logits with scale 0.1 and zero point 128 ...
//! let logits = [2.0f32, 1.0, 0.0, -3.0];
//! let codes: Vec<i32> = logits.iter().map(|&x| quantize(x, 0.1, 128, BitType::UINT8) - 128).collect();
//! assert_eq!(dequantize(codes[0] + 128, 0.1, 128), 2.0);
//! // ... become 4-bit log2 probabilities.
//! let mut k = [0u16; 4];
//! log_int_softmax(&codes, 4, 0.1, 4, &mut k);
//! let mut p = [0f32; 4];
//! dequantize_log2(&k, 4, &mut p);
//! // softmax is (0.66, 0.24, 0.090, 0.0045): 1/p rounds to 2, 4, 11, 224 → 2^-1, 2^-2, 2^-3, 2^-8.
//! assert_eq!(p, [0.5, 0.25, 0.125, 0.00390625]);
//! ```

pub mod bits;
pub mod float;
pub mod isa;
pub mod layer_norm;
pub mod qparams;
pub mod rounding;
pub mod softmax;

pub use bits::{BitType, Bits, Code};
pub use isa::Isa;
pub use qparams::{Granularity, PtfFactor, QParams, TensorClass};
pub use rounding::{ChannelAxis, dequantize, fake_quantize_slice, quantize, quantize_slice};
