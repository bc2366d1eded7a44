//! The residual add: two summands, each with its multiplier onto the sum's grid, compiled and
//! run side by side.

use rayon::prelude::*;

use crate::error::Error;
use crate::error::Result;
use crate::grid::Grid;
use crate::requant::{ADD_SHIFT, add_codes};
use fqvit_ops::Code;

/// A residual add: `clamp(round(((a − z_a)·m_a + (b − z_b)·m_b) / 2^ADD_SHIFT) + z_o, 0, hi)`.
#[derive(Debug)]
pub(crate) struct AddConsts {
    za: Vec<i32>,
    zb: Vec<i32>,
    ma: Vec<i64>,
    mb: Vec<i64>,
    zo: Vec<i32>,
    /// The sum's largest code (a byte, or up to 15 bits on the residual stream).
    hi: u16,
}

impl AddConsts {
    /// Whether the sum's codes are wider than a byte.
    pub(crate) fn wide(&self) -> bool {
        self.hi > u16::from(u8::MAX)
    }
}

/// A summand's multiplier onto the sum's grid at channel `j`: `s_in/s_out` with
/// [`ADD_SHIFT`] fraction bits; ratios below 2^20 keep `255 · m < 2^58` (for wider codes
/// [`add_consts`] checks the sum's bound).
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
    let consts = AddConsts {
        za: (0..c).map(|j| ga.zero_point(j)).collect(),
        zb: (0..c).map(|j| gb.zero_point(j)).collect(),
        ma: (0..c).map(|j| m(ga, j)).collect::<Result<_>>()?,
        mb: (0..c).map(|j| m(gb, j)).collect::<Result<_>>()?,
        zo: (0..c).map(|j| go.zero_point(j)).collect(),
        hi: go.hi_wide(),
    };
    // `add_codes` needs |a·m_a + b·m_b| < 2^61, with |a| and |b| at most their largest codes.
    let (ha, hb) = (i128::from(ga.hi_wide()), i128::from(gb.hi_wide()));
    for j in 0..c {
        let v = ha * i128::from(consts.ma[j]) + hb * i128::from(consts.mb[j]);
        if v >= 1 << 61 {
            return Err(err(format!(
                "channel {j}: sites {} and {} are too coarse for {} (their sum reaches 2^{})",
                ga.name,
                gb.name,
                go.name,
                128 - v.leading_zeros() - 1 - ADD_SHIFT
            )));
        }
    }
    Ok(consts)
}

/// Rows in tasks of about 16 K codes, each compiled for `arch`; summands and sum are bytes or
/// the residual stream's wider codes.
pub(crate) fn add<A: Code, B: Code, O: Code>(
    arch: pulp::Arch,
    c: &AddConsts,
    a: &[A],
    b: &[B],
    out: &mut [O],
) {
    debug_assert!(O::BITS.get() >= 16 - c.hi.leading_zeros() as u8, "the sum fits its storage");
    let ch = c.zo.len();
    let task = ch * (16384 / ch.max(1)).max(1);
    out.par_chunks_mut(task)
        .zip(a.par_chunks(task).zip(b.par_chunks(task)))
        .for_each(|(out, (a, b))| arch.dispatch(Rows { c, a, b, out }));
}

/// A task's rows for [`pulp::Arch::dispatch`], whose `with_simd` is inlined into code compiled
/// for the detected instruction set (a closure's body need not be).
struct Rows<'a, A, B, O> {
    c: &'a AddConsts,
    a: &'a [A],
    b: &'a [B],
    out: &'a mut [O],
}

impl<A: Code, B: Code, O: Code> pulp::WithSimd for Rows<'_, A, B, O> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Rows { c, a, b, out } = self;
        let (ch, hi) = (c.zo.len(), i64::from(c.hi));
        let rows = out.chunks_exact_mut(ch).zip(a.chunks_exact(ch).zip(b.chunks_exact(ch)));
        for (o, (a, b)) in rows {
            let zs = c.za.iter().zip(&c.zb).zip(&c.zo);
            let ms = c.ma.iter().zip(&c.mb);
            for (((o, (&a, &b)), ((&za, &zb), &zo)), (&ma, &mb)) in
                o.iter_mut().zip(a.iter().zip(b)).zip(zs).zip(ms)
            {
                let a = i64::from(a.int()) - i64::from(za);
                let b = i64::from(b.int()) - i64::from(zb);
                *o = O::from_code(add_codes(a, ma, b, mb, zo, hi));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fqvit_ops::{BitType, Bits};

    fn grid(name: &str, scale: f32, bits: u8) -> Grid {
        let bits = Bits::try_from(bits).unwrap();
        Grid {
            name: name.into(),
            scale: vec![scale],
            zero_point: vec![0],
            ptf: None,
            bit_type: BitType { bits, signed: false },
        }
    }

    /// Wide summands may not take the sum past 2^61 (`add_codes`' bound); bytes cannot.
    #[test]
    fn sums_beyond_the_bound_are_refused_by_name() {
        let err = |s: String| Error::Input(s);
        let out = grid("sum", 1.0, 15);
        // 2^19 · 2^30 · (2^15 − 1) · 2 ≈ 2^65.
        let coarse =
            add_consts(&grid("a", 2f32.powi(19), 15), &grid("b", 2f32.powi(19), 15), &out, 1, &err);
        let msg = coarse.unwrap_err().to_string();
        assert!(msg.contains("channel 0: sites a and b are too coarse for sum"), "{msg}");
        // The same ratio on bytes stays below 2^59, and 2^15 on wide codes below 2^61.
        assert!(
            add_consts(&grid("a", 2f32.powi(19), 8), &grid("b", 2f32.powi(19), 8), &out, 1, &err)
                .is_ok()
        );
        let fine =
            add_consts(&grid("a", 2f32.powi(15), 15), &grid("b", 1.0, 8), &out, 1, &err).unwrap();
        assert!(fine.wide());
    }
}
