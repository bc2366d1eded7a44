//! `fqvit-cli`: evaluate, calibrate and quantize vision transformers the FQ-ViT way.
//!
//! `main` parses, installs the tracing subscriber (stderr, `RUST_LOG`) and dispatches.

// Doc comments are clap's help text, where `<DATA>` is the usual placeholder, not HTML.
#![allow(rustdoc::invalid_html_tags)]

mod alloc;
mod cli;
mod commands;
mod config;
mod output;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    // Parsing starts no thread, so the allocator setting still comes before any other thread.
    let cli = cli::Cli::parse();
    let allocator_set = cli.low_memory || alloc::keep_freed_memory();
    let default = match cli.verbose as i8 - cli.quiet as i8 {
        i8::MIN..=-1 => "warn",
        0 => "fqvit=info,fqvit_calib=info,fqvit_models=info,fqvit_cli=info,warn",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if !allocator_set {
        tracing::warn!("glibc refused the allocator setting; large tensors will page-fault");
    }
    match cli.command {
        cli::Command::Eval(args) => commands::eval::run(*args),
        cli::Command::Quantize(args) => commands::quantize::run(*args),
        cli::Command::Convert(args) => commands::convert::run(&args),
        cli::Command::Bench(args) => commands::bench::run(&args),
        cli::Command::BenchTable(args) => commands::bench_table::run(&args),
        cli::Command::Doctor => commands::doctor::run(),
    }
}
