//! Rebuilding the index after it was found damaged and moved aside: the bytes are the
//! truth (see the module's doc), so the version each model's `active` symlink names is
//! recorded again from its folder. A folder's files are hard links to blobs named by their
//! sha256, so a file's digest is the name of the blob with the same inode; a file with no
//! such blob is hashed and stored as one. Loading the version then re-verifies it as usual.
//!
//! What the damaged index alone knew is lost and said so: other versions (swept), the
//! rollback history, pins, bad marks. The rebuilt record's registry `source` is unknown, so
//! the next successful poll fetches the designated version again and records it properly.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::blobs::{hash_file, sync_dir};
use super::records::{FileRecord, ModelRecord, State, VersionRecord};
use super::store::{slug, Store};
use super::CacheError;
use crate::util::unix_now;

/// What a rebuild did, for the log and the fleet's event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IndexRecovery {
    /// Where the damaged index was moved (`None`: it opened, but had lost the records).
    pub quarantined: Option<PathBuf>,
    /// `model@version` of each active version recorded again.
    pub rebuilt: Vec<String>,
}

impl Store {
    /// Records again the active version of each of `models` the index does not know although
    /// its `active` symlink names a folder (after a damaged index was replaced by a fresh one,
    /// or an index that lost its records). Runs before the sweep, which would remove folders
    /// no record names. `None` when there was nothing to recover.
    ///
    /// # Errors
    /// I/O and index errors.
    pub(super) fn rebuild(&self, models: &[String], quarantined: Option<PathBuf>) -> Result<Option<IndexRecovery>, CacheError> {
        let mut rebuilt = Vec::new();
        for model in models {
            if self.model(model)?.is_some() {
                continue;
            }
            let now = unix_now();
            let Some((rec, _)) = self.record_from_link(model, true, Some(now))? else { continue };
            let version = rec.version.clone();
            self.put_version(&rec)?;
            self.put_model(&ModelRecord { model: model.clone(), active: Some(version.clone()), history: vec![version.clone()], pinned: None })?;
            tracing::warn!(%model, %version, files = rec.files.len(), "the active version was recorded again from its folder; other versions, pins and the rollback history were lost with the index");
            rebuilt.push(format!("{model}@{version}"));
        }
        Ok((quarantined.is_some() || !rebuilt.is_empty()).then_some(IndexRecovery { quarantined, rebuilt }))
    }

    /// Completes an activation a crash interrupted. The `active` symlink swap is the moment a
    /// version becomes active (see the module docs of `cache`); the index records it just
    /// after. Where the two disagree, the process died in between: a link naming a recorded,
    /// usable version folder wins and the activation is recorded again (it happens only after
    /// the version passed its checks); a link naming anything else is put back on the
    /// version the index calls active. Each repair is logged.
    ///
    /// # Errors
    /// I/O and index errors.
    pub(super) fn finish_activations(&self) -> Result<(), CacheError> {
        for m in self.models()? {
            let model_dir = self.root().join("models").join(slug(&m.model));
            let target = std::fs::read_link(model_dir.join("active")).ok().map(|t| t.to_string_lossy().into_owned());
            let recorded = match &m.active {
                Some(v) => self.version(&m.model, v)?,
                None => None,
            };
            if target.is_some() && target.as_deref() == recorded.as_ref().map(|r| r.dir.as_str()) {
                continue;
            }
            let linked = match &target {
                Some(dir) => self.versions(Some(&m.model))?.into_iter().find(|r| &r.dir == dir && !matches!(r.state, State::Bad { .. }) && model_dir.join(dir).is_dir()),
                None => None,
            };
            let version = match (linked, recorded) {
                (Some(r), _) => r.version,
                (None, Some(r)) if !r.dir.is_empty() && model_dir.join(&r.dir).is_dir() => r.version,
                _ => continue,
            };
            tracing::warn!(model = %m.model, %version, link = ?target, index = ?m.active, "the active link and the index disagreed (an activation was interrupted); activating {version} again");
            self.activate(&m.model, &version)?;
        }
        Ok(())
    }

    /// The version the `active` link of `model` names, its record made from its folder alone
    /// (a file's digest is the name of the blob with its inode, or of the blob its bytes hash
    /// to), without the index and without writing: what serves while the index cannot open (a
    /// full disk). Its bytes are verified like any other at load. `None` when the link names
    /// no version folder, or a file of it is not a stored blob.
    ///
    /// # Errors
    /// I/O errors.
    pub fn active_from_link(&self, model: &str) -> Result<Option<(VersionRecord, PathBuf)>, CacheError> {
        self.record_from_link(model, false, None)
    }

    /// The record of the version the `active` link of `model` names, made from its folder,
    /// and the folder: recorded as activated `at` (`None`: not recorded, only read). A file
    /// that is not a stored blob is stored as one when `adopt`, and makes it `None` otherwise.
    fn record_from_link(&self, model: &str, adopt: bool, at: Option<u64>) -> Result<Option<(VersionRecord, PathBuf)>, CacheError> {
        let model_dir = self.root().join("models").join(slug(model));
        let Ok(target) = std::fs::read_link(model_dir.join("active")) else { return Ok(None) };
        let dir = target.to_string_lossy().into_owned();
        let folder = model_dir.join(&dir);
        let Some(version) = version_of(&dir).filter(|_| folder.is_dir()) else {
            tracing::warn!(%model, folder = %folder.display(), "the active symlink names no usable version folder");
            return Ok(None);
        };
        let mut files = Vec::new();
        if !self.collect(&folder, &folder, &self.blobs_by_inode()?, adopt, &mut files)? {
            return Ok(None);
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let rec = VersionRecord {
            model: model.to_string(),
            version,
            source: String::new(),
            run_id: None,
            flavor: "recovered".into(),
            files,
            state: State::Good,
            dir,
            fetched_at: at.unwrap_or(0),
            activated_at: at,
            unfinished_smoke_tests: 0,
        };
        Ok(Some((rec, folder)))
    }

    fn blobs_by_inode(&self) -> Result<HashMap<(u64, u64), String>, CacheError> {
        let dir = self.root().join("blobs");
        let mut out = HashMap::new();
        for entry in std::fs::read_dir(&dir).map_err(CacheError::io("listing", &dir))? {
            let entry = entry.map_err(CacheError::io("listing", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                let meta = entry.metadata().map_err(CacheError::io("reading", entry.path()))?;
                out.insert((meta.dev(), meta.ino()), name);
            }
        }
        Ok(out)
    }

    /// Every regular file under `dir` as a record relative to `root`. A file that is not a
    /// stored blob is hashed and stored as one when `adopt`; otherwise the walk stops and
    /// says so (`false`).
    fn collect(&self, root: &Path, dir: &Path, blobs: &HashMap<(u64, u64), String>, adopt: bool, out: &mut Vec<FileRecord>) -> Result<bool, CacheError> {
        for entry in std::fs::read_dir(dir).map_err(CacheError::io("listing", dir))? {
            let entry = entry.map_err(CacheError::io("listing", dir))?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(CacheError::io("reading", &path))?;
            if meta.is_dir() {
                if !self.collect(root, &path, blobs, adopt, out)? {
                    return Ok(false);
                }
                continue;
            }
            if !meta.is_file() {
                continue; // a model folder holds only files and folders; anything else is not taken in
            }
            let Ok(rel) = path.strip_prefix(root) else { continue };
            let sha256 = match blobs.get(&(meta.dev(), meta.ino())) {
                Some(d) => d.clone(),
                // Not the blob's inode: the blob was stored again since (a later version
                // brought the same file, and fresh bytes replace a blob). Its bytes must still
                // hash to a stored blob's name.
                None if !adopt => {
                    let (digest, _) = hash_file(&path).map_err(CacheError::io("hashing", &path))?;
                    if !self.blob_path(&digest).is_file() {
                        return Ok(false);
                    }
                    digest
                }
                None => {
                    let (digest, _) = hash_file(&path).map_err(CacheError::io("hashing", &path))?;
                    let blob = self.blob_path(&digest);
                    if !blob.exists() {
                        std::fs::hard_link(&path, &blob).map_err(CacheError::io("linking", &blob))?;
                        sync_dir(&self.root().join("blobs"))?;
                    }
                    digest
                }
            };
            out.push(FileRecord { path: rel.to_string_lossy().into_owned(), size: meta.len(), sha256 });
        }
        Ok(true)
    }
}

/// `v12.3` → `12` (the folder names [`Store::commit_version`] makes).
fn version_of(dir: &str) -> Option<String> {
    let (v, generation) = dir.strip_prefix('v')?.rsplit_once('.')?;
    generation.parse::<u64>().ok()?;
    (!v.is_empty()).then(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{add, settings};
    use super::*;

    #[test]
    fn a_damaged_index_is_moved_aside_and_the_active_version_recorded_again() {
        let tmp = tempfile::tempdir().unwrap();
        let s = settings(tmp.path());
        let (digest, dir) = {
            let store = Store::open(&s).unwrap();
            add(&store, "m", "1", &[("genai_config.json", b"one"), ("sub/tokenizer.json", b"tok")]);
            add(&store, "m", "2", &[("genai_config.json", b"two"), ("sub/tokenizer.json", b"tok")]);
            let dir = store.activate("m", "2").unwrap();
            (store.version("m", "2").unwrap().unwrap().digest(), dir)
        };
        // Garble every file of the index.
        for entry in std::fs::read_dir(tmp.path().join("index")).unwrap() {
            let p = entry.unwrap().path();
            if p.is_file() {
                std::fs::write(&p, vec![0xA5; 4096]).unwrap();
            }
        }
        let store = Store::open_recovering(&s, &["m".to_string()]).expect("a damaged index is not fatal");
        let recovery = store.recovered().expect("the recovery is reported").clone();
        assert_eq!(recovery.rebuilt, vec!["m@2".to_string()]);
        let quarantined = recovery.quarantined.expect("moved aside");
        assert!(quarantined.is_dir() && quarantined.file_name().unwrap().to_string_lossy().starts_with("index.corrupt-"));
        let (rec, active) = store.active("m").unwrap().expect("an active version");
        assert_eq!((rec.version.as_str(), rec.digest()), ("2", digest), "same files, same digests");
        assert_eq!(active, dir);
        assert!(store.verify(&rec).unwrap().is_empty());
        assert!(store.version("m", "1").unwrap().is_none(), "what only the index knew is gone");
        assert!(Store::open_recovering(&s, &["m".into()]).is_err(), "still locked by the first handle");
    }

    /// What serves while the index cannot open (a full disk): the linked folder, its files'
    /// digests taken from the blobs they are links to, nothing written.
    #[test]
    fn the_active_link_alone_gives_the_version_and_its_digests() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&settings(tmp.path())).unwrap();
        add(&store, "m", "1", &[("genai_config.json", b"one"), ("sub/tokenizer.json", b"tok")]);
        let dir = store.activate("m", "1").unwrap();
        let (indexed, _) = store.active("m").unwrap().unwrap();
        let (rec, folder) = store.active_from_link("m").unwrap().expect("the linked version");
        assert_eq!((rec.version.as_str(), rec.digest(), folder.canonicalize().unwrap()), ("1", indexed.digest(), dir.canonicalize().unwrap()));
        assert!(store.verify(&rec).unwrap().is_empty());
        assert!(store.active_from_link("other").unwrap().is_none(), "no link");
        // A blob stored again since (another version brought the same file): found by its
        // bytes, not its inode.
        let tok = store.blob_path(&hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"tok")));
        std::fs::remove_file(&tok).unwrap();
        std::fs::write(&tok, b"tok").unwrap();
        assert_eq!(store.active_from_link("m").unwrap().expect("still found").0.digest(), indexed.digest());
        // A file that is no stored blob: not served on the link's word alone.
        std::fs::write(dir.join("stray.bin"), b"x").unwrap();
        assert!(store.active_from_link("m").unwrap().is_none());
        assert_eq!(std::fs::read_dir(tmp.path().join("blobs")).unwrap().count(), 2, "nothing adopted into the blobs");
    }

    #[test]
    fn folder_names_give_their_version() {
        assert_eq!(version_of("v12.3").as_deref(), Some("12"));
        assert_eq!(version_of("v1.2.0").as_deref(), Some("1.2"));
        assert_eq!(version_of("x1.0"), None);
        assert_eq!(version_of("v.0"), None);
    }
}
