//! The exponential table's lookups ([`super::ExpTable`]) in vector lanes: each logit's distance
//! below its row's maximum, clamped to the table, then a gather (`vgatherqpd`), which the
//! compiler does not emit on its own (the scalar loop it makes costs about half of
//! Log-Int-Softmax). The same entries as the scalar lookup for every input (tested); the index
//! is clamped as there, so no lane reads outside the table.
//!
//! `std::arch`'s gathers have no safe wrapper in `pulp`; each unsafe call below enters a
//! target-feature function with the CPU's features proven by a `pulp` token.
#![allow(unsafe_code)]

/// The widest form the dispatching instruction set runs.
#[derive(Clone, Copy, Debug)]
pub(super) enum Gather {
    /// AVX-512 F: eight logits per step.
    #[cfg(target_arch = "x86_64")]
    V4(pulp::x86::V4),
    /// AVX2: four logits per step.
    #[cfg(target_arch = "x86_64")]
    V3(pulp::x86::V3),
    Scalar,
}

impl Gather {
    /// The lanes of `arch` (an [`crate::Isa`]'s).
    pub(super) fn of(arch: pulp::Arch) -> Self {
        match arch {
            #[cfg(target_arch = "x86_64")]
            pulp::Arch::V4(v4) => Gather::V4(v4),
            #[cfg(target_arch = "x86_64")]
            pulp::Arch::V3(v3) => Gather::V3(v3),
            _ => Gather::Scalar,
        }
    }

    /// `e[j] = table[clamp(max − row[j], 0, table.len() − 1)]`.
    ///
    /// # Panics
    /// If `table` is empty or longer than 2^31, or `e` and `row` differ in length.
    #[inline(always)]
    pub(super) fn lookup(self, table: &[f64], row: &[i32], max: i32, e: &mut [f64]) {
        assert!(
            !table.is_empty() && table.len() <= 1 << 31 && row.len() == e.len(),
            "log_int_softmax: table of {}, row of {}",
            table.len(),
            row.len()
        );
        let done = match self {
            // SAFETY: the token proves the CPU runs AVX-512 F (x86-64-v4).
            #[cfg(target_arch = "x86_64")]
            Gather::V4(_) => unsafe { lookup_v4(table, row, max, e) },
            // SAFETY: the token proves the CPU runs AVX2 (x86-64-v3).
            #[cfg(target_arch = "x86_64")]
            Gather::V3(_) => unsafe { lookup_v3(table, row, max, e) },
            Gather::Scalar => 0,
        };
        let last = table.len() as i64 - 1;
        for (ej, &x) in e[done..].iter_mut().zip(&row[done..]) {
            *ej = table[(i64::from(max) - i64::from(x)).clamp(0, last) as usize];
        }
    }
}

/// Eight logits per step; returns how many it did (a multiple of 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn lookup_v4(table: &[f64], row: &[i32], max: i32, e: &mut [f64]) -> usize {
    use std::arch::x86_64::*;
    let whole = row.len() / 8 * 8;
    let (zero, last) = (_mm512_setzero_si512(), _mm512_set1_epi64(table.len() as i64 - 1));
    let max = _mm512_set1_epi64(i64::from(max));
    for j in (0..whole).step_by(8) {
        // SAFETY: j + 8 ≤ row.len() = e.len() (asserted by the caller), and each gathered
        // index is clamped to the table.
        unsafe {
            let x = _mm512_cvtepi32_epi64(_mm256_loadu_si256(row.as_ptr().add(j).cast()));
            // In i64, so that no difference of two i32 overflows.
            let d = _mm512_min_epi64(_mm512_max_epi64(_mm512_sub_epi64(max, x), zero), last);
            let v = _mm512_i64gather_pd::<8>(d, table.as_ptr());
            _mm512_storeu_pd(e.as_mut_ptr().add(j), v);
        }
    }
    whole
}

/// Four logits per step; returns how many it did (a multiple of 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn lookup_v3(table: &[f64], row: &[i32], max: i32, e: &mut [f64]) -> usize {
    use std::arch::x86_64::*;
    let whole = row.len() / 4 * 4;
    let (zero, last) = (_mm256_setzero_si256(), _mm256_set1_epi64x(table.len() as i64 - 1));
    let max = _mm256_set1_epi64x(i64::from(max));
    let min = |a: __m256i, b: __m256i| _mm256_blendv_epi8(a, b, _mm256_cmpgt_epi64(a, b));
    for j in (0..whole).step_by(4) {
        // SAFETY: as in `lookup_v4`, four logits at a time.
        unsafe {
            let x = _mm256_cvtepi32_epi64(_mm_loadu_si128(row.as_ptr().add(j).cast()));
            let d = _mm256_sub_epi64(max, x);
            let d = _mm256_andnot_si256(_mm256_cmpgt_epi64(zero, d), d);
            let v = _mm256_i64gather_pd::<8>(table.as_ptr(), min(d, last));
            _mm256_storeu_pd(e.as_mut_ptr().add(j), v);
        }
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Isa;

    /// Every form this CPU runs reads the scalar lookup's entries: rows of every length across
    /// the vector widths, distances inside the table, past its end and negative (a row whose
    /// maximum is not its largest value), and the i32 extremes.
    #[test]
    fn every_form_reads_the_scalar_entries() {
        let table: Vec<f64> = (0..300).map(|i| f64::from(i * 7 + 1)).collect();
        let mut next = fqvit_testkit::lcg(11);
        for len in 0..40 {
            let mut row: Vec<i32> = (0..len).map(|_| (next() >> 40) as i32 % 700 - 350).collect();
            if len > 3 {
                row[1] = i32::MIN;
                row[2] = i32::MAX;
            }
            for max in [0, 100, i32::MAX, i32::MIN] {
                let mut want = vec![0.0; len];
                Gather::Scalar.lookup(&table, &row, max, &mut want);
                for isa in Isa::ALL.into_iter().filter(|isa| isa.available()) {
                    let mut got = vec![-1.0; len];
                    Gather::of(isa.arch()).lookup(&table, &row, max, &mut got);
                    assert_eq!(got, want, "{isa} len {len} max {max}");
                }
            }
        }
    }
}
