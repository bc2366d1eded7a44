//! Values between ops at run time: byte codes, the residual stream's wider codes (u16), and
//! the logits; the moves and sums that take either width.

use fqvit_ops::Code;
use rayon::prelude::*;

use super::add::{AddConsts, add};
use crate::error::{Error, Result};

/// A value at run time.
pub(super) enum Val {
    Codes(Vec<u8>),
    /// The residual stream's codes wider than a byte.
    Wide(Vec<u16>),
    Logits(Vec<f32>),
}

pub(super) fn codes(v: &Option<Val>) -> &[u8] {
    match v {
        Some(Val::Codes(c)) => c,
        _ => unreachable!("the program was checked: inputs are earlier byte code values"),
    }
}

/// Shows op `i`'s codes on `site` to the observer and takes its replacement, if any.
pub(super) fn observe(
    obs: &mut dyn crate::Observer,
    i: usize,
    site: &str,
    val: Val,
) -> Result<Val> {
    let shown: Vec<u16> = match &val {
        Val::Codes(c) => c.iter().map(|&q| u16::from(q)).collect(),
        Val::Wide(c) => c.clone(),
        Val::Logits(_) => return Ok(val),
    };
    let Some(r) = obs.codes(i, site, &shown) else { return Ok(val) };
    let bad = |what: String| {
        Error::Input(format!("the observer replaced the codes of op {i} ({site}) with {what}"))
    };
    if r.len() != shown.len() {
        return Err(bad(format!("{} codes instead of {}", r.len(), shown.len())));
    }
    match val {
        Val::Codes(_) => r
            .iter()
            .map(|&q| u8::try_from(q).map_err(|_| bad(format!("code {q}, beyond a byte"))))
            .collect::<Result<_>>()
            .map(Val::Codes),
        _ => Ok(Val::Wide(r)),
    }
}

/// Codes of either width.
#[derive(Clone, Copy)]
pub(super) enum Stream<'a> {
    Bytes(&'a [u8]),
    Wide(&'a [u16]),
}

pub(super) fn stream(v: &Option<Val>) -> Stream<'_> {
    match v {
        Some(Val::Codes(c)) => Stream::Bytes(c),
        Some(Val::Wide(c)) => Stream::Wide(c),
        _ => unreachable!("the program was checked: inputs are earlier code values"),
    }
}

impl Stream<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Stream::Bytes(c) => c.len(),
            Stream::Wide(c) => c.len(),
        }
    }
}

/// Code storage that can be a value.
trait Stored: Code {
    fn val(codes: Vec<Self>) -> Val;
}

impl Stored for u8 {
    fn val(codes: Vec<u8>) -> Val {
        Val::Codes(codes)
    }
}

impl Stored for u16 {
    fn val(codes: Vec<u16>) -> Val {
        Val::Wide(codes)
    }
}

/// A residual sum into bytes or wide codes, as its constants say.
pub(super) fn add_into<A: Code, B: Code>(
    arch: pulp::Arch,
    consts: &AddConsts,
    a: &[A],
    b: &[B],
) -> Val {
    if consts.wide() {
        let mut out = vec![0u16; a.len()];
        add(arch, consts, a, b, &mut out);
        Val::Wide(out)
    } else {
        let mut out = vec![0u8; a.len()];
        add(arch, consts, a, b, &mut out);
        Val::Codes(out)
    }
}

/// `rows` rows of `cols` codes copied from `x`: `pick(r)` is the source row of row `r`.
fn gather<C: Stored>(
    x: &[C],
    cols: usize,
    rows: usize,
    pick: impl Fn(usize) -> usize + Sync,
) -> Val {
    let mut out = vec![C::default(); rows * cols];
    out.par_chunks_mut(cols).enumerate().for_each(|(r, o)| {
        o.copy_from_slice(&x[pick(r) * cols..][..cols]);
    });
    C::val(out)
}

/// [`gather`] on codes of either width.
pub(super) fn gather_stream(
    x: Stream<'_>,
    cols: usize,
    rows: usize,
    pick: impl Fn(usize) -> usize + Sync,
) -> Val {
    match x {
        Stream::Bytes(x) => gather(x, cols, rows, pick),
        Stream::Wide(x) => gather(x, cols, rows, pick),
    }
}
