//! [`Store`] itself: opening the cache, its folders (`models/<slug>/v<ver>.<gen>/`),
//! committing a version's folder from its blobs, pins, good and bad marks, and activation
//! (the `active` symlink and the activation history a rollback reads).
//!
//! Its other methods live with what they touch: `blobs.rs` (the blob store), `index.rs`
//! (the sled records), `gc.rs` (retention and sweeping). Every method blocks (file I/O,
//! hashing, fsync, sled flushes); async callers run them through `spawn_blocking`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::blobs::sync_dir;
use super::gc::remove_dir;
use super::index::Index;
use super::records::{GcReport, ModelRecord, State, VersionRecord};
use super::recover::IndexRecovery;
use super::settings::CacheSettings;
use super::CacheError;
use crate::util::unix_now;

/// Activations remembered per model for rollback.
const HISTORY: usize = 16;

/// The cache. Cheap to clone (sled handles are shared).
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    settings: CacheSettings,
    pub(super) index: Index,
    swept_at_open: GcReport,
    recovered: Option<IndexRecovery>,
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

impl Store {
    /// Opens (creating) the cache at `settings.dir` and sweeps it: staging leftovers, stale
    /// partial downloads, orphan blobs and folders.
    ///
    /// # Errors
    /// [`CacheError::Locked`] when another process holds the index; I/O and index errors.
    pub fn open(settings: &CacheSettings) -> Result<Store, CacheError> {
        Store::open_recovering(settings, &[])
    }

    /// As [`Store::open`]; a damaged index is moved aside and replaced, and the active
    /// version of each of `models` that the index does not know is recorded again from its
    /// folder (see `recover.rs`; [`Store::recovered`] tells what was done).
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_recovering(settings: &CacheSettings, models: &[String]) -> Result<Store, CacheError> {
        let root = settings.dir.clone();
        for sub in ["blobs", "models", "tmp"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(CacheError::io("creating", &p))?;
        }
        let (index, quarantined) = Index::open_or_quarantine(&root.join("index"))?;
        let mut store = Store { index, root, settings: settings.clone(), swept_at_open: GcReport::default(), recovered: None };
        if !store.index.is_open() {
            // The disk is too full for sled to open (see index.rs): nothing here can run
            // without the index; the daemon serves what the `active` links name meanwhile.
            return Ok(store);
        }
        store.recovered = store.rebuild(models, quarantined)?;
        if let Err(e) = store.finish_activations() {
            // A full disk, say: the index's active version serves meanwhile (the daemon must
            // start to serve at all), and the next open tries again.
            tracing::error!(error = %crate::util::chain(&e), "could not finish an interrupted activation; the version the index names stays active");
        }
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

    /// What [`Store::open_recovering`] rebuilt of a damaged or emptied index.
    pub fn recovered(&self) -> Option<&IndexRecovery> {
        self.recovered.as_ref()
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

    pub(super) fn model_dir(&self, model: &str) -> PathBuf {
        self.root.join("models").join(slug(model))
    }

    /// The folder of a version record (whether or not it exists).
    pub fn version_dir(&self, rec: &VersionRecord) -> PathBuf {
        self.model_dir(&rec.model).join(&rec.dir)
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
            crate::crash::point("cache.version_staged");
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
            crate::crash::point("cache.version_renamed");
            sync_dir(&model_dir)?;
            crate::crash::point("cache.version_published");
            rec.state = State::Fetched;
            self.put_version(&rec)?;
            crate::crash::point("cache.version_recorded");
            // The previous generation stays until nothing points at it (see sweep), since the
            // engine may be serving from it right now.
            Ok(rec)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&stage);
        }
        result
    }

    /// Marks a version refused and releases its files (unless it is active).
    ///
    /// # Errors
    /// [`CacheError::UnknownVersion`]; I/O and index errors.
    pub fn mark_bad(&self, model: &str, version: &str, reason: &str) -> Result<(), CacheError> {
        let mut rec = self.version(model, version)?.ok_or_else(|| CacheError::UnknownVersion { model: model.into(), version: version.into() })?;
        rec.state = State::Bad { reason: reason.to_string() };
        rec.unfinished_smoke_tests = 0;
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

    /// Records, durably, that a smoke test of a version starts, and returns how many started
    /// before and never ended (the process died during them). [`Store::mark_good`] and
    /// [`Store::mark_bad`] end the count.
    ///
    /// # Errors
    /// [`CacheError::UnknownVersion`]; index errors.
    pub fn begin_smoke_test(&self, model: &str, version: &str) -> Result<u32, CacheError> {
        let mut rec = self.version(model, version)?.ok_or_else(|| CacheError::UnknownVersion { model: model.into(), version: version.into() })?;
        let unfinished = rec.unfinished_smoke_tests;
        rec.unfinished_smoke_tests = unfinished.saturating_add(1);
        self.put_version(&rec)?;
        crate::crash::point("cache.smoke_test_begun");
        Ok(unfinished)
    }

    /// Marks a fetched version as having passed its smoke test.
    ///
    /// # Errors
    /// [`CacheError::UnknownVersion`]; index errors.
    pub fn mark_good(&self, model: &str, version: &str) -> Result<(), CacheError> {
        let mut rec = self.version(model, version)?.ok_or_else(|| CacheError::UnknownVersion { model: model.into(), version: version.into() })?;
        rec.state = State::Good;
        rec.unfinished_smoke_tests = 0;
        self.put_version(&rec)?;
        crate::crash::point("cache.marked_good");
        Ok(())
    }

    /// Makes a version the active one: swaps the `active` symlink, records the activation,
    /// then applies retention. Returns the active folder.
    ///
    /// # Errors
    /// [`CacheError::UnknownVersion`] when the version or its folder is missing; I/O and
    /// index errors.
    pub fn activate(&self, model: &str, version: &str) -> Result<PathBuf, CacheError> {
        let rec = self.version(model, version)?.ok_or_else(|| CacheError::UnknownVersion { model: model.into(), version: version.into() })?;
        let dir = self.version_dir(&rec);
        if rec.dir.is_empty() || !dir.is_dir() {
            return Err(CacheError::UnknownVersion { model: model.into(), version: version.into() });
        }
        let model_dir = self.model_dir(model);
        let link = model_dir.join("active");
        let before = std::fs::read_link(&link).ok();
        swap_link(&model_dir, Path::new(&rec.dir))?;
        crate::crash::point("cache.active_link_swapped");
        let recorded = self.record_activation(&model_dir, rec, version);
        if let Err(e) = &recorded {
            // The link swapped but the index could not hear of it (a full disk, say): put the
            // link back, so the cache, the daemon and `cache path` keep agreeing on the version
            // before (a restart would otherwise have to finish this activation, on the same
            // full disk). Best effort: if this fails too, reopening the cache settles it.
            tracing::error!(%model, %version, error = %crate::util::chain(e), "recording the activation failed; putting the active link back");
            let restored = match &before {
                Some(previous) => swap_link(&model_dir, previous),
                None => std::fs::remove_file(&link).map_err(CacheError::io("removing", &link)),
            };
            if let Err(undo) = restored {
                tracing::error!(error = %crate::util::chain(&undo), "could not put the active link back; the next start settles it");
            }
        }
        recorded?;
        Ok(dir)
    }

    /// The index's side of an activation whose link has swapped: the version's record, the
    /// model's history, then retention.
    fn record_activation(&self, model_dir: &Path, mut rec: VersionRecord, version: &str) -> Result<(), CacheError> {
        let model = rec.model.clone();
        let model = model.as_str();
        sync_dir(model_dir)?;
        crate::crash::point("cache.active_link_synced");
        rec.activated_at = Some(unix_now());
        if rec.state == State::Fetched {
            rec.state = State::Good;
        }
        // Activated: its smoke test (if it ran one) ended.
        rec.unfinished_smoke_tests = 0;
        self.put_version(&rec)?;
        crate::crash::point("cache.activation_version_recorded");
        let mut m = self.model(model)?.unwrap_or_else(|| ModelRecord { model: model.to_string(), ..ModelRecord::default() });
        m.history.retain(|v| v != version);
        m.history.push(version.to_string());
        if m.history.len() > HISTORY {
            m.history.remove(0);
        }
        m.active = Some(version.to_string());
        self.put_model(&m)?;
        crate::crash::point("cache.activation_recorded");
        // Retention after the activation is housekeeping: the activation stands if it fails.
        if let Err(e) = self.retain() {
            tracing::warn!(%model, error = %crate::util::chain(&e), "applying retention after an activation failed; the next activation tries again");
        }
        crate::crash::point("cache.retained");
        Ok(())
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
}

/// Points the `active` link of `model_dir` at `target` atomically: a new link under a
/// temporary name, renamed over the old one.
fn swap_link(model_dir: &Path, target: &Path) -> Result<(), CacheError> {
    let tmp_link = model_dir.join(format!(".active-{}", fastrand::u64(..)));
    std::os::unix::fs::symlink(target, &tmp_link).map_err(CacheError::io("linking", &tmp_link))?;
    crate::crash::point("cache.active_link_made");
    let link = model_dir.join("active");
    if let Err(e) = std::fs::rename(&tmp_link, &link) {
        let _ = std::fs::remove_file(&tmp_link);
        return Err(CacheError::Io { action: "activating", path: link, source: e });
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::super::test_support::{add, settings};
    use super::*;

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

    /// A crash between the `active` link swap and the index record (found by tests/crash.rs):
    /// reopening completes the activation the link made; a link naming no usable version is
    /// put back on the index's.
    #[test]
    fn reopening_finishes_an_activation_that_a_crash_interrupted() {
        let tmp = tempfile::tempdir().unwrap();
        let s = settings(tmp.path());
        let link = tmp.path().join("models").join(slug("m")).join("active");
        {
            let store = Store::open(&s).unwrap();
            add(&store, "m", "1", &[("genai_config.json", b"1")]);
            store.activate("m", "1").unwrap();
            let two = add(&store, "m", "2", &[("genai_config.json", b"2")]);
            store.begin_smoke_test("m", "2").unwrap();
            // The link swapped, the process gone before the index heard of it.
            std::fs::remove_file(&link).unwrap();
            std::os::unix::fs::symlink(&two.dir, &link).unwrap();
            assert_eq!(store.active("m").unwrap().unwrap().0.version, "1");
        }
        {
            let store = Store::open(&s).unwrap();
            let (rec, dir) = store.active("m").unwrap().unwrap();
            assert_eq!(rec.version, "2");
            assert_eq!((rec.state, rec.unfinished_smoke_tests), (State::Good, 0));
            assert_eq!(std::fs::read(dir.join("genai_config.json")).unwrap(), b"2");
            assert_eq!(store.model("m").unwrap().unwrap().history, vec!["1", "2"]);
            // A link naming a folder no usable record owns.
            std::fs::remove_file(&link).unwrap();
            std::os::unix::fs::symlink("v9.0", &link).unwrap();
        }
        let store = Store::open(&s).unwrap();
        assert_eq!(store.active("m").unwrap().unwrap().0.version, "2");
        assert_eq!(active_dir(tmp.path(), "m").unwrap(), store.active("m").unwrap().unwrap().1.canonicalize().unwrap());
    }

    #[test]
    fn unfinished_smoke_tests_are_counted_across_reopening_until_a_verdict() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(&settings(tmp.path())).unwrap();
            add(&store, "m", "1", &[("a", b"one")]);
            assert_eq!(store.begin_smoke_test("m", "1").unwrap(), 0);
        }
        // The process died; the next one sees the start on disk.
        let store = Store::open(&settings(tmp.path())).unwrap();
        assert_eq!(store.begin_smoke_test("m", "1").unwrap(), 1);
        assert_eq!(store.begin_smoke_test("m", "1").unwrap(), 2);
        store.mark_good("m", "1").unwrap();
        assert_eq!(store.version("m", "1").unwrap().unwrap().unfinished_smoke_tests, 0, "a verdict ends the count");
        assert!(store.begin_smoke_test("m", "9").is_err(), "an unknown version");
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
