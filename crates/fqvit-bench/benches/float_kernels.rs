//! libtorch's float LayerNorm and softmax against the fast integer kernels of `fqvit-ops`, on the
//! shapes of `fqvit-ops/benches/kernels.rs`, in one process so their ratio comes from one run.
//! Both use every core: libtorch its default intra-op threads, `fqvit-ops` rayon's pool.

use divan::{Bencher, black_box};
use fqvit_ops::PtfFactor;
use fqvit_ops::layer_norm::{InScale, LayerNormParams, ptf_layer_norm};
use fqvit_ops::softmax::log_int_softmax;
use tch::{Device, Kind, Tensor};

fn main() {
    divan::main();
}

const LN_SHAPES: [(i64, i64); 4] = [(197, 192), (197, 384), (197, 768), (3136, 96)];
const SOFTMAX_SHAPES: [(i64, i64); 2] = [(3 * 197, 197), (64 * 3 * 49, 49)];

#[divan::bench(args = LN_SHAPES)]
fn layer_norm(bencher: Bencher, (tokens, channels): (i64, i64)) {
    let x = Tensor::randn([tokens, channels], (Kind::Float, Device::Cpu));
    let (w, b) = (
        Tensor::ones([channels], (Kind::Float, Device::Cpu)),
        Tensor::zeros([channels], (Kind::Float, Device::Cpu)),
    );
    bencher.bench_local(|| black_box(&x).layer_norm([channels], Some(&w), Some(&b), 1e-6, false));
}

#[divan::bench(args = SOFTMAX_SHAPES)]
fn softmax(bencher: Bencher, (rows, len): (i64, i64)) {
    let x = Tensor::randn([rows, len], (Kind::Float, Device::Cpu));
    bencher.bench_local(|| black_box(&x).softmax(-1, Kind::Float));
}

/// The inputs of `fqvit-ops/benches/kernels.rs` (PTF factors 0..=3, codes spread over 0..=250).
#[divan::bench(args = LN_SHAPES)]
fn integer_layer_norm(bencher: Bencher, (tokens, channels): (i64, i64)) {
    let (tokens, channels) = (tokens as usize, channels as usize);
    let codes: Vec<u8> = (0..tokens * channels).map(|i| (i * 7919 % 251) as u8).collect();
    let factors: Vec<PtfFactor> =
        (0..channels).map(|c| PtfFactor::try_from((c % 4) as u8).unwrap()).collect();
    let gamma: Vec<f32> = (0..channels).map(|c| 0.5 + (c % 13) as f32 * 0.1).collect();
    let beta: Vec<f32> = (0..channels).map(|c| (c % 7) as f32 * 0.05 - 0.1).collect();
    let params = LayerNormParams {
        in_scale: InScale::Ptf { base: 0.01, factors: &factors },
        zero_point: 120,
        bits: fqvit_ops::Bits::BYTE,
        gamma: &gamma,
        beta: &beta,
        out_scale: 0.03,
    };
    let mut out = vec![0; codes.len()];
    bencher.bench_local(|| ptf_layer_norm(black_box(&codes), &params, &mut out));
}

/// Integer logits in −128..=126 at S = 0.05, 4-bit codes.
#[divan::bench(args = SOFTMAX_SHAPES)]
fn integer_softmax(bencher: Bencher, (rows, len): (i64, i64)) {
    let (rows, len) = (rows as usize, len as usize);
    let codes: Vec<i32> = (0..rows * len).map(|i| (i * 7919 % 255) as i32 - 128).collect();
    let mut out = vec![0u16; codes.len()];
    bencher.bench_local(|| log_int_softmax(black_box(&codes), len, 0.05, 4, &mut out));
}
