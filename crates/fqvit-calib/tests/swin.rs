//! Swin quantized end to end on the small variant of fqvit-models' timm fixture (timm's random
//! weights, no pretrained Swin is reachable here): calibration then `--ptf --lis` and plain
//! evaluation run on the CPU, give finite logits, are deterministic, and stay close to float.

use std::collections::HashMap;
use std::path::PathBuf;

use fqvit_calib::artifact::{self, CalibrationData, Expect, FORMAT_VERSION, Provenance};
use fqvit_calib::{Calibrator, Experiment};
use fqvit_models::weights::load_strict;
use fqvit_models::{Architecture, Mode, QParamTable, Quantizable, Quantized, swin};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn variant() -> swin::Config {
    swin::Config {
        embed_dim: 8,
        depths: [2, 2, 2, 2],
        num_heads: [1, 1, 2, 2],
        window_size: 4,
        img_size: 64,
        num_classes: 10,
        ..swin::Config::swin_tiny()
    }
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
    let vs = VarStore::new(Device::Cpu);
    let model = swin::Swin::new(&vs.root(), &variant());
    load_strict(&vs, &weights).unwrap();
    (vs, model, input)
}

/// Calibration batches: the fixture images plus noise, four batches of four.
fn batches(input: &Tensor) -> Vec<Tensor> {
    tch::manual_seed(7);
    (0..4)
        .map(|_| {
            Tensor::cat(&[input, input], 0)
                + Tensor::randn_like(&Tensor::cat(&[input, input], 0)) * 0.3
        })
        .collect()
}

fn calibrate(model: &swin::Swin, exp: &Experiment, batches: &[Tensor]) -> QParamTable {
    let mut sink = Calibrator::new(model.sites(), exp).unwrap();
    for (i, batch) in batches.iter().enumerate() {
        sink.set_last_batch(i + 1 == batches.len());
        let _ = tch::no_grad(|| {
            model.forward(
                batch,
                &mut Mode::Calibrate { sink: &mut sink, options: exp.quant_options() },
            )
        });
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
    let prov = Provenance {
        format_version: FORMAT_VERSION,
        fqvit_version: "test".into(),
        created_unix: 0,
        model: "swin_variant".into(),
        architecture: arch,
        weights_sha256: "fixture".into(),
        experiment: exp,
        calibration: CalibrationData {
            data: "random".into(),
            images: 16,
            order: "sorted".into(),
            seed: 7,
        },
        lis_bits: exp.quant_options().lis_bits,
        sites: artifact::site_infos(&model, &table, &exp),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swin.qparams.safetensors");
    artifact::write(&path, &model, &vs, &table, &prov).unwrap();
    let q = Quantized::new(&model, table.clone(), exp.quant_options()).unwrap();
    let before = tch::no_grad(|| model.forward(&input, &mut Mode::quantized(&q)));

    tch::manual_seed(123);
    let vs2 = VarStore::new(Device::Cpu);
    let model2 = swin::Swin::new(&vs2.root(), &variant());
    let expect = Expect { model: "swin_variant", architecture: &arch, weights_sha256: None };
    let loaded = artifact::read(&path, &model2, &vs2, expect).unwrap();
    assert_eq!(loaded.table, table);
    let q2 = Quantized::new(&model2, loaded.table, exp.quant_options()).unwrap();
    let after = tch::no_grad(|| model2.forward(&input, &mut Mode::quantized(&q2)));
    assert!(before.equal(&after), "quantized Swin logits differ after the round trip");
}
