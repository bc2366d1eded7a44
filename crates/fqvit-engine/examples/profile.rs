//! Runs an artifact on random pixels and prints images/s and where the time went:
//! `cargo run --release -p fqvit-engine --example profile -- ARTIFACT [BATCH] [ITERS]`.

use std::path::Path;
use std::time::Instant;

use fqvit_engine::{Engine, Images, Timings};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or("usage: profile ARTIFACT [BATCH] [ITERS]")?;
    let batch: usize = args.get(2).map_or(Ok(32), |s| s.parse())?;
    let iters: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let engine = Engine::load(Path::new(path))?;
    let side = engine.image_size();
    // A fixed linear congruential fill: the same pixels every run.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let pixels: Vec<u8> = (0..batch * 3 * side * side)
        .map(|_| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (state >> 56) as u8
        })
        .collect();
    engine.run(Images::Pixels(&pixels))?;
    let mut timings = Timings::default();
    let t = Instant::now();
    for _ in 0..iters {
        engine.run_timed(Images::Pixels(&pixels), &mut timings)?;
    }
    let wall = t.elapsed().as_secs_f64();
    println!("{:.1} images/s (batch {batch}, {iters} runs)", (batch * iters) as f64 / wall);
    for (kind, d) in &timings.by_kind {
        println!("{kind:>18} {:.3} s/batch", d.as_secs_f64() / iters as f64);
    }
    Ok(())
}
