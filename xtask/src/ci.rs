//! `cargo xtask ci`: the whole gate, cheapest checks first. `.ci/run` is just this.

use std::process::Stdio;
use std::time::Instant;

use anyhow::Result;

use crate::{cargo, run, setup, tidy};

pub(crate) fn ci() -> Result<()> {
    // Tests read ../shared; fail loudly here rather than skip later.
    let shared = crate::project_root().join("../shared");
    anyhow::ensure!(
        shared.join("imagenet-sample").is_dir() && shared.join("golden").is_dir(),
        "../shared (ImageNet sample, golden vectors, weights) is missing beside the repository at {}",
        shared.display()
    );
    let start = Instant::now();
    let mut steps: Vec<(&str, f64)> = Vec::new();
    let mut step = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let t = Instant::now();
        f()?;
        steps.push((name, t.elapsed().as_secs_f64()));
        Ok(())
    };
    step("tidy", &mut tidy::tidy)?;
    step("setup", &mut || setup::setup().map(drop))?;
    step("fmt", &mut || run(cargo().args(["fmt", "--all", "--check"])))?;
    step("clippy", &mut || run(cargo().arg("clippy").args(ALL).args(["--", "-D", "warnings"])))?;
    // nextest (on this project's machines) runs the test binaries side by side, which the long
    // CLI and parity tests need to share the two cores; `.config/nextest.toml` prints the
    // conformance reports. Plain `cargo test` where it is missing.
    if has_nextest() {
        step("test build", &mut || {
            run(cargo().args(["nextest", "run"]).args(ALL).arg("--no-run"))
        })?;
        step("tests", &mut || {
            run(cargo().args(["nextest", "run"]).args(ALL).arg("--no-fail-fast"))
        })?;
    } else {
        step("test build", &mut || run(cargo().arg("test").args(ALL).arg("--no-run")))?;
        step("tests", &mut || run(cargo().arg("test").args(ALL)))?;
    }
    // The same float-sensitive tests with libtorch, MKL and oneDNN held to AVX2, so that a
    // machine with AVX-512 sees what an AVX2-only one sees (libtorch's CPU GELU is oneDNN's JIT,
    // which only ONEDNN_MAX_CPU_ISA moves; ATEN_CPU_CAPABILITY moves libtorch's own kernels).
    step("tests AVX2", &mut || {
        let mut cmd = cargo();
        if has_nextest() {
            // The workspace's build with a filter, not `-p`: the same features, so no rebuild.
            // The mutation test runs the engine alone: no float result to hold to AVX2.
            let filter: Vec<String> =
                AVX2_PACKAGES.iter().map(|p| format!("package({p})")).collect();
            cmd.args(["nextest", "run"])
                .args(ALL)
                .args(["--no-fail-fast", "-E"])
                .arg(format!("({}) - binary(mutation)", filter.join(" | ")));
        } else {
            cmd.args(["test", "--all-features", "--all-targets"]);
            for package in AVX2_PACKAGES {
                cmd.args(["-p", package]);
            }
        }
        run(cmd.envs(AVX2_ENV.iter().copied()))
    })?;
    step("doc tests", &mut || {
        run(cargo().args(["test", "--workspace", "--all-features", "--doc"]))
    })?;
    step("doc", &mut || {
        run(cargo()
            .args(["doc", "--workspace", "--all-features", "--no-deps"])
            .env("RUSTDOCFLAGS", "-D warnings"))
    })?;
    for (name, secs) in &steps {
        eprintln!("xtask ci: {name:<10} {secs:>7.0} s");
    }
    eprintln!("xtask ci: all checks passed in {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Every crate, target and feature (the `pth` feature's `.pth` reader is tested too).
const ALL: [&str; 3] = ["--workspace", "--all-targets", "--all-features"];

/// The crates whose tests compare libtorch's float32 results (the simulation, the observers,
/// the conformance and engine comparisons); the CLI's end-to-end runs are the same code again.
const AVX2_PACKAGES: &[&str] = &["fqvit-tensor", "fqvit-observers", "fqvit-models", "fqvit-calib"];

/// libtorch's kernels, MKL's and oneDNN's JIT held to AVX2.
pub(crate) const AVX2_ENV: &[(&str, &str)] = &[
    ("ATEN_CPU_CAPABILITY", "avx2"),
    ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
    ("ONEDNN_MAX_CPU_ISA", "AVX2"),
];

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
