//! The observers against the original implementation (`../shared/golden/observers.safetensors`):
//! scales bit-identical, zero points and fake-quantized last batches exact.

use std::path::PathBuf;

use fqvit_observers::{ObserverConfig, ObserverKind, PtfRange, build};
use fqvit_ops::{BitType, ChannelAxis, Granularity, PtfFactor, fake_quantize_slice};
use tch::Tensor;

/// The original's PTF observer (factors 0..=3).
const PTF: ObserverKind =
    ObserverKind::Ptf { max_factor: PtfFactor::ORIGINAL_MAX, range: PtfRange::MinMax };

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
    let granularity = if kind == PTF { Granularity::ChannelWise } else { Granularity::LayerWise };
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
    check(PTF, "uint8");
}

fn fit_ptf(xs: &Tensor, max: u8, range: PtfRange) -> (fqvit_ops::QParams, Vec<f32>) {
    let max_factor = PtfFactor::try_from(max).unwrap();
    let cfg = ObserverConfig {
        kind: ObserverKind::Ptf { max_factor, range },
        bit_type: BitType::UINT8,
        granularity: Granularity::ChannelWise,
    };
    let mut obs = build(&cfg, false).unwrap();
    obs.update(xs).unwrap();
    let p = obs.finish().unwrap();
    let mut fq = vec(xs);
    fake_quantize_slice(&mut fq, &p.scale, &p.zero_point, BitType::UINT8, ChannelAxis::Last);
    (p, fq)
}

fn alphas(p: &fqvit_ops::QParams) -> Vec<u8> {
    p.ptf.as_ref().unwrap().iter().map(|f| f.get()).collect()
}

/// The mean squared error of channel `c` of two channels.
fn channel_mse(xs: &Tensor, fq: &[f32], c: usize) -> f64 {
    let x = vec(xs);
    let n = x.len() / 2;
    fq.iter().zip(&x).skip(c).step_by(2).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>()
        / n as f64
}

fn two_channels(wide: (f64, f64), narrow: (f64, f64)) -> Tensor {
    let n = 1000;
    let opts = (tch::Kind::Float, tch::Device::Cpu);
    let wide = Tensor::linspace(wide.0, wide.1, n, opts);
    let narrow = Tensor::linspace(narrow.0, narrow.1, n, opts);
    Tensor::stack(&[wide, narrow], -1).view([1, n, 2])
}

/// A wider factor range gives a narrow channel beside a wide one a finer scale: with channels
/// spanning ±100 and ±0.5, factors up to 3 leave the narrow one a scale of `s8 / 8` (about
/// 0.1, a dozen codes), factors up to 7 give it `s8 / 128`, and its error falls accordingly.
#[test]
fn ptf_with_a_wider_factor_range() {
    let xs = two_channels((-100.0, 100.0), (-0.5, 0.5));
    let (p3, fq3) = fit_ptf(&xs, 3, PtfRange::MinMax);
    let (p7, fq7) = fit_ptf(&xs, 7, PtfRange::MinMax);
    assert_eq!(alphas(&p3), [3, 0]);
    assert_eq!(alphas(&p7), [7, 0]);
    assert_eq!(p3.scale[0].to_bits(), p7.scale[0].to_bits(), "the wide channel keeps s8");
    assert_eq!(p7.scale[1], p3.scale[1] / 16.0);
    let (mse3, mse7) = (channel_mse(&xs, &fq3, 1), channel_mse(&xs, &fq7, 1));
    assert!(mse7 < mse3 / 100.0, "narrow channel MSE {mse7:e} against {mse3:e}");
    assert!(PtfFactor::try_from(8).is_err());
}

/// One large negative channel puts the min-max zero point near 255, leaving a symmetric
/// narrow channel 14 codes above zero (scale `s8 / 16`, clipping its top); the symmetric
/// range centres the zero point (128) and the narrow channel gets the finest scale, `s8 / 128`
/// of a range twice as wide: four times finer, and its error falls by more than ten.
#[test]
fn ptf_with_the_symmetric_range() {
    let xs = two_channels((-500.0, 30.0), (-2.0, 2.0));
    let (asym, fq_asym) = fit_ptf(&xs, 7, PtfRange::MinMax);
    let (sym, fq_sym) = fit_ptf(&xs, 7, PtfRange::Symmetric);
    assert_eq!(asym.zero_point, [241]);
    assert_eq!(sym.zero_point, [128]);
    assert_eq!(sym.scale[0], 1000.0f32 / 255.0, "s8 from [−500, 500]");
    assert_eq!((alphas(&asym), alphas(&sym)), (vec![7, 3], vec![7, 0]));
    assert!(sym.scale[1] * 4.0 < asym.scale[1], "{} against {}", sym.scale[1], asym.scale[1]);
    let (mse_asym, mse_sym) = (channel_mse(&xs, &fq_asym, 1), channel_mse(&xs, &fq_sym, 1));
    assert!(mse_sym < mse_asym / 10.0, "narrow channel MSE {mse_sym:e} against {mse_asym:e}");
}

#[test]
fn unsupported_configurations_are_refused() {
    let cfg = |kind, granularity| ObserverConfig { kind, bit_type: BitType::UINT8, granularity };
    let err = build(&cfg(ObserverKind::Percentile, Granularity::ChannelWise), false).unwrap_err();
    assert!(err.to_string().contains("percentile observer is layer-wise only"), "{err}");
    assert!(build(&cfg(PTF, Granularity::LayerWise), false).is_err());
    assert!(build(&cfg(ObserverKind::Omse, Granularity::ChannelWise), false).is_err());
    let mut ptf = build(&cfg(PTF, Granularity::ChannelWise), false).unwrap();
    let err =
        ptf.update(&Tensor::zeros([2, 3, 4, 5], (tch::Kind::Float, tch::Device::Cpu))).unwrap_err();
    assert!(err.to_string().contains("(B, N, C)"), "{err}");
    let empty = build(&cfg(ObserverKind::MinMax, Granularity::LayerWise), false).unwrap();
    assert!(matches!(empty.finish(), Err(fqvit_observers::Error::Empty)));
}
