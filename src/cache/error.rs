//! Errors of the model cache, named after the step that failed.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the cache index in {path} is in use by another edgeflow process (the daemon?); stop it or use its cache read-only with `edgeflow cache path`")]
    Locked { path: PathBuf },

    #[error("the cache index in {path} could not be used")]
    Index {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },

    #[error("cache index entry {key}: {message}")]
    Record { key: String, message: String },

    #[error("{path}: expected sha256 {expected}, found {actual}")]
    DigestMismatch { path: PathBuf, expected: String, actual: String },

    #[error("{path}: expected {expected} bytes, found {actual}")]
    SizeMismatch { path: PathBuf, expected: u64, actual: u64 },

    #[error("model `{model}` version {version} is not in the cache")]
    UnknownVersion { model: String, version: String },

    #[error("{path} does not match the digest recorded at download ({count} damaged file(s) in all)")]
    Corrupt { path: String, count: usize },

    #[error("model `{model}` has no active version in the cache")]
    NoActive { model: String },

    #[error("the cache quota of {quota} bytes cannot hold {needed} more bytes ({used} in use by versions that must be kept)")]
    QuotaExceeded { quota: u64, needed: u64, used: u64 },

    #[error("no space left for the download: the file system holding {path} has {available} bytes free, and the download needs {needed} more plus {reserve} kept free for the cache index")]
    NoSpace { path: PathBuf, needed: u64, available: u64, reserve: u64 },
}

impl CacheError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CacheError {
        let path = path.into();
        move |source| CacheError::Io { action, path, source }
    }
}
