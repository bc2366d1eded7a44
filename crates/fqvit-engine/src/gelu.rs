//! GELU in integers: the fc1 accumulator is requantized to a fine fixed-point grid `t · δ`
//! (`δ = s_h / 2^16`, `s_h` the hidden site's scale), and the output code is found by comparing
//! `t` with precomputed thresholds, one per code on each branch of GELU (it falls on
//! `(−∞, y_min]` and rises on `[y_min, ∞)`, `y_min ≈ −0.7518`). The thresholds are computed once
//! from the exact erf GELU in f64, so inference compares integers only; the codes equal
//! `clamp(round(gelu(t·δ)/s_h) + z_h)` for every `t`, by construction of the search below.

/// Fixed-point sub-steps per hidden-code step.
pub(crate) const FRACTION_BITS: u32 = 16;

/// The argmin of GELU, in real units.
const Y_MIN: f64 = -0.751_791_524_693_564_5;

fn gelu(y: f64) -> f64 {
    0.5 * y * (1.0 + libm::erf(y / std::f64::consts::SQRT_2))
}

/// The thresholds of one hidden site.
#[derive(Clone, Debug)]
pub(crate) struct GeluTable {
    /// `t` below which the falling branch is used.
    t_min: i64,
    /// Rising branch: `(first t, code)` pairs, ascending; the code at `t` is that of the last
    /// pair whose first `t` is `≤ t`.
    rising: Vec<(i64, u8)>,
    /// Falling branch: `(last t, code)` pairs, descending in `t`; the code at `t < t_min` is that
    /// of the last pair whose `t` is `≥ t`.
    falling: Vec<(i64, u8)>,
}

impl GeluTable {
    /// The table for a hidden site with scale `s_h` and zero point `z_h`.
    pub(crate) fn new(s_h: f32, z_h: i32) -> Self {
        let (s, z) = (f64::from(s_h), f64::from(z_h));
        let delta = s / f64::from(1u32 << FRACTION_BITS);
        let code = |t: i64| -> u8 {
            ((gelu(t as f64 * delta) / s).round_ties_even() + z).clamp(0.0, 255.0) as u8
        };
        let t_min = (Y_MIN / delta).round() as i64;
        // Beyond ±t_far every code is saturated (255 above, z_h below: |gelu(−40)| ≈ 0).
        let t_far = (((255.0 - z + 1.0) * s).max(40.0) / delta).ceil() as i64;
        // First t ≥ lo with code(t) ≥ q (code is non-decreasing on [t_min, ∞)).
        let first_at_least = |q: u8, mut lo: i64, mut hi: i64| {
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if code(mid) >= q { hi = mid } else { lo = mid + 1 }
            }
            lo
        };
        let mut rising = vec![(t_min, code(t_min))];
        for q in code(t_min) + 1..=code(t_far) {
            rising.push((first_at_least(q, t_min, t_far), q));
        }
        let far_left = code(-t_far);
        let mut falling = vec![(t_min - 1, code(t_min - 1))];
        // Left of t_min GELU rises towards 0 as t falls, so codes grow leftwards: record the
        // largest t at which each larger code holds.
        for q in code(t_min - 1) + 1..=far_left {
            let (mut lo, mut hi) = (-t_far, t_min - 1);
            while lo < hi {
                let mid = lo + (hi - lo + 1) / 2;
                if code(mid) >= q { lo = mid } else { hi = mid - 1 }
            }
            falling.push((lo, q));
        }
        GeluTable { t_min, rising, falling }
    }

    /// The code of fixed-point input `t` (real input `t · s_h / 2^16`).
    #[inline]
    pub(crate) fn code(&self, t: i64) -> u8 {
        if t >= self.t_min {
            let i = self.rising.partition_point(|&(first, _)| first <= t);
            self.rising[i - 1].1
        } else {
            let i = self.falling.partition_point(|&(last, _)| last >= t);
            self.falling[i.max(1) - 1].1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_equal_the_real_gelu_everywhere() {
        for (s, z) in [(0.031f32, 10), (0.012, 14), (0.2, 1), (0.05, 0)] {
            let table = GeluTable::new(s, z);
            let delta = f64::from(s) / 65536.0;
            let step = 37;
            for t in (-(60.0 / delta) as i64..(20.0 / delta) as i64).step_by(step) {
                let y = t as f64 * delta;
                let want = ((gelu(y) / f64::from(s)).round_ties_even() + f64::from(z))
                    .clamp(0.0, 255.0) as u8;
                assert_eq!(table.code(t), want, "s {s} z {z} t {t} y {y}");
            }
        }
    }
}
