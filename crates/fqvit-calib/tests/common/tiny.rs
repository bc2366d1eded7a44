//! A random tiny DeiT or ViT calibrated here (8/8/4, PTF, LIS) and written as an artifact, as
//! `fqvit-cli quantize` does: the engine tests' model.

use std::path::{Path, PathBuf};

use fqvit_calib::Experiment;
use fqvit_calib::artifact;
use fqvit_models::{Classifier, Mode, Preprocess, Quantizable, Quantized, vit};
use tch::nn::VarStore;
use tch::{Device, Tensor};

pub fn config(input_quant: bool, num_heads: i64) -> vit::Config {
    sized(input_quant, num_heads, 32)
}

/// [`config`] for images of side `img_size` (patches of 16).
pub fn sized(input_quant: bool, num_heads: i64, img_size: i64) -> vit::Config {
    let base = if input_quant { vit::Config::deit_tiny() } else { vit::Config::vit_tiny() };
    vit::Config { embed_dim: 64, depth: 2, num_heads, img_size, num_classes: 10, ..base }
}

/// Random 8-bit images and their normalization as the data pipeline computes it.
pub fn images(cfg: &vit::Config, seed: u64, batch: usize) -> (Vec<u8>, Tensor) {
    images_of(cfg.img_size as usize, cfg.preprocess, seed, batch)
}

pub fn images_of(side: usize, pp: Preprocess, seed: u64, batch: usize) -> (Vec<u8>, Tensor) {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let pixels: Vec<u8> = (0..batch * 3 * side * side)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as u8
        })
        .collect();
    let x: Vec<f32> = pixels
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let c = (i / (side * side)) % 3;
            (f32::from(p) / 255.0 - pp.mean[c]) / pp.std[c]
        })
        .collect();
    let t = Tensor::from_slice(&x).view([batch as i64, 3, side as i64, side as i64]);
    (pixels, t)
}

/// A two-block DeiT-Tiny on 32-pixel images with every variable perturbed by N(0, 0.02²)
/// (seed 5): timm's zero biases and unit γ would hide a parameter that is not updated.
pub fn perturbed_deit() -> (VarStore, vit::Vit) {
    fqvit_testkit::seeded(5, || {
        let vs = VarStore::new(Device::Cpu);
        let cfg =
            vit::Config { depth: 2, img_size: 32, num_classes: 10, ..vit::Config::deit_tiny() };
        let model = vit::Vit::new(&vs.root(), &cfg);
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                let _ = v.f_add_(&(Tensor::randn_like(&v) * 0.02)).unwrap();
            }
        });
        (vs, model)
    })
}

pub struct Calibrated {
    pub model: vit::Vit,
    pub quantized: Quantized,
    pub path: PathBuf,
    pub cfg: vit::Config,
}

/// The engine's logits on `c`'s artifact against the simulation's, 16 images (seed 3), in
/// codes of the logits site, held to the bounds stated at
/// `engine_logits_follow_the_simulation_for_deit_and_vit` (tests/engine.rs): at least 90 %
/// equal, none more than 4 apart. Returns how many are equal, of how many, and the largest
/// difference.
pub fn engine_follows_simulation(c: &Calibrated) -> (usize, usize, f32) {
    let engine = fqvit_engine::Engine::load(&c.path).unwrap();
    let (pixels, x) = images(&c.cfg, 3, 16);
    let sim = tch::no_grad(|| c.model.forward(&x, &mut Mode::quantized(&c.quantized)));
    let sim = Vec::<f32>::try_from(sim.contiguous().view(-1)).unwrap();
    let int = engine.run(fqvit_engine::Images::Pixels(&pixels)).unwrap();
    let step = c.quantized.table().get(c.model.sites().iter().last().unwrap().0).unwrap().scale[0];
    let diffs: Vec<f32> =
        sim.iter().zip(&int).map(|(a, b)| ((a - b) / step).abs().round()).collect();
    let equal = diffs.iter().filter(|&&d| d == 0.0).count();
    let max = diffs.iter().fold(0f32, |m, &d| m.max(d));
    assert!(equal * 10 >= diffs.len() * 9, "{equal}/{} codes equal", diffs.len());
    assert!(max <= 4.0, "max |Δ| {max} codes");
    (equal, diffs.len(), max)
}

pub fn calibrated(dir: &Path, input_quant: bool, exp: Experiment) -> Calibrated {
    calibrated_heads(dir, input_quant, 1, exp)
}

pub fn calibrated_heads(dir: &Path, input_quant: bool, heads: i64, exp: Experiment) -> Calibrated {
    calibrated_model(dir, config(input_quant, heads), exp)
}

/// [`calibrated`] with the model `cfg`.
pub fn calibrated_model(dir: &Path, cfg: vit::Config, exp: Experiment) -> Calibrated {
    let (input_quant, heads) = (cfg.input_quant, cfg.num_heads);
    let (vs, model) = fqvit_testkit::seeded(7, || {
        let vs = VarStore::new(Device::Cpu);
        let model = vit::Vit::new(&vs.root(), &cfg);
        (vs, model)
    });
    // timm's initialisation (σ 0.02) gives attention scores too flat for Log-Int-Softmax's
    // smallest scale; trained models have larger qkv weights.
    for (name, mut var) in vs.variables() {
        if name.ends_with("qkv.weight") {
            tch::no_grad(|| {
                let _ = var.g_mul_scalar_(8.0);
            });
        }
    }
    let path = dir.join(format!("tiny-{input_quant}-{heads}-{}.safetensors", cfg.img_size));
    let quantized = calibrate_and_write(&model, &vs, exp, cfg.img_size as usize, &path);
    std::mem::forget(vs); // the model's tensors point into it
    Calibrated { model, quantized, path, cfg }
}

/// Calibrates `model` (images of side `side`) on two random batches of 8, writes its artifact
/// to `path` as `quantize` does, and returns the simulation.
pub fn calibrate_and_write(
    model: &dyn Classifier,
    vs: &VarStore,
    exp: Experiment,
    side: usize,
    path: &Path,
) -> Quantized {
    // Every pass of calibration (reparam-norm-out's, the observers', GPTQ's) on the same two
    // batches.
    let table = fqvit_calib::calibrate::calibrate_on(model, &exp, 2, |feed| {
        for seed in [1, 2] {
            feed(&images_of(side, model.preprocess(), seed, 8).1)?;
        }
        Ok(())
    })
    .unwrap();
    let prov =
        super::test_provenance(model, "tiny", model.architecture(), "random", &table, exp, 16, 0);
    artifact::write(path, model, vs, &table, &prov).unwrap();
    Quantized::new(model, table, exp.quant_options()).unwrap()
}

/// The simulation as the engine's float twin: the integer LayerNorm, and Log-Int-Softmax on the
/// integer codes, as the engine computes them.
pub fn integer_twin() -> Experiment {
    Experiment {
        layer_norm_sqrt: fqvit_tensor::StdSqrt::Integer,
        lis_input: fqvit_tensor::LisInput::Rounded,
        ..Experiment::default()
    }
}
