//! `--float-sites`: a site group left in float passes its tensors through unchanged, the
//! LayerNorm or softmax whose site it is runs in float, and every other site stays quantized
//! (the shared ViT-Tiny with the original's parameters).

mod common;

use std::collections::HashMap;

use fqvit_calib::Experiment;
use fqvit_models::{
    Mode, Probe, QuantOptions, Quantizable, Quantized, SiteGroup, SiteGroups, TensorClass,
};
use tch::{Kind, Tensor};

/// Keeps the first input and output of every module.
#[derive(Default)]
struct Record(HashMap<String, (Tensor, Option<Tensor>)>);

impl Probe for Record {
    fn input(&mut self, module: &str, index: usize, xs: &Tensor) -> Option<Tensor> {
        if index == 0 && !self.0.contains_key(module) {
            self.0.insert(module.to_owned(), (xs.copy(), None));
        }
        None
    }
    fn output(&mut self, module: &str, ys: &Tensor) -> Option<Tensor> {
        if let Some((_, out @ None)) = self.0.get_mut(module) {
            *out = Some(ys.copy());
        }
        None
    }
}

#[test]
fn float_site_groups_pass_through_and_the_rest_stays_quantized() {
    let (vs, model) = common::vit_tiny();
    let groups: SiteGroups =
        [SiteGroup::MlpOut, SiteGroup::Residual, SiteGroup::AttnProbs, SiteGroup::Weights]
            .into_iter()
            .collect();
    let options = QuantOptions { float_sites: groups, ..Experiment::default().quant_options() };
    let q = Quantized::new(&model, common::golden_vit_tiny_table(&model), options).unwrap();
    let x = fqvit_testkit::seeded(3, || {
        Tensor::randn([2, 3, 224, 224], (Kind::Float, tch::Device::Cpu))
    });
    let mut record = Record::default();
    let _ = tch::no_grad(|| {
        model.forward(&x, &mut Mode::Quantized { state: &q, probe: Some(&mut record) })
    });
    let io = |module: &str| {
        let (i, o) = &record.0[module];
        (i.shallow_clone(), o.as_ref().expect("an output").shallow_clone())
    };
    let (mut float, mut quantized, mut activations) = (0, 0, 0);
    for (_, site) in model.sites().iter() {
        if site.class == TensorClass::Weight {
            continue;
        }
        let (i, o) = io(&site.original);
        let same = i.equal(&o);
        activations += usize::from(site.class == TensorClass::Activation);
        if groups.contains(site) && site.class != TensorClass::Softmax {
            assert!(same, "{} is left in float", site.name);
            float += 1;
        } else if site.class == TensorClass::Activation {
            assert!(!same, "{} stays quantized", site.name);
            quantized += 1;
        }
    }
    assert_eq!(float, 12 + 25, "12 fc2 outputs and 25 residual sites");
    assert_eq!(quantized, activations - 12, "every other activation site");
    // The softmax is float (no Log-Int-Softmax), and so is the LayerNorm after a float residual.
    let (scores, probs) = io("blocks.0.attn.log_int_softmax");
    assert!(probs.allclose(&scores.softmax(-1, Kind::Float), 0.0, 0.0, false));
    let (ln_in, ln_out) = io("blocks.0.norm2");
    let ln = tch::no_grad(|| {
        let w = &vs.variables()["blocks.0.norm2.weight"];
        let b = &vs.variables()["blocks.0.norm2.bias"];
        ln_in.layer_norm([192], Some(w), Some(b), 1e-6, false)
    });
    assert!(ln_out.equal(&ln), "the LayerNorm after a float residual is float");
}

#[test]
fn the_groups_name_the_sites_the_original_groups() {
    let (_vs, model) = common::vit_tiny();
    let count = |g: SiteGroup| model.sites().iter().filter(|(_, s)| g.contains(s)).count();
    let expect = [
        (SiteGroup::Weights, 50),
        (SiteGroup::Residual, 25),
        (SiteGroup::NormOut, 25),
        (SiteGroup::QkvOut, 12),
        (SiteGroup::AttnScores, 12),
        (SiteGroup::AttnProbs, 12),
        (SiteGroup::Context, 12),
        (SiteGroup::ProjOut, 12),
        (SiteGroup::MlpHidden, 12),
        (SiteGroup::MlpOut, 12),
        (SiteGroup::Logits, 1),
    ];
    for (g, n) in expect {
        assert_eq!(count(g), n, "{g}");
    }
    for (_, site) in model.sites().iter() {
        let n = SiteGroup::ALL.iter().filter(|g| g.contains(site)).count();
        assert!(n <= 1, "{} is in {n} groups", site.name);
    }
    assert_eq!("mlp-out".parse(), Ok(SiteGroup::MlpOut));
    assert!("fc2".parse::<SiteGroup>().unwrap_err().contains("known: weights, residual"));
}

/// Calibrates `model` with `exp` on two seeded batches of two random images.
fn calibrate(model: &fqvit_models::vit::Vit, exp: &Experiment) -> fqvit_models::QParamTable {
    let mut sink = fqvit_calib::Calibrator::new(model.sites(), exp).unwrap();
    let batches = fqvit_testkit::seeded(5, || {
        [0, 1].map(|_| Tensor::randn([2, 3, 224, 224], (Kind::Float, tch::Device::Cpu)))
    });
    for (last, x) in [false, true].into_iter().zip(batches) {
        sink.set_last_batch(last);
        let options = exp.quant_options();
        let _ =
            tch::no_grad(|| model.forward(&x, &mut Mode::Calibrate { sink: &mut sink, options }));
    }
    sink.freeze().unwrap()
}

#[test]
fn ptf_site_groups_calibrate_with_power_of_two_factors() {
    let (_vs, model) = common::vit_tiny();
    let exp = Experiment {
        ptf_sites: [SiteGroup::MlpOut].into_iter().collect(),
        calibration: fqvit_calib::experiment::Calibration {
            batch_size: 2,
            iterations: 2,
            ..Default::default()
        },
        ..Experiment::default()
    };
    let table = calibrate(&model, &exp);
    for (id, site) in model.sites().iter() {
        let Some(p) = table.get(id) else { continue };
        let ptf = p.ptf.is_some();
        let expect = SiteGroup::MlpOut.contains(site) || site.class == TensorClass::LayerNormInput;
        assert_eq!(ptf, expect, "{}", site.name);
        if SiteGroup::MlpOut.contains(site) {
            assert_eq!(p.scale.len(), site.channels, "{}: a scale per channel", site.name);
        }
    }
    // It runs quantized, and the groups that have no plain PTF form are refused.
    Quantized::new(&model, table, exp.quant_options()).unwrap();
    for g in [SiteGroup::Weights, SiteGroup::Residual, SiteGroup::AttnScores, SiteGroup::AttnProbs]
    {
        let bad = Experiment { ptf_sites: [g].into_iter().collect(), ..Experiment::default() };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains(&format!("ptf-sites = {g}")), "{err}");
    }
}

/// `residual-bits`: the LayerNorm inputs get codes of that width with PTF factors capped at
/// `15 − bits`, every other activation keeps its bytes, and the quantized forward runs the
/// integer LayerNorm on the wide codes (every square root, the integer one included).
#[test]
fn a_wider_residual_stream_calibrates_and_runs_on_its_grid() {
    use fqvit_calib::experiment::{Calibration, StdSqrt};
    let (_vs, model) = common::vit_tiny();
    let exp = Experiment {
        residual_bits: Some(12),
        ptf_max_factor: fqvit_ops::PtfFactor::MAX,
        ptf_sites: [SiteGroup::MlpOut].into_iter().collect(),
        calibration: Calibration { batch_size: 2, iterations: 2, ..Default::default() },
        ..Experiment::default()
    };
    exp.validate().unwrap();
    assert!(exp.label().contains("(residual 12-bit)"), "{}", exp.label());
    let table = calibrate(&model, &exp);
    let mut residual = Vec::new();
    for (id, site) in model.sites().iter() {
        let Some(p) = table.get(id) else { continue };
        let bits = p.bit_type.bits.get();
        let max_factor = p.ptf.iter().flatten().map(|f| f.get()).max();
        match site.class {
            TensorClass::LayerNormInput => {
                assert_eq!(bits, 12, "{}", site.name);
                assert!(max_factor.is_some_and(|a| a <= 3), "{}: {max_factor:?}", site.name);
                residual.push((site.original.clone(), p.clone()));
            }
            TensorClass::Weight => assert_eq!(bits, 8, "{}", site.name),
            _ => {
                assert_eq!(bits, 8, "{}", site.name);
                if SiteGroup::MlpOut.contains(site) {
                    assert!(max_factor.is_some_and(|a| a <= 7), "{}", site.name);
                }
            }
        }
    }
    assert_eq!(residual.len(), 25);
    let x = fqvit_testkit::seeded(3, || {
        Tensor::randn([2, 3, 224, 224], (Kind::Float, tch::Device::Cpu))
    });
    for sqrt in StdSqrt::ALL {
        let options = Experiment { layer_norm_sqrt: sqrt, ..exp }.quant_options();
        let q = Quantized::new(&model, table.clone(), options).unwrap();
        let mut record = Record::default();
        let logits = tch::no_grad(|| {
            model.forward(&x, &mut Mode::Quantized { state: &q, probe: Some(&mut record) })
        });
        assert!(bool::try_from(logits.isfinite().all()).unwrap(), "{}", sqrt.as_str());
        // The residual sites' outputs are on their 12-bit grids, using more than 256 codes.
        for (module, p) in &residual {
            let (_, out) = &record.0[module];
            let out = out.as_ref().expect("an output");
            let q = fqvit_tensor::Quantizer::new(p, fqvit_tensor::Axis::Last, tch::Device::Cpu);
            let codes = q.codes(out);
            assert!(q.fake_quant(out).equal(out), "{module}: on its grid");
            let (lo, hi) = (codes.min().int64_value(&[]), codes.max().int64_value(&[]));
            assert!(lo >= 0 && hi <= 4095, "{module}: codes {lo}..={hi}");
            assert!(hi - lo > 255, "{module}: codes {lo}..={hi} span more than a byte");
        }
    }
    for (bad, needle) in [
        (
            Experiment { residual_bits: Some(16), ..exp },
            "residual-bits = 16: 16 bits is out of range",
        ),
        (
            Experiment { activation_bits: 9, ..exp },
            "activation-bits = 9: codes stored in bytes are 2..=8",
        ),
    ] {
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
}
