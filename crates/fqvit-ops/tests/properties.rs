//! Property tests of the kernels (proptest; regressions are kept in `tests/*.proptest-regressions`).

use fqvit_ops::layer_norm::{InScale, LayerNormParams, ptf_layer_norm, reference as ln_ref};
use fqvit_ops::softmax::{self, dequantize_log2, reference as lis_ref};
use fqvit_ops::{Isa, PtfFactor};
use proptest::prelude::*;

/// Rows of integer logits: (row length, codes in −255..=255 as `q − z` can be). Half the cases
/// keep the codes within 8 of each other, so that at small scales the row sums pass 2^52.
fn logit_rows() -> impl Strategy<Value = (usize, Vec<i32>)> {
    (1usize..=64, 1usize..=4, prop_oneof![Just(255i32), Just(8)]).prop_flat_map(
        |(len, rows, spread)| (Just(len), prop::collection::vec(-spread..=spread, len * rows)),
    )
}

fn scale() -> impl Strategy<Value = f32> {
    // Above S ≈ 1.67, I_c = ⌊2.79/S²⌋ = 0 and every code is the zero flag (see the module docs).
    prop_oneof![0.001f32..0.01, 0.01f32..0.2, 0.2f32..1.6]
}

fn lis(codes: &[i32], len: usize, s: f32, bits: u32) -> Vec<u16> {
    let mut out = vec![0u16; codes.len()];
    softmax::log_int_softmax(codes, len, s, bits, &mut out);
    out
}

proptest! {
    #[test]
    fn lis_fast_equals_reference((len, codes) in logit_rows(), s in scale(), bits in prop::sample::select(vec![2u32, 3, 4, 5, 8])) {
        let mut slow = vec![0u16; codes.len()];
        lis_ref::log_int_softmax(&codes, len, s, bits, &mut slow);
        prop_assert_eq!(lis(&codes, len, s, bits), slow.clone());
        let k = softmax::ExpTable::new(softmax::LisConstants::new(s));
        for isa in Isa::ALL.into_iter().filter(|isa| isa.available()) {
            let mut fast = vec![0u16; codes.len()];
            softmax::log_int_softmax_with(isa, &codes, len, &k, bits, &mut fast);
            prop_assert_eq!(&fast, &slow, "{}", isa);
            softmax::log_int_softmax_local(isa, &codes, len, &k, bits, &mut fast);
            prop_assert_eq!(&fast, &slow, "{} on one thread", isa);
        }
        let logits: Vec<f32> = codes.iter().map(|&q| q as f32 * s).collect();
        let (mut fast_f, mut slow_f) = (vec![0u16; codes.len()], vec![0u16; codes.len()]);
        softmax::log_int_softmax_f32(&logits, len, s, bits, &mut fast_f);
        lis_ref::log_int_softmax_f32(&logits, len, s, bits, &mut slow_f);
        prop_assert_eq!(fast_f, slow_f);
    }

    /// The exponential on a grid 2^K times finer (`ExpShift`) is, by definition, the original's
    /// at the scale `S·2^-K` on the codes `x·2^K`; every fast path equals it on every ISA.
    #[test]
    fn lis_exp_shift_is_the_finer_grid_exactly((len, codes) in logit_rows(), s in scale(), k in 1u32..=8, bits in prop::sample::select(vec![2u32, 4, 8])) {
        let fine = s * (-(k as f32)).exp2();
        prop_assume!(fine >= softmax::MIN_SCALE);
        let shift = softmax::ExpShift::try_from(k).unwrap();
        let constants = softmax::LisConstants::shifted(s, shift);
        let unshifted = softmax::LisConstants::new(fine);
        prop_assert_eq!((constants.i0, constants.ib, constants.ic), (unshifted.i0, unshifted.ib, unshifted.ic));
        let mut want = vec![0u16; codes.len()];
        let scaled: Vec<i32> = codes.iter().map(|&q| q << k).collect();
        lis_ref::log_int_softmax(&scaled, len, fine, bits, &mut want);
        let mut slow = vec![0u16; codes.len()];
        lis_ref::log_int_softmax_by(&codes, len, &constants, bits, &mut slow);
        prop_assert_eq!(&slow, &want);
        let table = softmax::ExpTable::new(constants);
        for isa in Isa::ALL.into_iter().filter(|isa| isa.available()) {
            let mut fast = vec![0u16; codes.len()];
            softmax::log_int_softmax_with(isa, &codes, len, &table, bits, &mut fast);
            prop_assert_eq!(&fast, &want, "{}", isa);
        }
    }

    #[test]
    fn lis_codes_in_range_and_masked_entries_are_zero((len, codes) in logit_rows(), s in scale(), bits in prop::sample::select(vec![2u32, 4, 8])) {
        let out = lis(&codes, len, s, bits);
        let mut p = vec![0f32; out.len()];
        dequantize_log2(&out, bits, &mut p);
        for (&k, &p) in out.iter().zip(&p) {
            prop_assert!(k <= 1 << bits);
            prop_assert_eq!(p == 0.0, k == 1 << bits, "code {} dequantized to {}", k, p);
        }
        // With 8 bits the row maximum always keeps some probability: Σ/e_max ≤ L ≤ 64 gives a
        // code ≤ 7. (With 2 bits, 50 equal maxima at 1/50 each all underflow, as they should.)
        if bits == 8 {
            for row in out.chunks(len) {
                prop_assert!(row.iter().any(|&k| k < 1 << bits));
            }
        }
    }

    #[test]
    fn lis_is_invariant_to_shifting_a_row((len, codes) in logit_rows(), s in scale(), shift in -1000i32..1000) {
        let shifted: Vec<i32> = codes.iter().map(|&q| q + shift).collect();
        prop_assert_eq!(lis(&codes, len, s, 4), lis(&shifted, len, s, 4));
    }

    #[test]
    fn lis_is_monotone((len, codes) in logit_rows(), s in scale()) {
        let out = lis(&codes, len, s, 8);
        for (row, k) in codes.chunks(len).zip(out.chunks(len)) {
            for i in 0..len {
                for j in 0..len {
                    if row[i] > row[j] {
                        prop_assert!(k[i] <= k[j], "logit {} got code {} but smaller logit {} got {}", row[i], k[i], row[j], k[j]);
                    }
                }
            }
        }
    }

    #[test]
    fn lis_single_dominant_logit_gets_code_zero(len in 1usize..=197, s in scale(), pos in 0usize..197, others in -255i32..=0) {
        // In the integer exponential every |I0| grid steps halve e (and I0·S is only roughly −ln 2
        // for coarse scales), so a gap of |I0|·(log2(2.5·L) + 1) steps leaves every other e below
        // e_max / (2.5·L) even with the polynomial's error: Σ < 1.4·e_max and u = 1.
        let i0 = softmax::LisConstants::new(s).i0.unsigned_abs() as f32;
        let gap = (i0 * ((2.5 * len as f32).log2() + 1.0)).ceil() as i32;
        let mut row = vec![others; len];
        row[pos % len] = others + gap;
        prop_assert_eq!(lis(&row, len, s, 4)[pos % len], 0);
    }
}

/// A LayerNorm case: tokens × C codes, PTF factors, zero point, γ, β.
#[derive(Debug, Clone)]
struct LnCase {
    n_channels: usize,
    codes: Vec<u8>,
    factors: Vec<PtfFactor>,
    zero_point: i32,
    base: f32,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    out_scale: f32,
}

impl LnCase {
    fn params(&self) -> LayerNormParams<'_> {
        LayerNormParams {
            in_scale: InScale::Ptf { base: self.base, factors: &self.factors },
            zero_point: self.zero_point,
            bits: fqvit_ops::Bits::BYTE,
            gamma: &self.gamma,
            beta: &self.beta,
            out_scale: self.out_scale,
        }
    }
}

fn ln_case() -> impl Strategy<Value = LnCase> {
    (1usize..=96, 1usize..=6).prop_flat_map(|(c, t)| {
        (
            prop::collection::vec(any::<u8>(), c * t),
            prop::collection::vec(prop_oneof![0u8..=3, 0u8..=7], c),
            any::<u8>(),
            0.005f32..0.2,
            prop::collection::vec(0.2f32..2.0, c),
            prop::collection::vec(-1.0f32..1.0, c),
            0.01f32..0.1,
        )
            .prop_map(move |(codes, alphas, z, base, gamma, beta, out_scale)| LnCase {
                n_channels: c,
                codes,
                factors: alphas.into_iter().map(|a| PtfFactor::try_from(a).unwrap()).collect(),
                zero_point: i32::from(z),
                base,
                gamma,
                beta,
                out_scale,
            })
    })
}

/// As [`ln_case`], with γ and β that reach every path of the fast kernel: negative, zero and
/// tiny γ (a large `N`), exact powers of two, large β, and a wide range of output scales.
fn ln_case_wide() -> impl Strategy<Value = LnCase> {
    let gamma = prop_oneof![
        -2.0f32..2.0,
        Just(0.0f32),
        -1e-5f32..1e-5,
        (-8i32..8).prop_map(|e| 2f32.powi(e)),
    ];
    let beta = prop_oneof![-1.0f32..1.0, -1e4f32..1e4, Just(0.0f32)];
    (ln_case(), prop::collection::vec((gamma, beta), 96), 1e-4f32..10.0).prop_map(
        |(mut case, params, out_scale)| {
            let c = case.n_channels;
            case.gamma = params[..c].iter().map(|p| p.0).collect();
            case.beta = params[..c].iter().map(|p| p.1).collect();
            case.out_scale = out_scale;
            case
        },
    )
}

fn run_ln(case: &LnCase) -> Vec<i32> {
    let mut y = vec![0i32; case.codes.len()];
    ptf_layer_norm(&case.codes, &case.params(), &mut y);
    y
}

proptest! {
    #[test]
    fn ln_fast_equals_reference(case in ln_case_wide()) {
        let mut slow = vec![0i32; case.codes.len()];
        ln_ref::ptf_layer_norm(&case.codes, &case.params(), &mut slow);
        prop_assert_eq!(run_ln(&case), slow);
    }

    #[test]
    fn ln_with_all_factors_zero_is_the_layer_wise_kernel(mut case in ln_case()) {
        case.factors.iter_mut().for_each(|f| *f = PtfFactor::default());
        let mut layer = vec![0i32; case.codes.len()];
        let params = LayerNormParams { in_scale: InScale::Layer(case.base), ..case.params() };
        ptf_layer_norm(&case.codes, &params, &mut layer);
        prop_assert_eq!(run_ln(&case), layer);
    }

    #[test]
    fn ln_stays_close_to_float_layer_norm(case in ln_case()) {
        let y = run_ln(&case);
        let c = case.n_channels;
        let s_min = case.base * f32::from(1u8 << case.factors.iter().map(|f| f.get()).min().unwrap());
        for (t, token) in case.codes.chunks(c).enumerate() {
            let x: Vec<f64> = (0..c).map(|i| f64::from((i32::from(token[i]) - case.zero_point) * case.factors[i].multiplier())).collect();
            let mean = x.iter().sum::<f64>() / c as f64;
            let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
            if var == 0.0 {
                continue;
            }
            let std = var.sqrt();
            for i in 0..c {
                let a = f64::from(case.gamma[i]) / std / f64::from(case.out_scale);
                let float = (f64::from(case.gamma[i]) * (x[i] - mean) / std + f64::from(case.beta[i])) / f64::from(case.out_scale);
                // Error budget in output steps: M/2^N has an 8-bit mantissa (relative error < 2^-7
                // of |A·x|, x the raw code in s_min units), B and y each round once (≤ 1/2 + 1/2),
                // and the float32 statistics add ~2^-20 relative to the terms, bounded by 2^-16 here.
                let ax = (a * x[i]).abs();
                let bound = ax / 128.0 + 1.0 + (ax + (a * mean).abs()) / 65536.0;
                let _ = s_min;
                prop_assert!((f64::from(y[t * c + i]) - float).abs() <= bound,
                    "token {} channel {}: integer {} vs float {:.3} (bound {:.3})", t, i, y[t * c + i], float, bound);
            }
        }
    }
}

/// A LayerNorm on wide codes (the residual stream at `bits` > 8, [`fqvit_ops::Bits::MAX`]):
/// codes below 2^bits in u16, PTF factors up to `15 − bits`.
#[derive(Debug, Clone)]
struct WideCase {
    bits: fqvit_ops::Bits,
    codes: Vec<u16>,
    case: LnCase,
}

fn wide_ln_case() -> impl Strategy<Value = WideCase> {
    (9u8..=15, ln_case_wide(), any::<u64>()).prop_map(|(bits, mut case, seed)| {
        let bits = fqvit_ops::Bits::try_from(bits).unwrap();
        let cap = PtfFactor::MAX.cap(bits);
        let hi = (1u64 << bits.get()) - 1;
        let mut lcg = fqvit_testkit::lcg(seed);
        let mut next = move || lcg() >> 33;
        // Codes at both ends of the range as well as between.
        let codes = (0..case.codes.len())
            .map(|_| match next() % 4 {
                0 => 0,
                1 => hi as u16,
                _ => (next() % (hi + 1)) as u16,
            })
            .collect();
        case.zero_point = (next() % (hi + 1)) as i32;
        for f in &mut case.factors {
            *f = PtfFactor::try_from(f.get().min(cap.get())).unwrap();
        }
        WideCase { bits, codes, case }
    })
}

proptest! {
    /// Wide codes: the fast kernel equals the reference, and the integer-only LayerNorm follows
    /// the exact float path (σ exact in both up to the integer root's 2^−29: equal codes but
    /// where a value lies that close to a rounding boundary, at most one step apart).
    #[test]
    fn ln_on_wide_codes_equals_reference(w in wide_ln_case()) {
        let params = LayerNormParams { bits: w.bits, ..w.case.params() };
        let mut fast = vec![0i32; w.codes.len()];
        let mut slow = vec![0i32; w.codes.len()];
        ptf_layer_norm(&w.codes, &params, &mut fast);
        ln_ref::ptf_layer_norm(&w.codes, &params, &mut slow);
        prop_assert_eq!(&fast, &slow);
        let integer = fqvit_ops::layer_norm::integer::IntegerLayerNorm::new(&params).unwrap();
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            let mut y = vec![0i32; w.codes.len()];
            integer.run(isa, &w.codes, &mut y);
            for (a, b) in y.iter().zip(&slow) {
                prop_assert!((a - b).abs() <= 1, "{} against {}", a, b);
            }
        }
    }

    /// Byte codes give the same outputs stored as bytes or in u16.
    #[test]
    fn ln_does_not_depend_on_the_code_storage(case in ln_case_wide()) {
        let wide: Vec<u16> = case.codes.iter().map(|&q| u16::from(q)).collect();
        let mut y = vec![0i32; wide.len()];
        ptf_layer_norm(&wide, &case.params(), &mut y);
        prop_assert_eq!(y, run_ln(&case));
    }
}

#[test]
fn ln_refuses_shifts_that_take_wide_codes_beyond_2_15() {
    let factors = [PtfFactor::default(), PtfFactor::try_from(4).unwrap()];
    let (gamma, beta) = ([1.0f32; 2], [0.0f32; 2]);
    let params = LayerNormParams {
        in_scale: InScale::Ptf { base: 0.1, factors: &factors },
        zero_point: 2048,
        bits: fqvit_ops::Bits::try_from(12).unwrap(),
        gamma: &gamma,
        beta: &beta,
        out_scale: 0.05,
    };
    let err = std::panic::catch_unwind(|| ptf_layer_norm(&[0u16, 4095], &params, &mut [0; 2]))
        .unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(msg.contains("PTF shifts above 3 take 12-bit codes beyond 2^15"), "{msg}");
    let err =
        std::panic::catch_unwind(|| ptf_layer_norm(&[0u8, 255], &params, &mut [0; 2])).unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(msg.contains("12-bit codes do not fit 8-bit storage"), "{msg}");
}

#[test]
fn ptf_factors_are_capped_so_shifted_codes_stay_below_2_15() {
    for bits in 2..=15u8 {
        let b = fqvit_ops::Bits::try_from(bits).unwrap();
        let cap = PtfFactor::MAX.cap(b);
        assert!(((1u32 << bits) - 1) << cap.get() < 1 << 15, "{bits} bits, factor {cap:?}");
        if cap < PtfFactor::MAX {
            assert!(((1u32 << bits) - 1) << (cap.get() + 1) >= 1 << 15, "{bits}: the largest");
        }
        assert_eq!(PtfFactor::ORIGINAL_MAX.cap(b), PtfFactor::ORIGINAL_MAX.min(cap));
    }
    assert_eq!(PtfFactor::MAX.cap(fqvit_ops::Bits::BYTE), PtfFactor::MAX);
    assert!(fqvit_ops::Bits::try_from(16).is_err() && fqvit_ops::Bits::try_from(1).is_err());
}
