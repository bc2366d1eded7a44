//! The observers against the original implementation (`../shared/golden/observers.safetensors`):
//! scales bit-identical, zero points and fake-quantized last batches exact.

use std::path::PathBuf;

use fqvit_observers::{ObserverConfig, ObserverKind, build};
use fqvit_ops::{BitType, ChannelAxis, Granularity, fake_quantize_slice};
use tch::Tensor;

fn golden() -> Vec<(String, Tensor)> {
    let dir = std::env::var_os("FQVIT_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    let path = dir.join("golden/observers.safetensors");
    assert!(
        path.is_file(),
        "golden observers missing at {} (set FQVIT_SHARED_DIR)",
        path.display()
    );
    Tensor::read_safetensors(&path).expect("golden file reads")
}

fn get<'a>(g: &'a [(String, Tensor)], key: &str) -> &'a Tensor {
    &g.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no {key} in the golden file")).1
}

fn vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.contiguous().view(-1)).unwrap()
}

#[track_caller]
fn check(kind: ObserverKind, bits: &str) {
    let g = golden();
    let bit_type = if bits == "int8" { BitType::INT8 } else { BitType::UINT8 };
    let granularity =
        if kind == ObserverKind::Ptf { Granularity::ChannelWise } else { Granularity::LayerWise };
    let mut obs = build(&ObserverConfig { kind, bit_type, granularity }, false).unwrap();
    for b in 0..5 {
        obs.update(get(&g, &format!("batch{b}"))).unwrap();
    }
    let p = obs.finish().unwrap();
    let name = format!("{}.{bits}", kind.as_str());
    let scale = vec(get(&g, &format!("{name}.scale")));
    let zero = vec(get(&g, &format!("{name}.zero_point")));
    assert_eq!(
        p.scale.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
        scale.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
        "{name}: scales {:?} vs {scale:?}",
        p.scale
    );
    assert_eq!(
        p.zero_point,
        zero.iter().map(|&z| z as i32).collect::<Vec<_>>(),
        "{name}: zero points"
    );
    let mut fq = vec(get(&g, "batch4"));
    fake_quantize_slice(&mut fq, &p.scale, &p.zero_point, bit_type, ChannelAxis::Last);
    let expected = vec(get(&g, &format!("{name}.fake_quant_last_batch")));
    let wrong = fq.iter().zip(&expected).filter(|(a, b)| a != b).count();
    assert_eq!(wrong, 0, "{name}: {wrong} of {} fake-quantized values differ", fq.len());
}

#[test]
fn minmax() {
    check(ObserverKind::MinMax, "uint8");
    check(ObserverKind::MinMax, "int8");
}

#[test]
fn ema() {
    check(ObserverKind::Ema, "uint8");
    check(ObserverKind::Ema, "int8");
}

#[test]
fn percentile() {
    check(ObserverKind::Percentile, "uint8");
    check(ObserverKind::Percentile, "int8");
}

#[test]
fn omse() {
    check(ObserverKind::Omse, "uint8");
    check(ObserverKind::Omse, "int8");
}

#[test]
fn ptf() {
    check(ObserverKind::Ptf, "uint8");
}

#[test]
fn unsupported_configurations_are_refused() {
    let cfg = |kind, granularity| ObserverConfig { kind, bit_type: BitType::UINT8, granularity };
    let err = build(&cfg(ObserverKind::Percentile, Granularity::ChannelWise), false).unwrap_err();
    assert!(err.to_string().contains("percentile observer is layer-wise only"), "{err}");
    assert!(build(&cfg(ObserverKind::Ptf, Granularity::LayerWise), false).is_err());
    assert!(build(&cfg(ObserverKind::Omse, Granularity::ChannelWise), false).is_err());
    let mut ptf = build(&cfg(ObserverKind::Ptf, Granularity::ChannelWise), false).unwrap();
    let err =
        ptf.update(&Tensor::zeros([2, 3, 4, 5], (tch::Kind::Float, tch::Device::Cpu))).unwrap_err();
    assert!(err.to_string().contains("(B, N, C)"), "{err}");
    let empty = build(&cfg(ObserverKind::MinMax, Granularity::LayerWise), false).unwrap();
    assert!(matches!(empty.finish(), Err(fqvit_observers::Error::Empty)));
}
