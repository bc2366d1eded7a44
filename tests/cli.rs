//! End-to-end tests of `fqvit-cli` on the shared ImageNet sample and ViT-Tiny weights
//! (`../shared` beside the repository, or `$FQVIT_SHARED_DIR`; missing data fails, never skips).

use std::path::PathBuf;
use std::process::{Command, Output};

fn shared() -> PathBuf {
    let dir = std::env::var_os("FQVIT_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    assert!(
        dir.join("imagenet-sample/val").is_dir(),
        "shared data missing at {} (set FQVIT_SHARED_DIR)",
        dir.display()
    );
    dir
}

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fqvit-cli"))
        .args(["-q"])
        .args(args)
        .output()
        .expect("fqvit-cli runs")
}

fn weights_dir() -> String {
    shared().join("weights").display().to_string()
}

fn sample() -> String {
    shared().join("imagenet-sample").display().to_string()
}

#[track_caller]
fn fails_with<S: AsRef<str>>(args: &[S], needle: &str) {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = cli(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(stderr.contains(needle), "stderr for {args:?} lacks {needle:?}:\n{stderr}");
}

#[test]
fn float_eval_reproduces_the_original_figures() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let out = cli(&[
        "eval",
        "vit_tiny",
        &sample(),
        "--weights-dir",
        &weights_dir(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("top-1:") && stdout.contains("images:  1300"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let (top1, top5) = (v["top1"].as_f64().unwrap(), v["top5"].as_f64().unwrap());
    // The original Python pipeline on the same 1300 files: 82.62 / 96.00.
    assert!((top1 - 82.62).abs() <= 0.25, "top-1 {top1}");
    assert!((top5 - 96.00).abs() <= 0.25, "top-5 {top5}");
    assert_eq!(v["model"], "vit_tiny");
    assert_eq!(v["images"], 1300);
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 1300);
    let paths: Vec<&str> = preds.iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert!(paths.windows(2).all(|w| w[0] < w[1]), "predictions are in sorted path order");
    assert!(paths[0].starts_with("val/n01440764/") && paths[0].ends_with(".JPEG"), "{}", paths[0]);
    for p in preds {
        assert_eq!(p["top5"].as_array().unwrap().len(), 5);
        assert!(p["label"].as_u64().unwrap() < 1000);
    }
}

#[test]
fn contradictory_or_unknown_flags_are_refused_with_a_clear_message() {
    let (s, w) = (sample(), weights_dir());
    let base = ["eval", "vit_tiny", s.as_str(), "--weights-dir", w.as_str()];
    let with = |extra: &[&str]| {
        base.iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect::<Vec<String>>()
    };
    fails_with(&with(&["--ptf"]), "--ptf needs --quant");
    fails_with(&with(&["--lis"]), "--lis needs --quant");
    fails_with(
        &with(&["--quant", "--quant-method", "kmeans"]),
        "invalid value 'kmeans' for '--quant-method",
    );
    fails_with(&with(&["--quant-method", "omse"]), "--quant-method needs --quant");
    fails_with(&with(&["--layer-norm-sqrt", "exact"]), "--layer-norm-sqrt needs --quant");
    fails_with(
        &with(&["--quant", "--layer-norm-sqrt", "round"]),
        "invalid value 'round' for '--layer-norm-sqrt",
    );
    fails_with(&with(&["--quant", "--attn-bits", "3"]), "invalid value '3' for '--attn-bits");
    fails_with(&with(&["--frobnicate"]), "unexpected argument '--frobnicate'");
    fails_with(
        &["eval", "vit_huge", &s, "--weights-dir", &w],
        "unknown model `vit_huge`; known models: vit_tiny",
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "quant = true\nquant-method = \"percentile\"\nactivation-granularity = \"channel-wise\"\n",
    )
    .unwrap();
    fails_with(
        &with(&["--config", cfg.to_str().unwrap()]),
        "the percentile observer is layer-wise only",
    );
    std::fs::write(&cfg, "quant = true\nptf-typo = true\n").unwrap();
    fails_with(&with(&["--config", cfg.to_str().unwrap()]), "unknown field `ptf-typo`");
}

#[test]
fn missing_weights_name_the_file_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    fails_with(
        &["eval", "vit_tiny", &sample(), "--weights", missing.to_str().unwrap()],
        "nope.safetensors does not exist",
    );
}

/// A data folder with two real validation images and the given extra files in one class.
fn small_data(extra: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("val/n01440764");
    std::fs::create_dir_all(&class).unwrap();
    let src = shared().join("imagenet-sample/val/n01440764");
    let mut files: Vec<_> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files.iter().take(2) {
        std::fs::copy(f, class.join(f.file_name().unwrap())).unwrap();
    }
    for (name, bytes) in extra {
        std::fs::write(class.join(name), bytes).unwrap();
    }
    dir
}

fn truncated_jpeg() -> Vec<u8> {
    let src = shared().join("imagenet-sample/val/n01440764");
    let first = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().path()).min().unwrap();
    let bytes = std::fs::read(first).unwrap();
    bytes[..bytes.len() / 3].to_vec()
}

#[test]
fn a_corrupt_image_stops_the_run_unless_skip_bad() {
    let data = small_data(&[("zz_truncated.JPEG", truncated_jpeg())]);
    let data_str = data.path().to_str().unwrap();
    fails_with(
        &["eval", "vit_tiny", data_str, "--weights-dir", &weights_dir()],
        "zz_truncated.JPEG",
    );
    let json = data.path().join("out.json");
    let out = cli(&[
        "eval",
        "vit_tiny",
        data_str,
        "--weights-dir",
        &weights_dir(),
        "--skip-bad",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["images"], 2);
    assert_eq!(v["skipped"].as_array().unwrap().len(), 1);
    assert!(String::from_utf8_lossy(&out.stdout).contains("skipped: 1 undecodable images"));
}

#[test]
fn an_unknown_class_folder_is_an_error() {
    let data = small_data(&[]);
    std::fs::create_dir_all(data.path().join("val/n99999999")).unwrap();
    fails_with(
        &["eval", "vit_tiny", data.path().to_str().unwrap(), "--weights-dir", &weights_dir()],
        "n99999999` is not one of the 1000 ImageNet-1k classes",
    );
}

#[test]
fn a_quantized_run_calibrates_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("q.json");
    let out = cli(&[
        "eval",
        "vit_tiny",
        &sample(),
        "--weights-dir",
        &weights_dir(),
        "--quant",
        "--ptf",
        "--lis",
        "--calib-batchsize",
        "10",
        "--calib-iter",
        "2",
        "--limit",
        "20",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["images"], 20);
    assert_eq!(v["experiment"]["ptf"], true);
    assert_eq!(v["experiment"]["calibration"]["iterations"], 2);
    assert_eq!(v["calibration"]["images"], 20);
    assert!(v["calibration"]["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(v["label"], "8/8/4 ptf lis minmax");
}

/// `quantize` then `eval --qparams` gives the same per-image predictions as calibrating and
/// evaluating in one run, for `--ptf --lis` and for plain minmax, without the float weights.
#[test]
fn quantize_then_eval_qparams_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    for (name, flags) in [("ptf_lis", &["--ptf", "--lis"][..]), ("minmax", &[][..])] {
        let calib = ["--calib-batchsize", "20", "--calib-iter", "2", "--calib-order", "sorted"];
        let artifact = dir.path().join(format!("{name}.safetensors"));
        let mut args = vec!["quantize", "vit_tiny"];
        let (s, w) = (sample(), weights_dir());
        args.extend([s.as_str(), "--weights-dir", w.as_str(), "-o", artifact.to_str().unwrap()]);
        args.extend(flags);
        args.extend(calib);
        let out = cli(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            artifact.with_extension("toml").is_file(),
            "the TOML summary is written beside the artifact"
        );
        let direct = dir.path().join(format!("{name}-direct.json"));
        let mut args = vec![
            "eval",
            "vit_tiny",
            s.as_str(),
            "--weights-dir",
            w.as_str(),
            "--quant",
            "--limit",
            "60",
            "--json",
            direct.to_str().unwrap(),
        ];
        args.extend(flags);
        args.extend(calib);
        assert!(cli(&args).status.success());
        let replay = dir.path().join(format!("{name}-replay.json"));
        let out = cli(&[
            "eval",
            "vit_tiny",
            &s,
            "--qparams",
            artifact.to_str().unwrap(),
            "--limit",
            "60",
            "--json",
            replay.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let read = |p: &std::path::Path| {
            serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let (a, b) = (read(&direct), read(&replay));
        assert_eq!(a["predictions"], b["predictions"], "{name}: per-image predictions");
        assert_eq!(
            (a["top1"].clone(), a["top5"].clone()),
            (b["top1"].clone(), b["top5"].clone()),
            "{name}"
        );
        assert_eq!(a["experiment"], b["experiment"], "{name}: the artifact carries the settings");
    }
    let artifact = dir.path().join("minmax.safetensors");
    fails_with(
        &["eval", "deit_tiny", &sample(), "--qparams", artifact.to_str().unwrap()],
        "calibrated for model vit_tiny, not deit_tiny",
    );
    fails_with(
        &["eval", "vit_tiny", &sample(), "--qparams", artifact.to_str().unwrap(), "--ptf"],
        "--qparams carries its own quantization settings",
    );
}

/// `convert` on a ViT AugReg `.npz` built from the shared ViT-Tiny (Google's names and
/// layouts, spec §10) gives back exactly the timm tensors; a checkpoint for another shape is
/// refused and leaves no file.
#[test]
fn convert_reads_an_augreg_npz_and_refuses_a_misfit() {
    use tch::Tensor;
    let weights =
        shared().join("weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k/model.safetensors");
    let timm: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&weights).unwrap().into_iter().collect();
    let (d, heads) = (192i64, 3i64);
    let mut npz: Vec<(String, Tensor)> = vec![
        ("embedding/kernel".into(), timm["patch_embed.proj.weight"].permute([2, 3, 1, 0])),
        ("embedding/bias".into(), timm["patch_embed.proj.bias"].shallow_clone()),
        ("cls".into(), timm["cls_token"].shallow_clone()),
        ("Transformer/posembed_input/pos_embedding".into(), timm["pos_embed"].shallow_clone()),
        ("Transformer/encoder_norm/scale".into(), timm["norm.weight"].shallow_clone()),
        ("Transformer/encoder_norm/bias".into(), timm["norm.bias"].shallow_clone()),
        ("head/kernel".into(), timm["head.weight"].tr()),
        ("head/bias".into(), timm["head.bias"].shallow_clone()),
    ];
    for i in 0..12 {
        let (b, p) = (format!("blocks.{i}."), format!("opt/target/Transformer/encoderblock_{i}/"));
        let t = |k: &str| timm[&format!("{b}{k}")].shallow_clone();
        let mut put = |k: &str, v: Tensor| npz.push((format!("{p}{k}"), v.contiguous()));
        put("LayerNorm_0/scale", t("norm1.weight"));
        put("LayerNorm_0/bias", t("norm1.bias"));
        put("LayerNorm_2/scale", t("norm2.weight"));
        put("LayerNorm_2/bias", t("norm2.bias"));
        for (j, n) in ["query", "key", "value"].into_iter().enumerate() {
            let rows = t("attn.qkv.weight").narrow(0, j as i64 * d, d);
            put(
                &format!("MultiHeadDotProductAttention_1/{n}/kernel"),
                rows.tr().reshape([d, heads, -1]),
            );
            let bias = t("attn.qkv.bias").narrow(0, j as i64 * d, d);
            put(&format!("MultiHeadDotProductAttention_1/{n}/bias"), bias.reshape([heads, -1]));
        }
        put(
            "MultiHeadDotProductAttention_1/out/kernel",
            t("attn.proj.weight").tr().reshape([heads, -1, d]),
        );
        put("MultiHeadDotProductAttention_1/out/bias", t("attn.proj.bias"));
        for r in 0..2 {
            put(
                &format!("MlpBlock_3/Dense_{r}/kernel"),
                t(&format!("mlp.fc{}.weight", r + 1)).tr(),
            );
            put(&format!("MlpBlock_3/Dense_{r}/bias"), t(&format!("mlp.fc{}.bias", r + 1)));
        }
    }
    // The top-level arrays carry the same prefix as the blocks in these files.
    let npz: Vec<(String, Tensor)> = npz
        .into_iter()
        .map(|(k, v)| {
            if k.starts_with("opt/") { (k, v) } else { (format!("opt/target/{k}"), v.contiguous()) }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("ViT-Ti_16.npz");
    Tensor::write_npz(&npz, &input).unwrap();
    let output = dir.path().join("converted/model.safetensors");
    let out =
        cli(&["convert", "vit_tiny", input.to_str().unwrap(), "-o", output.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let converted: Vec<(String, Tensor)> = Tensor::read_safetensors(&output).unwrap();
    assert_eq!(converted.len(), timm.len());
    for (k, v) in &converted {
        assert!(v.equal(&timm[k]), "{k} differs after conversion");
    }

    let swin = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fqvit-models/tests/fixtures/timm/swin_variant.pth");
    let misfit = dir.path().join("swin/model.safetensors");
    fails_with(
        &["convert", "swin_tiny", swin.to_str().unwrap(), "-o", misfit.to_str().unwrap()],
        "does not fit swin_tiny",
    );
    assert!(!misfit.exists() && !misfit.with_extension("partial.safetensors").exists());
}
