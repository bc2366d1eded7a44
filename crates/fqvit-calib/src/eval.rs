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
    /// The five best classes, best first, equal logits ordered by the evaluation's [`Ties`].
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
    /// How those ties were ordered.
    pub ties: Ties,
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
    /// How equal logits are ranked.
    pub ties: Ties,
}

/// How classes with equal logits are ranked (quantized logits tie often: spec §12.12).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Ties {
    /// libtorch's `topk(5, dim 1, largest, sorted)` on the CPU copy of the logits: the
    /// original's metric (`test_quant.py` `accuracy`), whose order among equal logits is that
    /// of its `std::partial_sort`, deterministic on the CPU.
    #[default]
    Torch,
    /// The lower class index first: a rule that does not depend on the library.
    LowerIndex,
}

/// The indices of the `k` largest values, best first, ties to the lower index.
pub fn top_k(logits: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    // total_cmp orders NaN above everything; a NaN logit is a model bug we do not hide.
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// The five best classes of each row of CPU `logits` `(B, classes)` (`values` is their
/// contents), best first, equal logits ordered by `ties`.
pub fn top5_rows(logits: &tch::Tensor, values: &[f32], ties: Ties) -> Result<Vec<Vec<usize>>> {
    let n_classes = logits.size()[1] as usize;
    Ok(match ties {
        Ties::Torch => {
            let k = n_classes.min(5);
            let (_, idx) = logits.topk(k as i64, 1, true, true);
            let idx = Vec::<i64>::try_from(idx.contiguous().view(-1))?;
            idx.chunks_exact(k).map(|r| r.iter().map(|&c| c as usize).collect()).collect()
        }
        Ties::LowerIndex => values.chunks_exact(n_classes).map(|row| top_k(row, 5)).collect(),
    })
}

/// Evaluates `model` in `mode` on every image of `folder`.
pub fn evaluate(
    model: &dyn Classifier,
    mode: &mut Mode<'_>,
    folder: &ImageFolder,
    opts: &EvalOptions,
    progress: &ProgressBar,
) -> Result<EvalReport> {
    let pp = model.preprocess();
    evaluate_with(&pp, folder, opts, progress, |images| {
        Ok(tch::no_grad(|| model.forward(images, mode)))
    })
}

/// [`evaluate`] with any forward: `forward` maps a batch of normalized images `(B, 3, H, W)`
/// (prepared with `pp`, on `opts.device`) to logits `(B, classes)` (the integer engine's, for
/// one).
pub fn evaluate_with(
    pp: &fqvit_models::Preprocess,
    folder: &ImageFolder,
    opts: &EvalOptions,
    progress: &ProgressBar,
    mut forward: impl FnMut(&tch::Tensor) -> Result<tch::Tensor>,
) -> Result<EvalReport> {
    let start = Instant::now();
    let mut predictions = Vec::with_capacity(folder.samples().len());
    let (mut tied, mut skipped) = (0, Vec::new());
    progress.set_length(folder.samples().len() as u64);
    for_each_batch(
        folder,
        pp,
        opts.batch_size,
        opts.device,
        opts.bad_images,
        &mut skipped,
        |batch| {
            let logits = forward(&batch.images)?.to_device(Device::Cpu).to_kind(Kind::Float);
            let n_classes = logits.size()[1] as usize;
            let values = Vec::<f32>::try_from(logits.contiguous().view(-1))?;
            let ranked = top5_rows(&logits, &values, opts.ties)?;
            for ((sample, row), top5) in
                batch.samples.iter().zip(values.chunks_exact(n_classes)).zip(ranked)
            {
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
        ties: opts.ties,
        skipped,
        seconds: start.elapsed().as_secs_f64(),
        predictions,
    };
    tracing::info!(top1 = report.top1, top5 = report.top5, images, "evaluated");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Six classes tie at the top of 1000: libtorch's topk (as PyTorch 2.11 ranks them for the
    /// original) and the lower-index rule give different orders, and so different top-1s when
    /// the label is among the tied classes.
    #[test]
    fn ties_rank_as_libtorch_or_by_lower_index() {
        let mut values = vec![0f32; 1000];
        for c in [3, 10, 500, 999, 7, 8] {
            values[c] = 1.0;
        }
        let logits = tch::Tensor::from_slice(&values).view([1, 1000]);
        let torch = top5_rows(&logits, &values, Ties::Torch).unwrap();
        let lower = top5_rows(&logits, &values, Ties::LowerIndex).unwrap();
        assert_eq!(torch, [vec![3, 8, 10, 500, 7]]);
        assert_eq!(lower, [vec![3, 7, 8, 10, 500]]);
    }
}
