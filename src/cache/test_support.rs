//! What the cache's unit tests share: settings for a cache in a temp folder, and a version
//! put in the way a pull does it.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::records::{FileRecord, State, VersionRecord};
use super::settings::CacheSettings;
use super::store::Store;
use crate::util::unix_now;

pub(super) fn settings(dir: &Path) -> CacheSettings {
    CacheSettings { dir: dir.to_path_buf(), keep_versions: 2, pinned: vec![], quota: None, partial_max_age: Duration::from_secs(3600), verify_on_load: true, smoke_test_tokens: 4 }
}

/// Puts `files` in as a version, the way a pull does: temp file → blob → folder.
pub(super) fn add(store: &Store, model: &str, version: &str, files: &[(&str, &[u8])]) -> VersionRecord {
    let mut recs = Vec::new();
    for (path, bytes) in files {
        let tmp = store.tmp_dir().join(format!("{}.part", fastrand::u64(..)));
        std::fs::write(&tmp, bytes).unwrap();
        let sha = hex::encode(Sha256::digest(bytes));
        store.ingest(&tmp, &sha, bytes.len() as u64).unwrap();
        recs.push(FileRecord { path: path.to_string(), size: bytes.len() as u64, sha256: sha });
    }
    let rec = VersionRecord {
        model: model.into(),
        version: version.into(),
        source: format!("models:/m-{version}"),
        run_id: None,
        flavor: "onnx".into(),
        files: recs,
        state: State::Fetched,
        dir: String::new(),
        fetched_at: unix_now(),
        activated_at: None,
        unfinished_smoke_tests: 0,
    };
    store.commit_version(rec).unwrap()
}
