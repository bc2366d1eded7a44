//! Shared test helpers: the data beside the repository and the real ViT-Tiny.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

pub mod tiny;

use fqvit_models::weights::load_strict;
use fqvit_models::{ModelName, vit};

pub use fqvit_testkit::shared_dir;

pub fn sample_dir() -> PathBuf {
    shared_dir().join("imagenet-sample")
}

pub fn vit_tiny_weights() -> PathBuf {
    shared_dir().join("weights").join(ModelName::VitTiny.weights_folder()).join("model.safetensors")
}

/// The real ViT-Tiny with the shared weights, on the CPU.
pub fn vit_tiny() -> (tch::nn::VarStore, vit::Vit) {
    // The initialisation draws from libtorch's generator before the weights replace it.
    let (vs, model) = fqvit_testkit::seeded(0, || {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let model = vit::Vit::new(&vs.root(), &vit::Config::vit_tiny());
        (vs, model)
    });
    load_strict(&vs, &vit_tiny_weights()).expect("shared ViT-Tiny weights load");
    (vs, model)
}

/// The original's calibrated parameters of the shared ViT-Tiny (`--ptf --lis` minmax, golden
/// file) as our table: keyed by the original's module names; a PTF site's factors are its
/// scales' power-of-two ratios to the smallest one.
pub fn golden_vit_tiny_table(model: &vit::Vit) -> fqvit_models::QParamTable {
    use fqvit_models::{Quantizable, TensorClass};
    use fqvit_ops::{BitType, PtfFactor, QParams};
    let path = shared_dir().join("golden/vit_tiny_minmax_ptf_lis_qparams.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut table = fqvit_models::QParamTable::empty(model.sites().len());
    for (id, site) in model.sites().iter() {
        let Some(g) = golden["qparams"].get(&site.original) else {
            assert_eq!(site.class, TensorClass::Softmax, "no golden entry for {}", site.original);
            continue;
        };
        let values = |k: &str| -> Vec<f64> {
            g[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
        };
        let scale: Vec<f32> = values("scale").into_iter().map(|s| s as f32).collect();
        let zero_point: Vec<i32> = values("zero_point").into_iter().map(|z| z as i32).collect();
        let bit_type =
            if site.class == TensorClass::Weight { BitType::INT8 } else { BitType::UINT8 };
        let ptf = (site.class == TensorClass::LayerNormInput && scale.len() > 1).then(|| {
            let min = scale.iter().copied().fold(f32::INFINITY, f32::min);
            scale
                .iter()
                .map(|&s| PtfFactor::try_from((s / min).log2().round() as u8).unwrap())
                .collect()
        });
        table.set(id, QParams { bit_type, scale, zero_point, ptf });
    }
    table
}

/// The provenance of a test artifact of `model` calibrated on `images` random sorted images,
/// as `fqvit-cli quantize` fills it.
pub fn test_provenance(
    model: &dyn fqvit_models::Quantizable,
    name: &str,
    architecture: fqvit_models::Architecture,
    weights_sha256: &str,
    table: &fqvit_models::QParamTable,
    exp: fqvit_calib::Experiment,
    images: usize,
    seed: u64,
) -> fqvit_calib::artifact::Provenance {
    use fqvit_calib::artifact::{self, CalibrationData, FORMAT_VERSION, Provenance};
    Provenance {
        format_version: FORMAT_VERSION,
        fqvit_version: "test".into(),
        created_unix: 0,
        model: name.into(),
        architecture,
        weights_sha256: weights_sha256.into(),
        experiment: exp,
        calibration: CalibrationData {
            data: "random".into(),
            images,
            order: "sorted".into(),
            seed,
        },
        lis_bits: exp.quant_options().lis_bits,
        lis_exp_shift: exp.lis_exp_shift,
        sites: artifact::site_infos(model, table, &exp),
    }
}
