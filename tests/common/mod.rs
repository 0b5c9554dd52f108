//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod http;

use std::path::{Path, PathBuf};

use edgeflow::engine::LoadOptions;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture_model(name: &str) -> PathBuf {
    repo().join("tests/fixtures/models").join(name)
}

/// The ONNX Runtime library: `ORT_DYLIB_PATH` (set by the Makefile) or the repo's `.ort/<arch>`.
pub fn ort_lib() -> PathBuf {
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo().join(".ort").join(std::env::consts::ARCH).join("libonnxruntime.so"),
    }
}

pub fn load_options() -> LoadOptions {
    LoadOptions { threads: Some(2), ort_lib: Some(ort_lib()), memory: None }
}

/// A writable copy of a model folder; the big weight files are hard links (read-only use).
pub fn copy_model(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(src).expect("read model dir") {
        let entry = entry.expect("dir entry");
        let to = dir.path().join(entry.file_name());
        std::fs::copy(entry.path(), &to).expect("copy model file");
    }
    dir
}
