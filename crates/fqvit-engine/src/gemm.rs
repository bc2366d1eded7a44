//! The u8 × i8 → i32 GEMM: `out[m][n] = Σ_k a[m][k] · w[n][k]` (raw codes; zero points are
//! corrected by the caller with the weight row sums).
//!
//! Two fast paths: `rten-gemm`'s int8 kernel where it is exact (AVX-512 VNNI, `vpdpbusd`, and
//! its portable kernels: its `may_saturate()` is false), and elsewhere (AVX2's `vpmaddubsw`
//! saturates 16-bit pair sums on full-range int8 weights) our own loops compiled for the detected
//! instruction set through `pulp`, which widen to i32 before multiplying. Zero points are never
//! passed to rten (its packing mis-assigns per-row zero points past the first panel, found while
//! choosing it); the caller corrects them with row sums.
//!
//! Exactness: every product is at most 255 · 128 = 2^15 in magnitude, so a row of `K ≤ 2^16`
//! sums within ±2^31 (checked in [`Weights::new`]); the fast path computes the same integer sums
//! in another order, and integer addition is associative, so both give identical results.

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;
use rten_gemm::{GemmExecutor, GemmInputA, GemmInputB, GemmOptions, PackedBMatrix};
use rten_tensor::{Matrix, NdTensorView};

/// The longest reduction the i32 accumulators hold exactly: `2^16 · 255 · 128 < 2^31`.
pub const MAX_K: usize = 1 << 16;

/// The detected int8 kernel, made once per engine: detection asks the CPU (`cpuid`), which a
/// hypervisor makes slow, and attention builds weight matrices per head.
pub struct Kernel {
    /// rten's executor, where its kernel is exact.
    rten: Option<GemmExecutor<u8, i8, i32>>,
}

impl Kernel {
    /// rten's kernel where it is exact, else our widening loops.
    pub fn detect() -> Self {
        let exec = GemmExecutor::<u8, i8, i32>::new();
        Kernel { rten: (!exec.may_saturate()).then_some(exec) }
    }

    /// The kernel's name.
    pub fn name(&self) -> String {
        match &self.rten {
            Some(exec) => format!("rten-gemm {}", exec.kernel_name()),
            None => "fqvit widening loops".into(),
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
    /// The codes, row-major; dropped once rten has packed them (unless kept by
    /// [`Weights::with_codes`]), so that the weights are held once, at a byte each.
    codes: Vec<i8>,
    /// `Σ_k w[n][k]`, for the input zero-point correction.
    pub row_sums: Vec<i32>,
    /// rten's packing of `Wᵀ`, where the kernel is rten's.
    packed: Option<PackedBMatrix<i8>>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("packed", &self.packed.is_some())
            .finish()
    }
}

impl Weights {
    /// Wraps `(n, k)` codes for `kernel`.
    ///
    /// # Panics
    /// If the length is not `n · k` or `k` exceeds [`MAX_K`].
    pub fn new(kernel: &Kernel, codes: Vec<i8>, n: usize, k: usize) -> Self {
        let mut w = Weights::with_codes(kernel, codes, n, k);
        if w.packed.is_some() {
            w.codes = Vec::new();
        }
        w
    }

    /// [`Weights::new`], keeping the codes beside rten's packing, for [`gemm_reference`] and
    /// [`gemm_loops`] on the same weights.
    ///
    /// # Panics
    /// As [`Weights::new`].
    pub fn with_codes(kernel: &Kernel, codes: Vec<i8>, n: usize, k: usize) -> Self {
        assert_eq!(codes.len(), n * k, "gemm: {} weight codes for ({n}, {k})", codes.len());
        assert!(k <= MAX_K, "gemm: reduction of {k} exceeds {MAX_K}");
        let row_sums =
            codes.chunks_exact(k.max(1)).map(|r| r.iter().map(|&w| i32::from(w)).sum()).collect();
        let packed = kernel.rten.as_ref().filter(|_| n > 0 && k > 0).map(|exec| {
            exec.prepack_b(NdTensorView::from_data([n, k], codes.as_slice()).transposed())
        });
        Weights { n, k, codes, row_sums, packed }
    }

    /// The codes of output channel `n`.
    ///
    /// # Panics
    /// If rten packed the codes and they were not kept ([`Weights::with_codes`]).
    pub fn row(&self, n: usize) -> &[i8] {
        assert!(
            self.codes.len() == self.n * self.k,
            "gemm: these weights keep only rten's packing (build them with Weights::with_codes)"
        );
        &self.codes[n * self.k..][..self.k]
    }

    /// Bytes held (rten's packed copy included).
    pub fn bytes(&self) -> usize {
        let packed = if self.packed.is_some() { self.n * self.k } else { 0 };
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

/// Rows of `a` per parallel task.
const ROWS_PER_TASK: usize = 8;
/// Output channels per inner block: the four weight rows stay in L1 while a task's rows pass.
const COLS: usize = 4;

/// The fast path: `kernel`'s, for weights prepared with it (rten's, or [`gemm_loops`]).
pub fn gemm(kernel: &Kernel, a: &[u8], w: &Weights, out: &mut [i32]) {
    let m = check(a, w, out);
    if m == 0 || w.n == 0 {
        return;
    }
    if let (Some(exec), Some(packed)) = (&kernel.rten, &w.packed) {
        let a = Matrix::from_data([m, w.k], a);
        exec.gemm(out, GemmInputA::Unpacked(a), GemmInputB::Packed(packed), GemmOptions::default())
            .expect("shapes were checked");
        return;
    }
    gemm_loops(a, w, out);
}

/// The widening loops alone (the fast path where rten's kernel may saturate): rows in parallel,
/// each task computing 1 × 4 blocks of dot products in loops compiled for the detected
/// instruction set (AVX-512 VNNI/AVX2 widening multiply-adds).
pub fn gemm_loops(a: &[u8], w: &Weights, out: &mut [i32]) {
    let m = check(a, w, out);
    if m == 0 || w.n == 0 {
        return;
    }
    let arch = Arch::new();
    a.par_chunks(ROWS_PER_TASK * w.k)
        .zip(out.par_chunks_mut(ROWS_PER_TASK * w.n))
        .for_each(|(a, out)| arch.dispatch(Block { a, w, out }));
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

    proptest! {
        #[test]
        fn fast_equals_reference(
            m in 0usize..20, n in 0usize..11, k in 1usize..300, seed in any::<u64>(),
        ) {
            let mut s = seed;
            let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (s >> 33) as u8 };
            let a: Vec<u8> = (0..m * k).map(|_| next()).collect();
            let kernel = Kernel::detect();
            let w = Weights::with_codes(&kernel, (0..n * k).map(|_| next() as i8).collect(), n, k);
            let (mut x, mut y) = (vec![0; m * n], vec![1; m * n]);
            gemm_reference(&a, &w, &mut x);
            gemm(&kernel, &a, &w, &mut y);
            prop_assert_eq!(&x, &y);
            y.fill(1);
            gemm_loops(&a, &w, &mut y);
            prop_assert_eq!(&x, &y);
        }
    }

    #[test]
    fn extremes_do_not_overflow() {
        // 255 · -128 over the longest row: the most negative sum the bound allows.
        let k = 4096;
        let kernel = Kernel::detect();
        let w = Weights::with_codes(&kernel, vec![-128; 4 * k], 4, k);
        let a = vec![255u8; 2 * k];
        let mut out = vec![0; 8];
        gemm(&kernel, &a, &w, &mut out);
        assert!(out.iter().all(|&v| v == -255 * 128 * k as i32));
        gemm_loops(&a, &w, &mut out);
        assert!(out.iter().all(|&v| v == -255 * 128 * k as i32));
        assert_eq!(w.row_sums, vec![-128 * k as i32; 4]);
    }
}
