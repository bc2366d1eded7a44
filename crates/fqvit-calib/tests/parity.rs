//! Calibration parity with the original: the shared ViT-Tiny, `--quant --ptf --lis
//! --quant-method minmax`, calibrated on `imagenet-sample/train` in sorted order, against
//! `../shared/golden/vit_tiny_minmax_ptf_lis_qparams.json` site by site.

mod common;

use fqvit_calib::experiment::CalibOrder;
use fqvit_calib::{Experiment, calibrate, calibration_set};
use fqvit_models::Quantizable;
use indicatif::ProgressBar;

#[test]
fn calibrated_parameters_match_the_original_site_by_site() {
    let (_vs, model) = common::vit_tiny();
    let mut exp = Experiment::default();
    exp.calibration.order = CalibOrder::Sorted;
    let folder = calibration_set(&common::sample_dir(), &exp).unwrap();
    let (table, _) =
        calibrate(&model, &folder, &exp, tch::Device::Cpu, &ProgressBar::hidden()).unwrap();
    let path = common::shared_dir().join("golden/vit_tiny_minmax_ptf_lis_qparams.json");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let golden = &golden["qparams"];
    let (mut checked, mut worst, mut factor_total, mut factor_equal, mut exact_sites) =
        (0, (0f64, String::new()), 0, 0, 0);
    let mut failures = Vec::new();
    for (id, site) in model.sites().iter() {
        let Some(params) = table.get(id) else {
            assert!(
                golden.get(&site.original).is_none(),
                "{} has golden parameters but we froze none",
                site.name
            );
            continue;
        };
        let g = golden
            .get(&site.original)
            .unwrap_or_else(|| panic!("no golden entry {} for {}", site.original, site.name));
        let as_vec = |v: &serde_json::Value| -> Vec<f64> {
            match v {
                serde_json::Value::Array(a) => a.iter().map(|x| x.as_f64().unwrap()).collect(),
                x => vec![x.as_f64().unwrap()],
            }
        };
        let (gs, gz) = (as_vec(&g["scale"]), as_vec(&g["zero_point"]));
        assert_eq!(gs.len(), params.scale.len(), "{}: scale count", site.name);
        for (c, (&ours, &theirs)) in params.scale.iter().zip(&gs).enumerate() {
            // A PTF channel whose factor differs (a near-tie of the MSE search) is counted by the
            // factor criterion below; its base scale s8/8 is what must agree.
            let (ours, theirs) = match &params.ptf {
                Some(f) => {
                    let base = f64::from(ours) / f64::from(f[c].multiplier());
                    let golden_multiplier = (theirs / base).round().max(1.0);
                    (base as f32, theirs / golden_multiplier)
                }
                None => (ours, theirs),
            };
            let rel = (f64::from(ours) - theirs).abs() / theirs.abs().max(1e-30);
            if rel > worst.0 {
                worst = (
                    rel,
                    format!("{} ({}) channel {c}: {ours} vs {theirs}", site.name, site.original),
                );
            }
            if rel > 0.005 {
                failures.push(format!(
                    "{} ({}) channel {c}: scale {ours} vs {theirs} ({:.3} %)",
                    site.name,
                    site.original,
                    rel * 100.0
                ));
            }
        }
        for (&ours, &theirs) in params.zero_point.iter().zip(&gz) {
            if (f64::from(ours) - theirs).abs() > 1.0 {
                failures.push(format!("{}: zero point {ours} vs {theirs}", site.name));
            }
        }
        if let Some(factors) = &params.ptf {
            // The golden factor of a channel: its scale over our PTF base s8/8.
            let base = f64::from(params.scale[0]) / f64::from(factors[0].multiplier());
            for (f, &s) in factors.iter().zip(&gs) {
                factor_total += 1;
                factor_equal += usize::from(f64::from(f.multiplier()) == (s / base).round());
            }
        }
        let exact = params.scale.iter().zip(&gs).all(|(&a, &b)| a == b as f32);
        exact_sites += usize::from(exact);
        if !exact {
            let rel = params
                .scale
                .iter()
                .zip(&gs)
                .map(|(&a, &b)| ((f64::from(a) - b) / b).abs())
                .fold(0f64, f64::max);
            println!(
                "  {} ({}): max relative scale difference {rel:.2e}",
                site.name, site.original
            );
        }
        checked += 1;
    }
    println!(
        "{checked} sites checked; worst relative scale difference {:.4} % at {}",
        worst.0 * 100.0,
        worst.1
    );
    println!(
        "PTF factors equal on {factor_equal} of {factor_total} channels; {exact_sites} of {checked} sites have bit-identical scales"
    );
    assert_eq!(checked, 176, "every site of the golden file");
    assert!(
        failures.is_empty(),
        "{} scale/zero-point mismatches:\n{}",
        failures.len(),
        failures[..failures.len().min(30)].join("\n")
    );
    assert!(
        factor_equal * 100 >= factor_total * 98,
        "PTF factors equal on only {factor_equal} of {factor_total}"
    );
}
