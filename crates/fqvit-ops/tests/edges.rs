//! The edge-shape table: fast path equals reference on model shapes and awkward rows, no
//! overflow at the extremes of every input range (tests build with overflow checks), and the
//! documented results and panics on bad input.

use std::panic::{AssertUnwindSafe, catch_unwind};

use fqvit_ops::PtfFactor;
use fqvit_ops::layer_norm::{InScale, LayerNormParams, ptf_layer_norm, reference as ln_ref};
use fqvit_ops::softmax::{self, reference as lis_ref};

/// A small deterministic generator (xorshift), so the table needs no RNG crate.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[track_caller]
fn check_ln(
    n_channels: usize,
    n_tokens: usize,
    codes: Vec<u8>,
    zero_point: i32,
    alphas: &[u8],
    base: f32,
    out_scale: f32,
) {
    let factors: Vec<PtfFactor> = alphas.iter().map(|&a| PtfFactor::try_from(a).unwrap()).collect();
    let gamma: Vec<f32> = (0..n_channels).map(|c| 0.5 + (c % 7) as f32 * 0.25).collect();
    let beta: Vec<f32> = (0..n_channels).map(|c| (c % 5) as f32 * 0.1 - 0.2).collect();
    let params = LayerNormParams {
        in_scale: InScale::Ptf { base, factors: &factors },
        zero_point,
        bits: fqvit_ops::Bits::BYTE,
        gamma: &gamma,
        beta: &beta,
        out_scale,
    };
    let (mut fast, mut slow) = (vec![0; codes.len()], vec![0; codes.len()]);
    ptf_layer_norm(&codes, &params, &mut fast);
    ln_ref::ptf_layer_norm(&codes, &params, &mut slow);
    assert_eq!(fast, slow, "C = {n_channels}, T = {n_tokens}");
}

#[test]
fn ln_edge_table() {
    let mut rng = Gen(0x5eed);
    for &c in &[1usize, 3, 64, 192, 384, 768, 1024] {
        for &t in &[1usize, 49, 197] {
            let alphas: Vec<u8> = (0..c).map(|_| rng.below(4) as u8).collect();
            let random: Vec<u8> = (0..c * t).map(|_| rng.below(256) as u8).collect();
            check_ln(c, t, random.clone(), 128, &alphas, 0.01, 0.03);
            // Extremes: codes at both bounds with the zero point at the other, factor 3 everywhere.
            let extreme: Vec<u8> = (0..c * t).map(|i| if i % 2 == 0 { 0 } else { 255 }).collect();
            check_ln(c, t, extreme.clone(), 0, &vec![3; c], 1e-4, 0.03);
            check_ln(c, t, extreme.clone(), 255, &vec![3; c], 1e3, 0.03);
            // All equal (zero variance) and one outlier per token.
            check_ln(c, t, vec![77; c * t], 12, &alphas, 0.02, 0.03);
            let outlier: Vec<u8> = (0..c * t).map(|i| if i % c == 0 { 255 } else { 100 }).collect();
            check_ln(c, t, outlier.clone(), 100, &alphas, 0.02, 0.03);
            // The widest factors (shifts up to 7, |x| up to 32,640): mixed, at the extremes, and
            // an outlier channel at factor 7, with output scales small enough that |M·x| / 2^N
            // leaves the float32 path (codes beyond 2^21).
            let wide: Vec<u8> = (0..c).map(|_| rng.below(8) as u8).collect();
            let mut outlier_wide = vec![0u8; c];
            outlier_wide[0] = 7;
            let alternate: Vec<u8> = (0..c).map(|i| if i % 2 == 0 { 7 } else { 0 }).collect();
            for out_scale in [0.03, 1e-3, 1e-5, 1e-7] {
                check_ln(c, t, random.clone(), 128, &wide, 0.01, out_scale);
                check_ln(c, t, extreme.clone(), 0, &alternate, 1e-4, out_scale);
                check_ln(c, t, extreme.clone(), 255, &wide, 1e3, out_scale);
                check_ln(c, t, outlier.clone(), 100, &outlier_wide, 0.02, out_scale);
            }
        }
    }
}

#[test]
fn ln_multipliers_just_below_powers_of_two() {
    // Codes z ± 64 over 2^16 channels make σ = 64·s_min exactly, so A = γ/64/s_out = 4γ for
    // s_out = 2^-8. γ = 2 − c·2^-23 puts A just below 8, where float32 log2 rounds up to 3 for
    // the first channels and the fast path must not read N off the exponent.
    let c = 1 << 16;
    let gamma: Vec<f32> = (0..c).map(|i| 2.0 - i as f32 * f32::EPSILON / 2.0).collect();
    let beta: Vec<f32> = (0..c).map(|i| (i % 11) as f32 * 0.01 - 0.05).collect();
    let codes: Vec<u8> = (0..2 * c).map(|i| if i % 2 == 0 { 64 } else { 192 }).collect();
    for out_scale in [1.0 / 256.0, 0.1, 1e-13, 1e13] {
        let params = LayerNormParams {
            in_scale: InScale::Layer(0.02),
            zero_point: 128,
            bits: fqvit_ops::Bits::BYTE,
            gamma: &gamma,
            beta: &beta,
            out_scale,
        };
        let (mut fast, mut slow) = (vec![0; codes.len()], vec![0; codes.len()]);
        ptf_layer_norm(&codes, &params, &mut fast);
        ln_ref::ptf_layer_norm(&codes, &params, &mut slow);
        let differ = fast.iter().zip(&slow).filter(|(f, s)| f != s).count();
        assert_eq!(differ, 0, "out-scale {out_scale}: {differ} codes differ");
    }
    // The case is a real one: the reference's N differs from the exponent's for some channels.
    let exponent_n = |a: f32| 7 - ((a.to_bits() >> 23) as i32 - 127);
    let rounded_up =
        gamma.iter().filter(|&&g| ln_ref::get_mn(4.0 * g).1 as i32 != exponent_n(4.0 * g)).count();
    assert!(rounded_up > 0);
}

#[test]
fn ln_zero_variance_gives_beta_over_out_scale() {
    let (gamma, beta) = ([1.0f32, 2.0, 3.0], [0.3f32, -0.6, 0.0]);
    let params = LayerNormParams {
        in_scale: InScale::Layer(0.1),
        zero_point: 5,
        bits: fqvit_ops::Bits::BYTE,
        gamma: &gamma,
        beta: &beta,
        out_scale: 0.1,
    };
    let mut y = [0i32; 3];
    ptf_layer_norm(&[9u8, 9, 9], &params, &mut y);
    assert_eq!(y, [3, -6, 0]);
}

#[track_caller]
fn check_lis(row_len: usize, codes: &[i32], scale: f32) {
    for bits in [4, 8] {
        let (mut fast, mut slow) = (vec![0u16; codes.len()], vec![0u16; codes.len()]);
        softmax::log_int_softmax(codes, row_len, scale, bits, &mut fast);
        lis_ref::log_int_softmax(codes, row_len, scale, bits, &mut slow);
        assert_eq!(fast, slow, "row {row_len}, S = {scale}, {bits} bits");
        let logits: Vec<f32> = codes.iter().map(|&q| q as f32 * scale).collect();
        softmax::log_int_softmax_f32(&logits, row_len, scale, bits, &mut fast);
        lis_ref::log_int_softmax_f32(&logits, row_len, scale, bits, &mut slow);
        assert_eq!(fast, slow, "float entry: row {row_len}, S = {scale}, {bits} bits");
    }
}

#[test]
fn lis_edge_table() {
    let mut rng = Gen(0xfeed);
    for &len in &[1usize, 2, 3, 49, 64, 197, 2048] {
        for &rows in &[1usize, 2, 49] {
            for &scale in &[softmax::MIN_SCALE, 0.011, 0.1, 0.7, 10.0] {
                let random: Vec<i32> =
                    (0..len * rows).map(|_| rng.below(511) as i32 - 255).collect();
                check_lis(len, &random, scale);
                check_lis(len, &vec![-255; len * rows], scale);
                let repeated_max: Vec<i32> =
                    (0..len * rows).map(|i| if i % 3 == 0 { 255 } else { -3 }).collect();
                check_lis(len, &repeated_max, scale);
                let dominant: Vec<i32> =
                    (0..len * rows).map(|i| if i % len == len / 2 { 255 } else { -255 }).collect();
                check_lis(len, &dominant, scale);
            }
        }
    }
}

#[test]
fn lis_constant_row_is_uniform() {
    // Four equal logits: u = 4 for each, log_round(4) = 2, probability 1/4.
    let mut out = [0u16; 4];
    softmax::log_int_softmax(&[7, 7, 7, 7], 4, 0.05, 4, &mut out);
    assert_eq!(out, [2; 4]);
}

#[test]
fn log_round_examples_from_the_spec() {
    let codes: Vec<u32> =
        [1u64, 2, 3, 4, 5, 6, 7, 12, 1 << 40].iter().map(|&u| lis_ref::log_round(u)).collect();
    assert_eq!(codes, [0, 1, 2, 2, 2, 3, 3, 4, 40]);
}

#[test]
fn get_mn_table_from_the_spec() {
    // |A| ∈ {0, 1e-3, 0.2, 1, 255.9, 300} (spec §14).
    let mn: Vec<(i32, u32)> =
        [0.0f32, 1e-3, 0.2, 1.0, 255.9, 300.0].iter().map(|&a| ln_ref::get_mn(a)).collect();
    assert_eq!(mn, [(0, 31), (131, 17), (204, 10), (128, 7), (255, 0), (255, 0)]);
}

/// The panic message of `f`, which must panic.
#[track_caller]
fn panic_message(f: impl FnOnce()) -> String {
    let err = catch_unwind(AssertUnwindSafe(f)).expect_err("expected a documented panic");
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn mismatched_inputs_panic_at_the_entry_with_a_message() {
    let (gamma, beta) = ([1.0f32; 4], [0.0f32; 3]);
    let params = LayerNormParams {
        in_scale: InScale::Layer(0.1),
        zero_point: 0,
        bits: fqvit_ops::Bits::BYTE,
        gamma: &gamma,
        beta: &beta,
        out_scale: 0.1,
    };
    let msg = panic_message(|| ptf_layer_norm(&[0u8; 4], &params, &mut [0; 4]));
    assert!(msg.contains("β has 3 channels"), "{msg}");
    let params = LayerNormParams { beta: &gamma, ..params };
    let msg = panic_message(|| ptf_layer_norm(&[0u8; 6], &params, &mut [0; 6]));
    assert!(msg.contains("not whole tokens"), "{msg}");
    let msg = panic_message(|| softmax::log_int_softmax(&[0; 6], 4, 0.1, 4, &mut [0; 6]));
    assert!(msg.contains("not whole rows"), "{msg}");
    let msg = panic_message(|| softmax::log_int_softmax(&[0; 4], 4, 1e-5, 4, &mut [0; 4]));
    assert!(msg.contains("outside [2^-10"), "{msg}");
    let msg = panic_message(|| softmax::log_int_softmax(&[0; 4], 4, f32::NAN, 4, &mut [0; 4]));
    assert!(msg.contains("scale NaN"), "{msg}");
}

/// A quantizer's scales become a LayerNorm input scale by one rule, and what does not fit is
/// refused by count.
#[test]
fn in_scale_of_a_quantizer() {
    use fqvit_ops::layer_norm::InScaleError;
    let f = |a: u8| PtfFactor::try_from(a).unwrap();
    assert!(matches!(InScale::of(&[0.5], None, 4), Ok(InScale::Layer(s)) if s == 0.5));
    let factors = [f(1), f(0), f(3)];
    let Ok(InScale::Ptf { base, factors: got }) = InScale::of(&[0.2, 0.1, 0.8], Some(&factors), 3)
    else {
        panic!("a PTF quantizer's scales");
    };
    assert_eq!((base, got), (0.1, &factors[..]));
    assert_eq!(InScale::of(&[0.1, 0.2], None, 2).unwrap_err(), InScaleError::ChannelWise(2));
    assert_eq!(InScale::of(&[], None, 2).unwrap_err(), InScaleError::ChannelWise(0));
    let err = InScale::of(&[0.1, 0.2], Some(&factors), 3).unwrap_err();
    assert_eq!(err.to_string(), "3 PTF factors and 2 scales for 3 channels");
    assert!(InScale::of(&[], Some(&[]), 0).is_err());
}
