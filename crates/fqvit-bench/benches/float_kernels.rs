//! libtorch's float LayerNorm and softmax on the shapes of `fqvit-ops/benches/kernels.rs`, on
//! the CPU with libtorch's default threads.

use divan::{Bencher, black_box};
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
