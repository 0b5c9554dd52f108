//! The poller: one task that keeps a model's active version in step with the registry.
//!
//! At start it serves what the cache holds (re-verified), without waiting for the registry.
//! Then, every `poll_interval` spread by per-device jitter, it pulls the stage or alias it
//! follows. Whatever happens (a new version, the stage emptied or the alias removed, the
//! model deleted, the registry down, a smoke test failed) the active version stays until a
//! verified, smoke-tested one replaces it; the outcome is published on a `watch` channel
//! for health reports and the engine manager.

use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::pull::{describe, Change, PullError, PullObserver, Puller};
use crate::backoff::Jitter;
use crate::config::Target;
use crate::fetch::Progress;

/// The version being served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActiveVersion {
    pub version: String,
    pub dir: std::path::PathBuf,
}

/// What the last poll found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "condition", rename_all = "snake_case")]
pub enum Condition {
    /// Nothing polled yet.
    Starting,
    /// The registry designates the active version.
    UpToDate,
    /// A version was activated.
    Updated { from: Option<String>, to: String },
    /// Damaged files of the active version were fetched again.
    Repaired { files: Vec<String> },
    /// The stage is empty or the alias was removed; the last-known-good version serves.
    TargetGone { detail: String },
    /// The registered model no longer exists; the last-known-good version serves.
    ModelDeleted,
    /// A version failed its smoke test and was not activated.
    Rejected { version: String, reason: String },
    /// The registry could not be reached; the cache serves.
    Unreachable { error: String },
    /// Any other failure (bad credentials, unsupported model, full disk...).
    Failed { error: String },
}

/// Published after every poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub model: String,
    pub target: String,
    pub active: Option<ActiveVersion>,
    pub condition: Condition,
    /// Unix seconds of the last poll.
    pub checked_at: Option<u64>,
    pub polls: u64,
}

pub struct Poller {
    puller: Puller,
    model: String,
    target: Target,
    jitter: Jitter,
    sync_now: Arc<Notify>,
    observer: PullObserver,
}

impl Poller {
    pub fn new(puller: Puller, model: String, target: Target, jitter: Jitter) -> Poller {
        Poller { puller, model, target, jitter, sync_now: Arc::new(Notify::new()), observer: Arc::new(|_| {}) }
    }

    /// Progress events of the pulls this poller starts.
    pub fn with_observer(mut self, observer: PullObserver) -> Poller {
        self.observer = observer;
        self
    }

    /// Wakes the poller for an immediate poll (a `Sync` command).
    pub fn sync_handle(&self) -> Arc<Notify> {
        self.sync_now.clone()
    }

    /// Starts the task; it ends when `cancel` fires.
    pub fn spawn(self, cancel: CancellationToken) -> (tokio::task::JoinHandle<()>, watch::Receiver<Status>) {
        let initial = Status { model: self.model.clone(), target: describe(&self.target), active: None, condition: Condition::Starting, checked_at: None, polls: 0 };
        let (tx, rx) = watch::channel(initial);
        let span = tracing::info_span!("poller", model = %self.model, target = %describe(&self.target));
        let handle = tokio::spawn(tracing::Instrument::instrument(self.run(tx, cancel), span));
        (handle, rx)
    }

    async fn run(self, tx: watch::Sender<Status>, cancel: CancellationToken) {
        // Serve from the cache first: the registry may be down, and that must not matter.
        match self.puller.load_active(&self.model, self.observer.clone()).await {
            Ok(Some(o)) => tx.send_modify(|s| s.active = Some(ActiveVersion { version: o.version, dir: o.dir })),
            Ok(None) => tracing::info!("nothing cached yet"),
            Err(e) => tracing::error!(error = %super::chain(&e), "the cached version cannot be served"),
        }
        let mut delay = self.jitter.first();
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
                () = self.sync_now.notified() => {}
            }
            let previous = tx.borrow().clone();
            let status = self.poll_once(&previous).await;
            tx.send_replace(status);
            delay = self.jitter.next();
        }
    }

    /// One poll: pull, then describe the result against the previous status.
    pub async fn poll_once(&self, previous: &Status) -> Status {
        let result = self.puller.pull(&self.model, &self.target, self.observer.clone(), Arc::new(Progress::default()), false).await;
        let mut status = previous.clone();
        status.polls += 1;
        status.checked_at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| d.as_secs());
        status.condition = match result {
            Ok(o) => {
                let condition = match o.change {
                    Change::Unchanged => Condition::UpToDate,
                    Change::Activated { previous, .. } => Condition::Updated { from: previous, to: o.version.clone() },
                    Change::Repaired { files } => Condition::Repaired { files },
                };
                status.active = Some(ActiveVersion { version: o.version, dir: o.dir });
                condition
            }
            Err(e) => {
                let text = super::chain(&e);
                match &e {
                    PullError::NothingToFollow { .. } => Condition::TargetGone { detail: e.to_string() },
                    _ if e.is_model_deleted() => Condition::ModelDeleted,
                    PullError::Rejected { version, reason, .. } => Condition::Rejected { version: version.clone(), reason: reason.clone() },
                    _ if e.is_unreachable() => Condition::Unreachable { error: text.clone() },
                    _ => Condition::Failed { error: text.clone() },
                }
            }
        };
        match &status.condition {
            Condition::UpToDate => tracing::debug!("up to date"),
            Condition::Updated { from, to } => tracing::info!(?from, %to, "new version active"),
            c => tracing::warn!(condition = ?c, active = ?status.active.as_ref().map(|a| &a.version), "keeping the active version"),
        }
        status
    }
}
