//! `fqvit-cli bench`: images per second of a model with random weights, float and quantized,
//! and the process's peak memory. One model per process, so the peak is that model's.

use std::time::Instant;

use anyhow::{Context, Result};
use fqvit_calib::{Calibrator, Experiment};
use fqvit_models::{Classifier, Mode, ModelName, Quantized};
use serde_json::json;
use tch::{Kind, Tensor};

use crate::cli::{BenchArgs, EngineArg};

pub(crate) fn run(args: &BenchArgs) -> Result<()> {
    let name: ModelName = args.model.parse()?;
    let engine_options = args.int.options(args.engine)?;
    if let Some(path) = &args.json {
        crate::output::check_writable(path, "--json")?;
    }
    let device = crate::commands::shared::device(args.device)?;
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(device);
    let model = name.config().build(&vs.root());
    let params: i64 = vs.trainable_variables().iter().map(Tensor::numel).map(|n| n as i64).sum();
    let side = model.preprocess().size as i64;
    let images = Tensor::randn([args.batch_size, 3, side, side], (Kind::Float, device));

    let float = images_per_second(&*model, &images, &mut Mode::Float, args.iters);
    // 8/8/4 with PTF and LIS, calibrated on two random batches (the last one freezes).
    let exp = Experiment::default();
    let mut sink = Calibrator::new(model.sites(), &exp)?;
    for last in [false, true] {
        sink.set_last_batch(last);
        let batch = Tensor::randn([args.batch_size, 3, side, side], (Kind::Float, device));
        let options = exp.quant_options();
        let _ = tch::no_grad(|| {
            model.forward(&batch, &mut Mode::Calibrate { sink: &mut sink, options })
        });
    }
    let table = sink.freeze()?;
    let int = match args.engine {
        EngineArg::Sim => None,
        EngineArg::Int => {
            let prov = crate::commands::shared::provenance(
                name,
                &*model,
                "random weights".into(),
                &exp,
                &table,
                std::path::Path::new("random images"),
                2 * args.batch_size as usize,
            )?;
            let engine = crate::commands::shared::engine_via_artifact(
                &*model,
                &vs,
                &table,
                &prov,
                engine_options,
            )?;
            Some(engine.bench(args.batch_size as usize, args.iters)?)
        }
    };
    let quantized = Quantized::new(&*model, table, exp.quant_options())?;
    let quant = images_per_second(&*model, &images, &mut Mode::quantized(&quantized), args.iters);
    let peak_mib = peak_rss_mib();
    let report = json!({
        "model": name.as_str(),
        "parameters": params,
        "batch_size": args.batch_size,
        "device": format!("{device:?}"),
        "float_images_per_s": float,
        "quantized_images_per_s": quant,
        "int_images_per_s": int.as_ref().map(|i| i.images_per_s),
        "int_seconds_by_kind": int.as_ref().map(|i| &i.seconds_by_kind),
        "int_gemm_ops_per_s": int.as_ref().map(|i| i.gemm_ops_per_s),
        "int_gemm_kernel": int.as_ref().map(|i| i.gemm_kernel.clone()),
        "int_resident_mib": int.as_ref().map(|i| i.resident_mib),
        "peak_rss_mib": peak_mib,
    });
    println!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn images_per_second(
    model: &dyn Classifier,
    images: &Tensor,
    mode: &mut Mode<'_>,
    iters: usize,
) -> f64 {
    let forward = |mode: &mut Mode<'_>| {
        let logits = tch::no_grad(|| model.forward(images, mode));
        // Reading a value waits for the device, so the time is the forward's.
        let _ = logits.sum(Kind::Float).double_value(&[]);
    };
    forward(mode);
    let start = Instant::now();
    for _ in 0..iters {
        forward(mode);
    }
    (iters as i64 * images.size()[0]) as f64 / start.elapsed().as_secs_f64()
}

/// The process's peak resident memory (`VmHWM`), in MiB; `None` off Linux.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
