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
