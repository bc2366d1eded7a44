//! Resolving the experiment: built-in default < TOML file < command-line flags.
//!
//! Without `--config` the base is the original's command line without flags (full precision);
//! with it, the base is the paper's setting overlaid with the file.

use anyhow::{Context, Result};
use fqvit_calib::Experiment;

use crate::cli::QuantArgs;

pub(crate) fn resolve(args: &QuantArgs) -> Result<Experiment> {
    resolve_with(args, false)
}

/// For `quantize`, which quantizes without `--quant`.
pub(crate) fn resolve_quantize(args: &QuantArgs) -> Result<Experiment> {
    resolve_with(args, true)
}

fn resolve_with(args: &QuantArgs, quant: bool) -> Result<Experiment> {
    let mut exp = match &args.config {
        None => Experiment::full_precision(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
    };
    exp.quant |= args.quant || quant;
    exp.ptf |= args.ptf;
    exp.lis |= args.lis;
    if let Some(m) = args.quant_method {
        exp.quant_method = m;
    }
    if let Some(m) = args.weight_method {
        exp.weight_method = m;
    }
    if let Some(r) = args.weight_rounding {
        exp.weight_rounding = r;
    }
    exp.bias_correction |= args.bias_correction;
    exp.reparam_norm_out |= args.reparam_norm_out;
    if let Some(bits) = args.attn_bits {
        anyhow::ensure!(
            exp.lis,
            "--attn-bits needs --lis: it is the width of Log-Int-Softmax's codes (without LIS the \
             softmax is uniform at the activation bits)"
        );
        exp.attn_bits = bits;
    }
    if let Some(shift) = args.lis_exp_shift {
        anyhow::ensure!(
            exp.lis,
            "--lis-exp-shift needs --lis: it refines Log-Int-Softmax's integer exponential"
        );
        exp.lis_exp_shift = shift;
    }
    if let Some(sqrt) = args.layer_norm_sqrt {
        exp.layer_norm_sqrt = sqrt;
    }
    if let Some(input) = args.lis_input {
        exp.lis_input = input;
    }
    if !args.float_sites.is_empty() {
        exp.float_sites = args.float_sites.iter().copied().collect();
    }
    if !args.ptf_sites.is_empty() {
        exp.ptf_sites = args.ptf_sites.iter().copied().collect();
    }
    if let Some(bits) = args.residual_bits {
        exp.residual_bits = Some(bits);
    }
    if let Some(k) = args.ptf_max_factor {
        exp.ptf_max_factor = k;
    }
    if let Some(range) = args.ptf_range {
        exp.ptf_range = range;
    }
    let cal = &mut exp.calibration;
    cal.batch_size = args.calib_batchsize.unwrap_or(cal.batch_size);
    cal.iterations = args.calib_iter.unwrap_or(cal.iterations);
    cal.seed = args.seed.unwrap_or(cal.seed);
    cal.holdout = args.holdout.unwrap_or(cal.holdout);
    if let Some(order) = args.calib_order {
        cal.order = order;
    }
    let needs_quant: Vec<&str> = [
        ("--quant-method", args.quant_method.is_some()),
        ("--weight-method", args.weight_method.is_some()),
        ("--weight-rounding", args.weight_rounding.is_some()),
        ("--bias-correction", args.bias_correction),
        ("--reparam-norm-out", args.reparam_norm_out),
        ("--attn-bits", args.attn_bits.is_some()),
        ("--lis-exp-shift", args.lis_exp_shift.is_some()),
        ("--layer-norm-sqrt", args.layer_norm_sqrt.is_some()),
        ("--lis-input", args.lis_input.is_some()),
        ("--float-sites", !args.float_sites.is_empty()),
        ("--ptf-sites", !args.ptf_sites.is_empty()),
        ("--ptf-max-factor", args.ptf_max_factor.is_some()),
        ("--residual-bits", args.residual_bits.is_some()),
        ("--ptf-range", args.ptf_range.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, given)| given.then_some(flag))
    .collect();
    if !exp.quant && !needs_quant.is_empty() {
        let verb = if needs_quant.len() == 1 { "needs" } else { "need" };
        anyhow::bail!(
            "{} {verb} --quant: without it the model runs in full precision",
            needs_quant.join(" and ")
        );
    }
    exp.validate().map_err(|e| {
        anyhow::anyhow!("{}", e.to_string().replace("invalid calibration settings: ", ""))
    })?;
    tracing::debug!(?exp, "resolved experiment");
    Ok(exp)
}

#[cfg(test)]
mod tests {
    use fqvit_calib::Experiment;

    /// Every shipped preset parses, validates and means what its name says.
    #[test]
    fn every_config_in_configs_is_a_valid_experiment() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let exp: Experiment =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            exp.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            assert!(exp.quant, "{name}");
            let bits = if name.ends_with("_4") { 4 } else { 8 };
            assert!(!exp.lis || exp.attn_bits.get() == bits, "{name}");
            if name.starts_with("fqvit_plus") {
                assert_eq!(
                    exp.ptf_sites,
                    [fqvit_models::SiteGroup::MlpHidden, fqvit_models::SiteGroup::MlpOut]
                        .into_iter()
                        .collect(),
                    "{name}"
                );
                assert!(
                    exp.ptf && exp.lis && exp.float_sites.is_empty(),
                    "{name}: fully quantized"
                );
                assert_eq!(exp.ptf_max_factor, fqvit_ops::PtfFactor::MAX, "{name}");
                assert_eq!(exp.ptf_range, fqvit_calib::experiment::PtfRange::Symmetric, "{name}");
            }
            seen += 1;
        }
        assert!(seen >= 6, "{seen} configs");
    }

    /// A setting read from flags and from TOML is spelled the same in both: clap's names of the
    /// library's variants equal serde's, and the names the library prints.
    #[test]
    fn flags_and_configs_spell_every_value_alike() {
        use clap::ValueEnum;
        use fqvit_calib::eval::Ties;
        use fqvit_calib::experiment::{
            CalibOrder, LisInput, Method, PtfRange, StdSqrt, WeightMethod, WeightRounding,
        };

        fn check<T: ValueEnum + serde::Serialize>() -> Vec<String> {
            T::value_variants()
                .iter()
                .map(|v| {
                    let flag = crate::cli::flag_value(v);
                    assert_eq!(serde_json::to_value(v).unwrap(), flag.as_str(), "{flag}");
                    flag
                })
                .collect()
        }
        assert_eq!(check::<Method>(), ["minmax", "ema", "percentile", "omse"]);
        assert_eq!(check::<WeightMethod>(), ["minmax", "omse"]);
        assert_eq!(check::<WeightRounding>(), ["nearest", "gptq"]);
        assert_eq!(check::<CalibOrder>(), ["shuffled", "sorted"]);
        assert_eq!(check::<Ties>(), ["torch", "lower-index"]);
        assert_eq!(check::<LisInput>(), ["float", "rounded"]);
        assert_eq!(check::<PtfRange>(), PtfRange::ALL.map(PtfRange::as_str));
        assert_eq!(check::<StdSqrt>(), StdSqrt::ALL.map(StdSqrt::as_str));
    }
}
