//! Evaluation: top-1 / top-5 over a split, with per-image predictions.

use std::time::Instant;

use fqvit_models::{Classifier, Mode};
use indicatif::ProgressBar;
use serde::Serialize;
use tch::{Device, Kind};

use crate::data::{BadImages, ImageFolder, for_each_batch};
use crate::error::Result;

/// One image's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Prediction {
    /// Path relative to the data root.
    pub path: String,
    /// The true class.
    pub label: usize,
    /// The five best classes, best first; ties go to the lower class index.
    pub top5: Vec<usize>,
}

/// The result of an evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// Top-1 accuracy, percent.
    pub top1: f64,
    /// Top-5 accuracy, percent.
    pub top5: f64,
    /// Images evaluated.
    pub images: usize,
    /// Images whose best logit is tied with another class (frequent with quantized logits).
    pub tied_top1: usize,
    /// Images skipped as undecodable (`--skip-bad`), by path.
    pub skipped: Vec<String>,
    /// Wall-clock seconds, data loading included.
    pub seconds: f64,
    /// Per-image predictions in sorted path order.
    pub predictions: Vec<Prediction>,
}

/// How to run an evaluation.
#[derive(Clone, Copy, Debug)]
pub struct EvalOptions {
    /// Images per forward pass.
    pub batch_size: usize,
    /// Where the model runs.
    pub device: Device,
    /// What to do with undecodable images.
    pub bad_images: BadImages,
}

/// The indices of the `k` largest values, best first, ties to the lower index.
pub fn top_k(logits: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    // total_cmp orders NaN above everything; a NaN logit is a model bug we do not hide.
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Evaluates `model` in `mode` on every image of `folder`.
pub fn evaluate(
    model: &dyn Classifier,
    mode: &mut Mode<'_>,
    folder: &ImageFolder,
    opts: &EvalOptions,
    progress: &ProgressBar,
) -> Result<EvalReport> {
    let start = Instant::now();
    let pp = model.preprocess();
    let mut predictions = Vec::with_capacity(folder.samples().len());
    let (mut tied, mut skipped) = (0, Vec::new());
    progress.set_length(folder.samples().len() as u64);
    for_each_batch(
        folder,
        &pp,
        opts.batch_size,
        opts.device,
        opts.bad_images,
        &mut skipped,
        |batch| {
            let logits = tch::no_grad(|| model.forward(&batch.images, mode))
                .to_device(Device::Cpu)
                .to_kind(Kind::Float);
            let n_classes = logits.size()[1] as usize;
            let values = Vec::<f32>::try_from(logits.contiguous().view(-1))?;
            for (sample, row) in batch.samples.iter().zip(values.chunks_exact(n_classes)) {
                let top5 = top_k(row, 5);
                tied += usize::from(row.iter().filter(|&&v| v == row[top5[0]]).count() > 1);
                predictions.push(Prediction {
                    path: sample.rel_path.clone(),
                    label: sample.label,
                    top5,
                });
            }
            progress.inc(batch.samples.len() as u64);
            Ok(())
        },
    )?;
    let images = predictions.len();
    let hits = |k: usize| {
        predictions.iter().filter(|p| p.top5[..k.min(p.top5.len())].contains(&p.label)).count()
    };
    let pct = |n: usize| if images == 0 { 0.0 } else { 100.0 * n as f64 / images as f64 };
    let report = EvalReport {
        top1: pct(hits(1)),
        top5: pct(hits(5)),
        images,
        tied_top1: tied,
        skipped,
        seconds: start.elapsed().as_secs_f64(),
        predictions,
    };
    tracing::info!(top1 = report.top1, top5 = report.top5, images, "evaluated");
    Ok(report)
}
