//! The error type of `fqvit-models`.

use std::path::PathBuf;

/// What can go wrong building, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A weights file is not valid safetensors.
    #[error("{path} is not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A weights file does not fit the model exactly.
    #[error("{path} does not fit the model:{}", describe_mismatch(missing, unexpected, mismatched))]
    WeightsMismatch {
        /// The file.
        path: PathBuf,
        /// Model tensors the file lacks.
        missing: Vec<String>,
        /// File tensors the model has no place for.
        unexpected: Vec<String>,
        /// Tensors whose shape or dtype differs: `name: expected …, got …`.
        mismatched: Vec<String>,
    },
    /// A weights tensor holds NaN or infinite values.
    #[error(
        "{path}: tensor `{tensor}` holds {count} NaN or infinite values (first at flat index {first}); the checkpoint is corrupt"
    )]
    NonFinite {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// How many elements are not finite.
        count: usize,
        /// The flat index of the first one.
        first: usize,
    },
    /// No weights for a model were found and none could be downloaded.
    #[error("no weights for {model}: {reason}")]
    WeightsNotFound {
        /// The model name.
        model: String,
        /// Where we looked and what failed.
        reason: String,
    },
    /// An original checkpoint could not be converted to timm's layout.
    #[error("converting {path}: {reason}")]
    Convert {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An unknown model name.
    #[error("unknown model `{0}`; known models: {known}", known = crate::ModelName::ALL.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "))]
    UnknownModel(String),
    /// Quantization parameters missing or unusable for a site.
    #[error("quantization site `{site}`: {reason}")]
    Site {
        /// The site's dotted name.
        site: String,
        /// What is wrong.
        reason: String,
    },
    /// A libtorch error.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

fn describe_mismatch(missing: &[String], unexpected: &[String], mismatched: &[String]) -> String {
    let mut s = String::new();
    for (what, names) in
        [("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)]
    {
        if !names.is_empty() {
            let shown: Vec<&str> = names.iter().take(20).map(String::as_str).collect();
            let more = if names.len() > 20 {
                format!(" (and {} more)", names.len() - 20)
            } else {
                String::new()
            };
            s.push_str(&format!("\n  {} {what}: {}{more}", names.len(), shown.join(", ")));
        }
    }
    s
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
