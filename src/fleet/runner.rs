//! The link task's event loop: connect, say hello, publish from the spool within the window,
//! track what the broker acknowledged, reconnect after the [`Reconnect`] policy's delay, say
//! goodbye. The [`Runner`] holds all the task's state; its reports are built in
//! `reports.rs` and its commands handled in `replies.rs`, as further `impl Runner` blocks.
//!
//! Two rules keep delivery honest when the broker or the device dies at any moment:
//! - a spooled message is published only once it is on disk ([`Runner::durable_seq`]): its
//!   `seq` is then never handed out again after a crash, so a console that drops duplicates
//!   by `seq` never drops a new message as an old one; a final command reply likewise waits
//!   for the flush that records its outcome in the table of recent requests;
//! - a message or a final command reply leaves the link's care only when the broker
//!   acknowledges it; whatever a dead connection still held is published again on the next.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::commands::{Policy, Recent};
use super::events::Event;
use super::health::{HostSampler, RequestWindow};
use super::link::{Control, LinkState};
use super::reconnect::Reconnect;
use super::replies::{Finals, Running};
use super::settings::FleetSettings;
use super::spool::{Channel, Spool};
use super::topics::Topics;
use super::wire::{self, Client, Closed, ConnectOptions, Connection, Version, WireEvent};
use super::SCHEMA;
use crate::backoff::Jitter;
use crate::command::{Bus, Outcome};
use crate::status::Status;
use crate::telemetry::drift::{Baselines, Recorder, VersionKey};
use crate::telemetry::Metrics;
use crate::util::unix_now;

/// Spooled messages published but not yet acknowledged, at most.
const WINDOW: usize = 16;
/// How long a clean shutdown waits for the broker to take the goodbye.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);
/// Spool writes are flushed to disk this long after the first unflushed one.
const FLUSH_DELAY: Duration = Duration::from_secs(1);
/// How long a 3.1.1 connection that followed a hang-up on MQTT 5 stays up before the link
/// leaves it once to try 5 again ([`Reconnect::probe`]).
const PROTOCOL_PROBE_AFTER: Duration = Duration::from_secs(10);
/// Largest MQTT packet either side may send.
const MAX_PACKET: u32 = 256 * 1024;

/// What each publish queued on the current connection was, in order, until its packet id
/// is known.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Tag {
    /// A spooled message, by its seq.
    Spooled(u64),
    /// A final command reply held until acknowledged ([`super::replies::Finals`]), by its id.
    Final(u64),
    Other,
    Goodbye,
}

pub(super) struct Conn {
    connection: Connection,
    version: Version,
    pub(super) up: bool,
    pub(super) awaiting: VecDeque<Tag>,
    /// Spooled messages and final replies published and not yet acknowledged, by packet id.
    inflight: HashMap<u16, Tag>,
    /// Highest spool seq handed to this connection.
    last_sent: Option<u64>,
    goodbye_pkid: Option<u16>,
    /// Which connection this is (the link's count of connections once it came up), so a held
    /// reply knows whether this connection has had it.
    pub(super) serial: u64,
}

impl Conn {
    pub(super) fn client(&self) -> &Client {
        &self.connection.client
    }

    fn in_window(&self) -> usize {
        self.inflight.values().chain(&self.awaiting).filter(|t| matches!(t, Tag::Spooled(_))).count()
    }

    /// A publish left with `pkid`: the oldest one awaiting its packet id.
    fn sent(&mut self, pkid: u16) {
        match self.awaiting.pop_front() {
            Some(tag @ (Tag::Spooled(_) | Tag::Final(_))) => {
                self.inflight.insert(pkid, tag);
            }
            Some(Tag::Goodbye) => self.goodbye_pkid = Some(pkid),
            Some(Tag::Other) | None => {}
        }
    }
}

/// The link task's state; built by [`super::Link::spawn`], consumed by [`Runner::run`].
pub(super) struct Runner {
    pub(super) s: FleetSettings,
    pub(super) policy: Policy,
    pub(super) reconnect: Reconnect,
    pub(super) topics: Topics,
    pub(super) spool: Spool,
    pub(super) recent: Recent,
    pub(super) baselines: Baselines,
    pub(super) baseline_tree: Option<sled::Tree>,
    pub(super) artifacts_checked: HashSet<VersionKey>,
    pub(super) status: watch::Receiver<Status>,
    pub(super) metrics: Option<Arc<Metrics>>,
    pub(super) drift: Option<Recorder>,
    pub(super) sampler: Arc<Mutex<HostSampler>>,
    pub(super) requests: RequestWindow,
    pub(super) bus: Bus,
    pub(super) events_rx: mpsc::Receiver<Event>,
    pub(super) control_rx: mpsc::Receiver<Control>,
    pub(super) state_tx: watch::Sender<LinkState>,
    pub(super) state: LinkState,
    pub(super) events_dropped: Arc<AtomicU64>,
    pub(super) conn: Option<Conn>,
    pub(super) next_attempt: Instant,
    pub(super) next_health: Instant,
    pub(super) next_drift: Instant,
    pub(super) health_jitter: Jitter,
    pub(super) drift_jitter: Jitter,
    pub(super) running: JoinSet<(Running, Result<Outcome, String>)>,
    /// `report` commands waiting for the next health report.
    pub(super) pending_reports: Vec<Running>,
    /// The latest drift window's verdict, repeated in every health report (so the retained
    /// health tells a console about an alert without the drift reports).
    pub(super) last_drift: Option<serde_json::Value>,
    pub(super) flush_at: Option<Instant>,
    /// When to leave a tentative 3.1.1 connection to try MQTT 5 again.
    pub(super) probe_at: Option<Instant>,
    /// Highest seq known to be on disk; only messages up to it are published.
    pub(super) durable_seq: u64,
    /// Final command replies not yet acknowledged by the broker.
    pub(super) finals: Finals,
    /// Flushes of the spool's database completed since start.
    pub(super) flushes: u64,
    /// Resolves (or closes) once the last accepted command was handed to the bus: the next
    /// waits for it, so commands run in the order they arrived.
    pub(super) submit_chain: Option<tokio::sync::oneshot::Receiver<()>>,
    pub(super) overflow_unreported: u64,
    pub(super) session: String,
    pub(super) started: Instant,
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
    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        loop {
            if self.conn.is_none() && Instant::now() >= self.next_attempt {
                self.start_connection();
            }
            let attempt_at = self.conn.is_none().then_some(self.next_attempt);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                ev = next_wire(&mut self.conn) => self.on_wire(ev.unwrap_or_else(|| WireEvent::Closed(Closed::other("the connection driver stopped", false)))),
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
                () = sleep_until_opt(self.probe_at) => self.probe_v5().await,
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
            will: Some((self.topics.status(), will.to_string().into_bytes())),
            max_packet: MAX_PACKET,
        }
    }

    fn start_connection(&mut self) {
        let mut options = self.connect_options();
        if self.s.broker.tls {
            match super::tls::client_config(self.s.ca_file.as_deref(), self.s.cert_file.as_deref().zip(self.s.key_file.as_deref())) {
                Ok(c) => options.tls = Some(c),
                Err(e) => {
                    let text = crate::util::chain(&e);
                    tracing::error!(error = %text, "TLS setup failed; retrying later");
                    self.state.last_error = Some(text);
                    let closed = Closed::other(e.to_string(), true);
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
            serial: 0,
        });
    }

    fn on_wire(&mut self, ev: WireEvent) {
        match ev {
            WireEvent::Connected => self.on_connected(),
            WireEvent::Message { topic, payload, response_topic, correlation, .. } => self.on_command(&topic, &payload, response_topic, correlation),
            WireEvent::Sent { pkid } => {
                if let Some(c) = &mut self.conn {
                    c.sent(pkid);
                }
            }
            WireEvent::Acked { pkid, accepted } => match self.conn.as_mut().and_then(|c| c.inflight.remove(&pkid)) {
                Some(Tag::Spooled(seq)) => {
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
                Some(Tag::Final(id)) => {
                    if !accepted {
                        tracing::warn!("the broker refused a command reply (not authorized?); dropping it");
                    }
                    self.finals.acked(id);
                }
                Some(Tag::Other | Tag::Goodbye) | None => {}
            },
            WireEvent::Subscribed { granted } => {
                if !granted {
                    tracing::error!(topics = ?self.topics.commands(), "the broker refused a command subscription (ACL?); the commands on its topic will not arrive");
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
        let serial = self.state.connections;
        if self.durable_seq < self.spool.next_seq().saturating_sub(1) {
            self.flush_at = Some(Instant::now());
        }
        self.probe_at = self.reconnect.tentative().then(|| Instant::now() + PROTOCOL_PROBE_AFTER);
        let Some(c) = &mut self.conn else { return };
        c.up = true;
        c.serial = serial;
        let version = c.version;
        self.state.connected = true;
        self.state.protocol = Some(version.as_str());
        self.state.last_error = None;
        tracing::info!(protocol = version.as_str(), queued = self.spool.len(), "connected to the broker");
        let birth = json!({
            "schema": SCHEMA, "kind": "status", "device": self.s.device_id, "state": "online", "ts": unix_now(),
            "agent_version": env!("CARGO_PKG_VERSION"), "protocol": version.as_str(), "session": self.session,
            "groups": self.topics.groups(),
        });
        let status_topic = self.topics.status();
        let commands = self.topics.commands();
        if c.client().publish(&status_topic, true, birth.to_string().into_bytes(), None).is_ok() {
            c.awaiting.push_back(Tag::Other);
        }
        for filter in &commands {
            if let Err(e) = c.client().subscribe(filter) {
                tracing::error!(?e, filter, "subscribing to commands failed");
            }
        }
        if self.overflow_unreported > 0 {
            let dropped = std::mem::take(&mut self.overflow_unreported);
            self.push_event(Event::SpoolOverflow { dropped });
        }
    }

    fn on_closed(&mut self, c: Closed) {
        let was_up = self.conn.as_ref().is_some_and(|c| c.up);
        self.conn = None;
        self.probe_at = None;
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

    /// Publishes the final replies this connection has not had, then spooled messages that
    /// are on disk while the window has room.
    fn pump(&mut self) {
        self.send_finals();
        let Some(c) = &mut self.conn else { return };
        if !c.up {
            return;
        }
        let room = WINDOW.saturating_sub(c.in_window());
        if room == 0 {
            return;
        }
        let durable = self.durable_seq;
        for r in self.spool.after(c.last_sent, room).into_iter().take_while(|r| r.seq <= durable) {
            let topic = self.topics.channel(r.channel.topic_suffix());
            // The latest health report stays on the broker, so a console sees every device's
            // state at once (`edgeflow fleet console devices`) without waiting a report interval.
            let retain = r.channel == Channel::Health;
            match c.client().publish(&topic, retain, r.payload, None) {
                Ok(()) => {
                    c.awaiting.push_back(Tag::Spooled(r.seq));
                    c.last_sent = Some(r.seq);
                }
                Err(_) => break,
            }
        }
    }

    pub(super) fn mark_dirty(&mut self) {
        if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + FLUSH_DELAY);
        }
    }

    /// A message was spooled: while connected it is published once on disk, so the flush
    /// comes at once (a burst of messages still shares one); offline it can wait.
    pub(super) fn spooled(&mut self) {
        if self.conn.as_ref().is_some_and(|c| c.up) {
            self.flush_at = Some(Instant::now());
        } else {
            self.mark_dirty();
        }
    }

    async fn flush(&mut self) {
        self.flush_at = None;
        let through = self.spool.next_seq().saturating_sub(1);
        let db = self.spool.db().clone();
        let flushed = tokio::task::spawn_blocking(move || {
            crate::crash::point("fleet.spool_flushing");
            let flushed = db.flush();
            crate::crash::point("fleet.spool_flushed");
            flushed
        });
        match flushed.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing the spool failed"),
            Err(e) => tracing::warn!(error = %e, "the spool flush task failed"),
        }
        // DEVNOTE: also after a failed flush. A disk that refuses to sync must not silence the
        // device; the messages are in memory, and only a crash before a later flush could
        // hand their seqs out again.
        self.durable_seq = self.durable_seq.max(through);
        self.flushes += 1;
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
                    Some(WireEvent::Sent { pkid }) => c.sent(pkid),
                    Some(WireEvent::Acked { pkid, .. }) if c.goodbye_pkid == Some(pkid) => break,
                    Some(WireEvent::Acked { pkid, .. }) => match c.inflight.remove(&pkid) {
                        Some(Tag::Spooled(seq)) => {
                            let _ = self.spool.remove(seq);
                        }
                        Some(Tag::Final(id)) => self.finals.acked(id),
                        _ => {}
                    },
                    Some(WireEvent::Closed(_)) | None => {
                        tracing::warn!("the broker did not acknowledge the goodbye in time");
                        return;
                    }
                    Some(_) => {}
                }
            }
        }
        disconnect(&mut c).await;
        self.state.connected = false;
        self.state.protocol = None;
        tracing::info!("said goodbye to the broker");
    }

    /// Leaves a 3.1.1 connection that followed a hang-up on MQTT 5 (a broker restarting, a
    /// balancer with no live node behind it) and tries 5 again at once. Cleanly, so the
    /// broker drops the Last Will and the retained status stays `online`; what was in flight
    /// is published again on the next connection, as after any drop.
    async fn probe_v5(&mut self) {
        self.probe_at = None;
        let Some(mut c) = self.conn.take() else { return };
        tracing::info!("connected with MQTT 3.1.1 after the broker hung up on 5; reconnecting once to check whether it speaks 5");
        disconnect(&mut c).await;
        self.state.connected = false;
        self.state.protocol = None;
        self.reconnect.probe();
        self.next_attempt = Instant::now();
    }
}

/// Disconnects cleanly (the broker then drops the Last Will) and waits a bounded time for the
/// connection to end.
async fn disconnect(c: &mut Conn) {
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
}
