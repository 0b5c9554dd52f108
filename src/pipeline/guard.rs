//! What the last full verification of the active version saw, so a poll that finds the
//! version unchanged in the registry can tell cheaply that its files are unchanged on disk too.
//!
//! Re-hashing every file on every poll costs a full read of the model (a 2.4 GB model on an SD
//! card is over a minute of I/O) and a flood of `sync` commands would keep the disk busy. So a
//! version is hashed in full when it is loaded, when it is installed and once a day; between
//! those, a poll compares each file's inode, size, mtime and ctime with what they were when the
//! hashes last matched. Any write, truncation, replacement or `chmod` of a file changes its
//! ctime (which no tool can set back), so tampering and most accidents are caught at the next
//! poll; silent bit rot, which changes none of them, is caught by the daily full pass.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cache::FileRecord;

/// How long a full verification of the active version is trusted when nothing changed.
pub const REVERIFY_EVERY: Duration = Duration::from_secs(24 * 3600);

/// One file as `stat` saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(dir: &Path, files: &[FileRecord]) -> Option<Vec<FileStamp>> {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(dir.join(&f.path)).ok()?;
            Some(FileStamp { dev: m.dev(), ino: m.ino(), len: m.len(), mtime: (m.mtime(), m.mtime_nsec()), ctime: (m.ctime(), m.ctime_nsec()) })
        })
        .collect()
}

struct Seen {
    dir: PathBuf,
    files: Vec<FileStamp>,
    at: Instant,
}

/// The active version's last full verification, and how many were made.
#[derive(Default)]
pub struct Guard {
    seen: Mutex<Option<Seen>>,
    full: AtomicU64,
}

impl Guard {
    /// True when `dir` was verified in full less than [`REVERIFY_EVERY`] ago and no file of it
    /// changed since (a few `stat` calls, no reads).
    pub fn unchanged(&self, dir: &Path, files: &[FileRecord]) -> bool {
        let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.as_ref().is_some_and(|s| s.dir == dir && s.at.elapsed() < REVERIFY_EVERY && stamp(dir, files).is_some_and(|now| now == s.files))
    }

    /// Records that every file of `dir` matched its digest just now.
    pub fn verified(&self, dir: &Path, files: &[FileRecord]) {
        let files = stamp(dir, files);
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *seen = files.map(|files| Seen { dir: dir.to_path_buf(), files, at: Instant::now() });
    }

    /// Counts one full verification (every byte read and hashed).
    pub fn counted(&self) {
        self.full.fetch_add(1, Ordering::Relaxed);
    }

    /// Full verifications made so far.
    pub fn full_verifications(&self) -> u64 {
        self.full.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_or_a_replacement_is_seen_and_an_untouched_folder_is_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"one").unwrap();
        std::fs::write(dir.path().join("b"), b"two").unwrap();
        let files: Vec<FileRecord> = ["a", "b"].iter().map(|p| FileRecord { path: (*p).into(), size: 3, sha256: String::new() }).collect();
        let g = Guard::default();
        assert!(!g.unchanged(dir.path(), &files), "nothing verified yet");
        g.verified(dir.path(), &files);
        assert!(g.unchanged(dir.path(), &files));
        assert!(!g.unchanged(&dir.path().join("elsewhere"), &files), "another folder");
        // Rewritten with the same length: ctime moves even if mtime were set back.
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(dir.path().join("a"), b"ONE").unwrap();
        assert!(!g.unchanged(dir.path(), &files));
        g.verified(dir.path(), &files);
        // Replaced by another file (a new inode).
        std::fs::write(dir.path().join("b.new"), b"two").unwrap();
        std::fs::rename(dir.path().join("b.new"), dir.path().join("b")).unwrap();
        assert!(!g.unchanged(dir.path(), &files));
        // A missing file is never "unchanged".
        g.verified(dir.path(), &files);
        std::fs::remove_file(dir.path().join("b")).unwrap();
        assert!(!g.unchanged(dir.path(), &files));
    }
}
