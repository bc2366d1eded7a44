//! `cargo xtask`: the project's own automation, in Rust so it runs wherever cargo does.
//!
//! It depends on no workspace crate and never on `tch`, so it builds before libtorch exists:
//! `setup` is what installs libtorch in the first place.

mod bench_engine;
mod bench_peers;
mod ci;
mod demo;
mod setup;
mod table;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "fqvit project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install libtorch 2.11.0 (PyPI wheel) and cmake into the user cache when missing, and link them into `.fqvit/`.
    Setup,
    /// Report the libtorch in use, its version, and whether CUDA is visible.
    Doctor,
    /// Everything CI runs: setup, fmt, clippy, tests (with doc tests), benches compiled, docs, tidy.
    Ci,
    /// Check the architecture invariants (crate dependency directions, no `todo!`/`dbg!`).
    Tidy,
    /// The accuracy matrix (4 methods × plain/--ptf/--lis/--ptf --lis) as a markdown table.
    Table {
        /// Model name.
        #[arg(long, default_value = "vit_tiny")]
        model: String,
        /// ImageNet folder.
        #[arg(long, default_value = "../shared/imagenet-sample")]
        data: String,
        /// Weights folder.
        #[arg(long, default_value = "../shared/weights")]
        weights_dir: String,
        /// Observers to run.
        #[arg(long, value_delimiter = ',', default_value = "minmax,ema,percentile,omse")]
        methods: Vec<String>,
        /// Also run `--ptf --lis --attn-bits 8` ("8/8/8 with LIS") per method.
        #[arg(long)]
        attn8: bool,
        /// Keep rows whose JSON is already in `target/accuracy/` (marked "reused" on stderr).
        #[arg(long)]
        reuse: bool,
    },
    /// The published FQ-ViT table end to end (release `fqvit-cli bench-table`: fetch, run,
    /// render); every argument is passed on (`cargo xtask bench-table --help` lists them).
    #[command(disable_help_flag = true)]
    BenchTable {
        /// `[fetch|run|render] [--data DIR] [--models a,b] [--rows ...] [--device ...] ...`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Regenerate the Pillow resampling fixtures of fqvit-calib (installs Pillow from PyPI into a scratch folder).
    PillowFixtures,
    /// Throughput and peak memory of every full-size model (random weights) as a markdown table.
    BenchModels {
        /// Models to run (CLI names); all nine by default.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "vit_tiny,deit_tiny,deit_small,deit_base,vit_base,vit_large,swin_tiny,swin_small,swin_base"
        )]
        models: Vec<String>,
        /// auto, cpu or cuda.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Images per forward.
        #[arg(long, default_value_t = 32)]
        batch_size: u32,
        /// Timed forwards per mode.
        #[arg(long, default_value_t = 3)]
        iters: u32,
    },
    /// The integer engine against libtorch fp32 and the simulation, native and held to AVX2,
    /// as a markdown table (random weights; one process per row).
    BenchEngine {
        /// Models to run (CLI names).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "vit_tiny,deit_small,deit_base,swin_tiny"
        )]
        models: Vec<String>,
        /// Batch sizes.
        #[arg(long, value_delimiter = ',', default_value = "32,1")]
        batches: Vec<u32>,
        /// Settings: native (this CPU's kernels), avx2 (libtorch, MKL, oneDNN and the engine held
        /// to AVX2, `--isa avx2`), loops (AVX2, the engine's widening loops).
        #[arg(long, value_delimiter = ',', default_value = "native,avx2")]
        isas: Vec<String>,
        /// Timed forwards per mode.
        #[arg(long, default_value_t = 3)]
        iters: u32,
    },
    /// Our simulation and engine against libtorch fp32 and ONNX Runtime fp32/int8 (pinned, from
    /// PyPI) as a markdown table, with the real ViT-Tiny's top-1 for each.
    BenchPeers {
        /// Models to run (CLI names).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "vit_tiny,deit_small,deit_base,swin_tiny"
        )]
        models: Vec<String>,
        /// Batch sizes.
        #[arg(long, value_delimiter = ',', default_value = "32,1")]
        batches: Vec<u32>,
        /// Timed runs per column (after one warm-up).
        #[arg(long, default_value_t = 5)]
        iters: u32,
        /// ORT's calibration images (and ours for the top-1): the first N of the sorted `train/`.
        #[arg(long, default_value_t = 32)]
        calib_images: u32,
        /// The real ViT-Tiny's top-1 on the shared val (default; about 1300 images per model).
        #[arg(long, overrides_with = "no_accuracy")]
        accuracy: bool,
        /// Skip the top-1 table (the slow part).
        #[arg(long, overrides_with = "accuracy")]
        no_accuracy: bool,
        /// native, or avx2: libtorch, MKL and oneDNN (and our engine, `--isa avx2`) held to AVX2 for the whole run.
        #[arg(long, value_parser = ["native", "avx2"], default_value = "native")]
        env: String,
        /// Use `target/release/fqvit-cli` as it is (no `cargo build --release -p fqvit-cli`).
        #[arg(long)]
        no_build: bool,
        /// Leave out our columns (the peers alone; no fqvit-cli needed).
        #[arg(long)]
        skip_ours: bool,
    },
    /// Regenerate fqvit-models' timm parity fixtures (installs timm from PyPI into a scratch folder).
    TimmFixtures,
    /// The main job on the shared sample: calibrate, quantize and evaluate ViT-Tiny (release build).
    Demo {
        /// Extra arguments passed to `fqvit-cli eval` (e.g. `--limit 200`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup().map(drop),
        Cmd::Doctor => setup::doctor(),
        Cmd::Ci => ci::ci(),
        Cmd::Tidy => tidy::tidy(),
        Cmd::Demo { args } => demo::demo(&args),
        Cmd::PillowFixtures => demo::pillow_fixtures(),
        Cmd::TimmFixtures => demo::timm_fixtures(),
        Cmd::BenchModels { models, device, batch_size, iters } => {
            table::bench_models(&models, &device, batch_size, iters)
        }
        Cmd::BenchTable { args } => table::bench_table(&args),
        Cmd::BenchEngine { models, batches, isas, iters } => {
            bench_engine::bench_engine(&models, &batches, &isas, iters)
        }
        Cmd::BenchPeers {
            models,
            batches,
            iters,
            calib_images,
            accuracy: _,
            no_accuracy,
            env,
            no_build,
            skip_ours,
        } => bench_peers::bench_peers(&bench_peers::Options {
            models,
            batches,
            iters,
            calib_images,
            accuracy: !no_accuracy,
            avx2: env == "avx2",
            build: !no_build,
            skip_ours,
        }),
        Cmd::Table { model, data, weights_dir, methods, attn8, reuse } => {
            table::table(&table::Options { model, data, weights_dir, methods, attn8, reuse })
        }
    }
}

/// The workspace root (the parent of this crate).
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

/// The cargo that runs us (cargo-xtask convention), so the pinned toolchain is used throughout.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project_root());
    cmd
}

/// Runs a command, echoing it, and fails with its exit status.
fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", display(cmd));
    let status = cmd.status().with_context(|| format!("starting {}", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}
