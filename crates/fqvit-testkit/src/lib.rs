//! Test support shared by fqvit's crates (a dev-dependency only).
//!
//! - [`shared_dir`]: the data beside the repository; a test that needs it fails when it is
//!   missing, never passes by skipping.
//! - `seeded` (feature `tch`): draws from libtorch's global generator that give the same
//!   tensors whichever runner runs the tests. `cargo test` runs a binary's tests on threads of
//!   one process, all sharing that generator, so a test that seeds it and then draws would take
//!   numbers another test drew in between; nextest runs each test in its own process and hid
//!   this. A test that seeds goes through `seeded`, and so does every draw in its binary
//!   (`cargo xtask tidy` refuses `manual_seed` elsewhere).
//! - [`lcg`]: a seeded 64-bit generator for test data that is the same on every machine.

use std::path::PathBuf;

/// `../shared` beside the repository (or `$FQVIT_SHARED_DIR`).
///
/// # Panics
/// When the folder or its `golden/` and `imagenet-sample/` are missing, naming the path.
pub fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("FQVIT_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    for part in ["golden", "imagenet-sample"] {
        assert!(
            dir.join(part).is_dir(),
            "shared data missing: no {part}/ in {} (set FQVIT_SHARED_DIR)",
            dir.display()
        );
    }
    dir
}

/// A 64-bit linear congruential generator (Knuth's MMIX constants) seeded with `seed`: each
/// call returns the next state; callers take its high bits (`next() >> 33`), the low ones
/// being weak.
pub fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state =
            state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        state
    }
}

/// Runs `draw` with libtorch's global generator seeded with `seed`, while no other test of this
/// process draws from it: what `draw` makes depends on `seed` alone.
#[cfg(feature = "tch")]
pub fn seeded<T>(seed: i64, draw: impl FnOnce() -> T) -> T {
    use std::sync::{Mutex, PoisonError};
    // One generator per process, so one lock per process; a test that panicked while holding
    // it left the generator in a state the next seed resets.
    static GENERATOR: Mutex<()> = Mutex::new(());
    let _held = GENERATOR.lock().unwrap_or_else(PoisonError::into_inner);
    tch::manual_seed(seed);
    draw()
}
