//! A convolution or linear layer in integers: the u8 × i8 GEMM and its epilogue (requantization,
//! or GELU by thresholds), compiled from the artifact and run side by side.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::gelu::{Buckets, ColumnTables, FRACTION_BITS, GeluTable, Lanes};
use crate::gemm::{Kernel, KernelKind, Scratch, Weights, for_each_rows};
use crate::grid::Grid;
use crate::load::{dyadic, ln_scale};
use crate::requant::{Columns, MAX_COLUMN_SHIFT};
use crate::timings::Timings;
use fqvit_artifact::Artifact;
use fqvit_ops::Code;
use fqvit_ops::layer_norm::InScale;

/// The input side of a dense layer: real input = `scale · (code − zp_num / den)`, with the
/// accumulator kept as `den · Σ code·w − zp_num · Σ w` so that a half-integer zero point (ViT's
/// 0.5/0.5 normalization: zero point 127.5) stays integer.
///
/// A PTF input (GELU's output under `ptf-sites = ["mlp-hidden"]`) has per channel `k` the
/// scale `scale · 2^shift_k`: its codes enter the GEMM shifted, `code · 2^shift_k`, as two byte
/// planes ([`Dense::run`]).
#[derive(Clone, Debug)]
pub(crate) struct InGrid {
    pub(crate) scale: f64,
    pub(crate) zp_num: i64,
    pub(crate) den: i64,
    pub(crate) shifts: Option<Vec<u8>>,
}

impl InGrid {
    /// The grid of a code value: layer-wise, or PTF with one zero point (`k` channels).
    #[allow(clippy::float_arithmetic)] // load time
    pub(crate) fn of(g: &Grid, k: usize) -> Result<InGrid, String> {
        let shifts = match ln_scale(g, k)? {
            InScale::Layer(_) => None,
            InScale::Ptf { factors, .. } => {
                let min = factors.iter().map(|f| f.get()).min().unwrap_or(0);
                Some(factors.iter().map(|f| f.get() - min).collect::<Vec<u8>>())
            }
        };
        if g.zero_point.len() != 1 {
            return Err(format!("input site {} has one zero point per channel", g.name));
        }
        let scale = match &shifts {
            None => f64::from(g.scale[0]),
            Some(shifts) => {
                let j = shifts.iter().position(|&s| s == 0).expect("the smallest factor");
                f64::from(g.scale[j])
            }
        };
        Ok(InGrid { scale, zp_num: i64::from(g.zero_point[0]), den: 1, shifts })
    }
}

/// What a dense layer does with its requantized accumulator `t`.
#[derive(Debug)]
enum Epilogue {
    /// `t` is on the out-site's grid: `clamp(t + z_o, 0, hi)` (bytes, or the residual
    /// stream's wider codes).
    Requant { zero_point: Vec<i32>, hi: u16 },
    /// `t` is on GELU's fixed-point grid: its thresholds give the code. Onto a PTF site,
    /// column `j`'s `t` is on the grid of its own scale, with its own thresholds (one table per
    /// distinct factor), looked up in the widest vector lanes the kernel's ISA runs.
    Gelu { tables: ColumnTables, lanes: Lanes },
}

impl Epilogue {
    /// Where its time is counted in [`Timings`].
    fn kind(&self) -> &'static str {
        match self {
            Epilogue::Gelu { .. } => "gelu",
            Epilogue::Requant { .. } => "requant",
        }
    }
}

/// A convolution or linear layer in integers: per output column `j`,
/// `t = round_half_even((den·acc·m_j + c_j) / 2^shift_j)`, with `m_j · 2^-shift_j` the dyadic
/// form of `s_in·s_w/s_t` and `c_j = (b_j/(s_in·s_w) − zp_num·Σw_j)·m_j` rounded: the bias and
/// the input zero point's correction in one constant, the bias kept to `2^-shift` of a
/// step of `t`.
///
/// Bounds, checked at load: `K·den ≤ 2^14`, so `|den·acc| ≤ 255·128·2^14 < 2^29`;
/// `m < 2^31`, so `|den·acc·m| < 2^60`; `|c| < 2^61`; the sum stays below `2^62`, inside i64,
/// and `shift ≤ 61` ([`Columns`]).
#[derive(Debug)]
pub(crate) struct Dense {
    pub(crate) w: Weights,
    input: InGrid,
    m: Vec<i64>,
    c: Vec<i64>,
    shift: Vec<u32>,
    /// `m`, `c` and `shift` in vector form, for accumulators in i32.
    columns: Columns,
    /// A PTF input's `2^shift_k` per input channel (`shift_k ≤ 7`, so `code · 2^shift_k` fits
    /// u16).
    powers: Option<Vec<u16>>,
    /// Whether a PTF input's sums stay within i32 whole (`K · 255 · max 2^shift_k · 128 <
    /// 2^31`), so that a kernel with 16-bit operands takes the shifted codes in one product.
    wide_fits: bool,
    epilogue: Epilogue,
}

/// The dense epilogue over whole rows, compiled for the detected instruction set: the
/// requantization in vector lanes ([`Columns`]), then the codes.
struct Epilogues<'a, O> {
    dense: &'a Dense,
    acc: &'a [i32],
    sums: Sums<'a>,
    out: &'a mut [O],
}

/// Which products [`Dense::gemm_shifted`] ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shifted {
    /// Every `v` below 256: the lower plane alone.
    Low,
    /// Both byte planes.
    Planes,
    /// One product of the whole `v`.
    Wide,
}

/// What the accumulators hold.
#[derive(Clone, Copy)]
enum Sums<'a> {
    /// Sums of u8 codes: `|den·acc| < 2^29` (`MAX_K_DEN`).
    Codes,
    /// A PTF input's lower byte plane, with the upper one: the sum is `acc + 256·hi`.
    Planes(&'a [i32]),
    /// A PTF input's whole shifted codes (`Dense::wide_fits`): `acc` is the sum.
    Wide,
}

impl<O: Code> pulp::WithSimd for Epilogues<'_, O> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Epilogues { dense: d, acc, sums, out } = self;
        let n = d.w.n;
        let den = d.input.den;
        let (mut x, mut t, mut codes) = (vec![0i32; n], vec![0i64; n], vec![0u8; n]);
        for (r, (o, acc)) in out.chunks_exact_mut(n).zip(acc.chunks_exact(n)).enumerate() {
            match sums {
                Sums::Codes => {
                    // |den·acc| < 2^29 (`MAX_K_DEN`).
                    x.iter_mut().zip(acc).for_each(|(x, &a)| *x = a * den as i32);
                    d.columns.row(&x, &mut t);
                }
                Sums::Planes(_) | Sums::Wide => {
                    // `den·(acc + 256·hi)` where it is below 2^30 on the whole row (as it is
                    // on real data), else the exact i128 form.
                    let hi = match sums {
                        Sums::Planes(hi) => Some(&hi[r * n..][..n]),
                        _ => None,
                    };
                    let mut big = 0u64;
                    for (j, (x, &a)) in x.iter_mut().zip(acc).enumerate() {
                        let h = hi.map_or(0, |hi| i64::from(hi[j]));
                        let v = (i64::from(a) + (h << 8)) * den;
                        big |= v.unsigned_abs();
                        *x = v as i32;
                    }
                    if big < 1 << 30 {
                        d.columns.row(&x, &mut t);
                    } else {
                        d.wide_row(acc, hi, &mut t);
                    }
                }
            }
            match &d.epilogue {
                Epilogue::Requant { zero_point, hi } => {
                    let hi = i64::from(*hi);
                    for ((o, &t), &z) in o.iter_mut().zip(&t).zip(zero_point) {
                        *o = O::from_code((t + i64::from(z)).clamp(0, hi));
                    }
                }
                Epilogue::Gelu { tables, lanes } => {
                    tables.row_lanes(*lanes, &t, &mut codes);
                    o.iter_mut().zip(&codes).for_each(|(o, &c)| *o = O::from_code(i64::from(c)));
                }
            }
        }
    }
}

/// The longest reduction, times the input's denominator: `255·128·2^14 < 2^29`.
const MAX_K_DEN: usize = 1 << 14;

/// A dense layer's weights in the artifact.
#[derive(Clone, Copy)]
pub(crate) struct LayerRef<'a> {
    /// The weight site (`<layer>.weight_int8`, `<layer>.scale`, `<layer>.bias`).
    pub(crate) name: &'a str,
    /// The weight's shape, output channels first.
    pub(crate) shape: &'a [usize],
    /// Whether it has a bias, which must then be there.
    pub(crate) bias: bool,
}

#[allow(clippy::float_arithmetic)] // load time
pub(crate) fn compile(
    kernel: &Kernel,
    art: &Artifact,
    layer: &LayerRef<'_>,
    input: InGrid,
    out_site: &str,
    gelu: bool,
) -> Result<Dense> {
    let LayerRef { name: layer, shape, bias } = *layer;
    let err = |reason: String| Error::Op { op: 0, kind: "dense", reason };
    let codes = art.i8(&format!("{layer}.weight_int8"), Some(shape))?;
    let n = shape[0];
    let k: usize = shape[1..].iter().product();
    if k * input.den as usize > MAX_K_DEN {
        return Err(err(format!("{layer}: reduction of {k} is too long for the accumulators")));
    }
    let ws = art.f32(&format!("{layer}.scale"), Some(&[n]))?;
    let b = if bias { art.f32(&format!("{layer}.bias"), Some(&[n]))? } else { vec![0.0; n] };
    // GELU writes bytes; a plain layer may write the residual stream (`ops::check_widths`).
    let go = if gelu { Grid::read(art, out_site)? } else { Grid::read_any(art, out_site)? };
    if !go.fits(n) {
        return Err(err(format!("site {out_site} does not fit {n} channels")));
    }
    let buckets = |scale: f32| {
        Buckets::new(&GeluTable::new(scale, go.zero_point[0], go.hi())).ok_or_else(|| {
            err(format!(
                "GELU's site {out_site}: scale {scale} puts its code thresholds too close for a bucket table"
            ))
        })
    };
    let (epilogue, t_scale): (Epilogue, Vec<f64>) = if gelu {
        let delta = |j: usize| f64::from(go.scale(j)) / f64::from(1u32 << FRACTION_BITS);
        if go.layer_wise() {
            let tables = ColumnTables::new(&[buckets(go.scale[0])?], &vec![0; n]);
            (Epilogue::Gelu { tables, lanes: Lanes::of(kernel.arch()) }, vec![delta(0); n])
        } else {
            // PTF: one table per distinct scale (factor), shared zero point.
            if go.ptf.is_none() || go.zero_point.len() != 1 {
                return Err(err(format!(
                    "GELU's site {out_site} is channel-wise without PTF factors and one zero point"
                )));
            }
            let mut scales: Vec<f32> = Vec::new();
            let mut which = Vec::with_capacity(n);
            for j in 0..n {
                let s = go.scale(j);
                let i = scales.iter().position(|&x| x == s).unwrap_or_else(|| {
                    scales.push(s);
                    scales.len() - 1
                });
                which.push(i as u8);
            }
            let tables = scales.iter().map(|&s| buckets(s)).collect::<Result<Vec<_>>>()?;
            let tables = ColumnTables::new(&tables, &which);
            (
                Epilogue::Gelu { tables, lanes: Lanes::of(kernel.arch()) },
                (0..n).map(delta).collect(),
            )
        }
    } else {
        let zero_point = (0..n).map(|j| go.zero_point(j)).collect();
        (
            Epilogue::Requant { zero_point, hi: go.hi_wide() },
            (0..n).map(|j| f64::from(go.scale(j))).collect(),
        )
    };
    // Σ_k w_jk · 2^shift_k, the input zero point's weight when the codes enter shifted.
    let shifted_sums: Option<Vec<i64>> = input.shifts.as_ref().map(|shifts| {
        codes
            .chunks_exact(k.max(1))
            .map(|row| row.iter().zip(shifts).map(|(&w, &s)| i64::from(w) << s).sum())
            .collect()
    });
    let w = Weights::new(kernel, codes, n, k);
    let (mut m, mut c, mut shift) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::new());
    for j in 0..n {
        let acc_scale = input.scale / input.den as f64 * f64::from(ws[j]);
        let d = dyadic(acc_scale / t_scale[j], &err)?;
        // The bias in accumulator steps with 16 fraction bits, then scaled by m exactly in i128.
        // Rounded to whole steps, it flipped about 4.5 codes in 10^4 at every linear site of
        // ViT-Tiny (a step is about 10^-3 of an output step there); now it moves outputs by
        // less than 10^-8 of a step.
        let steps = f64::from(b[j]) / acc_scale;
        let row_sum = shifted_sums.as_ref().map_or(i64::from(w.row_sums[j]), |s| s[j]);
        let zp_term = i128::from(input.zp_num) * i128::from(row_sum);
        let bias16 = (steps * 65536.0).round_ties_even();
        if bias16.is_nan() || bias16.abs() >= 2f64.powi(100) {
            return Err(err(format!("{layer}.bias[{j}]: {} is {steps:e} accumulator steps", b[j])));
        }
        // |bias16| < 2^100 times m may pass i128: checked (a damaged bias, found by the
        // mutation test).
        let cj = (bias16 as i128)
            .checked_mul(i128::from(d.m))
            .map(|v| crate::requant::round_shift(v, 16) - zp_term * i128::from(d.m))
            .unwrap_or(i128::MAX);
        if cj.abs() >= 1i128 << 61 || d.shift > MAX_COLUMN_SHIFT {
            return Err(err(format!(
                "{layer}.bias[{j}]: {} ({steps:e} accumulator steps) or its requantization (2^-{}) is out of the i64 range",
                b[j], d.shift
            )));
        }
        m.push(d.m);
        c.push(cj as i64);
        shift.push(d.shift);
    }
    let columns = Columns::new(&m, &c, &shift).expect("every column was checked");
    let powers: Option<Vec<u16>> =
        input.shifts.as_ref().map(|s| s.iter().map(|&s| 1u16 << s).collect());
    let widest = powers.as_ref().and_then(|p| p.iter().max()).map_or(0, |&p| u64::from(p));
    let wide_fits = (k as u64) * 255 * widest * 128 < 1 << 31;
    Ok(Dense { w, input, m, c, shift, columns, powers, wide_fits, epilogue })
}

impl Dense {
    /// Bytes of constants held: the weights, the per-column multipliers and the GELU tables.
    pub(crate) fn bytes(&self) -> usize {
        let table = match &self.epilogue {
            Epilogue::Gelu { tables, .. } => tables.bytes(),
            Epilogue::Requant { .. } => 0,
        };
        self.w.bytes() + 24 * self.w.n + table
    }

    /// Whether it writes codes wider than a byte (onto the residual stream).
    pub(crate) fn wide(&self) -> bool {
        matches!(self.epilogue, Epilogue::Requant { hi, .. } if hi > u16::from(u8::MAX))
    }

    /// `rows × K` codes to `rows × N` codes in `O` (u16 where [`wide`](Self::wide)): each
    /// parallel task runs its rows' GEMM and epilogue while the accumulators are in cache.
    pub(crate) fn run<O: Code>(&self, kernel: &Kernel, a: &[u8], timings: &mut Timings) -> Vec<O> {
        let (n, k) = (self.w.n, self.w.k);
        let rows = a.len() / k;
        let mut out = vec![O::default(); rows * n];
        let (gemm_ns, epilogue_ns, macs) =
            (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        let arch = kernel.arch();
        let t = Instant::now();
        for_each_rows(a, k, n, &mut out, |s, a, out| {
            let t0 = Instant::now();
            match &self.powers {
                None => {
                    s.gemm(kernel, a, &self.w);
                    macs.fetch_add(a.len() as u64 * n as u64, Relaxed);
                    let t1 = Instant::now();
                    arch.dispatch(Epilogues { dense: self, acc: &s.acc, sums: Sums::Codes, out });
                    epilogue_ns.fetch_add(nanos(t1.elapsed()), Relaxed);
                    gemm_ns.fetch_add(nanos(t1 - t0), Relaxed);
                }
                Some(powers) => {
                    let shifted = self.gemm_shifted(kernel, s, a, powers);
                    let products = 1 + u64::from(shifted == Shifted::Planes);
                    macs.fetch_add(products * a.len() as u64 * n as u64, Relaxed);
                    let t1 = Instant::now();
                    let sums = match shifted {
                        Shifted::Low => Sums::Codes,
                        Shifted::Planes => Sums::Planes(&s.acc2[..]),
                        Shifted::Wide => Sums::Wide,
                    };
                    arch.dispatch(Epilogues { dense: self, acc: &s.acc, sums, out });
                    epilogue_ns.fetch_add(nanos(t1.elapsed()), Relaxed);
                    gemm_ns.fetch_add(nanos(t1 - t0), Relaxed);
                }
            }
        });
        timings.gemm_macs += macs.load(Relaxed);
        let threads = (
            Duration::from_nanos(gemm_ns.load(Relaxed)),
            Duration::from_nanos(epilogue_ns.load(Relaxed)),
        );
        timings.split("gemm", self.epilogue.kind(), t.elapsed(), std::iter::once(threads));
        out
    }

    /// A PTF input, `v = code · 2^shift_k < 2^15`: with a kernel of 16-bit operands, where the
    /// sums fit i32 (`wide_fits`), one product of `v` into `acc`; else `v` split into byte
    /// planes `v = lo + 256·hi`, each through the u8 × i8 GEMM with the same weights (`hi`
    /// only where some `v ≥ 256` in the task's rows), into `acc` and `acc2`.
    fn gemm_shifted(&self, kernel: &Kernel, s: &mut Scratch, a: &[u8], powers: &[u16]) -> Shifted {
        let k = self.w.k;
        if self.wide_fits && kernel.kind() == KernelKind::Avx2Pairs {
            let mut wide = std::mem::take(&mut s.wide);
            wide.clear();
            wide.resize(a.len(), 0);
            kernel.arch().dispatch(|| {
                for (row, wide) in a.chunks_exact(k).zip(wide.chunks_exact_mut(k)) {
                    for ((w, &q), &p) in wide.iter_mut().zip(row).zip(powers) {
                        *w = u16::from(q) * p;
                    }
                }
            });
            let ran = s.gemm_wide(kernel, &wide, &self.w).is_some();
            s.wide = wide;
            assert!(ran, "gemm: the AVX2 pair kernel takes 16-bit rows");
            return Shifted::Wide;
        }
        let (mut lo, mut hi) = (std::mem::take(&mut s.bytes), std::mem::take(&mut s.bytes2));
        lo.resize(a.len(), 0);
        hi.resize(a.len(), 0);
        let any_hi = kernel.arch().dispatch(|| {
            let mut any = 0u8;
            for ((row, lo), hi) in
                a.chunks_exact(k).zip(lo.chunks_exact_mut(k)).zip(hi.chunks_exact_mut(k))
            {
                for (((&q, &p), lo), hi) in row.iter().zip(powers).zip(lo).zip(hi.iter_mut()) {
                    let v = u16::from(q) * p;
                    let h = (v >> 8) as u8;
                    *lo = v as u8;
                    *hi = h;
                    any |= h;
                }
            }
            any != 0
        });
        s.gemm(kernel, &lo, &self.w);
        if any_hi {
            s.gemm2(kernel, &hi, &self.w);
        }
        (s.bytes, s.bytes2) = (lo, hi);
        if any_hi { Shifted::Planes } else { Shifted::Low }
    }

    /// One row's `t` from a PTF input's sums, `acc = lo + 256·hi` (`hi` 0 for whole sums):
    /// `|acc| ≤ 128 · 32,640 · K < 2^36` (K ≤ 2^14), so `den·acc·m + c` is formed in i128.
    fn wide_row(&self, lo: &[i32], hi: Option<&[i32]>, t: &mut [i64]) {
        let den = i128::from(self.input.den);
        for (j, t) in t.iter_mut().enumerate() {
            let acc = i64::from(lo[j]) + (hi.map_or(0, |hi| i64::from(hi[j])) << 8);
            let v = den * i128::from(acc) * i128::from(self.m[j]) + i128::from(self.c[j]);
            // Beyond ±2^40 every code is saturated already: clamping keeps the code and leaves
            // room for the zero point.
            *t = crate::requant::round_shift(v, self.shift[j]).clamp(-(1 << 40), 1 << 40) as i64;
        }
    }
}

/// Whole nanoseconds of `d`, for summing task times across threads.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requant::round_shift;

    /// The vector epilogue of a PTF input equals the i128 form on rows whose `acc + 256·hi` fits
    /// the i32 lanes and on rows that take the exact fallback.
    #[test]
    fn wide_accumulators_requantize_exactly_on_either_path() {
        let (n, k, rows) = (37, 5, 6);
        let kernel = Kernel::new(KernelKind::Loops, fqvit_ops::Isa::Native).expect("everywhere");
        let w = Weights::new(&kernel, vec![1; n * k], n, k);
        let mut lcg = fqvit_testkit::lcg(0x9e37_79b9_7f4a_7c15);
        let mut next = move || lcg() >> 16;
        let m: Vec<i64> = (0..n).map(|_| (1 << 30) + (next() % (1 << 30)) as i64).collect();
        let c: Vec<i64> = (0..n).map(|_| (next() % (1 << 50)) as i64 - (1 << 49)).collect();
        let shift: Vec<u32> = (0..n).map(|_| 40 + (next() % 20) as u32).collect();
        let zero_point: Vec<i32> = (0..n).map(|j| (j * 7 % 256) as i32).collect();
        let dense = Dense {
            w,
            input: InGrid { scale: 1.0, zp_num: 0, den: 1, shifts: Some(vec![0; k]) },
            columns: Columns::new(&m, &c, &shift).unwrap(),
            m: m.clone(),
            c: c.clone(),
            shift: shift.clone(),
            powers: Some(vec![1; k]),
            wide_fits: true,
            epilogue: Epilogue::Requant { zero_point: zero_point.clone(), hi: 255 },
        };
        // Rows 0–2 small (the vector path), rows 3–5 with some |acc| ≥ 2^30 (the fallback).
        let lo: Vec<i32> = (0..rows * n).map(|_| (next() % (1 << 24)) as i32 - (1 << 23)).collect();
        let hi: Vec<i32> = (0..rows * n)
            .map(|i| {
                let span = if i / n < 3 { 1 << 20 } else { 1 << 30 };
                (next() % span) as i32 - span as i32 / 2
            })
            .collect();
        for isa in fqvit_ops::Isa::ALL.into_iter().filter(|isa| isa.available()) {
            let mut out = vec![0u8; rows * n];
            let sums = Sums::Planes(&hi);
            isa.arch().dispatch(Epilogues { dense: &dense, acc: &lo, sums, out: &mut out });
            for i in 0..rows * n {
                let j = i % n;
                let acc = i128::from(lo[i]) + (i128::from(hi[i]) << 8);
                let t = round_shift(acc * i128::from(m[j]) + i128::from(c[j]), shift[j]);
                let want = (t + i128::from(zero_point[j])).clamp(0, 255) as u8;
                assert_eq!(out[i], want, "{isa}: row {} column {j}: acc {acc}", i / n);
            }
            assert!(out.iter().any(|&q| q != 0 && q != 255));
            // Whole sums (one product of the shifted codes): rows 0–2 in the lanes, rows 3–5
            // with |acc| ≥ 2^30 through the fallback.
            let whole: Vec<i32> = (0..rows * n)
                .map(|i| match (i / n < 3, hi[i] >= 0) {
                    (true, _) => lo[i],
                    (false, true) => hi[i] + (1 << 30),
                    (false, false) => hi[i] - (1 << 30),
                })
                .collect();
            let mut out = vec![0u8; rows * n];
            let sums = Sums::Wide;
            isa.arch().dispatch(Epilogues { dense: &dense, acc: &whole, sums, out: &mut out });
            for i in 0..rows * n {
                let j = i % n;
                let acc = i128::from(whole[i]);
                let t = round_shift(acc * i128::from(m[j]) + i128::from(c[j]), shift[j]);
                let want = (t + i128::from(zero_point[j])).clamp(0, 255) as u8;
                assert_eq!(out[i], want, "{isa}, whole sums: row {} column {j}: acc {acc}", i / n);
            }
        }
        // Both paths were taken.
        let big = |r: usize| {
            (0..n).any(|j| (lo[r * n + j] as i64 + ((hi[r * n + j] as i64) << 8)).abs() >= 1 << 30)
        };
        assert!(!big(0) && big(5));
    }
}
