//! Swin's window geometry, shared by the simulation (`fqvit-models`) and the integer engine:
//! a `res × res` token grid, rolled by `−shift` on both axes, cut into `w × w` windows ordered
//! row-major, tokens row-major inside a window (spec §8.2).

/// For each windowed position `(window, token)`, in that order, the index of the grid token it
/// holds: the roll by `−shift` reads `((r + shift) mod res, (c + shift) mod res)`. Window
/// reverse and the roll back put each result on the same index.
pub fn tokens(res: usize, window: usize, shift: usize) -> Vec<usize> {
    let per_side = res / window;
    let mut out = Vec::with_capacity(res * res);
    for wr in 0..per_side {
        for wc in 0..per_side {
            for t in 0..window * window {
                let r = (wr * window + t / window + shift) % res;
                let c = (wc * window + t % window + shift) % res;
                out.push(r * res + c);
            }
        }
    }
    out
}

/// The relative position bias's table row of each token pair `(i, j)` of a window, row-major:
/// `(r_i − r_j + w − 1)·(2w − 1) + (c_i − c_j + w − 1)` for tokens `t = w·r + c`.
pub fn relative_position_index(window: usize) -> Vec<usize> {
    let n = window * window;
    (0..n * n)
        .map(|ij| {
            let (i, j) = (ij / n, ij % n);
            let (ri, ci, rj, cj) = (i / window, i % window, j / window, j % window);
            (ri + window - 1 - rj) * (2 * window - 1) + (ci + window - 1 - cj)
        })
        .collect()
}

/// The shift mask's region label of each windowed position `(window, token)` of the rolled
/// grid: rows and columns split at `res − window` and `res − shift` give 9 regions labelled
/// `3·row_region + col_region`. Token pairs of one window with different labels are masked.
pub fn regions(res: usize, window: usize, shift: usize) -> Vec<u8> {
    let region = |v: usize| {
        if v + window < res {
            0
        } else if v + shift < res {
            1
        } else {
            2
        }
    };
    let per_side = res / window;
    let mut labels = Vec::with_capacity(res * res);
    for wr in 0..per_side {
        for wc in 0..per_side {
            for t in 0..window * window {
                let (r, c) = (wr * window + t / window, wc * window + t % window);
                labels.push(3 * region(r) + region(c));
            }
        }
    }
    labels
}

/// What the shift mask adds to the scores of a masked token pair (timm, the original).
pub const MASK: f32 = -100.0;

/// The masked token pairs of each window, `(windows, n, n)` row-major with `n = window²`: the
/// pairs whose [`regions`] differ.
pub fn masked(res: usize, window: usize, shift: usize) -> Vec<bool> {
    let n = window * window;
    regions(res, window, shift)
        .chunks(n)
        .flat_map(|l| l.iter().flat_map(move |&li| l.iter().map(move |&lj| li != lj)))
        .collect()
}

/// Rows of `c` values in windowed order (one image, [`tokens`] order) back in grid order.
pub fn scatter<T: Copy + Default>(windowed: &[T], tokens: &[usize], c: usize) -> Vec<T> {
    let mut out = vec![T::default(); windowed.len()];
    for (row, &t) in windowed.chunks_exact(c).zip(tokens) {
        out[t * c..][..c].copy_from_slice(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_a_permutation_and_unshifted_windows_tile_the_grid() {
        for (res, window, shift) in [(8, 4, 2), (16, 4, 2), (56, 7, 3), (7, 7, 0)] {
            let mut t = tokens(res, window, shift);
            t.sort_unstable();
            assert!(t.iter().copied().eq(0..res * res), "{res} {window} {shift}");
        }
        // Unshifted 4×4 grid in 2×2 windows: window 1 is the top-right quarter.
        assert_eq!(&tokens(4, 2, 0)[4..8], &[2, 3, 6, 7]);
        // Shifted by 1: window 0 starts at (1, 1).
        assert_eq!(&tokens(4, 2, 1)[..4], &[5, 6, 9, 10]);
    }

    #[test]
    fn the_index_and_regions_follow_the_spec() {
        let idx = relative_position_index(7);
        assert_eq!(idx.len(), 49 * 49);
        assert_eq!(idx[0], 6 * 13 + 6); // a token with itself: the table's centre
        assert_eq!(*idx.iter().max().unwrap(), 168);
        // 56 × 56 in 7 × 7 windows shifted by 3: the last window holds 4 regions.
        let r = regions(56, 7, 3);
        let last: std::collections::BTreeSet<u8> = r[63 * 49..].iter().copied().collect();
        assert_eq!(last.into_iter().collect::<Vec<_>>(), vec![4, 5, 7, 8]);
        assert!(r[..49].iter().all(|&l| l == 0));
        let m = masked(56, 7, 3);
        assert_eq!(m.len(), 64 * 49 * 49);
        assert!(m[..49 * 49].iter().all(|&x| !x), "window 0 lies in one region");
        assert!((0..49).all(|i| !m[63 * 49 * 49 + i * 49 + i]), "a token with itself");
    }

    #[test]
    fn scatter_undoes_the_gather() {
        let (res, window, shift, c) = (8, 4, 2, 3);
        let t = tokens(res, window, shift);
        let grid: Vec<usize> = (0..res * res * c).collect();
        let windowed: Vec<usize> = t.iter().flat_map(|&i| grid[i * c..][..c].to_vec()).collect();
        assert_eq!(scatter(&windowed, &t, c), grid);
    }
}
