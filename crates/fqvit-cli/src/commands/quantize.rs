//! `fqvit-cli quantize`: calibrate and write the artifact (and a TOML summary beside it).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use fqvit_calib::artifact::{self, CalibrationData, Provenance, SiteInfo};
use fqvit_calib::{calibrate, calibration_set};
use fqvit_models::{QParamTable, Quantizable};
use serde::Serialize;

use crate::cli::QuantizeArgs;
use crate::commands::shared::{load_model, progress, provenance};

pub(crate) fn run(args: QuantizeArgs) -> Result<()> {
    let mut exp = crate::config::resolve_quantize(&args.quant)?;
    exp.quant = true;
    exp.validate()?;
    if exp.float_sites.has(fqvit_models::SiteGroup::Weights) {
        anyhow::bail!(
            "--float-sites weights: an artifact carries int8 weights; evaluate with `eval --quant --float-sites weights` instead"
        );
    }
    crate::output::check_writable(&args.output, "-o")?;
    crate::output::check_writable(&args.output.with_extension("toml"), "-o (its .toml summary)")?;
    let loaded = load_model(&args.model)?;
    let weights = loaded
        .weights
        .as_ref()
        .context("quantize needs float weights (--weights or --weights-dir)")?;
    let folder = calibration_set(&args.model.data, &exp)?;
    let bar = progress(folder.samples().len(), "calibrating");
    let (table, stats) = calibrate(&*loaded.model, &folder, &exp, loaded.device, &bar)?;
    bar.finish_and_clear();
    let start = Instant::now();
    let sha = fqvit_models::weights::sha256_file(weights)?;
    let prov =
        provenance(loaded.name, &*loaded.model, sha, &exp, &table, &args.model.data, stats.images)?;
    artifact::write(&args.output, &*loaded.model, &loaded.vs, &table, &prov)?;
    let summary = args.output.with_extension("toml");
    write_summary(&summary, &*loaded.model, &table, &prov)?;
    let size = std::fs::metadata(&args.output).map_or(0, |m| m.len());
    println!(
        "calibrated {} ({}) on {} images in {:.1} s",
        prov.model,
        exp.label(),
        stats.images,
        stats.seconds
    );
    println!(
        "wrote {} ({:.2} MB) and {} in {:.2} s",
        args.output.display(),
        size as f64 / 1e6,
        summary.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The per-site scalars for people diffing two calibrations.
#[derive(Serialize)]
struct Summary<'a> {
    model: &'a str,
    weights_sha256: &'a str,
    format_version: u32,
    created_unix: u64,
    experiment: &'a fqvit_calib::Experiment,
    calibration: &'a CalibrationData,
    site: Vec<SiteSummary<'a>>,
}

/// A site as the provenance describes it, with its parameters.
#[derive(Serialize)]
struct SiteSummary<'a> {
    #[serde(flatten)]
    info: &'a SiteInfo,
    scale: &'a [f32],
    zero_point: &'a [i32],
    #[serde(skip_serializing_if = "Option::is_none")]
    ptf_factor: Option<Vec<u8>>,
}

fn write_summary(
    path: &Path,
    model: &dyn Quantizable,
    table: &QParamTable,
    prov: &Provenance,
) -> Result<()> {
    let sites = model.sites();
    let site = prov
        .sites
        .iter()
        .filter_map(|info| {
            let p = table.get(sites.iter().find(|(_, s)| s.name == info.name)?.0)?;
            Some(SiteSummary {
                info,
                scale: &p.scale,
                zero_point: &p.zero_point,
                ptf_factor: p.ptf.as_ref().map(|f| f.iter().map(|f| f.get()).collect()),
            })
        })
        .collect();
    let summary = Summary {
        model: &prov.model,
        weights_sha256: &prov.weights_sha256,
        format_version: prov.format_version,
        created_unix: prov.created_unix,
        experiment: &prov.experiment,
        calibration: &prov.calibration,
        site,
    };
    let text = toml::to_string(&summary).context("formatting the summary")?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The summary's sites carry the provenance's fields and their parameters, in TOML.
    #[test]
    fn a_site_summary_is_the_provenance_site_and_its_parameters() {
        let info = SiteInfo {
            name: "blocks.0.residual1".into(),
            original: "blocks.0.qact2".into(),
            class: fqvit_ops::TensorClass::LayerNormInput,
            bit_type: "uint8".into(),
            bits: 8,
            signed: false,
            observer: "ptf".into(),
            granularity: "channel-wise".into(),
            channels: 2,
            ptf: true,
        };
        #[derive(Serialize)]
        struct One<'a> {
            site: Vec<SiteSummary<'a>>,
        }
        let site = vec![SiteSummary {
            info: &info,
            scale: &[0.5, 1.0],
            zero_point: &[3],
            ptf_factor: Some(vec![0, 1]),
        }];
        let text = toml::to_string(&One { site }).unwrap();
        for line in [
            "name = \"blocks.0.residual1\"",
            "class = \"layer-norm-input\"",
            "bits = 8",
            "scale = [0.5, 1.0]",
            "ptf_factor = [0, 1]",
        ] {
            assert!(text.contains(line), "{text}\n  lacks {line}");
        }
    }
}
