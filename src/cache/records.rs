//! The cache's records: what the index persists per version and per model
//! ([`VersionRecord`], [`FileRecord`], [`State`], [`ModelRecord`]), and what the cache
//! reports back ([`Corruption`], [`GcReport`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One file of a version: its path in the model folder, size and sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Where a version stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Every byte verified; not yet smoke-tested.
    Fetched,
    /// Smoke-tested; may be (or has been) active.
    Good,
    /// Refused (smoke test failed); its files are released, its record kept so the same
    /// version is not fetched again and again.
    Bad { reason: String },
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Fetched => "fetched",
            State::Good => "good",
            State::Bad { .. } => "bad",
        }
    }
}

/// A cached model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub model: String,
    pub version: String,
    /// The registry's `source` of this version; a version number reused for other content
    /// has another source.
    pub source: String,
    pub run_id: Option<String>,
    /// `onnx` or `python_function`.
    pub flavor: String,
    pub files: Vec<FileRecord>,
    #[serde(flatten)]
    pub state: State,
    /// Folder name under `models/<slug>/` (empty when the files were released).
    pub dir: String,
    /// Unix seconds.
    pub fetched_at: u64,
    pub activated_at: Option<u64>,
    /// Smoke tests of this version that started and never ended: the process died during
    /// them (out of memory, a crash in the model's graph or chat template, a power cut).
    #[serde(default)]
    pub unfinished_smoke_tests: u32,
}

impl VersionRecord {
    pub fn size(&self) -> u64 {
        self.files.iter().fold(0u64, |sum, f| sum.saturating_add(f.size))
    }

    /// One digest for the whole version, `sha256:<hex>` over each file's path and sha256
    /// in path order: equal digests mean byte-identical folders. Reported to clients
    /// (`/v1/models`) and to the fleet.
    pub fn digest(&self) -> String {
        let mut files: Vec<&FileRecord> = self.files.iter().collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let mut h = Sha256::new();
        for f in files {
            h.update(f.path.as_bytes());
            h.update([0]);
            h.update(f.sha256.as_bytes());
            h.update([b'\n']);
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    }
}

/// Per-model state: what is active, and what was before (for rollback).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub model: String,
    pub active: Option<String>,
    /// Versions activated, oldest first, the active one last.
    pub history: Vec<String>,
    /// A version a `pin` command fixed; polls serve it instead of the stage or alias
    /// until `unpin`. Kept here so a restart remembers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
}

/// A file whose bytes no longer match the digest recorded at download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Corruption {
    pub path: String,
    pub expected: String,
    /// `None` when the file is missing.
    pub actual: Option<String>,
}

/// What a sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub versions_removed: Vec<String>,
    pub blobs_removed: usize,
    pub temp_removed: usize,
    pub bytes_freed: u64,
}

impl GcReport {
    /// Adds another sweep's counts to this one.
    pub fn add(&mut self, other: &GcReport) {
        self.versions_removed.extend(other.versions_removed.iter().cloned());
        self.blobs_removed += other.blobs_removed;
        self.temp_removed += other.temp_removed;
        self.bytes_freed += other.bytes_freed;
    }
}
