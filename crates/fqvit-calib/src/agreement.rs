//! The integer engine against the simulation, site by site: the codes each engine op puts on
//! its site, compared with the codes the simulation's fake quantizer puts there, on the same
//! images. Free-running, each side computes from its own earlier codes, so differences add up
//! along the network; forced, each engine op reads the simulation's codes, so every op is
//! judged alone.

use std::collections::{BTreeMap, HashMap};

use fqvit_engine::{Engine, Images, Observer};
use fqvit_models::{Classifier, Mode, Probe, Quantized, TensorClass};
use fqvit_program::{Op, Program, windows};
use fqvit_tensor::{Axis, Quantizer};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// One site's codes: how many, how many equal, the largest difference.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Agreement {
    /// The site (dotted name), or for a class the name with block indices as `*`.
    pub site: String,
    /// Sites summed (1 for a site).
    pub sites: usize,
    /// Codes compared.
    pub codes: usize,
    /// Codes equal.
    pub equal: usize,
    /// max |engine − simulation|.
    pub max_delta: u16,
}

impl Agreement {
    /// The fraction of equal codes.
    pub fn fraction(&self) -> f64 {
        self.equal as f64 / self.codes.max(1) as f64
    }

    /// Adds another count of the same site or class (`sites` is the caller's).
    fn merge(&mut self, other: &Agreement) {
        self.codes += other.codes;
        self.equal += other.equal;
        self.max_delta = self.max_delta.max(other.max_delta);
    }
}

/// Both comparisons of one set of images, each per site in program order.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SiteAgreement {
    /// Each side from its own earlier codes.
    pub free_running: Vec<Agreement>,
    /// Each engine op fed the simulation's codes.
    pub forced: Vec<Agreement>,
}

impl SiteAgreement {
    /// Adds another batch's counts (the same program, so the same sites in the same order).
    pub fn accumulate(&mut self, batch: SiteAgreement) {
        for (sums, batch) in
            [(&mut self.free_running, batch.free_running), (&mut self.forced, batch.forced)]
        {
            if sums.is_empty() {
                *sums = batch;
                continue;
            }
            for (s, b) in sums.iter_mut().zip(&batch) {
                debug_assert_eq!(s.site, b.site, "the same program each batch");
                s.merge(b);
            }
        }
    }
}

/// Keeps the simulation's output at every activation site, by the original's module name;
/// codes are taken afterwards, only for the sites the engine writes.
struct SimOutputs<'a> {
    /// Original module name → (site, its quantizer).
    quantizers: &'a HashMap<String, (String, Quantizer)>,
    outputs: HashMap<&'a str, (&'a Quantizer, Tensor)>,
}

impl Probe for SimOutputs<'_> {
    fn input(&mut self, _: &str, _: usize, _: &Tensor) -> Option<Tensor> {
        None
    }

    fn output(&mut self, module: &str, ys: &Tensor) -> Option<Tensor> {
        if let Some((site, q)) = self.quantizers.get(module) {
            self.outputs.insert(site, (q, ys.shallow_clone()));
        }
        None
    }
}

/// Compares the simulation's codes with the engine's.
struct Compare<'a> {
    sim: &'a HashMap<&'a str, Vec<u16>>,
    forced: bool,
    out: Vec<Agreement>,
    /// Engine sites the simulation has no codes of that length for.
    missing: Vec<String>,
}

impl Observer for Compare<'_> {
    fn codes(&mut self, _: usize, site: &str, codes: &[u16]) -> Option<Vec<u16>> {
        let Some(sim) = self.sim.get(site).filter(|s| s.len() == codes.len()) else {
            self.missing.push(site.to_owned());
            return None;
        };
        let (mut equal, mut max_delta) = (0, 0);
        for (a, b) in sim.iter().zip(codes) {
            let d = a.abs_diff(*b);
            equal += usize::from(d == 0);
            max_delta = max_delta.max(d);
        }
        self.out.push(Agreement {
            site: site.to_owned(),
            sites: 1,
            codes: codes.len(),
            equal,
            max_delta,
        });
        self.forced.then(|| sim.clone())
    }
}

/// Per-site agreement of `engine` with the simulation `quantized` of `model` on normalized CPU
/// `images` `(B, 3, H, W)`: one simulated forward, then the engine free-running and forced.
/// Sites the simulation quantizes inside an engine op (attention scores, the embedding's
/// summands) are not compared.
pub fn site_agreement(
    model: &dyn Classifier,
    quantized: &Quantized,
    engine: &Engine,
    images: &Tensor,
) -> Result<SiteAgreement> {
    let quantizers: HashMap<String, (String, Quantizer)> = model
        .sites()
        .iter()
        .filter(|(_, s)| s.class != TensorClass::Weight)
        .filter_map(|(id, s)| {
            let p = quantized.table().get(id)?;
            let q = Quantizer::new(p, Axis::Last, images.device());
            Some((s.original.clone(), (s.name.clone(), q)))
        })
        .collect();
    let mut probe = SimOutputs { quantizers: &quantizers, outputs: HashMap::new() };
    let _ = tch::no_grad(|| {
        model.forward(images, &mut Mode::Quantized { state: quantized, probe: Some(&mut probe) })
    });
    let sim: HashMap<&str, Vec<u16>> = engine
        .sites()
        .filter_map(|site| {
            let (q, ys) = probe.outputs.get(site)?;
            let c = q.codes(ys).to_kind(Kind::Int).contiguous().view(-1);
            Some(
                Vec::<i32>::try_from(&c).map(|c| (site, c.into_iter().map(|q| q as u16).collect())),
            )
        })
        .collect::<std::result::Result<_, _>>()?;
    let mut sim = sim;
    let batch = images.size()[0] as usize;
    for (site, tokens) in windowed_sites(engine.program()) {
        if let Some(codes) = sim.get_mut(site) {
            *codes = token_order(codes, &tokens, batch);
        }
    }
    let x = Vec::<f32>::try_from(images.to_kind(Kind::Float).contiguous().view(-1))?;
    let compare = |forced| -> Result<Vec<Agreement>> {
        let mut compare = Compare { sim: &sim, forced, out: Vec::new(), missing: Vec::new() };
        engine.run_observed(Images::Normalized(&x), &mut compare).map_err(Error::Engine)?;
        if !compare.missing.is_empty() {
            return Err(Error::Settings(format!(
                "the simulation has no codes of the engine's shape at sites {:?}: the program and the forward disagree",
                compare.missing
            )));
        }
        Ok(compare.out)
    };
    Ok(SiteAgreement { free_running: compare(false)?, forced: compare(true)? })
}

/// The sites the simulation holds in Swin's window order `(B·nW, N, C)`, with the grid token
/// of each windowed position: qkv, context and proj around each window attention, which the
/// engine keeps in token order.
fn windowed_sites(program: &Program) -> Vec<(&str, Vec<usize>)> {
    let mut out = Vec::new();
    for (i, op) in program.ops.iter().enumerate() {
        if let Op::WindowAttention { input, resolution, window, shift, out_site, .. } = op {
            let tokens = windows::tokens(*resolution, *window, *shift);
            let proj = program.ops[i + 1..].iter().find(|o| o.inputs().contains(&i));
            let qkv = program.ops[*input].out_site();
            for site in
                [qkv, Some(out_site.as_str()), proj.and_then(Op::out_site)].into_iter().flatten()
            {
                out.push((site, tokens.clone()));
            }
        }
    }
    out
}

/// Window-ordered codes of `batch` images back in token order.
fn token_order(codes: &[u16], tokens: &[usize], batch: usize) -> Vec<u16> {
    let per = codes.len() / batch.max(1);
    let c = per / tokens.len().max(1);
    codes.chunks_exact(per).flat_map(|x| windows::scatter(x, tokens, c)).collect()
}

/// Sites summed by class: the name with every block index written `*` (`blocks.*.mlp.qact1`).
pub fn by_class(sites: &[Agreement]) -> Vec<Agreement> {
    let mut order = Vec::new();
    let mut classes: BTreeMap<String, Agreement> = BTreeMap::new();
    for a in sites {
        let class = a
            .site
            .split('.')
            .map(|part| if part.bytes().all(|b| b.is_ascii_digit()) { "*" } else { part })
            .collect::<Vec<_>>()
            .join(".");
        let e = classes.entry(class.clone()).or_insert_with(|| {
            order.push(class.clone());
            Agreement { site: class, sites: 0, codes: 0, equal: 0, max_delta: 0 }
        });
        e.sites += a.sites;
        e.merge(a);
    }
    order.into_iter().map(|c| classes.remove(&c).expect("each class once")).collect()
}

/// The two comparisons by site class as a text table: codes, then the fraction equal and the
/// largest difference free-running and with each op fed the simulation's codes.
pub fn render(free: &[Agreement], forced: &[Agreement]) -> String {
    let mut out = format!(
        "{:<34} {:>5} {:>12} {:>16} {:>16}\n",
        "site class", "sites", "codes", "free-running", "each op alone"
    );
    for (a, f) in by_class(free).iter().zip(&by_class(forced)) {
        out += &format!(
            "{:<34} {:>5} {:>12} {:>9.4} % {:>3} {:>9.4} % {:>3}\n",
            a.site,
            a.sites,
            a.codes,
            100.0 * a.fraction(),
            a.max_delta,
            100.0 * f.fraction(),
            f.max_delta
        );
    }
    out
}
