//! Architecture invariants (ARCHITECTURE.md), checked from `cargo metadata` and the sources.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cargo;

/// (crate, dependency it must not have in `[dependencies]`, why).
const FORBIDDEN: &[(&str, &str, &str)] = &[
    ("fqvit-ops", "tch", "the integer kernels are usable without libtorch"),
    ("fqvit-models", "fqvit-observers", "models know nothing about calibration algorithms"),
    ("fqvit-models", "fqvit-calib", "models know nothing about calibration"),
    ("fqvit-observers", "fqvit-models", "observers see tensors, not models"),
    ("fqvit-tensor", "fqvit-models", "tensor arithmetic knows no model"),
    ("fqvit-tensor", "fqvit-observers", "tensor arithmetic knows no calibration"),
    ("fqvit-engine", "tch", "the integer engine runs without libtorch"),
    ("fqvit-engine", "fqvit-models", "the engine runs programs, it does not rebuild models"),
    ("fqvit-program", "tch", "programs are plain data"),
];

/// The only files allowed to contain unsafe code, each with a `SAFETY` note per block:
/// glibc's mallopt, CPU tensors seen as slices for the fused passes, and the entry into the
/// AVX-512 VNNI GEMM kernel (no safe wrapper exists for `vpdpbusd`).
const UNSAFE_SITES: &[&str] = &[
    "crates/fqvit-cli/src/alloc.rs",
    "crates/fqvit-tensor/src/cpu.rs",
    "crates/fqvit-engine/src/gemm/vnni.rs",
];

/// The only files that seed libtorch's global generator: the test lock that makes seeded draws
/// independent of the test runner, and `bench`'s random weights.
const SEED_SITES: &[&str] =
    &["crates/fqvit-testkit/src/lib.rs", "crates/fqvit-cli/src/commands/bench.rs"];

/// Dependencies only binaries may have.
const BINARY_ONLY: &[&str] = &["anyhow", "clap", "tracing-subscriber", "toml"];

pub(crate) fn tidy() -> Result<()> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let mut problems = Vec::new();
    for pkg in meta["packages"].as_array().context("no packages in cargo metadata")? {
        let name = pkg["name"].as_str().unwrap_or_default();
        let deps: Vec<(&str, &str, bool)> = pkg["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                (
                    d["name"].as_str().unwrap_or_default(),
                    d["kind"].as_str().unwrap_or("normal"),
                    d["optional"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        for &(krate, forbidden, why) in FORBIDDEN {
            if name == krate && deps.iter().any(|&(d, ..)| d == forbidden) {
                problems.push(format!("{krate} depends on {forbidden}: {why}"));
            }
        }
        if name == "xtask" && deps.iter().any(|&(d, ..)| d == "tch" || d.starts_with("fqvit-")) {
            problems.push(
                "xtask depends on tch or a workspace crate: it must build before libtorch exists"
                    .into(),
            );
        }
        let is_binary = name == "xtask" || name == "fqvit-cli";
        for &(dep, kind, optional) in &deps {
            // A library's optional `clap` feature derives `ValueEnum` on its own setting types,
            // so that the command line parses them directly.
            let feature_only = optional && dep == "clap";
            if !is_binary && kind == "normal" && BINARY_ONLY.contains(&dep) && !feature_only {
                problems
                    .push(format!("library {name} depends on {dep}: only fqvit-cli and xtask may"));
            }
        }
    }
    for dir in ["crates", "tests"] {
        scan_sources(&crate::project_root().join(dir), &mut problems)?;
    }
    if !problems.is_empty() {
        bail!("tidy found {} problem(s):\n  {}", problems.len(), problems.join("\n  "));
    }
    eprintln!("xtask tidy: invariants hold");
    Ok(())
}

fn scan_sources(dir: &Path, problems: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            scan_sources(&path, problems)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)?;
            // The measured needs for unsafe (see those files); anything else is refused here,
            // since the workspace lint is `deny` so that these sites can exist.
            let unsafe_allowed = UNSAFE_SITES.iter().any(|site| path.ends_with(site));
            let seed_allowed = SEED_SITES.iter().any(|site| path.ends_with(site));
            for (i, line) in text.lines().enumerate() {
                // Any lint attribute on it (allow, expect, warn) would open the door.
                if line.contains(concat!("unsafe", "_code")) && !unsafe_allowed {
                    problems.push(format!(
                        "{}:{}: unsafe code outside {UNSAFE_SITES:?}",
                        path.display(),
                        i + 1
                    ));
                }
                if line.contains(concat!("manual", "_seed(")) && !seed_allowed {
                    problems.push(format!(
                        "{}:{}: libtorch's generator seeded outside {SEED_SITES:?}: draw through \
                         fqvit_testkit::seeded, which holds it for one test at a time",
                        path.display(),
                        i + 1
                    ));
                }
                // Built with concat! so that this file does not contain the patterns it forbids.
                for bad in
                    [concat!("todo", "!("), concat!("dbg", "!("), concat!("unimplemented", "!(")]
                {
                    if line.contains(bad) {
                        problems.push(format!("{}:{}: {bad}", path.display(), i + 1));
                    }
                }
            }
        }
    }
    Ok(())
}
