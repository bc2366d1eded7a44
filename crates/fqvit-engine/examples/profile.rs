//! Runs an artifact on fixed pseudo-random pixels and prints images/s, the dense GEMM's int8
//! ops/s and where the time went:
//! `cargo run --release -p fqvit-engine --example profile -- ARTIFACT [BATCH] [ITERS] [ISA]`
//! (ISA `native`, `avx2` or `scalar`, as `--isa`).

use std::path::Path;

use fqvit_engine::{Engine, Isa, Options};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or("usage: profile ARTIFACT [BATCH] [ITERS] [ISA]")?;
    let batch: usize = args.get(2).map_or(Ok(32), |s| s.parse())?;
    let iters: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let isa = match args.get(4) {
        None => Isa::Native,
        Some(s) => Isa::ALL
            .into_iter()
            .find(|isa| isa.name() == s)
            .ok_or_else(|| format!("ISA {s:?}: expected native, avx2 or scalar"))?,
    };
    let options = Options { isa, ..Options::default() };
    let bench = Engine::load_with(Path::new(path), options)?.bench(batch, iters)?;
    println!("{:.1} images/s (batch {batch}, {iters} runs)", bench.images_per_s);
    println!("dense GEMM: {:.1} Gops/s", bench.gemm_ops_per_s / 1e9);
    for (kind, s) in &bench.seconds_by_kind {
        println!("{kind:>18} {s:.3} s/batch");
    }
    Ok(())
}
