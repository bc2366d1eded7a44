//! What several subcommands share: the device, the model with its weights, progress bars, and
//! the provenance an artifact records.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use fqvit_calib::Experiment;
use fqvit_calib::artifact::{self, CalibrationData, FORMAT_VERSION, Provenance};
use fqvit_calib::experiment::CalibOrder;
use fqvit_models::weights::{HubCache, Network, WeightsSource, load_strict, resolve};
use fqvit_models::{Classifier, ModelName, QParamTable};
use indicatif::{ProgressBar, ProgressStyle};
use tch::Device;

use crate::cli::{DeviceArg, ModelArgs};

/// A model with where its weights came from.
pub(crate) struct Loaded {
    pub(crate) name: ModelName,
    pub(crate) model: Box<dyn Classifier>,
    /// The float weights file; `None` while the variables still await an artifact.
    pub(crate) weights: Option<PathBuf>,
    pub(crate) device: Device,
    /// Owns the variables the model's tensors point into.
    pub(crate) vs: tch::nn::VarStore,
}

pub(crate) fn device(arg: DeviceArg) -> Result<Device> {
    Ok(match arg {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda if !tch::Cuda::is_available() => {
            anyhow::bail!("--device cuda: libtorch sees no CUDA GPU (see `fqvit-cli doctor`)")
        }
        DeviceArg::Cuda => Device::Cuda(0),
        DeviceArg::Auto => Device::cuda_if_available(),
    })
}

pub(crate) fn load_model(args: &ModelArgs) -> Result<Loaded> {
    let mut loaded = build_model(args)?;
    let source = match (&args.weights, &args.weights_dir) {
        (Some(file), _) => WeightsSource::File(file.clone()),
        (None, Some(dir)) => WeightsSource::Dir(dir.clone()),
        (None, None) => WeightsSource::Hub,
    };
    let network = if args.offline { Network::Offline } else { Network::Online };
    let weights = resolve(loaded.name, &source, network, &HubCache::from_env())?;
    load_strict(&loaded.vs, &weights)?;
    tracing::info!(model = %loaded.name, weights = %weights.display(), device = ?loaded.device, "model loaded");
    loaded.weights = Some(weights);
    Ok(loaded)
}

/// The model with random variables, to be filled from weights or an artifact.
pub(crate) fn build_model(args: &ModelArgs) -> Result<Loaded> {
    let name: ModelName = args.model.parse()?;
    let device = device(args.device)?;
    let vs = tch::nn::VarStore::new(device);
    let model = name.config().build(&vs.root());
    Ok(Loaded { name, model, weights: None, device, vs })
}

pub(crate) fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>11} [{bar:30}] {pos}/{len} images, {per_sec}, eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_owned());
    bar
}

/// The artifact's provenance of a calibration of `model` (float weights with SHA-256
/// `weights_sha256`) on `images` images of `data`.
pub(crate) fn provenance(
    name: ModelName,
    model: &dyn Classifier,
    weights_sha256: String,
    exp: &Experiment,
    table: &QParamTable,
    data: &Path,
    images: usize,
) -> Result<Provenance> {
    Ok(Provenance {
        format_version: FORMAT_VERSION,
        fqvit_version: env!("CARGO_PKG_VERSION").to_owned(),
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: name.to_string(),
        architecture: model.architecture(),
        weights_sha256,
        experiment: *exp,
        calibration: CalibrationData {
            data: data.display().to_string(),
            images,
            order: match exp.calibration.order {
                CalibOrder::Shuffled => "shuffled".into(),
                CalibOrder::Sorted => "sorted".into(),
            },
            seed: exp.calibration.seed,
        },
        lis_bits: exp.quant_options().lis_bits,
        lis_exp_shift: exp.lis_exp_shift,
        sites: artifact::site_infos(model, table, exp),
    })
}

/// Writes the artifact to a temporary file, exactly as `quantize` would, and loads the engine
/// from it.
pub(crate) fn engine_via_artifact(
    model: &dyn Classifier,
    vs: &tch::nn::VarStore,
    table: &fqvit_models::QParamTable,
    prov: &fqvit_calib::artifact::Provenance,
    options: fqvit_engine::Options,
) -> Result<fqvit_engine::Engine> {
    let dir = tempfile::tempdir().context("a temporary folder for the artifact")?;
    let path = dir.path().join("qparams.safetensors");
    fqvit_calib::artifact::write(&path, model, vs, table, prov)?;
    Ok(fqvit_engine::Engine::load_with(&path, options)?)
}
