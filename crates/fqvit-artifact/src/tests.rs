//! Every refusal of [`Artifact::read`], on a small artifact written here: a weight site, a
//! layer-wise activation, a PTF LayerNorm input and a float parameter.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::*;

type Tensors = HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i32s(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn site(name: &str, class: &str, bits: u8, signed: bool, channels: usize, ptf: bool) -> Value {
    let granularity = if class == "weight" || ptf { "channel-wise" } else { "layer-wise" };
    json!({
        "name": name, "original": name, "class": class,
        "bit_type": format!("{}int{bits}", if signed { "" } else { "u" }),
        "bits": bits, "signed": signed, "observer": "minmax",
        "granularity": granularity, "channels": channels, "ptf": ptf,
    })
}

/// The artifact's tensors and provenance.
fn parts() -> (Tensors, Value) {
    let mut t = Tensors::new();
    t.insert("fc.scale".into(), (Dtype::F32, vec![2], f32s(&[0.5, 0.25])));
    t.insert("fc.zero_point".into(), (Dtype::I32, vec![2], i32s(&[0, 0])));
    t.insert("fc.weight_int8".into(), (Dtype::I8, vec![2, 3], vec![1, 255, 127, 128, 0, 3]));
    t.insert("act.scale".into(), (Dtype::F32, vec![1], f32s(&[0.1])));
    t.insert("act.zero_point".into(), (Dtype::I32, vec![1], i32s(&[128])));
    t.insert("res.scale".into(), (Dtype::F32, vec![3], f32s(&[0.5, 0.125, 1.0])));
    t.insert("res.zero_point".into(), (Dtype::I32, vec![1], i32s(&[100])));
    t.insert("res.ptf_factor".into(), (Dtype::U8, vec![3], vec![2, 0, 3]));
    t.insert("fc.bias".into(), (Dtype::F32, vec![2], f32s(&[0.0, -1.5])));
    let meta = json!({
        "format_version": 2, "model": "tiny", "lis_bits": 4,
        "experiment": {"ptf": true}, "architecture": {"family": "vit"},
        "sites": [
            site("fc", "weight", 8, true, 2, false),
            site("act", "activation", 8, false, 3, false),
            site("res", "layer-norm-input", 8, false, 3, true),
        ],
    });
    (t, meta)
}

fn write(dir: &Path, tensors: &Tensors, meta: &Value) -> PathBuf {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (d, s, b))| {
            (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())
        })
        .collect();
    let path = dir.join("tiny.qparams.safetensors");
    let info = HashMap::from([(METADATA_KEY.to_owned(), meta.to_string())]);
    safetensors::serialize_to_file(views, Some(info), &path).unwrap();
    path
}

/// Reads the artifact with `edit` applied.
fn read_edited(edit: impl FnOnce(&mut Tensors, &mut Value)) -> Result<Artifact> {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, mut m) = parts();
    edit(&mut t, &mut m);
    Artifact::read(&write(dir.path(), &t, &m))
}

#[track_caller]
fn refused(needle: &str, edit: impl FnOnce(&mut Tensors, &mut Value)) {
    let err = read_edited(edit).unwrap_err().to_string();
    assert!(err.contains("tiny.qparams.safetensors: "), "{err}: names the file");
    assert!(err.contains(needle), "{err}\n  lacks {needle:?}");
}

#[test]
fn a_well_formed_artifact_reads_with_its_parameters() {
    let art = read_edited(|_, _| {}).unwrap();
    assert_eq!(art.model(), "tiny");
    assert_eq!(art.lis_bits(), Some(LisBits::FOUR));
    let fc = art.params("fc").unwrap();
    assert_eq!((fc.bit_type, fc.scale.as_slice()), (BitType::INT8, &[0.5, 0.25][..]));
    let res = art.params("res").unwrap();
    let factors: Vec<u8> = res.ptf.as_ref().unwrap().iter().map(|f| f.get()).collect();
    assert_eq!(factors, [2, 0, 3]);
    assert_eq!(art.i8("fc.weight_int8", Some(&[2, 3])).unwrap(), [1, -1, 127, -128, 0, 3]);
    assert!(art.program().is_none());
}

#[test]
fn the_file_and_its_metadata_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (t, m) = parts();
    let path = write(dir.path(), &t, &m);
    let bytes = std::fs::read(&path).unwrap();
    let err =
        Artifact::from_bytes(&path, bytes[..bytes.len() - 7].to_vec()).unwrap_err().to_string();
    assert!(err.contains("truncated or corrupt"), "{err}");
    let err = Artifact::read(&dir.path().join("absent")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    refused("by a newer fqvit", |_, m| m["format_version"] = 3.into());
    refused("format_version 0", |_, m| m["format_version"] = 0.into());
    refused("has no format_version", |_, m| m["format_version"] = "2".into());
    refused("missing field `sites`", |_, m| {
        m.as_object_mut().unwrap().remove("sites");
    });
    refused("9 bits: Log-Int-Softmax takes 2..=8", |_, m| m["lis_bits"] = 9.into());
    refused("shift 9: Log-Int-Softmax's exponential takes 0..=8", |_, m| {
        m["lis_exp_shift"] = 9.into();
    });
    refused("lis_exp_shift 3 without Log-Int-Softmax", |_, m| {
        m["lis_bits"] = serde_json::Value::Null;
        m["lis_exp_shift"] = 3.into();
    });
    refused("tensor fc.bias is F64", |t, _| {
        t.insert("fc.bias".into(), (Dtype::F64, vec![1], vec![0; 8]));
    });
    refused("tensor fc.bias holds NaN at index 1", |t, _| {
        t.get_mut("fc.bias").unwrap().2 = f32s(&[0.0, f32::NAN]);
    });
    refused("tensor fc.bias holds inf at index 0", |t, _| {
        t.get_mut("fc.bias").unwrap().2 = f32s(&[f32::INFINITY, 0.0]);
    });
}

#[test]
fn the_program_is_parsed_and_validated() {
    let dir = tempfile::tempdir().unwrap();
    let (t, m) = parts();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = t
        .iter()
        .map(|(k, (d, s, b))| {
            (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())
        })
        .collect();
    let path = dir.path().join("tiny.qparams.safetensors");
    for (program, needle) in [
        (r#"{"version": 1}"#, "metadata `fqvit-program`: missing field `ops`"),
        (r#"{"version": 1, "ops": []}"#, "program: op 0 is not the image"),
        (
            r#"{"version": 2, "ops": [
                {"op": "image", "size": 32, "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}},
                {"op": "attention", "input": 0, "heads": 2, "lis_bits": 8, "scores_site": "act", "out_site": "act"},
                {"op": "output", "input": 1}]}"#,
            "program op 1: Log-Int-Softmax 8 bits, the provenance's lis_bits 4 bits",
        ),
    ] {
        let info = HashMap::from([
            (METADATA_KEY.to_owned(), m.to_string()),
            (PROGRAM_KEY.to_owned(), program.to_owned()),
        ]);
        safetensors::serialize_to_file(views.clone(), Some(info), &path).unwrap();
        let err = Artifact::read(&path).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}\n  lacks {needle:?}");
    }
}

#[test]
fn every_site_field_is_checked() {
    refused("site act is listed twice", |_, m| {
        let s = m["sites"][1].clone();
        m["sites"].as_array_mut().unwrap().push(s);
    });
    refused("site act: 16 bits is out of range: code widths are 2..=15", |_, m| {
        m["sites"][1]["bits"] = 16.into()
    });
    refused(
        "site act: 9 bits on a site of class activation: only layer-norm-input sites",
        |_, m| {
            m["sites"][1]["bits"] = 9.into();
            m["sites"][1]["bit_type"] = "uint9".into();
        },
    );
    refused("site fc: 12 bits on a site of class weight", |_, m| {
        m["sites"][0]["bits"] = 12.into();
        m["sites"][0]["bit_type"] = "int12".into();
    });
    // The residual stream may be wider, with PTF factors up to 15 − bits.
    let wide = |m: &mut Value, bits: u8| {
        m["sites"][2]["bits"] = bits.into();
        m["sites"][2]["bit_type"] = format!("uint{bits}").into();
    };
    read_edited(|_, m| wide(m, 12)).expect("12-bit residual codes with factors up to 3");
    refused("site res: PTF factor 3 takes 13-bit codes beyond 2^15 (at most 2)", |_, m| {
        wide(m, 13)
    });
    refused("site act: bit_type uint6 disagrees with bits 8", |_, m| {
        m["sites"][1]["bit_type"] = "uint6".into();
    });
    refused("site fc: a weight site with uint8 codes", |_, m| {
        m["sites"][0]["signed"] = false.into();
        m["sites"][0]["bit_type"] = "uint8".into();
    });
    refused("unknown variant `bias`", |_, m| m["sites"][1]["class"] = "bias".into());
    refused("site act: 0 channels", |_, m| m["sites"][1]["channels"] = 0.into());
    refused("has no tensor act.scale", |t, _| {
        t.remove("act.scale");
    });
    refused("tensor act.zero_point is F32, expected I32", |t, _| {
        t.get_mut("act.zero_point").unwrap().0 = Dtype::F32;
    });
    refused("site fc: 1 scales and 1 zero points for 2 channels", |t, _| {
        t.insert("fc.scale".into(), (Dtype::F32, vec![1], f32s(&[0.5])));
        t.insert("fc.zero_point".into(), (Dtype::I32, vec![1], i32s(&[0])));
    });
    refused("site act: 2 scales and 1 zero points for 3 channels", |t, _| {
        t.insert("act.scale".into(), (Dtype::F32, vec![2], f32s(&[0.5, 0.5])));
    });
    refused("site act: granularity channel-wise with 1 scales", |_, m| {
        m["sites"][1]["granularity"] = "channel-wise".into();
    });
    refused("site act: scale 0 is not positive", |t, _| {
        t.get_mut("act.scale").unwrap().2 = f32s(&[0.0]);
    });
    refused("site act: scale -0.1 is not positive", |t, _| {
        t.get_mut("act.scale").unwrap().2 = f32s(&[-0.1]);
    });
    refused("site act: zero point 256 is outside the uint8 codes 0..=255", |t, _| {
        t.get_mut("act.zero_point").unwrap().2 = i32s(&[256]);
    });
    refused("site act: zero point 128 is outside the uint6 codes 0..=63", |_, m| {
        m["sites"][1]["bits"] = 6.into();
        m["sites"][1]["bit_type"] = "uint6".into();
    });
}

#[test]
fn ptf_factors_and_weight_codes_are_checked() {
    refused("tensor act.ptf_factor on a site without PTF", |t, _| {
        t.insert("act.ptf_factor".into(), (Dtype::U8, vec![3], vec![0; 3]));
    });
    refused("has no tensor res.ptf_factor", |t, _| {
        t.remove("res.ptf_factor");
    });
    refused("tensor res.ptf_factor has shape [2], expected [3]", |t, _| {
        t.insert("res.ptf_factor".into(), (Dtype::U8, vec![2], vec![0; 2]));
    });
    refused("site res: PTF factor 8 is out of range 0..=7", |t, _| {
        t.get_mut("res.ptf_factor").unwrap().2 = vec![2, 0, 8];
    });
    refused("site res: PTF needs one scale per channel and one zero point, not 3 and 3", |t, _| {
        t.insert("res.zero_point".into(), (Dtype::I32, vec![3], i32s(&[1, 2, 3])));
    });
    refused("site res: scale 2 is not base · 2^α", |t, _| {
        t.get_mut("res.scale").unwrap().2 = f32s(&[0.5, 0.125, 0.75]);
    });
    refused("has no tensor fc.weight_int8", |t, _| {
        t.remove("fc.weight_int8");
    });
    refused("tensor fc.weight_int8 has shape [3, 2]: 2 rows expected", |t, _| {
        t.get_mut("fc.weight_int8").unwrap().1 = vec![3, 2];
    });
    refused("tensor fc.weight_int8 holds code 127, outside the int4 codes -8..=7", |_, m| {
        m["sites"][0]["bits"] = 4.into();
        m["sites"][0]["bit_type"] = "int4".into();
    });
}
