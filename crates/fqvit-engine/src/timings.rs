//! Time per kind of work in a run, for benchmarks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Time spent per kind of work, summed over calls.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// Seconds by kind: `gemm`, `requant`, `gelu` (fc1's epilogue), `layer-norm`,
    /// `attention-matmul`, `softmax`, `add`, `other`.
    pub by_kind: BTreeMap<&'static str, Duration>,
    /// Multiply-adds done by the dense layers' GEMMs (the time of `gemm`).
    pub gemm_macs: u64,
}

impl Timings {
    pub(crate) fn add(&mut self, kind: &'static str, since: Instant) {
        *self.by_kind.entry(kind).or_default() += since.elapsed();
    }

    /// Adds `wall` to kinds `a` and `b` in the ratio of their summed thread times.
    #[allow(clippy::float_arithmetic)] // timing
    pub(crate) fn split(
        &mut self,
        a: &'static str,
        b: &'static str,
        wall: Duration,
        threads: impl Iterator<Item = (Duration, Duration)>,
    ) {
        let (ta, tb) = threads
            .fold((0.0, 0.0), |(x, y), (ta, tb)| (x + ta.as_secs_f64(), y + tb.as_secs_f64()));
        let share = if ta + tb > 0.0 { ta / (ta + tb) } else { 1.0 };
        let wall = wall.as_secs_f64();
        *self.by_kind.entry(a).or_default() += Duration::from_secs_f64(wall * share);
        *self.by_kind.entry(b).or_default() += Duration::from_secs_f64(wall * (1.0 - share));
    }
}
