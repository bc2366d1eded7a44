//! How well each residual-stream (LayerNorm input) site is quantized, on development images:
//! the signal-to-quantization-noise ratio of its fake quantization over all tokens, the CLS
//! token alone and the patch tokens, the largest token norm over the median one, the extreme
//! value and its channel, the zero point and how many channels take each PTF factor. This is how the massive activation behind
//! `ptf-range = "symmetric"` was found (docs/fqvit-plus.md, "Settings chosen on a development split").
//!
//! `cargo run --release -p fqvit-calib --example residual_sqnr -- [CONFIG.toml]`
//! (default `configs/fqvit_plus_8_8_4.toml`): calibrates as the development protocol does
//! (`--holdout 500 --calib-iter 5`) and probes the first 50 held-out images.

#[path = "../tests/common/mod.rs"]
mod common;

use fqvit_calib::data::{BadImages, for_each_batch};
use fqvit_calib::{Experiment, calibrate, calibration_set, train_split};
use fqvit_models::{Classifier, Mode, Probe, Quantizable, Quantized, TensorClass};
use fqvit_tensor::{Axis, Quantizer};
use indicatif::ProgressBar;
use tch::{Device, Kind, Tensor};

/// Keeps the input of every residual site's quantizer (its float value before quantization).
struct Inputs {
    modules: Vec<String>,
    seen: Vec<(String, Tensor)>,
}

impl Probe for Inputs {
    fn input(&mut self, module: &str, index: usize, xs: &Tensor) -> Option<Tensor> {
        if index == 0 && self.modules.iter().any(|m| m == module) {
            self.seen.push((module.to_owned(), xs.detach().copy()));
        }
        None
    }

    fn output(&mut self, _: &str, _: &Tensor) -> Option<Tensor> {
        None
    }
}

/// `10 · log10(Σx² / Σ(x̂ − x)²)`.
fn sqnr(x: &Tensor, err: &Tensor) -> f64 {
    let energy = |t: &Tensor| t.square().sum(Kind::Double).double_value(&[]);
    10.0 * (energy(x) / energy(err)).log10()
}

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/fqvit_plus_8_8_4.toml").to_owned()
    });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut exp: Experiment = toml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    exp.calibration.holdout = 500;
    exp.calibration.iterations = 5;
    let (_vs, model) = common::vit_tiny();
    let calib = calibration_set(&common::sample_dir(), &exp).unwrap();
    let (table, _) = calibrate(&model, &calib, &exp, Device::Cpu, &ProgressBar::hidden()).unwrap();
    let (_, mut dev) = train_split(&common::sample_dir(), &exp).unwrap();
    dev.truncate(50);
    let state = Quantized::new(&model, table.clone(), exp.quant_options()).unwrap();
    let sites = model.sites().clone();
    let residual: Vec<_> =
        sites.iter().filter(|(_, s)| s.class == TensorClass::LayerNormInput).collect();
    let mut probe = Inputs {
        modules: residual.iter().map(|(_, s)| s.original.clone()).collect(),
        seen: Vec::new(),
    };
    let mut skipped = Vec::new();
    for_each_batch(
        &dev,
        &model.preprocess(),
        50,
        Device::Cpu,
        BadImages::Fail,
        &mut skipped,
        |b| {
            let mode = &mut Mode::Quantized { state: &state, probe: Some(&mut probe) };
            let _ = tch::no_grad(|| model.forward(&b.images, mode));
            Ok(())
        },
    )
    .unwrap();
    println!("{}", exp.label());
    println!(
        "{:<16} {:>8} {:>8} {:>8} {:>11} {:>9} {:>8} {:>4}  channels per factor 0..",
        "site", "SQNR dB", "CLS", "patches", "max/median", "extreme", "channel", "zp"
    );
    for (module, xs) in &probe.seen {
        let (id, _) = residual.iter().find(|(_, s)| &s.original == module).unwrap();
        let params = table.get(*id).unwrap();
        let err = Quantizer::new(params, Axis::Last, Device::Cpu).fake_quant(xs) - xs;
        let (cls, patches) =
            (|t: &Tensor| t.narrow(1, 0, 1), |t: &Tensor| t.narrow(1, 1, xs.size()[1] - 1));
        let norms = xs.square().sum_dim_intlist(&[-1i64][..], false, Kind::Float).sqrt();
        let ratio = norms.max().double_value(&[]) / norms.median().double_value(&[]);
        let flat = xs.view(-1);
        let at = flat.abs().argmax(None, false).int64_value(&[]);
        let (extreme, channel) = (flat.double_value(&[at]), at % xs.size()[2]);
        let mut per_factor = vec![0usize; usize::from(exp.ptf_max_factor.get()) + 1];
        for f in params.ptf.iter().flatten() {
            per_factor[usize::from(f.get())] += 1;
        }
        println!(
            "{module:<16} {:>8.2} {:>8.2} {:>8.2} {ratio:>11.1} {extreme:>9.1} {channel:>8} {:>4}  {per_factor:?}",
            sqnr(xs, &err),
            sqnr(&cls(xs), &cls(&err)),
            sqnr(&patches(xs), &patches(&err)),
            params.zero_point[0],
        );
    }
}
