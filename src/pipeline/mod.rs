//! The pipeline that takes a model version from the registry to the engine's door: the
//! [`pull`] job (resolve the stage or alias, list and download the artifact, verify every
//! file, smoke-test the folder, activate it atomically in the cache) and the [`Poller`] that
//! runs it on an interval and carries out the operations commands ask for (sync, pin,
//! rollback, verify, reject), one at a time; a rollback, reject or pin interrupts a running
//! pull rather than wait for it.
//!
//! ```text
//! registry::Client ──listing──▶ fetch::Downloader ──verified files──▶ cache::Store ──active──▶ (supervisor → engine)
//! ```
//!
//! The daemon must keep serving whatever happens here: a registry that is down, a stage
//! that empties, an alias that disappears or a version that fails its smoke test all leave
//! the active version in place and are reported on the poller's status channel.

mod guard;
pub mod poller;
pub mod pull;

pub use poller::{Condition, Poller, Status};
pub use pull::{PullError, PullEvent, PullOutcome, Puller};
