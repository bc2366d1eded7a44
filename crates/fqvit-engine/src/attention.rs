//! `attn · V` with Log-Int-Softmax codes: `Σ_j 2^(K − k_ij) · (v_j − z)` for every query `i` and
//! channel `e`, with `K` the probabilities' fixed-point bits (`2^-k` is `2^(K − k)` steps of
//! `2^-K`) and codes `k > K` dropped.
//!
//! The reference adds shifted values. The fast path splits each weight `2^e` (`e = K − k`) into
//! byte planes: plane `b = ⌊e/8⌋` holds `2^(e mod 8) ∈ [1, 128]` and the other planes 0, so that
//! `Σ_j 2^e_ij (v_j − z) = Σ_b 2^(8b) Σ_j P_b[i][j] (v_j − 128) + (128 − z) Σ_j 2^e_ij`, and
//! each plane is a u8 × i8 GEMM of the int8 kernel (a row of ones beside `v` gives the planes'
//! row sums, whose `2^(8b)`-weighted total is `Σ_j 2^e_ij`). The upper planes (`e ≥ 8`,
//! probabilities of at least `2^(8−K)`) are mostly empty with 4-bit codes, as probabilities sum
//! to about 1; when fewer than one entry in 16 lies there, they are added as shifts instead.
//! Bounds: a plane's sum is at most
//! `N · 128 · 128 < 2^31` for `N < 2^17`; the total is at most `N · 2^K · 255 < 2^63` for
//! `K ≤ 30` and `N < 2^24`. Both compute the same integers.

use crate::gemm::{Kernel, Weights, gemm};

/// The reference: `out[i·hd + e] = Σ_j (v[j·hd + e] − z) << (k_max − k[i·n + j])`.
pub fn attn_v_reference(k: &[u16], v: &[u8], z: i32, hd: usize, k_max: u32) -> Vec<i64> {
    let n = v.len() / hd.max(1);
    let mut out = vec![0i64; n * hd];
    for (i, o) in out.chunks_exact_mut(hd.max(1)).enumerate() {
        for (j, &kc) in k[i * n..][..n].iter().enumerate() {
            let kc = u32::from(kc);
            if kc > k_max {
                continue;
            }
            for (o, &x) in o.iter_mut().zip(&v[j * hd..][..hd]) {
                *o += (i64::from(x) - i64::from(z)) << (k_max - kc);
            }
        }
    }
    out
}

/// The fast path: the byte planes through the int8 GEMM. Same arguments and result as
/// [`attn_v_reference`], and the kernel.
pub fn attn_v(kernel: &Kernel, k: &[u16], v: &[u8], z: i32, hd: usize, k_max: u32) -> Vec<i64> {
    assert!(k_max <= 30, "attn·v: {k_max} fixed-point bits");
    let n = v.len() / hd.max(1);
    assert_eq!(k.len(), n * n, "attn·v: {} probabilities for {n} tokens", k.len());
    if n == 0 || hd == 0 {
        return vec![0; n * hd];
    }
    let planes = k_max as usize / 8 + 1;
    // e = k_max − k ≥ 8: the entries of the planes above the first.
    let upper = |kc: u16| u32::from(kc) + 8 <= k_max;
    let sparse = planes > 1 && k.iter().filter(|&&kc| upper(kc)).count() * 16 <= n * n;
    let planes = if sparse { 1 } else { planes };
    // Plane b of row i holds 2^(e − 8b) where e lies in [8b, 8b + 8), else 0: one branch-free
    // pass per plane.
    let mut p = vec![0u8; planes * n * n];
    for (b, plane) in p.chunks_exact_mut(n * n).enumerate() {
        let low = 8 * b as u32;
        for (p, &kc) in plane.iter_mut().zip(k) {
            let e = k_max.wrapping_sub(u32::from(kc)).wrapping_sub(low);
            *p = if e < 8 { 1 << e } else { 0 };
        }
    }
    // (v − 128) as int8 "weights" `(hd + 1, n)`: channel e's row holds token j's value; the last
    // row is ones, so that the GEMM also gives each plane's row sums Σ_j P_b[i][j].
    let mut w = vec![1i8; (hd + 1) * n];
    for (j, row) in v.chunks_exact(hd).enumerate() {
        for (e, &x) in row.iter().enumerate() {
            w[e * n + j] = (i32::from(x) - 128) as i8;
        }
    }
    let mut g = vec![0i32; planes * n * (hd + 1)];
    gemm(kernel, &p, &Weights::new(kernel, w, hd + 1, n), &mut g);
    let zero_point = 128 - i64::from(z);
    let mut out = vec![0i64; n * hd];
    for (b, plane) in g.chunks_exact(n * (hd + 1)).enumerate() {
        for (o, g) in out.chunks_exact_mut(hd).zip(plane.chunks_exact(hd + 1)) {
            let row = zero_point * i64::from(g[hd]);
            for (o, &x) in o.iter_mut().zip(g) {
                *o += (i64::from(x) + row) << (8 * b);
            }
        }
    }
    if sparse {
        let z = i64::from(z);
        for (o, k) in out.chunks_exact_mut(hd).zip(k.chunks_exact(n)) {
            for (row, &kc) in v.chunks_exact(hd).zip(k).filter(|&(_, &kc)| upper(kc)) {
                let e = k_max - u32::from(kc);
                for (o, &x) in o.iter_mut().zip(row) {
                    *o += (i64::from(x) - z) << e;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn planes_equal_the_shifts(
            n in 0usize..40, hd in 1usize..20, k_max in prop_oneof![Just(15u32), Just(30), 0u32..31],
            z in 0i32..256, rare in 1u32..64, seed in any::<u64>(),
        ) {
            let mut s = seed;
            let mut next = || {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 33) as u32
            };
            // Codes up to k_max + 2, so that dropped ones occur; one in `rare` drawn from the
            // whole range, the others within 7 of k_max (so the upper planes go sparse).
            let k: Vec<u16> = (0..n * n)
                .map(|_| {
                    let kc = if next() % rare == 0 { next() % (k_max + 3) } else {
                        (k_max + 2).saturating_sub(next() % 10)
                    };
                    kc as u16
                })
                .collect();
            let v: Vec<u8> = (0..n * hd).map(|_| next() as u8).collect();
            let fast = attn_v(&Kernel::detect(), &k, &v, z, hd, k_max);
            prop_assert_eq!(fast, attn_v_reference(&k, &v, z, hd, k_max));
        }
    }

    #[test]
    fn extremes_hold() {
        // Every weight the largest, every value the farthest from the zero point.
        let (n, hd) = (300, 8);
        for (v, z) in [(255u8, 0), (0, 255)] {
            let out = attn_v(&Kernel::detect(), &vec![0; n * n], &vec![v; n * hd], z, hd, 30);
            let want = ((i64::from(v) - i64::from(z)) * (n as i64)) << 30;
            assert!(out.iter().all(|&x| x == want));
        }
    }
}
