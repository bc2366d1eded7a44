//! The README's first command: the main job on the shared sample.

use anyhow::Result;

use crate::{cargo, run, setup};

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
