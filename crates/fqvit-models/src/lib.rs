//! # fqvit-models: ViT, DeiT and Swin over libtorch, with FQ-ViT quantization sites
//!
//! Sits on `fqvit-ops` (the integer kernels and the quantization vocabulary) and `tch`; it
//! knows nothing about calibration algorithms: calibration calls a [`CalibrationSink`] at every
//! site, which `fqvit-calib` implements. One model definition runs in every [`Mode`]:
//!
//! - [`Mode::Float`]: full precision, as timm;
//! - [`Mode::Calibrate`]: float, with every site observed (FQ-ViT's calibration semantics);
//! - [`Mode::Quantized`]: int8 weights, uint8 activations, integer LayerNorm (PTF) and
//!   Log-Int-Softmax, from a frozen [`QParamTable`] (spec §5–§8).
//!
//! Weights load strictly from timm safetensors ([`weights::load_strict`]).
//!
//! ```
//! use fqvit_models::{Mode, vit};
//! use tch::{Device, Kind, Tensor, nn::VarStore};
//!
//! let vs = VarStore::new(Device::Cpu);
//! let cfg = vit::Config { depth: 2, img_size: 32, num_classes: 10, ..vit::Config::deit_tiny() };
//! let model = vit::Vit::new(&vs.root(), &cfg);
//! let logits = model.forward(&Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu)), &mut Mode::Float);
//! assert_eq!(logits.size(), [2, 10]);
//! ```

mod common;
pub mod convert;
mod error;
mod mode;
mod net;
pub mod quant;
mod registry;
pub mod site;
pub mod swin;
pub mod vit;
pub mod weights;

pub use error::{Error, Result};
pub use mode::{CalibrationSink, Mode, QuantOptions};
pub use quant::{Classifier, Layer, Probe, Quantizable, Quantized, Wiring};
pub use registry::{Architecture, HubCheckpoint, ModelName, Preprocess};
pub use site::{QParamTable, Site, SiteGroup, SiteGroups, SiteId, SiteTable, TensorClass};
