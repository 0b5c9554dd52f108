//! Errors of the inference engine, named after the step that failed.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("could not find the ONNX Runtime library (libonnxruntime.so); looked in: {}. In a source tree, `make build` fetches it (cross/fetch-ort.sh); elsewhere pass --ort-lib or set engine.ort_lib", format_tried(.tried))]
    RuntimeNotFound { tried: Vec<(String, String)> },

    #[error("could not load the ONNX Runtime library from {path}: {message}")]
    RuntimeLoad { path: String, message: String },

    #[error("model file {path} is missing")]
    MissingFile { path: PathBuf },

    #[error("could not read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is larger than {limit} bytes, more than any real model's file of its kind; refusing to parse it")]
    TooLarge { path: PathBuf, limit: u64 },

    #[error("{path}: field `{field}`: {message}")]
    Config { path: PathBuf, field: String, message: String },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("could not load the ONNX graph {path}: {message}")]
    Graph { path: PathBuf, message: String },

    #[error("the ONNX graph {path} does not match genai_config.json field `{field}`: {message}")]
    GraphMismatch { path: PathBuf, field: String, message: String },

    #[error("chat template: {message}")]
    Template { message: String },

    #[error("prompt of {prompt_tokens} tokens leaves no room to generate within the context length of {context_length}")]
    ContextOverflow { prompt_tokens: usize, context_length: usize },

    #[error("invalid generation parameter `{name}`: {message}")]
    InvalidParameter { name: &'static str, message: String },

    #[error("ONNX Runtime failed while {during}: {message}")]
    Inference { during: &'static str, message: String },

    #[error("{message}")]
    Memory { message: String },

    #[error("the model produced non-finite logits at step {step}")]
    NonFiniteLogits { step: usize },
}

impl EngineError {
    pub(crate) fn read(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            EngineError::MissingFile { path: path.to_path_buf() }
        } else {
            EngineError::Read { path: path.to_path_buf(), source }
        }
    }

    /// Reads `path` whole, refusing a file larger than `limit` bytes before it is parsed (an
    /// artifact's author must not be able to make the engine allocate gigabytes for JSON).
    pub(crate) fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, Self> {
        crate::util::read_capped(path, limit).map_err(|e| match e {
            crate::util::CappedRead::Io(e) => Self::read(path, e),
            crate::util::CappedRead::TooLarge { limit } => Self::TooLarge { path: path.to_path_buf(), limit },
        })
    }

    pub(crate) fn inference(during: &'static str) -> impl FnOnce(ort::Error) -> EngineError {
        move |e| EngineError::Inference { during, message: e.to_string() }
    }

    /// True when the request, not the model or the machine, is at fault.
    pub fn is_bad_request(&self) -> bool {
        matches!(self, EngineError::ContextOverflow { .. } | EngineError::InvalidParameter { .. } | EngineError::Template { .. })
    }
}

fn format_tried(tried: &[(String, String)]) -> String {
    tried.iter().map(|(place, why)| format!("{place} ({why})")).collect::<Vec<_>>().join("; ")
}
