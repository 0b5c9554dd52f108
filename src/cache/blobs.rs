//! Content-addressed blobs under `<root>/blobs/<sha256>`: taking a verified download in,
//! re-hashing a version's files, dropping a corrupt blob, finding missing ones; and the
//! hashing and fsync steps they rest on.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::records::{Corruption, FileRecord, VersionRecord};
use super::store::Store;
use super::CacheError;

const HASH_BUFFER: usize = 1 << 20;

impl Store {
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root().join("blobs").join(sha256)
    }

    /// Moves a downloaded, hashed file into the blob store under its digest. The digest was
    /// computed while the bytes streamed to disk; the size is checked again here.
    ///
    /// The fresh bytes always win: a blob already stored under the same name may have rotted
    /// or been tampered with since it was verified, and keeping it would put those bytes into
    /// the new version. The rename replaces the name atomically; versions already built keep
    /// their own links to the old file until they are verified (and repaired) in turn.
    ///
    /// # Errors
    /// [`CacheError::SizeMismatch`]; I/O errors.
    pub fn ingest(&self, temp: &Path, sha256: &str, size: u64) -> Result<PathBuf, CacheError> {
        let actual = std::fs::metadata(temp).map_err(CacheError::io("reading", temp))?.len();
        if actual != size {
            return Err(CacheError::SizeMismatch { path: temp.to_path_buf(), expected: size, actual });
        }
        let blob = self.blob_path(sha256);
        std::fs::set_permissions(temp, std::fs::Permissions::from_mode(0o444)).map_err(CacheError::io("protecting", temp))?;
        std::fs::File::open(temp).and_then(|f| f.sync_all()).map_err(CacheError::io("syncing", temp))?;
        crate::crash::point("cache.blob_synced");
        std::fs::rename(temp, &blob).map_err(CacheError::io("publishing", &blob))?;
        crate::crash::point("cache.blob_renamed");
        sync_dir(&self.root().join("blobs"))?;
        crate::crash::point("cache.blob_published");
        let _ = std::fs::remove_file(temp.with_extension("part.json"));
        Ok(blob)
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

/// fsyncs a folder, so the names created or renamed in it survive a power cut.
pub(super) fn sync_dir(path: &Path) -> Result<(), CacheError> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(CacheError::io("syncing", path))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{add, settings};
    use super::*;

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
}
