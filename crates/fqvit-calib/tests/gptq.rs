//! GPTQ weight rounding (fqvit+): every linear layer's weights (and the patch convolution's)
//! become codes of the grids the weight observer froze, chosen from the layer's inputs in the
//! quantized forward, with a smaller output error than the nearest codes; the integer engine
//! runs them as any codes.

mod common;

use common::tiny::{calibrated, engine_follows_simulation, integer_twin, perturbed_deit};
use fqvit_calib::Calibrator;
use fqvit_calib::experiment::{Experiment, WeightRounding};
use fqvit_calib::gptq::{LinearInputs, round_weights};
use fqvit_models::{Layer, QParamTable, Quantizable, Quantized, SiteId, vit};
use fqvit_tensor::{Axis, Quantizer};
use tch::{Device, Kind, Tensor};

/// Calibrates on three random batches; returns the table and each linear layer's gram matrix
/// of its inputs in the quantized forward.
fn calibrate(model: &vit::Vit, exp: &Experiment) -> (QParamTable, Vec<(SiteId, Tensor)>) {
    let batches: Vec<Tensor> = fqvit_testkit::seeded(9, || {
        (0..3).map(|_| Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu))).collect()
    });
    let mut sink = Calibrator::new(model.sites(), exp).unwrap();
    for (i, batch) in batches.iter().enumerate() {
        sink.batch(model, batch, i + 1 == batches.len(), exp.quant_options()).unwrap();
    }
    let table = sink.freeze().unwrap();
    let state = Quantized::new(model, table.clone(), exp.quant_options()).unwrap();
    let mut inputs = LinearInputs::new(model);
    for batch in &batches {
        inputs.batch(model, &state, batch);
    }
    (table, inputs.grams())
}

fn gptq() -> Experiment {
    Experiment { weight_bits: 4, weight_rounding: WeightRounding::Gptq, ..Experiment::default() }
}

#[test]
fn each_linear_layer_takes_codes_of_its_grid_with_less_output_error() {
    let (_vs, model) = perturbed_deit();
    let (table, grams) = calibrate(&model, &gptq());
    let linears = model
        .layers()
        .into_iter()
        .filter(|l| matches!(l, Layer::Linear(_) | Layer::Conv2d(_)))
        .count();
    assert_eq!(grams.len(), linears, "one gram matrix per linear layer and the patch conv");
    let rounded = round_weights(&model, &table, &grams).unwrap();
    assert_eq!(rounded.len(), linears);
    let (mut e_near, mut e_gptq) = (0.0, 0.0);
    for ((site, wq), (gram_site, h)) in rounded.iter().zip(&grams) {
        assert_eq!(site, gram_site);
        let name = &model.sites().get(*site).name;
        let w = model.weight(*site).unwrap();
        let quantizer = Quantizer::new(table.get(*site).unwrap(), Axis::First, Device::Cpu);
        // A fixed point of the quantizer: the quantized forward, bias correction and the
        // artifact read exactly these codes.
        assert!(quantizer.fake_quant(wq).equal(wq), "{name}: not codes of the grid");
        let error = |wq: &Tensor| {
            // The patch convolution's weight as the matrix of its patches.
            let d = (wq - w).to_kind(Kind::Double).reshape([w.size()[0], -1]);
            (d.mm(h) * &d).sum(Kind::Double).double_value(&[])
        };
        e_near += error(&quantizer.fake_quant(w));
        e_gptq += error(wq);
    }
    assert!(e_gptq < e_near, "gptq {e_gptq:e} against nearest {e_near:e}");
}

#[test]
fn gptq_with_float_weights_is_refused() {
    let exp = Experiment {
        float_sites: [fqvit_models::SiteGroup::Weights].into_iter().collect(),
        ..gptq()
    };
    let err = exp.validate().unwrap_err().to_string();
    assert!(err.contains("weight-rounding = gptq") && err.contains("float-sites"), "{err}");
}

#[test]
fn non_finite_inputs_are_refused_naming_the_site() {
    let (_vs, model) = perturbed_deit();
    let (table, mut grams) = calibrate(&model, &gptq());
    let (site, h) = &mut grams[2];
    let _ = h.fill_(f64::NAN);
    let name = model.sites().get(*site).name.clone();
    let err = round_weights(&model, &table, &grams).unwrap_err().to_string();
    assert!(err.contains("gptq weight rounding failed at site") && err.contains(&name), "{err}");
    assert!(err.contains("not finite"), "{err}");
}

/// Through `calibrate_on` (the passes `quantize` runs), the model's linear weights become
/// fixed points of their quantizers, so the artifact holds GPTQ's codes; the engine runs that
/// artifact as its twin simulation does, by the bounds of
/// `engine_logits_follow_the_simulation_for_deit_and_vit` (tests/engine.rs).
#[test]
fn the_engine_runs_gptq_codes_as_the_simulation() {
    let dir = tempfile::tempdir().unwrap();
    let exp = Experiment { weight_rounding: WeightRounding::Gptq, ..integer_twin() };
    let c = calibrated(dir.path(), false, exp);
    for layer in c.model.layers() {
        let site = match layer {
            Layer::Linear(l) => l.site(),
            Layer::Conv2d(conv) => conv.site(),
            _ => continue,
        };
        let w = c.model.weight(site).unwrap();
        let p = c.quantized.table().get(site).unwrap();
        let fq = Quantizer::new(p, Axis::First, Device::Cpu).fake_quant(w);
        assert!(fq.equal(w), "{}: not rounded", c.model.sites().get(site).name);
    }
    engine_follows_simulation(&c);
}

/// The patch convolution's inputs are unfolded into its patches; an image side that is not a
/// whole number of patches loses only the pixels the strided convolution never reads (no
/// panic on the reshape).
#[test]
fn patches_past_the_last_whole_one_are_left_out() {
    use fqvit_models::Probe;
    let (_vs, model) = perturbed_deit();
    let (module, k) = model
        .layers()
        .into_iter()
        .find_map(|l| match l {
            Layer::Conv2d(c) => Some((model.sites().get(c.site()).original.clone(), c.stride())),
            _ => None,
        })
        .expect("a patch convolution");
    let whole = fqvit_testkit::seeded(3, || {
        Tensor::randn([2, 3, 4 * k + 3, 2 * k + 1], (Kind::Float, Device::Cpu))
    });
    let cropped = whole.narrow(2, 0, 4 * k).narrow(3, 0, 2 * k);
    let gram = |x: &Tensor| {
        let mut inputs = LinearInputs::new(&model);
        let _ = inputs.input(&module, 0, x);
        inputs.grams().into_iter().next().expect("the convolution's").1
    };
    assert!(gram(&whole).equal(&gram(&cropped)));
}
