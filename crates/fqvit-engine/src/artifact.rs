//! Reading the qparams artifact without libtorch: its metadata and tensors by name, each
//! checked for dtype and shape before use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// The metadata key of the provenance (`fqvit_calib::artifact::METADATA_KEY`).
pub(crate) const METADATA_KEY: &str = "fqvit";
pub(crate) use fqvit_program::ARTIFACT_KEY as PROGRAM_KEY;
/// The artifact format versions this engine reads (`docs/qparams-format.md`).
pub(crate) const FORMAT_VERSIONS: std::ops::RangeInclusive<u64> = 2..=2;

/// One tensor: shape and little-endian bytes.
#[derive(Debug)]
pub(crate) struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// An artifact held in memory, tensors by name.
#[derive(Debug)]
pub(crate) struct Artifact {
    pub(crate) path: PathBuf,
    pub(crate) metadata: HashMap<String, String>,
    tensors: HashMap<String, Raw>,
}

impl Artifact {
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Artifact { path: path.to_owned(), reason };
        let bytes =
            std::fs::read(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| {
            bad(format!("truncated or corrupt (not a complete safetensors file: {e})"))
        })?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("truncated or corrupt: {e}")))?;
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let raw = Raw {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                };
                (name, raw)
            })
            .collect();
        Ok(Artifact { path: path.to_owned(), metadata, tensors })
    }

    pub(crate) fn bad(&self, reason: String) -> Error {
        Error::Artifact { path: self.path.clone(), reason }
    }

    fn raw(&self, name: &str, dtype: Dtype) -> Result<&Raw> {
        let raw =
            self.tensors.get(name).ok_or_else(|| self.bad(format!("has no tensor {name}")))?;
        if raw.dtype != dtype {
            return Err(self.bad(format!("tensor {name} is {:?}, expected {dtype:?}", raw.dtype)));
        }
        Ok(raw)
    }

    /// The shape of `name`.
    pub(crate) fn shape(&self, name: &str) -> Result<&[usize]> {
        let raw =
            self.tensors.get(name).ok_or_else(|| self.bad(format!("has no tensor {name}")))?;
        Ok(&raw.shape)
    }

    fn check_shape(&self, name: &str, raw: &Raw, want: Option<&[usize]>) -> Result<()> {
        match want {
            Some(want) if raw.shape != want => {
                Err(self.bad(format!("tensor {name} has shape {:?}, expected {want:?}", raw.shape)))
            }
            _ => Ok(()),
        }
    }

    /// A float32 tensor, refusing NaN and infinities.
    pub(crate) fn f32(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<f32>> {
        let raw = self.raw(name, Dtype::F32)?;
        self.check_shape(name, raw, shape)?;
        let v: Vec<f32> = raw
            .bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(self.bad(format!("tensor {name} holds {} at index {i}", v[i])));
        }
        Ok(v)
    }

    pub(crate) fn i32(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<i32>> {
        let raw = self.raw(name, Dtype::I32)?;
        self.check_shape(name, raw, shape)?;
        Ok(raw
            .bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    pub(crate) fn i8(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<i8>> {
        let raw = self.raw(name, Dtype::I8)?;
        self.check_shape(name, raw, shape)?;
        Ok(raw.bytes.iter().map(|&b| b as i8).collect())
    }

    pub(crate) fn u8(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<u8>> {
        let raw = self.raw(name, Dtype::U8)?;
        self.check_shape(name, raw, shape)?;
        Ok(raw.bytes.clone())
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
