//! The cache's sled index under `<root>/index`: opening it (and waiting out a lock a
//! predecessor still holds), reading and writing version and model records, their keys and
//! their JSON encoding.
//!
//! DEVNOTE: once sled fails to write its log (a full disk), it remembers the error and
//! refuses every later write until the database is opened again, so a daemon that once ran
//! out of space could never record another activation until restarted. An I/O error from
//! sled therefore closes the index here, and the next use opens it again (recovering what
//! reached the disk; the failed write, which its caller saw fail, is not among it). sled
//! also writes as it opens (a snapshot of its log), so on a full disk the index may not open
//! at all: the cache then opens with the index closed, every use of it tries again, and the
//! daemon serves what the `active` links name meanwhile (see `Store::active_from_link`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use serde::Deserialize;

use super::records::{ModelRecord, VersionRecord};
use super::store::Store;
use super::CacheError;

/// How long [`open_sled`] waits for a database lock to be released.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens a sled database, waiting up to [`LOCK_WAIT`] for its file lock: a predecessor that is
/// exiting (a service restart), or a handle dropped a moment ago whose background I/O still
/// holds the file, releases it shortly. A lock still held after that is the caller's error
/// (see [`is_locked`]).
///
/// sled can panic on some damaged files instead of answering an error; such a panic is
/// caught here and returned as [`sled::Error::ReportableBug`], so a damaged database is a
/// damaged database (see [`quarantine`]), never a crashed daemon.
pub(crate) fn open_sled(config: &sled::Config) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())).unwrap_or_else(|panic| {
            let what = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("a panic");
            Err(sled::Error::ReportableBug(format!("sled failed while opening the database: {what}")))
        });
        match opened {
            Err(e) if is_locked(&e) && std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(50)),
            result => return result,
        }
    }
}

/// Whether an open error means the database's files are damaged (as opposed to locked by
/// another process, or a folder that cannot be read at all: those need an operator).
pub(crate) fn is_damaged(e: &sled::Error) -> bool {
    match e {
        sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) | sled::Error::Unsupported(_) => true,
        sled::Error::Io(io) => !is_locked(e) && matches!(io.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidInput),
        sled::Error::CollectionNotFound(_) => false,
    }
}

/// Moves a damaged database folder aside to `<name>.corrupt-<unix seconds>` (kept for a
/// post-mortem, never read again) so a fresh one can be created in its place.
///
/// # Errors
/// The rename's I/O error.
pub(crate) fn quarantine(dir: &Path) -> std::io::Result<std::path::PathBuf> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "db".into());
    let mut to = dir.with_file_name(format!("{name}.corrupt-{}", crate::util::unix_now()));
    while to.exists() {
        to = dir.with_file_name(format!("{name}.corrupt-{}-{}", crate::util::unix_now(), fastrand::u32(..)));
    }
    std::fs::rename(dir, &to)?;
    if let Some(parent) = dir.parent() {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(to)
}

/// Whether sled failed for want of space (the disk, or the user's quota on it).
fn is_out_of_space(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if crate::util::is_out_of_space(io))
}

/// Whether opening failed because another handle holds the database's file lock.
pub(crate) fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock"))
}

/// The database and its two trees, `versions` (keyed `<model>\0<version>`) and `models`
/// (keyed by model name). Cheap to clone (sled handles are shared).
#[derive(Clone)]
struct Trees {
    db: sled::Db,
    versions: sled::Tree,
    models: sled::Tree,
}

impl Trees {
    fn open(path: &Path) -> Result<Trees, sled::Error> {
        let db = open_sled(&sled::Config::new().path(path).mode(sled::Mode::LowSpace))?;
        Ok(Trees { versions: db.open_tree("versions")?, models: db.open_tree("models")?, db })
    }
}

/// The index: open, or closed after an I/O error until its next use opens it again. Cheap to
/// clone (every clone shares the one database).
#[derive(Clone)]
pub(super) struct Index {
    path: PathBuf,
    trees: Arc<RwLock<Option<Trees>>>,
}

impl Index {
    /// Opens (creating) the index at `path`.
    ///
    /// # Errors
    /// [`CacheError::Locked`] when another process holds it; [`CacheError::Index`].
    pub(super) fn open(path: &Path) -> Result<Index, CacheError> {
        let closed = |trees| Index { path: path.to_path_buf(), trees: Arc::new(RwLock::new(trees)) };
        match Trees::open(path) {
            Ok(t) => Ok(closed(Some(t))),
            Err(source) if is_locked(&source) => Err(CacheError::Locked { path: path.to_path_buf() }),
            Err(source) if is_out_of_space(&source) => {
                tracing::error!(index = %path.display(), error = %source, "the disk is full and the cache index cannot open (sled writes as it opens); it is tried again at each use");
                Ok(closed(None))
            }
            Err(source) => Err(CacheError::Index { path: path.to_path_buf(), source }),
        }
    }

    /// Whether the database is open now (it is not after an I/O error, or when the disk was
    /// too full to open it).
    pub(super) fn is_open(&self) -> bool {
        self.trees.read().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    /// The open trees, opening the database again if an I/O error closed it.
    fn trees(&self) -> Result<Trees, sled::Error> {
        if let Some(t) = self.trees.read().unwrap_or_else(PoisonError::into_inner).as_ref() {
            return Ok(t.clone());
        }
        let mut slot = self.trees.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let t = Trees::open(&self.path)?;
        tracing::info!(index = %self.path.display(), "the cache index is open again");
        *slot = Some(t.clone());
        Ok(t)
    }

    /// Runs `op` on the open trees; an I/O error closes the database (see the module doc).
    fn with<T>(&self, op: impl FnOnce(&Trees) -> Result<T, sled::Error>) -> Result<T, sled::Error> {
        let trees = self.trees()?;
        let result = op(&trees);
        if let Err(e @ sled::Error::Io(_)) = &result {
            tracing::error!(index = %self.path.display(), error = %e, "the cache index failed to read or write; closing it, to open it again at its next use");
            drop(trees);
            *self.trees.write().unwrap_or_else(PoisonError::into_inner) = None;
        }
        result
    }

    /// Opens the index; a damaged one is moved aside and a fresh, empty one created (the
    /// caller rebuilds what it can from the folders). Returns where the damaged one went.
    ///
    /// # Errors
    /// As [`Index::open`] for anything but damage; the quarantine's I/O error.
    pub(super) fn open_or_quarantine(path: &Path) -> Result<(Index, Option<std::path::PathBuf>), CacheError> {
        match Index::open(path) {
            Err(CacheError::Index { source, .. }) if is_damaged(&source) => {
                let to = quarantine(path).map_err(CacheError::io("moving the damaged index aside", path))?;
                tracing::error!(index = %path.display(), moved_to = %to.display(), error = %source, "the cache index is damaged; moved aside, rebuilding it from the model folders");
                Ok((Index::open(path)?, Some(to)))
            }
            other => other.map(|i| (i, None)),
        }
    }
}

impl Store {
    /// One version's record.
    ///
    /// # Errors
    /// Index errors.
    pub fn version(&self, model: &str, version: &str) -> Result<Option<VersionRecord>, CacheError> {
        let key = version_key(model, version);
        match self.index.with(|t| t.versions.get(&key)).map_err(|e| self.index_err(e))? {
            Some(v) => Ok(Some(decode(&key, &v)?)),
            None => Ok(None),
        }
    }

    /// Every version record, of one model or all, ordered by model then version number.
    ///
    /// # Errors
    /// Index errors.
    pub fn versions(&self, model: Option<&str>) -> Result<Vec<VersionRecord>, CacheError> {
        let items = self
            .index
            .with(|t| match model {
                Some(m) => t.versions.scan_prefix(format!("{m}\0").as_bytes()).collect::<Result<Vec<_>, _>>(),
                None => t.versions.iter().collect::<Result<Vec<_>, _>>(),
            })
            .map_err(|e| self.index_err(e))?;
        let mut out: Vec<VersionRecord> = Vec::with_capacity(items.len());
        for (k, v) in items {
            out.push(decode(&String::from_utf8_lossy(&k), &v)?);
        }
        out.sort_by(|a, b| a.model.cmp(&b.model).then(version_order(&a.version, &b.version)));
        Ok(out)
    }

    /// # Errors
    /// Index errors.
    pub fn model(&self, model: &str) -> Result<Option<ModelRecord>, CacheError> {
        match self.index.with(|t| t.models.get(model.as_bytes())).map_err(|e| self.index_err(e))? {
            Some(v) => Ok(Some(decode(model, &v)?)),
            None => Ok(None),
        }
    }

    /// # Errors
    /// Index errors.
    pub fn models(&self) -> Result<Vec<ModelRecord>, CacheError> {
        let items = self.index.with(|t| t.models.iter().collect::<Result<Vec<_>, _>>()).map_err(|e| self.index_err(e))?;
        let mut out = Vec::with_capacity(items.len());
        for (k, v) in items {
            out.push(decode(&String::from_utf8_lossy(&k), &v)?);
        }
        Ok(out)
    }

    /// Writes a version's record and flushes the index.
    pub(super) fn put_version(&self, rec: &VersionRecord) -> Result<(), CacheError> {
        let key = version_key(&rec.model, &rec.version);
        let value = serde_json::to_vec(rec).map_err(|e| CacheError::Record { key: key.clone(), message: e.to_string() })?;
        self.index.with(|t| t.versions.insert(key.as_bytes(), value).and_then(|_| t.db.flush())).map_err(|e| self.index_err(e))?;
        Ok(())
    }

    /// Writes a model's record and flushes the index.
    pub(super) fn put_model(&self, rec: &ModelRecord) -> Result<(), CacheError> {
        let value = serde_json::to_vec(rec).map_err(|e| CacheError::Record { key: rec.model.clone(), message: e.to_string() })?;
        self.index.with(|t| t.models.insert(rec.model.as_bytes(), value).and_then(|_| t.db.flush())).map_err(|e| self.index_err(e))?;
        Ok(())
    }

    /// Deletes a version's record and flushes the index (its folder is the caller's).
    pub(super) fn delete_version(&self, model: &str, version: &str) -> Result<(), CacheError> {
        self.index.with(|t| t.versions.remove(version_key(model, version).as_bytes()).and_then(|_| t.db.flush())).map_err(|e| self.index_err(e))?;
        Ok(())
    }

    fn index_err(&self, source: sled::Error) -> CacheError {
        CacheError::Index { path: self.root().join("index"), source }
    }
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

#[cfg(test)]
mod tests {
    use super::super::test_support::settings;
    use super::*;

    #[test]
    fn a_second_opener_is_told_the_cache_is_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let _store = Store::open(&settings(tmp.path())).unwrap();
        let err = Store::open(&settings(tmp.path())).unwrap_err();
        assert!(matches!(err, CacheError::Locked { .. }), "{err}");
    }
}
