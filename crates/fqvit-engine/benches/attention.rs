//! One attention head's `attn · V` (197 tokens, 64 channels, 4-bit Log-Int-Softmax codes), every
//! kernel this CPU runs, with a share of the probabilities in the upper byte plane (`2^-k ≥
//! 2^-7`): ViT-Tiny's heads hold 5–20 % there.
//! `cargo bench -p fqvit-engine --bench attention`.

use divan::{Bencher, black_box};
use fqvit_engine::attention::attn_v;
use fqvit_engine::gemm::{Kernel, KernelKind};

fn main() {
    divan::main();
}

/// Per mille of the probabilities in the upper plane.
const UPPER: [u64; 3] = [50, 120, 200];

#[divan::bench(args = UPPER, consts = [0, 2, 3])]
fn attn_v_head<const KIND: usize>(bencher: Bencher, upper: u64) {
    let Some(kernel) = Kernel::new(KernelKind::ALL[KIND], fqvit_ops::Isa::Native) else {
        eprintln!("{} does not run on this CPU", KernelKind::ALL[KIND]);
        return;
    };
    let (n, hd) = (197, 64);
    let mut next = fqvit_testkit::lcg(7);
    // Codes 0..=7 (upper) for `upper` per mille, else 8..=16 (16: the zero flag).
    let k: Vec<u16> = (0..n * n)
        .map(|_| {
            let r = next() >> 33;
            if r % 1000 < upper { (r >> 10) as u16 % 8 } else { 8 + (r >> 10) as u16 % 9 }
        })
        .collect();
    let v: Vec<u8> = (0..n * hd).map(|_| (next() >> 56) as u8).collect();
    bencher.bench_local(|| attn_v(&kernel, black_box(&k), &v, 37, hd, 15));
}
