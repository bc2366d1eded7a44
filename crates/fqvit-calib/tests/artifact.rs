//! The qparams artifact: round trip, and each refusal (files built here).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fqvit_calib::artifact::{self, Expect, FORMAT_VERSION};
use fqvit_calib::{Calibrator, Experiment};
use fqvit_models::{Architecture, Mode, QParamTable, Quantizable, Quantized, vit};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn config() -> vit::Config {
    vit::Config {
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        img_size: 32,
        num_classes: 10,
        ..vit::Config::deit_tiny()
    }
}

fn images(seed: i64) -> Tensor {
    fqvit_testkit::seeded(seed, || Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu)))
}

/// A random tiny DeiT calibrated (8/8/4, PTF, LIS) on two random batches, written to `dir`.
fn calibrated(dir: &Path) -> (VarStore, vit::Vit, QParamTable, PathBuf, Experiment) {
    let (vs, model) = model(0);
    let exp = Experiment::default();
    let mut sink = Calibrator::new(model.sites(), &exp).unwrap();
    for (i, seed) in [1, 2].into_iter().enumerate() {
        sink.set_last_batch(i == 1);
        let _ = tch::no_grad(|| {
            model.forward(
                &images(seed),
                &mut Mode::Calibrate { sink: &mut sink, options: exp.quant_options() },
            )
        });
    }
    let table = sink.freeze().unwrap();
    let prov = common::test_provenance(
        &model,
        "tiny",
        Architecture::Vit(config()),
        "abc",
        &table,
        exp,
        8,
        0,
    );
    let path = dir.join("tiny.qparams.safetensors");
    artifact::write(&path, &model, &vs, &table, &prov).unwrap();
    (vs, model, table, path, exp)
}

fn expect(cfg: &Architecture) -> Expect<'_> {
    Expect { model: "tiny", architecture: cfg, weights_sha256: None }
}

/// The tiny DeiT with random weights drawn from `seed`.
fn model(seed: i64) -> (VarStore, vit::Vit) {
    fqvit_testkit::seeded(seed, || {
        let vs = VarStore::new(Device::Cpu);
        let model = vit::Vit::new(&vs.root(), &config());
        (vs, model)
    })
}

fn fresh() -> (VarStore, vit::Vit) {
    model(99)
}

#[test]
fn round_trip_gives_identical_outputs_without_the_float_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (_vs, model, table, path, exp) = calibrated(dir.path());
    let x = images(3);
    let q = Quantized::new(&model, table.clone(), exp.quant_options()).unwrap();
    let before = tch::no_grad(|| model.forward(&x, &mut Mode::quantized(&q)));
    let cfg = Architecture::Vit(config());
    let (vs2, model2) = fresh();
    let loaded = artifact::read(&path, &model2, &vs2, expect(&cfg)).unwrap();
    assert_eq!(loaded.table, table, "parameters round-trip exactly");
    let q2 = Quantized::new(&model2, loaded.table, loaded.provenance.experiment.quant_options())
        .unwrap();
    let after = tch::no_grad(|| model2.forward(&x, &mut Mode::quantized(&q2)));
    assert!(before.equal(&after), "quantized logits differ after the round trip");
    // About a quarter of float32 for the weights, plus the float biases, norms and embeddings.
    let float_bytes: usize = vs2.variables().values().map(|t| t.numel() * 4).sum();
    let size = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(size < float_bytes / 2, "artifact {size} bytes vs float {float_bytes}");
}

/// Rewrites the artifact with `edit` applied to its tensors and metadata.
fn edited(
    path: &Path,
    edit: impl FnOnce(
        &mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>,
        &mut serde_json::Value,
    ),
) -> PathBuf {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["fqvit"]).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors, &mut meta);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (d, s, b))| {
            (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())
        })
        .collect();
    let out = path.with_file_name("edited.safetensors");
    let info = HashMap::from([("fqvit".to_owned(), meta.to_string())]);
    safetensors::serialize_to_file(views, Some(info), &out).unwrap();
    out
}

#[track_caller]
fn refused(path: &Path, expect_model: &str, weights_sha: Option<&str>, needle: &str) {
    let (vs, model) = fresh();
    let before = vs.root().get("pos_embed").unwrap().copy();
    let cfg = Architecture::Vit(config());
    let err = artifact::read(
        path,
        &model,
        &vs,
        Expect { model: expect_model, architecture: &cfg, weights_sha256: weights_sha },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(needle), "{err}\n  lacks {needle:?}");
    assert!(err.contains(path.file_name().unwrap().to_str().unwrap()), "{err} names the file");
    assert!(vs.root().get("pos_embed").unwrap().equal(&before), "nothing is half-loaded");
}

#[test]
fn every_mismatch_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (_vs, _model, _table, path, _) = calibrated(dir.path());
    refused(&path, "deit_small", None, "calibrated for model tiny, not deit_small");
    refused(&path, "tiny", Some("0123"), "calibrated from other weights (SHA-256 abc");
    let newer = edited(&path, |_, m| m["format_version"] = (FORMAT_VERSION + 1).into());
    refused(&newer, "tiny", None, "by a newer fqvit");
    let arch = edited(&path, |_, m| m["architecture"]["depth"] = 3.into());
    refused(&arch, "tiny", None, "architecture differs");
    let missing = edited(&path, |t, m| {
        m["sites"].as_array_mut().unwrap().retain(|s| s["name"] != "blocks.1.mlp.hidden");
        t.retain(|k, _| !k.starts_with("blocks.1.mlp.hidden."));
    });
    refused(&missing, "tiny", None, "missing [\"blocks.1.mlp.hidden\"]");
    let extra = edited(&path, |t, m| {
        let mut s = m["sites"][0].clone();
        let name = s["name"].as_str().unwrap().to_owned();
        for suffix in ["scale", "zero_point", "ptf_factor", "weight_int8"] {
            if let Some(v) = t.get(&format!("{name}.{suffix}")).cloned() {
                t.insert(format!("blocks.7.ghost.{suffix}"), v);
            }
        }
        s["name"] = "blocks.7.ghost".into();
        m["sites"].as_array_mut().unwrap().push(s);
    });
    refused(&extra, "tiny", None, "extra [\"blocks.7.ghost\"]");
    let shape = edited(&path, |t, _| {
        let e = t.get_mut("blocks.0.residual1.scale").unwrap();
        e.1 = vec![3];
        e.2.truncate(12);
    });
    refused(&shape, "tiny", None, "site blocks.0.residual1: 3 scales");
    let weight = edited(&path, |t, _| {
        t.remove("head.weight_int8");
    });
    refused(&weight, "tiny", None, "has no tensor head.weight_int8");
    let stray = edited(&path, |t, _| {
        t.insert("stray".into(), (safetensors::Dtype::F32, vec![1], vec![0; 4]));
    });
    refused(&stray, "tiny", None, "unexpected tensors: [\"stray\"]");
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    refused(&cut, "tiny", None, "truncated or corrupt");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"\x05\x00\x00\x00\x00\x00\x00\x00{oops").unwrap();
    refused(&junk, "tiny", None, "truncated or corrupt");
}

#[test]
fn nan_activations_stop_calibration_naming_the_site() {
    let (_vs, model) = model(0);
    let exp = Experiment::default();
    let mut sink = Calibrator::new(model.sites(), &exp).unwrap();
    sink.set_last_batch(true);
    let nan = Tensor::full([2, 3, 32, 32], f64::NAN, (Kind::Float, Device::Cpu));
    let _ = tch::no_grad(|| {
        model.forward(&nan, &mut Mode::Calibrate { sink: &mut sink, options: exp.quant_options() })
    });
    let err = sink.freeze().unwrap_err().to_string();
    assert!(
        err.starts_with("calibration failed at site input:") && err.contains("not finite"),
        "{err}"
    );
}
