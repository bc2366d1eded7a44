//! The error type of `fqvit-calib`.

use std::path::PathBuf;

/// What can go wrong reading data, calibrating, evaluating or handling artifacts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An image could not be decoded.
    #[error("cannot decode image {path}: {reason}")]
    BadImage {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A class folder is not an ImageNet-1k wnid.
    #[error("{path}: folder `{wnid}` is not one of the 1000 ImageNet-1k classes")]
    UnknownClass {
        /// The folder.
        path: PathBuf,
        /// Its name.
        wnid: String,
    },
    /// A split has no images.
    #[error("no images under {0}")]
    Empty(PathBuf),
    /// A model error.
    #[error(transparent)]
    Model(#[from] fqvit_models::Error),
    /// A libtorch error.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    /// A quantization-parameters artifact is unusable.
    #[error("{path}: {reason}")]
    Artifact {
        /// The file.
        path: PathBuf,
        /// Which check failed.
        reason: String,
    },
    /// An observer could not use a site's tensor (NaN or infinite activations, an empty tensor).
    #[error("calibration failed at site {site}: {reason}")]
    Observer {
        /// The site's dotted name.
        site: String,
        /// What the observer said.
        reason: String,
    },
    /// `--bias-correction` could not correct a site's bias (a non-finite correction).
    #[error("bias correction failed at site {site}: {reason}")]
    BiasCorrection {
        /// The site's dotted name.
        site: String,
        /// What failed.
        reason: String,
    },
    /// `weight-rounding = "gptq"` could not round a linear layer's weights.
    #[error("gptq weight rounding failed at site {site}: {reason}")]
    WeightRounding {
        /// The weight site's dotted name.
        site: String,
        /// What failed.
        reason: String,
    },
    /// `reparam-norm-out` could not reparameterize a LayerNorm output.
    #[error("reparam-norm-out at site {site}: {reason}")]
    Reparam {
        /// The LayerNorm's output site.
        site: String,
        /// What failed.
        reason: String,
    },
    /// The integer engine refused an artifact or its input.
    #[error("integer engine: {0}")]
    Engine(fqvit_engine::Error),
    /// The calibration settings are inconsistent.
    #[error("invalid calibration settings: {0}")]
    Settings(String),
}

impl From<fqvit_artifact::Error> for Error {
    fn from(e: fqvit_artifact::Error) -> Self {
        match e {
            fqvit_artifact::Error::Io { path, source } => Error::Io { path, source },
            fqvit_artifact::Error::Invalid { path, reason } => Error::Artifact { path, reason },
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
