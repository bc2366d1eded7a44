//! End-to-end tests of `fqvit-cli` on the shared ImageNet sample and ViT-Tiny weights
//! (`../shared` beside the repository, or `$FQVIT_SHARED_DIR`; missing data fails, never skips).

use std::path::PathBuf;
use std::process::{Command, Output};

use fqvit_testkit::shared_dir as shared;

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

/// A JSON file written by the CLI.
fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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
    let v = read_json(&json);
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
    fails_with(&with(&["--float-sites", "mlp-out"]), "--float-sites needs --quant");
    fails_with(&with(&["--reparam-norm-out"]), "--reparam-norm-out needs --quant");
    fails_with(&with(&["--weight-rounding", "gptq"]), "--weight-rounding needs --quant");
    fails_with(
        &with(&["--quant", "--ptf", "--reparam-norm-out", "--ptf-sites", "norm-out"]),
        "reparam-norm-out balances norm-out's channels",
    );
    fails_with(
        &with(&["--quant", "--float-sites", "fc2"]),
        "unknown site group `fc2`; known: weights, residual",
    );
    fails_with(
        &with(&["--quant", "--layer-norm-sqrt", "round"]),
        "invalid value 'round' for '--layer-norm-sqrt",
    );
    fails_with(
        &with(&["--quant", "--lis", "--attn-bits", "9"]),
        "invalid value '9' for '--attn-bits <ATTN_BITS>': 9 bits: Log-Int-Softmax takes 2..=8",
    );
    fails_with(&with(&["--quant", "--attn-bits", "8"]), "--attn-bits needs --lis");
    fails_with(
        &with(&["--quant", "--lis", "--lis-exp-shift", "9"]),
        "invalid value '9' for '--lis-exp-shift <K>': shift 9: Log-Int-Softmax's exponential takes 0..=8",
    );
    fails_with(&with(&["--quant", "--lis-exp-shift", "3"]), "--lis-exp-shift needs --lis");
    fails_with(&with(&["--lis-exp-shift", "3"]), "--lis-exp-shift needs --lis");
    fails_with(&with(&["--lis-input", "rounded"]), "--lis-input needs --quant");
    fails_with(
        &with(&["--quant", "--lis-input", "floor"]),
        "invalid value 'floor' for '--lis-input",
    );
    fails_with(
        &with(&["--quant", "--ptf", "--lis", "--site-agreement", "4"]),
        "--site-agreement compares the integer engine with the simulation: add --engine int",
    );
    fails_with(
        &with(&["--quant", "--ptf", "--lis", "--gemm-kernel", "loops"]),
        "--gemm-kernel chooses the integer engine's GEMM kernel: add --engine int",
    );
    fails_with(
        &with(&["--quant", "--ptf", "--lis", "--engine", "int", "--gemm-kernel", "vnni"]),
        "unknown GEMM kernel \"vnni\" (expected one of avx512-vnni, rten, avx2-pairs, loops)",
    );
    fails_with(
        &with(&["--quant", "--ptf", "--lis", "--isa", "avx2"]),
        "--isa holds the integer engine's instruction set: add --engine int",
    );
    fails_with(
        &with(&["--quant", "--ptf", "--lis", "--engine", "int", "--isa", "sse"]),
        "invalid value 'sse' for '--isa <ISA>'",
    );
    fails_with(
        &with(&[
            "--quant",
            "--ptf",
            "--lis",
            "--engine",
            "int",
            "--isa",
            "avx2",
            "--gemm-kernel",
            "avx512-vnni",
        ]),
        "does not run the avx512-vnni GEMM kernel exactly with the avx2 instruction set",
    );
    fails_with(&with(&["--on", "dev"]), "--on dev evaluates the train images that --holdout N");
    fails_with(
        &with(&["--quant", "--holdout", "500"]),
        "calibration needs 1000 images (10 batches of 100)",
    );
    fails_with(
        &with(&["--quant", "--ptf", "--ptf-max-factor", "8"]),
        "PTF factor 8 is out of range 0..=7",
    );
    fails_with(
        &with(&["--quant", "--ptf-max-factor", "5"]),
        "ptf-max-factor = 5 needs ptf or ptf-sites",
    );
    fails_with(&with(&["--ptf-range", "symmetric"]), "--ptf-range needs --quant");
    fails_with(
        &with(&["--quant", "--ptf", "--ptf-range", "centered"]),
        "invalid value 'centered' for '--ptf-range",
    );
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
    std::fs::write(&cfg, "quant = true\nptf = true\nptf-max-factor = 12\n").unwrap();
    fails_with(&with(&["--config", cfg.to_str().unwrap()]), "PTF factor 12 is out of range 0..=7");
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
    let v = read_json(&json);
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
    let v = read_json(&json);
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
        let (a, b) = (read_json(&direct), read_json(&replay));
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
    let data = sample();
    for flag in [
        &["--ptf"][..],
        &["--weight-method", "omse"],
        &["--weight-rounding", "gptq"],
        &["--bias-correction"],
        &["--reparam-norm-out"],
    ] {
        let mut cmd = vec!["eval", "vit_tiny", &data, "--qparams", artifact.to_str().unwrap()];
        cmd.extend_from_slice(flag);
        fails_with(&cmd, "--qparams carries its own quantization settings");
    }
    let a = artifact.to_str().unwrap();
    fails_with(
        &["eval", "vit_tiny", &sample(), "--qparams", a, "--float-sites", "weights"],
        "--float-sites weights needs float weights",
    );
    // A float group on a replayed artifact is a different experiment, recorded as such.
    let json = dir.path().join("float.json");
    let o = cli(&[
        "eval",
        "vit_tiny",
        &sample(),
        "--qparams",
        a,
        "--float-sites",
        "mlp-out",
        "--limit",
        "4",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = read_json(&json);
    assert_eq!(v["experiment"]["float-sites"], serde_json::json!(["mlp-out"]));

    // The integer engine on the same artifact, compared with the simulation site by site.
    let ptf_lis = dir.path().join("ptf_lis.safetensors");
    let o = cli(&[
        "eval",
        "vit_tiny",
        &sample(),
        "--qparams",
        ptf_lis.to_str().unwrap(),
        "--engine",
        "int",
        "--lis-input",
        "rounded",
        "--limit",
        "2",
        "--site-agreement",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("site agreement on 2 images"), "{stdout}");
    let v = read_json(&json);
    assert_eq!(v["engine"], "int");
    assert_eq!(v["experiment"]["lis-input"], "rounded");
    let agreement = &v["site_agreement"];
    // Patches, embedding, 12 × 9 block sites, the final LayerNorm, the logits.
    assert_eq!(agreement["forced"].as_array().unwrap().len(), 112);
    assert_eq!(agreement["free_running"].as_array().unwrap().len(), 112);
    for class in agreement["forced_by_class"].as_array().unwrap() {
        let equal = class["equal"].as_f64().unwrap() / class["codes"].as_f64().unwrap();
        // Each op alone flips about 10^-5 of the codes (crates/fqvit-engine/README.md).
        assert!(equal >= 0.999, "{class}");
    }
}

#[test]
fn bench_with_the_engine_reports_all_three_forwards_in_one_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = cli(&[
        "bench",
        "vit_tiny",
        "--device",
        "cpu",
        "--engine",
        "int",
        "--batch-size",
        "1",
        "--iters",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = read_json(&json);
    for key in ["float_images_per_s", "quantized_images_per_s", "int_images_per_s"] {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {v}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    // The engine's time by kind covers its work; the GEMM did some ops.
    let kinds = v["int_seconds_by_kind"].as_object().expect("int_seconds_by_kind");
    for kind in ["gemm", "attention-matmul", "softmax", "layer-norm", "gelu", "add"] {
        assert!(kinds.contains_key(kind), "{kind} missing from {kinds:?}");
    }
    assert!(v["int_gemm_ops_per_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    // At least a byte per weight (int8), and GELU's tables (at most 1 MiB a block) besides.
    let mib = v["int_resident_mib"].as_f64().expect("int_resident_mib");
    let params = v["parameters"].as_f64().expect("parameters") / (1024.0 * 1024.0);
    assert!(mib > params && mib < params * 1.1 + 12.0 + 1.0, "{mib} MiB");
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
        if cfg!(feature = "pth") { "does not fit swin_tiny" } else { "the `pth` feature" },
    );
    assert!(!misfit.exists() && !misfit.with_extension("partial.safetensors").exists());
}

// ---- bench-table and output checks ----

/// Writes a checkpoint of `model` with random weights in timm's layout (our variable names are
/// timm's keys), as safetensors.
fn random_checkpoint(model: fqvit_models::ModelName, path: &std::path::Path) {
    let vs = fqvit_testkit::seeded(7, || {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _model = model.config().build(&vs.root());
        vs
    });
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    vs.save(path).unwrap();
}

/// Places `file` in a Hugging Face cache laid out as Python's `huggingface_hub` leaves it:
/// the blob under its sha256, a relative link from the pinned snapshot, `refs/main`.
fn put_in_hf_cache(
    cache: &std::path::Path,
    model: fqvit_models::ModelName,
    file: &std::path::Path,
) {
    let ck = model.hub();
    let repo = cache.join(format!("models--{}", ck.repo.replace('/', "--")));
    let blob = repo.join("blobs").join(ck.sha256);
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::rename(file, &blob).unwrap();
    let snapshot = repo.join("snapshots").join(ck.revision);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::os::unix::fs::symlink(format!("../../blobs/{}", ck.sha256), snapshot.join(ck.file))
        .unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), ck.revision).unwrap();
}

fn bench_table(args: &[&str], env: &[(&str, &std::path::Path)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fqvit-cli"));
    cmd.arg("bench-table").args(args);
    for k in [
        "FQVIT_WEIGHTS_DIR",
        "HF_HUB_OFFLINE",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_MAX",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "{} ends in a whole line", path.display());
    text.lines().map(|l| serde_json::from_str(l).expect("every line is whole JSON")).collect()
}

/// The published rows as the issue and docs/cli.md define them, spelled independently of the
/// CLI's row table.
const ROWS: [(&str, &[&str]); 7] = [
    ("fp32", &[]),
    ("minmax", &["--quant", "--quant-method", "minmax"]),
    ("ema", &["--quant", "--quant-method", "ema"]),
    ("percentile", &["--quant", "--quant-method", "percentile"]),
    ("omse", &["--quant", "--quant-method", "omse"]),
    ("ours-8-8-8", &["--quant", "--ptf", "--lis", "--attn-bits", "8", "--quant-method", "minmax"]),
    ("ours-8-8-4", &["--quant", "--ptf", "--lis", "--quant-method", "minmax"]),
];

#[test]
fn bench_table_resumes_after_a_kill_and_each_cell_equals_a_plain_eval() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap().to_owned();
    let (s, w) = (sample(), weights_dir());
    let args = [
        "run",
        "--models",
        "vit_tiny",
        "--data",
        &s,
        "--weights-dir",
        &w,
        "--offline",
        "--limit",
        "12",
        "--calib-batchsize",
        "6",
        "--calib-iter",
        "1",
        "--calib-order",
        "sorted",
        "--val-batchsize",
        "6",
        "--device",
        "cpu",
        "--out",
        &out_dir,
    ];
    let results = out.path().join("cells.jsonl");
    // Interrupt the run as soon as its first cell is recorded.
    // In a process group of its own, so that the kill takes the running cell's `eval` too.
    use std::os::unix::process::CommandExt;
    let mut child = bench_table(&args, &[])
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&results).is_ok_and(|t| !t.is_empty()) {
        assert!(start.elapsed().as_secs() < 600, "no cell finished in 10 minutes");
        assert!(child.try_wait().unwrap().is_none(), "bench-table ended before the kill");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let group = format!("-{}", child.id());
    assert!(Command::new("kill").args(["-KILL", "--", &group]).status().unwrap().success());
    child.wait().unwrap();
    let before = jsonl(&results).len();
    assert!((1..7).contains(&before), "{before} cells before the kill");

    let rerun = bench_table(&args, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{stderr}");
    assert_eq!(stderr.matches("done before, skipped").count(), before, "{stderr}");
    let records = jsonl(&results);
    assert_eq!(records.len(), 7, "each cell recorded once");
    for (row, flags) in ROWS {
        let r = records.iter().find(|r| r["row"] == row).unwrap_or_else(|| panic!("row {row}"));
        assert_eq!(r["status"], "ok");
        assert_eq!(r["images"], 12);
        let cell_args: Vec<&str> =
            r["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert_eq!(&cell_args[..flags.len()], flags, "row {row} runs the published flags");
        let cell = read_json(std::path::Path::new(r["result_json"].as_str().unwrap()));
        assert_eq!(cell["top1"], r["top1"]);
        // The same flags through a plain eval give the same per-image predictions: checked for
        // the float row and the paper's row (each eval costs CI time; every row's flags are
        // checked above).
        if !["fp32", "ours-8-8-4"].contains(&row) {
            continue;
        }
        let plain = out.path().join(format!("plain-{row}.json"));
        let mut eval = vec!["eval", "vit_tiny", &s, "--weights-dir", &w];
        eval.extend(&cell_args);
        eval.extend(["--json", plain.to_str().unwrap()]);
        let o = cli(&eval);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(cell["predictions"], read_json(&plain)["predictions"], "row {row}");
    }
    let render =
        bench_table(&["render", "--models", "vit_tiny", "--out", &out_dir], &[]).output().unwrap();
    let table = String::from_utf8_lossy(&render.stdout);
    assert!(render.status.success() && table.contains("| ViT-T |"), "{table}");
    assert!(!table.contains("not run") && !table.contains("failed"), "{table}");
    let csv = std::fs::read_to_string(out.path().join("results.csv")).unwrap();
    assert!(csv.starts_with(
        "model,top1,top1_err,top5,top5_err,param_count,img_size,crop_pct,interpolation,"
    ));
    assert_eq!(csv.lines().count(), 8, "{csv}");
}

#[test]
fn bench_table_runs_all_eight_architectures_from_a_weights_folder_and_the_hf_cache() {
    use fqvit_models::ModelName;
    let tmp = tempfile::tempdir().unwrap();
    let (weights, cache, out) =
        (tmp.path().join("weights"), tmp.path().join("hub"), tmp.path().join("out"));
    for (i, model) in ModelName::ALL.into_iter().enumerate() {
        let file = weights.join(model.weights_folder()).join("model.safetensors");
        random_checkpoint(model, &file);
        if i % 2 == 1 {
            put_in_hf_cache(&cache, model, &file);
        }
    }
    // A corrupt checkpoint fails its own cells only.
    let bad = weights.join(ModelName::VitTiny.weights_folder()).join("model.safetensors");
    let len = std::fs::metadata(&bad).unwrap().len();
    std::fs::File::options().write(true).open(&bad).unwrap().set_len(len / 2).unwrap();
    let s = sample();
    let names: Vec<&str> = ModelName::ALL.iter().map(|m| m.as_str()).collect();
    let models = names.join(",");
    let o = bench_table(
        &[
            "--models",
            &models,
            "--rows",
            "fp32,ours-8-8-4",
            "--data",
            &s,
            "--weights-dir",
            weights.to_str().unwrap(),
            "--offline",
            "--limit",
            "2",
            "--calib-batchsize",
            "2",
            "--calib-iter",
            "1",
            "--val-batchsize",
            "2",
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ],
        &[("HF_HUB_CACHE", &cache)],
    )
    .output()
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "the corrupt checkpoint's cells fail the run");
    assert!(stderr.contains("2 cell(s) failed: vit_tiny fp32, vit_tiny ours-8-8-4"), "{stderr}");
    for (i, model) in ModelName::ALL.into_iter().enumerate().skip(1) {
        let ck = model.hub();
        let expect = if i % 2 == 1 {
            format!("snapshots/{}", ck.revision)
        } else {
            weights.display().to_string()
        };
        assert!(
            stderr.contains(&format!("weights {model}: "))
                && stderr
                    .lines()
                    .any(|l| l.starts_with(&format!("weights {model}: ")) && l.contains(&expect)),
            "{model} from {expect}:\n{stderr}"
        );
    }
    let records = jsonl(&out.join("cells.jsonl"));
    assert_eq!(records.len(), 18);
    let ok = records.iter().filter(|r| r["status"] == "ok").count();
    assert_eq!(ok, 16, "{stderr}");
    let header = stdout.lines().find(|l| l.starts_with("| Method |")).unwrap();
    for h in ["ViT-T", "DeiT-T", "DeiT-S", "DeiT-B", "ViT-B", "ViT-L", "Swin-T", "Swin-S", "Swin-B"]
    {
        assert!(header.contains(h), "{header}");
    }
    let fp32 = stdout.lines().find(|l| l.starts_with("| Full Precision |")).unwrap();
    assert!(fp32.contains("**failed**") && !fp32.contains("not run"), "{fp32}");
    let minmax = stdout.lines().find(|l| l.starts_with("| MinMax |")).unwrap();
    assert_eq!(minmax.matches("not run").count(), 9, "{minmax}");
}

#[test]
fn bench_table_refuses_missing_checkpoints_and_an_unusable_out_before_any_cell() {
    let tmp = tempfile::tempdir().unwrap();
    let (empty, out) = (tmp.path().join("empty"), tmp.path().join("out"));
    std::fs::create_dir_all(&empty).unwrap();
    let s = sample();
    let o = bench_table(
        &[
            "run",
            "--models",
            "deit_tiny,swin_base",
            "--data",
            &s,
            "--offline",
            "--weights-dir",
            empty.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[("HF_HOME", &empty)],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("2 checkpoint(s) missing, nothing was run"), "{stderr}");
    for name in ["deit_tiny_patch16_224.fb_in1k", "swin_base_patch4_window7_224.ms_in1k"] {
        assert!(
            stderr
                .contains(&format!("{}/{name}/model.safetensors does not exist", empty.display())),
            "{stderr}"
        );
    }
    let hub = empty.join("hub/models--timm--deit_tiny_patch16_224.fb_in1k/snapshots");
    assert!(stderr.contains(&hub.display().to_string()), "the HF cache under HF_HOME: {stderr}");
    assert!(!out.join("cells.jsonl").exists());

    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let o = bench_table(
        &[
            "run",
            "--models",
            "vit_tiny",
            "--data",
            &s,
            "--offline",
            "--out",
            file.join("sub").to_str().unwrap(),
        ],
        &[],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("--out"), "{stderr}");
    let p = std::path::Path::new;
    let sparse = [
        ("SLURM_ARRAY_TASK_ID", p("5")),
        ("SLURM_ARRAY_TASK_COUNT", p("2")),
        ("SLURM_ARRAY_TASK_MIN", p("3")),
        ("SLURM_ARRAY_TASK_MAX", p("5")),
    ];
    let o = bench_table(&["run", "--data", &s], &sparse).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("sparse or stepped (tasks 3..=5 but 2 of them)"), "{stderr}");
    let o = bench_table(&["run", "--shard", "2/2", "--data", &s], &[]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected I/N with 0 <= I < N"));
}

#[test]
fn bench_table_shards_split_the_cells_and_render_merges_them() {
    let out = tempfile::tempdir().unwrap();
    let (s, w) = (sample(), weights_dir());
    let out_dir = out.path().to_str().unwrap().to_owned();
    let common = [
        "run",
        "--models",
        "vit_tiny",
        "--rows",
        "fp32,minmax,ema",
        "--data",
        &s,
        "--weights-dir",
        &w,
        "--offline",
        "--limit",
        "4",
        "--calib-batchsize",
        "4",
        "--calib-iter",
        "1",
        "--device",
        "cpu",
        "--out",
        &out_dir,
    ];
    let mut first = common.to_vec();
    first.extend(["--shard", "0/2"]);
    let ok = |o: Output| assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok(bench_table(&first, &[]).output().unwrap());
    // The second shard from Slurm's array variables.
    let (id, count) = (std::path::Path::new("1"), std::path::Path::new("2"));
    ok(bench_table(&common, &[("SLURM_ARRAY_TASK_ID", id), ("SLURM_ARRAY_TASK_COUNT", count)])
        .output()
        .unwrap());
    let rows = |f: &str| -> Vec<String> {
        jsonl(&out.path().join(f)).iter().map(|r| r["row"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(rows("cells.shard-0-of-2.jsonl"), ["fp32", "ema"]);
    assert_eq!(rows("cells.shard-1-of-2.jsonl"), ["minmax"]);
    let render =
        bench_table(&["render", "--models", "vit_tiny", "--out", &out_dir], &[]).output().unwrap();
    let table = String::from_utf8_lossy(&render.stdout);
    for row in ["| Full Precision |", "| MinMax |", "| EMA |"] {
        let line = table.lines().find(|l| l.starts_with(row)).unwrap();
        assert!(!line.contains("not run"), "{line}");
    }
}

#[test]
fn output_paths_are_checked_before_calibration_and_non_finite_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, w) = (sample(), weights_dir());
    let nowhere = tmp.path().join("no/such/dir/out.json");
    let o = cli(&[
        "eval",
        "vit_tiny",
        &s,
        "--weights-dir",
        &w,
        "--quant",
        "--json",
        nowhere.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("--json") && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert!(!stderr.contains("calibrated on"), "refused before calibrating: {stderr}");
    let artifact = tmp.path().join("missing/q.safetensors");
    fails_with(
        &["quantize", "vit_tiny", &s, "--weights-dir", &w, "-o", artifact.to_str().unwrap()],
        &format!(
            "-o {}: the folder {} does not exist",
            artifact.display(),
            artifact.parent().unwrap().display()
        ),
    );

    // One NaN in one tensor: the load names it.
    let file = tmp.path().join("nan.safetensors");
    let (vs, _m) = fqvit_testkit::seeded(0, || {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let m = fqvit_models::ModelName::VitTiny.config().build(&vs.root());
        (vs, m)
    });
    tch::no_grad(|| {
        let vars = vs.variables();
        let t = &vars["blocks.3.mlp.fc1.weight"];
        let _ = t.view(-1).get(5).fill_(f64::NAN);
    });
    vs.save(&file).unwrap();
    fails_with(
        &["eval", "vit_tiny", &s, "--weights", file.to_str().unwrap(), "--limit", "1"],
        "tensor `blocks.3.mlp.fc1.weight` holds 1 NaN or infinite values (first at flat index 5)",
    );
}

#[test]
fn the_slurm_scripts_and_the_device_check_parse() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let doc = std::fs::read_to_string(root.join("docs/slurm.md")).unwrap();
    let mut blocks = 0;
    for block in doc.split("```bash\n").skip(1) {
        let script = block.split("```").next().unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), script).unwrap();
        let o = Command::new("bash").arg("-n").arg(file.path()).output().unwrap();
        assert!(o.status.success(), "bash -n:\n{script}\n{}", String::from_utf8_lossy(&o.stderr));
        blocks += 1;
    }
    assert!(blocks >= 1, "docs/slurm.md has its scripts in ```bash blocks");
    for needle in [
        "#SBATCH --array=0-",
        "--dependency=afterany:",
        "bench-table fetch",
        "bench-table run",
        "bench-table render",
    ] {
        assert!(doc.contains(needle), "docs/slurm.md lacks {needle}");
    }
    let o = Command::new("bash")
        .arg("-n")
        .arg(root.join("xtask/scripts/device_check.sh"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A stand-in for the hub's `resolve` endpoint on loopback: answers every request with `body`
/// (byte ranges as asked) and the headers hf-hub reads; records the paths requested.
fn fake_hub(
    body: Vec<u8>,
    commit: &'static str,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let paths = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = paths.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut first, mut range) = (String::new(), None);
            reader.read_line(&mut first).unwrap();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = v.trim().split_once('-').unwrap();
                    range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
                }
            }
            seen.lock().unwrap().push(first.split_whitespace().nth(1).unwrap_or("").to_owned());
            let (start, end) =
                range.map_or((0, body.len() - 1), |(a, b)| (a, b.unwrap_or(body.len() - 1)));
            let part = &body[start..=end.min(body.len() - 1)];
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{}\r\nx-repo-commit: {commit}\r\netag: \"0123abcd\"\r\nConnection: close\r\n\r\n",
                part.len(),
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(part));
        }
    });
    (url, paths)
}

#[test]
fn fetch_downloads_the_pinned_commit_and_refuses_bytes_that_are_not_the_pinned_file() {
    let ck = fqvit_models::ModelName::DeitTiny.hub();
    let (url, paths) =
        fake_hub(b"these bytes are not the pinned checkpoint".repeat(1000), ck.revision);
    let tmp = tempfile::tempdir().unwrap();
    let (cache, out) = (tmp.path().join("hub"), tmp.path().join("out"));
    let o = bench_table(
        &["fetch", "--models", "deit_tiny", "--out", out.to_str().unwrap()],
        &[("HF_HUB_CACHE", &cache), ("HF_ENDPOINT", std::path::Path::new(&url))],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    let wanted = format!("/{}/resolve/{}/{}", ck.repo, ck.revision, ck.file);
    let asked = paths.lock().unwrap().clone();
    assert!(!asked.is_empty() && asked.iter().all(|p| *p == wanted), "{asked:?}");
    assert!(
        stderr.contains(&format!(
            "but {}@{} publishes {}; it was removed from the cache",
            ck.repo, ck.revision, ck.sha256
        )),
        "{stderr}"
    );
    let repo = cache.join("models--timm--deit_tiny_patch16_224.fb_in1k");
    assert!(repo.join("blobs").is_dir(), "hf-hub downloaded into the HF cache layout");
    assert!(!repo.join("snapshots").join(ck.revision).join(ck.file).exists());
    let blobs: Vec<_> =
        std::fs::read_dir(repo.join("blobs")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(blobs.iter().all(|b| b.to_string_lossy().ends_with(".lock")), "{blobs:?}");
}
