//! # fqvit-artifact: the qparams artifact, read and checked once
//!
//! `fqvit-cli quantize` writes one safetensors file per calibration (schema:
//! `docs/qparams-format.md`): every site's scales, zero points and PTF factors, the weights as
//! integer codes, the other parameters as float32, the provenance as JSON and the integer
//! program. [`Artifact::read`] is the one reader of it, for the simulation
//! (`fqvit_calib::artifact::read`, which then matches it against a model) and for the engine
//! (`fqvit-engine`, which then compiles its program). It checks every field before anything is
//! built, and refuses, naming the file and the field, site or tensor:
//!
//! - a truncated or corrupt file, a dtype other than F32, I32, I8, U8, a format newer than
//!   [`FORMAT_VERSION`], metadata that is not the provenance's JSON;
//! - Log-Int-Softmax bits outside [`fqvit_ops::softmax::BITS`], or program attention ops
//!   whose width differs from the provenance's;
//! - per site: a repeated name, bits outside 2..=8 (2..=15 for the residual stream, the
//!   LayerNorm inputs, whose PTF factors stay within `15 − bits`), a bit type that disagrees
//!   with its width,
//!   signedness or class (weights are signed, activations unsigned), scales that are not
//!   finite and positive or not one per channel where a site needs that, zero points outside
//!   the code range, PTF factors out of range or whose scales are not `base · 2^α` with one
//!   zero point, and a missing or stray site tensor;
//! - weight codes outside the site's code range or not one row per channel;
//! - a float32 tensor holding NaN or an infinity;
//! - a program that does not parse or validate.
//!
//! No libtorch: the engine reads it without one.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use fqvit_ops::softmax::{ExpShift, LisBits};
use fqvit_ops::{BitType, Bits, PtfFactor, QParams, TensorClass};
use fqvit_program::{Op, Program};
pub use safetensors::Dtype;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

/// The format this version writes and the newest it reads. Version 2 tags the architecture
/// with its family (`"family": "vit"` or `"swin"`); version 1 files (ViT only) still read.
pub const FORMAT_VERSION: u32 = 2;
/// The safetensors metadata key holding the provenance as JSON.
pub const METADATA_KEY: &str = "fqvit";
/// The metadata key holding the model's integer program as JSON.
pub const PROGRAM_KEY: &str = fqvit_program::ARTIFACT_KEY;

/// The tensor holding the integer codes of a weight site.
pub fn weight_codes_name(site: &str) -> String {
    format!("{site}.weight_int8")
}

/// The artifact could not be read, or a field is not what it must be. Either way nothing was
/// built from it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The artifact.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A check failed.
    #[error("{path}: {reason}")]
    Invalid {
        /// The artifact.
        path: PathBuf,
        /// What is wrong, naming the key, site or tensor.
        reason: String,
    },
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One site as the provenance describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteInfo {
    /// Our dotted name; its tensors are `<name>.scale`, `<name>.zero_point`, `<name>.ptf_factor`.
    pub name: String,
    /// The original implementation's module name.
    pub original: String,
    /// What it quantizes.
    pub class: TensorClass,
    /// Code type, e.g. `uint8` (the name of `bits` and `signed`).
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

/// The provenance fields every reader needs; the rest stays JSON for the crate that owns its
/// types ([`Artifact::provenance`]).
#[derive(Deserialize)]
struct Header {
    model: String,
    lis_bits: Option<LisBits>,
    #[serde(default)]
    lis_exp_shift: ExpShift,
    sites: Vec<SiteInfo>,
}

/// One tensor of the file: its bytes are `range` of the file, held once.
#[derive(Debug)]
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

/// A tensor as stored: dtype, shape and little-endian bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorData<'a> {
    /// Its dtype (F32, I32, I8 or U8).
    pub dtype: Dtype,
    /// Its shape.
    pub shape: &'a [usize],
    /// Its bytes, little-endian, row-major.
    pub bytes: &'a [u8],
}

/// A read artifact whose every field passed the checks in the crate docs.
#[derive(Debug)]
pub struct Artifact {
    path: PathBuf,
    format_version: u32,
    provenance: serde_json::Value,
    model: String,
    lis_bits: Option<LisBits>,
    lis_exp_shift: ExpShift,
    sites: Vec<SiteInfo>,
    params: HashMap<String, QParams>,
    program: Option<Program>,
    tensors: HashMap<String, Raw>,
    /// The whole file.
    file: Vec<u8>,
}

impl Artifact {
    /// Reads and checks `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
        Artifact::from_bytes(path, bytes)
    }

    /// Checks the bytes of an artifact; `path` names it in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let bad = |reason: String| Error::Invalid { path: path.to_owned(), reason };
        let corrupt =
            |e| bad(format!("truncated or corrupt (not a complete safetensors file: {e})"));
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
        let file = SafeTensors::deserialize(&bytes).map_err(corrupt)?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let json = metadata
            .get(METADATA_KEY)
            .ok_or_else(|| bad(format!("not an fqvit artifact: no `{METADATA_KEY}` metadata")))?;
        let mut provenance: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| bad(format!("metadata `{METADATA_KEY}`: {e}")))?;
        let format_version = provenance["format_version"]
            .as_u64()
            .ok_or_else(|| bad(format!("metadata `{METADATA_KEY}` has no format_version")))?;
        if format_version > u64::from(FORMAT_VERSION) {
            return Err(bad(format!(
                "written in format version {format_version} by a newer fqvit; this version reads \
                 up to {FORMAT_VERSION}"
            )));
        }
        if format_version == 0 {
            return Err(bad("format_version 0: versions start at 1".into()));
        }
        if format_version == 1
            && let Some(arch) = provenance["architecture"].as_object_mut()
        {
            arch.entry("family").or_insert_with(|| "vit".into());
        }
        let head: Header = serde_json::from_value(provenance.clone())
            .map_err(|e| bad(format!("metadata `{METADATA_KEY}`: {e}")))?;

        let mut tensors = HashMap::new();
        for (name, view) in file.tensors() {
            let dtype = view.dtype();
            if !matches!(dtype, Dtype::F32 | Dtype::I32 | Dtype::I8 | Dtype::U8) {
                return Err(bad(format!(
                    "tensor {name} is {dtype:?}; artifacts hold F32, I32, I8 and U8"
                )));
            }
            // The view borrows `bytes`: its offset there locates it without a copy.
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            let range = start..start + view.data().len();
            let raw = Raw { dtype, shape: view.shape().to_vec(), range };
            tensors.insert(name, raw);
        }
        let mut art = Artifact {
            path: path.to_owned(),
            format_version: format_version as u32,
            provenance,
            model: head.model,
            lis_bits: head.lis_bits,
            lis_exp_shift: head.lis_exp_shift,
            sites: head.sites,
            params: HashMap::new(),
            program: None,
            tensors,
            file: bytes,
        };
        art.check_floats()?;
        if art.lis_bits.is_none() && art.lis_exp_shift != ExpShift::NONE {
            return Err(art.bad(format!(
                "lis_exp_shift {} without Log-Int-Softmax (lis_bits is null)",
                art.lis_exp_shift
            )));
        }
        let mut seen = HashSet::new();
        for info in &art.sites {
            if !seen.insert(info.name.as_str()) {
                return Err(art.bad(format!("site {} is listed twice", info.name)));
            }
        }
        let params = art
            .sites
            .iter()
            .map(|info| Ok((info.name.clone(), art.site_params(info)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        art.params = params;
        if let Some(json) = metadata.get(PROGRAM_KEY) {
            let mut program: Program = serde_json::from_str(json)
                .map_err(|e| art.bad(format!("metadata `{PROGRAM_KEY}`: {e}")))?;
            program.upgrade(art.lis_bits);
            program.validate().map_err(|e| art.bad(format!("program: {e}")))?;
            for (i, op) in program.ops.iter().enumerate() {
                if let Op::Attention { lis_bits, .. } | Op::WindowAttention { lis_bits, .. } = op
                    && *lis_bits != art.lis_bits
                {
                    let width =
                        |b: Option<LisBits>| b.map_or("off".into(), |b| format!("{b} bits"));
                    return Err(art.bad(format!(
                        "program op {i}: Log-Int-Softmax {}, the provenance's lis_bits {}",
                        width(*lis_bits),
                        width(art.lis_bits)
                    )));
                }
            }
            art.program = Some(program);
        }
        Ok(art)
    }

    /// An [`Error::Invalid`] naming this file.
    pub fn bad(&self, reason: String) -> Error {
        Error::Invalid { path: self.path.clone(), reason }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version it was written in.
    pub fn format_version(&self) -> u32 {
        self.format_version
    }

    /// The provenance JSON (a version-1 architecture already tagged `"family": "vit"`).
    pub fn provenance(&self) -> &serde_json::Value {
        &self.provenance
    }

    /// The model name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Log2 code bits of Log-Int-Softmax, when it was on.
    pub fn lis_bits(&self) -> Option<LisBits> {
        self.lis_bits
    }

    /// How much finer than its input's scale Log-Int-Softmax's exponential runs (0 in files
    /// that do not say).
    pub fn lis_exp_shift(&self) -> ExpShift {
        self.lis_exp_shift
    }

    /// Every site, in forward order.
    pub fn sites(&self) -> &[SiteInfo] {
        &self.sites
    }

    /// A site's parameters.
    pub fn params(&self, site: &str) -> Option<&QParams> {
        self.params.get(site)
    }

    /// The integer program, when the writer stored one.
    pub fn program(&self) -> Option<&Program> {
        self.program.as_ref()
    }

    /// Every tensor's name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The names of a site's own tensors (scale, zero point, PTF factors, weight codes).
    pub fn site_tensors(&self, info: &SiteInfo) -> Vec<String> {
        let mut names = vec![format!("{}.scale", info.name), format!("{}.zero_point", info.name)];
        if info.ptf {
            names.push(format!("{}.ptf_factor", info.name));
        }
        if info.class == TensorClass::Weight {
            names.push(weight_codes_name(&info.name));
        }
        names
    }

    /// A tensor as stored.
    pub fn tensor(&self, name: &str) -> Option<TensorData<'_>> {
        self.tensors.get(name).map(|r| TensorData {
            dtype: r.dtype,
            shape: &r.shape,
            bytes: &self.file[r.range.clone()],
        })
    }

    /// Whether the file holds `name`.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape of `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.raw(name)?.shape)
    }

    fn data(&self, raw: &Raw) -> &[u8] {
        &self.file[raw.range.clone()]
    }

    fn raw(&self, name: &str) -> Result<&Raw> {
        self.tensors.get(name).ok_or_else(|| self.bad(format!("has no tensor {name}")))
    }

    fn typed(&self, name: &str, dtype: Dtype, shape: Option<&[usize]>) -> Result<&Raw> {
        let raw = self.raw(name)?;
        if raw.dtype != dtype {
            return Err(self.bad(format!("tensor {name} is {:?}, expected {dtype:?}", raw.dtype)));
        }
        if let Some(want) = shape
            && raw.shape != want
        {
            return Err(
                self.bad(format!("tensor {name} has shape {:?}, expected {want:?}", raw.shape))
            );
        }
        Ok(raw)
    }

    /// A float32 tensor (finite: checked at read), of `shape` when given.
    pub fn f32(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<f32>> {
        let raw = self.typed(name, Dtype::F32, shape)?;
        Ok(self
            .data(raw)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// An int32 tensor, of `shape` when given.
    pub fn i32(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<i32>> {
        let raw = self.typed(name, Dtype::I32, shape)?;
        Ok(self
            .data(raw)
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// An int8 tensor, of `shape` when given.
    pub fn i8(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<i8>> {
        let raw = self.typed(name, Dtype::I8, shape)?;
        Ok(self.data(raw).iter().map(|&b| b as i8).collect())
    }

    /// A uint8 tensor, of `shape` when given.
    pub fn u8(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<u8>> {
        Ok(self.data(self.typed(name, Dtype::U8, shape)?).to_vec())
    }

    /// Refuses NaN and infinities in any float32 tensor.
    fn check_floats(&self) -> Result<()> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            let raw = &self.tensors[name];
            if raw.dtype != Dtype::F32 {
                continue;
            }
            let bad = self
                .data(raw)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .enumerate()
                .find(|(_, x)| !x.is_finite());
            if let Some((i, x)) = bad {
                return Err(self.bad(format!("tensor {name} holds {x} at index {i}")));
            }
        }
        Ok(())
    }

    /// One site's parameters, every field checked.
    fn site_params(&self, info: &SiteInfo) -> Result<QParams> {
        let site = &info.name;
        let err = |reason: String| self.bad(format!("site {site}: {reason}"));
        let bits = Bits::try_from(info.bits).map_err(|e| err(e.to_string()))?;
        let bit_type = BitType { bits, signed: info.signed };
        // Only the residual stream, the LayerNorm inputs, is stored wider than bytes.
        if !bits.fits_byte() && info.class != TensorClass::LayerNormInput {
            return Err(err(format!(
                "{} bits on a site of class {}: only layer-norm-input sites (the residual \
                 stream) are wider than {}",
                bits.get(),
                info.class.as_str(),
                Bits::BYTE.get()
            )));
        }
        if info.bit_type != bit_type.name() {
            return Err(err(format!(
                "bit_type {} disagrees with bits {} and signed {}",
                info.bit_type, info.bits, info.signed
            )));
        }
        if info.signed != (info.class == TensorClass::Weight) {
            return Err(err(format!(
                "a {} site with {} codes (weights are signed, activations unsigned)",
                info.class.as_str(),
                bit_type.name()
            )));
        }
        let c = info.channels;
        if c == 0 {
            return Err(err("0 channels".into()));
        }
        let scale = self.f32(&format!("{site}.scale"), None)?;
        let zero_point = self.i32(&format!("{site}.zero_point"), None)?;
        let n = scale.len();
        let fits = match info.class {
            TensorClass::Weight => n == c,
            _ => n == 1 || n == c,
        };
        if !fits || (zero_point.len() != 1 && zero_point.len() != n) {
            return Err(err(format!(
                "{n} scales and {} zero points for {c} channels",
                zero_point.len()
            )));
        }
        let granularity = if n == 1 { "layer-wise" } else { "channel-wise" };
        if info.granularity != granularity {
            return Err(err(format!("granularity {} with {n} scales", info.granularity)));
        }
        if let Some(s) = scale.iter().find(|s| **s <= 0.0) {
            return Err(err(format!("scale {s} is not positive")));
        }
        let range = bit_type.lower()..=bit_type.upper();
        if let Some(z) = zero_point.iter().find(|z| !range.contains(*z)) {
            return Err(err(format!("zero point {z} is outside the {} codes {range:?}", bit_type)));
        }
        let factors = format!("{site}.ptf_factor");
        let ptf = match (info.ptf, self.has(&factors)) {
            (false, true) => return Err(err(format!("tensor {factors} on a site without PTF"))),
            (false, false) => None,
            (true, _) => {
                let f = self.u8(&factors, Some(&[c]))?;
                let f = f
                    .into_iter()
                    .map(PtfFactor::try_from)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| err(e.to_string()))?;
                if let Some(a) = f.iter().find(|a| a.cap(bits) != **a) {
                    return Err(err(format!(
                        "PTF factor {} takes {}-bit codes beyond 2^15 (at most {})",
                        a.get(),
                        bits.get(),
                        a.cap(bits).get()
                    )));
                }
                if n != c || zero_point.len() != 1 {
                    return Err(err(format!(
                        "PTF needs one scale per channel and one zero point, not {n} and {}",
                        zero_point.len()
                    )));
                }
                // Exact in float32: multiplying or dividing by a power of two.
                let base = scale[0] / f[0].multiplier() as f32;
                if let Some(j) = (0..c).find(|&j| scale[j] != base * f[j].multiplier() as f32) {
                    return Err(err(format!("scale {j} is not base · 2^α")));
                }
                Some(f)
            }
        };
        if info.class == TensorClass::Weight {
            let name = weight_codes_name(site);
            let codes = self.i8(&name, None)?;
            let shape = &self.raw(&name)?.shape;
            if shape.first() != Some(&c) {
                return Err(
                    self.bad(format!("tensor {name} has shape {shape:?}: {c} rows expected"))
                );
            }
            if let Some(q) = codes.iter().find(|q| !range.contains(&i32::from(**q))) {
                return Err(self.bad(format!(
                    "tensor {name} holds code {q}, outside the {bit_type} codes {range:?}"
                )));
            }
        }
        Ok(QParams { bit_type, scale, zero_point, ptf })
    }
}

#[cfg(test)]
mod tests;
