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

/// Rows in tasks of about 16 K codes, each compiled for `arch`.
pub(crate) fn add(arch: pulp::Arch, c: &AddConsts, a: &[u8], b: &[u8], out: &mut [u8]) {
    let ch = c.zo.len();
    let task = ch * (16384 / ch.max(1)).max(1);
    out.par_chunks_mut(task).zip(a.par_chunks(task).zip(b.par_chunks(task))).for_each(
        |(o, (a, b))| {
            arch.dispatch(|| {
                let rows = o.chunks_exact_mut(ch).zip(a.chunks_exact(ch).zip(b.chunks_exact(ch)));
                for (o, (a, b)) in rows {
                    let zs = c.za.iter().zip(&c.zb).zip(&c.zo);
                    let ms = c.ma.iter().zip(&c.mb);
                    for (((o, (&a, &b)), ((&za, &zb), &zo)), (&ma, &mb)) in
                        o.iter_mut().zip(a.iter().zip(b)).zip(zs).zip(ms)
                    {
                        let (a, b) = (i64::from(a) - i64::from(za), i64::from(b) - i64::from(zb));
                        *o = add_codes(a, ma, b, mb, zo, c.hi);
                    }
                }
            })
        },
    );
}
