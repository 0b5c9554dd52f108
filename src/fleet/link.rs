//! The fleet link's public face: the [`Link`] builder, [`Link::spawn`] (opens the spool,
//! loads what it remembers and starts the link task, [`super::runner`]), and what the daemon
//! holds of the running task: [`LinkHandle`], [`LinkSender`] and the [`LinkState`] it
//! publishes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::commands::{Policy, Recent};
use super::events::Event;
use super::health::{HostSampler, RequestWindow};
use super::reconnect::Reconnect;
use super::replies::Finals;
use super::reports::load_baselines;
use super::runner::Runner;
use super::settings::{FleetSettings, Protocol};
use super::spool::Spool;
use super::topics::Topics;
use super::wire::Version;
use super::FleetError;
use crate::backoff::{device_phase, Jitter};
use crate::command::Bus;
use crate::status::Status;
use crate::telemetry::drift::Recorder;
use crate::telemetry::Metrics;
use crate::util::unix_now;

/// Events queued by the daemon and not yet spooled.
const EVENT_QUEUE: usize = 256;
/// Spread of periodic reports around their interval, so a fleet does not report in lockstep.
const REPORT_JITTER: f64 = 0.1;

/// Builds and starts the fleet link.
pub struct Link {
    settings: FleetSettings,
    metrics: Option<Arc<Metrics>>,
    drift: Option<Recorder>,
    cache_dir: Option<PathBuf>,
}

/// What the link is doing; published on a `watch` for `edgeflow status` and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkState {
    pub connected: bool,
    /// `5` or `3.1.1` while connected.
    pub protocol: Option<&'static str>,
    /// Successful connections since start.
    pub connections: u64,
    /// Connections after the first.
    pub reconnects: u64,
    pub spool_depth: u64,
    pub spool_bytes: u64,
    /// Messages dropped to the spool's cap since it was created.
    pub spool_dropped: u64,
    /// Spooled messages acknowledged by the broker since start.
    pub delivered: u64,
    pub last_error: Option<String>,
    pub commands_accepted: u64,
    pub commands_refused: u64,
    /// Events refused because the link's queue was full.
    pub events_dropped: u64,
}

/// What a [`LinkSender`] asks of the link task besides events.
pub(super) enum Control {
    ReportNow,
}

/// The daemon's handle on the running link.
pub struct LinkHandle {
    sender: LinkSender,
    state: watch::Receiver<LinkState>,
    task: JoinHandle<()>,
}

impl LinkHandle {
    /// Queues an event for the `events` topic; never waits. Returns false (and counts it)
    /// when the queue is full or the link has stopped.
    pub fn event(&self, event: Event) -> bool {
        self.sender.event(event)
    }

    /// Publishes a health report now (the `report` command, or the local API).
    pub fn report_now(&self) {
        self.sender.report_now();
    }

    /// A cloneable handle for the tasks that produce events or ask for reports.
    pub fn sender(&self) -> LinkSender {
        self.sender.clone()
    }

    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    /// Waits for the task to end (after the shutdown token fires it says goodbye first).
    ///
    /// # Errors
    /// The task's panic, as a join error.
    pub async fn join(self) -> Result<(), tokio::task::JoinError> {
        self.task.await
    }
}

/// What [`LinkHandle::sender`] hands out: events and report requests, never waiting.
#[derive(Clone)]
pub struct LinkSender {
    events: mpsc::Sender<Event>,
    control: mpsc::Sender<Control>,
    events_dropped: Arc<AtomicU64>,
}

impl LinkSender {
    /// Queues an event for the `events` topic; never waits. Returns false (and counts it)
    /// when the queue is full or the link has stopped.
    pub fn event(&self, event: Event) -> bool {
        let ok = self.events.try_send(event.bounded()).is_ok();
        if !ok {
            self.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Publishes a health report now (the `report` command).
    pub fn report_now(&self) {
        let _ = self.control.try_send(Control::ReportNow);
    }
}

impl Link {
    pub fn new(settings: FleetSettings) -> Link {
        Link { settings, metrics: None, drift: None, cache_dir: None }
    }

    /// Request metrics for health reports.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Link {
        self.metrics = Some(metrics);
        self
    }

    /// The recorder request handlers feed; its windows become drift reports.
    pub fn drift(mut self, recorder: Recorder) -> Link {
        self.drift = Some(recorder);
        self
    }

    /// The cache folder, whose filesystem's free space health reports carry.
    pub fn cache_dir(mut self, dir: PathBuf) -> Link {
        self.cache_dir = Some(dir);
        self
    }

    /// Opens the spool and starts the link task. Returns at once: connecting happens in
    /// the background, and reports are spooled until it succeeds.
    ///
    /// # Errors
    /// [`FleetError::Spool`] when the spool folder cannot be opened.
    pub fn spawn(self, status: watch::Receiver<Status>, commands: Bus, shutdown: CancellationToken) -> Result<LinkHandle, FleetError> {
        let s = self.settings;
        let spool = Spool::open(&s.spool_dir, s.spool_max_bytes)?;
        let recreated = spool.recreated().map(Path::to_path_buf);
        let now = unix_now();
        let recent = Recent::load(spool.db().open_tree("commands").ok(), s.command_window, now);
        let baseline_tree = spool.db().open_tree("drift_baselines").ok();
        let baselines = load_baselines(baseline_tree.as_ref());
        // What the spool holds at opening was read from disk.
        let durable_seq = spool.next_seq().saturating_sub(1);
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(8);
        let (state_tx, state_rx) = watch::channel(LinkState::default());
        let events_dropped = Arc::new(AtomicU64::new(0));
        let topics = Topics::new(&s.topic_prefix, &s.device_id, &s.groups);
        let phase = device_phase(&s.device_id);
        let start = Instant::now();
        let health_jitter = Jitter { interval: s.report_interval, jitter: REPORT_JITTER, phase };
        let drift_jitter = Jitter { interval: s.drift_interval, jitter: REPORT_JITTER, phase };
        let version = match s.protocol {
            Protocol::V311 => Version::V311,
            Protocol::Auto | Protocol::V5 => Version::V5,
        };
        let span = tracing::info_span!("fleet", device = %s.device_id, broker = %s.broker);
        tracing::info!(parent: &span, prefix = %s.topic_prefix, spool = %s.spool_dir.display(), queued = spool.len(), "fleet link starting");
        if !s.require_signatures {
            tracing::warn!(
                parent: &span,
                topics = %format!("{}/{}/cmd/#", s.topic_prefix, s.device_id),
                key = s.signature_key.is_some(),
                "UNSIGNED FLEET COMMANDS ARE OBEYED (fleet.require_signatures = false): anyone who may publish on the command topics can roll back, pin or reconfigure this device"
            );
        }
        let runner = Runner {
            policy: Policy { key: s.signature_key.as_deref().copied(), require: s.require_signatures, max_age: s.signature_max_age, not_before: spool.replay_floor() },
            reconnect: Reconnect::new(s.backoff, s.protocol, version),
            next_health: start + health_jitter.first(),
            next_drift: start + s.drift_interval + drift_jitter.first(),
            health_jitter,
            drift_jitter,
            topics,
            spool,
            recent,
            baselines,
            baseline_tree,
            artifacts_checked: HashSet::new(),
            status,
            metrics: self.metrics,
            drift: self.drift,
            sampler: Arc::new(Mutex::new(HostSampler::new(self.cache_dir))),
            requests: RequestWindow::new(),
            bus: commands,
            events_rx,
            control_rx,
            state_tx,
            state: LinkState::default(),
            events_dropped: events_dropped.clone(),
            conn: None,
            next_attempt: Instant::now(),
            running: JoinSet::new(),
            pending_reports: Vec::new(),
            last_drift: None,
            flush_at: None,
            probe_at: None,
            durable_seq,
            finals: Finals::default(),
            flushes: 0,
            submit_chain: None,
            overflow_unreported: 0,
            session: format!("{:016x}", fastrand::u64(..)),
            started: start,
            s,
        };
        let task = tokio::spawn(tracing::Instrument::instrument(runner.run(shutdown), span));
        if let Some(to) = recreated {
            let _ = events_tx.try_send(Event::DatabaseRecreated { database: "spool", quarantined_to: Some(to.display().to_string()), rebuilt: Vec::new() });
        }
        Ok(LinkHandle { sender: LinkSender { events: events_tx, control: control_tx, events_dropped }, state: state_rx, task })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The link against a port that accepts and hangs up at once, in virtual time: attempts
    /// are spaced by the backoff, never a tight loop.
    #[tokio::test(start_paused = true)]
    async fn reconnects_against_a_dead_broker_follow_the_backoff() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepts = Arc::new(Mutex::new(Vec::new()));
        let seen = accepts.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                seen.lock().unwrap().push(Instant::now());
                drop(sock);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let config = super::super::FleetConfig {
            broker: Some(format!("mqtt://127.0.0.1:{port}")),
            device_id: Some("paused".into()),
            protocol: "5".into(),
            backoff_initial: "1s".into(),
            backoff_max: "30s".into(),
            spool_dir: Some(dir.path().to_path_buf()),
            require_signatures: Some(false),
            ..Default::default()
        };
        let settings = config.resolve().unwrap().unwrap();
        let (_publisher, status) = crate::status::channel();
        let (bus, _rx) = Bus::new(4);
        let shutdown = CancellationToken::new();
        let handle = Link::new(settings).spawn(status, bus, shutdown.clone()).unwrap();
        let started = Instant::now();
        // Let virtual time run five minutes; each accept needs real I/O, so step in slices.
        while started.elapsed() < Duration::from_secs(300) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            tokio::task::yield_now().await;
        }
        shutdown.cancel();
        handle.join().await.unwrap();
        let times = accepts.lock().unwrap().clone();
        assert!(times.len() >= 5, "it kept trying: {} attempts", times.len());
        // Full backoff would allow ~14 attempts in 5 minutes (1+2+4+8+16 then ~22s each);
        // a tight loop would make thousands.
        assert!(times.len() <= 25, "{} attempts in 5 minutes", times.len());
        for pair in times.windows(2).skip(6) {
            assert!(pair[1] - pair[0] >= Duration::from_secs(10), "late attempts are at least half the 30 s cap apart: {:?}", pair[1] - pair[0]);
        }
    }
}
