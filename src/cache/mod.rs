//! The local model cache: content-addressed blobs, `sled` metadata, atomic activation.
//!
//! ```text
//! <root>/blobs/<sha256>              verified file contents, read-only, shared by versions
//! <root>/models/<slug>/v<ver>.<gen>/ one version as the engine loads it: hard links to blobs
//! <root>/models/<slug>/active        symlink to the active version's folder, swapped atomically
//! <root>/tmp/                        partial downloads (+ their resume state) and staging
//! <root>/index/                      sled: version records and per-model state
//! <root>/index.corrupt-<unix>/       a damaged index, moved aside (see recover.rs)
//! ```
//!
//! The bytes and their digests are the truth: a blob's name is its sha256, and a record
//! only ever points at blobs that were verified before they were renamed into place. A
//! version's folder is built in `tmp/` and renamed into `models/` whole, and it becomes
//! active only by swapping the `active` symlink, so a reader (the engine, `cache path`)
//! sees the old version or the new one, never a half-written one. Repairing a version
//! builds a new generation of its folder instead of editing the one in use.
//!
//! sled takes an exclusive lock on the index; a second process that only needs the active
//! folder reads the symlink ([`active_dir`]) instead.

mod blobs;
mod error;
mod gc;
mod index;
mod records;
mod recover;
pub mod settings;
mod store;
#[cfg(test)]
mod test_support;

pub use error::CacheError;
pub(crate) use index::{is_damaged, open_sled, quarantine};
pub use records::{Corruption, FileRecord, GcReport, ModelRecord, State, VersionRecord};
pub use recover::IndexRecovery;
pub use store::{active_dir, Store};
