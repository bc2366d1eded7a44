//! The engine's errors, each naming the file, tensor, site or op.

use std::path::PathBuf;

/// What went wrong loading or running a program.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The artifact could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The artifact.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The artifact is not one the engine can run; nothing was loaded.
    #[error("{path}: {reason}")]
    Artifact {
        /// The artifact.
        path: PathBuf,
        /// What is wrong, naming the tensor or key.
        reason: String,
    },
    /// A program op cannot be realised in integers with these parameters.
    #[error("op {op} ({kind}): {reason}")]
    Op {
        /// Its position in the program.
        op: usize,
        /// Its kind.
        kind: &'static str,
        /// What is wrong, naming the site or tensor.
        reason: String,
    },
    /// The requested GEMM kernel does not run on this CPU.
    #[error("GEMM kernel: {0}")]
    Kernel(String),
    /// The images handed to [`Engine::run`](crate::Engine::run) do not fit.
    #[error("input: {0}")]
    Input(String),
}

impl From<fqvit_artifact::Error> for Error {
    fn from(e: fqvit_artifact::Error) -> Self {
        match e {
            fqvit_artifact::Error::Io { path, source } => Error::Io { path, source },
            fqvit_artifact::Error::Invalid { path, reason } => Error::Artifact { path, reason },
        }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
