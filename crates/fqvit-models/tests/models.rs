//! Strict weight loading and the site table.

use std::path::PathBuf;

use fqvit_models::weights::load_strict;
use fqvit_models::{Error, Mode, ModelName, Quantizable, TensorClass, vit};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn tiny_config() -> vit::Config {
    vit::Config {
        embed_dim: 16,
        depth: 2,
        num_heads: 2,
        img_size: 32,
        num_classes: 10,
        ..vit::Config::deit_tiny()
    }
}

/// Writes the variables of a freshly built tiny model, edited by `edit`, to a safetensors file.
fn weights_file(dir: &tempfile::TempDir, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let vs = VarStore::new(Device::Cpu);
    let _model = vit::Vit::new(&vs.root(), &tiny_config());
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut vars);
    let path = dir.path().join("w.safetensors");
    Tensor::write_safetensors(&vars, &path).unwrap();
    path
}

fn load(path: &std::path::Path) -> fqvit_models::Result<()> {
    let vs = VarStore::new(Device::Cpu);
    let _model = vit::Vit::new(&vs.root(), &tiny_config());
    load_strict(&vs, path)
}

#[test]
fn an_exact_file_loads_and_reproduces_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = weights_file(&dir, |_| {});
    load(&path).unwrap();
}

#[track_caller]
fn mismatch(
    edit: impl FnOnce(&mut Vec<(String, Tensor)>),
) -> (Vec<String>, Vec<String>, Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = weights_file(&dir, edit);
    match load(&path) {
        Err(err @ Error::WeightsMismatch { .. }) => {
            let msg = err.to_string();
            let Error::WeightsMismatch { missing, unexpected, mismatched, .. } = err else {
                unreachable!()
            };
            (missing, unexpected, mismatched, msg)
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let (missing, unexpected, mismatched, msg) =
        mismatch(|v| v.retain(|(k, _)| k != "blocks.1.mlp.fc2.bias"));
    assert_eq!(missing, ["blocks.1.mlp.fc2.bias"]);
    assert!(unexpected.is_empty() && mismatched.is_empty());
    assert!(msg.contains("1 missing: blocks.1.mlp.fc2.bias"), "{msg}");
}

#[test]
fn an_extra_tensor_is_named() {
    let (missing, unexpected, _, msg) =
        mismatch(|v| v.push(("head.extra".into(), Tensor::zeros([3], (Kind::Float, Device::Cpu)))));
    assert!(missing.is_empty());
    assert_eq!(unexpected, ["head.extra"]);
    assert!(msg.contains("1 unexpected: head.extra"), "{msg}");
}

#[test]
fn a_misshapen_or_mistyped_tensor_is_named() {
    let (_, _, mismatched, _) = mismatch(|v| {
        let t = v.iter_mut().find(|(k, _)| k == "pos_embed").unwrap();
        t.1 = Tensor::zeros([1, 6, 16], (Kind::Float, Device::Cpu));
    });
    assert_eq!(mismatched.len(), 1);
    assert!(
        mismatched[0].starts_with("pos_embed: expected [1, 5, 16]")
            && mismatched[0].contains("got [1, 6, 16]"),
        "{mismatched:?}"
    );
    let (_, _, mismatched, _) = mismatch(|v| {
        let t = v.iter_mut().find(|(k, _)| k == "norm.weight").unwrap();
        t.1 = t.1.to_kind(Kind::Half);
    });
    assert!(
        mismatched[0].starts_with("norm.weight:") && mismatched[0].contains("F16"),
        "{mismatched:?}"
    );
}

#[test]
fn a_truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = weights_file(&dir, |_| {});
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(&path).unwrap_err();
    assert!(matches!(err, Error::Safetensors { .. }), "{err}");
    assert!(err.to_string().contains("w.safetensors is not a valid safetensors file"), "{err}");
}

#[test]
fn a_non_finite_weight_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = weights_file(&dir, |vars| {
        let (_, t) = vars.iter_mut().find(|(n, _)| n == "blocks.1.attn.qkv.weight").unwrap();
        let _ = tch::no_grad(|| t.view(-1).narrow(0, 3, 2).fill_(f64::INFINITY));
    });
    let err = load(&path).unwrap_err();
    assert!(matches!(err, Error::NonFinite { count: 2, first: 3, .. }), "{err}");
    assert!(
        err.to_string().contains("tensor `blocks.1.attn.qkv.weight` holds 2 NaN or infinite"),
        "{err}"
    );
}

#[test]
fn weights_resolve_from_the_folder_then_the_hf_cache_and_offline_misses_say_where() {
    use fqvit_models::weights::{HubCache, Network, WeightsSource, resolve};
    let tmp = tempfile::tempdir().unwrap();
    let (dir, cache) = (tmp.path().join("weights"), HubCache::new(tmp.path().join("hub")));
    let model = ModelName::DeitSmall;
    let ck = model.hub();
    let offline = |source: &WeightsSource| resolve(model, source, Network::Offline, &cache);

    // Nothing anywhere: the error names the folder's file, the cache's file and the pinned URL.
    let err = offline(&WeightsSource::Dir(dir.clone())).unwrap_err().to_string();
    let local = dir.join("deit_small_patch16_224.fb_in1k/model.safetensors");
    assert!(err.contains(&format!("{} does not exist", local.display())), "{err}");
    assert!(err.contains(&cache.snapshot_path(&ck).display().to_string()), "{err}");
    assert!(
        err.contains(&format!(
            "huggingface.co/{}/resolve/{}/model.safetensors",
            ck.repo, ck.revision
        )),
        "{err}"
    );
    assert!(err.contains("offline, so nothing was downloaded"), "{err}");

    // Python's layout: a relative link from the pinned snapshot to the blob, no refs/<sha>.
    let snapshot = cache.snapshot_path(&ck);
    std::fs::create_dir_all(snapshot.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(format!("../../blobs/{}", ck.sha256), &snapshot).unwrap();
    assert!(offline(&WeightsSource::Hub).is_err(), "a link to a missing blob is a miss");
    let blob =
        cache.root().join("models--timm--deit_small_patch16_224.fb_in1k/blobs").join(ck.sha256);
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, b"weights").unwrap();
    assert_eq!(offline(&WeightsSource::Hub).unwrap(), snapshot);
    assert_eq!(
        offline(&WeightsSource::Dir(dir.clone())).unwrap(),
        snapshot,
        "the cache backs the folder"
    );

    // A file in the folder comes first.
    std::fs::create_dir_all(local.parent().unwrap()).unwrap();
    std::fs::write(&local, b"local").unwrap();
    assert_eq!(offline(&WeightsSource::Dir(dir)).unwrap(), local);
}

#[test]
fn the_registry_pins_every_checkpoint_to_a_commit() {
    for model in ModelName::ALL {
        let ck = model.hub();
        let hex = |s: &str, n: usize| {
            s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        assert!(hex(ck.revision, 40), "{model}: revision {}", ck.revision);
        assert!(hex(ck.sha256, 64), "{model}: sha256 {}", ck.sha256);
        assert_eq!(ck.repo, format!("timm/{}", model.weights_folder()));
    }
}

/// The site table: names, the original's module names, classes, counts.
#[test]
fn site_table_matches_the_original_graph() {
    for (name, top_level) in [(ModelName::VitTiny, 6), (ModelName::DeitSmall, 7)] {
        let vs = VarStore::new(Device::Cpu);
        let model = name.config().build(&vs.root());
        let sites = model.sites();
        let acts = |prefix: Option<&str>| {
            sites
                .iter()
                .filter(|(_, s)| s.class != TensorClass::Weight)
                .filter(|(_, s)| match prefix {
                    Some(p) => s.name.starts_with(p),
                    None => !s.name.starts_with("blocks."),
                })
                .filter(|(_, s)| s.class != TensorClass::Softmax)
                .count()
        };
        assert_eq!(acts(None), top_level, "{name}: top-level activation sites");
        for i in 0..12 {
            assert_eq!(acts(Some(&format!("blocks.{i}."))), 10, "{name}: block {i}");
        }
        let weights = sites.iter().filter(|(_, s)| s.class == TensorClass::Weight).count();
        assert_eq!(weights, 2 + 4 * 12, "{name}: weight sites");
    }
    let vs = VarStore::new(Device::Cpu);
    let model = vit::Vit::new(&vs.root(), &vit::Config::vit_tiny());
    let table: Vec<(String, String, TensorClass)> = model
        .sites()
        .iter()
        .filter(|(_, s)| !s.name.starts_with("blocks.") || s.name.starts_with("blocks.0."))
        .map(|(_, s)| (s.name.clone(), s.original.clone(), s.class))
        .collect();
    use TensorClass::*;
    let expected = [
        ("patch_embed.proj", "patch_embed.proj", Weight),
        ("patch_embed.out", "patch_embed.qact", Activation),
        ("embed", "qact_embed", Activation),
        ("pos_embed", "qact_pos", Activation),
        ("embed_sum", "qact1", LayerNormInput),
        ("blocks.0.norm1_out", "blocks.0.qact1", Activation),
        ("blocks.0.attn.qkv", "blocks.0.attn.qkv", Weight),
        ("blocks.0.attn.qkv_out", "blocks.0.attn.qact1", Activation),
        ("blocks.0.attn.attn_scores", "blocks.0.attn.qact_attn1", Activation),
        ("blocks.0.attn.attn_probs", "blocks.0.attn.log_int_softmax", Softmax),
        ("blocks.0.attn.context", "blocks.0.attn.qact2", Activation),
        ("blocks.0.attn.proj", "blocks.0.attn.proj", Weight),
        ("blocks.0.attn.proj_out", "blocks.0.attn.qact3", Activation),
        ("blocks.0.residual1", "blocks.0.qact2", LayerNormInput),
        ("blocks.0.norm2_out", "blocks.0.qact3", Activation),
        ("blocks.0.mlp.fc1", "blocks.0.mlp.fc1", Weight),
        ("blocks.0.mlp.hidden", "blocks.0.mlp.qact1", Activation),
        ("blocks.0.mlp.fc2", "blocks.0.mlp.fc2", Weight),
        ("blocks.0.mlp.out", "blocks.0.mlp.qact2", Activation),
        ("blocks.0.residual2", "blocks.0.qact4", LayerNormInput),
        ("norm_out", "qact2", Activation),
        ("head", "head", Weight),
        ("logits", "act_out", Activation),
    ];
    let expected: Vec<(String, String, TensorClass)> =
        expected.iter().map(|&(a, b, c)| (a.into(), b.into(), c)).collect();
    assert_eq!(table, expected);
}

/// Float mode runs, and quantized mode refuses a table that lacks a site.
#[test]
fn quantized_mode_refuses_an_incomplete_table() {
    let vs = VarStore::new(Device::Cpu);
    let model = vit::Vit::new(&vs.root(), &tiny_config());
    let logits =
        model.forward(&Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu)), &mut Mode::Float);
    assert_eq!(logits.size(), [1, 10]);
    let table = fqvit_models::QParamTable::empty(model.sites().len());
    let err = fqvit_models::Quantized::new(&model, table, Default::default()).unwrap_err();
    assert!(
        err.to_string().contains("quantization site `input`: has no calibrated parameters"),
        "{err}"
    );
}
