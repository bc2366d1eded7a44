//! `cargo xtask bench-peers`: our simulation and integer engine beside the usual CPU peers.
//!
//! For each model, `xtask/scripts/bench_peers.py` (Python, from a pinned `pip install --target`
//! beside the set-up's torch) builds timm's model, exports it to ONNX and quantizes it statically
//! with ONNX Runtime twice, on the same first `--calib-images` of the sorted `train/` that our
//! `--calib-order sorted` takes: once with ORT's defaults (QDQ, every op ORT quantizes), once
//! with MatMul/Gemm/Conv only, ORT's usual "weights-heavy ops" setting. It then times libtorch
//! fp32 (timm in PyTorch), ORT fp32 and both ORT int8 models at every batch size, one warm-up
//! and `--iters` timed runs on a fixed random batch, all cores. Our columns come from
//! `fqvit-cli bench --engine int` (random weights, as the peers' except ViT-Tiny's). With
//! `--accuracy`, the real ViT-Tiny's top-1 on the shared val for each, against our engine's
//! `fqvit-cli eval --engine int` (fqvit+ 8/8/4) calibrated on the same images.
//!
//! Figures in `target/bench-peers/` (one JSON per model and per CLI run), the table on stdout and
//! in `target/bench-peers/table.md`. A benchmark command, not a test: nothing asserts a speed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::bench_engine::{Bench, ENGINE_AVX2};
use crate::ci::AVX2_ENV;
use crate::{cargo, project_root, run, setup};

/// Our model names and timm's.
const MODELS: &[(&str, &str)] = &[
    ("vit_tiny", "vit_tiny_patch16_224"),
    ("deit_tiny", "deit_tiny_patch16_224"),
    ("deit_small", "deit_small_patch16_224"),
    ("deit_base", "deit_base_patch16_224"),
    ("vit_base", "vit_base_patch16_224"),
    ("vit_large", "vit_large_patch16_224"),
    ("swin_tiny", "swin_tiny_patch4_window7_224"),
    ("swin_small", "swin_small_patch4_window7_224"),
    ("swin_base", "swin_base_patch4_window7_224"),
];

/// The model whose real weights are in `../shared/weights`: the only one with a top-1.
const ACCURACY_MODEL: &str = "vit_tiny";

/// Exact versions, so two runs of this table compare the same peers. `--no-deps` throughout:
/// torch's own folder already brings sympy, typing_extensions, filelock, fsspec and jinja2, and
/// a resolver run would pull a second torch. onnxruntime 1.32 needs flatbuffers, numpy,
/// packaging and protobuf; onnx needs protobuf and ml_dtypes; torchvision pairs with torch
/// 2.11 (as in `timm-fixtures`). No huggingface_hub: the weights are local, timm runs without
/// it, and 2.x without its own dependencies prints an import error on every start.
const PINS: &[&str] = &[
    "onnxruntime==1.32.0",
    "onnx==1.23.2",
    "timm==1.0.31",
    "torchvision==0.26.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "pyyaml==6.0.4",
    "safetensors==0.8.0",
    "protobuf==7.36.2",
    "flatbuffers==25.12.19",
    "packaging==26.4",
    "ml_dtypes==0.7.0",
];

/// Records which pins a peers environment holds, so a finished install is not redone.
const MARKER: &str = ".fqvit-pins";

pub(crate) struct Options {
    pub(crate) models: Vec<String>,
    pub(crate) batches: Vec<u32>,
    pub(crate) iters: u32,
    pub(crate) calib_images: u32,
    pub(crate) accuracy: bool,
    pub(crate) avx2: bool,
    pub(crate) build: bool,
    pub(crate) skip_ours: bool,
}

pub(crate) fn bench_peers(opts: &Options) -> Result<()> {
    let root = project_root();
    let timm_names = opts
        .models
        .iter()
        .map(|m| {
            MODELS.iter().find(|(ours, _)| ours == m).map(|(_, timm)| *timm).with_context(|| {
                let known: Vec<&str> = MODELS.iter().map(|(ours, _)| *ours).collect();
                format!("--models: unknown model {m:?} (known: {})", known.join(", "))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(!opts.batches.is_empty() && !opts.batches.contains(&0), "--batches: sizes ≥ 1");
    ensure!(opts.iters > 0, "--iters: at least 1 timed run");
    ensure!(opts.calib_images > 0, "--calib-images: at least 1 image");
    let shared = root.join("../shared");
    for need in ["imagenet-sample/train", "imagenet-sample/val", "weights"] {
        ensure!(
            shared.join(need).is_dir(),
            "../shared/{need} is missing beside the repository at {}: bench-peers calibrates on \
             the shared ImageNet sample and loads ViT-Tiny's real weights from it",
            shared.display()
        );
    }
    let env: &[(&str, &str)] = if opts.avx2 { AVX2_ENV } else { &[] };
    let mut stages: Vec<(String, f64)> = Vec::new();

    let t = Instant::now();
    let pythonpath = peers_env()?;
    stages.push(("peers env".into(), t.elapsed().as_secs_f64()));

    let cli = root.join("target/release/fqvit-cli");
    if !opts.skip_ours {
        if opts.build {
            let t = Instant::now();
            run(cargo().args(["build", "--release", "-p", "fqvit-cli"]))?;
            stages.push(("build fqvit-cli".into(), t.elapsed().as_secs_f64()));
        }
        ensure!(
            cli.is_file(),
            "{} is missing: build it (drop --no-build) or pass --skip-ours",
            cli.display()
        );
    }

    let out_dir = root.join("target/bench-peers");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let batches = opts.batches.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut peers: Vec<Value> = Vec::new();
    let mut ours: Vec<Vec<Option<Value>>> = Vec::new();
    for (model, timm) in opts.models.iter().zip(&timm_names) {
        let json = out_dir.join(format!("{model}.json"));
        let t = Instant::now();
        let mut cmd = Command::new("python3");
        cmd.env("PYTHONPATH", &pythonpath)
            .envs(env.iter().copied())
            // Whatever a library prints goes to stderr: stdout is the table's alone.
            .stdout(std::io::stderr())
            .arg(root.join("xtask/scripts/bench_peers.py"))
            .args(["--model", model, "--timm", timm, "--batches", &batches])
            .args(["--iters", &opts.iters.to_string()])
            .args(["--calib-images", &opts.calib_images.to_string()])
            .arg("--shared")
            .arg(&shared)
            .arg("--work")
            .arg(out_dir.join(model))
            .arg("--out")
            .arg(&json);
        if opts.accuracy && model == ACCURACY_MODEL {
            cmd.arg("--accuracy");
        }
        run(&mut cmd).with_context(|| format!("bench-peers.py on {model}"))?;
        stages.push((format!("{model}: peers"), t.elapsed().as_secs_f64()));
        peers.push(read_json(&json)?);

        let mut row = Vec::new();
        for &batch in &opts.batches {
            if opts.skip_ours {
                row.push(None);
                continue;
            }
            let t = Instant::now();
            let json = out_dir.join(format!("{model}.{batch}.fqvit.json"));
            // As `bench-engine`'s avx2 rows: the engine held where libtorch is.
            let engine: &[&str] = if opts.avx2 { ENGINE_AVX2 } else { &[] };
            let bench = Bench { model, batch, iters: opts.iters, env, engine };
            let mut cmd = bench.command(&cli, &json);
            run(&mut cmd)
                .with_context(|| format!("fqvit-cli bench {model} --batch-size {batch}"))?;
            stages.push((format!("{model}: fqvit bench b{batch}"), t.elapsed().as_secs_f64()));
            row.push(Some(read_json(&json)?));
        }
        ours.push(row);
    }

    let our_top1 =
        if opts.accuracy && !opts.skip_ours && opts.models.iter().any(|m| m == ACCURACY_MODEL) {
            let t = Instant::now();
            let top1 = our_accuracy(&cli, &shared, &out_dir, opts, env)?;
            stages.push(("vit_tiny: fqvit eval".into(), t.elapsed().as_secs_f64()));
            Some(top1)
        } else {
            None
        };

    let table = render(opts, &peers, &ours, our_top1)?;
    let path = out_dir.join("table.md");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    for (name, secs) in &stages {
        eprintln!("xtask bench-peers: {name:<28} {secs:>7.1} s");
    }
    print!("{table}");
    Ok(())
}

/// Installs the pins into `<cache>/peers-env` unless its marker names exactly these pins, and
/// returns the `PYTHONPATH`: the peers first, then the set-up's torch.
fn peers_env() -> Result<std::ffi::OsString> {
    let cache = setup::cache_dir()?;
    let torch_site = cache.join(format!("torch-{}", setup::TORCH_VERSION));
    ensure!(
        torch_site.join("torch/__init__.py").is_file(),
        "no torch {} at {}: run `cargo xtask setup` first (bench-peers runs timm on its torch)",
        setup::TORCH_VERSION,
        torch_site.display()
    );
    let target = cache.join("peers-env");
    let wanted = PINS.join("\n") + "\n";
    let marker = target.join(MARKER);
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
        // A `.partial` folder renamed on success, so an interrupted install never looks done.
        let partial = target.with_extension("partial");
        for dir in [&partial, &target] {
            if dir.exists() {
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        eprintln!("installing {} into {}", PINS.join(" "), target.display());
        run(Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--no-input", "--disable-pip-version-check"])
            .args(["--no-deps", "--target"])
            .arg(&partial)
            .args(PINS))
        .context(
            "pip could not install the peers' pinned packages (needs Python 3 with pip and PyPI)",
        )?;
        std::fs::write(partial.join(MARKER), &wanted)
            .with_context(|| format!("writing {}", partial.join(MARKER).display()))?;
        std::fs::rename(&partial, &target)
            .with_context(|| format!("renaming {} to {}", partial.display(), target.display()))?;
    }
    std::env::join_paths([target, torch_site]).context("PYTHONPATH from the cache folder")
}

/// Our engine's top-1 on the shared val: fqvit+ 8/8/4, calibrated on the same first
/// `calib_images` sorted train images as ORT, as one batch when they fit one.
fn our_accuracy(
    cli: &Path,
    shared: &Path,
    out_dir: &Path,
    opts: &Options,
    env: &[(&str, &str)],
) -> Result<f64> {
    let (batch, iters) = calib_split(opts.calib_images);
    let json = out_dir.join("vit_tiny.eval.fqvit.json");
    let mut cmd = Command::new(cli);
    cmd.current_dir(project_root())
        .args(["-q", "eval", ACCURACY_MODEL])
        .arg(shared.join("imagenet-sample"))
        .arg("--weights-dir")
        .arg(shared.join("weights"))
        .args(["--config", "configs/fqvit_plus_8_8_4.toml", "--calib-order", "sorted"])
        .args(["--calib-batchsize", &batch.to_string(), "--calib-iter", &iters.to_string()])
        .args(["--device", "cpu", "--engine", "int", "--offline"])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .arg("--json")
        .arg(&json);
    if opts.avx2 {
        cmd.args(ENGINE_AVX2);
    }
    run(&mut cmd).context("fqvit-cli eval vit_tiny (our top-1)")?;
    let v = read_json(&json)?;
    v["top1"].as_f64().with_context(|| format!("no top1 in {}", json.display()))
}

/// Calibration batch size and count whose product is exactly `n`: the largest divisor of `n`
/// up to the CLI's default batch of 100.
fn calib_split(n: u32) -> (u32, u32) {
    let batch = (1..=n.min(100)).rev().find(|&d| n.is_multiple_of(d)).unwrap_or(1);
    (batch, n / batch)
}

fn read_json(path: &PathBuf) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn render(
    opts: &Options,
    peers: &[Value],
    ours: &[Vec<Option<Value>>],
    our_top1: Option<f64>,
) -> Result<String> {
    let first = peers.first().context("no model ran")?;
    let version = |k: &str| first["versions"][k].as_str().unwrap_or("?").to_owned();
    let cpu = first["cpu"].as_str().unwrap_or("unknown CPU");
    let threads = first["threads"].as_u64().unwrap_or(0);
    let held = if opts.avx2 {
        "libtorch, MKL, oneDNN and our engine held to AVX2 (ORT's MLAS has no switch: native)"
    } else {
        "native ISA (nothing held to AVX2)"
    };
    let mut out = format!(
        "{cpu}, {threads} threads; {held}; torch {}, onnxruntime {}, onnx {}, timm {}. \
         Images/s, {} timed runs after one warm-up on a fixed random batch; ORT int8 calibrated \
         on the first {} sorted train images; fqvit columns from `fqvit-cli bench --engine int` \
         (8/8/4 --ptf --lis, random weights, calibrated on random images)\n\n",
        version("torch"),
        version("onnxruntime"),
        version("onnx"),
        version("timm"),
        opts.iters,
        opts.calib_images,
    );
    out.push_str(
        "| model | batch | libtorch fp32 | ORT fp32 | ORT int8 (defaults) | ORT int8 (MatMul/Gemm/Conv) | fqvit simulation | fqvit engine | engine / best ORT int8 |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    let fmt = |x: Option<f64>| x.map_or("–".to_owned(), |x| format!("{x:.1}"));
    for ((model, p), our_row) in opts.models.iter().zip(peers).zip(ours) {
        for (&batch, our) in opts.batches.iter().zip(our_row) {
            let b = &p["images_per_s"][batch.to_string()];
            let f = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
            let o = |k: &str| our.as_ref().and_then(|v| v[k].as_f64());
            let engine = o("int_images_per_s");
            let best_int8 = f("ort_int8_default").max(f("ort_int8_matmul"));
            out.push_str(&format!(
                "| `{model}` | {batch} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |\n",
                f("torch_fp32"),
                f("ort_fp32"),
                f("ort_int8_default"),
                f("ort_int8_matmul"),
                fmt(o("quantized_images_per_s")),
                fmt(engine),
                engine.map_or("–".to_owned(), |e| format!("{:.2}×", e / best_int8)),
            ));
        }
    }
    let top1 = opts.models.iter().zip(peers).find(|(m, _)| *m == ACCURACY_MODEL);
    if let Some((_, p)) = top1.filter(|(_, p)| p["top1"].is_object()) {
        let t = |k: &str| p["top1"][k].as_f64().map_or("–".to_owned(), |x| format!("{x:.2}"));
        let images = p["top1"]["images"].as_u64().unwrap_or(0);
        out.push_str(&format!(
            "\nViT-Tiny (real weights) top-1 % on the shared val ({images} images); every \
             int8 model calibrated on the same first {} sorted train images\n\n\
             | libtorch fp32 | ORT fp32 | ORT int8 (defaults) | ORT int8 (MatMul/Gemm/Conv) | fqvit engine (fqvit+ 8/8/4) |\n\
             |---|---|---|---|---|\n\
             | {} | {} | {} | {} | {} |\n",
            opts.calib_images,
            t("torch_fp32"),
            t("ort_fp32"),
            t("ort_int8_default"),
            t("ort_int8_matmul"),
            our_top1.map_or("–".to_owned(), |x| format!("{x:.2}")),
        ));
    } else if opts.accuracy && opts.models.iter().any(|m| m == ACCURACY_MODEL) {
        bail!("the vit_tiny JSON has no top1 although --accuracy was on");
    }
    Ok(out)
}
