//! The calibration artifact: every site's parameters, the weights as int8 codes, the other
//! parameters as float32, and the provenance, in one safetensors file (schema:
//! `docs/qparams-format.md`). Reading it back rebuilds the quantized model with no calibration
//! and no float checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use fqvit_models::{Architecture, QParamTable, Quantizable, SiteId, TensorClass};
use fqvit_ops::{BitType, Bits, PtfFactor, QParams};
use fqvit_tensor::{Axis, Quantizer};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::experiment::Experiment;

/// The format this version writes and the newest it reads. Version 2 tags the architecture
/// with its family (`"family": "vit"` or `"swin"`); version 1 files (ViT only) still read.
pub const FORMAT_VERSION: u32 = 2;
/// The safetensors metadata key holding [`Provenance`] as JSON.
pub const METADATA_KEY: &str = "fqvit";
/// The metadata key holding the model's integer program (`fqvit_program::Program`) as JSON,
/// for the integer engine; absent for a family without one (Swin). Readers of this crate
/// ignore it.
pub const PROGRAM_KEY: &str = fqvit_program::ARTIFACT_KEY;

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

/// One site as described in the metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteInfo {
    /// Our dotted name; its tensors are `<name>.scale`, `<name>.zero_point`, `<name>.ptf_factor`.
    pub name: String,
    /// The original implementation's module name.
    pub original: String,
    /// `weight`, `activation`, `layer-norm-input` or `softmax`.
    pub class: String,
    /// Code type, e.g. `uint8`.
    pub bit_type: String,
    /// Code width.
    pub bits: u8,
    /// Signed codes (weights).
    pub signed: bool,
    /// The observer that produced it.
    pub observer: String,
    /// `layer-wise` or `channel-wise`.
    pub granularity: String,
    /// Channels of the tensor (output channels for weights).
    pub channels: usize,
    /// Whether PTF factors are stored.
    pub ptf: bool,
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
    pub lis_bits: Option<u32>,
    /// Every site, in forward order.
    pub sites: Vec<SiteInfo>,
}

fn class_name(class: TensorClass) -> &'static str {
    class.as_str()
}

/// The tensor holding the int8 codes of a weight site.
pub fn weight_codes_name(site: &str) -> String {
    format!("{site}.weight_int8")
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
    if let Some(program) = model.program() {
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
                class: class_name(s.class).to_owned(),
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

/// Reads an artifact, checks it against `model`, and loads its parameters into `vs` (weights
/// dequantized from their int8 codes). Refuses, saying which, a truncated or corrupt file, a newer
/// format, another model or architecture, other weights, missing or extra sites or tensors, and
/// wrong shapes. Nothing is loaded unless every check passes.
pub fn read(
    path: &Path,
    model: &dyn Quantizable,
    vs: &VarStore,
    expect: Expect<'_>,
) -> Result<Loaded> {
    let bad = |reason: String| Error::Artifact { path: path.to_owned(), reason };
    let bytes =
        std::fs::read(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("truncated or corrupt (not a complete safetensors file: {e})")))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("truncated or corrupt (not a complete safetensors file: {e})")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| bad(format!("not an fqvit artifact: no `{METADATA_KEY}` metadata")))?;
    let mut version: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("corrupt metadata: {e}")))?;
    let format_version = version["format_version"].as_u64().unwrap_or(0);
    if format_version == 1
        && let Some(arch) = version["architecture"].as_object_mut()
    {
        arch.entry("family").or_insert_with(|| "vit".into());
    }
    if format_version > u64::from(FORMAT_VERSION) {
        return Err(bad(format!(
            "written in format version {format_version} by a newer fqvit; this version reads up to {FORMAT_VERSION}"
        )));
    }
    let prov: Provenance =
        serde_json::from_value(version).map_err(|e| bad(format!("corrupt metadata: {e}")))?;
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
    // Sites: the same set as the model, each with well-formed tensors.
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
    let mut consumed = std::collections::HashSet::new();
    for info in &prov.sites {
        let id = ours[info.name.as_str()];
        let site = sites.get(id);
        if info.channels != site.channels {
            return Err(bad(format!(
                "site {}: {} channels, the model has {}",
                info.name, info.channels, site.channels
            )));
        }
        let bits =
            Bits::try_from(info.bits).map_err(|e| bad(format!("site {}: {e}", info.name)))?;
        let get = |suffix: &str, dtype: Dtype| -> Result<Vec<u8>> {
            let key = format!("{}.{suffix}", info.name);
            let view = file
                .tensor(&key)
                .map_err(|_| bad(format!("site {}: tensor {key} is missing", info.name)))?;
            if view.dtype() != dtype || view.shape().len() != 1 {
                return Err(bad(format!(
                    "tensor {key}: expected a vector of {dtype:?}, got {:?} {:?}",
                    view.dtype(),
                    view.shape()
                )));
            }
            Ok(view.data().to_vec())
        };
        let scale: Vec<f32> = get("scale", Dtype::F32)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let zero_point: Vec<i32> = get("zero_point", Dtype::I32)?
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        consumed.extend([format!("{}.scale", info.name), format!("{}.zero_point", info.name)]);
        let n = scale.len();
        let channels_ok = n == 1 && site.class != TensorClass::Weight || n == site.channels;
        if !channels_ok || (zero_point.len() != 1 && zero_point.len() != n) {
            return Err(bad(format!(
                "site {}: {n} scales and {} zero points for {} channels",
                info.name,
                zero_point.len(),
                site.channels
            )));
        }
        let ptf = if info.ptf {
            consumed.insert(format!("{}.ptf_factor", info.name));
            let f = get("ptf_factor", Dtype::U8)?;
            if f.len() != site.channels {
                return Err(bad(format!(
                    "site {}: {} PTF factors for {} channels",
                    info.name,
                    f.len(),
                    site.channels
                )));
            }
            Some(
                f.into_iter()
                    .map(PtfFactor::try_from)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| bad(format!("site {}: {e}", info.name)))?,
            )
        } else {
            None
        };
        table.set(
            id,
            QParams { bit_type: BitType { bits, signed: info.signed }, scale, zero_point, ptf },
        );
    }
    // Parameters: every variable, as float32 or (weights of weight sites) int8 codes.
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
        let view = file.tensor(&key).map_err(|_| bad(format!("tensor {key} is missing")))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if view.dtype() != dtype || shape != var.size() {
            return Err(bad(format!(
                "tensor {key}: expected {dtype:?} {:?}, got {:?} {shape:?}",
                var.size(),
                view.dtype()
            )));
        }
        let kind = if dtype == Dtype::I8 { Kind::Int8 } else { Kind::Float };
        let mut value = Tensor::f_from_data_size(view.data(), &shape, kind)?.to_kind(Kind::Float);
        if let Some(id) = site_weight {
            let p = table.get(id).expect("weight sites have parameters");
            let mut bshape = vec![-1i64];
            bshape.resize(shape.len(), 1);
            value *= Tensor::from_slice(&p.scale).view(bshape.as_slice());
        }
        consumed.insert(key);
        values.push((name.clone(), value));
    }
    let unknown: Vec<String> =
        file.names().into_iter().filter(|n| !consumed.contains(*n)).map(str::to_owned).collect();
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
