//! Whole-model agreement with the original's quantized ViT-Tiny (`--ptf --lis` minmax) on the
//! 1300 shared val images: our logits against the original's recorded ones
//! (`../shared/golden/vit_tiny_minmax_ptf_lis_trace.safetensors`), per image.
//!
//! Two rows: our forward with the original's calibrated parameters (the golden file; this
//! isolates the forward), and our own calibration (sorted `train/`, the parity protocol).
//! Float32 results depend on the CPU, so these are measurements of this machine.
//!
//! `cargo run --release -p fqvit-calib --example agreement [-- --layer-norm-sqrt exact]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;

use fqvit_calib::data::{BadImages, ImageFolder, for_each_batch};
use fqvit_calib::eval::{Ties, top5_rows};
use fqvit_calib::experiment::{CalibOrder, StdSqrt};
use fqvit_calib::{Experiment, calibrate, calibration_set};
use fqvit_models::{Classifier, Mode, QParamTable, Quantized};
use indicatif::ProgressBar;
use tch::{Device, Kind, Tensor};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut exp = Experiment::default();
    exp.calibration.order = CalibOrder::Sorted;
    exp.layer_norm_sqrt = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] | ["--layer-norm-sqrt", "libtorch"] => StdSqrt::Libtorch,
        ["--layer-norm-sqrt", "exact"] => StdSqrt::Exact,
        ["--layer-norm-sqrt", "integer"] => StdSqrt::Integer,
        _ => panic!("usage: agreement [--layer-norm-sqrt libtorch|exact]"),
    };
    let (_vs, model) = common::vit_tiny();
    let path = common::shared_dir().join("golden/vit_tiny_minmax_ptf_lis_trace.safetensors");
    let trace: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect();
    let reference = &trace["logits"];
    let folder = ImageFolder::open(&common::sample_dir(), "val").unwrap();
    assert_eq!(folder.samples().len() as i64, reference.size()[0], "one recorded row per image");

    let golden = common::golden_vit_tiny_table(&model);
    let calib = calibration_set(&common::sample_dir(), &exp).unwrap();
    let (ours, _) = calibrate(&model, &calib, &exp, Device::Cpu, &ProgressBar::hidden()).unwrap();
    println!("layer-norm-sqrt: {:?}", exp.layer_norm_sqrt);
    println!(
        "{:<28} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "parameters", "equal top-1", "equal top-5", "max |Δlogit|", "top-1", "original"
    );
    for (name, table) in [("original's (golden)", golden), ("ours (sorted train/)", ours)] {
        let logits = forward_all(&model, table, &exp, &folder);
        let (a, b) = (top5(&logits), top5(reference));
        let n = a.len();
        let top1 = a.iter().zip(&b).filter(|(x, y)| x[0] == y[0]).count();
        let top5 = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        let delta = (&logits - reference).abs().max().double_value(&[]);
        let correct = |t: &[Vec<usize>]| {
            let hits = t.iter().zip(folder.samples()).filter(|(p, s)| p[0] == s.label).count();
            100.0 * hits as f64 / n as f64
        };
        println!(
            "{name:<28} {:>12} {:>12} {delta:>12.4} {:>10.2} {:>10.2}",
            format!("{top1}/{n}"),
            format!("{top5}/{n}"),
            correct(&a),
            correct(&b)
        );
    }
}

fn forward_all(
    model: &fqvit_models::vit::Vit,
    table: QParamTable,
    exp: &Experiment,
    folder: &ImageFolder,
) -> Tensor {
    let state = Quantized::new(model, table, exp.quant_options()).unwrap();
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let pp = model.preprocess();
    for_each_batch(folder, &pp, 100, Device::Cpu, BadImages::Fail, &mut skipped, |batch| {
        rows.push(tch::no_grad(|| model.forward(&batch.images, &mut Mode::quantized(&state))));
        Ok(())
    })
    .unwrap();
    Tensor::cat(&rows, 0).to_kind(Kind::Float)
}

/// Each row's top five as the original ranks them (libtorch's `topk`).
fn top5(logits: &Tensor) -> Vec<Vec<usize>> {
    let values = Vec::<f32>::try_from(logits.contiguous().view(-1)).unwrap();
    top5_rows(logits, &values, Ties::Torch).unwrap()
}
