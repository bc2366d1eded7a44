//! Kernel throughput: the scalar references against the fast paths, at model shapes.
//! `cargo bench -p fqvit-ops`; the float libtorch kernels on the same shapes are in
//! `crates/fqvit-bench` (`cargo bench -p fqvit-bench`).

use divan::{Bencher, black_box};
use fqvit_ops::layer_norm::{InScale, LayerNormParams, ptf_layer_norm, reference as ln_ref};
use fqvit_ops::softmax::reference as lis_ref;
use fqvit_ops::softmax::{ExpTable, LisConstants, log_int_softmax_f32, log_int_softmax_with};
use fqvit_ops::{Isa, PtfFactor};

fn main() {
    divan::main();
}

/// (tokens, channels): ViT-Tiny/Small/Base blocks and Swin-T stage 1, one image.
const LN_SHAPES: [(usize, usize); 4] = [(197, 192), (197, 384), (197, 768), (3136, 96)];
/// (rows, row length): ViT-Tiny attention (3 heads × 197 rows of 197) and Swin-T stage 1
/// (64 windows × 3 heads × 49 rows of 49), one image.
const LIS_SHAPES: [(usize, usize); 2] = [(3 * 197, 197), (64 * 3 * 49, 49)];

struct LnCase {
    codes: Vec<u8>,
    factors: Vec<PtfFactor>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    out: Vec<i32>,
}

fn ln_case((tokens, channels): (usize, usize)) -> LnCase {
    LnCase {
        codes: (0..tokens * channels).map(|i| (i * 7919 % 251) as u8).collect(),
        factors: (0..channels).map(|c| PtfFactor::try_from((c % 4) as u8).unwrap()).collect(),
        gamma: (0..channels).map(|c| 0.5 + (c % 13) as f32 * 0.1).collect(),
        beta: (0..channels).map(|c| (c % 7) as f32 * 0.05 - 0.1).collect(),
        out: vec![0; tokens * channels],
    }
}

fn ln_params(case: &LnCase) -> LayerNormParams<'_> {
    LayerNormParams {
        in_scale: InScale::Ptf { base: 0.01, factors: &case.factors },
        zero_point: 120,
        bits: fqvit_ops::Bits::BYTE,
        gamma: &case.gamma,
        beta: &case.beta,
        out_scale: 0.03,
    }
}

#[divan::bench(args = LN_SHAPES)]
fn layer_norm_fast(bencher: Bencher, shape: (usize, usize)) {
    let mut case = ln_case(shape);
    bencher.bench_local(|| {
        let mut out = std::mem::take(&mut case.out);
        ptf_layer_norm(black_box(&case.codes), &ln_params(&case), &mut out);
        case.out = out;
    });
}

/// The integer-only LayerNorm (integer σ and factors), constants prepared outside the loop, at
/// each instruction set (`Isa::ALL`: native, AVX2, scalar).
#[divan::bench(args = LN_SHAPES, consts = [0, 1, 2])]
fn layer_norm_integer<const ISA: usize>(bencher: Bencher, shape: (usize, usize)) {
    let mut case = ln_case(shape);
    let ln = fqvit_ops::layer_norm::integer::IntegerLayerNorm::new(&ln_params(&case)).unwrap();
    bencher.bench_local(|| ln.run(Isa::ALL[ISA], black_box(&case.codes), &mut case.out));
}

#[divan::bench(args = LN_SHAPES)]
fn layer_norm_reference(bencher: Bencher, shape: (usize, usize)) {
    let mut case = ln_case(shape);
    bencher.bench_local(|| {
        let mut out = std::mem::take(&mut case.out);
        ln_ref::ptf_layer_norm(black_box(&case.codes), &ln_params(&case), &mut out);
        case.out = out;
    });
}

fn lis_codes((rows, len): (usize, usize)) -> Vec<i32> {
    (0..rows * len).map(|i| (i * 7919 % 255) as i32 - 128).collect()
}

/// Integer Log-Int-Softmax at each instruction set (`Isa::ALL`: native, AVX2, scalar).
#[divan::bench(args = LIS_SHAPES, consts = [0, 1, 2])]
fn softmax_fast<const ISA: usize>(bencher: Bencher, shape: (usize, usize)) {
    let codes = lis_codes(shape);
    let mut out = vec![0u16; codes.len()];
    let k = ExpTable::new(LisConstants::new(0.05));
    let isa = Isa::ALL[ISA];
    bencher.bench_local(|| log_int_softmax_with(isa, black_box(&codes), shape.1, &k, 4, &mut out));
}

#[divan::bench(args = LIS_SHAPES)]
fn softmax_reference(bencher: Bencher, shape: (usize, usize)) {
    let codes = lis_codes(shape);
    let mut out = vec![0u16; codes.len()];
    bencher.bench_local(|| lis_ref::log_int_softmax(black_box(&codes), shape.1, 0.05, 4, &mut out));
}

#[divan::bench(args = LIS_SHAPES)]
fn softmax_fast_float_entry(bencher: Bencher, shape: (usize, usize)) {
    let logits: Vec<f32> = lis_codes(shape).iter().map(|&q| q as f32 * 0.05).collect();
    let mut out = vec![0u16; logits.len()];
    bencher.bench_local(|| log_int_softmax_f32(black_box(&logits), shape.1, 0.05, 4, &mut out));
}
