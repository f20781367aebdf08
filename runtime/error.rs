//! One error type for the whole runtime. Every variant a user can trigger names the file,
//! tensor or field at fault, so `error: …` on the command line is enough to act on.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },

    #[error("{path}: tensor `{tensor}` has dtype {dtype}, supported are BF16, F16 and F32")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("{dir}: missing tensor `{tensor}`")]
    MissingTensor { dir: PathBuf, tensor: String },

    #[error("{dir}: unexpected tensor(s) not used by the model: {tensors}")]
    UnexpectedTensors { dir: PathBuf, tensors: String },

    #[error("{dir}: tensor `{tensor}` has shape {actual:?}, the config implies {expected:?}")]
    ShapeMismatch {
        dir: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("{path}: tensor `{tensor}` is listed in the index but {reason}")]
    BadIndex {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("{dir}: no tokenizer found (need tokenizer.json, or vocab.json + merges.txt)")]
    TokenizerMissing { dir: PathBuf },

    #[error("{path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("{source_name}: {reason}")]
    Image { source_name: String, reason: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("prompt of {tokens} tokens plus {new} new tokens exceeds the context of {capacity} positions")]
    ContextOverflow { tokens: usize, new: usize, capacity: usize },

    #[error("token id {id} is outside the model's vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("CUDA device requested but massv was built without CUDA kernels (nvcc was not found at build time)")]
    NoCudaKernels,

    /// A CUDA operation failed or was given shapes it cannot serve: `op` is the kernel,
    /// launcher or driver call (the same name as in cuda/ and its CPU twin).
    #[error("CUDA {op}: {reason}")]
    Cuda { op: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub(crate) fn config(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Config {
            path: path.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }
}
