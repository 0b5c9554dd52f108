//! The cache's sled index under `<root>/index`: opening it (and waiting out a lock a
//! predecessor still holds), reading and writing version and model records, their keys and
//! their JSON encoding.

use std::path::Path;

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

/// Whether opening failed because another handle holds the database's file lock.
pub(crate) fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock"))
}

/// The open index: the database and its two trees, `versions` (keyed `<model>\0<version>`)
/// and `models` (keyed by model name). Cheap to clone (sled handles are shared).
#[derive(Clone)]
pub(super) struct Index {
    db: sled::Db,
    versions: sled::Tree,
    models: sled::Tree,
}

impl Index {
    /// Opens (creating) the index at `path`.
    ///
    /// # Errors
    /// [`CacheError::Locked`] when another process holds it; [`CacheError::Index`].
    pub(super) fn open(path: &Path) -> Result<Index, CacheError> {
        let opened = (|| {
            let db = open_sled(&sled::Config::new().path(path).mode(sled::Mode::LowSpace))?;
            Ok::<_, sled::Error>(Index { versions: db.open_tree("versions")?, models: db.open_tree("models")?, db })
        })();
        opened.map_err(|source| if is_locked(&source) { CacheError::Locked { path: path.to_path_buf() } } else { CacheError::Index { path: path.to_path_buf(), source } })
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
        match self.index.versions.get(&key).map_err(|e| self.index_err(e))? {
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
            Some(m) => self.index.versions.scan_prefix(format!("{m}\0").as_bytes()),
            None => self.index.versions.iter(),
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
        match self.index.models.get(model.as_bytes()).map_err(|e| self.index_err(e))? {
            Some(v) => Ok(Some(decode(model, &v)?)),
            None => Ok(None),
        }
    }

    /// # Errors
    /// Index errors.
    pub fn models(&self) -> Result<Vec<ModelRecord>, CacheError> {
        let mut out = Vec::new();
        for item in self.index.models.iter() {
            let (k, v) = item.map_err(|e| self.index_err(e))?;
            out.push(decode(&String::from_utf8_lossy(&k), &v)?);
        }
        Ok(out)
    }

    /// Writes a version's record and flushes the index.
    pub(super) fn put_version(&self, rec: &VersionRecord) -> Result<(), CacheError> {
        let key = version_key(&rec.model, &rec.version);
        let value = serde_json::to_vec(rec).map_err(|e| CacheError::Record { key: key.clone(), message: e.to_string() })?;
        self.index.versions.insert(key.as_bytes(), value).map_err(|e| self.index_err(e))?;
        self.flush()
    }

    /// Writes a model's record and flushes the index.
    pub(super) fn put_model(&self, rec: &ModelRecord) -> Result<(), CacheError> {
        let value = serde_json::to_vec(rec).map_err(|e| CacheError::Record { key: rec.model.clone(), message: e.to_string() })?;
        self.index.models.insert(rec.model.as_bytes(), value).map_err(|e| self.index_err(e))?;
        self.flush()
    }

    /// Deletes a version's record and flushes the index (its folder is the caller's).
    pub(super) fn delete_version(&self, model: &str, version: &str) -> Result<(), CacheError> {
        self.index.versions.remove(version_key(model, version).as_bytes()).map_err(|e| self.index_err(e))?;
        self.flush()
    }

    fn flush(&self) -> Result<(), CacheError> {
        self.index.db.flush().map(|_| ()).map_err(|e| self.index_err(e))
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
