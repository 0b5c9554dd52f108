//! Retention and garbage collection: how much the cache holds, evicting versions to stay
//! under the quota and within the free space of the disk, keeping `keep_versions` per model,
//! and sweeping what nothing points at (stale temp files, orphan blobs and folders).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::blobs::sync_dir;
use super::records::{GcReport, State, VersionRecord};
use super::store::{slug, Store};
use super::CacheError;

/// Free space a download must leave on the cache's file system: the index, the version
/// folder's own entries, the logs and the resume state of the version serving live there too,
/// and sled cannot write to a full disk (its error then sticks until the process restarts).
pub const DISK_RESERVE: u64 = 8 << 20;

/// Bytes free for an unprivileged writer on the file system holding `path`.
///
/// # Errors
/// The `statvfs` error.
pub fn free_space(path: &Path) -> Result<u64, CacheError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| CacheError::Io { action: "reading the free space of", path: path.to_path_buf(), source: e.into() })?;
    #[allow(clippy::useless_conversion)] // the field widths differ between targets
    Ok(u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size())))
}

impl Store {
    /// Bytes held by blobs and partial downloads.
    ///
    /// # Errors
    /// I/O errors.
    pub fn usage(&self) -> Result<u64, CacheError> {
        let mut total = 0;
        for sub in ["blobs", "tmp"] {
            total += dir_size(&self.root().join(sub))?;
        }
        Ok(total)
    }

    /// Frees room for `needed` more bytes, under the quota and on the disk (leaving
    /// [`DISK_RESERVE`] free), by evicting versions retention would let go first (never the
    /// active, pinned or `keep` version). `on_disk` of the `needed` bytes are there already
    /// (partial downloads to resume): the quota counts them, the disk has them.
    ///
    /// # Errors
    /// [`CacheError::QuotaExceeded`] or [`CacheError::NoSpace`] when that is not enough;
    /// nothing is evicted then.
    pub fn make_room(&self, needed: u64, on_disk: u64, keep: (&str, &str)) -> Result<(), CacheError> {
        let quota = self.settings().quota;
        let to_write = needed.saturating_sub(on_disk);
        let mut first = true;
        loop {
            let used = self.usage()?;
            let over_quota = quota.is_some_and(|q| used.saturating_add(needed) > q);
            let available = free_space(self.root())?;
            let short_of_disk = to_write.saturating_add(DISK_RESERVE) > available;
            if !over_quota && !short_of_disk {
                return Ok(());
            }
            let no_space = || CacheError::NoSpace { path: self.root().to_path_buf(), needed: to_write, available, reserve: DISK_RESERVE };
            let mut candidates: Vec<VersionRecord> = self
                .versions(None)?
                .into_iter()
                .filter(|r| !r.dir.is_empty() && (r.model.as_str(), r.version.as_str()) != keep && !self.is_pinned(r))
                .filter(|r| self.model(&r.model).ok().flatten().and_then(|m| m.active).as_deref() != Some(&r.version))
                .collect();
            // Evicting everything it may would not be enough (a listed size past the quota or
            // the disk, say): refuse before evicting anything, so the last-known-good version
            // stays. Sizes of blobs shared between versions count once per version: an upper
            // bound.
            let evictable = candidates.iter().fold(0u64, |sum, r| sum.saturating_add(r.size()));
            if first {
                if let Some(q) = quota.filter(|_| over_quota) {
                    if needed > q || used.saturating_add(needed) > q.saturating_add(evictable) {
                        return Err(CacheError::QuotaExceeded { quota: q, needed, used });
                    }
                }
                if short_of_disk && to_write.saturating_add(DISK_RESERVE) > available.saturating_add(evictable) {
                    return Err(no_space());
                }
            }
            first = false;
            candidates.sort_by_key(|r| self.recency(r));
            let Some(victim) = candidates.first() else {
                return Err(match quota {
                    Some(q) if over_quota => CacheError::QuotaExceeded { quota: q, needed, used },
                    _ => no_space(),
                });
            };
            let why = if over_quota { "to stay within the quota" } else { "to make room on the disk" };
            tracing::info!(model = %victim.model, version = %victim.version, why, "evicting a cached version");
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
        self.settings().pinned.iter().any(|(m, v)| *m == r.model && *v == r.version)
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
                if kept < self.settings().keep_versions {
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
        self.delete_version(&r.model, &r.version)?;
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
        self.sweep_temp(&mut report)?;
        self.sweep_blobs(&records, &mut report)?;
        self.sweep_folders(&records)?;
        if report.blobs_removed > 0 {
            sync_dir(&self.root().join("blobs"))?;
        }
        Ok(report)
    }

    /// The temp area: keeps a partial download and its resume state while both exist and
    /// are younger than `partial_max_age`; removes everything else.
    fn sweep_temp(&self, report: &mut GcReport) -> Result<(), CacheError> {
        let tmp = self.tmp_dir();
        let max_age = self.settings().partial_max_age;
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
        Ok(())
    }

    /// Blobs that no record holding files uses (the caller syncs the folder).
    fn sweep_blobs(&self, records: &[VersionRecord], report: &mut GcReport) -> Result<(), CacheError> {
        let wanted: HashSet<&str> = records.iter().filter(|r| !r.dir.is_empty()).flat_map(|r| r.files.iter().map(|f| f.sha256.as_str())).collect();
        let blobs = self.root().join("blobs");
        for entry in read_dir(&blobs)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !wanted.contains(name.as_str()) {
                let path = entry.path();
                report.bytes_freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(&path).map_err(CacheError::io("removing", &path))?;
                report.blobs_removed += 1;
            }
        }
        Ok(())
    }

    /// Version folders no record names (except the one the `active` symlink names), and
    /// leftover temporary symlinks of an interrupted activation.
    fn sweep_folders(&self, records: &[VersionRecord]) -> Result<(), CacheError> {
        let named: BTreeSet<(String, String)> = records.iter().filter(|r| !r.dir.is_empty()).map(|r| (slug(&r.model), r.dir.clone())).collect();
        for model_entry in read_dir(&self.root().join("models"))? {
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
        Ok(())
    }
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

/// Removes a folder and all it holds; one already gone is fine.
pub(super) fn remove_dir(path: &Path) -> Result<(), CacheError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CacheError::Io { action: "removing", path: path.to_path_buf(), source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{add, settings};
    use super::*;

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

    /// A store keeping five versions, holding versions 1 and 2 (active) of 40 bytes each.
    fn two_versions(root: &Path, quota: Option<u64>) -> Store {
        let mut s = settings(root);
        s.quota = quota;
        s.keep_versions = 5;
        let store = Store::open(&s).unwrap();
        for v in [1u8, 2] {
            add(&store, "m", &v.to_string(), &[("w", &[v; 40])]);
            store.activate("m", &v.to_string()).unwrap();
        }
        store
    }

    #[test]
    fn quota_evicts_old_versions_then_refuses() {
        let tmp = tempfile::tempdir().unwrap();
        let store = two_versions(tmp.path(), Some(100));
        // 80 used; 50 more needs version 1 evicted (2 is active).
        store.make_room(50, 0, ("m", "3")).unwrap();
        assert!(store.version("m", "1").unwrap().is_none());
        assert!(store.version("m", "2").unwrap().is_some());
        let err = store.make_room(70, 0, ("m", "3")).unwrap_err();
        assert!(matches!(err, CacheError::QuotaExceeded { quota: 100, needed: 70, used: 40 }), "{err}");
    }

    #[test]
    fn a_download_the_disk_cannot_hold_is_refused_before_anything_is_evicted() {
        let tmp = tempfile::tempdir().unwrap();
        let store = two_versions(tmp.path(), None);
        // Past what the disk has free (with room to spare for other writers meanwhile).
        let ask = free_space(tmp.path()).unwrap() + DISK_RESERVE;
        let err = store.make_room(ask, 0, ("m", "3")).unwrap_err();
        match &err {
            CacheError::NoSpace { needed, reserve, .. } => assert_eq!((*needed, *reserve), (ask, DISK_RESERVE)),
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("bytes free"), "{err}");
        assert!(store.version("m", "1").unwrap().is_some(), "nothing evicted for a download that cannot fit");
        // The bytes already on disk (partial downloads) are not asked for again.
        store.make_room(ask, ask, ("m", "3")).unwrap();
        store.make_room(1 << 20, 0, ("m", "3")).unwrap();
    }
}
