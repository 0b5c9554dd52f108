//! The poller: one task that keeps a model's active version in step with the registry.
//!
//! At start it serves what the cache holds (re-verified), without waiting for the registry.
//! Then, every `poll_interval` spread by per-device jitter, it pulls the stage or alias it
//! follows. Whatever happens (a new version, the stage emptied or the alias removed, the
//! model deleted, the registry down, a smoke test failed) the active version stays until a
//! verified, smoke-tested one replaces it; the outcome is published on a `watch` channel
//! for health reports and the engine manager.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::pull::{describe, Change, PullError, PullObserver, Puller};
use crate::backoff::Jitter;
use crate::cache::{CacheError, Store};
use crate::fetch::Progress;
use crate::registry::Target;

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
    /// A command or the engine sent the device back to an earlier version.
    RolledBack { from: String, to: String, reason: String },
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

/// Published after every poll and every operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub model: String,
    pub target: String,
    pub active: Option<ActiveVersion>,
    pub condition: Condition,
    /// Unix seconds of the last poll.
    pub checked_at: Option<u64>,
    pub polls: u64,
    /// The version a `pin` fixed, served instead of the stage or alias.
    pub pinned: Option<String>,
    /// The cache has been read at start (and its active version, if any, published): from
    /// here on `active: None` means the cache is empty, not "not looked yet".
    pub cache_read: bool,
}

/// Something a command asks of the poller. Operations run between polls on the poller's
/// own task, so the registry and the cache only ever see one change at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Poll now.
    Sync,
    /// Serve this version (pulled if needed, even if refused before) and stop following
    /// the stage or alias; remembered across restarts.
    Pin(String),
    /// Follow the stage or alias again, and poll now.
    Unpin,
    /// Go back to the last-known-good version. The version left behind is marked bad, so
    /// later polls do not bring it back; a newer version is still taken when the registry
    /// designates one.
    Rollback { reason: String },
    /// Re-verify the active version's files, fetching damaged ones again.
    Verify,
    /// The engine could not serve `version` although it passed the smoke test (it failed
    /// to load in the daemon, or did not fit the memory budget): as a rollback.
    Reject { version: String, reason: String },
    /// The interval between polls (jitter unchanged).
    Interval(Duration),
}

/// An operation's answer: the status after it, or why it failed.
pub type OpResult = Result<Status, String>;

/// Submits [`Op`]s to a running poller. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Control {
    tx: mpsc::Sender<(Op, oneshot::Sender<OpResult>)>,
}

impl Control {
    /// Runs `op` on the poller and waits for its result.
    ///
    /// # Errors
    /// The operation's failure, or that the poller is busy with too many operations or
    /// has stopped.
    pub async fn call(&self, op: Op) -> OpResult {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send((op, reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => "the registry poller is busy with earlier commands; try again later".to_string(),
            mpsc::error::TrySendError::Closed(_) => "the registry poller has stopped".to_string(),
        })?;
        answer.await.map_err(|_| "the registry poller stopped before answering".to_string())?
    }
}

/// Operations waiting for the poller, at most.
const OPS_QUEUE: usize = 8;

pub struct Poller {
    puller: Puller,
    model: String,
    target: Target,
    jitter: Jitter,
    sync_now: Arc<Notify>,
    observer: PullObserver,
    ops_tx: mpsc::Sender<(Op, oneshot::Sender<OpResult>)>,
    ops_rx: mpsc::Receiver<(Op, oneshot::Sender<OpResult>)>,
}

impl Poller {
    pub fn new(puller: Puller, model: String, target: Target, jitter: Jitter) -> Poller {
        let (ops_tx, ops_rx) = mpsc::channel(OPS_QUEUE);
        Poller { puller, model, target, jitter, sync_now: Arc::new(Notify::new()), observer: Arc::new(|_| {}), ops_tx, ops_rx }
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

    /// The handle commands use to pin, roll back, verify.
    pub fn control(&self) -> Control {
        Control { tx: self.ops_tx.clone() }
    }

    /// Starts the task; it ends when `cancel` fires (a pull in progress is abandoned; its
    /// partial downloads resume at the next start).
    pub fn spawn(self, cancel: CancellationToken) -> (tokio::task::JoinHandle<()>, watch::Receiver<Status>) {
        let initial = Status {
            model: self.model.clone(),
            target: describe(&self.target),
            active: None,
            condition: Condition::Starting,
            checked_at: None,
            polls: 0,
            pinned: None,
            cache_read: false,
        };
        let (tx, rx) = watch::channel(initial);
        let span = tracing::info_span!("poller", model = %self.model, target = %describe(&self.target));
        let handle = tokio::spawn(tracing::Instrument::instrument(self.run(tx, cancel), span));
        (handle, rx)
    }

    async fn run(mut self, tx: watch::Sender<Status>, cancel: CancellationToken) {
        // Serve from the cache first: the registry may be down, and that must not matter.
        let loaded = tokio::select! {
            loaded = self.puller.load_active(&self.model, self.observer.clone()) => loaded,
            () = cancel.cancelled() => return,
        };
        let pinned = self.store_call(|store, model| store.model(model).map(|m| m.and_then(|m| m.pinned))).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not read the pinned version; following the target");
            None
        });
        tx.send_modify(|s| {
            s.pinned = pinned;
            s.cache_read = true;
            match loaded {
                Ok(Some(o)) => s.active = Some(ActiveVersion { version: o.version, dir: o.dir }),
                Ok(None) => tracing::info!("nothing cached yet"),
                Err(e) => tracing::error!(error = %crate::util::chain(&e), "the cached version cannot be served"),
            }
        });
        let mut delay = self.jitter.first();
        loop {
            let op = tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(delay) => None,
                () = self.sync_now.notified() => None,
                op = self.ops_rx.recv() => op,
            };
            let previous = tx.borrow().clone();
            match op {
                None => {
                    let Some(status) = cancellable(self.poll_once(&previous, false), &cancel).await else { break };
                    tx.send_replace(status);
                    delay = self.jitter.next();
                }
                // Operations leave the poll schedule alone.
                Some((op, reply)) => {
                    tracing::info!(?op, "operation");
                    let Some((status, failure)) = cancellable(self.apply(&op, previous), &cancel).await else { break };
                    tx.send_replace(status.clone());
                    let _ = reply.send(match failure {
                        None => Ok(status),
                        Some(e) => {
                            tracing::warn!(?op, error = %e, "operation failed");
                            Err(e)
                        }
                    });
                }
            }
        }
    }

    async fn store_call<T: Send + 'static>(&self, f: impl FnOnce(&Store, &str) -> Result<T, CacheError> + Send + 'static) -> Result<T, String> {
        let store = self.puller.store().clone();
        let model = self.model.clone();
        match tokio::task::spawn_blocking(move || f(&store, &model)).await {
            Ok(r) => r.map_err(|e| crate::util::chain(&e)),
            Err(e) => Err(format!("a cache task stopped unexpectedly: {e}")),
        }
    }

    /// Runs `op`; the status after it (changed or not), and the failure if it failed.
    async fn apply(&mut self, op: &Op, previous: Status) -> (Status, Option<String>) {
        let failed = |e: String| (previous.clone(), Some(e));
        match op {
            Op::Sync => (self.poll_once(&previous, false).await, None),
            Op::Pin(version) => {
                // A version the registry says does not exist is refused outright; one that
                // cannot be checked (registry down) is pinned and tried at every poll.
                match self.puller.client().model_version(&self.model, version).await {
                    Ok(mv) if !mv.is_ready() => {
                        // Still being registered, or its registration failed: nothing to serve.
                        return failed(format!("cannot pin version {version}: its registry status is {}, not READY", mv.status));
                    }
                    Ok(_) => {}
                    Err(e) if !e.is_unreachable() => return failed(format!("cannot pin version {version}: {}", crate::util::chain(&e))),
                    Err(_) => {}
                }
                let v = version.clone();
                if let Err(e) = self.store_call(move |store, model| store.set_pin(model, Some(&v))).await {
                    return failed(e);
                }
                let mut status = previous.clone();
                status.pinned = Some(version.clone());
                let status = self.poll_once(&status, true).await;
                if status.active.as_ref().map(|a| a.version.as_str()) != Some(version.as_str()) {
                    // The pin stays (the operator asked for it; a later poll may succeed),
                    // but the command says it is not served yet.
                    let e = format!("pinned to version {version}, but it is not active: {}", condition_text(&status.condition));
                    return (status, Some(e));
                }
                (status, None)
            }
            Op::Unpin => {
                if let Err(e) = self.store_call(|store, model| store.set_pin(model, None)).await {
                    return failed(e);
                }
                let mut status = previous.clone();
                status.pinned = None;
                (self.poll_once(&status, false).await, None)
            }
            Op::Rollback { reason } => self.roll_back(&previous, None, reason).await.map_or_else(failed, |s| (s, None)),
            Op::Reject { version, reason } => self.roll_back(&previous, Some(version), reason).await.map_or_else(failed, |s| (s, None)),
            Op::Verify => match self.puller.load_active(&self.model, self.observer.clone()).await {
                Ok(Some(o)) => {
                    let mut status = previous.clone();
                    match o.change {
                        Change::Repaired { files } => status.condition = Condition::Repaired { files },
                        Change::Activated { previous: from, .. } => {
                            status.condition = Condition::RolledBack {
                                from: from.unwrap_or_default(),
                                to: o.version.clone(),
                                reason: "the active version was damaged and could not be repaired".into(),
                            };
                        }
                        Change::Unchanged => {}
                    }
                    status.active = Some(ActiveVersion { version: o.version, dir: o.dir });
                    (status, None)
                }
                Ok(None) => failed("no version is cached yet".to_string()),
                Err(e) => failed(crate::util::chain(&e)),
            },
            Op::Interval(d) => {
                self.jitter.interval = *d;
                (previous, None)
            }
        }
    }

    /// Activates the last-known-good version and marks `version` (or the active one) bad.
    async fn roll_back(&self, previous: &Status, version: Option<&String>, reason: &str) -> OpResult {
        let leaving = match version {
            Some(v) => v.clone(),
            None => previous.active.as_ref().map(|a| a.version.clone()).ok_or_else(|| "no version is active; there is nothing to roll back from".to_string())?,
        };
        let l = leaving.clone();
        let lkg = self.store_call(move |store, model| Ok(store.last_known_good(model)?.filter(|r| r.version != l))).await?;
        let mut status = previous.clone();
        match lkg {
            Some(rec) => {
                let dir = self.puller.activate_cached(&rec).await.map_err(|e| crate::util::chain(&e))?;
                let (l, r) = (leaving.clone(), reason.to_string());
                self.store_call(move |store, model| store.mark_bad(model, &l, &r)).await?;
                status.condition = Condition::RolledBack { from: leaving.clone(), to: rec.version.clone(), reason: reason.to_string() };
                status.active = Some(ActiveVersion { version: rec.version, dir });
                Ok(status)
            }
            None if version.is_some() => {
                // Nothing to go back to: record the refusal so the version is not retried.
                let (l, r) = (leaving.clone(), reason.to_string());
                self.store_call(move |store, model| store.mark_bad(model, &l, &r)).await?;
                status.condition = Condition::Rejected { version: leaving, reason: reason.to_string() };
                Ok(status)
            }
            None => Err(format!("no earlier good version of `{}` is in the cache to roll back to", self.model)),
        }
    }

    /// One poll: pull, then describe the result against the previous status. `operator`
    /// retries a version refused earlier (an explicit `pin`).
    pub async fn poll_once(&self, previous: &Status, operator: bool) -> Status {
        let result = match &previous.pinned {
            Some(version) => match self.puller.client().model_version(&self.model, version).await {
                Ok(mv) => self.puller.install(&mv, self.observer.clone(), Arc::new(Progress::default()), operator).await,
                Err(source) => Err(PullError::Registry { step: "looking up the pinned version", model: self.model.clone(), version: version.clone(), source }),
            },
            None => self.puller.pull(&self.model, &self.target, self.observer.clone(), Arc::new(Progress::default()), operator).await,
        };
        let mut status = previous.clone();
        status.polls += 1;
        status.checked_at = Some(crate::util::unix_now());
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
                let text = crate::util::chain(&e);
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

async fn cancellable<T>(f: impl std::future::Future<Output = T>, cancel: &CancellationToken) -> Option<T> {
    tokio::select! {
        v = f => Some(v),
        () = cancel.cancelled() => None,
    }
}

/// A condition in words, for command replies.
pub fn condition_text(c: &Condition) -> String {
    match c {
        Condition::Starting => "nothing polled yet".into(),
        Condition::UpToDate => "up to date".into(),
        Condition::Updated { from, to } => format!("updated from {} to {to}", from.as_deref().unwrap_or("none")),
        Condition::Repaired { files } => format!("repaired {}", files.join(", ")),
        Condition::RolledBack { from, to, reason } => format!("rolled back from {from} to {to}: {reason}"),
        Condition::TargetGone { detail } => detail.clone(),
        Condition::ModelDeleted => "the registered model was deleted".into(),
        Condition::Rejected { version, reason } => format!("version {version} refused: {reason}"),
        Condition::Unreachable { error } => format!("registry unreachable: {error}"),
        Condition::Failed { error } => error.clone(),
    }
}
