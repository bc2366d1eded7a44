//! `cargo xtask ci`: the whole gate, cheapest checks first. `.ci/run` is just this.

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
    tidy::tidy()?;
    setup::setup()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    run(cargo().args(["test", "--workspace", "--all-targets"]))?;
    run(cargo().args(["test", "--workspace", "--doc"]))?;
    run(cargo().args(["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings"))?;
    eprintln!("xtask ci: all checks passed");
    Ok(())
}
