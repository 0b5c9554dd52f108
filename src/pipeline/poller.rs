//! The poller: one task that keeps a model's active version in step with the registry.
//!
//! At start it serves what the cache holds (re-verified), without waiting for the registry.
//! Then, every `poll_interval` spread by per-device jitter, it pulls the stage or alias it
//! follows. Whatever happens (a new version, the stage emptied or the alias removed, the
//! model deleted, the registry down, a smoke test failed) the active version stays until a
//! verified, smoke-tested one replaces it; the outcome is published on a `watch` channel
//! for health reports and the engine manager.
//!
//! Operations (sync, pin, unpin, rollback, verify, reject, interval) arrive on a bounded
//! queue and run on this task one at a time, so the cache sees one change at a time. The
//! queue is read while a job (a poll or an operation) runs, so that an emergency never waits
//! for a download: a rollback, a reject or a pin interrupts a running pull (a poll, a sync,
//! an unpin, a verify or another pin) and runs as soon as that pull has stopped, which is at
//! once while it downloads (partial files stay and resume later) and after its commit if it
//! was already storing, publishing or smoke-testing the version. What each other operation
//! does meanwhile is decided in [`Poller::on_request`]. Every caller gets an answer saying
//! what happened: its result, that its job was interrupted and by what, that it was not run
//! because a later rollback or pin superseded it, or (from [`Control::call_within`]) that it
//! is still running or was withdrawn before it started.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
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
    /// The pull stopped before it changed the cache because `by` (a rollback, a reject or a
    /// pin) went first; its partial downloads resume at the next attempt.
    Interrupted { by: String },
}

impl Condition {
    /// The condition's name in `/status`, reports and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Condition::Starting => "starting",
            Condition::UpToDate => "up_to_date",
            Condition::Updated { .. } => "updated",
            Condition::Repaired { .. } => "repaired",
            Condition::RolledBack { .. } => "rolled_back",
            Condition::TargetGone { .. } => "target_gone",
            Condition::ModelDeleted => "model_deleted",
            Condition::Rejected { .. } => "rejected",
            Condition::Unreachable { .. } => "unreachable",
            Condition::Failed { .. } => "failed",
            Condition::Interrupted { .. } => "interrupted",
        }
    }

    /// Whether a poll that ended here succeeded: the registry answered, whatever it said
    /// (a version refused by its smoke test or a stage emptied is an answer, not a fault).
    pub fn succeeded(&self) -> bool {
        !matches!(self, Condition::Starting | Condition::Unreachable { .. } | Condition::Failed { .. } | Condition::Interrupted { .. })
    }
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

/// Something a command asks of the poller. Operations run one at a time on the poller's own
/// task, so the registry and the cache only ever see one change at a time; a rollback, a
/// reject or a pin interrupts a running pull (see [`Poller::on_request`]).
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

impl Op {
    /// The operator's and the engine's ways back to a known version: they interrupt a
    /// running pull instead of waiting for it.
    fn preempts(&self) -> bool {
        matches!(self, Op::Rollback { .. } | Op::Reject { .. } | Op::Pin(_))
    }

    /// The operation in words, for logs, statuses and replies.
    fn describe(&self) -> String {
        match self {
            Op::Sync => "a sync".into(),
            Op::Pin(v) => format!("a pin to version {v}"),
            Op::Unpin => "an unpin".into(),
            Op::Rollback { reason } => format!("a rollback ({reason})"),
            Op::Verify => "a verification of the active version".into(),
            Op::Reject { version, .. } => format!("the engine's refusal of version {version}"),
            Op::Interval(d) => format!("a change of the poll interval to {}", humantime::format_duration(*d)),
        }
    }
}

/// An operation's answer: the status after it, or why it failed.
pub type OpResult = Result<Status, String>;

/// Whether a submitted operation has started. The poller and the caller share it so that
/// exactly one of them decides its fate: the poller starts it, or the caller (tired of
/// waiting) withdraws it and it never runs.
#[derive(Debug, Default)]
struct Ticket(AtomicU8);

impl Ticket {
    const QUEUED: u8 = 0;
    const STARTED: u8 = 1;
    const WITHDRAWN: u8 = 2;

    /// The poller's side: false when the caller withdrew it first.
    fn start(&self) -> bool {
        self.0.compare_exchange(Self::QUEUED, Self::STARTED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The caller's side: false when the poller started it first.
    fn withdraw(&self) -> bool {
        self.0.compare_exchange(Self::QUEUED, Self::WITHDRAWN, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// An operation on its way to the poller.
struct Submitted {
    op: Op,
    reply: oneshot::Sender<OpResult>,
    ticket: Arc<Ticket>,
}

impl Submitted {
    /// Marks the operation started and hands back its reply channel, unless its caller has
    /// gone (the receiver dropped: it timed out, or its task ended) or withdrew it: such an
    /// operation is not run late, when nobody is told about it any more.
    fn claim(self) -> Option<(Op, oneshot::Sender<OpResult>)> {
        if self.reply.is_closed() || !self.ticket.start() {
            tracing::info!(op = ?self.op, "skipping an operation whose caller stopped waiting for it");
            return None;
        }
        Some((self.op, self.reply))
    }
}

/// Submits [`Op`]s to a running poller. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Control {
    tx: mpsc::Sender<Submitted>,
}

impl std::fmt::Debug for Submitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitted").field("op", &self.op).finish_non_exhaustive()
    }
}

impl Control {
    /// Runs `op` on the poller and waits for its result, however long it takes.
    ///
    /// # Errors
    /// The operation's failure (an interruption included), or that the poller is busy with
    /// too many operations or has stopped.
    pub async fn call(&self, op: Op) -> OpResult {
        let (answer, _ticket) = self.submit(op)?;
        answer.await.map_err(|_| stopped())?
    }

    /// Runs `op` on the poller and waits at most `limit` for its result. When the time is
    /// up, an operation that has not started is withdrawn (it will not run) and one that has
    /// is left to finish; the error says which.
    ///
    /// # Errors
    /// As [`Control::call`], and the two above.
    pub async fn call_within(&self, op: Op, limit: Duration) -> OpResult {
        let what = op.describe();
        let (answer, ticket) = self.submit(op)?;
        let after = humantime::format_duration(limit);
        match tokio::time::timeout(limit, answer).await {
            Ok(answer) => answer.map_err(|_| stopped())?,
            Err(_) if ticket.withdraw() => {
                Err(format!("{what} had not started after {after} because the registry poller was busy with earlier work; it was withdrawn and will not run"))
            }
            Err(_) => Err(format!("{what} is still running after {after}; the status report will show its outcome")),
        }
    }

    fn submit(&self, op: Op) -> Result<(oneshot::Receiver<OpResult>, Arc<Ticket>), String> {
        let (reply, answer) = oneshot::channel();
        let ticket = Arc::new(Ticket::default());
        self.tx.try_send(Submitted { op, reply, ticket: ticket.clone() }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => "the registry poller is busy with earlier commands; try again later".to_string(),
            mpsc::error::TrySendError::Closed(_) => "the registry poller has stopped".to_string(),
        })?;
        Ok((answer, ticket))
    }
}

fn stopped() -> String {
    "the registry poller stopped before answering".to_string()
}

/// Operations waiting for the poller, at most: this many in the channel, and as many again
/// taken off it while a job runs (the channel is not read while those are full).
const OPS_QUEUE: usize = 8;

pub struct Poller {
    puller: Puller,
    model: String,
    target: Target,
    jitter: Jitter,
    sync_now: Arc<Notify>,
    observer: PullObserver,
    ops_tx: mpsc::Sender<Submitted>,
    ops_rx: mpsc::Receiver<Submitted>,
}

/// How a running job is told to stop its pull: the token its puller watches, and what
/// interrupted it, for its status and its callers.
#[derive(Clone, Default)]
struct Interrupt {
    token: CancellationToken,
    by: Arc<OnceLock<String>>,
}

impl Interrupt {
    fn fire(&self, by: String) {
        let _ = self.by.set(by);
        self.token.cancel();
    }

    fn by(&self) -> String {
        self.by.get().cloned().unwrap_or_else(|| "another operation".to_string())
    }
}

/// The job the poller is running: a poll (`op: None`, started by the schedule or
/// [`Poller::sync_handle`]) or an operation.
struct Running {
    op: Option<Op>,
    /// The operation's caller.
    reply: Option<oneshot::Sender<OpResult>>,
    /// `sync` callers that joined this poll instead of starting another.
    joined: Vec<oneshot::Sender<OpResult>>,
    interrupt: Interrupt,
    work: BoxFuture<'static, (Status, Option<String>)>,
}

impl Running {
    /// Jobs that may spend minutes in a pull, which a rollback, a reject or a pin
    /// interrupts. A rollback or a reject itself is never interrupted: it is short (a hash
    /// of cached files and a symlink swap) and stopping it between activating the old
    /// version and marking the new one bad would let the next poll bring that one back.
    fn interruptible(&self) -> bool {
        matches!(self.op, None | Some(Op::Sync | Op::Unpin | Op::Verify | Op::Pin(_)))
    }

    /// Jobs that are "a poll of what the device follows now", which a `sync` can join.
    fn is_poll(&self) -> bool {
        matches!(self.op, None | Some(Op::Sync | Op::Unpin))
    }

    fn describe(&self) -> String {
        self.op.as_ref().map_or_else(|| "a scheduled poll".to_string(), Op::describe)
    }
}

/// What woke the poller's loop.
enum Wake {
    Poll,
    Request(Submitted),
    Done((Status, Option<String>)),
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

    /// A worker for one job, with its own interrupt.
    fn worker(&self, interrupt: &Interrupt) -> Worker {
        Worker {
            puller: self.puller.interruptible(interrupt.token.clone()),
            model: self.model.clone(),
            target: self.target.clone(),
            observer: self.observer.clone(),
            interrupt: interrupt.clone(),
        }
    }

    async fn run(mut self, tx: watch::Sender<Status>, cancel: CancellationToken) {
        // Serve from the cache first: the registry may be down, and that must not matter.
        let loaded = tokio::select! {
            loaded = self.puller.load_active(&self.model, self.observer.clone()) => loaded,
            () = cancel.cancelled() => return,
        };
        let pinned = self.worker(&Interrupt::default()).store_call(|store, model| store.model(model).map(|m| m.and_then(|m| m.pinned))).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not read the pinned version; following the target");
            None
        });
        let nothing_cached = matches!(loaded, Ok(None));
        tx.send_modify(|s| {
            s.pinned = pinned;
            s.cache_read = true;
            match loaded {
                Ok(Some(o)) => s.active = Some(ActiveVersion { version: o.version, dir: o.dir }),
                Ok(None) => tracing::info!("nothing cached yet"),
                Err(e) => tracing::error!(error = %crate::util::chain(&e), "the cached version cannot be served"),
            }
        });
        // Operations leave the poll schedule alone. A device with nothing to serve asks at
        // once; the spread of the first poll is for devices that serve meanwhile (a fleet
        // restarting together after a power cut must not storm the registry).
        let first = if nothing_cached { Duration::ZERO } else { self.jitter.first() };
        let mut next_poll = Instant::now() + first;
        let mut pending: VecDeque<Submitted> = VecDeque::new();
        let mut running: Option<Running> = None;
        loop {
            if running.is_none() {
                if let Some(submitted) = pending.pop_front() {
                    if let Some((op, reply)) = submitted.claim() {
                        tracing::info!(?op, "operation");
                        running = Some(self.start(Some(op), Some(reply), &tx));
                    }
                    continue;
                }
            }
            let idle = running.is_none();
            let wake = tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep_until(next_poll), if idle => Wake::Poll,
                () = self.sync_now.notified(), if idle => Wake::Poll,
                Some(submitted) = self.ops_rx.recv(), if pending.len() < OPS_QUEUE => Wake::Request(submitted),
                done = work(&mut running) => Wake::Done(done),
            };
            match wake {
                Wake::Poll => running = Some(self.start(None, None, &tx)),
                Wake::Request(submitted) => self.on_request(submitted, running.as_mut(), &mut pending, &tx),
                Wake::Done((status, failure)) => {
                    let Some(job) = running.take() else { continue };
                    if job.op.is_none() {
                        next_poll = Instant::now() + self.jitter.next();
                    }
                    finish(job, status, failure, &tx);
                }
            }
        }
    }

    /// Starts a job on the current status.
    fn start(&self, op: Option<Op>, reply: Option<oneshot::Sender<OpResult>>, tx: &watch::Sender<Status>) -> Running {
        let interrupt = Interrupt::default();
        let worker = self.worker(&interrupt);
        let previous = tx.borrow().clone();
        let job = op.clone();
        let work: BoxFuture<'static, (Status, Option<String>)> = Box::pin(async move { worker.run(job, previous).await });
        Running { op, reply, joined: Vec::new(), interrupt, work }
    }

    /// An operation that arrived, while `running` runs (or nothing does). Each kind:
    /// - `interval`: applied at once, whatever runs; it only moves the poll after next, so
    ///   there is nothing to wait for.
    /// - `sync` while a poll of what the device follows runs (a scheduled poll, a sync, an
    ///   unpin): joins it and gets its result; a second poll right after would find the
    ///   same. Otherwise it waits its turn.
    /// - `rollback`, `reject`, `pin`: interrupt a running pull (poll, sync, unpin, verify,
    ///   pin) and run as soon as it has stopped. Queued syncs, unpins and verifies are answered
    ///   as not run, since they would only delay it and what they ask for it supersedes (it
    ///   polls or verifies itself, and a later pin or rollback decides what serves). Queued
    ///   rollbacks, rejects and pins keep their order, ahead of it. A running rollback or
    ///   reject is not interrupted.
    /// - `unpin`, `verify`, and a `sync` that cannot join: wait their turn.
    fn on_request(&mut self, submitted: Submitted, running: Option<&mut Running>, pending: &mut VecDeque<Submitted>, tx: &watch::Sender<Status>) {
        match (&submitted.op, running) {
            (Op::Interval(d), _) => {
                let d = *d;
                if let Some((op, reply)) = submitted.claim() {
                    tracing::info!(?op, "operation");
                    self.jitter.interval = d;
                    let _ = reply.send(Ok(tx.borrow().clone()));
                }
            }
            (Op::Sync, Some(job)) if job.is_poll() => {
                if let Some((_, reply)) = submitted.claim() {
                    tracing::info!(joins = %job.describe(), "sync: a poll is running; answering with its result");
                    job.joined.push(reply);
                }
            }
            (op, job) if op.preempts() => {
                let by = op.describe();
                if let Some(job) = job.filter(|j| j.interruptible()) {
                    tracing::warn!(interrupted = %job.describe(), by = %by, "interrupting the running pull; its partial downloads stay for the next attempt");
                    job.interrupt.fire(by.clone());
                }
                let mut kept = VecDeque::with_capacity(pending.len() + 1);
                for queued in pending.drain(..) {
                    if queued.op.preempts() {
                        kept.push_back(queued);
                        continue;
                    }
                    let what = queued.op.describe();
                    if let Some((op, reply)) = queued.claim() {
                        tracing::warn!(?op, by = %by, "not running a queued operation: a later one supersedes it");
                        let _ = reply.send(Err(format!("{what} was not run: {by} arrived while it waited and went first; send it again if it is still wanted")));
                    }
                }
                kept.push_back(submitted);
                *pending = kept;
            }
            _ => pending.push_back(submitted),
        }
    }
}

/// The running job's result, or never when nothing runs (a disabled `select!` branch still
/// builds its future, so this must not assume a job).
async fn work(running: &mut Option<Running>) -> (Status, Option<String>) {
    match running {
        Some(job) => (&mut job.work).await,
        None => std::future::pending().await,
    }
}

/// Publishes a finished job's status and answers its caller and the syncs that joined it.
fn finish(job: Running, status: Status, failure: Option<String>, tx: &watch::Sender<Status>) {
    tx.send_replace(status.clone());
    // (A verify leaves the condition as it was, which may be an earlier interruption.)
    if let (Condition::Interrupted { by }, true) = (&status.condition, job.interrupt.token.is_cancelled()) {
        tracing::warn!(job = %job.describe(), %by, "interrupted before it changed the cache; the active version is unchanged");
    }
    let answer = match failure {
        None => Ok(status),
        Some(e) => {
            tracing::warn!(job = %job.describe(), error = %e, "operation failed");
            Err(e)
        }
    };
    for reply in job.joined {
        let _ = reply.send(answer.clone());
    }
    if let Some(reply) = job.reply {
        let _ = reply.send(answer);
    }
}

/// What one job needs, owned, so that it runs beside the loop that takes operations.
struct Worker {
    puller: Puller,
    model: String,
    target: Target,
    observer: PullObserver,
    interrupt: Interrupt,
}

impl Worker {
    /// Runs a poll (`None`) or an operation; the status after it, and the failure if it
    /// failed. A poll interrupted by a rollback or a pin is a failure for whoever waits on it.
    async fn run(self, op: Option<Op>, previous: Status) -> (Status, Option<String>) {
        match op {
            None => {
                let status = self.poll_once(&previous, false).await;
                let failure = interrupted(&status);
                (status, failure)
            }
            Some(op) => self.apply(&op, previous).await,
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
    async fn apply(&self, op: &Op, previous: Status) -> (Status, Option<String>) {
        let failed = |e: String| (previous.clone(), Some(e));
        match op {
            Op::Sync => {
                let status = self.poll_once(&previous, false).await;
                let failure = interrupted(&status);
                (status, failure)
            }
            Op::Pin(version) => {
                // A version the registry says does not exist is refused outright; one that
                // cannot be checked (registry down) is pinned and tried at every poll.
                let Ok(looked_up) = self.puller.unless_interrupted(self.puller.client().model_version(&self.model, version)).await else {
                    let by = self.interrupt.by();
                    return failed(format!("{} was interrupted by {by} before it was recorded; nothing changed", op.describe()));
                };
                match looked_up {
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
                let status = self.poll_once(&status, false).await;
                let failure = interrupted(&status).map(|e| format!("unpinned, but the poll after it did not finish: {e}"));
                (status, failure)
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
                Err(PullError::Interrupted) => {
                    let mut status = previous.clone();
                    status.condition = Condition::Interrupted { by: self.interrupt.by() };
                    let e = format!("{} was interrupted: {}", op.describe(), condition_text(&status.condition));
                    (status, Some(e))
                }
                Err(e) => failed(crate::util::chain(&e)),
            },
            // Applied by the loop as it arrives (see `Poller::on_request`).
            Op::Interval(_) => (previous, None),
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
    async fn poll_once(&self, previous: &Status, operator: bool) -> Status {
        let result = match &previous.pinned {
            Some(version) => match self.puller.unless_interrupted(self.puller.client().model_version(&self.model, version)).await {
                Ok(Ok(mv)) => self.puller.install(&mv, self.observer.clone(), Arc::new(Progress::default()), operator).await,
                Ok(Err(source)) => Err(PullError::Registry { step: "looking up the pinned version", model: self.model.clone(), version: version.clone(), source }),
                Err(e) => Err(e),
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
                    PullError::Interrupted => Condition::Interrupted { by: self.interrupt.by() },
                    PullError::NothingToFollow { .. } => Condition::TargetGone { detail: e.to_string() },
                    _ if e.is_model_deleted() => Condition::ModelDeleted,
                    PullError::Rejected { version, reason, .. } => Condition::Rejected { version: version.clone(), reason: reason.clone() },
                    _ if e.is_unreachable() => Condition::Unreachable { error: text.clone() },
                    _ => Condition::Failed { error: text.clone() },
                }
            }
        };
        let metrics = self.puller.client().metrics();
        metrics.poll(status.condition.name(), status.condition.succeeded(), status.checked_at.unwrap_or_default());
        match &status.condition {
            Condition::UpToDate => tracing::debug!("up to date"),
            Condition::Updated { from, to } => tracing::info!(?from, %to, "new version active"),
            c => tracing::warn!(condition = ?c, active = ?status.active.as_ref().map(|a| &a.version), "keeping the active version"),
        }
        status
    }
}

/// A poll's failure for whoever waits on it when it was interrupted. (Other outcomes of a
/// poll, the registry down included, are its result, as they always were.)
fn interrupted(status: &Status) -> Option<String> {
    matches!(status.condition, Condition::Interrupted { .. }).then(|| condition_text(&status.condition))
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
        Condition::Interrupted { by } => format!("the pull was interrupted by {by}; its partial downloads are kept and resume at the next poll"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submitted(op: Op) -> (Submitted, oneshot::Receiver<OpResult>, Arc<Ticket>) {
        let (reply, answer) = oneshot::channel();
        let ticket = Arc::new(Ticket::default());
        (Submitted { op, reply, ticket: ticket.clone() }, answer, ticket)
    }

    #[test]
    fn an_operation_is_either_started_or_withdrawn() {
        let t = Ticket::default();
        assert!(t.start());
        assert!(!t.withdraw(), "started: too late to withdraw");
        let t = Ticket::default();
        assert!(t.withdraw());
        assert!(!t.start(), "withdrawn: never started");
    }

    #[test]
    fn an_operation_whose_caller_is_gone_is_skipped() {
        // The caller's future was dropped (a timeout around `call`, an aborted task).
        let (s, answer, _) = submitted(Op::Unpin);
        drop(answer);
        assert!(s.claim().is_none());
        // The caller withdrew it (`call_within` out of time), receiver not yet dropped.
        let (s, _answer, ticket) = submitted(Op::Unpin);
        assert!(ticket.withdraw());
        assert!(s.claim().is_none());
        // A caller still waiting: claimed, and from then on it cannot be withdrawn.
        let (s, _answer, ticket) = submitted(Op::Unpin);
        let (op, _reply) = s.claim().expect("claimed");
        assert_eq!(op, Op::Unpin);
        assert!(!ticket.withdraw());
    }

    #[test]
    fn only_the_ways_back_preempt() {
        let table = [
            (Op::Rollback { reason: "r".into() }, true),
            (Op::Reject { version: "2".into(), reason: "r".into() }, true),
            (Op::Pin("1".into()), true),
            (Op::Sync, false),
            (Op::Unpin, false),
            (Op::Verify, false),
            (Op::Interval(Duration::from_secs(60)), false),
        ];
        for (op, preempts) in table {
            assert_eq!(op.preempts(), preempts, "{op:?}");
        }
    }

    /// A stand-in poller on the other end of a `Control`: takes one operation and, if
    /// `start`, claims it and never answers (it is "running").
    fn fake_poller(start: bool) -> (Control, tokio::task::JoinHandle<Option<Submitted>>) {
        let (tx, mut rx) = mpsc::channel::<Submitted>(1);
        let task = tokio::spawn(async move {
            let s = rx.recv().await?;
            if !start {
                return Some(s);
            }
            let claimed = s.claim();
            assert!(claimed.is_some());
            tokio::time::sleep(Duration::from_secs(3600)).await;
            None
        });
        (Control { tx }, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_out_of_time_hears_whether_its_operation_runs() {
        let (control, _running) = fake_poller(true);
        let e = control.call_within(Op::Pin("2".into()), Duration::from_secs(840)).await.unwrap_err();
        assert_eq!(e, "a pin to version 2 is still running after 14m; the status report will show its outcome");

        let (control, queued) = fake_poller(false);
        let e = control.call_within(Op::Rollback { reason: "r".into() }, Duration::from_secs(30)).await.unwrap_err();
        assert_eq!(e, "a rollback (r) had not started after 30s because the registry poller was busy with earlier work; it was withdrawn and will not run");
        let s = queued.await.unwrap().expect("the operation reached the poller");
        assert!(s.claim().is_none(), "a withdrawn operation is not run when its turn comes");
    }
}
