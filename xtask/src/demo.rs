//! The README's first command: the main job on the shared sample.

use anyhow::Result;

use crate::{cargo, project_root, run, setup};

pub(crate) fn demo(extra: &[String]) -> Result<()> {
    setup::setup()?;
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "-p",
        "fqvit-cli",
        "--",
        "eval",
        "vit_tiny",
        "../shared/imagenet-sample",
    ]);
    cmd.args([
        "--weights-dir",
        "../shared/weights",
        "--quant",
        "--ptf",
        "--lis",
        "--calib-order",
        "sorted",
    ]);
    cmd.args(extra);
    run(&mut cmd)
}

/// Installs Pillow into a scratch folder and runs `xtask/scripts/pillow_fixtures.py`.
pub(crate) fn pillow_fixtures() -> Result<()> {
    let scratch = setup::cache_dir()?.join("pillow-fixtures");
    let root = project_root();
    run(std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--upgrade", "--target"])
        .arg(&scratch)
        .arg("pillow"))?;
    run(std::process::Command::new("python3")
        .env("PYTHONPATH", &scratch)
        .arg(root.join("xtask/scripts/pillow_fixtures.py"))
        .arg(root.join("crates/fqvit-calib/tests/fixtures/pillow_resize.bin")))
}

/// timm's version for the parity fixtures (torchvision 0.26 pairs with torch 2.11).
const TIMM: &str = "timm==1.0.31";

/// `cargo xtask timm-fixtures`: installs timm (and torch, unless `cargo xtask setup` already
/// pip-installed it) from PyPI into a scratch folder and writes fqvit-models' timm fixtures.
pub(crate) fn timm_fixtures() -> Result<()> {
    let cache = setup::cache_dir()?;
    let scratch = cache.join("timm-env");
    let torch_site = cache.join(format!("torch-{}", setup::TORCH_VERSION));
    let mut path = vec![scratch.clone()];
    if torch_site.join("torch/__init__.py").is_file() {
        path.push(torch_site);
    } else {
        run(std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&scratch)
            .arg(format!("torch=={}", setup::TORCH_VERSION)))?;
    }
    run(std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--upgrade", "--no-deps", "--target"])
        .arg(&scratch)
        .args([TIMM, "torchvision==0.26.0", "numpy", "pillow", "pyyaml", "huggingface_hub"])
        .arg("safetensors"))?;
    let root = project_root();
    run(std::process::Command::new("python3")
        .env("PYTHONPATH", std::env::join_paths(&path)?)
        .arg(root.join("xtask/scripts/timm_fixtures.py"))
        .arg(root.join("crates/fqvit-models/tests/fixtures/timm"))
        .arg(root.join("../shared")))
}
