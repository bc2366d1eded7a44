//! [`ColumnTables::row`] in vector lanes: each column's bucket index computed in i64 lanes and
//! its entry fetched with a gather (`vpgatherqd`), which the compiler does not emit on its own.
//! The same codes as the scalar form for every input (tested); the index is clamped to the
//! table as there, so no lane reads outside it.
//!
//! `std::arch`'s gathers have no safe wrapper in `pulp`; each unsafe call below enters a
//! target-feature function with the CPU's features proven by a `pulp` token.
#![allow(unsafe_code)]

use super::ColumnTables;

/// The widest form this CPU and instruction-set cap run, chosen once per layer.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lanes {
    /// AVX-512 (F, DQ, VL): eight columns per step.
    #[cfg(target_arch = "x86_64")]
    V4(pulp::x86::V4),
    /// AVX2: four columns per step.
    #[cfg(target_arch = "x86_64")]
    V3(pulp::x86::V3),
    Scalar,
}

impl Lanes {
    /// The lanes of `arch` (an [`fqvit_ops::Isa`]'s).
    pub(crate) fn of(arch: pulp::Arch) -> Self {
        match arch {
            #[cfg(target_arch = "x86_64")]
            pulp::Arch::V4(v4) => Lanes::V4(v4),
            #[cfg(target_arch = "x86_64")]
            pulp::Arch::V3(v3) => Lanes::V3(v3),
            _ => Lanes::Scalar,
        }
    }
}

impl ColumnTables {
    /// The codes of a row's fixed-point inputs `t`, as [`ColumnTables::row`], in `lanes`.
    pub(crate) fn row_lanes(&self, lanes: Lanes, t: &[i64], out: &mut [u8]) {
        assert!(t.len() == out.len() && t.len() <= self.base.len(), "gelu: row of {}", t.len());
        let done = match lanes {
            // SAFETY: the token proves the CPU runs AVX-512 F, DQ and VL (x86-64-v4).
            #[cfg(target_arch = "x86_64")]
            Lanes::V4(_) => unsafe { self.row_v4(t, out) },
            // SAFETY: the token proves the CPU runs AVX2 (x86-64-v3).
            #[cfg(target_arch = "x86_64")]
            Lanes::V3(_) => unsafe { self.row_v3(t, out) },
            Lanes::Scalar => 0,
        };
        self.row_from(done, &t[done..], &mut out[done..]);
    }

    /// Eight columns per step; returns how many columns it did (a multiple of 8).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2")]
    fn row_v4(&self, t: &[i64], out: &mut [u8]) -> usize {
        use std::arch::x86_64::*;
        let whole = t.len() / 8 * 8;
        let last = _mm512_set1_epi64(self.entries.len() as i64 - 1);
        let (zero, one) = (_mm512_setzero_si512(), _mm512_set1_epi64(1));
        let (low16, low8) = (_mm256_set1_epi32(0xffff), _mm256_set1_epi32(0xff));
        for j in (0..whole).step_by(8) {
            // SAFETY: j + 8 ≤ t.len() ≤ every column array's length (asserted by the caller),
            // and each gathered index is clamped to the entries.
            unsafe {
                let load = |p: *const i64| _mm512_loadu_si512(p.add(j).cast());
                let load32 =
                    |p: *const u32| _mm512_cvtepu32_epi64(_mm256_loadu_si256(p.add(j).cast()));
                let d = _mm512_sub_epi64(load(t.as_ptr()), load(self.base.as_ptr()));
                let r = _mm512_min_epi64(_mm512_max_epi64(d, zero), load(self.span.as_ptr()));
                let log2 = load32(self.log2_width.as_ptr());
                let idx = _mm512_add_epi64(_mm512_srlv_epi64(r, log2), load32(self.start.as_ptr()));
                let idx = _mm512_min_epi64(idx, last);
                let e = _mm512_i64gather_epi32::<4>(idx, self.entries.as_ptr().cast());
                let mask = _mm512_sub_epi64(_mm512_sllv_epi64(one, log2), one);
                let offset = _mm512_cvtepi64_epi32(_mm512_and_si512(r, mask));
                let past = _mm256_cmpge_epu32_mask(offset, _mm256_and_si256(e, low16));
                let below = _mm256_and_si256(_mm256_srli_epi32::<16>(e), low8);
                let code = _mm256_mask_blend_epi32(past, below, _mm256_srli_epi32::<24>(e));
                _mm_storel_epi64(out.as_mut_ptr().add(j).cast(), _mm256_cvtepi32_epi8(code));
            }
        }
        whole
    }

    /// Four columns per step; returns how many columns it did (a multiple of 4).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn row_v3(&self, t: &[i64], out: &mut [u8]) -> usize {
        use std::arch::x86_64::*;
        let whole = t.len() / 4 * 4;
        let last = _mm256_set1_epi64x(self.entries.len() as i64 - 1);
        let (zero, one) = (_mm256_setzero_si256(), _mm256_set1_epi64x(1));
        let (low16, low8) = (_mm_set1_epi32(0xffff), _mm_set1_epi32(0xff));
        // The low 32 bits of each i64 lane, in the low 128 bits.
        let evens = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
        // The low byte of each i32 lane, in the low 32 bits.
        let bytes = _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        let min = |a: __m256i, b: __m256i| _mm256_blendv_epi8(a, b, _mm256_cmpgt_epi64(a, b));
        for j in (0..whole).step_by(4) {
            // SAFETY: as in `row_v4`, four columns at a time.
            unsafe {
                let load = |p: *const i64| _mm256_loadu_si256(p.add(j).cast());
                let load32 =
                    |p: *const u32| _mm256_cvtepu32_epi64(_mm_loadu_si128(p.add(j).cast()));
                let d = _mm256_sub_epi64(load(t.as_ptr()), load(self.base.as_ptr()));
                let d = _mm256_andnot_si256(_mm256_cmpgt_epi64(zero, d), d);
                let r = min(d, load(self.span.as_ptr()));
                let log2 = load32(self.log2_width.as_ptr());
                let idx = min(
                    _mm256_add_epi64(_mm256_srlv_epi64(r, log2), load32(self.start.as_ptr())),
                    last,
                );
                let e = _mm256_i64gather_epi32::<4>(self.entries.as_ptr().cast(), idx);
                let mask = _mm256_sub_epi64(_mm256_sllv_epi64(one, log2), one);
                let offset = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(
                    _mm256_and_si256(r, mask),
                    evens,
                ));
                // Both below 2^16, so the signed compare is the unsigned one.
                let before = _mm_cmpgt_epi32(_mm_and_si128(e, low16), offset);
                let below = _mm_and_si128(_mm_srli_epi32::<16>(e), low8);
                let code = _mm_blendv_epi8(_mm_srli_epi32::<24>(e), below, before);
                let word = _mm_cvtsi128_si32(_mm_shuffle_epi8(code, bytes));
                out[j..j + 4].copy_from_slice(&word.to_le_bytes());
            }
        }
        whole
    }
}
