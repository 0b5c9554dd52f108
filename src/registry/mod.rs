//! The MLflow Model Registry side: the REST [`Client`], `MLmodel` flavor parsing, the
//! [`pull`] job that takes a version from the registry into the cache (fetch, verify, smoke
//! test, activate), and the [`Poller`] that runs it on an interval.
//!
//! The daemon must keep serving whatever happens here: a registry that is down, a stage
//! that empties, an alias that disappears or a version that fails its smoke test all leave
//! the active version in place and are reported on the poller's status channel.

mod client;
mod error;
pub mod mlmodel;
pub mod poller;
pub mod pull;

pub use client::{proxy_path, Auth, Client, ModelVersion, RemoteFile};
pub use error::RegistryError;
pub use poller::{Condition, Poller, Status};
pub use pull::{PullError, PullEvent, PullOutcome, Puller};

/// An error and its causes on one line, for logs and reports.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}
