//! # fqvit-bench
//!
//! Not a library: it holds benchmarks that need libtorch (`benches/float_kernels.rs`), so that
//! `fqvit-ops` itself never depends on tch. Compare with `cargo bench -p fqvit-ops`.
