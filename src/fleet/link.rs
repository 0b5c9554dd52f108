//! The link task: connect, say hello, publish from the spool, answer commands, reconnect
//! with backoff, say goodbye.

use std::collections::HashMap;
use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::commands::{self, Final, Policy, Recent, Refusal, Seen};
use super::events::Event;
use super::health::{HostSampler, RequestWindow};
use super::settings::{FleetSettings, Protocol};
use super::spool::{Channel, Spool};
use super::topics::Topics;
use super::wire::{self, Client, Closed, ConnectOptions, Connection, Version, WireEvent};
use super::{FleetError, SCHEMA};
use crate::backoff::{device_phase, Backoff, Jitter};
use crate::command::{Bus, Command, Origin, Outcome, Settings};
use crate::status::{unix_now, Status};
use crate::telemetry::drift::{Assessment, Baseline, Baselines, Recorder, Sketch, VersionKey, BASELINE_FILE};
use crate::telemetry::Metrics;

/// Spooled messages published but not yet acknowledged, at most.
const WINDOW: usize = 16;
/// Events queued by the daemon and not yet spooled.
const EVENT_QUEUE: usize = 256;
/// Commands running at once; more are refused as busy.
const MAX_RUNNING_COMMANDS: usize = 16;
/// A command whose handler has not answered by then is reported failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long a clean shutdown waits for the broker to take the goodbye.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);
/// Spool writes are flushed to disk this long after the first unflushed one.
const FLUSH_DELAY: Duration = Duration::from_secs(1);
/// Largest MQTT packet either side may send.
const MAX_PACKET: u32 = 256 * 1024;
/// Largest report accepted into the spool.
const MAX_MESSAGE: usize = 64 * 1024;
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

enum Control {
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
        let now = unix_now();
        let recent = Recent::load(spool.db().open_tree("commands").ok(), s.command_window, now);
        let baseline_tree = spool.db().open_tree("drift_baselines").ok();
        let mut baselines = Baselines::new();
        if let Some(tree) = &baseline_tree {
            for (k, v) in tree.iter().flatten() {
                if let (Ok(key), Ok(b)) = (serde_json::from_slice::<VersionKey>(&k), serde_json::from_slice::<Baseline>(&v)) {
                    baselines.insert(key, b);
                }
            }
        }
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(8);
        let (state_tx, state_rx) = watch::channel(LinkState::default());
        let events_dropped = Arc::new(AtomicU64::new(0));
        let topics = Topics::new(&s.topic_prefix, &s.device_id);
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
        let runner = Runner {
            policy: Policy { key: s.signature_key.as_deref().copied(), require: s.require_signatures, max_age: s.signature_max_age },
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
            flush_at: None,
            overflow_unreported: 0,
            session: format!("{:016x}", fastrand::u64(..)),
            started: start,
            s,
        };
        let task = tokio::spawn(tracing::Instrument::instrument(runner.run(shutdown), span));
        Ok(LinkHandle { sender: LinkSender { events: events_tx, control: control_tx, events_dropped }, state: state_rx, task })
    }
}

/// When and with which protocol version to connect next. Pure, so its policy is tested
/// without a broker.
#[derive(Debug, Clone)]
struct Reconnect {
    backoff: Backoff,
    mode: Protocol,
    version: Version,
    /// Failed attempts since the last successful connection.
    retry: u32,
    v5_ever_connected: bool,
    fallback_tried: bool,
}

impl Reconnect {
    fn new(backoff: Backoff, mode: Protocol, version: Version) -> Reconnect {
        Reconnect { backoff, mode, version, retry: 0, v5_ever_connected: false, fallback_tried: false }
    }

    fn connected(&mut self) {
        self.retry = 0;
        if self.version == Version::V5 {
            self.v5_ever_connected = true;
        }
    }

    /// After a connection ended: the delay before the next attempt (the version to use is
    /// then `self.version`).
    fn closed(&mut self, c: &Closed) -> Duration {
        // A broker that cannot speak MQTT 5 gets one immediate retry with 3.1.1, and keeps
        // it if it works; a broker that once spoke 5 is never downgraded by a flaky network.
        if self.mode == Protocol::Auto && self.version == Version::V5 && c.protocol_refused && !self.v5_ever_connected && !self.fallback_tried {
            self.version = Version::V311;
            self.fallback_tried = true;
            return Duration::ZERO;
        }
        if self.mode == Protocol::Auto && self.version == Version::V311 && c.before_connack && self.retry > 0 {
            // 3.1.1 did not help either: the problem is elsewhere; go back to 5 and back off.
            self.version = Version::V5;
            self.fallback_tried = false;
        }
        if !c.before_connack {
            self.retry = 0;
        }
        // DEVNOTE: half fixed, half jittered ("equal jitter") on top of the shared full-jitter
        // backoff: full jitter alone can draw a near-zero delay, and a link must never spin.
        let d = self.backoff.ceiling(self.retry) / 2 + self.backoff.delay(self.retry) / 2;
        self.retry = self.retry.saturating_add(1);
        d
    }
}

/// What each publish queued on the current connection was, in order, until its packet id
/// is known.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tag {
    Spooled(u64),
    Other,
    Goodbye,
}

struct Conn {
    connection: Connection,
    version: Version,
    up: bool,
    awaiting: VecDeque<Tag>,
    inflight: HashMap<u16, u64>,
    /// Highest spool seq handed to this connection.
    last_sent: Option<u64>,
    goodbye_pkid: Option<u16>,
}

impl Conn {
    fn client(&self) -> &Client {
        &self.connection.client
    }

    fn in_window(&self) -> usize {
        self.inflight.len() + self.awaiting.iter().filter(|t| matches!(t, Tag::Spooled(_))).count()
    }
}

/// A command handed to the bus, and where its reply goes.
struct Running {
    request_id: String,
    name: &'static str,
    reply_to: String,
    correlation: Option<Bytes>,
    set: Option<Settings>,
}

struct Runner {
    s: FleetSettings,
    policy: Policy,
    reconnect: Reconnect,
    topics: Topics,
    spool: Spool,
    recent: Recent,
    baselines: Baselines,
    baseline_tree: Option<sled::Tree>,
    artifacts_checked: HashSet<VersionKey>,
    status: watch::Receiver<Status>,
    metrics: Option<Arc<Metrics>>,
    drift: Option<Recorder>,
    sampler: Arc<Mutex<HostSampler>>,
    requests: RequestWindow,
    bus: Bus,
    events_rx: mpsc::Receiver<Event>,
    control_rx: mpsc::Receiver<Control>,
    state_tx: watch::Sender<LinkState>,
    state: LinkState,
    events_dropped: Arc<AtomicU64>,
    conn: Option<Conn>,
    next_attempt: Instant,
    next_health: Instant,
    next_drift: Instant,
    health_jitter: Jitter,
    drift_jitter: Jitter,
    running: JoinSet<(Running, Result<Outcome, String>)>,
    /// `report` commands waiting for the next health report.
    pending_reports: Vec<Running>,
    flush_at: Option<Instant>,
    overflow_unreported: u64,
    session: String,
    started: Instant,
}

async fn next_wire(conn: &mut Option<Conn>) -> Option<WireEvent> {
    match conn {
        Some(c) => c.connection.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Runner {
    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            if self.conn.is_none() && Instant::now() >= self.next_attempt {
                self.start_connection();
            }
            let attempt_at = self.conn.is_none().then_some(self.next_attempt);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                ev = next_wire(&mut self.conn) => self.on_wire(ev.unwrap_or_else(|| WireEvent::Closed(Closed { error: "the connection driver stopped".into(), before_connack: false, protocol_refused: false, refused: false }))),
                Some(done) = self.running.join_next(), if !self.running.is_empty() => match done {
                    Ok((r, outcome)) => self.command_done(r, outcome),
                    Err(e) => tracing::error!(error = %e, "a command task failed"),
                },
                Some(event) = self.events_rx.recv() => self.push_event(event),
                Some(Control::ReportNow) = self.control_rx.recv() => self.push_health().await,
                () = tokio::time::sleep_until(self.next_health) => {
                    self.push_health().await;
                    self.next_health = Instant::now() + self.health_jitter.next();
                }
                () = tokio::time::sleep_until(self.next_drift) => {
                    self.push_drift().await;
                    self.next_drift = Instant::now() + self.drift_jitter.next();
                }
                () = sleep_until_opt(attempt_at) => {}
                () = sleep_until_opt(self.flush_at) => self.flush().await,
            }
            self.pump();
            self.publish_state();
        }
        self.goodbye().await;
        self.flush().await;
        self.publish_state();
        tracing::info!("fleet link stopped");
    }

    fn connect_options(&self) -> ConnectOptions {
        let will = json!({"schema": SCHEMA, "kind": "status", "device": self.s.device_id, "state": "offline", "reason": "connection_lost", "session": self.session});
        ConnectOptions {
            client_id: format!("edgeflow-{}", self.s.device_id),
            broker: self.s.broker.clone(),
            tls: None,
            username: self.s.username.clone(),
            password: self.s.password.clone(),
            keep_alive: self.s.keep_alive,
            connect_timeout: self.s.connect_timeout,
            will: (self.topics.status(), will.to_string().into_bytes()),
            max_packet: MAX_PACKET,
        }
    }

    fn start_connection(&mut self) {
        let mut options = self.connect_options();
        if self.s.broker.tls {
            match super::tls::client_config(self.s.ca_file.as_deref(), self.s.cert_file.as_deref().zip(self.s.key_file.as_deref())) {
                Ok(c) => options.tls = Some(c),
                Err(e) => {
                    let text = crate::registry::chain(&e);
                    tracing::error!(error = %text, "TLS setup failed; retrying later");
                    self.state.last_error = Some(text);
                    let closed = Closed { error: e.to_string(), before_connack: true, protocol_refused: false, refused: false };
                    self.next_attempt = Instant::now() + self.reconnect.closed(&closed);
                    return;
                }
            }
        }
        let version = self.reconnect.version;
        tracing::debug!(protocol = version.as_str(), "connecting");
        self.conn = Some(Conn {
            connection: wire::connect(version, &options),
            version,
            up: false,
            awaiting: VecDeque::new(),
            inflight: HashMap::new(),
            last_sent: None,
            goodbye_pkid: None,
        });
    }

    fn on_wire(&mut self, ev: WireEvent) {
        match ev {
            WireEvent::Connected => self.on_connected(),
            WireEvent::Message { topic, payload, response_topic, correlation } => self.on_command(&topic, &payload, response_topic, correlation),
            WireEvent::Sent { pkid } => {
                if let Some(c) = &mut self.conn {
                    match c.awaiting.pop_front() {
                        Some(Tag::Spooled(seq)) => {
                            c.inflight.insert(pkid, seq);
                        }
                        Some(Tag::Goodbye) => c.goodbye_pkid = Some(pkid),
                        Some(Tag::Other) | None => {}
                    }
                }
            }
            WireEvent::Acked { pkid, accepted } => {
                let seq = self.conn.as_mut().and_then(|c| c.inflight.remove(&pkid));
                if let Some(seq) = seq {
                    if !accepted {
                        tracing::warn!(seq, "the broker refused a report (not authorized?); dropping it");
                    }
                    match self.spool.remove(seq) {
                        Ok(true) => self.state.delivered += 1,
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, seq, "removing a delivered message from the spool failed"),
                    }
                    self.mark_dirty();
                }
            }
            WireEvent::Subscribed { granted } => {
                if !granted {
                    tracing::error!(topic = %self.topics.commands(), "the broker refused the command subscription (ACL?); commands will not arrive");
                }
            }
            WireEvent::Closed(c) => self.on_closed(c),
        }
    }

    fn on_connected(&mut self) {
        let first = self.state.connections == 0;
        self.reconnect.connected();
        self.state.connections += 1;
        if !first {
            self.state.reconnects += 1;
        }
        let Some(c) = &mut self.conn else { return };
        c.up = true;
        let version = c.version;
        self.state.connected = true;
        self.state.protocol = Some(version.as_str());
        self.state.last_error = None;
        tracing::info!(protocol = version.as_str(), queued = self.spool.len(), "connected to the broker");
        let birth = json!({
            "schema": SCHEMA, "kind": "status", "device": self.s.device_id, "state": "online", "ts": unix_now(),
            "agent_version": env!("CARGO_PKG_VERSION"), "protocol": version.as_str(), "session": self.session,
        });
        let status_topic = self.topics.status();
        let commands = self.topics.commands();
        if c.client().publish(&status_topic, true, birth.to_string().into_bytes(), None).is_ok() {
            c.awaiting.push_back(Tag::Other);
        }
        if let Err(e) = c.client().subscribe(&commands) {
            tracing::error!(?e, "subscribing to commands failed");
        }
        if self.overflow_unreported > 0 {
            let dropped = std::mem::take(&mut self.overflow_unreported);
            self.push_event(Event::SpoolOverflow { dropped });
        }
    }

    fn on_closed(&mut self, c: Closed) {
        let was_up = self.conn.as_ref().is_some_and(|c| c.up);
        self.conn = None;
        self.state.connected = false;
        self.state.protocol = None;
        let delay = self.reconnect.closed(&c);
        self.next_attempt = Instant::now() + delay;
        if was_up {
            tracing::warn!(error = %c.error, retry_in_ms = delay.as_millis() as u64, "connection to the broker lost");
        } else if c.refused {
            tracing::error!(error = %c.error, retry_in_ms = delay.as_millis() as u64, "the broker refused the connection (credentials? client certificate?)");
        } else {
            tracing::info!(error = %c.error, retry_in_ms = delay.as_millis() as u64, "connecting to the broker failed");
        }
        self.state.last_error = Some(c.error);
    }

    /// Publishes spooled messages while the window has room.
    fn pump(&mut self) {
        let Some(c) = &mut self.conn else { return };
        if !c.up {
            return;
        }
        let room = WINDOW.saturating_sub(c.in_window());
        if room == 0 {
            return;
        }
        for r in self.spool.after(c.last_sent, room) {
            let topic = self.topics.channel(r.channel.topic_suffix());
            match c.client().publish(&topic, false, r.payload, None) {
                Ok(()) => {
                    c.awaiting.push_back(Tag::Spooled(r.seq));
                    c.last_sent = Some(r.seq);
                }
                Err(_) => break,
            }
        }
    }

    fn mark_dirty(&mut self) {
        if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + FLUSH_DELAY);
        }
    }

    async fn flush(&mut self) {
        self.flush_at = None;
        let db = self.spool.db().clone();
        match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing the spool failed"),
            Err(e) => tracing::warn!(error = %e, "the spool flush task failed"),
        }
    }

    fn publish_state(&mut self) {
        self.state.spool_depth = self.spool.len();
        self.state.spool_bytes = self.spool.bytes();
        self.state.spool_dropped = self.spool.dropped_total();
        self.state.events_dropped = self.events_dropped.load(Ordering::Relaxed);
        let next = self.state.clone();
        self.state_tx.send_if_modified(|s| {
            if *s == next {
                false
            } else {
                *s = next;
                true
            }
        });
    }

    /// Spools one message: the common header (schema, kind, device, seq, ts) and `body`.
    fn push(&mut self, channel: Channel, kind: &str, body: serde_json::Map<String, Value>) -> Result<u64, String> {
        let seq = self.spool.next_seq();
        let mut m = serde_json::Map::new();
        m.insert("schema".into(), json!(SCHEMA));
        m.insert("kind".into(), json!(kind));
        m.insert("device".into(), json!(self.s.device_id));
        m.insert("seq".into(), json!(seq));
        m.insert("ts".into(), json!(unix_now()));
        m.extend(body);
        let bytes = serde_json::to_vec(&Value::Object(m)).unwrap_or_default();
        if bytes.len() > MAX_MESSAGE {
            tracing::error!(channel = channel.topic_suffix(), size = bytes.len(), "a report is too large to send; dropped");
            return Err(format!("the {} report is too large ({} bytes)", channel.topic_suffix(), bytes.len()));
        }
        self.mark_dirty();
        match self.spool.push(channel, move |_| bytes) {
            Ok(p) => {
                if p.dropped > 0 {
                    tracing::warn!(dropped = p.dropped, "the spool is full; dropped the oldest messages");
                    self.overflow_unreported += p.dropped;
                }
                Ok(p.seq)
            }
            Err(e) => {
                tracing::error!(error = %e, "spooling a report failed");
                Err(e.to_string())
            }
        }
    }

    fn push_event(&mut self, event: Event) {
        let body = match serde_json::to_value(&event) {
            Ok(Value::Object(m)) => m,
            _ => return,
        };
        let _ = self.push(Channel::Events, "event", body);
    }

    async fn push_health(&mut self) {
        let sampler = self.sampler.clone();
        let host = tokio::task::spawn_blocking(move || sampler.lock().map(|mut s| s.sample()).ok()).await.ok().flatten();
        let requests = self.metrics.as_ref().map(|m| self.requests.report(m));
        let status = self.status.borrow().clone();
        let link = json!({
            "protocol": self.state.protocol,
            "connections": self.state.connections,
            "reconnects": self.state.reconnects,
            "spool_depth": self.spool.len(),
            "spool_dropped": self.spool.dropped_total(),
            "commands_refused": self.state.commands_refused,
        });
        let agent = json!({"version": env!("CARGO_PKG_VERSION"), "uptime_s": self.started.elapsed().as_secs(), "started_at": status.started_at});
        let pushed = {
            let mut m = serde_json::Map::new();
            m.insert("agent".into(), agent);
            m.insert("host".into(), serde_json::to_value(&host).unwrap_or(Value::Null));
            m.insert("model".into(), serde_json::to_value(&status.model).unwrap_or(Value::Null));
            m.insert("registry".into(), serde_json::to_value(&status.registry).unwrap_or(Value::Null));
            m.insert("pinned".into(), json!(status.pinned));
            m.insert("requests".into(), serde_json::to_value(&requests).unwrap_or(Value::Null));
            m.insert("link".into(), link);
            self.push(Channel::Health, "health", m)
        };
        for run in std::mem::take(&mut self.pending_reports) {
            let outcome = pushed.clone().map(|seq| json!({"health_seq": seq}));
            self.command_done(run, Ok(outcome));
        }
    }

    /// Looks for `drift_baseline.json` in the version's folder the first time a version
    /// is seen (only the active version's folder is known).
    async fn check_artifact(&mut self, key: &VersionKey) {
        if self.artifacts_checked.contains(key) || self.baselines.get(key).is_some_and(|b| b.source == crate::telemetry::drift::BaselineSource::Artifact) {
            return;
        }
        let dir = {
            let status = self.status.borrow();
            status.model.as_ref().filter(|m| m.name == key.model && m.version == key.version).and_then(|m| m.dir.clone())
        };
        let Some(dir) = dir else { return };
        if self.artifacts_checked.len() > 64 {
            self.artifacts_checked.clear();
        }
        self.artifacts_checked.insert(key.clone());
        let path = dir.join(BASELINE_FILE);
        match tokio::fs::read(&path).await {
            Ok(bytes) => match serde_json::from_slice::<Sketch>(&bytes) {
                Ok(sketch) => {
                    tracing::info!(path = %path.display(), n = sketch.n, "drift baseline from the model version's artifact");
                    self.baselines.insert(key.clone(), Baseline { source: crate::telemetry::drift::BaselineSource::Artifact, sketch });
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable drift baseline; the first window will be the baseline"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "reading the drift baseline failed"),
        }
    }

    async fn push_drift(&mut self) {
        let Some(recorder) = self.drift.clone() else { return };
        let (windows, dropped) = recorder.take();
        if dropped > 0 {
            tracing::warn!(dropped, "requests of too many model versions in one drift window were not recorded");
        }
        let interval = self.drift_jitter.interval.as_secs();
        for w in windows {
            self.check_artifact(&w.key).await;
            let assessment = self.baselines.assess(&w, &self.s.drift);
            let (baseline, divergence, alert) = match &assessment {
                Assessment::Compared { baseline, baseline_n, comparison } => {
                    (json!({"source": baseline, "n": baseline_n}), serde_json::to_value(&comparison.features).unwrap_or(Value::Null), comparison.alert)
                }
                Assessment::Baseline { n, established } => {
                    if *established {
                        self.persist_baseline(&w.key);
                    }
                    (json!({"source": "first_window", "n": n, "established": established}), Value::Null, false)
                }
            };
            if alert {
                tracing::warn!(model = %w.key.model, version = %w.key.version, "drift alert");
            }
            let t = self.s.drift;
            {
                let mut m = serde_json::Map::new();
                m.insert("model".into(), json!(w.key.model));
                m.insert("version".into(), json!(w.key.version));
                m.insert("window".into(), json!({"from": w.first, "to": w.last, "interval_s": interval}));
                m.insert("n".into(), json!(w.sketch.n));
                m.insert("sketch".into(), serde_json::to_value(&w.sketch).unwrap_or(Value::Null));
                m.insert("baseline".into(), baseline);
                m.insert("divergence".into(), divergence);
                m.insert("alert".into(), json!(alert));
                m.insert("thresholds".into(), json!({"psi": t.psi, "js": t.js, "min_samples": t.min_samples}));
                let _ = self.push(Channel::Drift, "drift", m);
            }
        }
    }

    fn persist_baseline(&self, key: &VersionKey) {
        let (Some(tree), Some(b)) = (&self.baseline_tree, self.baselines.get(key)) else { return };
        if let (Ok(k), Ok(v)) = (serde_json::to_vec(key), serde_json::to_vec(b)) {
            if let Err(e) = tree.insert(k, v) {
                tracing::warn!(error = %e, "storing the drift baseline failed");
            }
        }
    }

    // One flat call per reply shape reads better at the call sites than a builder here.
    #[allow(clippy::too_many_arguments)]
    fn reply(
        &mut self,
        reply_to: &str,
        correlation: Option<Bytes>,
        request_id: Option<&str>,
        command: &str,
        status: &str,
        reason: Option<&str>,
        result: Option<&Value>,
        duplicate: bool,
    ) {
        let Some(c) = &mut self.conn else { return };
        if !c.up {
            return;
        }
        let mut m = serde_json::Map::new();
        m.insert("schema".into(), json!(SCHEMA));
        m.insert("kind".into(), json!("reply"));
        m.insert("device".into(), json!(self.s.device_id));
        m.insert("request_id".into(), json!(request_id));
        m.insert("command".into(), json!(command));
        m.insert("status".into(), json!(status));
        if let Some(r) = reason {
            m.insert("reason".into(), json!(r));
        }
        if let Some(r) = result {
            m.insert("result".into(), r.clone());
        }
        if duplicate {
            m.insert("duplicate".into(), json!(true));
        }
        m.insert("ts".into(), json!(unix_now()));
        match c.client().publish(reply_to, false, Value::Object(m).to_string().into_bytes(), correlation) {
            Ok(()) => c.awaiting.push_back(Tag::Other),
            Err(e) => tracing::warn!(?e, request_id, "could not queue a command reply; the console's retry will get it"),
        }
    }

    fn reply_final(&mut self, reply_to: &str, correlation: Option<Bytes>, request_id: &str, command: &str, f: &Final, duplicate: bool) {
        let status = if f.succeeded { "succeeded" } else { "failed" };
        self.reply(reply_to, correlation, Some(request_id), command, status, f.reason.as_deref(), f.result.as_ref(), duplicate);
    }

    fn refused(&mut self, command: &str, reply_to: &str, correlation: Option<Bytes>, request_id: Option<String>, refusal: Refusal, reason: String) {
        self.state.commands_refused += 1;
        tracing::warn!(command, request_id = ?request_id, refusal = refusal.as_str(), %reason, "command refused");
        let text = format!("{}: {reason}", refusal.as_str());
        self.reply(reply_to, correlation, request_id.as_deref(), command, "failed", Some(&text), None, false);
        if refusal.is_security() {
            self.push_event(Event::CommandRefused { command: command.to_string(), request_id, refusal, reason }.bounded());
        }
    }

    fn on_command(&mut self, topic: &str, payload: &[u8], response_topic: Option<String>, correlation: Option<Bytes>) {
        let Some(name) = self.topics.command_name(topic).map(|n| crate::command::truncate(n, 64).to_string()) else {
            tracing::debug!(topic, "ignoring a message outside cmd/<name>");
            return;
        };
        // A response topic must be one we may publish to: no wildcards, not empty.
        let reply_to = response_topic.filter(|t| !t.is_empty() && t.len() <= 512 && !t.contains(['+', '#', '\0'])).unwrap_or_else(|| self.topics.reply(&name));
        let now = unix_now();
        let opened = match commands::open(payload, &self.s.device_id, &name, &self.policy, now) {
            Ok(o) => o,
            Err(r) => return self.refused(&name, &reply_to, correlation, r.request_id, r.refusal, r.reason),
        };
        match self.recent.check(&opened) {
            Seen::Duplicate(Some(done)) => return self.reply_final(&reply_to, correlation, &opened.request_id, &name, &done, true),
            Seen::Duplicate(None) => return self.reply(&reply_to, correlation, Some(&opened.request_id), &name, "accepted", None, None, true),
            Seen::Conflict => {
                return self.refused(&name, &reply_to, correlation, Some(opened.request_id), Refusal::Replayed, "this request id was already used for a different command".into());
            }
            Seen::New => {}
        }
        if self.running.len() >= MAX_RUNNING_COMMANDS {
            return self.refused(&name, &reply_to, correlation, Some(opened.request_id), Refusal::Busy, "too many commands running".into());
        }
        if let Err(refusal) = self.recent.start(&opened, now) {
            return self.refused(&name, &reply_to, correlation, Some(opened.request_id), refusal, "too many recent commands to remember".into());
        }
        self.mark_dirty();
        let rid = opened.request_id.clone();
        let command = match Command::parse(&name, &opened.args) {
            Ok(c) => c,
            Err(reason) => {
                self.state.commands_refused += 1;
                let f = Final { succeeded: false, reason: Some(reason), result: None };
                self.recent.finish(&rid, f.clone());
                return self.reply_final(&reply_to, correlation, &rid, &name, &f, false);
            }
        };
        self.state.commands_accepted += 1;
        tracing::info!(command = command.name(), request_id = %rid, signed = opened.signed, "command accepted");
        self.reply(&reply_to, correlation.clone(), Some(&rid), command.name(), "accepted", None, None, false);
        let run = Running { request_id: rid.clone(), name: command.name(), reply_to, correlation, set: None };
        match command {
            Command::Report => {
                // Answered by the link: succeeded once the report is in the spool, with the
                // seq it will carry.
                self.pending_reports.push(run);
                self.next_health = Instant::now();
            }
            Command::Set(settings) if settings.poll_interval.is_none() && settings.log_level.is_none() => {
                // Only the link's own intervals: nothing for the daemon to do.
                let result = serde_json::to_value(&settings).unwrap_or(Value::Null);
                self.running.spawn(async move { (Running { set: Some(settings), ..run }, Ok(Ok(result))) });
            }
            command => {
                let set = match &command {
                    Command::Set(s) => Some(s.clone()),
                    _ => None,
                };
                let answer = self.bus.submit(command, Origin::Fleet { request_id: rid });
                self.running.spawn(async move {
                    let outcome = match answer {
                        Err(e) => Err(e.to_string()),
                        Ok(rx) => match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
                            Ok(Ok(o)) => Ok(o),
                            Ok(Err(_)) => Err(crate::command::CommandError::Dropped.to_string()),
                            Err(_) => Err(format!("no answer within {}s", COMMAND_TIMEOUT.as_secs())),
                        },
                    };
                    (Running { set, ..run }, outcome)
                });
            }
        }
    }

    fn command_done(&mut self, r: Running, outcome: Result<Outcome, String>) {
        let f = match outcome {
            Ok(Ok(result)) => {
                if let Some(set) = &r.set {
                    self.apply(set);
                }
                Final { succeeded: true, reason: None, result: Some(result) }
            }
            Ok(Err(reason)) | Err(reason) => Final { succeeded: false, reason: Some(reason), result: None },
        };
        tracing::info!(command = r.name, request_id = %r.request_id, succeeded = f.succeeded, reason = ?f.reason, "command finished");
        self.recent.finish(&r.request_id, f.clone());
        self.mark_dirty();
        self.reply_final(&r.reply_to, r.correlation, &r.request_id, r.name, &f, false);
    }

    fn apply(&mut self, set: &Settings) {
        let now = Instant::now();
        if let Some(d) = set.report_interval {
            self.health_jitter.interval = d;
            self.next_health = now + self.health_jitter.next();
        }
        if let Some(d) = set.drift_interval {
            self.drift_jitter.interval = d;
            self.next_drift = now + self.drift_jitter.next();
        }
    }

    /// Publishes `offline` (retained) and disconnects cleanly, so the broker drops the
    /// Last Will; waits a bounded time for the broker to take it.
    async fn goodbye(&mut self) {
        let Some(mut c) = self.conn.take() else { return };
        if !c.up {
            return;
        }
        let bye = json!({"schema": SCHEMA, "kind": "status", "device": self.s.device_id, "state": "offline", "reason": "shutdown", "ts": unix_now(), "session": self.session});
        if c.client().publish(&self.topics.status(), true, bye.to_string().into_bytes(), None).is_ok() {
            c.awaiting.push_back(Tag::Goodbye);
            let deadline = Instant::now() + GOODBYE_TIMEOUT;
            loop {
                let ev = tokio::select! {
                    ev = c.connection.events.recv() => ev,
                    () = tokio::time::sleep_until(deadline) => None,
                };
                match ev {
                    Some(WireEvent::Sent { pkid }) => match c.awaiting.pop_front() {
                        Some(Tag::Spooled(seq)) => {
                            c.inflight.insert(pkid, seq);
                        }
                        Some(Tag::Goodbye) => c.goodbye_pkid = Some(pkid),
                        _ => {}
                    },
                    Some(WireEvent::Acked { pkid, .. }) if c.goodbye_pkid == Some(pkid) => break,
                    Some(WireEvent::Acked { pkid, .. }) => {
                        if let Some(seq) = c.inflight.remove(&pkid) {
                            let _ = self.spool.remove(seq);
                        }
                    }
                    Some(WireEvent::Closed(_)) | None => {
                        tracing::warn!("the broker did not acknowledge the goodbye in time");
                        return;
                    }
                    Some(_) => {}
                }
            }
        }
        if c.client().disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(ev) = c.connection.events.recv().await {
                    if matches!(ev, WireEvent::Closed(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        self.state.connected = false;
        self.state.protocol = None;
        tracing::info!("said goodbye to the broker");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(before_connack: bool, protocol_refused: bool) -> Closed {
        Closed { error: "x".into(), before_connack, protocol_refused, refused: false }
    }

    #[test]
    fn backoff_grows_caps_and_never_spins() {
        let b = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(60), max_attempts: u32::MAX };
        let mut r = Reconnect::new(b, Protocol::V5, Version::V5);
        let mut delays = Vec::new();
        for _ in 0..12 {
            delays.push(r.closed(&closed(true, false)));
        }
        for (i, d) in delays.iter().enumerate() {
            let ceiling = b.ceiling(i as u32);
            assert!(*d >= ceiling / 2 && *d <= ceiling, "attempt {i}: {d:?} outside [{:?}, {ceiling:?}]", ceiling / 2);
        }
        assert!(delays[11] >= Duration::from_secs(30), "capped at max, at least half of it");
        // A connection that was up and then dropped starts over from the small delay.
        r.connected();
        assert!(r.closed(&closed(false, false)) <= Duration::from_secs(1));
    }

    #[test]
    fn auto_falls_back_to_3_1_1_once_and_only_for_a_broker_that_never_spoke_5() {
        let b = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(60), max_attempts: u32::MAX };
        let mut r = Reconnect::new(b, Protocol::Auto, Version::V5);
        assert_eq!(r.closed(&closed(true, true)), Duration::ZERO, "immediate retry with 3.1.1");
        assert_eq!(r.version, Version::V311);
        r.connected();
        // Once 3.1.1 worked it stays.
        r.closed(&closed(false, false));
        assert_eq!(r.version, Version::V311);

        // A broker that spoke 5 is not downgraded by a reset during a later handshake.
        let mut r = Reconnect::new(b, Protocol::Auto, Version::V5);
        r.connected();
        assert!(r.closed(&closed(true, true)) > Duration::ZERO);
        assert_eq!(r.version, Version::V5);

        // Forced 5 never falls back.
        let mut r = Reconnect::new(b, Protocol::V5, Version::V5);
        r.closed(&closed(true, true));
        assert_eq!(r.version, Version::V5);
    }

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
