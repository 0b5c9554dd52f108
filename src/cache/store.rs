//! [`Store`]: the blobs, the version folders, the index and their retention.
//!
//! Every method here blocks (file I/O, hashing, fsync, sled flushes); async callers run
//! them through `spawn_blocking`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::CacheError;
use crate::config::CacheSettings;

const HASH_BUFFER: usize = 1 << 20;
/// Activations remembered per model for rollback.
const HISTORY: usize = 16;

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
}

impl VersionRecord {
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
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

/// The cache. Cheap to clone (sled handles are shared).
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    settings: CacheSettings,
    db: sled::Db,
    versions: sled::Tree,
    models: sled::Tree,
    swept_at_open: GcReport,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

/// The active folder of `model` under `root`, read from the `active` symlink without
/// opening the index (works while the daemon holds it).
pub fn active_dir(root: &Path, model: &str) -> Option<PathBuf> {
    let link = root.join("models").join(slug(model)).join("active");
    let target = std::fs::read_link(&link).ok()?;
    let dir = link.parent()?.join(target);
    dir.is_dir().then(|| dir.canonicalize().unwrap_or(dir))
}

/// How long [`open_sled`] waits for a database lock to be released.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens a sled database, waiting up to [`LOCK_WAIT`] for its file lock: a predecessor that is
/// exiting (a service restart), or a handle dropped a moment ago whose background I/O still
/// holds the file, releases it shortly. A lock still held after that is the caller's error
/// (see [`is_locked`]).
pub(crate) fn open_sled(config: &sled::Config) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(e) if is_locked(&e) && std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(50)),
            result => return result,
        }
    }
}

/// Whether opening failed because another handle holds the database's file lock.
pub(crate) fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock"))
}

impl Store {
    /// Opens (creating) the cache at `settings.dir` and sweeps it: staging leftovers, stale
    /// partial downloads, orphan blobs and folders.
    ///
    /// # Errors
    /// [`CacheError::Locked`] when another process holds the index; I/O and index errors.
    pub fn open(settings: &CacheSettings) -> Result<Store, CacheError> {
        let root = settings.dir.clone();
        for sub in ["blobs", "models", "tmp"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(CacheError::io("creating", &p))?;
        }
        let index = root.join("index");
        let db = open_sled(&sled::Config::new().path(&index).mode(sled::Mode::LowSpace)).map_err(|source| {
            if is_locked(&source) {
                CacheError::Locked { path: index.clone() }
            } else {
                CacheError::Index { path: index.clone(), source }
            }
        })?;
        let tree = |name: &str| db.open_tree(name).map_err(|source| CacheError::Index { path: index.clone(), source });
        let mut store = Store { versions: tree("versions")?, models: tree("models")?, db, root, settings: settings.clone(), swept_at_open: GcReport::default() };
        let report = store.sweep()?;
        if report != GcReport::default() {
            tracing::info!(blobs = report.blobs_removed, temp = report.temp_removed, bytes = report.bytes_freed, "cache swept at start");
        }
        store.swept_at_open = report;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What the sweep at [`Store::open`] removed.
    pub fn swept_at_open(&self) -> &GcReport {
        &self.swept_at_open
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// Where downloads stream to.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(sha256)
    }

    fn model_dir(&self, model: &str) -> PathBuf {
        self.root.join("models").join(slug(model))
    }

    /// The folder of a version record (whether or not it exists).
    pub fn version_dir(&self, rec: &VersionRecord) -> PathBuf {
        self.model_dir(&rec.model).join(&rec.dir)
    }

    // ---- index ----

    /// One version's record.
    ///
    /// # Errors
    /// Index errors.
    pub fn version(&self, model: &str, version: &str) -> Result<Option<VersionRecord>, CacheError> {
        let key = version_key(model, version);
        match self.versions.get(&key).map_err(|e| self.index_err(e))? {
            Some(v) => Ok(Some(decode(&key, &v)?)),
            None => Ok(None),
        }
    }

    /// Every version record, of one model or all, ordered by model then version number.
    ///
    /// # Errors
    /// Index errors.
    pub fn versions(&self, model: Option<&str>) -> Result<Vec<VersionRecord>, CacheError> {
        let mut out: Vec<VersionRecord> = Vec::new();
        let iter = match model {
            Some(m) => self.versions.scan_prefix(format!("{m}\0").as_bytes()),
            None => self.versions.iter(),
        };
        for item in iter {
            let (k, v) = item.map_err(|e| self.index_err(e))?;
            out.push(decode(&String::from_utf8_lossy(&k), &v)?);
        }
        out.sort_by(|a, b| a.model.cmp(&b.model).then(version_order(&a.version, &b.version)));
        Ok(out)
    }

    /// # Errors
    /// Index errors.
    pub fn model(&self, model: &str) -> Result<Option<ModelRecord>, CacheError> {
        match self.models.get(model.as_bytes()).map_err(|e| self.index_err(e))? {
            Some(v) => Ok(Some(decode(model, &v)?)),
            None => Ok(None),
        }
    }

    /// # Errors
    /// Index errors.
    pub fn models(&self) -> Result<Vec<ModelRecord>, CacheError> {
        let mut out = Vec::new();
        for item in self.models.iter() {
            let (k, v) = item.map_err(|e| self.index_err(e))?;
            out.push(decode(&String::from_utf8_lossy(&k), &v)?);
        }
        Ok(out)
    }

    fn put_version(&self, rec: &VersionRecord) -> Result<(), CacheError> {
        let key = version_key(&rec.model, &rec.version);
        let value = serde_json::to_vec(rec).map_err(|e| CacheError::Record { key: key.clone(), message: e.to_string() })?;
        self.versions.insert(key.as_bytes(), value).map_err(|e| self.index_err(e))?;
        self.flush()
    }

    fn put_model(&self, rec: &ModelRecord) -> Result<(), CacheError> {
        let value = serde_json::to_vec(rec).map_err(|e| CacheError::Record { key: rec.model.clone(), message: e.to_string() })?;
        self.models.insert(rec.model.as_bytes(), value).map_err(|e| self.index_err(e))?;
        self.flush()
    }

    fn flush(&self) -> Result<(), CacheError> {
        self.db.flush().map(|_| ()).map_err(|e| self.index_err(e))
    }

    fn index_err(&self, source: sled::Error) -> CacheError {
        CacheError::Index { path: self.root.join("index"), source }
    }

    /// Records (or, with `None`, clears) the version `model` is pinned to.
    ///
    /// # Errors
    /// Index errors.
    pub fn set_pin(&self, model: &str, version: Option<&str>) -> Result<(), CacheError> {
        let mut m = self.model(model)?.unwrap_or_else(|| ModelRecord { model: model.to_string(), ..ModelRecord::default() });
        m.pinned = version.map(str::to_string);
        self.put_model(&m)
    }

    // ---- blobs and versions ----

    /// Moves a downloaded, hashed file into the blob store under its digest. The digest was
    /// computed while the bytes streamed to disk; the size is checked again here.
    ///
    /// # Errors
    /// [`CacheError::SizeMismatch`]; I/O errors.
    pub fn ingest(&self, temp: &Path, sha256: &str, size: u64) -> Result<PathBuf, CacheError> {
        let actual = std::fs::metadata(temp).map_err(CacheError::io("reading", temp))?.len();
        if actual != size {
            return Err(CacheError::SizeMismatch { path: temp.to_path_buf(), expected: size, actual });
        }
        let blob = self.blob_path(sha256);
        if blob.exists() {
            // Same digest, same bytes: keep the one already there.
            std::fs::remove_file(temp).map_err(CacheError::io("removing", temp))?;
        } else {
            std::fs::set_permissions(temp, std::fs::Permissions::from_mode(0o444)).map_err(CacheError::io("protecting", temp))?;
            std::fs::File::open(temp).and_then(|f| f.sync_all()).map_err(CacheError::io("syncing", temp))?;
            std::fs::rename(temp, &blob).map_err(CacheError::io("publishing", &blob))?;
            sync_dir(&self.root.join("blobs"))?;
        }
        let _ = std::fs::remove_file(temp.with_extension("part.json"));
        Ok(blob)
    }

    /// Builds the version's folder from its blobs (a new generation when one exists) and
    /// records the version as [`State::Fetched`], keeping any earlier activation time.
    ///
    /// # Errors
    /// A blob missing or of the wrong size; I/O and index errors.
    pub fn commit_version(&self, mut rec: VersionRecord) -> Result<VersionRecord, CacheError> {
        let model_dir = self.model_dir(&rec.model);
        std::fs::create_dir_all(&model_dir).map_err(CacheError::io("creating", &model_dir))?;
        let stage = self.tmp_dir().join(format!("stage-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&stage).map_err(CacheError::io("creating", &stage))?;
        let result = (|| {
            for f in &rec.files {
                let blob = self.blob_path(&f.sha256);
                let len = std::fs::metadata(&blob).map_err(CacheError::io("reading blob", &blob))?.len();
                if len != f.size {
                    return Err(CacheError::SizeMismatch { path: blob, expected: f.size, actual: len });
                }
                let to = stage.join(&f.path);
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent).map_err(CacheError::io("creating", parent))?;
                }
                std::fs::hard_link(&blob, &to).map_err(CacheError::io("linking", &to))?;
            }
            sync_dir(&stage)?;
            let previous = self.version(&rec.model, &rec.version)?;
            let generation = previous.as_ref().and_then(|p| generation_of(&p.dir)).map_or(0, |g| g + 1);
            rec.dir = format!("v{}.{generation}", sanitize(&rec.version));
            if let Some(p) = &previous {
                rec.activated_at = rec.activated_at.or(p.activated_at);
            }
            let dest = model_dir.join(&rec.dir);
            if dest.exists() {
                remove_dir(&dest)?;
            }
            std::fs::rename(&stage, &dest).map_err(CacheError::io("publishing", &dest))?;
            sync_dir(&model_dir)?;
            rec.state = State::Fetched;
            self.put_version(&rec)?;
            // The previous generation stays until nothing points at it (see sweep), since the
            // engine may be serving from it right now.
            Ok(rec)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&stage);
        }
        result
    }

    /// Re-hashes every file of a version; returns the ones that no longer match.
    ///
    /// # Errors
    /// I/O errors other than a missing file.
    pub fn verify(&self, rec: &VersionRecord) -> Result<Vec<Corruption>, CacheError> {
        let mut bad = Vec::new();
        let dir = self.version_dir(rec);
        for f in &rec.files {
            let path = dir.join(&f.path);
            let actual = match hash_file(&path) {
                Ok((digest, _)) => Some(digest),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(CacheError::Io { action: "verifying", path, source: e }),
            };
            if actual.as_deref() != Some(f.sha256.as_str()) {
                bad.push(Corruption { path: f.path.clone(), expected: f.sha256.clone(), actual });
            }
        }
        Ok(bad)
    }

    /// Removes a blob whose bytes are corrupt, so it is fetched again.
    ///
    /// # Errors
    /// I/O errors.
    pub fn discard_blob(&self, sha256: &str) -> Result<(), CacheError> {
        let p = self.blob_path(sha256);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::Io { action: "removing", path: p, source: e }),
        }
    }

    /// Blobs of a record that are missing from the store.
    pub fn missing_blobs(&self, rec: &VersionRecord) -> Vec<FileRecord> {
        rec.files.iter().filter(|f| !self.blob_path(&f.sha256).is_file()).cloned().collect()
    }

    /// Marks a version refused and releases its files (unless it is active).
    ///
    /// # Errors
    /// [`CacheError::UnknownVersion`]; I/O and index errors.
    pub fn mark_bad(&self, model: &str, version: &str, reason: &str) -> Result<(), CacheError> {
        let mut rec = self.version(model, version)?.ok_or_else(|| CacheError::UnknownVersion { model: model.into(), version: version.into() })?;
        rec.state = State::Bad { reason: reason.to_string() };
        let active = self.model(model)?.and_then(|m| m.active);
        if active.as_deref() != Some(version) && !rec.dir.is_empty() {
            let dir = self.version_dir(&rec);
            rec.dir.clear();
            self.put_version(&rec)?;
            remove_dir(&dir)?;
            self.sweep()?;
        } else {
            self.put_version(&rec)?;
        }
        Ok(())
    }

    /// Marks a fetched version as having passed its smoke test.
    ///
    /// # Errors
    /// [`CacheError::UnknownVersion`]; index errors.
    pub fn mark_good(&self, model: &str, version: &str) -> Result<(), CacheError> {
        let mut rec = self.version(model, version)?.ok_or_else(|| CacheError::UnknownVersion { model: model.into(), version: version.into() })?;
        rec.state = State::Good;
        self.put_version(&rec)
    }

    /// Makes a version the active one: swaps the `active` symlink, records the activation,
    /// then applies retention. Returns the active folder.
    ///
    /// # Errors
    /// [`CacheError::UnknownVersion`] when the version or its folder is missing; I/O and
    /// index errors.
    pub fn activate(&self, model: &str, version: &str) -> Result<PathBuf, CacheError> {
        let mut rec = self.version(model, version)?.ok_or_else(|| CacheError::UnknownVersion { model: model.into(), version: version.into() })?;
        let dir = self.version_dir(&rec);
        if rec.dir.is_empty() || !dir.is_dir() {
            return Err(CacheError::UnknownVersion { model: model.into(), version: version.into() });
        }
        let model_dir = self.model_dir(model);
        let tmp_link = model_dir.join(format!(".active-{}", fastrand::u64(..)));
        std::os::unix::fs::symlink(&rec.dir, &tmp_link).map_err(CacheError::io("linking", &tmp_link))?;
        let link = model_dir.join("active");
        std::fs::rename(&tmp_link, &link).map_err(CacheError::io("activating", &link))?;
        sync_dir(&model_dir)?;
        rec.activated_at = Some(now());
        if rec.state == State::Fetched {
            rec.state = State::Good;
        }
        self.put_version(&rec)?;
        let mut m = self.model(model)?.unwrap_or_else(|| ModelRecord { model: model.to_string(), ..ModelRecord::default() });
        m.history.retain(|v| v != version);
        m.history.push(version.to_string());
        if m.history.len() > HISTORY {
            m.history.remove(0);
        }
        m.active = Some(version.to_string());
        self.put_model(&m)?;
        self.retain()?;
        Ok(dir)
    }

    /// The active version of `model` and its folder.
    ///
    /// # Errors
    /// Index errors.
    pub fn active(&self, model: &str) -> Result<Option<(VersionRecord, PathBuf)>, CacheError> {
        let Some(version) = self.model(model)?.and_then(|m| m.active) else {
            return Ok(None);
        };
        Ok(self.version(model, &version)?.map(|r| {
            let d = self.version_dir(&r);
            (r, d)
        }))
    }

    /// The newest earlier activation of `model` still held in good state: the
    /// last-known-good version a rollback goes to.
    ///
    /// # Errors
    /// Index errors.
    pub fn last_known_good(&self, model: &str) -> Result<Option<VersionRecord>, CacheError> {
        let Some(m) = self.model(model)? else { return Ok(None) };
        for v in m.history.iter().rev() {
            if Some(v) == m.active.as_ref() {
                continue;
            }
            if let Some(r) = self.version(model, v)? {
                if r.state == State::Good && !r.dir.is_empty() && self.version_dir(&r).is_dir() {
                    return Ok(Some(r));
                }
            }
        }
        Ok(None)
    }

    // ---- retention, quota, sweeping ----

    /// Bytes held by blobs and partial downloads.
    ///
    /// # Errors
    /// I/O errors.
    pub fn usage(&self) -> Result<u64, CacheError> {
        let mut total = 0;
        for sub in ["blobs", "tmp"] {
            total += dir_size(&self.root.join(sub))?;
        }
        Ok(total)
    }

    /// Frees room for `needed` more bytes under the quota by evicting versions retention
    /// would let go first (never the active, pinned or `keep` version).
    ///
    /// # Errors
    /// [`CacheError::QuotaExceeded`] when that is not enough.
    pub fn make_room(&self, needed: u64, keep: (&str, &str)) -> Result<(), CacheError> {
        let Some(quota) = self.settings.quota else { return Ok(()) };
        loop {
            let used = self.usage()?;
            if used + needed <= quota {
                return Ok(());
            }
            let mut candidates: Vec<VersionRecord> = self
                .versions(None)?
                .into_iter()
                .filter(|r| !r.dir.is_empty() && (r.model.as_str(), r.version.as_str()) != keep && !self.is_pinned(r))
                .filter(|r| self.model(&r.model).ok().flatten().and_then(|m| m.active).as_deref() != Some(&r.version))
                .collect();
            candidates.sort_by_key(|r| self.recency(r));
            let Some(victim) = candidates.first() else {
                return Err(CacheError::QuotaExceeded { quota, needed, used });
            };
            tracing::info!(model = %victim.model, version = %victim.version, "evicting a cached version to stay within the quota");
            self.remove_version(victim)?;
            self.sweep()?;
        }
    }

    /// Orders versions by use: place in the model's activation history (seconds-resolution
    /// timestamps tie too easily), then download time.
    fn recency(&self, r: &VersionRecord) -> (usize, u64) {
        let history = self.model(&r.model).ok().flatten().map(|m| m.history).unwrap_or_default();
        (history.iter().position(|v| *v == r.version).map_or(0, |i| i + 1), r.fetched_at)
    }

    fn is_pinned(&self, r: &VersionRecord) -> bool {
        self.settings.pinned.iter().any(|(m, v)| *m == r.model && *v == r.version)
            || self.model(&r.model).ok().flatten().and_then(|m| m.pinned).as_deref() == Some(r.version.as_str())
    }

    /// Keeps, per model, the active version, pinned ones and the most recent others up to
    /// `keep_versions` in all; removes the rest and sweeps.
    ///
    /// # Errors
    /// I/O and index errors.
    pub fn retain(&self) -> Result<GcReport, CacheError> {
        let mut by_model: BTreeMap<String, Vec<VersionRecord>> = BTreeMap::new();
        for r in self.versions(None)? {
            if !r.dir.is_empty() && !matches!(r.state, State::Bad { .. }) {
                by_model.entry(r.model.clone()).or_default().push(r);
            }
        }
        let mut removed = Vec::new();
        for (model, mut recs) in by_model {
            let active = self.model(&model)?.and_then(|m| m.active);
            // Most recently used first.
            recs.sort_by_key(|r| std::cmp::Reverse(self.recency(r)));
            let mut kept = usize::from(active.is_some());
            for r in recs {
                if Some(&r.version) == active.as_ref() || self.is_pinned(&r) {
                    continue;
                }
                if kept < self.settings.keep_versions {
                    kept += 1;
                    continue;
                }
                self.remove_version(&r)?;
                removed.push(format!("{}@{}", r.model, r.version));
            }
        }
        let mut report = self.sweep()?;
        report.versions_removed = removed;
        Ok(report)
    }

    fn remove_version(&self, r: &VersionRecord) -> Result<(), CacheError> {
        let dir = self.version_dir(r);
        self.versions.remove(version_key(&r.model, &r.version).as_bytes()).map_err(|e| self.index_err(e))?;
        self.flush()?;
        if !r.dir.is_empty() {
            remove_dir(&dir)?;
        }
        Ok(())
    }

    /// Removes what nothing points at: staging folders and stray temp files, partial
    /// downloads older than `partial_max_age`, blobs no record uses, version folders no
    /// record names.
    ///
    /// # Errors
    /// I/O and index errors.
    pub fn sweep(&self) -> Result<GcReport, CacheError> {
        let mut report = GcReport::default();
        let records = self.versions(None)?;
        // Temp area.
        let tmp = self.tmp_dir();
        let max_age = self.settings.partial_max_age;
        for entry in read_dir(&tmp)? {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata().map_err(CacheError::io("reading", &path))?;
            let keep = if name.ends_with(".part") {
                tmp.join(format!("{name}.json")).exists() && age(&meta) < max_age
            } else if let Some(part) = name.strip_suffix(".json") {
                part.ends_with(".part") && tmp.join(part).exists() && age(&meta) < max_age
            } else {
                // Staging folders of a process that died mid-way, and any other stray file.
                // DEVNOTE: only one process owns the cache (sled's lock), so nothing else is
                // staging right now.
                false
            };
            if !keep {
                report.bytes_freed += if meta.is_dir() { dir_size(&path)? } else { meta.len() };
                if meta.is_dir() {
                    remove_dir(&path)?;
                } else {
                    std::fs::remove_file(&path).map_err(CacheError::io("removing", &path))?;
                }
                report.temp_removed += 1;
            }
        }
        // Blobs.
        let wanted: HashSet<&str> = records.iter().filter(|r| !r.dir.is_empty()).flat_map(|r| r.files.iter().map(|f| f.sha256.as_str())).collect();
        let blobs = self.root.join("blobs");
        for entry in read_dir(&blobs)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !wanted.contains(name.as_str()) {
                let path = entry.path();
                report.bytes_freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(&path).map_err(CacheError::io("removing", &path))?;
                report.blobs_removed += 1;
            }
        }
        // Version folders.
        let named: BTreeSet<(String, String)> = records.iter().filter(|r| !r.dir.is_empty()).map(|r| (slug(&r.model), r.dir.clone())).collect();
        for model_entry in read_dir(&self.root.join("models"))? {
            let model_slug = model_entry.file_name().to_string_lossy().into_owned();
            let model_path = model_entry.path();
            if !model_path.is_dir() {
                continue;
            }
            let active_target = std::fs::read_link(model_path.join("active")).ok().map(|t| t.to_string_lossy().into_owned());
            for entry in read_dir(&model_path)? {
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                if name == "active" {
                    continue;
                }
                if name.starts_with(".active-") {
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                // The folder the symlink names stays even if the index lost it: it is serving.
                if !named.contains(&(model_slug.clone(), name.clone())) && active_target.as_deref() != Some(name.as_str()) {
                    remove_dir(&path)?;
                }
            }
        }
        if report.blobs_removed > 0 {
            sync_dir(&blobs)?;
        }
        Ok(report)
    }
}

/// sha256 and length of a file.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_BUFFER];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        n_total += n as u64;
    }
    Ok((hex::encode(h.finalize()), n_total))
}

fn version_key(model: &str, version: &str) -> String {
    format!("{model}\0{version}")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, v: &[u8]) -> Result<T, CacheError> {
    serde_json::from_slice(v).map_err(|e| CacheError::Record { key: key.replace('\0', "@"), message: e.to_string() })
}

/// Numeric versions in number order, others by text.
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

/// A folder name for a model: readable, and unique through a short hash of the full name
/// (MLflow names may hold `/`, spaces and anything else).
pub(crate) fn slug(model: &str) -> String {
    let digest = Sha256::digest(model.as_bytes());
    format!("{}-{}", sanitize(model), &hex::encode(digest)[..8])
}

fn sanitize(s: &str) -> String {
    let mut out: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(64).collect();
    if out.is_empty() {
        out.push('_');
    }
    out
}

fn generation_of(dir: &str) -> Option<u64> {
    dir.rsplit_once('.').and_then(|(_, g)| g.parse().ok())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Unix seconds, for records.
pub(crate) fn unix_now() -> u64 {
    now()
}

fn age(meta: &std::fs::Metadata) -> Duration {
    meta.modified().ok().and_then(|m| SystemTime::now().duration_since(m).ok()).unwrap_or_default()
}

fn read_dir(path: &Path) -> Result<Vec<std::fs::DirEntry>, CacheError> {
    let rd = std::fs::read_dir(path).map_err(CacheError::io("listing", path))?;
    rd.collect::<Result<Vec<_>, _>>().map_err(CacheError::io("listing", path))
}

fn dir_size(path: &Path) -> Result<u64, CacheError> {
    let mut total = 0;
    for e in read_dir(path)? {
        let meta = e.metadata().map_err(CacheError::io("reading", e.path()))?;
        total += if meta.is_dir() { dir_size(&e.path())? } else { meta.len() };
    }
    Ok(total)
}

fn remove_dir(path: &Path) -> Result<(), CacheError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CacheError::Io { action: "removing", path: path.to_path_buf(), source: e }),
    }
}

fn sync_dir(path: &Path) -> Result<(), CacheError> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(CacheError::io("syncing", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> CacheSettings {
        CacheSettings {
            dir: dir.to_path_buf(),
            keep_versions: 2,
            pinned: vec![],
            quota: None,
            partial_max_age: Duration::from_secs(3600),
            verify_on_load: true,
            smoke_test_tokens: 4,
        }
    }

    /// Puts `files` in as a version, the way a pull does: temp file → blob → folder.
    fn add(store: &Store, model: &str, version: &str, files: &[(&str, &[u8])]) -> VersionRecord {
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
        };
        store.commit_version(rec).unwrap()
    }

    #[test]
    fn versions_activate_atomically_and_retention_keeps_n_plus_pinned() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = settings(tmp.path());
        s.pinned = vec![("m".into(), "1".into())];
        let store = Store::open(&s).unwrap();
        for v in 1..=4u8 {
            add(&store, "m", &v.to_string(), &[("genai_config.json", &[v]), ("shared.json", b"same")]);
            let dir = store.activate("m", &v.to_string()).unwrap();
            assert_eq!(std::fs::read(dir.join("genai_config.json")).unwrap(), vec![v]);
            assert_eq!(active_dir(tmp.path(), "m").unwrap(), dir.canonicalize().unwrap());
        }
        // Active 4, previous 3 (keep 2), pinned 1; 2 is gone with its folder and blob.
        let kept: Vec<String> = store.versions(Some("m")).unwrap().into_iter().map(|r| r.version).collect();
        assert_eq!(kept, vec!["1", "3", "4"]);
        assert!(!store.blob_path(&hex::encode(Sha256::digest([2u8]))).exists());
        assert!(store.blob_path(&hex::encode(Sha256::digest(b"same"))).exists());
        assert_eq!(store.last_known_good("m").unwrap().unwrap().version, "3");
        // The blob store holds each content once.
        assert_eq!(std::fs::read_dir(tmp.path().join("blobs")).unwrap().count(), 4);
    }

    #[test]
    fn a_flipped_byte_is_found_and_a_new_generation_repairs_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&settings(tmp.path())).unwrap();
        let rec = add(&store, "m", "1", &[("a.bin", b"hello world"), ("b.bin", b"other")]);
        let dir = store.activate("m", "1").unwrap();
        assert!(store.verify(&rec).unwrap().is_empty());
        // Flip a byte through the read-only hard link, as disk rot or a stray tool would.
        let victim = dir.join("a.bin");
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut bytes = std::fs::read(&victim).unwrap();
        bytes[0] ^= 0x01;
        std::fs::write(&victim, &bytes).unwrap();
        let bad = store.verify(&rec).unwrap();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].path, "a.bin");
        // Repair: drop the blob, put good bytes back, rebuild the folder, re-activate.
        store.discard_blob(&bad[0].expected).unwrap();
        let t = store.tmp_dir().join("x.part");
        std::fs::write(&t, b"hello world").unwrap();
        store.ingest(&t, &bad[0].expected, 11).unwrap();
        let rec2 = store.commit_version(rec.clone()).unwrap();
        assert_ne!(rec2.dir, rec.dir);
        let dir2 = store.activate("m", "1").unwrap();
        assert!(store.verify(&rec2).unwrap().is_empty());
        assert_eq!(std::fs::read(dir2.join("a.bin")).unwrap(), b"hello world");
        // The old generation is swept once nothing names it.
        store.sweep().unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn sweep_removes_orphans_and_stale_temp_but_keeps_resumable_partials() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&settings(tmp.path())).unwrap();
        add(&store, "m", "1", &[("a", b"a")]);
        store.activate("m", "1").unwrap();
        let t = store.tmp_dir();
        std::fs::write(t.join("k.part"), b"partial").unwrap();
        std::fs::write(t.join("k.part.json"), b"{}").unwrap();
        std::fs::write(t.join("lonely.part"), b"no state").unwrap();
        std::fs::create_dir_all(t.join("stage-1/sub")).unwrap();
        std::fs::write(tmp.path().join("blobs").join("0".repeat(64)), b"orphan").unwrap();
        std::fs::create_dir_all(store.model_dir("m").join("v9.0")).unwrap();
        drop(store);
        let store = Store::open(&settings(tmp.path())).unwrap();
        assert!(t.join("k.part").exists() && t.join("k.part.json").exists());
        assert!(!t.join("lonely.part").exists());
        assert!(!t.join("stage-1").exists());
        assert!(!tmp.path().join("blobs").join("0".repeat(64)).exists());
        assert!(!store.model_dir("m").join("v9.0").exists());
        assert!(store.active("m").unwrap().is_some());
    }

    #[test]
    fn quota_evicts_old_versions_then_refuses() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = settings(tmp.path());
        s.quota = Some(100);
        s.keep_versions = 5;
        let store = Store::open(&s).unwrap();
        add(&store, "m", "1", &[("w", &[1u8; 40])]);
        store.activate("m", "1").unwrap();
        add(&store, "m", "2", &[("w", &[2u8; 40])]);
        store.activate("m", "2").unwrap();
        // 80 used; 50 more needs version 1 evicted (2 is active).
        store.make_room(50, ("m", "3")).unwrap();
        assert!(store.version("m", "1").unwrap().is_none());
        assert!(store.version("m", "2").unwrap().is_some());
        let err = store.make_room(70, ("m", "3")).unwrap_err();
        assert!(matches!(err, CacheError::QuotaExceeded { quota: 100, needed: 70, used: 40 }), "{err}");
    }

    #[test]
    fn a_second_opener_is_told_the_cache_is_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let _store = Store::open(&settings(tmp.path())).unwrap();
        let err = Store::open(&settings(tmp.path())).unwrap_err();
        assert!(matches!(err, CacheError::Locked { .. }), "{err}");
    }

    #[test]
    fn bad_versions_release_their_files_but_stay_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&settings(tmp.path())).unwrap();
        add(&store, "m", "1", &[("a", b"good")]);
        store.activate("m", "1").unwrap();
        let r2 = add(&store, "m", "2", &[("a", b"broken")]);
        let dir2 = store.version_dir(&r2);
        store.mark_bad("m", "2", "non-finite logits").unwrap();
        assert!(!dir2.exists());
        assert!(!store.blob_path(&r2.files[0].sha256).exists());
        let r = store.version("m", "2").unwrap().unwrap();
        assert_eq!(r.state, State::Bad { reason: "non-finite logits".into() });
        assert_eq!(store.active("m").unwrap().unwrap().0.version, "1");
    }

    #[test]
    fn slugs_are_safe_and_distinct() {
        assert!(slug("a/b c").starts_with("a_b_c-"));
        assert_ne!(slug("a/b"), slug("a_b"));
        assert_eq!(slug("../.."), format!("_____-{}", &hex::encode(Sha256::digest(b"../.."))[..8]));
    }
}
