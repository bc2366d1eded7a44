//! A convolution or linear layer in integers: the u8 × i8 GEMM and its epilogue (requantization,
//! or GELU by thresholds), compiled from the artifact and run side by side.

use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gelu::{Buckets, FRACTION_BITS, GeluTable};
use crate::gemm::{Kernel, Weights, gemm};
use crate::grid::Grid;
use crate::load::{dyadic, ln_scale};
use crate::requant::{clamp_code, round_shift_i64};
use crate::timings::Timings;
use fqvit_artifact::Artifact;
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
    /// `t` is on the out-site's grid: `clamp(t + z_o, 0, hi)`.
    Requant { zero_point: Vec<i32>, hi: u8 },
    /// `t` is on GELU's fixed-point grid: its thresholds give the code.
    Gelu { table: Buckets },
    /// GELU onto a PTF site: column `j`'s `t` is on the grid of its own scale, whose
    /// thresholds are `tables[which[j]]` (one table per distinct factor).
    GeluPtf { tables: Vec<Buckets>, which: Vec<u8> },
}

impl Epilogue {
    /// Where its time is counted in [`Timings`].
    fn kind(&self) -> &'static str {
        match self {
            Epilogue::Gelu { .. } | Epilogue::GeluPtf { .. } => "gelu",
            Epilogue::Requant { .. } => "requant",
        }
    }

    /// The code of column `j` from its requantized accumulator `t`.
    #[inline(always)]
    fn code(&self, j: usize, t: i64) -> u8 {
        match self {
            Epilogue::Requant { zero_point, hi } => clamp_code(t + i64::from(zero_point[j]), *hi),
            Epilogue::Gelu { table } => table.code(t),
            Epilogue::GeluPtf { tables, which } => tables[usize::from(which[j])].code(t),
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
/// and `shift ≤ 62`.
#[derive(Debug)]
pub(crate) struct Dense {
    pub(crate) w: Weights,
    input: InGrid,
    m: Vec<i64>,
    c: Vec<i64>,
    shift: Vec<u32>,
    epilogue: Epilogue,
}

/// The dense epilogue over whole rows, compiled for the detected instruction set.
struct Epilogues<'a> {
    dense: &'a Dense,
    acc: &'a [i32],
    out: &'a mut [u8],
}

impl pulp::WithSimd for Epilogues<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Epilogues { dense: d, acc, out } = self;
        let n = d.w.n;
        let den = d.input.den;
        // Zipped slices of one length: no bounds checks, so the loop vectorises.
        let consts = || d.m.iter().zip(&d.c).zip(&d.shift);
        let t = |a: i32, ((&m, &c), &s): ((&i64, &i64), &u32)| {
            round_shift_i64(den * i64::from(a) * m + c, s)
        };
        for (o, acc) in out.chunks_exact_mut(n).zip(acc.chunks_exact(n)) {
            match &d.epilogue {
                Epilogue::Requant { zero_point, hi } => {
                    for ((o, &a), (k, &z)) in o.iter_mut().zip(acc).zip(consts().zip(zero_point)) {
                        *o = clamp_code(t(a, k) + i64::from(z), *hi);
                    }
                }
                Epilogue::Gelu { table } => {
                    for ((o, &a), k) in o.iter_mut().zip(acc).zip(consts()) {
                        *o = table.code(t(a, k));
                    }
                }
                Epilogue::GeluPtf { tables, which } => {
                    for ((o, &a), (k, &w)) in o.iter_mut().zip(acc).zip(consts().zip(which)) {
                        *o = tables[usize::from(w)].code(t(a, k));
                    }
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
    let go = Grid::read(art, out_site)?;
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
            (Epilogue::Gelu { table: buckets(go.scale[0])? }, vec![delta(0); n])
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
            (Epilogue::GeluPtf { tables, which }, (0..n).map(delta).collect())
        }
    } else {
        let zero_point = (0..n).map(|j| go.zero_point(j)).collect();
        (
            Epilogue::Requant { zero_point, hi: go.hi() },
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
        let cj = crate::requant::round_shift(bias16 as i128 * i128::from(d.m), 16)
            - zp_term * i128::from(d.m);
        if cj.abs() >= 1i128 << 61 || d.shift > 62 {
            return Err(err(format!(
                "{layer}.bias[{j}]: {} ({steps:e} accumulator steps) or its requantization (2^-{}) is out of the i64 range",
                b[j], d.shift
            )));
        }
        m.push(d.m);
        c.push(cj as i64);
        shift.push(d.shift);
    }
    Ok(Dense { w, input, m, c, shift, epilogue })
}

impl Dense {
    /// Bytes of constants held: the weights, the per-column multipliers and the GELU tables.
    pub(crate) fn bytes(&self) -> usize {
        let table = match &self.epilogue {
            Epilogue::Gelu { table } => table.bytes(),
            Epilogue::GeluPtf { tables, which } => {
                tables.iter().map(Buckets::bytes).sum::<usize>() + which.len()
            }
            Epilogue::Requant { .. } => 0,
        };
        self.w.bytes() + 24 * self.w.n + table
    }

    /// `rows × K` codes to `rows × N` codes.
    pub(crate) fn run(&self, kernel: &Kernel, a: &[u8], timings: &mut Timings) -> Vec<u8> {
        if let Some(shifts) = &self.input.shifts {
            return self.run_shifted(kernel, a, shifts, timings);
        }
        let (n, rows) = (self.w.n, a.len() / self.w.k);
        let t = Instant::now();
        let mut acc = vec![0i32; rows * n];
        gemm(kernel, a, &self.w, &mut acc);
        timings.add("gemm", t);
        timings.gemm_macs += (rows * n * self.w.k) as u64;
        let t = Instant::now();
        let mut out = vec![0u8; rows * n];
        let rows_per_job = (4096 / n).max(1);
        let arch = pulp::Arch::new();
        out.par_chunks_mut(n * rows_per_job)
            .zip(acc.par_chunks(n * rows_per_job))
            .for_each(|(out, acc)| arch.dispatch(Epilogues { dense: self, acc, out }));
        timings.add(self.epilogue.kind(), t);
        out
    }

    /// A PTF input: `v = code · 2^shift_k < 2^15` is split into byte planes `v = lo + 256·hi`,
    /// each through the u8 × i8 GEMM with the same weights (`hi` only where some `v ≥ 256`),
    /// and `acc = acc_lo + 256·acc_hi`. Then `|acc| ≤ 128 · 32,640 · K < 2^36` (K ≤ 2^14), so
    /// the epilogue's `den·acc·m + c` is formed in i128.
    fn run_shifted(
        &self,
        kernel: &Kernel,
        a: &[u8],
        shifts: &[u8],
        timings: &mut Timings,
    ) -> Vec<u8> {
        let (n, k) = (self.w.n, self.w.k);
        let rows = a.len() / k;
        let t = Instant::now();
        let (mut lo, mut hi) = (vec![0u8; a.len()], vec![0u8; a.len()]);
        let mut any_hi = false;
        for ((row, lo), hi) in
            a.chunks_exact(k).zip(lo.chunks_exact_mut(k)).zip(hi.chunks_exact_mut(k))
        {
            for (((&q, &s), lo), hi) in row.iter().zip(shifts).zip(lo.iter_mut()).zip(hi.iter_mut())
            {
                let v = u16::from(q) << s;
                *lo = v as u8;
                *hi = (v >> 8) as u8;
                any_hi |= v >= 256;
            }
        }
        let mut acc_lo = vec![0i32; rows * n];
        gemm(kernel, &lo, &self.w, &mut acc_lo);
        let mut acc_hi = vec![0i32; if any_hi { rows * n } else { 0 }];
        if any_hi {
            gemm(kernel, &hi, &self.w, &mut acc_hi);
        }
        timings.add("gemm", t);
        timings.gemm_macs += ((1 + usize::from(any_hi)) * rows * n * k) as u64;
        let t = Instant::now();
        let den = i128::from(self.input.den);
        let mut out = vec![0u8; rows * n];
        // Rows in jobs of about 4096 outputs, as `run`'s epilogue.
        let job = n * (4096 / n).max(1);
        out.par_chunks_mut(job).enumerate().for_each(|(r, o)| {
            for (i, o) in o.iter_mut().enumerate().map(|(i, o)| (r * job + i, o)) {
                let j = i % n;
                let acc = i64::from(acc_lo[i]) + acc_hi.get(i).map_or(0, |&h| i64::from(h) << 8);
                let v = den * i128::from(acc) * i128::from(self.m[j]) + i128::from(self.c[j]);
                let t = crate::requant::round_shift(v, self.shift[j]);
                // Beyond ±2^40 every code is saturated already: clamping keeps the code and
                // leaves room for the zero point.
                let t = t.clamp(-(1 << 40), 1 << 40) as i64;
                *o = self.epilogue.code(j, t);
            }
        });
        timings.add(self.epilogue.kind(), t);
        out
    }
}
