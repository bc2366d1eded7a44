//! Resolving the experiment: built-in default < TOML file < command-line flags.
//!
//! Without `--config` the base is the original's command line without flags (full precision);
//! with it, the base is the paper's setting overlaid with the file.

use anyhow::{Context, Result};
use fqvit_calib::Experiment;
use fqvit_calib::experiment::{CalibOrder, Method, StdSqrt};

use crate::cli::{MethodArg, OrderArg, QuantArgs, SqrtArg};

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
        exp.quant_method = match m {
            MethodArg::Minmax => Method::Minmax,
            MethodArg::Ema => Method::Ema,
            MethodArg::Percentile => Method::Percentile,
            MethodArg::Omse => Method::Omse,
        };
    }
    if let Some(bits) = &args.attn_bits {
        exp.attn_bits = bits.parse().context("--attn-bits")?;
    }
    if let Some(sqrt) = args.layer_norm_sqrt {
        exp.layer_norm_sqrt = match sqrt {
            SqrtArg::Libtorch => StdSqrt::Libtorch,
            SqrtArg::Exact => StdSqrt::Exact,
        };
    }
    let cal = &mut exp.calibration;
    cal.batch_size = args.calib_batchsize.unwrap_or(cal.batch_size);
    cal.iterations = args.calib_iter.unwrap_or(cal.iterations);
    cal.seed = args.seed.unwrap_or(cal.seed);
    if let Some(order) = args.calib_order {
        cal.order = match order {
            OrderArg::Shuffled => CalibOrder::Shuffled,
            OrderArg::Sorted => CalibOrder::Sorted,
        };
    }
    let needs_quant: Vec<&str> = [
        ("--quant-method", args.quant_method.is_some()),
        ("--attn-bits", args.attn_bits.is_some()),
        ("--layer-norm-sqrt", args.layer_norm_sqrt.is_some()),
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
