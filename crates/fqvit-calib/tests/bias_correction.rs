//! Bias correction (fqvit+): each linear layer's bias absorbs its weights' expected rounding
//! error at the layer's mean calibration input, and nothing else changes.

mod common;

use common::tiny::perturbed_deit;
use fqvit_calib::Calibrator;
use fqvit_calib::calibrate::correct_biases;
use fqvit_calib::experiment::Experiment;
use fqvit_models::{Layer, QParamTable, Quantizable, vit};
use fqvit_tensor::{Axis, Quantizer};
use tch::{Device, Kind, Tensor};

/// Calibrates on three random batches; returns the table and the mean inputs.
fn calibrate(
    model: &vit::Vit,
    exp: &Experiment,
) -> (QParamTable, Vec<(fqvit_models::SiteId, Tensor)>) {
    let batches: Vec<Tensor> = fqvit_testkit::seeded(9, || {
        (0..3).map(|_| Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu))).collect()
    });
    let mut sink = Calibrator::new(model.sites(), exp).unwrap();
    for (i, batch) in batches.iter().enumerate() {
        sink.batch(model, batch, i + 1 == batches.len(), exp.quant_options()).unwrap();
    }
    let means = sink.input_means();
    (sink.freeze().unwrap(), means)
}

#[test]
fn each_bias_absorbs_its_weights_rounding_at_the_mean_input() {
    let exp = Experiment { weight_bits: 4, bias_correction: true, ..Experiment::default() };
    let (_vs, model) = perturbed_deit();
    let before: Vec<(fqvit_models::SiteId, Tensor)> = model
        .layers()
        .into_iter()
        .filter_map(|l| match l {
            Layer::Linear(l) => Some((l.site(), model.bias(l.site())?.copy())),
            _ => None,
        })
        .collect();
    let (table, means) = calibrate(&model, &exp);
    assert_eq!(means.len(), before.len(), "one mean per linear layer");
    let (plain, none) = calibrate(&model, &Experiment { bias_correction: false, ..exp });
    assert!(none.is_empty(), "no statistics without bias correction");
    assert_eq!(plain, table, "the correction changes biases only, not the calibration");

    correct_biases(&model, &table, &means).unwrap();
    for ((site, b0), (mean_site, mean)) in before.iter().zip(&means) {
        assert_eq!(site, mean_site);
        let name = &model.sites().get(*site).name;
        let w = model.weight(*site).unwrap();
        let fq = Quantizer::new(table.get(*site).unwrap(), Axis::First, Device::Cpu).fake_quant(w);
        let b = model.bias(*site).unwrap();
        assert!(!b.equal(b0), "{name}: bias unchanged");
        // The mean output is the float layer's: Ŵ·m + b' = W·m + b0, evaluated in float64.
        // What separates them: b' is stored in float32 (half an ulp, 2^-24·|b'|), and Ŵ − W is
        // formed in float32 before the float64 product (2^-24 of each |Ŵ − W|·|m| term).
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        let quantized = d(&fq).mv(mean) + d(b);
        let float = d(w).mv(mean) + d(b0);
        let bound = (d(b).abs() + d(&(&fq - w)).abs().mv(&mean.abs())) * 2f64.powi(-24) + 1e-12;
        let excess = ((&quantized - &float).abs() - &bound).max().double_value(&[]);
        assert!(excess <= 0.0, "{name}: mean outputs differ by {excess:e} past the rounding bound");
    }
}

#[test]
fn bias_correction_with_float_weights_is_refused() {
    let exp = Experiment {
        bias_correction: true,
        float_sites: [fqvit_models::SiteGroup::Weights].into_iter().collect(),
        ..Experiment::default()
    };
    let err = exp.validate().unwrap_err().to_string();
    assert!(err.contains("bias-correction") && err.contains("float-sites"), "{err}");
}

#[test]
fn a_non_finite_correction_is_refused_naming_the_site() {
    let exp = Experiment { bias_correction: true, ..Experiment::default() };
    let (_vs, model) = perturbed_deit();
    let (table, mut means) = calibrate(&model, &exp);
    let (site, mean) = &mut means[1];
    let _ = mean.fill_(f64::NAN);
    let name = model.sites().get(*site).name.clone();
    let biases = |model: &vit::Vit| -> Vec<Tensor> {
        means.iter().map(|(s, _)| model.bias(*s).unwrap().copy()).collect()
    };
    let before = biases(&model);
    let err = correct_biases(&model, &table, &means).unwrap_err().to_string();
    assert!(err.contains("bias correction failed at site") && err.contains(&name), "{err}");
    let after = biases(&model);
    assert!(
        before.iter().zip(&after).all(|(a, b)| a.equal(b)),
        "a bias changed before the refusal"
    );
}
