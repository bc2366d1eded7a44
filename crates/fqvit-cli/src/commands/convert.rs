//! `fqvit-cli convert`: an original checkpoint to timm-layout safetensors.

use anyhow::{Context, Result};
use fqvit_models::ModelName;
use fqvit_models::convert::convert;
use fqvit_models::weights::load_strict;

use crate::cli::ConvertArgs;

pub(crate) fn run(args: &ConvertArgs) -> Result<()> {
    let name: ModelName = args.model.parse()?;
    let arch = name.config();
    let tensors = convert(&arch, &args.input)?;
    // Written beside the output first, and kept only if the model takes it strictly.
    let partial = args.output.with_extension("partial.safetensors");
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    tch::Tensor::write_safetensors(&tensors, &partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _model = arch.build(&vs.root());
    if let Err(e) = load_strict(&vs, &partial) {
        let _ = std::fs::remove_file(&partial);
        return Err(anyhow::anyhow!(e).context(format!(
            "{} converted, but the result does not fit {name}",
            args.input.display()
        )));
    }
    std::fs::rename(&partial, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "{}: {} tensors for {name} ({})",
        args.output.display(),
        tensors.len(),
        name.hub_repo()
    );
    Ok(())
}
