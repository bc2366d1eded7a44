//! The engine's errors, each naming the file, tensor, site or op.

/// What went wrong loading or running a program.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The artifact could not be read, failed a check of its reader, or is not one the engine
    /// can run; nothing was loaded.
    #[error(transparent)]
    Artifact(#[from] fqvit_artifact::Error),
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

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
