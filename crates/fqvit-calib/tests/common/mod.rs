//! Shared test helpers: the data beside the repository and the real ViT-Tiny.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

use fqvit_models::weights::load_strict;
use fqvit_models::{ModelName, vit};

/// `../shared` beside the repository (or `$FQVIT_SHARED_DIR`); panics when missing, so tests
/// never pass by skipping.
pub fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("FQVIT_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    assert!(
        dir.join("imagenet-sample").is_dir(),
        "shared data missing at {} (set FQVIT_SHARED_DIR)",
        dir.display()
    );
    dir
}

pub fn sample_dir() -> PathBuf {
    shared_dir().join("imagenet-sample")
}

pub fn vit_tiny_weights() -> PathBuf {
    shared_dir().join("weights").join(ModelName::VitTiny.weights_folder()).join("model.safetensors")
}

/// The real ViT-Tiny with the shared weights, on the CPU.
pub fn vit_tiny() -> (tch::nn::VarStore, vit::Vit) {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = vit::Vit::new(&vs.root(), &vit::Config::vit_tiny());
    load_strict(&vs, &vit_tiny_weights()).expect("shared ViT-Tiny weights load");
    (vs, model)
}
