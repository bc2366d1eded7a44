//! The calibration artifact: every site's parameters, the weights as int8 codes, the other
//! parameters as float32, and the provenance, in one safetensors file (schema:
//! `docs/qparams-format.md`). Reading it back rebuilds the quantized model with no calibration
//! and no float checkpoint.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use fqvit_models::{Architecture, QParamTable, Quantizable, SiteId, TensorClass};
use fqvit_ops::softmax::{ExpShift, LisBits};
use fqvit_tensor::{Axis, Quantizer};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::experiment::Experiment;

pub use fqvit_artifact::{FORMAT_VERSION, METADATA_KEY, PROGRAM_KEY, SiteInfo, weight_codes_name};

/// Where the calibration images came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationData {
    /// The data folder (its `train/` split).
    pub data: String,
    /// Images used.
    pub images: usize,
    /// `shuffled` or `sorted`.
    pub order: String,
    /// Shuffle seed.
    pub seed: u64,
}

/// Everything about an artifact that is not a tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The fqvit version that wrote it.
    pub fqvit_version: String,
    /// Creation time, seconds since 1970 (UTC).
    pub created_unix: u64,
    /// Model name, e.g. `vit_tiny`.
    pub model: String,
    /// The architecture.
    pub architecture: Architecture,
    /// SHA-256 of the float weights file it was calibrated from.
    pub weights_sha256: String,
    /// The experiment settings.
    pub experiment: Experiment,
    /// Calibration data.
    pub calibration: CalibrationData,
    /// Log2 code bits of Log-Int-Softmax, when LIS is on.
    pub lis_bits: Option<LisBits>,
    /// How much finer than its input's scale Log-Int-Softmax's exponential runs (0, the
    /// original's, is left out of the file).
    #[serde(default, skip_serializing_if = "is_none_shift")]
    pub lis_exp_shift: ExpShift,
    /// Every site, in forward order.
    pub sites: Vec<SiteInfo>,
}

fn is_none_shift(k: &ExpShift) -> bool {
    *k == ExpShift::NONE
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn tensor_bytes(t: &Tensor, kind: Kind) -> Result<Vec<u8>> {
    let t = t.to_device(tch::Device::Cpu).to_kind(kind).contiguous();
    let mut bytes = vec![0u8; t.numel() * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, t.numel())?;
    Ok(bytes)
}

/// Writes the artifact: site parameters, int8 weight codes, float parameters, provenance.
pub fn write(
    path: &Path,
    model: &dyn Quantizable,
    vs: &VarStore,
    table: &QParamTable,
    prov: &Provenance,
) -> Result<()> {
    let sites = model.sites();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut weight_vars = HashMap::new();
    for (id, site) in sites.iter() {
        let Some(p) = table.get(id) else { continue };
        tensors.push((
            format!("{}.scale", site.name),
            Dtype::F32,
            vec![p.scale.len()],
            f32_bytes(&p.scale),
        ));
        let zp: Vec<u8> = p.zero_point.iter().flat_map(|z| z.to_le_bytes()).collect();
        tensors.push((
            format!("{}.zero_point", site.name),
            Dtype::I32,
            vec![p.zero_point.len()],
            zp,
        ));
        if let Some(f) = &p.ptf {
            tensors.push((
                format!("{}.ptf_factor", site.name),
                Dtype::U8,
                vec![f.len()],
                f.iter().map(|f| f.get()).collect(),
            ));
        }
        if site.class == TensorClass::Weight {
            let w = model
                .weight(id)
                .ok_or_else(|| Error::Settings(format!("site {} has no weight", site.name)))?;
            let quantizer = Quantizer::new(p, Axis::First, tch::Device::Cpu);
            let codes = tch::no_grad(|| quantizer.codes(&w.to_device(tch::Device::Cpu)));
            let dims: Vec<usize> = w.size().iter().map(|&d| d as usize).collect();
            tensors.push((
                weight_codes_name(&site.name),
                Dtype::I8,
                dims,
                tensor_bytes(&codes, Kind::Int8)?,
            ));
            weight_vars.insert(format!("{}.weight", site.name), ());
        }
    }
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in vars {
        if weight_vars.contains_key(&name) {
            continue;
        }
        let dims: Vec<usize> = var.size().iter().map(|&d| d as usize).collect();
        tensors.push((name, Dtype::F32, dims, tensor_bytes(&var, Kind::Float)?));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (name.clone(), TensorView::new(*dtype, shape.clone(), bytes).expect("sizes match"))
        })
        .collect();
    let json = serde_json::to_string(prov).expect("provenance serialises");
    let mut meta = HashMap::from([(METADATA_KEY.to_owned(), json)]);
    if let Some(program) = model.program(prov.lis_bits) {
        let json = serde_json::to_string(&program).expect("programs serialise");
        meta.insert(PROGRAM_KEY.to_owned(), json);
    }
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| Error::Artifact { path: path.to_owned(), reason: format!("writing: {e}") })
}

/// Describes the sites of `model` with the experiment's observers.
pub fn site_infos(model: &dyn Quantizable, table: &QParamTable, exp: &Experiment) -> Vec<SiteInfo> {
    model
        .sites()
        .iter()
        .filter_map(|(id, s)| {
            let p = table.get(id)?;
            let obs = exp.observer(s);
            Some(SiteInfo {
                name: s.name.clone(),
                original: s.original.clone(),
                class: s.class,
                bit_type: p.bit_type.name(),
                bits: p.bit_type.bits.get(),
                signed: p.bit_type.signed,
                observer: obs.map_or("none".into(), |o| o.kind.as_str().to_owned()),
                granularity: if p.scale.len() == 1 { "layer-wise" } else { "channel-wise" }
                    .to_owned(),
                channels: s.channels,
                ptf: p.ptf.is_some(),
            })
        })
        .collect()
}

/// A read and checked artifact.
#[derive(Debug)]
pub struct Loaded {
    /// Its provenance.
    pub provenance: Provenance,
    /// The parameter table, indexed by the model's sites.
    pub table: QParamTable,
}

/// What the caller expects the artifact to be for.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    /// Model name.
    pub model: &'a str,
    /// Its architecture.
    pub architecture: &'a Architecture,
    /// The SHA-256 of float weights the caller also loaded, if any.
    pub weights_sha256: Option<&'a str>,
}

/// Reads an artifact ([`fqvit_artifact::Artifact::read`] checks every field), checks it
/// against `model`, and loads its parameters into `vs` (weights dequantized from their integer
/// codes). Refuses, saying which, what that reader refuses, another model or architecture,
/// other weights, missing or extra sites or tensors, and shapes that do not fit the model.
/// Nothing is loaded unless every check passes.
pub fn read(
    path: &Path,
    model: &dyn Quantizable,
    vs: &VarStore,
    expect: Expect<'_>,
) -> Result<Loaded> {
    let art = fqvit_artifact::Artifact::read(path)?;
    let bad = |reason: String| Error::Artifact { path: path.to_owned(), reason };
    let prov: Provenance = serde_json::from_value(art.provenance().clone())
        .map_err(|e| bad(format!("corrupt metadata: {e}")))?;
    if prov.model != expect.model {
        return Err(bad(format!("calibrated for model {}, not {}", prov.model, expect.model)));
    }
    if &prov.architecture != expect.architecture {
        return Err(bad(format!(
            "architecture differs from {}: {:?}",
            expect.model, prov.architecture
        )));
    }
    if let Some(sha) = expect.weights_sha256
        && sha != prov.weights_sha256
    {
        return Err(bad(format!(
            "calibrated from other weights (SHA-256 {}, the given weights are {sha})",
            prov.weights_sha256
        )));
    }
    // Sites: the same set as the model, with the model's classes and channels.
    let sites = model.sites();
    let ours: BTreeMap<&str, SiteId> = sites.iter().map(|(id, s)| (s.name.as_str(), id)).collect();
    let theirs: BTreeMap<&str, &SiteInfo> =
        prov.sites.iter().map(|s| (s.name.as_str(), s)).collect();
    let used =
        |id: SiteId| !(sites.get(id).class == TensorClass::Softmax && prov.lis_bits.is_some());
    let missing: Vec<&str> = ours
        .iter()
        .filter(|(n, id)| used(**id) && !theirs.contains_key(*n))
        .map(|(n, _)| *n)
        .collect();
    let extra: Vec<&str> = theirs.keys().filter(|n| !ours.contains_key(*n)).copied().collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(bad(format!(
            "sites do not match the model: missing {missing:?}, extra {extra:?}"
        )));
    }
    let mut table = QParamTable::empty(sites.len());
    let mut consumed = HashSet::new();
    for info in &prov.sites {
        let id = ours[info.name.as_str()];
        let site = sites.get(id);
        if (info.channels, info.class) != (site.channels, site.class) {
            return Err(bad(format!(
                "site {}: {} {} channels, the model has {} {}",
                info.name,
                info.channels,
                info.class.as_str(),
                site.channels,
                site.class.as_str()
            )));
        }
        consumed.extend(art.site_tensors(info));
        let params = art.params(&info.name).expect("the reader checked every listed site");
        table.set(id, params.clone());
    }
    // Parameters: every variable, as float32 or (weights of weight sites) integer codes.
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut values = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        let site_weight = name
            .strip_suffix(".weight")
            .and_then(|s| ours.get(s).copied())
            .filter(|id| sites.get(*id).class == TensorClass::Weight);
        let (key, dtype) = match site_weight {
            Some(_) => (weight_codes_name(name.trim_end_matches(".weight")), Dtype::I8),
            None => (name.clone(), Dtype::F32),
        };
        let view = art.tensor(&key).ok_or_else(|| bad(format!("tensor {key} is missing")))?;
        let shape: Vec<i64> = view.shape.iter().map(|&d| d as i64).collect();
        if view.dtype != dtype || shape != var.size() {
            return Err(bad(format!(
                "tensor {key}: expected {dtype:?} {:?}, got {:?} {shape:?}",
                var.size(),
                view.dtype
            )));
        }
        let kind = if dtype == Dtype::I8 { Kind::Int8 } else { Kind::Float };
        let mut value = Tensor::f_from_data_size(view.bytes, &shape, kind)?.to_kind(Kind::Float);
        if let Some(id) = site_weight {
            let p = table.get(id).expect("weight sites have parameters");
            let mut bshape = vec![-1i64];
            bshape.resize(shape.len(), 1);
            value *= Tensor::from_slice(&p.scale).view(bshape.as_slice());
        }
        consumed.insert(key);
        values.push((name.clone(), value));
    }
    let mut unknown: Vec<&str> = art.names().filter(|n| !consumed.contains(*n)).collect();
    unknown.sort_unstable();
    if !unknown.is_empty() {
        return Err(bad(format!("unexpected tensors: {unknown:?}")));
    }
    tch::no_grad(|| -> Result<()> {
        for (name, value) in &values {
            let mut var = vars[name].shallow_clone();
            var.f_copy_(&value.to_device(var.device()))?;
        }
        Ok(())
    })?;
    Ok(Loaded { provenance: prov, table })
}
