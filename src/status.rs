//! The daemon's status, published on a `tokio::sync::watch`: the one source the fleet link's
//! health reports, the `/status` document (`edgeflow status`) and systemd's STATUS= read. The task that owns each piece (the
//! registry poller, the model manager) updates its part with [`Publisher::update`]; readers
//! take a snapshot whenever they report, so nothing here is ever waited on.

use std::path::PathBuf;

use serde::Serialize;
use tokio::sync::watch;

/// What the daemon is doing, as far as reports are concerned.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// Unix seconds when the daemon started.
    pub started_at: u64,
    /// The version serving requests, if any.
    pub model: Option<ModelStatus>,
    /// The last registry poll.
    pub registry: Option<PollStatus>,
    /// A version pinned by a command, overriding the stage or alias.
    pub pinned: Option<String>,
    /// The last version the engine could not serve (load failure, memory budget), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_failure: Option<LoadFailure>,
}

impl Default for Status {
    fn default() -> Self {
        Status { started_at: crate::util::unix_now(), model: None, registry: None, pinned: None, load_failure: None }
    }
}

/// A version the engine refused to serve, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadFailure {
    pub version: String,
    pub reason: String,
    /// Unix seconds.
    pub at: u64,
}

/// The active model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelStatus {
    pub name: String,
    pub version: String,
    /// Content digest of the version, when known.
    pub digest: Option<String>,
    /// What the device follows: `stage:Production` or `alias:champion`.
    pub target: Option<String>,
    /// Unix seconds of the activation.
    pub activated_at: Option<u64>,
    /// The version's folder; drift reporting looks for `drift_baseline.json` in it.
    #[serde(skip)]
    pub dir: Option<PathBuf>,
}

/// The outcome of the last registry poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PollStatus {
    /// Unix seconds of the poll.
    pub checked_at: Option<u64>,
    /// `starting`, `up_to_date`, `updated`, `repaired`, `rolled_back`, `target_gone`, `model_deleted`,
    /// `rejected`, `unreachable`, `failed` or `interrupted` (a rollback or a pin stopped the pull).
    pub outcome: String,
    /// The error or the change, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub polls: u64,
}

/// Longest `detail` reported (health reports go to the broker whole or not at all).
const MAX_DETAIL: usize = 2048;

impl From<&crate::pipeline::Status> for PollStatus {
    fn from(s: &crate::pipeline::Status) -> Self {
        use crate::pipeline::Condition as C;
        let detail = match &s.condition {
            C::Starting | C::UpToDate | C::ModelDeleted => None,
            C::Updated { from, to } => Some(format!("{} -> {to}", from.as_deref().unwrap_or("none"))),
            C::Repaired { files } => Some(files.join(", ")),
            C::RolledBack { from, to, reason } => Some(format!("{from} -> {to}: {reason}")),
            C::TargetGone { detail } => Some(detail.clone()),
            C::Rejected { version, reason } => Some(format!("version {version}: {reason}")),
            C::Unreachable { error } | C::Failed { error } => Some(error.clone()),
            C::Interrupted { by } => Some(format!("by {by}")),
        };
        let outcome = s.condition.name();
        // Errors carry text from the registry: bounded, so a health report always fits.
        let detail = detail.map(|d| crate::util::clip(&d, MAX_DETAIL));
        PollStatus { checked_at: s.checked_at, outcome: outcome.to_string(), detail, polls: s.polls }
    }
}

/// The writing side; cloneable, each owner updates its own fields.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: std::sync::Arc<watch::Sender<Status>>,
}

impl Publisher {
    /// Changes the status in place and notifies readers.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        self.tx.send_modify(f);
    }

    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.tx.subscribe()
    }
}

/// A status channel starting from `Status::default()` (started now, nothing active).
pub fn channel() -> (Publisher, watch::Receiver<Status>) {
    let (tx, rx) = watch::channel(Status::default());
    (Publisher { tx: std::sync::Arc::new(tx) }, rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{Condition, Status as RegistryStatus};

    #[test]
    fn poll_outcomes_are_named_for_reports() {
        let base = RegistryStatus {
            model: "m".into(),
            target: "stage Production".into(),
            active: None,
            condition: Condition::UpToDate,
            checked_at: Some(5),
            polls: 2,
            pinned: None,
            cache_read: true,
        };
        let table = [
            (Condition::UpToDate, "up_to_date", None),
            (Condition::Updated { from: None, to: "3".into() }, "updated", Some("none -> 3")),
            (Condition::Rejected { version: "4".into(), reason: "smoke test".into() }, "rejected", Some("version 4: smoke test")),
            (Condition::Unreachable { error: "refused".into() }, "unreachable", Some("refused")),
            (Condition::Interrupted { by: "a pin to version 1".into() }, "interrupted", Some("by a pin to version 1")),
        ];
        for (condition, outcome, detail) in table {
            let p = PollStatus::from(&RegistryStatus { condition, ..base.clone() });
            assert_eq!((p.outcome.as_str(), p.detail.as_deref(), p.checked_at, p.polls), (outcome, detail, Some(5), 2));
        }
    }

    #[test]
    fn updates_reach_every_reader() {
        let (publisher, rx) = channel();
        let second = publisher.subscribe();
        publisher.update(|s| s.pinned = Some("7".into()));
        assert_eq!(rx.borrow().pinned.as_deref(), Some("7"));
        assert!(second.has_changed().unwrap());
    }
}
