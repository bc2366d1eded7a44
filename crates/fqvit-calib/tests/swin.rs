//! Swin quantized end to end on the small variant of fqvit-models' timm fixture (timm's random
//! weights, no pretrained Swin is reachable here): calibration then `--ptf --lis` and plain
//! evaluation run on the CPU, give finite logits, are deterministic, and stay close to float.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use fqvit_calib::artifact::{self, Expect};
use fqvit_calib::{Calibrator, Experiment};
use fqvit_models::weights::load_strict;
use fqvit_models::{Architecture, Mode, QParamTable, Quantizable, Quantized, swin};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn variant() -> swin::Config {
    swin::Config::test_variant()
}

/// The variant with timm's fixture weights, and the fixture's two input images.
fn model() -> (VarStore, swin::Swin, Tensor) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fqvit-models/tests/fixtures/timm/swin_variant.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        Tensor::read_safetensors(&path).unwrap().into_iter().collect();
    let input = tensors.remove("fixture.input").unwrap();
    tensors.remove("fixture.logits");
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("w.safetensors");
    let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
    Tensor::write_safetensors(&named, &weights).unwrap();
    let (vs, model) = fqvit_testkit::seeded(0, || {
        let vs = VarStore::new(Device::Cpu);
        let model = swin::Swin::new(&vs.root(), &variant());
        (vs, model)
    });
    load_strict(&vs, &weights).unwrap();
    (vs, model, input)
}

/// Calibration batches: the fixture images plus noise, four batches of four.
fn batches(input: &Tensor) -> Vec<Tensor> {
    fqvit_testkit::seeded(7, || {
        (0..4)
            .map(|_| {
                Tensor::cat(&[input, input], 0)
                    + Tensor::randn_like(&Tensor::cat(&[input, input], 0)) * 0.3
            })
            .collect()
    })
}

fn calibrate(model: &swin::Swin, exp: &Experiment, batches: &[Tensor]) -> QParamTable {
    let mut sink = Calibrator::new(model.sites(), exp).unwrap();
    for (i, batch) in batches.iter().enumerate() {
        sink.batch(model, batch, i + 1 == batches.len(), exp.quant_options()).unwrap();
    }
    sink.freeze().unwrap()
}

#[test]
fn swin_calibrates_and_runs_quantized() {
    let (_vs, model, input) = model();
    let float = tch::no_grad(|| model.forward(&input, &mut Mode::Float));
    let batches = batches(&input);
    for (label, exp) in [
        ("8/8/4 --ptf --lis", Experiment::default()),
        ("8/8/8 plain minmax", Experiment { ptf: false, lis: false, ..Experiment::default() }),
    ] {
        let table = calibrate(&model, &exp, &batches);
        assert_eq!(
            table,
            calibrate(&model, &exp, &batches),
            "{label}: calibration is deterministic"
        );
        let q = Quantized::new(&model, table, exp.quant_options()).unwrap();
        let run = || tch::no_grad(|| model.forward(&input, &mut Mode::quantized(&q)));
        let logits = run();
        assert_eq!(logits.size(), [2, 10]);
        let finite = logits.isfinite().all().int64_value(&[]);
        assert_eq!(finite, 1, "{label}: non-finite logits {logits:?}");
        assert!(logits.equal(&run()), "{label}: evaluation is deterministic");
        // Quantization moves the logits, but they stay those of the same function: the
        // correlation with float logits over 20 values is high.
        let (a, b) = (logits.view(-1), float.view(-1));
        let corr = ((&a - a.mean(Kind::Float)) * (&b - b.mean(Kind::Float))).mean(Kind::Float)
            / (a.std(false) * b.std(false));
        let corr = corr.double_value(&[]);
        println!("{label}: correlation with float logits {corr:.3}");
        assert!(corr > 0.8, "{label}: correlation with float logits {corr}");
    }
}

/// A Swin artifact (int8 weights, PTF factors of the merging LayerNorms' inputs) reloads into a
/// fresh model and gives the same quantized logits without the float weights.
#[test]
fn swin_artifact_round_trips() {
    let (vs, model, input) = model();
    let exp = Experiment::default();
    let table = calibrate(&model, &exp, &batches(&input));
    let arch = Architecture::Swin(variant());
    let prov = common::test_provenance(&model, "swin_variant", arch, "fixture", &table, exp, 16, 7);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swin.qparams.safetensors");
    artifact::write(&path, &model, &vs, &table, &prov).unwrap();
    let q = Quantized::new(&model, table.clone(), exp.quant_options()).unwrap();
    let before = tch::no_grad(|| model.forward(&input, &mut Mode::quantized(&q)));

    let (vs2, model2) = fqvit_testkit::seeded(123, || {
        let vs2 = VarStore::new(Device::Cpu);
        let model2 = swin::Swin::new(&vs2.root(), &variant());
        (vs2, model2)
    });
    let expect = Expect { model: "swin_variant", architecture: &arch, weights_sha256: None };
    let loaded = artifact::read(&path, &model2, &vs2, expect).unwrap();
    assert_eq!(loaded.table, table);
    let q2 = Quantized::new(&model2, loaded.table, exp.quant_options()).unwrap();
    let after = tch::no_grad(|| model2.forward(&input, &mut Mode::quantized(&q2)));
    assert!(before.equal(&after), "quantized Swin logits differ after the round trip");
}

/// Records every probed module's tensors, replacing nothing.
#[derive(Default)]
struct Recorder(HashMap<String, Tensor>);

impl fqvit_models::Probe for Recorder {
    fn input(&mut self, module: &str, index: usize, xs: &Tensor) -> Option<Tensor> {
        self.0.insert(format!("{module}.in{index}"), xs.copy());
        None
    }
    fn output(&mut self, module: &str, ys: &Tensor) -> Option<Tensor> {
        self.0.insert(format!("{module}.out"), ys.copy());
        None
    }
}

/// The Swin-only steps of the quantized forward against the spec's equations (§8.2), on tensors
/// recorded from our own forward (no trace of the original's Swin exists): the relative position
/// bias gathered from the quantized table, the shift mask added after `attn.qact2`, patch
/// merging's neighbour order, and its integer LayerNorm on PTF scales tiled ×4 (`fqvit_ops`).
#[test]
fn swin_only_steps_follow_the_spec_equations() {
    use fqvit_ops::layer_norm::{InScale, LayerNormParams, reference};
    let (vs, model, input) = model();
    let exp = Experiment {
        layer_norm_sqrt: fqvit_calib::experiment::StdSqrt::Exact,
        ..Experiment::default()
    };
    let table = calibrate(&model, &exp, &batches(&input));
    let q = Quantized::new(&model, table.clone(), exp.quant_options()).unwrap();
    let mut rec = Recorder::default();
    let _ = tch::no_grad(|| {
        model.forward(&input, &mut Mode::Quantized { state: &q, probe: Some(&mut rec) })
    });
    let r = |k: &str| rec.0.get(k).unwrap_or_else(|| panic!("{k} not recorded")).shallow_clone();
    let (res, ws, shift) = (16i64, 4i64, 2i64);
    let n = ws * ws;

    // Bias: bias[h, i, j] = table[(r_i − r_j + ws − 1)·(2ws − 1) + (c_i − c_j + ws − 1), h].
    let a = "layers.0.blocks.1.attn";
    let table_q = r(&format!("{a}.qact_table.out"));
    let heads = table_q.size()[1];
    let mut bias = vec![0f32; (heads * n * n) as usize];
    let tq = Vec::<f32>::try_from(&table_q.contiguous().view(-1)).unwrap();
    for h in 0..heads {
        for i in 0..n {
            for j in 0..n {
                let idx = (i / ws - j / ws + ws - 1) * (2 * ws - 1) + (i % ws - j % ws + ws - 1);
                bias[(h * n * n + i * n + j) as usize] = tq[(idx * heads + h) as usize];
            }
        }
    }
    let bias = Tensor::from_slice(&bias).view([1, heads, n, n]);
    assert!(
        r(&format!("{a}.qact2.in0")).equal(&(r(&format!("{a}.qact_attn1.out")) + &bias)),
        "bias"
    );

    // Mask: 9 regions of the shifted grid, −100 between tokens of different regions, added to
    // the quantized biased logits before LIS.
    let region = |p: i64| {
        if p < res - ws {
            0
        } else if p < res - shift {
            1
        } else {
            2
        }
    };
    let windows = (res / ws) * (res / ws);
    let mut mask = vec![0f32; (windows * n * n) as usize];
    for w in 0..windows {
        let (wr, wc) = (w / (res / ws), w % (res / ws));
        let label = |t: i64| 3 * region(wr * ws + t / ws) + region(wc * ws + t % ws);
        for i in 0..n {
            for j in 0..n {
                if label(i) != label(j) {
                    mask[(w * n * n + i * n + j) as usize] = -100.0;
                }
            }
        }
    }
    let mask = Tensor::from_slice(&mask).view([1, windows, 1, n, n]);
    let biased = r(&format!("{a}.qact2.out"));
    let b = biased.size()[0];
    let expected = (biased.view([b / windows, windows, heads, n, n]) + mask).view([b, heads, n, n]);
    assert!(r(&format!("{a}.log_int_softmax.in0")).equal(&expected), "mask");

    // Patch merging: [x(0::2, 0::2), x(1::2, 0::2), x(0::2, 1::2), x(1::2, 1::2)] on channels.
    let x = r("layers.0.blocks.1.qact4.out");
    let (bs, c) = (x.size()[0], x.size()[2]);
    let grid = x.view([bs, res, res, c]);
    let pick = |r0: i64, c0: i64| grid.slice(1, r0, res, 2).slice(2, c0, res, 2);
    let merged =
        Tensor::cat(&[pick(0, 0), pick(1, 0), pick(0, 1), pick(1, 1)], -1).view([bs, -1, 4 * c]);
    assert!(r("layers.0.downsample.norm.in0").equal(&merged), "patch merging order");

    // Its integer LayerNorm: fqvit_ops' reference on the codes, the in-site's factors tiled ×4.
    let site = |name: &str| table.get(model.sites().find(name).unwrap()).unwrap().clone();
    let (p_in, p_out) = (site("layers.0.blocks.1.residual2"), site("layers.1.downsample.norm_out"));
    let scales: Vec<f32> = p_in.scale.iter().copied().cycle().take(4 * c as usize).collect();
    let factors: Vec<_> =
        p_in.ptf.clone().unwrap().into_iter().cycle().take(4 * c as usize).collect();
    let xs = Vec::<f32>::try_from(&merged.contiguous().view(-1)).unwrap();
    let codes: Vec<u8> = xs
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            ((v / scales[i % scales.len()]).round_ties_even() as i32 + p_in.zero_point[0]) as u8
        })
        .collect();
    let vars = vs.variables();
    let var =
        |k: &str| Vec::<f32>::try_from(&vars[&format!("layers.1.downsample.norm.{k}")]).unwrap();
    let (gamma, beta) = (var("weight"), var("bias"));
    let base = p_in.scale[0] / f32::from(1u8 << factors[0].get());
    let params = LayerNormParams {
        in_scale: InScale::Ptf { base, factors: &factors },
        zero_point: p_in.zero_point[0],
        bits: fqvit_ops::Bits::BYTE,
        gamma: &gamma,
        beta: &beta,
        out_scale: p_out.scale[0],
    };
    let mut y = vec![0i32; codes.len()];
    reference::ptf_layer_norm(&codes, &params, &mut y);
    let y: Vec<f32> = y.into_iter().map(|v| v as f32 * p_out.scale[0]).collect();
    let ours =
        Vec::<f32>::try_from(&r("layers.0.downsample.norm.out").contiguous().view(-1)).unwrap();
    assert_eq!(ours, y, "patch merging's integer LayerNorm");
}
