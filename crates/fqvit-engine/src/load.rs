//! Load-time helpers shared by the ops' compilation: scale checks, dyadic multipliers and the
//! PTF input scale of a site. Float arithmetic here prepares constants; nothing here runs per
//! image.

#![allow(clippy::float_arithmetic)]

use fqvit_ops::layer_norm::InScale;

use crate::error::{Error, Result};
use crate::grid::Grid;
use crate::requant::Dyadic;

pub(crate) fn wrap(e: Error, err: &impl Fn(String) -> Error) -> Error {
    match e {
        Error::Op { reason, .. } => err(reason),
        other => other,
    }
}

/// Refuses a channel-wise `what` site where an op needs one scale.
pub(crate) fn check_layer_wise(g: &Grid, what: &str, err: &impl Fn(String) -> Error) -> Result<()> {
    if g.layer_wise() {
        Ok(())
    } else {
        Err(err(format!("{what} site {} is channel-wise; the engine needs one scale", g.name)))
    }
}

/// A dyadic multiplier for [`Dyadic::apply_small`]: shifts above 62 would round every value
/// below 2^31 to 0 or ±1 anyway, and are refused.
pub(crate) fn small(d: Dyadic, err: &impl Fn(String) -> Error) -> Result<Dyadic> {
    if d.shift <= 62 {
        Ok(d)
    } else {
        Err(err(format!("scale ratio 2^-{} is too small to requantize in i64", d.shift)))
    }
}

pub(crate) fn dyadic(r: f64, err: &impl Fn(String) -> Error) -> Result<Dyadic> {
    Dyadic::new(r).ok_or_else(|| err(format!("scale ratio {r:e} has no 31-bit dyadic form")))
}

/// A site's input scale for the integer LayerNorm and PTF dense inputs: `fqvit-ops`' own
/// [`InScale`], borrowing the grid's factors.
pub(crate) fn ln_scale(g: &Grid, c: usize) -> Result<InScale<'_>, String> {
    InScale::of(&g.scale, g.ptf.as_deref(), c).map_err(|e| format!("input site {}: {e}", g.name))
}
