//! Log-Int-Softmax (spec §7; paper §3.4): softmax whose output is a log2 code.
//!
//! Per row of integer logits `x` with scale `S`: `x ← x − max x`; the integer exponential
//! `e = int_exp(x)` (I-BERT's polynomial, n = 30, in u64 because it exceeds i32); `Σ = Σ e`;
//! `u = round(Σ/e)`, the rounded reciprocal of the probability; `k = log_round(u)`; the output
//! code is `k`, and `k ≥ 2^bits` means the probability is exactly 0. Dequantized, a code is
//! `2^-k`, or 0 for the zero flag.
//!
//! Integer bounds: an exponential grid `S ≥ 2^-10` ([`MIN_SCALE`]; `S·2^-K` with an
//! [`ExpShift`] `K`) keeps `I_c = ⌊2.79/S²⌋ < 2^22`, so
//! `e ≤ I_c·2^30 < 2^52`, and rows of at most [`MAX_ROW`] = 2048 keep `Σ < 2^63` (u64).
//!
//! Coarse scales: the grid step `I0·S` is −ln 2 only up to one step, so accuracy falls as S
//! grows, and above S ≈ 1.67 the constant `I_c` is 0, every `e` is 0 and every code is the zero
//! flag (the original returns NaN there). Attention logits have S of a few hundredths.

mod fast;
mod gather;
pub mod reference;

use rayon::prelude::*;

use crate::Isa;
use fast::Rows;
use gather::Gather;
use reference::{COEF, X0};

/// The smallest supported scale (see the module bounds).
pub const MIN_SCALE: f32 = 1.0 / 1024.0;
/// The longest supported row.
pub const MAX_ROW: usize = 2048;

/// The integer constants of one scale, computed in float32 as the original does (a Python
/// float divided by a tensor is `reciprocal(S) · c` in PyTorch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LisConstants {
    /// `I0 = ⌊−0.6931 / S'⌋`, −ln 2 in grid units (negative), `S' = S·2^-shift`.
    pub i0: i64,
    /// `I_b = ⌊(b/a) / S'⌋`.
    pub ib: i64,
    /// `I_c = ⌊(c/a) / S'²⌋`.
    pub ic: i64,
    /// The exponential's grid is `2^shift` times finer than the logits' ([`ExpShift`]): each
    /// logit `x` enters `int_exp` as `x·2^shift`.
    pub shift: u32,
}

impl LisConstants {
    /// The constants for scale `S`, the original's (no [`ExpShift`]).
    ///
    /// # Panics
    /// If `S` is not positive and finite.
    #[track_caller]
    pub fn new(scale: f32) -> Self {
        Self::shifted(scale, ExpShift::NONE)
    }

    /// The constants for logits of scale `S` whose exponential runs on `S·2^-shift`.
    ///
    /// # Panics
    /// If `S·2^-shift` is not positive, finite and normal.
    #[track_caller]
    pub fn shifted(scale: f32, shift: ExpShift) -> Self {
        // Exact while the product is normal, which the assertion checks.
        let scale = scale * (-(shift.get() as f32)).exp2();
        assert!(
            scale.is_normal() && scale > 0.0,
            "log_int_softmax: scale {scale} is not positive, finite and normal"
        );
        let recip = 1.0 / scale;
        let recip_sq = 1.0 / (scale * scale);
        let floor = |v: f32| v.floor() as i64;
        LisConstants {
            i0: floor(recip * X0 as f32),
            ib: floor(recip * (COEF[1] / COEF[0]) as f32),
            ic: floor(recip_sq * (COEF[2] / COEF[0]) as f32),
            shift: shift.get(),
        }
    }

    /// Whether these are the constants of an exponential grid of at least [`MIN_SCALE`], the
    /// integer path's bound (`I_c < 2^22`).
    pub fn fit_integers(&self) -> bool {
        (0..1 << 22).contains(&self.ic)
    }
}

/// How much finer than its logits' scale `S` Log-Int-Softmax's integer exponential runs
/// (`--lis-exp-shift`, TOML `lis-exp-shift`, the artifact's `lis_exp_shift`): the integer
/// logits `x` enter it as `x·2^K` on the scale `S·2^-K`, an exact shift. 0, the original's,
/// puts the exponential on the logits' own grid, whose step `I0·S` stands for `−ln 2` only to
/// within one step and whose constants `I_b`, `I_c` are floors on that grid: coarse logits (6-bit
/// attention scores, `S` 0.25 to 0.72 in ViT-Tiny) get an exponential whose base is off by up
/// to 43 %. One of
/// [`EXP_SHIFTS`], checked here only; the grid must stay at or above [`MIN_SCALE`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u32", into = "u32")]
pub struct ExpShift(u32);

/// The shifts [`ExpShift`] takes.
pub const EXP_SHIFTS: std::ops::RangeInclusive<u32> = 0..=8;

impl ExpShift {
    /// The original's: the exponential on the logits' grid.
    pub const NONE: ExpShift = ExpShift(0);

    /// The shift `K`.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for ExpShift {
    type Error = String;
    fn try_from(k: u32) -> Result<Self, String> {
        if EXP_SHIFTS.contains(&k) {
            Ok(ExpShift(k))
        } else {
            Err(format!("shift {k}: Log-Int-Softmax's exponential takes {EXP_SHIFTS:?}"))
        }
    }
}

impl From<ExpShift> for u32 {
    fn from(k: ExpShift) -> u32 {
        k.0
    }
}

impl std::str::FromStr for ExpShift {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let k: u32 = s.parse().map_err(|_| {
            format!("{s:?} is not a shift: Log-Int-Softmax's exponential takes {EXP_SHIFTS:?}")
        })?;
        ExpShift::try_from(k)
    }
}

impl std::fmt::Display for ExpShift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Log-Int-Softmax's integer exponential for one scale, tabulated: entry `d` is
/// `int_exp(−d)` for `0 ≤ d·2^shift ≤ n·|I0|`, held exactly in f64 (below 2^52); a logit further
/// below its row's maximum is clipped to `n·I0` and takes the last entry. Built once per scale (an
/// integer runtime does it at load), it turns the polynomial per element into one load; at
/// [`MIN_SCALE`] it has 21,301 entries, at the attention scales of a few hundredths a few
/// hundred.
#[derive(Clone, Debug)]
pub struct ExpTable {
    k: LisConstants,
    e: Vec<f64>,
}

impl ExpTable {
    /// The table of the constants `k` of a scale of at least [`MIN_SCALE`].
    ///
    /// # Panics
    /// If `k` is not the constants of such a scale (`I_c ≥ 2^22`).
    #[track_caller]
    pub fn new(k: LisConstants) -> Self {
        check_constants(&k);
        // The first distance whose shifted logit `−d·2^shift` is clipped.
        let last = (u64::from(reference::N) * k.i0.unsigned_abs()).div_ceil(1 << k.shift) as i64;
        // Exact: every entry is an integer below 2^52.
        #[allow(clippy::cast_precision_loss)]
        let e = (0..=last).map(|d| reference::int_exp(-d, &k) as f64).collect();
        ExpTable { k, e }
    }
}

/// Constants of a scale of at least [`MIN_SCALE`] (`I_c < 2^22`), the integer path's bound.
#[track_caller]
fn check_constants(k: &LisConstants) {
    assert!(
        k.fit_integers(),
        "log_int_softmax: I_c = {} is not the constant of a scale of at least 2^-10",
        k.ic
    );
}

/// The integer path's bound (module docs); the float path computes in float32 and has none.
#[track_caller]
fn check_integer_scale(scale: f32) {
    assert!(
        scale >= MIN_SCALE,
        "log_int_softmax: scale {scale} is outside [2^-10, ∞): the integer exponential would overflow u64"
    );
}

/// The log2 code widths Log-Int-Softmax takes.
pub const BITS: std::ops::RangeInclusive<u32> = 2..=8;

/// Log-Int-Softmax's code width (`--attn-bits`, TOML `attn-bits`, the artifact's `lis_bits`,
/// the program's attention ops): one of [`BITS`], checked here only. 4 is the paper's 8/8/4,
/// 8 its 8/8/8 with LIS. The kernels take [`LisBits::get`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct LisBits(u32);

impl LisBits {
    /// The paper's 4-bit log2 codes.
    pub const FOUR: LisBits = LisBits(4);

    /// The width.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for LisBits {
    type Error = String;
    fn try_from(bits: u32) -> Result<Self, String> {
        if BITS.contains(&bits) {
            Ok(LisBits(bits))
        } else {
            Err(format!("{bits} bits: Log-Int-Softmax takes {BITS:?}"))
        }
    }
}

impl From<LisBits> for u32 {
    fn from(b: LisBits) -> u32 {
        b.0
    }
}

impl std::str::FromStr for LisBits {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bits: u32 = s
            .parse()
            .map_err(|_| format!("{s:?} is not a width: Log-Int-Softmax takes {BITS:?}"))?;
        LisBits::try_from(bits)
    }
}

impl std::fmt::Display for LisBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[track_caller]
fn check_row_args(n_in: usize, n_out: usize, row_len: usize, bits: u32) {
    assert!(
        (1..=MAX_ROW).contains(&row_len),
        "log_int_softmax: row length {row_len} is outside 1..={MAX_ROW}"
    );
    assert!(BITS.contains(&bits), "log_int_softmax: {bits} bits, expected {BITS:?}");
    assert_eq!(n_in % row_len, 0, "log_int_softmax: {n_in} logits are not whole rows of {row_len}");
    assert_eq!(n_in, n_out, "log_int_softmax: {n_in} logits but room for {n_out} codes");
}

/// Log-Int-Softmax over rows of integer logits (`q − z`), rows in parallel (the fast path).
///
/// `out` receives log2 codes in `0..=2^bits`, where `2^bits` flags an exact 0. Gives exactly the
/// codes of [`reference::log_int_softmax`].
///
/// # Panics
/// If `row_len` is 0 or above [`MAX_ROW`], `bits` is not in `2..=8`, the scale is below
/// [`MIN_SCALE`] or not finite, or `codes` and `out` are not the same whole number of rows.
///
/// # Examples
/// ```
/// use fqvit_ops::softmax::log_int_softmax;
/// let mut out = [0u16; 4];
/// // A dominant logit takes all the mass: code 0 (probability 1); the others are 10 below it,
/// // e^-10 ≈ 2^-14.4, so code 14. Twenty below would be under 2^-15: the zero flag, 16.
/// log_int_softmax(&[100, 0, 0, 0], 4, 0.1, 4, &mut out);
/// assert_eq!(out, [0, 14, 14, 14]);
/// log_int_softmax(&[200, 0, 0, 0], 4, 0.1, 4, &mut out);
/// assert_eq!(out, [0, 16, 16, 16]);
/// ```
#[track_caller]
pub fn log_int_softmax(codes: &[i32], row_len: usize, scale: f32, bits: u32, out: &mut [u16]) {
    check_integer_scale(scale);
    let table = ExpTable::new(LisConstants::new(scale));
    log_int_softmax_with(Isa::Native, codes, row_len, &table, bits, out);
}

/// [`log_int_softmax`] with the exponential of its scale prepared once ([`ExpTable::new`]), as
/// an integer runtime holds it, the row loops vectorised up to `isa` (the codes do not depend
/// on it).
///
/// # Panics
/// As [`log_int_softmax`].
#[track_caller]
pub fn log_int_softmax_with(
    isa: Isa,
    codes: &[i32],
    row_len: usize,
    k: &ExpTable,
    bits: u32,
    out: &mut [u16],
) {
    check_row_args(codes.len(), out.len(), row_len, bits);
    let task = row_len * fast::ELEMENTS_PER_TASK.div_ceil(row_len);
    // Compiled for `isa`, so the row loops vectorise (see `lis_row`).
    let arch = isa.arch();
    codes.par_chunks(task).zip(out.par_chunks_mut(task)).for_each_init(
        || vec![0f64; row_len],
        |e, (rows, out)| arch.dispatch(Rows { rows, k, gather: Gather::of(arch), bits, e, out }),
    );
}

/// [`log_int_softmax_with`] on the calling thread, for callers that run in parallel already
/// (an integer runtime's attention heads); the same codes.
///
/// # Panics
/// As [`log_int_softmax_with`].
#[track_caller]
pub fn log_int_softmax_local(
    isa: Isa,
    codes: &[i32],
    row_len: usize,
    k: &ExpTable,
    bits: u32,
    out: &mut [u16],
) {
    check_row_args(codes.len(), out.len(), row_len, bits);
    let e = &mut vec![0f64; row_len];
    let arch = isa.arch();
    arch.dispatch(Rows { rows: codes, k, gather: Gather::of(arch), bits, e, out });
}

/// Log-Int-Softmax on float logits with the original's float32 semantics
/// ([`reference::log_int_softmax_f32`]), rows in parallel.
///
/// # Panics
/// As [`log_int_softmax`], except that any positive finite scale is accepted.
#[track_caller]
pub fn log_int_softmax_f32(logits: &[f32], row_len: usize, scale: f32, bits: u32, out: &mut [u16]) {
    let k = LisConstants::new(scale);
    check_row_args(logits.len(), out.len(), row_len, bits);
    logits
        .par_chunks_exact(row_len)
        .zip(out.par_chunks_exact_mut(row_len))
        .with_min_len(16)
        .for_each_init(
            || vec![0f32; row_len],
            |e, (row, out)| reference::row_f32(row, scale, &k, bits, e, out),
        );
}

/// The dequantized view of log2 codes: `2^-k`, or 0 for the zero flag `2^bits`.
///
/// # Panics
/// If the lengths differ.
#[track_caller]
pub fn dequantize_log2(codes: &[u16], bits: u32, out: &mut [f32]) {
    assert_eq!(
        codes.len(),
        out.len(),
        "dequantize_log2: {} codes but room for {}",
        codes.len(),
        out.len()
    );
    let zero = 1u16 << bits;
    for (o, &k) in out.iter_mut().zip(codes) {
        *o = if k >= zero { 0.0 } else { (-f32::from(k)).exp2() };
    }
}
