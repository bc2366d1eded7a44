//! The u8 × i8 → i32 GEMM: `out[m][n] = Σ_k a[m][k] · w[n][k]` (raw codes; zero points are
//! corrected by the caller with the weight row sums).
//!
//! The kernels ([`KernelKind`]): with AVX-512 VNNI our `vpdpbusd` kernel (`gemm/vnni.rs`; as
//! fast as rten's on a batch and without its per-call packing of the activations, which matters
//! once the GEMM runs per task, fused with its epilogue: [`for_each_rows`]); `rten-gemm`'s int8
//! kernel where it is exact (AVX-512 VNNI, and its portable kernels: its `may_saturate()` is
//! false); on x86 CPUs with AVX2
//! and no VNNI, where rten's `vpmaddubsw` kernel saturates 16-bit pair sums on full-range int8
//! weights, our 16-bit pair kernel (`gemm/pairs.rs`); and everywhere our widening loops compiled for
//! the detected instruction set through `pulp`. Zero points are never passed to rten (its
//! packing mis-assigns per-row zero points past the first panel, found while choosing it); the
//! caller corrects them with row sums.
//!
//! Exactness: every product is at most 255 · 128 < 2^15 in magnitude, so a row of `K ≤ 2^16`
//! sums within ±2^31 (checked in [`Weights::new`]); the fast path computes the same integer sums
//! in another order, and integer addition is associative, so both give identical results.

mod pairs;
mod vnni;

use fqvit_ops::Isa;
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;
use rten_gemm::{GemmExecutor, GemmInputA, GemmInputB, GemmOptions, PackedBMatrix};
use rten_tensor::{Matrix, NdTensorView};

/// The longest reduction the i32 accumulators hold exactly: `2^16 · 255 · 128 < 2^31`.
pub const MAX_K: usize = 1 << 16;

/// Which int8 GEMM kernel an engine uses; every one gives the same integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// `vpdpbusd` in 12 × 32 register tiles (`gemm/vnni.rs`): x86 CPUs with AVX-512 VNNI.
    Avx512Vnni,
    /// `rten-gemm`'s kernel, where it is exact on this CPU (AVX-512 VNNI, or its portable one).
    Rten,
    /// 16-bit pairs through AVX2's `vpmaddwd` (`gemm/pairs.rs`): x86 CPUs with AVX2.
    Avx2Pairs,
    /// Widening loops compiled for the detected instruction set: any CPU.
    Loops,
}

impl KernelKind {
    /// Every kind, fastest first where several run.
    pub const ALL: [KernelKind; 4] =
        [KernelKind::Avx512Vnni, KernelKind::Rten, KernelKind::Avx2Pairs, KernelKind::Loops];

    /// The name `--gemm-kernel` takes.
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Avx512Vnni => "avx512-vnni",
            KernelKind::Rten => "rten",
            KernelKind::Avx2Pairs => "avx2-pairs",
            KernelKind::Loops => "loops",
        }
    }
}

impl std::fmt::Display for KernelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KernelKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        KernelKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<_> = KernelKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown GEMM kernel {s:?} (expected one of {})", names.join(", "))
        })
    }
}

/// The int8 kernel and the instruction set of the loops around it, made once per engine:
/// detection asks the CPU (`cpuid`), which a hypervisor makes slow, and attention builds weight
/// matrices per head.
pub struct Kernel {
    imp: Imp,
    isa: Isa,
    arch: Arch,
}

enum Imp {
    Vnni(vnni::Vnni),
    Rten(GemmExecutor<u8, i8, i32>),
    Avx2Pairs(pulp::x86::V3),
    Loops,
}

impl Kernel {
    /// The fastest exact kernel this CPU runs within `isa`: natively ours with AVX-512 VNNI,
    /// else rten's where it multiplies bytes exactly with SIMD, else the AVX2 pairs, else
    /// rten's portable kernel or the loops; the AVX2 pairs or the loops within AVX2; the loops
    /// at `Scalar`.
    pub fn detect(isa: Isa) -> Self {
        let with = |imp| Kernel { imp, isa, arch: isa.arch() };
        let pairs = if isa == Isa::Scalar { None } else { pairs::available() };
        if isa != Isa::Native {
            return with(pairs.map_or(Imp::Loops, Imp::Avx2Pairs));
        }
        if let Some(v) = vnni::available() {
            return with(Imp::Vnni(v));
        }
        let exec = GemmExecutor::<u8, i8, i32>::new();
        // rten-gemm 0.25's name for its portable kernel (pinned with the crate's version).
        let rten_simd = !exec.may_saturate() && exec.kernel_name() != "generic-u8i8i32";
        if rten_simd {
            return with(Imp::Rten(exec));
        }
        if let Some(v3) = pairs {
            return with(Imp::Avx2Pairs(v3));
        }
        with(if exec.may_saturate() { Imp::Loops } else { Imp::Rten(exec) })
    }

    /// The kernel `kind` with the loops within `isa`, if this CPU runs it exactly there (rten
    /// chooses its own instruction set, so it runs only natively).
    pub fn new(kind: KernelKind, isa: Isa) -> Option<Self> {
        let imp = match kind {
            KernelKind::Avx512Vnni if isa == Isa::Native => Imp::Vnni(vnni::available()?),
            KernelKind::Rten if isa == Isa::Native => {
                let exec = GemmExecutor::<u8, i8, i32>::new();
                Imp::Rten((!exec.may_saturate()).then_some(exec)?)
            }
            KernelKind::Avx2Pairs if isa != Isa::Scalar => Imp::Avx2Pairs(pairs::available()?),
            KernelKind::Loops => Imp::Loops,
            _ => return None,
        };
        Some(Kernel { imp, isa, arch: isa.arch() })
    }

    /// Every kernel this CPU runs exactly, at every instruction set it has (for tests and
    /// benchmarks).
    pub fn supported() -> Vec<Self> {
        Isa::ALL
            .into_iter()
            .filter(|isa| isa.available())
            .flat_map(|isa| KernelKind::ALL.into_iter().filter_map(move |k| Kernel::new(k, isa)))
            .collect()
    }

    /// The instruction set the loops around the GEMM are held to.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// What those loops dispatch on.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Which kernel this is.
    pub fn kind(&self) -> KernelKind {
        match self.imp {
            Imp::Vnni(_) => KernelKind::Avx512Vnni,
            Imp::Rten(_) => KernelKind::Rten,
            Imp::Avx2Pairs(_) => KernelKind::Avx2Pairs,
            Imp::Loops => KernelKind::Loops,
        }
    }

    /// The kernel's name, with rten's own kernel name, and the loops' cap where there is one.
    pub fn name(&self) -> String {
        let name = match &self.imp {
            Imp::Vnni(_) => "fqvit AVX-512 VNNI".into(),
            Imp::Rten(exec) => format!("rten-gemm {}", exec.kernel_name()),
            Imp::Avx2Pairs(_) => "fqvit AVX2 16-bit pairs".into(),
            Imp::Loops => "fqvit widening loops".into(),
        };
        match self.isa {
            Isa::Native => name,
            isa => format!("{name}, loops {isa}"),
        }
    }
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// int8 weights `(N, K)`, row-major, with their row sums, prepared for one [`Kernel`].
pub struct Weights {
    /// Output channels.
    pub n: usize,
    /// Reduction length.
    pub k: usize,
    /// The codes, row-major; dropped once a kernel has packed them (unless kept by
    /// [`Weights::with_codes`]), so that the weights are held once, at a byte each.
    codes: Vec<i8>,
    /// `Σ_k w[n][k]`, for the input zero-point correction.
    pub row_sums: Vec<i32>,
    /// The kernel's packing, where it has one.
    packed: Packing,
}

enum Packing {
    None,
    Vnni(vnni::Packed),
    Rten(PackedBMatrix<i8>),
    Pairs(pairs::Packed),
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("packed", &!matches!(self.packed, Packing::None))
            .finish()
    }
}

/// No weights yet: a buffer for [`Weights::repack`] and [`Weights::repack_transposed`].
impl Default for Weights {
    fn default() -> Self {
        Weights { n: 0, k: 0, codes: Vec::new(), row_sums: Vec::new(), packed: Packing::None }
    }
}

impl Weights {
    /// Wraps `(n, k)` codes for `kernel`.
    ///
    /// # Panics
    /// If the length is not `n · k` or `k` exceeds [`MAX_K`].
    pub fn new(kernel: &Kernel, codes: Vec<i8>, n: usize, k: usize) -> Self {
        let mut w = Weights::with_codes(kernel, codes, n, k);
        if !matches!(w.packed, Packing::None) {
            w.codes = Vec::new();
        }
        w
    }

    /// [`Weights::new`], keeping the codes beside the kernel's packing, for [`gemm_reference`]
    /// on the same weights.
    ///
    /// # Panics
    /// As [`Weights::new`].
    pub fn with_codes(kernel: &Kernel, codes: Vec<i8>, n: usize, k: usize) -> Self {
        assert_eq!(codes.len(), n * k, "gemm: {} weight codes for ({n}, {k})", codes.len());
        assert!(k <= MAX_K, "gemm: reduction of {k} exceeds {MAX_K}");
        let row_sums =
            codes.chunks_exact(k.max(1)).map(|r| r.iter().map(|&w| i32::from(w)).sum()).collect();
        let packed = match &kernel.imp {
            _ if n == 0 || k == 0 => Packing::None,
            Imp::Rten(exec) => Packing::Rten(
                exec.prepack_b(NdTensorView::from_data([n, k], codes.as_slice()).transposed()),
            ),
            Imp::Avx2Pairs(_) => Packing::Pairs(pairs::Packed::new(&codes, n, k)),
            Imp::Vnni(_) => Packing::Vnni(vnni::Packed::new(&codes, n, k)),
            Imp::Loops => Packing::None,
        };
        Weights { n, k, codes, row_sums, packed }
    }

    /// These weights replaced by `(n, k)` row-major codes, prepared for `kernel`, reusing the
    /// buffers (attention packs its keys per head). The codes are kept only where the kernel
    /// has no packing.
    ///
    /// # Panics
    /// As [`Weights::new`].
    pub fn repack(&mut self, kernel: &Kernel, codes: &[i8], n: usize, k: usize) {
        self.reset(codes.len(), n, k);
        self.row_sums.clear();
        self.row_sums.extend(
            codes.chunks_exact(k.max(1)).map(|r| r.iter().map(|&w| i32::from(w)).sum::<i32>()),
        );
        self.row_sums.resize(n, 0);
        match (&kernel.imp, &mut self.packed) {
            _ if n == 0 || k == 0 => self.packed = Packing::None,
            (Imp::Vnni(_), Packing::Vnni(p)) => p.fill(codes, n, k),
            (Imp::Vnni(_), _) => self.packed = Packing::Vnni(vnni::Packed::new(codes, n, k)),
            (Imp::Avx2Pairs(_), Packing::Pairs(p)) => p.fill(codes, n, k),
            (Imp::Avx2Pairs(_), _) => self.packed = Packing::Pairs(pairs::Packed::new(codes, n, k)),
            (Imp::Rten(exec), _) => {
                let view = NdTensorView::from_data([n, k], codes).transposed();
                self.packed = Packing::Rten(exec.prepack_b(view));
            }
            (Imp::Loops, _) => {
                self.packed = Packing::None;
                self.codes.clear();
                self.codes.extend_from_slice(codes);
            }
        }
    }

    /// [`Weights::repack`] from the codes transposed, `t` `(k, n)` row-major (`w[c][i] =
    /// t[i][c]`: attention's values, tokens by channels), without a transposed copy where the
    /// kernel packs.
    ///
    /// # Panics
    /// As [`Weights::new`].
    pub fn repack_transposed(&mut self, kernel: &Kernel, t: &[i8], n: usize, k: usize) {
        self.reset(t.len(), n, k);
        // Summed into: zeroed.
        self.row_sums.clear();
        self.row_sums.resize(n, 0);
        for step in t.chunks_exact(n.max(1)) {
            self.row_sums.iter_mut().zip(step).for_each(|(s, &w)| *s += i32::from(w));
        }
        match (&kernel.imp, &mut self.packed) {
            _ if n == 0 || k == 0 => self.packed = Packing::None,
            (Imp::Vnni(_), Packing::Vnni(p)) => p.fill_transposed(t, n, k),
            (Imp::Vnni(_), _) => {
                let mut p = vnni::Packed::default();
                p.fill_transposed(t, n, k);
                self.packed = Packing::Vnni(p);
            }
            (Imp::Avx2Pairs(_), Packing::Pairs(p)) => p.fill_transposed(t, n, k),
            (Imp::Avx2Pairs(_), _) => {
                let mut p = pairs::Packed::default();
                p.fill_transposed(t, n, k);
                self.packed = Packing::Pairs(p);
            }
            (Imp::Rten(exec), _) => {
                self.packed = Packing::Rten(exec.prepack_b(NdTensorView::from_data([k, n], t)));
            }
            (Imp::Loops, _) => {
                self.packed = Packing::None;
                reuse(&mut self.codes, n * k);
                for (i, step) in t.chunks_exact(n.max(1)).enumerate() {
                    for (c, &w) in step.iter().enumerate() {
                        self.codes[c * k + i] = w;
                    }
                }
            }
        }
    }

    /// Checks the shape of `len` codes for `(n, k)` and takes it.
    #[track_caller]
    fn reset(&mut self, len: usize, n: usize, k: usize) {
        assert_eq!(len, n * k, "gemm: {len} weight codes for ({n}, {k})");
        assert!(k <= MAX_K, "gemm: reduction of {k} exceeds {MAX_K}");
        (self.n, self.k) = (n, k);
        self.codes.clear();
    }

    /// The codes of output channel `n`.
    ///
    /// # Panics
    /// If a kernel packed the codes and they were not kept ([`Weights::with_codes`]).
    pub fn row(&self, n: usize) -> &[i8] {
        assert!(
            self.codes.len() == self.n * self.k,
            "gemm: these weights keep only the kernel's packing (build them with Weights::with_codes)"
        );
        &self.codes[n * self.k..][..self.k]
    }

    /// Bytes held (the kernel's packed copy included).
    pub fn bytes(&self) -> usize {
        let packed = match &self.packed {
            Packing::None => 0,
            Packing::Rten(_) => self.n * self.k,
            Packing::Vnni(p) => p.bytes(),
            Packing::Pairs(p) => p.bytes(),
        };
        self.codes.len() + packed + 4 * self.row_sums.len()
    }
}

/// The scalar reference: one dot product per output, in index order.
pub fn gemm_reference(a: &[u8], w: &Weights, out: &mut [i32]) {
    let m = check(a, w, out);
    for i in 0..m {
        let row = &a[i * w.k..][..w.k];
        for n in 0..w.n {
            out[i * w.n + n] =
                row.iter().zip(w.row(n)).map(|(&x, &y)| i32::from(x) * i32::from(y)).sum();
        }
    }
}

fn check(a: &[u8], w: &Weights, out: &[i32]) -> usize {
    assert_eq!(a.len() % w.k.max(1), 0, "gemm: {} input codes are not rows of {}", a.len(), w.k);
    let m = a.len() / w.k.max(1);
    assert_eq!(out.len(), m * w.n, "gemm: room for {} outputs, need {}", out.len(), m * w.n);
    m
}

/// Output channels per inner block of the loops: the four weight rows stay in L1 while a
/// task's rows pass.
const COLS: usize = 4;

/// Accumulator bytes per parallel task: the task's block stays in L2 for the epilogue that
/// follows its GEMM.
const TASK_ACC_BYTES: usize = 64 << 10;

/// Rows per parallel task for an `(m, k) × (k, n)` product: accumulators of about
/// `TASK_ACC_BYTES` (64 KiB), a multiple of 24 rows (whole register tiles of every kernel), and at
/// least four tasks per thread where `m` allows.
pub fn task_rows(m: usize, n: usize) -> usize {
    let by_cache = TASK_ACC_BYTES / (4 * n.max(1));
    let by_threads = m.div_ceil(4 * rayon::current_num_threads());
    (by_cache.min(by_threads) / 24 * 24).max(24)
}

/// Per-task buffers of [`for_each_rows`]: accumulators and the kernel's packed rows, reused
/// across the tasks of a thread.
#[derive(Debug, Default)]
pub struct Scratch {
    /// The accumulators [`Scratch::gemm`] writes.
    pub acc: Vec<i32>,
    /// The accumulators [`Scratch::gemm2`] writes (a second product of the same rows).
    pub acc2: Vec<i32>,
    /// Bytes for the caller's own per-task inputs.
    pub bytes: Vec<u8>,
    /// More bytes for the caller.
    pub bytes2: Vec<u8>,
    /// 16-bit values for the caller ([`Scratch::gemm_wide`]'s rows).
    pub wide: Vec<u16>,
    rows: Vec<u32>,
}

impl Scratch {
    /// `acc = a · wᵀ` for the task's rows `a`, on this thread.
    pub fn gemm(&mut self, kernel: &Kernel, a: &[u8], w: &Weights) -> &mut [i32] {
        reuse(&mut self.acc, a.len() / w.k.max(1) * w.n);
        block(kernel, a, w, &mut self.rows, &mut self.acc);
        &mut self.acc
    }

    /// `acc2 = a · wᵀ`, as [`Scratch::gemm`].
    pub fn gemm2(&mut self, kernel: &Kernel, a: &[u8], w: &Weights) -> &mut [i32] {
        reuse(&mut self.acc2, a.len() / w.k.max(1) * w.n);
        block(kernel, a, w, &mut self.rows, &mut self.acc2);
        &mut self.acc2
    }
}

impl Scratch {
    /// `acc = a · wᵀ` for rows of 16-bit values below 2^15, with the kernels whose operands
    /// are 16 bits wide (the AVX2 pairs); `None` with any other (the caller splits the values
    /// into byte planes then). The caller bounds the sums: `K · max(a) · 128 < 2^31`.
    ///
    /// # Panics
    /// As [`Scratch::gemm`].
    pub fn gemm_wide(&mut self, kernel: &Kernel, a: &[u16], w: &Weights) -> Option<&mut [i32]> {
        if !kernel.takes_wide() {
            return None;
        }
        reuse(&mut self.acc, a.len() / w.k.max(1) * w.n);
        gemm_wide_local(kernel, a, w, &mut self.rows, &mut self.acc);
        Some(&mut self.acc)
    }
}

impl Kernel {
    /// Whether [`gemm_wide_local`] runs (the AVX2 pairs, whose operands are 16 bits wide).
    pub fn takes_wide(&self) -> bool {
        matches!(self.imp, Imp::Avx2Pairs(_))
    }
}

/// `out = a · wᵀ` on this thread for rows of 16-bit values below 2^15, with a kernel that
/// [takes them](Kernel::takes_wide); `rows` is the kernel's scratch. The caller bounds the
/// sums: `K · max(a) · 128 < 2^31`.
///
/// # Panics
/// With another kernel, weights prepared for another, or lengths that do not fit.
pub fn gemm_wide_local(
    kernel: &Kernel,
    a: &[u16],
    w: &Weights,
    rows: &mut Vec<u32>,
    out: &mut [i32],
) {
    assert!(
        w.k > 0 && a.len().is_multiple_of(w.k),
        "gemm: {} input values are not rows of {}",
        a.len(),
        w.k
    );
    assert_eq!(out.len(), a.len() / w.k * w.n, "gemm: room for {} outputs", out.len());
    debug_assert!(a.iter().all(|&x| x < 1 << 15), "gemm: 16-bit rows take values below 2^15");
    match (&kernel.imp, &w.packed) {
        (Imp::Avx2Pairs(v3), Packing::Pairs(packed)) => {
            pairs::block(*v3, a, packed, w.n, w.k, rows, out)
        }
        (Imp::Avx2Pairs(_), Packing::None) if w.n == 0 => {}
        _ => panic!("gemm: {} does not take 16-bit rows with these weights", kernel.name()),
    }
}

/// `v` holding `len` elements, keeping its allocation and its old values (growth is filled with
/// defaults): for a buffer the caller overwrites whole before reading it, which zeroing would
/// only make slower (a head's attention buffers, half a megabyte, are reused by every head).
pub(crate) fn reuse<T: Copy + Default>(v: &mut Vec<T>, len: usize) {
    v.resize(len, T::default());
}

/// Runs `f(scratch, a_rows, out_rows)` in parallel over blocks of [`task_rows`] rows of `a`
/// (rows of `k` codes) and the matching rows of `out` (`out.len() / m` each), `n` being the
/// width of the product the task computes. A task's GEMM ([`Scratch::gemm`]) and what follows it
/// run while its accumulators are in cache.
///
/// # Panics
/// If `a` is not whole rows of `k`, or `out` not whole rows for them.
pub fn for_each_rows<O: Send>(
    a: &[u8],
    k: usize,
    n: usize,
    out: &mut [O],
    f: impl Fn(&mut Scratch, &[u8], &mut [O]) + Sync,
) {
    assert!(
        k > 0 && a.len().is_multiple_of(k),
        "gemm: {} input codes are not rows of {k}",
        a.len()
    );
    let m = a.len() / k;
    if m == 0 {
        return;
    }
    assert!(out.len().is_multiple_of(m), "gemm: {} outputs are not {m} rows", out.len());
    let (rows, width) = (task_rows(m, n), out.len() / m);
    a.par_chunks(rows * k)
        .zip(out.par_chunks_mut(rows * width.max(1)))
        .for_each_init(Scratch::default, |s, (a, out)| f(s, a, out));
}

/// `out = a · wᵀ` on this thread, with `kernel` (its own threads for rten's).
fn block(kernel: &Kernel, a: &[u8], w: &Weights, rows: &mut Vec<u32>, out: &mut [i32]) {
    let m = check(a, w, out);
    if m == 0 || w.n == 0 {
        return;
    }
    if w.k == 0 {
        out.fill(0);
        return;
    }
    match (&kernel.imp, &w.packed) {
        (Imp::Vnni(v), Packing::Vnni(packed)) => vnni::block(*v, a, packed, w.n, w.k, rows, out),
        (Imp::Rten(exec), Packing::Rten(packed)) => {
            let a = Matrix::from_data([m, w.k], a);
            exec.gemm(
                out,
                GemmInputA::Unpacked(a),
                GemmInputB::Packed(packed),
                GemmOptions::default(),
            )
            .expect("shapes were checked");
        }
        (Imp::Avx2Pairs(v3), Packing::Pairs(packed)) => {
            pairs::block(*v3, a, packed, w.n, w.k, rows, out)
        }
        (Imp::Loops, Packing::None) => kernel.arch.dispatch(Block { a, w, out }),
        _ => panic!("gemm: weights prepared for another kernel than {}", kernel.name()),
    }
}

/// [`gemm`] on this thread alone, for callers that are parallel already (attention's heads).
///
/// # Panics
/// As [`gemm`].
pub fn gemm_local(kernel: &Kernel, a: &[u8], w: &Weights, out: &mut [i32]) {
    block(kernel, a, w, &mut Vec::new(), out);
}

/// The fast path: `kernel`'s, for weights prepared with it, rows in parallel.
///
/// # Panics
/// If the lengths do not fit the weights, or the weights were prepared for another kernel.
pub fn gemm(kernel: &Kernel, a: &[u8], w: &Weights, out: &mut [i32]) {
    let m = check(a, w, out);
    if m == 0 || w.n == 0 {
        return;
    }
    if w.k == 0 {
        out.fill(0);
        return;
    }
    if let Imp::Rten(_) = kernel.imp {
        // rten parallelises its own blocks.
        return block(kernel, a, w, &mut Vec::new(), out);
    }
    for_each_rows(a, w.k, w.n, out, |s, a, out| block(kernel, a, w, &mut s.rows, out));
}

struct Block<'a> {
    a: &'a [u8],
    w: &'a Weights,
    out: &'a mut [i32],
}

impl WithSimd for Block<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        let Block { a, w, out } = self;
        let k = w.k;
        let rows = a.len() / k;
        let mut n = 0;
        while n + COLS <= w.n {
            let (w0, w1, w2, w3) = (w.row(n), w.row(n + 1), w.row(n + 2), w.row(n + 3));
            for i in 0..rows {
                let x = &a[i * k..][..k];
                let (mut s0, mut s1, mut s2, mut s3) = (0i32, 0i32, 0i32, 0i32);
                for j in 0..k {
                    let xj = i32::from(x[j]);
                    s0 += xj * i32::from(w0[j]);
                    s1 += xj * i32::from(w1[j]);
                    s2 += xj * i32::from(w2[j]);
                    s3 += xj * i32::from(w3[j]);
                }
                let o = &mut out[i * w.n + n..][..COLS];
                o.copy_from_slice(&[s0, s1, s2, s3]);
            }
            n += COLS;
        }
        for n in n..w.n {
            let wn = w.row(n);
            for i in 0..rows {
                let x = &a[i * k..][..k];
                out[i * w.n + n] =
                    x.iter().zip(wn).map(|(&x, &y)| i32::from(x) * i32::from(y)).sum();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Codes from a seed, with the extremes (0, 255, −128, 127) often.
    fn codes(seed: u64, len: usize) -> Vec<u8> {
        let mut next = fqvit_testkit::lcg(seed);
        (0..len)
            .map(|_| {
                let s = next();
                match (s >> 60) as u8 {
                    0 => 0,
                    1 => 255,
                    2 => 128,
                    3 => 127,
                    _ => (s >> 33) as u8,
                }
            })
            .collect()
    }

    proptest! {
        /// Every kernel this CPU runs equals the scalar reference: row counts across the
        /// register tile and the parallel task, channels across panels, odd reductions.
        #[test]
        fn every_kernel_equals_the_reference(
            m in 0usize..70, n in 0usize..40, k in 1usize..300, seed in any::<u64>(),
        ) {
            let a = codes(seed, m * k);
            let wc: Vec<i8> = codes(!seed, n * k).into_iter().map(|c| c as i8).collect();
            let kernels = Kernel::supported();
            prop_assert!(kernels.iter().any(|k| k.kind() == KernelKind::Loops));
            let mut x = vec![0; m * n];
            gemm_reference(&a, &Weights::with_codes(&kernels[0], wc.clone(), n, k), &mut x);
            // The same weights given transposed, `(k, n)`.
            let t: Vec<i8> = (0..k * n).map(|i| wc[(i % n) * k + i / n]).collect();
            for kernel in &kernels {
                let w = Weights::new(kernel, wc.clone(), n, k);
                let mut y = vec![1; m * n];
                gemm(kernel, &a, &w, &mut y);
                prop_assert_eq!(&x, &y, "{}", kernel.name());
                // Repacked into buffers that held another shape first.
                let mut r = Weights::default();
                r.repack(kernel, &vec![3; (n + 5) * (k + 3)], n + 5, k + 3);
                r.repack(kernel, &wc, n, k);
                prop_assert_eq!(&r.row_sums, &w.row_sums);
                y.fill(1);
                gemm(kernel, &a, &r, &mut y);
                prop_assert_eq!(&x, &y, "{} repacked", kernel.name());
                r.repack_transposed(kernel, &vec![-3; (k + 1) * (n + 2)], n + 2, k + 1);
                r.repack_transposed(kernel, &t, n, k);
                prop_assert_eq!(&r.row_sums, &w.row_sums);
                y.fill(1);
                gemm(kernel, &a, &r, &mut y);
                prop_assert_eq!(&x, &y, "{} from the transposed codes", kernel.name());
            }
        }
    }

    /// Rows of 16-bit values (a PTF input's shifted codes) through the kernels that take them
    /// whole equal the i64 sums; the others decline.
    #[test]
    fn wide_rows_equal_the_reference() {
        let mut lcg = fqvit_testkit::lcg(0x5851_f42d_4c95_7f2d);
        let mut next = move || lcg() >> 33;
        for kernel in Kernel::supported() {
            for (m, n, k) in [(1, 1, 1), (5, 17, 33), (30, 40, 255), (49, 16, 8)] {
                // K · 2^15 · 128 < 2^31: any values below 2^15.
                let a: Vec<u16> = (0..m * k).map(|_| (next() % (1 << 15)) as u16).collect();
                let wc: Vec<i8> = (0..n * k).map(|_| next() as u8 as i8).collect();
                let w = Weights::with_codes(&kernel, wc, n, k);
                let mut scratch = Scratch::default();
                let Some(got) = scratch.gemm_wide(&kernel, &a, &w) else {
                    assert_ne!(kernel.kind(), KernelKind::Avx2Pairs);
                    continue;
                };
                for (i, row) in a.chunks_exact(k).enumerate() {
                    for c in 0..n {
                        let want: i64 = row
                            .iter()
                            .zip(w.row(c))
                            .map(|(&x, &y)| i64::from(x) * i64::from(y))
                            .sum();
                        assert_eq!(
                            i64::from(got[i * n + c]),
                            want,
                            "{} ({m}, {n}, {k})",
                            kernel.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn extremes_do_not_overflow() {
        // 255 · −128 and 255 · 127 over the longest row: the sums the bound allows at either end.
        let k = MAX_K;
        for kernel in Kernel::supported() {
            for (w, sum) in [(-128i8, -255 * 128 * k as i32), (127, 255 * 127 * k as i32)] {
                let w = Weights::new(&kernel, vec![w; 20 * k], 20, k);
                let a = vec![255u8; 6 * k];
                let mut out = vec![0; 6 * 20];
                gemm(&kernel, &a, &w, &mut out);
                assert!(out.iter().all(|&v| v == sum), "{}", kernel.name());
            }
        }
    }

    #[test]
    fn kernels_are_named_and_parsed() {
        for kind in KernelKind::ALL {
            assert_eq!(kind.name().parse::<KernelKind>(), Ok(kind));
        }
        let err = "vnni".parse::<KernelKind>().unwrap_err();
        assert!(err.contains("rten, avx2-pairs, loops"), "{err}");
        for isa in Isa::ALL {
            let loops = Kernel::new(KernelKind::Loops, isa).map(|k| k.kind());
            assert_eq!(loops, Some(KernelKind::Loops));
            assert!(Kernel::new(KernelKind::Avx512Vnni, Isa::Avx2).is_none());
            assert!(Kernel::new(KernelKind::Avx2Pairs, Isa::Scalar).is_none());
        }
    }
}
