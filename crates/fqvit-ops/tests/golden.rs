//! Agreement with the original implementation's golden vectors (`../shared/golden`).

mod common;

use common::read_golden;
use fqvit_ops::layer_norm::{InScale, LayerNormParams, ptf_layer_norm, reference};
use fqvit_ops::softmax::{self, dequantize_log2};
use fqvit_ops::{BitType, ChannelAxis, PtfFactor, fake_quantize_slice, rounding};

#[test]
fn log_int_softmax_float_entry_matches_every_case_exactly() {
    let golden = read_golden("log_int_softmax.safetensors");
    for case in 0..6 {
        let g = |k: &str| &golden[&format!("case{case}.{k}")];
        let (input, scale, bits) = (g("input"), g("scale").f32[0], g("bits").f32[0] as u32);
        let row_len = *input.shape.last().unwrap();
        for (name, kernel) in [
            ("fast", softmax::log_int_softmax_f32 as fn(&[f32], usize, f32, u32, &mut [u16])),
            ("reference", softmax::reference::log_int_softmax_f32),
        ] {
            let mut codes = vec![0u16; input.f32.len()];
            kernel(&input.f32, row_len, scale, bits, &mut codes);
            let mut p = vec![0f32; codes.len()];
            dequantize_log2(&codes, bits, &mut p);
            let wrong =
                p.iter().zip(&g("output").f32).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(
                wrong,
                0,
                "case{case} (S = {scale}, {bits} bits, {name}): {wrong} of {} differ",
                p.len()
            );
        }
    }
}

#[test]
fn log_int_softmax_integer_entry_is_within_one_code_on_at_most_one_percent() {
    let golden = read_golden("log_int_softmax.safetensors");
    for case in 0..6 {
        let g = |k: &str| &golden[&format!("case{case}.{k}")];
        let (input, scale, bits) = (g("input"), g("scale").f32[0], g("bits").f32[0] as u32);
        let row_len = *input.shape.last().unwrap();
        // The logits are (q − 128)·S: recover the exact integer codes.
        let ints: Vec<i32> =
            input.f32.iter().map(|&x| (x / scale).round_ties_even() as i32).collect();
        let mut fast = vec![0u16; ints.len()];
        softmax::log_int_softmax(&ints, row_len, scale, bits, &mut fast);
        let mut reference = vec![0u16; ints.len()];
        softmax::reference::log_int_softmax(&ints, row_len, scale, bits, &mut reference);
        assert_eq!(fast, reference, "case{case}: fast path differs from the reference");
        let expected: Vec<u16> = g("output").f32.iter().map(|&p| golden_code(p, bits)).collect();
        let mut off = 0;
        for (i, (&a, &b)) in fast.iter().zip(&expected).enumerate() {
            if a != b {
                off += 1;
                assert_eq!(a.abs_diff(b), 1, "case{case} element {i}: code {a}, original {b}");
            }
        }
        println!(
            "case{case} (S = {scale}, {bits} bits): integer entry differs on {off} of {} elements",
            fast.len()
        );
        assert!(
            off * 100 <= fast.len(),
            "case{case}: {off} of {} differ (more than 1 %)",
            fast.len()
        );
    }
}

/// The log2 code of a golden probability (`2^-k`, or 0 for the zero flag).
fn golden_code(p: f32, bits: u32) -> u16 {
    if p == 0.0 { 1 << bits } else { (-p.log2()) as u16 }
}

#[test]
fn ptf_layer_norm_matches_every_code_exactly() {
    let golden = read_golden("int_layer_norm.safetensors");
    let mut total = 0;
    for case in 0..4 {
        let g = |k: &str| &golden[&format!("case{case}.{k}")];
        let in_scale = &g("in_scale").f32;
        let zero_point = g("in_zero_point").f32[0] as i32;
        let out_scale = g("out_scale").f32[0];
        let n_channels = in_scale.len();
        let base = in_scale.iter().copied().fold(f32::INFINITY, f32::min);
        let factors: Vec<PtfFactor> = in_scale
            .iter()
            .map(|&s| PtfFactor::try_from((s / base).round().log2() as u8).unwrap())
            .collect();
        let codes: Vec<u8> = g("input")
            .f32
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                ((x / in_scale[i % n_channels]).round_ties_even() as i32 + zero_point) as u8
            })
            .collect();
        let params = LayerNormParams {
            in_scale: InScale::Ptf { base, factors: &factors },
            zero_point,
            bits: fqvit_ops::Bits::BYTE,
            gamma: &g("weight").f32,
            beta: &g("bias").f32,
            out_scale,
        };
        let mut fast = vec![0i32; codes.len()];
        ptf_layer_norm(&codes, &params, &mut fast);
        let mut slow = vec![0i32; codes.len()];
        reference::ptf_layer_norm(&codes, &params, &mut slow);
        assert_eq!(fast, slow, "case{case}: fast path differs from the reference");
        // Compared as values: the original's float rounding gives -0.0 where our integer code is 0.
        let wrong: Vec<usize> = (0..codes.len())
            .filter(|&i| fast[i] as f32 * out_scale != g("output").f32[i])
            .collect();
        assert!(
            wrong.is_empty(),
            "case{case} (C = {n_channels}): {} of {} codes differ, first at {:?}",
            wrong.len(),
            codes.len(),
            &wrong[..wrong.len().min(5)]
        );
        total += codes.len();
    }
    assert_eq!(total, 157_952);
}

#[test]
fn symmetric_int8_weight_quantization_matches_the_original() {
    let golden = read_golden("observers.safetensors");
    let w = &golden["weight.input"];
    let (rows, cols) = (w.shape[0], w.shape[1]);
    let scales: Vec<f32> = w
        .f32
        .chunks_exact(cols)
        .map(|row| {
            let (min, max) = row
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            rounding::symmetric_scale(min, max, BitType::INT8)
        })
        .collect();
    assert_eq!(scales.len(), rows);
    for (i, (a, b)) in scales.iter().zip(&golden["weight.scale"].f32).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "channel {i}: scale {a} vs {b}");
    }
    assert!(golden["weight.zero_point"].f32.iter().all(|&z| z == 0.0));
    let mut fq = w.f32.clone();
    fake_quantize_slice(&mut fq, &scales, &[0], BitType::INT8, ChannelAxis::First);
    let wrong = fq
        .iter()
        .zip(&golden["weight.fake_quant"].f32)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(wrong, 0, "{wrong} fake-quantized weights differ");
}
