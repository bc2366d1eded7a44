//! Float parity with timm, from the fixtures `cargo xtask timm-fixtures` writes (timm 1.0.31,
//! torch 2.11, unfused attention): small random variants of each family and the real ViT-Tiny
//! give timm's logits, and every full-size model has timm's parameter names and shapes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fqvit_models::weights::load_strict;
use fqvit_models::{Architecture, Mode, ModelName, Preprocess, TensorClass, swin, vit};
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// Float32 logits of the same graph in another operation order (timm scales ViT's q before
/// the matmul, FQ-ViT after) differ by a few ulps of the activations; 1e-4 is the issue's bound.
const TOLERANCE: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/timm").join(name)
}

fn manifest() -> serde_json::Value {
    let path = fixture("manifest.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask timm-fixtures`)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// The small variants as our configs; the test checks they are what the fixture was built with.
fn variants() -> Vec<(&'static str, Architecture, serde_json::Value)> {
    let vit = vit::Config {
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        patch_size: 8,
        img_size: 32,
        num_classes: 10,
        ..vit::Config::vit_tiny()
    };
    let deit = vit::Config { embed_dim: 48, num_heads: 3, ..vit };
    let swin = swin::Config::test_variant();
    let kwargs = |s: &str| serde_json::from_str(s).unwrap();
    vec![
        (
            "vit_variant",
            Architecture::Vit(vit),
            kwargs(
                r#"{"img_size":32,"patch_size":8,"embed_dim":32,"depth":2,"num_heads":2,"num_classes":10}"#,
            ),
        ),
        (
            "deit_variant",
            Architecture::Vit(deit),
            kwargs(
                r#"{"img_size":32,"patch_size":8,"embed_dim":48,"depth":2,"num_heads":3,"num_classes":10}"#,
            ),
        ),
        (
            "swin_variant",
            Architecture::Swin(swin),
            kwargs(
                r#"{"img_size":64,"window_size":4,"embed_dim":8,"depths":[2,2,2,2],"num_heads":[1,1,2,2],"num_classes":10}"#,
            ),
        ),
    ]
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn small_variants_give_timm_logits() {
    let manifest = manifest();
    for (variant, arch, kwargs) in variants() {
        assert_eq!(
            manifest["variants"][variant]["kwargs"], kwargs,
            "{variant}: fixture hyper-parameters"
        );
        let mut tensors = read(&fixture(&format!("{variant}.safetensors")));
        let input = tensors.remove("fixture.input").unwrap();
        let expected = tensors.remove("fixture.logits").unwrap();
        // The state dict alone, through the strict loader: every key used, every shape checked.
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("weights.safetensors");
        let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
        Tensor::write_safetensors(&named, &weights).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let model = arch.build(&vs.root());
        load_strict(&vs, &weights).unwrap_or_else(|e| panic!("{variant}: {e}"));
        let logits = tch::no_grad(|| model.forward(&input, &mut Mode::Float));
        let diff = max_abs_diff(&logits, &expected);
        println!(
            "{variant}: max |ours − timm| = {diff:.2e} (logits up to {:.2})",
            expected.abs().max().double_value(&[])
        );
        assert!(diff <= TOLERANCE, "{variant}: logits differ from timm's by {diff:e}");
    }
}

#[test]
fn full_size_models_have_timm_parameter_names_and_shapes() {
    let manifest = manifest();
    for name in ModelName::ALL {
        let entry = &manifest["models"][name.as_str()];
        assert!(entry.is_object(), "{name} is missing from the manifest");
        let mut theirs: Vec<(String, Vec<i64>)> = entry["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| {
                let shape = kv[1].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
                (kv[0].as_str().unwrap().to_owned(), shape)
            })
            .collect();
        let vs = VarStore::new(Device::Cpu);
        let model = tch::no_grad(|| name.config().build(&vs.root()));
        let vars = vs.variables();
        // Weight sites are named by their parameter prefix (the artifact pairs them so).
        for (_, site) in model.sites().iter().filter(|(_, s)| s.class == TensorClass::Weight) {
            assert!(
                vars.contains_key(&format!("{}.weight", site.name)),
                "{name}: site {}",
                site.name
            );
        }
        let mut ours: Vec<(String, Vec<i64>)> =
            vars.into_iter().map(|(k, v)| (k, v.size())).collect();
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs, "{name}: parameter names and shapes");
        assert_eq!(
            entry["timm"].as_str().unwrap(),
            name.weights_folder().split('.').next().unwrap(),
            "{name}: timm architecture"
        );
    }
}

use fqvit_testkit::shared_dir;

#[test]
fn real_vit_tiny_gives_timm_logits_on_shared_images() {
    let weights =
        shared_dir().join("weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k/model.safetensors");
    assert!(weights.is_file(), "shared ViT-Tiny weights missing at {}", weights.display());
    let io = read(&fixture("vit_tiny_shared.safetensors"));
    let vs = VarStore::new(Device::Cpu);
    let model = ModelName::VitTiny.config().build(&vs.root());
    load_strict(&vs, &weights).unwrap();
    assert_eq!(model.preprocess(), Preprocess::VIT);
    let logits = tch::no_grad(|| model.forward(&io["input"], &mut Mode::Float));
    let diff = max_abs_diff(&logits, &io["logits"]);
    println!("vit_tiny on shared images: max |ours − timm| = {diff:.2e}");
    assert!(diff <= TOLERANCE, "logits differ from timm's by {diff:e}");
    let top = |t: &Tensor| Vec::<i64>::try_from(t.argmax(-1, false)).unwrap();
    assert_eq!(top(&logits), top(&io["logits"]));
}

/// The paper's checkpoint formats (written by the fixture script from the variants and checked
/// there with timm's own converters) convert to exactly the variants' timm tensors.
#[test]
fn original_checkpoints_convert_to_timm_layout() {
    let variants = variants();
    for (file, variant) in [
        ("deit_variant.pth", "deit_variant"),
        ("swin_variant.pth", "swin_variant"),
        ("vit_variant.npz", "vit_variant"),
    ] {
        let (_, arch, _) = variants.iter().find(|v| v.0 == variant).unwrap();
        let converted = fqvit_models::convert::convert(arch, &fixture(file));
        if file.ends_with(".pth") && cfg!(not(feature = "pth")) {
            let e = converted.map(drop).unwrap_err().to_string();
            assert!(e.contains(file) && e.contains(fqvit_models::convert::PTH_FEATURE), "{e}");
            continue;
        }
        let converted = converted.unwrap_or_else(|e| panic!("{file}: {e}"));
        let mut expected = read(&fixture(&format!("{variant}.safetensors")));
        expected.retain(|k, _| !k.starts_with("fixture."));
        let names: Vec<&String> = converted.iter().map(|(k, _)| k).collect();
        let mut want: Vec<&String> = expected.keys().collect();
        want.sort();
        assert_eq!(names, want, "{file}: tensor names");
        for (k, v) in &converted {
            assert!(v.equal(&expected[k]), "{file}: {k} differs");
        }
    }
}

#[test]
fn conversion_refuses_bad_input_naming_the_file() {
    let swin = ModelName::SwinTiny.config();
    let vit = ModelName::VitBase.config();
    let err = |arch: &Architecture, path: &Path| {
        fqvit_models::convert::convert(arch, path).map(drop).unwrap_err().to_string()
    };
    let e = err(&swin, &fixture("vit_variant.npz"));
    assert!(e.contains("vit_variant.npz") && e.contains("Swin checkpoints are `.pth`"), "{e}");
    let e = err(&vit, &fixture("manifest.json"));
    assert!(e.contains("manifest.json") && e.contains("expected a `.pth`"), "{e}");
    // Truncated files, and a file that does not exist.
    let dir = tempfile::tempdir().unwrap();
    for name in ["vit_variant.npz", "deit_variant.pth"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let cut = dir.path().join(name);
        std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
        let e = err(&vit, &cut);
        assert!(e.contains(name) && e.contains("not a readable"), "{e}");
    }
    let e = err(&vit, &fixture("deit_variant.safetensors").with_extension("npz"));
    assert!(e.contains("deit_variant.npz"), "{e}");
}
