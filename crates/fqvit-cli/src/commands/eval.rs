//! `fqvit-cli eval`: evaluate, optionally after calibrating and quantizing.

use anyhow::{Context, Result};
use fqvit_calib::data::{BadImages, ImageFolder};
use fqvit_calib::eval::{EvalOptions, EvalReport, Ties, evaluate, evaluate_with};
use fqvit_calib::{Experiment, calibrate, calibration_set};
use fqvit_engine::{Engine, Images};
use fqvit_models::{Mode, Quantized};
use serde_json::json;
use tch::Device;

use crate::cli::{EngineArg, EvalArgs, EvalOn};
use crate::commands::shared::{Loaded, build_model, engine_via_artifact, load_model, progress};

pub(crate) fn run(args: EvalArgs) -> Result<()> {
    if let Some(path) = &args.json {
        crate::output::check_writable(path, "--json")?;
    }
    // Checked once, before any work; the engine is built with these.
    let engine_options = args.int.options(args.engine)?;
    if args.site_agreement.is_some() && args.engine != EngineArg::Int {
        anyhow::bail!(
            "--site-agreement compares the integer engine with the simulation: add --engine int"
        );
    }
    if let Some(path) = &args.qparams {
        return eval_artifact(&args, path, engine_options);
    }
    if !args.quant.quant && args.quant.config.is_none() {
        for (set, flag) in [(args.quant.ptf, "--ptf"), (args.quant.lis, "--lis")] {
            if set {
                anyhow::bail!(
                    "{flag} needs --quant: without --quant the model runs in full precision, so {flag} would do nothing"
                );
            }
        }
    }
    let exp = crate::config::resolve(&args.quant)?;
    let loaded = load_model(&args.model)?;
    let val = eval_set(&args, &exp)?;
    if args.engine == EngineArg::Int && !exp.quant {
        anyhow::bail!(
            "--engine int runs a quantized model: add --quant --ptf --lis (or --qparams FILE)"
        );
    }
    let (quantized, calib, engine) = if exp.quant {
        let folder = calibration_set(&args.model.data, &exp)?;
        let bar = progress(folder.samples().len(), "calibrating");
        let (table, stats) = calibrate(&*loaded.model, &folder, &exp, loaded.device, &bar)?;
        bar.finish_and_clear();
        eprintln!("calibrated on {} images in {:.1} s", stats.images, stats.seconds);
        let engine = match args.engine {
            EngineArg::Sim => None,
            EngineArg::Int => Some(engine_after_calibration(
                &args,
                &loaded,
                &exp,
                &table,
                stats.images,
                engine_options,
            )?),
        };
        (Some(Quantized::new(&*loaded.model, table, exp.quant_options())?), Some(stats), engine)
    } else {
        (None, None, None)
    };
    let runner = match (&engine, &quantized) {
        (Some(engine), Some(sim)) => Runner::Engine { engine, sim },
        (None, Some(q)) => Runner::Model(Mode::quantized(q)),
        (None, None) => Runner::Model(Mode::Float),
        (Some(_), None) => unreachable!("the engine runs a quantized model"),
    };
    finish_eval(
        &args,
        &loaded,
        &exp,
        runner,
        calib.map(|c| serde_json::to_value(c).expect("serialisable")),
        val,
    )
}

/// The integer engine of a calibration just made: the artifact goes through a temporary file,
/// exactly as `quantize` would write it.
fn engine_after_calibration(
    args: &EvalArgs,
    loaded: &Loaded,
    exp: &Experiment,
    table: &fqvit_models::QParamTable,
    images: usize,
    options: fqvit_engine::Options,
) -> Result<Engine> {
    let weights = loaded.weights.as_deref().context("--engine int needs float weights")?;
    let sha = fqvit_models::weights::sha256_file(weights)?;
    let prov = crate::commands::shared::provenance(
        loaded.name,
        &*loaded.model,
        sha,
        exp,
        table,
        &args.model.data,
        images,
    )?;
    engine_via_artifact(&*loaded.model, &loaded.vs, table, &prov, options)
}

/// What computes the logits.
enum Runner<'a> {
    /// The tch model in a mode.
    Model(Mode<'a>),
    /// The integer engine, and the simulation it is compared with (`--site-agreement`).
    Engine { engine: &'a Engine, sim: &'a Quantized },
}

/// `--site-agreement N`: per-site and per-class agreement of the engine with the simulation on
/// the first `n` images of `val`, free-running and forced; the classes are printed.
fn site_agreement(
    loaded: &Loaded,
    engine: &Engine,
    sim: &Quantized,
    val: &ImageFolder,
    n: usize,
    opts: &EvalOptions,
) -> Result<serde_json::Value> {
    use fqvit_calib::agreement::{SiteAgreement, by_class, render, site_agreement};
    let mut first = val.clone();
    first.truncate(n);
    let mut sums = SiteAgreement::default();
    let bar = progress(first.samples().len(), "site agreement");
    let mut skipped = Vec::new();
    let pp = loaded.model.preprocess();
    fqvit_calib::data::for_each_batch(
        &first,
        &pp,
        opts.batch_size,
        Device::Cpu,
        opts.bad_images,
        &mut skipped,
        |batch| {
            sums.accumulate(site_agreement(&*loaded.model, sim, engine, &batch.images)?);
            bar.inc(batch.samples.len() as u64);
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    println!("site agreement on {} images (equal codes; max |Δcode|):", first.samples().len());
    let SiteAgreement { free_running, forced } = &sums;
    print!("{}", render(free_running, forced));
    Ok(json!({
        "images": first.samples().len(),
        "free_running": free_running,
        "forced": forced,
        "free_running_by_class": by_class(free_running),
        "forced_by_class": by_class(forced),
    }))
}

/// The engine's logits of a batch of normalized CPU images, as a tensor.
fn engine_forward(engine: &Engine, images: &tch::Tensor) -> fqvit_calib::Result<tch::Tensor> {
    let b = images.size()[0];
    let x = Vec::<f32>::try_from(images.contiguous().view(-1))?;
    let logits = engine
        .run(Images::Normalized(&x))
        .map_err(|e| fqvit_calib::Error::Settings(format!("integer engine: {e}")))?;
    Ok(tch::Tensor::from_slice(&logits).view([b, engine.classes() as i64]))
}

/// `eval --qparams`: the model, its weights and its parameters all come from the artifact.
fn eval_artifact(
    args: &EvalArgs,
    path: &std::path::Path,
    options: fqvit_engine::Options,
) -> Result<()> {
    let q = &args.quant;
    if q.quant
        || q.ptf
        || q.lis
        || q.config.is_some()
        || q.quant_method.is_some()
        || q.weight_method.is_some()
        || q.weight_rounding.is_some()
        || q.bias_correction
        || q.reparam_norm_out
        || q.attn_bits.is_some()
        || q.lis_exp_shift.is_some()
        || !q.ptf_sites.is_empty()
        || q.ptf_max_factor.is_some()
        || q.residual_bits.is_some()
        || q.ptf_range.is_some()
        || q.holdout.is_some()
    {
        anyhow::bail!(
            "--qparams carries its own quantization settings: drop --quant, --ptf, --lis, --quant-method, --weight-method, --weight-rounding, --bias-correction, --reparam-norm-out, --attn-bits, --lis-exp-shift, --ptf-sites, --ptf-max-factor, --residual-bits, --ptf-range, --holdout and --config"
        );
    }
    let explicit_weights = args.model.weights.is_some() || args.model.weights_dir.is_some();
    let mut loaded =
        if explicit_weights { load_model(&args.model)? } else { build_model(&args.model)? };
    let sha = loaded.weights.as_deref().map(fqvit_models::weights::sha256_file).transpose()?;
    let expect = fqvit_calib::artifact::Expect {
        model: loaded.name.as_str(),
        architecture: &loaded.model.architecture(),
        weights_sha256: sha.as_deref(),
    };
    let artifact = fqvit_calib::artifact::read(path, &*loaded.model, &loaded.vs, expect)?;
    loaded.weights = Some(path.to_owned());
    let mut exp = artifact.provenance.experiment;
    if !q.float_sites.is_empty() {
        exp.float_sites = q.float_sites.iter().copied().collect();
    }
    if let Some(input) = q.lis_input {
        exp.lis_input = input;
    }
    if exp.float_sites.has(fqvit_models::SiteGroup::Weights) {
        anyhow::bail!(
            "--float-sites weights needs float weights, and a --qparams artifact carries int8 ones: calibrate instead (drop --qparams)"
        );
    }
    let quantized = Quantized::new(&*loaded.model, artifact.table, exp.quant_options())?;
    let engine = match args.engine {
        EngineArg::Sim => None,
        EngineArg::Int if !q.float_sites.is_empty() => {
            anyhow::bail!(
                "--float-sites cannot be used with --engine int: the engine is integer only"
            )
        }
        EngineArg::Int => Some(Engine::load_with(path, options)?),
    };
    let runner = match &engine {
        Some(engine) => Runner::Engine { engine, sim: &quantized },
        None => Runner::Model(Mode::quantized(&quantized)),
    };
    let val = eval_set(args, &exp)?;
    let provenance = serde_json::to_value(&artifact.provenance.calibration)?;
    finish_eval(args, &loaded, &exp, runner, Some(provenance), val)
}

/// The images to evaluate (`--on`, `--limit`).
fn eval_set(args: &EvalArgs, exp: &Experiment) -> Result<ImageFolder> {
    let mut set = match args.on {
        EvalOn::Val => ImageFolder::open(&args.model.data, "val")?,
        EvalOn::Dev if exp.calibration.holdout == 0 && args.qparams.is_some() => anyhow::bail!(
            "--on dev evaluates the train images that --holdout N kept out of calibration, and this artifact was calibrated without one: quantize again with --holdout N"
        ),
        EvalOn::Dev if exp.calibration.holdout == 0 => anyhow::bail!(
            "--on dev evaluates the train images that --holdout N keeps out of calibration: add --holdout (or `holdout` under [calibration] in the config)"
        ),
        EvalOn::Dev => fqvit_calib::train_split(&args.model.data, exp)?.1,
    };
    if let Some(n) = args.limit {
        set.truncate(n);
    }
    Ok(set)
}

fn finish_eval(
    args: &EvalArgs,
    loaded: &Loaded,
    exp: &Experiment,
    runner: Runner<'_>,
    calib: Option<serde_json::Value>,
    val: ImageFolder,
) -> Result<()> {
    let bar = progress(val.samples().len(), "evaluating");
    let opts = EvalOptions {
        batch_size: args.val_batchsize.max(1),
        // The engine runs on the CPU and reads the images there.
        device: if matches!(runner, Runner::Engine { .. }) { Device::Cpu } else { loaded.device },
        bad_images: if args.skip_bad { BadImages::Skip } else { BadImages::Fail },
        ties: args.ties,
    };
    let engine = matches!(runner, Runner::Engine { .. });
    let mut agreement = None;
    let report = match runner {
        Runner::Model(mut mode) => evaluate(&*loaded.model, &mut mode, &val, &opts, &bar)?,
        Runner::Engine { engine: e, sim } => {
            let report = evaluate_with(&loaded.model.preprocess(), &val, &opts, &bar, |x| {
                engine_forward(e, x)
            })?;
            if let Some(n) = args.site_agreement {
                agreement = Some(site_agreement(loaded, e, sim, &val, n, &opts)?);
            }
            report
        }
    };
    bar.finish_and_clear();
    print_report(loaded, exp, &report, calib.as_ref().and_then(|c| c["seconds"].as_f64()));
    if let Some(path) = &args.json {
        let parameters: i64 =
            loaded.vs.variables().values().map(tch::Tensor::numel).map(|n| n as i64).sum();
        let value = json!({
            "model": loaded.name.as_str(),
            "parameters": parameters,
            "preprocess": loaded.name.preprocess(),
            "interpolation": "bicubic",
            "top1": report.top1,
            "top5": report.top5,
            "images": report.images,
            "skipped": report.skipped,
            "tied_top1": report.tied_top1,
            "ties": report.ties,
            "weights": loaded.weights,
            "qparams": args.qparams,
            "data": args.model.data,
            "on": if args.on == EvalOn::Dev { "dev" } else { "val" },
            "device": format!("{:?}", opts.device),
            "engine": if engine { "int" } else { "sim" },
            "experiment": exp,
            "label": exp.label(),
            "calibration": calib,
            "eval_seconds": report.seconds,
            "predictions": report.predictions,
            "site_agreement": agreement,
        });
        let text = serde_json::to_string_pretty(&value)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_report(
    loaded: &Loaded,
    exp: &Experiment,
    report: &EvalReport,
    calib_seconds: Option<f64>,
) {
    println!("model:   {} ({})", loaded.name, exp.label());
    println!("top-1:   {:.2} %", report.top1);
    println!("top-5:   {:.2} %", report.top5);
    println!(
        "images:  {} ({:.1} images/s, {:.1} s)",
        report.images,
        report.images as f64 / report.seconds,
        report.seconds
    );
    if let Some(s) = calib_seconds {
        println!("calibration: {s:.1} s");
    }
    if report.tied_top1 > 0 {
        let rule = match report.ties {
            Ties::Torch => "ranked by libtorch's topk, as the original",
            Ties::LowerIndex => "ties go to the lower class index",
        };
        println!("tied top-1: {} images ({rule})", report.tied_top1);
    }
    if !report.skipped.is_empty() {
        println!("skipped: {} undecodable images", report.skipped.len());
    }
}
