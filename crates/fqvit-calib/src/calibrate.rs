//! Calibration: run the model in calibrate mode over the calibration batches, feed every site's
//! observer, and freeze a [`QParamTable`] (spec §9).

use std::time::Instant;

use fqvit_models::{
    CalibrationSink, Classifier, Mode, QParamTable, QuantOptions, Quantized, SiteId, SiteTable,
    TensorClass,
};
use fqvit_observers::{Observer, build};
use fqvit_ops::QParams;
use fqvit_tensor::{Axis, Quantizer};
use indicatif::ProgressBar;
use tch::{Device, Kind, Tensor};

use crate::data::{BadImages, ImageFolder, for_each_batch};
use crate::error::{Error, Result};
use crate::experiment::{CalibOrder, Experiment, WeightRounding};
use crate::gptq::{self, LinearInputs};
use crate::reparam::NormOutRanges;

enum Slot {
    /// Not observed in this experiment.
    Unused,
    Observing(Box<dyn Observer + Send>),
    Frozen(QParams),
}

/// The [`CalibrationSink`] over `fqvit-observers`: one observer per site. During the last batch
/// each site freezes right after its update, in forward order, like the original's
/// `last_calibrate`.
pub struct Calibrator {
    slots: Vec<Slot>,
    names: Vec<String>,
    last_batch: bool,
    publish_in_last_batch: bool,
    error: Option<Error>,
    /// Per weight site, the sum of its layer's inputs over tokens (float64) and their count,
    /// under bias correction.
    input_sums: Option<Vec<Option<(Tensor, i64)>>>,
}

impl Calibrator {
    /// One observer per site, as the experiment configures its class.
    pub fn new(sites: &SiteTable, exp: &Experiment) -> Result<Self> {
        exp.validate()?;
        let mut slots = Vec::with_capacity(sites.len());
        for (_, site) in sites.iter() {
            slots.push(match exp.observer(site) {
                None => Slot::Unused,
                Some(cfg) => Slot::Observing(
                    build(&cfg, site.class == TensorClass::Weight)
                        .map_err(|e| Error::Settings(format!("site {}: {e}", site.name)))?,
                ),
            });
        }
        Ok(Calibrator {
            slots,
            names: sites.iter().map(|(_, s)| s.name.clone()).collect(),
            last_batch: false,
            publish_in_last_batch: exp.lis_in_last_calibration_batch,
            error: None,
            input_sums: exp.bias_correction.then(|| (0..sites.len()).map(|_| None).collect()),
        })
    }

    /// Marks the next forward as the last batch: sites freeze as they are observed.
    pub fn set_last_batch(&mut self, last: bool) {
        self.last_batch = last;
    }

    /// One calibration batch of normalized `images` through `model`; with `last`, every site
    /// freezes as it is observed.
    pub fn batch(
        &mut self,
        model: &dyn Classifier,
        images: &Tensor,
        last: bool,
        options: QuantOptions,
    ) -> Result<()> {
        self.set_last_batch(last);
        // The logits of calibration batches are not used, as in the original.
        let _logits =
            tch::no_grad(|| model.forward(images, &mut Mode::Calibrate { sink: self, options }));
        self.take_error()
    }

    /// The first error an observer raised, naming its site.
    fn take_error(&mut self) -> Result<()> {
        self.error.take().map_or(Ok(()), Err)
    }

    /// Each observed linear layer's mean input `(C,)` (float64), by weight site, under bias
    /// correction (empty otherwise); taken once.
    pub fn input_means(&mut self) -> Vec<(SiteId, Tensor)> {
        let sums = self.input_sums.take().unwrap_or_default();
        sums.into_iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|(sum, n)| (SiteId::from_index(i), sum / n as f64)))
            .collect()
    }

    /// The frozen table; fails if a used site never froze.
    pub fn freeze(mut self) -> Result<QParamTable> {
        self.take_error()?;
        let mut table = QParamTable::empty(self.slots.len());
        for (i, slot) in self.slots.into_iter().enumerate() {
            match slot {
                Slot::Unused => {}
                Slot::Frozen(p) => {
                    tracing::debug!(site = %self.names[i], scale = ?&p.scale[..p.scale.len().min(4)], zero_point = ?&p.zero_point[..p.zero_point.len().min(4)], ptf = p.ptf.is_some(), "frozen");
                    table.set(SiteId::from_index(i), p)
                }
                Slot::Observing(_) => {
                    return Err(Error::Settings(format!(
                        "site {} was never observed in the last batch",
                        self.names[i]
                    )));
                }
            }
        }
        Ok(table)
    }
}

impl CalibrationSink for Calibrator {
    fn observe_input(&mut self, site: SiteId, xs: &Tensor) {
        let Some(sums) = self.input_sums.as_mut() else { return };
        let c = *xs.size().last().unwrap_or(&1);
        let rows = xs.reshape([-1, c]);
        let sum = rows.to_kind(Kind::Double).sum_dim_intlist([0i64].as_slice(), false, None);
        let n = rows.size()[0];
        let slot = &mut sums[site.index()];
        *slot = Some(match slot.take() {
            Some((total, count)) => (total + sum, count + n),
            None => (sum, n),
        });
    }

    fn observe(&mut self, site: SiteId, xs: &Tensor) {
        if self.error.is_some() {
            return;
        }
        let i = site.index();
        let slot = std::mem::replace(&mut self.slots[i], Slot::Unused);
        self.slots[i] = match slot {
            Slot::Observing(mut obs) => {
                let res = obs.update(xs).and_then(|()| {
                    if self.last_batch {
                        obs.finish().map(Slot::Frozen)
                    } else {
                        Ok(Slot::Observing(obs))
                    }
                });
                match res {
                    Ok(slot) => slot,
                    Err(e) => {
                        self.error = Some(Error::Observer {
                            site: self.names[i].clone(),
                            reason: e.to_string(),
                        });
                        Slot::Unused
                    }
                }
            }
            other => other,
        };
    }

    fn frozen(&self, site: SiteId) -> Option<&QParams> {
        match &self.slots[site.index()] {
            Slot::Frozen(p) if self.publish_in_last_batch => Some(p),
            _ => None,
        }
    }
}

/// `<DATA>/train` split by [`crate::experiment::Calibration::holdout`]: the calibration pool
/// (sorted) and the held-out development images (the last `holdout` of train shuffled with the
/// seed, sorted). With one image per class, as in the shared sample, the two parts have
/// disjoint classes.
pub fn train_split(data: &std::path::Path, exp: &Experiment) -> Result<(ImageFolder, ImageFolder)> {
    let train = ImageFolder::open(data, "train")?;
    let cal = exp.calibration;
    let n = train.samples().len();
    if cal.holdout >= n && cal.holdout > 0 {
        return Err(Error::Settings(format!(
            "--holdout {}: {} has {n} images, and calibration needs some",
            cal.holdout,
            data.join("train").display()
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    crate::data::shuffle(&mut order, cal.seed);
    let mut held = vec![false; n];
    for &i in &order[n - cal.holdout..] {
        held[i] = true;
    }
    let (mut pool, mut dev) = (train.clone(), train);
    let mut i = 0;
    pool.retain(|_| {
        i += 1;
        !held[i - 1]
    });
    let mut i = 0;
    dev.retain(|_| {
        i += 1;
        held[i - 1]
    });
    Ok((pool, dev))
}

/// The calibration images: `<DATA>/train` less the held-out part ([`train_split`]) in the
/// experiment's order, exactly `batch_size · iterations` of them.
pub fn calibration_set(data: &std::path::Path, exp: &Experiment) -> Result<ImageFolder> {
    let (mut folder, _) = train_split(data, exp)?;
    let cal = exp.calibration;
    let needed = cal.batch_size * cal.iterations;
    if folder.samples().len() < needed {
        let held = if cal.holdout > 0 {
            format!(" after holding out {}", cal.holdout)
        } else {
            String::new()
        };
        return Err(Error::Settings(format!(
            "calibration needs {needed} images ({} batches of {}), {} has {}{held}",
            cal.iterations,
            cal.batch_size,
            data.join("train").display(),
            folder.samples().len()
        )));
    }
    if cal.order == CalibOrder::Shuffled {
        folder.shuffle(cal.seed);
    }
    folder.truncate(needed);
    Ok(folder)
}

/// Calibration timing.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct CalibrationStats {
    /// Images seen.
    pub images: usize,
    /// Wall-clock seconds, data loading included.
    pub seconds: f64,
}

/// Calibrates `model` on `folder` (from [`calibration_set`]) and returns the frozen table.
pub fn calibrate(
    model: &dyn Classifier,
    folder: &ImageFolder,
    exp: &Experiment,
    device: Device,
    progress: &ProgressBar,
) -> Result<(QParamTable, CalibrationStats)> {
    let start = Instant::now();
    let cal = exp.calibration;
    let pp = model.preprocess();
    progress.set_length(exp.calibration_passes() as u64 * folder.samples().len() as u64);
    let mut skipped = Vec::new();
    let table = calibrate_on(model, exp, cal.iterations, |feed| {
        for_each_batch(folder, &pp, cal.batch_size, device, BadImages::Fail, &mut skipped, |b| {
            feed(&b.images)?;
            progress.inc(b.samples.len() as u64);
            Ok(())
        })
    })?;
    Ok((
        table,
        CalibrationStats { images: folder.samples().len(), seconds: start.elapsed().as_secs_f64() },
    ))
}

/// Calibration on `batches` batches of normalized images: `each_pass` is called once per pass
/// ([`Experiment::calibration_passes`]) and feeds every batch, in the same order each time.
/// The passes: `reparam-norm-out`'s float ranges, then the observers (the last batch freezes
/// every site), then GPTQ's inputs in the quantized forward; the model's parameters change in
/// place at the end only, so a refusal leaves them as they were.
pub fn calibrate_on(
    model: &dyn Classifier,
    exp: &Experiment,
    batches: usize,
    mut each_pass: impl FnMut(&mut dyn FnMut(&Tensor) -> Result<()>) -> Result<()>,
) -> Result<QParamTable> {
    let mut sink = Calibrator::new(model.sites(), exp)?;
    let options = exp.quant_options();
    if exp.reparam_norm_out {
        let mut ranges = NormOutRanges::new(model);
        each_pass(&mut |images| {
            ranges.batch(model, images, options);
            Ok(())
        })?;
        let folded = ranges.fold(model, exp.activation_bits)?;
        tracing::info!(layer_norms = folded, "norm-out reparameterized");
    }
    let mut batch_index = 0;
    each_pass(&mut |images| {
        tracing::info!(batch = batch_index + 1, of = batches, "calibrating");
        sink.batch(model, images, batch_index + 1 == batches, options)?;
        batch_index += 1;
        Ok(())
    })?;
    let means = sink.input_means();
    let table = sink.freeze()?;
    let rounded = match exp.weight_rounding {
        WeightRounding::Nearest => Vec::new(),
        WeightRounding::Gptq => {
            // The linear layers' inputs as the quantized forward gives them (nearest weights).
            let state = Quantized::new(model, table.clone(), options)?;
            let mut inputs = LinearInputs::new(model);
            each_pass(&mut |images| {
                inputs.batch(model, &state, images);
                Ok(())
            })?;
            gptq::round_weights(model, &table, &inputs.grams())?
        }
    };
    if exp.bias_correction {
        correct_biases_for(model, &table, &means, &rounded)?;
    }
    for (site, w) in &rounded {
        if let Some(weight) = model.weight(*site) {
            tch::no_grad(|| weight.shallow_clone().copy_(w));
        }
    }
    Ok(table)
}

/// Bias correction: each linear layer's bias `b ← b − (Ŵ − W)·E[x]` in place, so that its mean
/// output over the calibration inputs is the float layer's despite the weights' rounding
/// (`Ŵ` as the quantized forward fake-quantizes `W`).
///
/// # Errors
/// [`Error::BiasCorrection`] naming the first site whose correction is not finite; then no bias
/// has changed.
pub fn correct_biases(
    model: &dyn Classifier,
    table: &QParamTable,
    means: &[(SiteId, Tensor)],
) -> Result<()> {
    correct_biases_for(model, table, means, &[])
}

/// [`correct_biases`] with `Ŵ` taken from `rounded` where a site has one (GPTQ's weights, not
/// yet in the model), else the nearest codes.
fn correct_biases_for(
    model: &dyn Classifier,
    table: &QParamTable,
    means: &[(SiteId, Tensor)],
    rounded: &[(SiteId, Tensor)],
) -> Result<()> {
    let sites = model.sites();
    // Every correction first, so that a refusal leaves every bias as it was.
    let mut deltas = Vec::with_capacity(means.len());
    for (site, mean) in means {
        let (Some(w), Some(b), Some(p)) =
            (model.weight(*site), model.bias(*site), table.get(*site))
        else {
            continue;
        };
        let name = &sites.get(*site).name;
        let delta = tch::no_grad(|| {
            let fq = match rounded.iter().find(|(s, _)| s == site) {
                Some((_, r)) => r.shallow_clone(),
                None => Quantizer::new(p, Axis::First, w.device()).fake_quant(w),
            };
            (fq - w).to_kind(Kind::Double).mv(&mean.to_device(w.device()))
        });
        if delta.isfinite().all().int64_value(&[]) != 1 {
            return Err(Error::BiasCorrection {
                site: name.clone(),
                reason: "the correction is not finite (NaN inputs or weights)".into(),
            });
        }
        deltas.push((name, b.shallow_clone(), delta));
    }
    for (name, mut b, delta) in deltas {
        let _corrected = tch::no_grad(|| b.f_sub_(&delta.to_kind(b.kind())))
            .map_err(|e| Error::BiasCorrection { site: name.clone(), reason: e.to_string() })?;
        tracing::debug!(site = %name, max = delta.abs().max().double_value(&[]), "bias corrected");
    }
    Ok(())
}
