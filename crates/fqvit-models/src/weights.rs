//! Finding weights files and loading them strictly into a `VarStore`.
//!
//! tch's `VarStore::load` ignores extra keys and adopts the file's dtype; the original loads
//! with `strict=False`. [`load_strict`] instead refuses any file that does not fit exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;

use crate::ModelName;
use crate::error::{Error, Result};
use crate::registry::HubCheckpoint;

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

/// Whether resolving weights may download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// Download from the hub what no local file or cache has.
    Online,
    /// Never touch the network: local files and the HF cache only.
    Offline,
}

/// The Hugging Face hub cache folder (the one holding `models--<owner>--<name>/`), laid out as
/// Python's `huggingface_hub` lays it out, so both share one cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubCache {
    root: PathBuf,
}

impl HubCache {
    /// The cache at `root` (the `hub` folder itself).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The cache `huggingface_hub` uses: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else
    /// `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let root =
            var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")).unwrap_or_else(|| {
                var("HF_HOME")
                    .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("huggingface")))
                    .unwrap_or_else(|| {
                        var("HOME").unwrap_or_else(|| PathBuf::from(".")).join(".cache/huggingface")
                    })
                    .join("hub")
            });
        Self { root }
    }

    /// The `hub` folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the pinned file lives in the cache: `models--<owner>--<name>/snapshots/<commit>/<file>`.
    pub fn snapshot_path(&self, ck: &HubCheckpoint) -> PathBuf {
        self.root
            .join(format!("models--{}", ck.repo.replace('/', "--")))
            .join("snapshots")
            .join(ck.revision)
            .join(ck.file)
    }

    /// The cached file, if present. The revision is a commit, so no `refs/` file is read
    /// (Python writes none for a commit; hf-hub 0.4's own lookup insists on one, so it is not
    /// used). `is_file` follows the snapshot's link, so a link to a missing blob is a miss.
    pub fn cached(&self, ck: &HubCheckpoint) -> Option<PathBuf> {
        let path = self.snapshot_path(ck);
        path.is_file().then_some(path)
    }
}

/// Resolves a weights file for `model`: the given file; else `<dir>/<timm name>/model.safetensors`;
/// else the pinned checkpoint in the HF cache; else, online, downloads it there (checking its
/// sha256). Offline, a miss says every place looked at and how to fill one.
pub fn resolve(
    model: ModelName,
    source: &WeightsSource,
    network: Network,
    cache: &HubCache,
) -> Result<PathBuf> {
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
    if let Some(path) = local.as_ref().filter(|p| p.is_file()) {
        return Ok(path.clone());
    }
    let ck = model.hub();
    if let Some(path) = cache.cached(&ck) {
        return Ok(path);
    }
    let looked = format!(
        "{}{} is not in the Hugging Face cache",
        local.as_ref().map(|p| format!("{} does not exist; ", p.display())).unwrap_or_default(),
        cache.snapshot_path(&ck).display(),
    );
    let remedy = format!(
        "download https://huggingface.co/{}/resolve/{}/{} and pass --weights PATH, or put it at <dir>/{}/model.safetensors and pass --weights-dir <dir>",
        ck.repo,
        ck.revision,
        ck.file,
        model.weights_folder()
    );
    match network {
        Network::Offline => Err(Error::WeightsNotFound {
            model: model.to_string(),
            reason: format!(
                "{looked}; offline, so nothing was downloaded: run `cargo xtask bench-table fetch` with network access, or {remedy}"
            ),
        }),
        Network::Online => {
            tracing::info!(repo = ck.repo, revision = ck.revision, "downloading weights");
            download(&ck, cache).map_err(|reason| Error::WeightsNotFound {
                model: model.to_string(),
                reason: format!("{looked}; downloading it failed ({reason}); {remedy}"),
            })
        }
    }
}

/// Downloads a pinned checkpoint into `cache` (hf-hub resumes a partial `.part` blob and
/// retries with backoff) and checks its sha256 against the registry.
fn download(ck: &HubCheckpoint, cache: &HubCache) -> std::result::Result<PathBuf, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(cache.root().to_owned())
        .with_retries(3)
        .with_progress(true)
        .build()
        .map_err(|e| e.to_string())?;
    let repo = hf_hub::Repo::with_revision(
        ck.repo.to_owned(),
        hf_hub::RepoType::Model,
        ck.revision.to_owned(),
    );
    let path = api.repo(repo).download(ck.file).map_err(|e| e.to_string())?;
    let got = sha256_file(&path).map_err(|e| e.to_string())?;
    if got != ck.sha256 {
        // Nothing unverified stays in the cache, where an offline run would take it.
        let blob = path.canonicalize();
        let _ = std::fs::remove_file(&path);
        if let Ok(blob) = blob {
            let _ = std::fs::remove_file(blob);
        }
        return Err(format!(
            "the download has sha256 {got}, but {}@{} publishes {}; it was removed from the cache",
            ck.repo, ck.revision, ck.sha256
        ));
    }
    Ok(path)
}

/// The sha256 of a file, hex, read in pieces.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let io = |source| Error::Io { path: path.to_owned(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The count of non-finite little-endian f32 values in `bytes` and the index of the first.
fn non_finite(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut found = None::<(usize, usize)>;
    for (i, c) in bytes.chunks_exact(4).enumerate() {
        // Exponent all ones: infinity or NaN, whatever the sign and mantissa.
        if u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000 {
            found = Some(found.map_or((1, i), |(n, first)| (n + 1, first)));
        }
    }
    found
}

/// Loads a safetensors file into every variable of `vs`, strictly.
///
/// Fails, listing every offending name, when the file lacks a variable, has a tensor the model
/// has no variable for, or a tensor's shape or dtype differs; fails naming the tensor when one
/// holds NaN or infinite values. Nothing is copied unless everything fits.
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
        if let Some((count, first)) = non_finite(view.data()) {
            return Err(Error::NonFinite { path: path.to_owned(), tensor: name, count, first });
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
