//! `cargo xtask bench-table`: the published table, by the release CLI's `bench-table`.
//! `cargo xtask table`: the accuracy matrix on a data folder, through the release CLI, as a
//! markdown table (top-1, top-5, calibration and evaluation seconds). Each run's JSON stays in
//! `target/accuracy/`. `cargo xtask bench-models`: `fqvit-cli bench` per model (one process
//! each, so each peak memory is its own), as a markdown table; JSON in `target/bench-models/`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{cargo, project_root, run};

/// One row: a label and the quantization flags.
fn rows(methods: &[String]) -> Vec<(String, Vec<String>)> {
    let mut rows = vec![("float".to_owned(), vec![])];
    for m in methods {
        for (label, flags) in [
            ("", &[][..]),
            (" --ptf", &["--ptf"][..]),
            (" --lis", &["--lis"][..]),
            (" --ptf --lis", &["--ptf", "--lis"][..]),
        ] {
            let mut args = vec!["--quant".to_owned(), "--quant-method".to_owned(), m.clone()];
            args.extend(flags.iter().map(|s| s.to_string()));
            rows.push((format!("{m}{label}"), args));
        }
    }
    rows
}

/// What `cargo xtask table` runs.
pub(crate) struct Options {
    pub(crate) model: String,
    pub(crate) data: String,
    pub(crate) weights_dir: String,
    pub(crate) methods: Vec<String>,
    pub(crate) attn8: bool,
    pub(crate) reuse: bool,
}

pub(crate) fn table(options: &Options) -> Result<()> {
    let Options { model, data, weights_dir, methods, attn8, reuse } = options;
    run(cargo().args(["build", "--release", "-p", "fqvit-cli"]))?;
    let cli = project_root().join("target/release/fqvit-cli");
    let out_dir = project_root().join("target/accuracy");
    std::fs::create_dir_all(&out_dir)?;
    let mut rows = rows(methods);
    if *attn8 {
        for m in methods {
            let args = ["--quant", "--ptf", "--lis", "--attn-bits", "8", "--quant-method", m]
                .map(String::from)
                .to_vec();
            rows.push((format!("{m} --ptf --lis --attn-bits 8"), args));
        }
    }
    let mut lines = vec![
        format!("| {model}: flags | top-1 | top-5 | calibration s | evaluation s |"),
        "|---|---|---|---|---|".to_owned(),
    ];
    for (label, args) in rows {
        let json: PathBuf = out_dir
            .join(format!("{model}-{}.json", label.replace([' ', '-'], "_").trim_matches('_')));
        if *reuse && json.exists() {
            eprintln!("table: reusing {}", json.display());
        } else {
            let mut cmd = std::process::Command::new(&cli);
            cmd.args([
                "-q",
                "eval",
                model,
                data,
                "--weights-dir",
                weights_dir,
                "--calib-order",
                "sorted",
            ])
            .args(&args)
            .arg("--json")
            .arg(&json);
            run(&mut cmd)?;
        }
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(&json)
                .with_context(|| format!("reading {}", json.display()))?,
        )?;
        let calib =
            v["calibration"]["seconds"].as_f64().map_or("–".to_owned(), |s| format!("{s:.0}"));
        let line = format!(
            "| `{}` | {:.2} | {:.2} | {calib} | {:.0} |",
            if args.is_empty() { "(float)".to_owned() } else { args.join(" ") },
            v["top1"].as_f64().unwrap_or(f64::NAN),
            v["top5"].as_f64().unwrap_or(f64::NAN),
            v["eval_seconds"].as_f64().unwrap_or(f64::NAN),
        );
        eprintln!("{line}");
        lines.push(line);
    }
    println!("{}", lines.join("\n"));
    Ok(())
}

/// `cargo xtask bench-table`: builds the release CLI and hands it every argument.
pub(crate) fn bench_table(args: &[String]) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "fqvit-cli"]))?;
    let cli = project_root().join("target/release/fqvit-cli");
    let status = std::process::Command::new(&cli)
        .arg("bench-table")
        .args(args)
        .current_dir(project_root())
        .status()
        .with_context(|| format!("starting {}", cli.display()))?;
    anyhow::ensure!(status.success(), "bench-table failed: {status}");
    Ok(())
}

pub(crate) fn bench_models(
    models: &[String],
    device: &str,
    batch_size: u32,
    iters: u32,
) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "fqvit-cli"]))?;
    let cli = project_root().join("target/release/fqvit-cli");
    let out_dir = project_root().join("target/bench-models");
    std::fs::create_dir_all(&out_dir)?;
    let mut lines = vec![
        "| model | parameters | float images/s | quantized (`--ptf --lis`) images/s | quantized / float | peak RSS MiB |"
            .to_owned(),
        "|---|---|---|---|---|---|".to_owned(),
    ];
    for model in models {
        let json = out_dir.join(format!("{model}.json"));
        run(std::process::Command::new(&cli)
            .args(["-q", "bench", model])
            .args([
                "--device",
                device,
                "--batch-size",
                &batch_size.to_string(),
                "--iters",
                &iters.to_string(),
                "--json",
            ])
            .arg(&json))?;
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(&json)
                .with_context(|| format!("reading {}", json.display()))?,
        )?;
        let (float, quant) = (
            v["float_images_per_s"].as_f64().unwrap_or(f64::NAN),
            v["quantized_images_per_s"].as_f64().unwrap_or(f64::NAN),
        );
        let line = format!(
            "| `{model}` | {:.1} M | {float:.1} | {quant:.1} | {:.2} | {:.0} |",
            v["parameters"].as_f64().unwrap_or(f64::NAN) / 1e6,
            quant / float,
            v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
        );
        eprintln!("{line}");
        lines.push(line);
    }
    println!("batch {batch_size}, {iters} timed forwards per mode, device {device}\n");
    println!("{}", lines.join("\n"));
    Ok(())
}
