//! # fqvit-engine: integer-only inference of a calibrated FQ-ViT model
//!
//! [`Engine::load`] reads the qparams artifact that `fqvit-cli quantize` writes (no libtorch),
//! takes the integer program the model emitted into it (`fqvit-program`), and prepares every
//! op's integer constants once: int8 weights with their row sums, int32 biases, dyadic
//! requantization multipliers, the PTF LayerNorm and Log-Int-Softmax parameters of `fqvit-ops`,
//! GELU thresholds. [`Engine::run`] then computes logits from 8-bit pixels with integer
//! arithmetic only; the last op dequantizes the logit codes.
//!
//! Where the integers depart from the float simulation, and by how much, is listed in the
//! crate's README.

// The run path is integers only; float arithmetic is allowed by name where constants are
// prepared at load (`load.rs`, the `compile` functions, `Dyadic::new`, GELU's tables), where the
// float input of `Images::Normalized` is checked, and in timing (`Timings`, `Engine::bench`).
#![deny(clippy::float_arithmetic)]

pub mod attention;
mod error;
mod gelu;
pub mod gemm;
mod grid;
mod load;
mod ops;
pub mod requant;
mod timings;

use std::path::Path;

pub use error::{Error, Result};
pub use fqvit_ops::Isa;
pub use gemm::KernelKind;
pub use timings::Timings;

use fqvit_artifact::{Artifact, FORMAT_VERSION, PROGRAM_KEY};
use fqvit_program::{Op, Program};

/// [`Engine::bench`]'s figures.
#[derive(Clone, Debug)]
pub struct Bench {
    /// Images per second over the timed runs.
    pub images_per_s: f64,
    /// Seconds per batch by kind of work ([`Timings::by_kind`]).
    pub seconds_by_kind: std::collections::BTreeMap<&'static str, f64>,
    /// The dense layers' int8 GEMM throughput: two ops per multiply-add.
    pub gemm_ops_per_s: f64,
    /// The GEMM kernel's name.
    pub gemm_kernel: String,
    /// Constants held ([`Engine::resident_bytes`]).
    pub resident_mib: f64,
}

/// Images handed to [`Engine::run`], `(B, 3, size, size)` row-major.
#[derive(Clone, Copy, Debug)]
pub enum Images<'a> {
    /// 8-bit pixels after resizing and cropping (what `ToTensor` would divide by 255).
    Pixels(&'a [u8]),
    /// Normalized float images, as the float model takes them; each value must be exactly
    /// `(p/255 − mean)/std` of an 8-bit pixel `p` in float32, which the engine checks.
    Normalized(&'a [f32]),
}

/// Sees each op's output codes as the program runs and may replace them: with the simulation's
/// codes, every op is checked on the simulation's inputs (as `fqvit-models`' `Probe` does with
/// the original's tensors).
pub trait Observer {
    /// Codes `(B, rows, cols)` that op `op` put on `site` (bytes, or up to 15 bits on the
    /// residual stream, all given as u16). `Some` replaces them for the ops after it (same
    /// length, codes of the site's width).
    fn codes(&mut self, op: usize, site: &str, codes: &[u16]) -> Option<Vec<u16>>;
}

/// How [`Engine::load_with`] compiles a program.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// The int8 GEMM kernel; `None` takes the fastest this CPU runs exactly. Every kernel gives
    /// the same integers: naming one is for tests and benchmarks (e.g. AVX2 on a VNNI machine).
    pub gemm: Option<KernelKind>,
    /// The widest instruction set the loops (and the GEMM kernel) may use; the integers do not
    /// depend on it: `Avx2` runs on an AVX-512 machine what an AVX2-only CPU runs.
    pub isa: Isa,
}

impl Options {
    /// The GEMM kernel these options name, refused by name where this CPU does not run it
    /// exactly (a caller checks its flags with it before long work starts).
    pub fn kernel(self) -> Result<gemm::Kernel> {
        let Options { gemm, isa } = self;
        if !isa.available() {
            return Err(Error::Kernel(format!("this CPU does not run the {isa} instruction set")));
        }
        match gemm {
            None => Ok(gemm::Kernel::detect(isa)),
            Some(kind) => gemm::Kernel::new(kind, isa).ok_or_else(|| {
                let runs: Vec<String> = gemm::Kernel::supported()
                    .iter()
                    .filter(|k| k.isa() == isa)
                    .map(|k| k.kind().to_string())
                    .collect();
                Error::Kernel(format!(
                    "this CPU does not run the {kind} GEMM kernel exactly with the {isa} \
                     instruction set (it runs {})",
                    runs.join(", ")
                ))
            }),
        }
    }
}

/// A loaded, compiled integer program.
#[derive(Debug)]
pub struct Engine {
    model: String,
    ops: Vec<ops::Compiled>,
    /// The GEMM kernel the ops' weights were prepared for.
    kernel: gemm::Kernel,
    /// For each value, the last op that reads it (values are dropped after it).
    last_use: Vec<usize>,
    size: usize,
    normalize: fqvit_program::Normalize,
    classes: usize,
    program: Program,
}

impl Engine {
    /// Reads `path` and compiles its program. Refuses, naming the key, tensor or site, an
    /// artifact without a program, of another format version, calibrated without PTF
    /// LayerNorm or Log-Int-Softmax or with float sites, or with tensors that do not fit.
    /// Nothing is kept when anything fails.
    pub fn load(path: &Path) -> Result<Self> {
        Engine::load_with(path, Options::default())
    }

    /// [`Engine::load`] with `options`; a GEMM kernel or instruction set this CPU cannot run is
    /// refused by name.
    pub fn load_with(path: &Path, options: Options) -> Result<Self> {
        let kernel = options.kernel()?;
        let art = Artifact::read(path)?;
        let bad = |reason: String| Error::from(art.bad(reason));
        if art.format_version() < FORMAT_VERSION {
            return Err(bad(format!(
                "format version {}: an older fqvit wrote it without an integer program; run \
                 `fqvit-cli quantize` again",
                art.format_version()
            )));
        }
        let exp = &art.provenance()["experiment"];
        if exp["ptf"] != serde_json::Value::Bool(true) {
            return Err(bad(
                "was calibrated without --ptf: the engine needs the integer LayerNorm".into(),
            ));
        }
        // Every op computes at its sites' widths (2 to 8 bits, checked by the reader): codes
        // are clamped to each output site's range, and narrower codes only shrink the bounds.
        if exp["float-sites"].as_array().is_some_and(|a| !a.is_empty()) {
            return Err(bad(format!(
                "leaves sites in float (float-sites {}): not an integer model",
                exp["float-sites"]
            )));
        }
        let program = art.program().cloned().ok_or_else(|| {
            bad(format!(
                "has no integer program (metadata `{PROGRAM_KEY}`): an older fqvit wrote it; run \
                 `fqvit-cli quantize` again"
            ))
        })?;
        let Some(Op::Image { size, normalize }) = program.ops.first().cloned() else {
            unreachable!("validate checks op 0")
        };
        let compiled = ops::compile(&art, &program, &kernel)?;
        let mut last_use: Vec<usize> = (0..program.ops.len()).collect();
        for (i, op) in program.ops.iter().enumerate() {
            for v in op.inputs() {
                last_use[v] = i;
            }
        }
        let classes = compiled.classes;
        let model = art.model().to_owned();
        tracing::debug!(model, ops = program.ops.len(), "integer program compiled");
        Ok(Engine { model, ops: compiled.ops, kernel, last_use, size, normalize, classes, program })
    }

    /// The GEMM kernel's name.
    pub fn gemm_kernel(&self) -> String {
        self.kernel.name()
    }

    /// The model name recorded in the artifact.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The input side.
    pub fn image_size(&self) -> usize {
        self.size
    }

    /// The program it runs.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The sites the program writes codes on, in program order.
    pub fn sites(&self) -> impl Iterator<Item = &str> {
        self.program.ops.iter().filter_map(Op::out_site)
    }

    /// Classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Bytes of constants held (int8 weights, int32 biases, multipliers, tables).
    pub fn resident_bytes(&self) -> usize {
        self.ops.iter().map(ops::Compiled::bytes).sum()
    }

    /// Logits `(B, classes)` of a batch.
    pub fn run(&self, images: Images<'_>) -> Result<Vec<f32>> {
        self.run_timed(images, &mut Timings::default())
    }

    /// [`Engine::run`], adding each op kind's time to `timings`.
    pub fn run_timed(&self, images: Images<'_>, timings: &mut Timings) -> Result<Vec<f32>> {
        self.execute(images, timings, None)
    }

    /// Times `iters` runs on a batch of fixed pseudo-random pixels, after one warm-up run.
    #[allow(clippy::float_arithmetic)] // timing
    pub fn bench(&self, batch: usize, iters: usize) -> Result<Bench> {
        let side = self.size;
        // A linear congruential fill: the same pixels every run; any 8-bit image will do.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let pixels: Vec<u8> = (0..batch * 3 * side * side)
            .map(|_| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (state >> 56) as u8
            })
            .collect();
        self.run(Images::Pixels(&pixels))?;
        let mut timings = Timings::default();
        let start = std::time::Instant::now();
        for _ in 0..iters {
            self.run_timed(Images::Pixels(&pixels), &mut timings)?;
        }
        let seconds = start.elapsed().as_secs_f64();
        let per_batch = |d: std::time::Duration| d.as_secs_f64() / iters.max(1) as f64;
        let gemm_s = timings.by_kind.get("gemm").map_or(0.0, |&d| d.as_secs_f64());
        Ok(Bench {
            images_per_s: (iters * batch) as f64 / seconds,
            seconds_by_kind: timings.by_kind.iter().map(|(k, &d)| (*k, per_batch(d))).collect(),
            gemm_ops_per_s: 2.0 * timings.gemm_macs as f64 / gemm_s,
            gemm_kernel: self.kernel.name(),
            resident_mib: self.resident_bytes() as f64 / (1024.0 * 1024.0),
        })
    }

    /// [`Engine::run`], showing every op's output codes to `observer`.
    pub fn run_observed(
        &self,
        images: Images<'_>,
        observer: &mut dyn Observer,
    ) -> Result<Vec<f32>> {
        self.execute(images, &mut Timings::default(), Some(observer))
    }

    fn execute(
        &self,
        images: Images<'_>,
        timings: &mut Timings,
        observer: Option<&mut dyn Observer>,
    ) -> Result<Vec<f32>> {
        let pixels = self.pixels(images)?;
        let run =
            ops::Run { kernel: &self.kernel, program: &self.program, last_use: &self.last_use };
        ops::execute(&self.ops, &run, pixels, self.size, timings, observer)
    }

    #[allow(clippy::float_arithmetic)] // checks float input against the pipeline's steps
    fn pixels(&self, images: Images<'_>) -> Result<Vec<u8>> {
        let per = 3 * self.size * self.size;
        let len = match images {
            Images::Pixels(p) => p.len(),
            Images::Normalized(x) => x.len(),
        };
        if len == 0 || !len.is_multiple_of(per) {
            return Err(Error::Input(format!(
                "{len} values are not whole images of 3 × {0} × {0}",
                self.size
            )));
        }
        match images {
            Images::Pixels(p) => Ok(p.to_vec()),
            Images::Normalized(x) => {
                let n = self.normalize;
                let plane = self.size * self.size;
                // The pipeline's own float32 steps, per channel, for every pixel value.
                let table: Vec<[f32; 256]> = (0..3)
                    .map(|c| std::array::from_fn(|p| (p as f32 / 255.0 - n.mean[c]) / n.std[c]))
                    .collect();
                x.iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let c = (i / plane) % 3;
                        let p =
                            ((v * n.std[c] + n.mean[c]) * 255.0).round().clamp(0.0, 255.0) as usize;
                        if table[c][p].to_bits() == v.to_bits() {
                            Ok(p as u8)
                        } else {
                            Err(Error::Input(format!(
                                "value {v} at index {i} is not a normalized 8-bit pixel"
                            )))
                        }
                    })
                    .collect()
            }
        }
    }
}
