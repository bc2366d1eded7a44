//! The int8 GEMM, every kernel this CPU runs, on the dense layers' shapes: ViT-Tiny's qkv and
//! fc1 for 197 tokens and a batch of 32 images, DeiT-B's fc1 for 197 tokens, and one attention head's q·kᵀ (197 × 197 × 64).
//! `cargo bench -p fqvit-engine --bench gemm`; int8 ops/s = 2·M·N·K / time.

use divan::{Bencher, black_box};
use fqvit_engine::gemm::{Kernel, KernelKind, Weights, gemm};

fn main() {
    divan::main();
}

/// (M, N, K): tokens × output channels × reduction.
const SHAPES: [(usize, usize, usize); 5] =
    [(197, 576, 192), (197, 768, 192), (6304, 768, 192), (197, 3072, 768), (197, 197, 64)];

fn codes(len: usize, seed: u64) -> Vec<u8> {
    let mut next = fqvit_testkit::lcg(seed);
    (0..len).map(|_| (next() >> 56) as u8).collect()
}

#[divan::bench(args = SHAPES, consts = [0, 1, 2, 3])]
fn kernel<const KIND: usize>(bencher: Bencher, (m, n, k): (usize, usize, usize)) {
    let Some(kernel) = Kernel::new(KernelKind::ALL[KIND], fqvit_ops::Isa::Native) else {
        eprintln!("{} does not run on this CPU", KernelKind::ALL[KIND]);
        return;
    };
    let a = codes(m * k, 1);
    let w = Weights::new(&kernel, codes(n * k, 2).into_iter().map(|c| c as i8).collect(), n, k);
    let mut out = vec![0i32; m * n];
    bencher
        .counter(divan::counter::ItemsCount::new(2 * m * n * k))
        .bench_local(|| gemm(&kernel, black_box(&a), &w, &mut out));
}
