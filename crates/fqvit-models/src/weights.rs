//! Finding weights files and loading them strictly into a `VarStore`.
//!
//! tch's `VarStore::load` ignores extra keys and adopts the file's dtype; the original loads
//! with `strict=False`. [`load_strict`] instead refuses any file that does not fit exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;

use crate::ModelName;
use crate::error::{Error, Result};

/// Where a model's weights come from.
#[derive(Clone, Debug)]
pub enum WeightsSource {
    /// This safetensors file.
    File(PathBuf),
    /// `<dir>/<timm name>/model.safetensors`, else the hub.
    Dir(PathBuf),
    /// The Hugging Face hub only (cached in the standard HF cache).
    Hub,
}

/// Resolves a weights file for `model`, downloading it from the hub when no local file has it.
pub fn resolve(model: ModelName, source: &WeightsSource) -> Result<PathBuf> {
    let local = match source {
        WeightsSource::File(path) => {
            return if path.is_file() {
                Ok(path.clone())
            } else {
                Err(Error::WeightsNotFound {
                    model: model.to_string(),
                    reason: format!("{} does not exist", path.display()),
                })
            };
        }
        WeightsSource::Dir(dir) => Some(dir.join(model.weights_folder()).join("model.safetensors")),
        WeightsSource::Hub => None,
    };
    if let Some(path) = &local {
        if path.is_file() {
            return Ok(path.clone());
        }
        tracing::info!(path = %path.display(), "no local weights, trying the hub");
    }
    download(model).map_err(|reason| Error::WeightsNotFound {
        model: model.to_string(),
        reason: format!(
            "{}downloading {} from the Hugging Face hub failed ({reason}); download model.safetensors from https://huggingface.co/{} and pass --weights PATH, or put it at <dir>/{}/model.safetensors and pass --weights-dir <dir>",
            local.map(|p| format!("{} does not exist; ", p.display())).unwrap_or_default(),
            model.hub_repo(),
            model.hub_repo(),
            model.weights_folder(),
        ),
    })
}

fn download(model: ModelName) -> std::result::Result<PathBuf, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| e.to_string())?;
    api.model(model.hub_repo().to_owned()).get("model.safetensors").map_err(|e| e.to_string())
}

/// Loads a safetensors file into every variable of `vs`, strictly.
///
/// Fails, listing every offending name, when the file lacks a variable, has a tensor the model
/// has no variable for, or a tensor's shape or dtype differs. Nothing is copied unless everything
/// fits.
pub fn load_strict(vs: &VarStore, path: &Path) -> Result<()> {
    let bytes =
        std::fs::read(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Safetensors { path: path.to_owned(), message: e.to_string() })?;
    let mut vars: BTreeMap<String, tch::Tensor> = vs.variables().into_iter().collect();
    let mut tensors = BTreeMap::new();
    let (mut unexpected, mut mismatched) = (Vec::new(), Vec::new());
    for (name, view) in file.tensors() {
        let Some(var) = vars.get(&name) else {
            unexpected.push(name);
            continue;
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let dtype_ok = view.dtype() == safetensors::Dtype::F32 && var.kind() == tch::Kind::Float;
        if shape != var.size() || !dtype_ok {
            mismatched.push(format!(
                "{name}: expected {:?} {:?}, got {shape:?} {:?}",
                var.size(),
                var.kind(),
                view.dtype()
            ));
            continue;
        }
        tensors.insert(name, view);
    }
    let missing: Vec<String> = vars
        .keys()
        .filter(|k| {
            !tensors.contains_key(*k) && !mismatched.iter().any(|m| m.starts_with(&format!("{k}:")))
        })
        .cloned()
        .collect();
    if !(missing.is_empty() && unexpected.is_empty() && mismatched.is_empty()) {
        unexpected.sort();
        return Err(Error::WeightsMismatch {
            path: path.to_owned(),
            missing,
            unexpected,
            mismatched,
        });
    }
    tch::no_grad(|| -> Result<()> {
        for (name, view) in &tensors {
            let var = vars.get_mut(name).expect("checked above");
            let src = tch::Tensor::f_from_data_size(view.data(), &var.size(), tch::Kind::Float)?;
            var.f_copy_(&src.f_to_device(var.device())?)?;
        }
        Ok(())
    })?;
    tracing::debug!(path = %path.display(), tensors = tensors.len(), "weights loaded");
    Ok(())
}
