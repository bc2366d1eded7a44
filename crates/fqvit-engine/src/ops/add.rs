//! The residual add: two summands, each with its multiplier onto the sum's grid, compiled and
//! run side by side.

use rayon::prelude::*;

use crate::error::Error;
use crate::error::Result;
use crate::grid::Grid;
use crate::requant::{ADD_SHIFT, add_codes};

/// A residual add: `clamp(round(((a − z_a)·m_a + (b − z_b)·m_b) / 2^ADD_SHIFT) + z_o, 0, hi)`.
#[derive(Debug)]
pub(crate) struct AddConsts {
    za: Vec<i32>,
    zb: Vec<i32>,
    ma: Vec<i64>,
    mb: Vec<i64>,
    zo: Vec<i32>,
    hi: u8,
}

/// A summand's multiplier onto the sum's grid at channel `j`: `s_in/s_out` with
/// [`ADD_SHIFT`] fraction bits; ratios below 2^20 keep `255 · m < 2^58`.
#[allow(clippy::float_arithmetic)] // load time
pub(crate) fn add_multiplier(
    from: &Grid,
    to: &Grid,
    j: usize,
    err: &impl Fn(String) -> Error,
) -> Result<i64> {
    let r = f64::from(from.scale(j)) / f64::from(to.scale(j));
    if r >= 2f64.powi(20) {
        return Err(err(format!("site {} is {r:e} times coarser than {}", from.name, to.name)));
    }
    Ok((r * 2f64.powi(ADD_SHIFT as i32)).round_ties_even() as i64)
}

pub(crate) fn add_consts(
    ga: &Grid,
    gb: &Grid,
    go: &Grid,
    c: usize,
    err: &impl Fn(String) -> Error,
) -> Result<AddConsts> {
    let m = |g: &Grid, j: usize| add_multiplier(g, go, j, err);
    Ok(AddConsts {
        za: (0..c).map(|j| ga.zero_point(j)).collect(),
        zb: (0..c).map(|j| gb.zero_point(j)).collect(),
        ma: (0..c).map(|j| m(ga, j)).collect::<Result<_>>()?,
        mb: (0..c).map(|j| m(gb, j)).collect::<Result<_>>()?,
        zo: (0..c).map(|j| go.zero_point(j)).collect(),
        hi: go.hi(),
    })
}

pub(crate) fn add(c: &AddConsts, a: &[u8], b: &[u8], out: &mut [u8]) {
    let ch = c.zo.len();
    out.par_chunks_mut(ch).zip(a.par_chunks(ch).zip(b.par_chunks(ch))).for_each(|(o, (a, b))| {
        for j in 0..ch {
            let (a, b) =
                (i64::from(a[j]) - i64::from(c.za[j]), i64::from(b[j]) - i64::from(c.zb[j]));
            o[j] = add_codes(a, c.ma[j], b, c.mb[j], c.zo[j], c.hi);
        }
    });
}
