//! Broker faults (RELIABILITY.md, "Broker faults"): the fleet link reports and takes commands
//! while its real Mosquitto broker is SIGKILLed and started again, over and over.
//!
//! A campaign runs one device, either the fleet link in this process (the code path
//! tests/fleet.rs drives, with a stand-in daemon on the command bus that counts what it runs)
//! or a whole `edgeflow run` daemon following a real MLflow server. The device reports at a
//! short interval; a seeded schedule keeps the broker up and down for random spells and kills
//! it with SIGKILL at a random moment, right after a command reached it, or while the device
//! is replaying its spool. A console sends signed commands with unique ids throughout, repeats
//! one whose publish failed, repeats one that got no final reply for a while (with the same id,
//! as a console's retry would), and repeats some that were answered (as a broker's redelivery
//! would). Halfway through, the device itself is restarted on the same spool.
//!
//! A `mosquitto_sub` observer subscribed to everything of the device is the judge ([`OBSERVER`]). A SIGKILLed
//! broker keeps no session, so the device reaches the restarted broker through a [`Gate`] that
//! opens only once the observer has subscribed again; from then on, whatever the broker
//! accepts has a subscriber to reach. At the end, read from the observer and from the device
//! (its link state, its spool on disk, what its command handler ran):
//! - every report seq produced arrived, or is still in the spool, or is one the spool's cap
//!   dropped (the count the device reports), in order; a seq that arrives twice carries the
//!   same bytes (a redelivery, never a new message under an old seq);
//! - every command got a final reply, all replies for one id tell the same outcome, no command
//!   ran twice, and no final reply was lost by the device (answered only when repeated,
//!   without a device restart to explain it).
//!
//! `broker_faults_in_process` and `broker_faults_whole_daemon` are part of `make test`;
//! `broker_faults_campaign` (ignored) is the larger run RELIABILITY.md quotes:
//! `BROKER_FAULTS_SEED=<n> BROKER_FAULTS_KILLS=<n> cargo test --release --test broker_faults --
//! --ignored broker_faults_campaign --nocapture`. The other tests here are regression tests of
//! the defects the campaign and the review around it found.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::{config, Daemon, MODEL};
use common::env_or;
use common::mlflow::Mlflow;
use common::mqtt::{settings, try_publish_v5_command, Gate, Mosquitto, Sub};
use edgeflow::command::{Bus, Origin};
use edgeflow::fleet::spool::Spool;
use edgeflow::fleet::{Event, Link, LinkHandle, LinkState};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// A console repeats a command that got no final reply for this long.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// How long the end of a campaign waits for the last replies and reports.
const SETTLE: Duration = Duration::from_secs(60);
const KEY: [u8; 32] = [17; 32];
/// The observer subscribes with QoS 0: it then never writes to the broker, and reads all that
/// reached its socket before a kill. With QoS 1 its acknowledgement of one message can hit the
/// killed broker's reset first, and libmosquitto drops the connection with the messages behind
/// it unread: a loss of the observer's, not of the device's.
const OBSERVER: &[&str] = &["-q", "0"];

// ---------------------------------------------------------------------------------------------
// The device under test.

/// What the campaign reads of the device's link: its `LinkState`, or `/status` of a daemon.
#[derive(Debug, Clone, Copy, Default)]
struct LinkView {
    connected: bool,
    spool_depth: u64,
    spool_bytes: u64,
    delivered: u64,
    dropped: u64,
}

trait Device {
    fn id(&self) -> &'static str;
    fn view(&mut self) -> LinkView;
    /// How often the daemon side ran each command, by request id (the link's own `report` is
    /// counted from its replies instead).
    fn executions(&self) -> BTreeMap<String, usize>;
    /// Queues `n` events at once (a backlog to replay); false if this device cannot.
    fn burst(&mut self, n: usize) -> bool;
    /// Stops the device (cleanly, or by SIGKILL) and starts it again on the same spool.
    fn restart(&mut self, kill: bool);
    /// Stops it for good, cleanly; returns its spool folder.
    fn finish(&mut self) -> PathBuf;
    /// The commands to send it.
    fn commands(&self) -> &'static [&'static str];
    /// How often [`Device::view`] may be called while watching closely.
    fn poll_every(&self) -> Duration;
}

/// The fleet link in this process, with a stand-in daemon on the bus that counts each run and
/// answers with a run number, so an answer tells which run it came from.
struct InProcess {
    rt: tokio::runtime::Runtime,
    settings: edgeflow::fleet::FleetSettings,
    bus: Bus,
    runs: Arc<Mutex<BTreeMap<String, usize>>>,
    running: Option<(LinkHandle, CancellationToken)>,
    _status: edgeflow::status::Publisher,
    status_rx: tokio::sync::watch::Receiver<edgeflow::status::Status>,
    spool: tempfile::TempDir,
}

impl InProcess {
    fn start(broker: &str, extra: &str) -> InProcess {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let spool = tempfile::tempdir().unwrap();
        let settings = settings(broker, "bf-link", &spool.path().join("spool"), extra);
        let (bus, mut rx) = Bus::new(16);
        let runs: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let seen = runs.clone();
        rt.spawn(async move {
            let mut run = 0u64;
            while let Some(req) = rx.recv().await {
                run += 1;
                if let Origin::Fleet { request_id } = &req.origin {
                    *seen.lock().unwrap().entry(request_id.clone()).or_default() += 1;
                }
                let did = req.command.name();
                req.respond(Ok(json!({ "did": did, "run": run })));
            }
        });
        let (status, status_rx) = edgeflow::status::channel();
        let mut d = InProcess { rt, settings, bus, runs, running: None, _status: status, status_rx, spool };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let _guard = self.rt.enter();
        let shutdown = CancellationToken::new();
        let link = Link::new(self.settings.clone()).metrics(Arc::new(edgeflow::telemetry::Metrics::new()));
        let handle = link.spawn(self.status_rx.clone(), self.bus.clone(), shutdown.clone()).expect("the link starts");
        self.running = Some((handle, shutdown));
    }

    fn stop(&mut self) {
        if let Some((handle, shutdown)) = self.running.take() {
            shutdown.cancel();
            self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), handle.join()).await }).expect("the link stops").expect("no panic");
        }
    }

    fn state(&self) -> LinkState {
        self.running.as_ref().map(|(h, _)| h.state().borrow().clone()).unwrap_or_default()
    }
}

impl Device for InProcess {
    fn id(&self) -> &'static str {
        "bf-link"
    }

    fn view(&mut self) -> LinkView {
        let s = self.state();
        LinkView { connected: s.connected, spool_depth: s.spool_depth, spool_bytes: s.spool_bytes, delivered: s.delivered, dropped: s.spool_dropped }
    }

    fn executions(&self) -> BTreeMap<String, usize> {
        self.runs.lock().unwrap().clone()
    }

    fn burst(&mut self, n: usize) -> bool {
        let Some((handle, _)) = &self.running else { return false };
        for i in 0..n {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !handle.event(Event::PullFailed { model: "m".into(), reason: format!("burst event {i}: registry unreachable") }) {
                assert!(Instant::now() < deadline, "the link's event queue stayed full");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        true
    }

    fn restart(&mut self, kill: bool) {
        assert!(!kill, "a link in this process can only be stopped cleanly");
        self.stop();
        self.spawn();
    }

    fn finish(&mut self) -> PathBuf {
        self.stop();
        self.spool.path().join("spool")
    }

    fn commands(&self) -> &'static [&'static str] {
        &["sync", "pin", "rollback", "reload", "report", "set"]
    }

    fn poll_every(&self) -> Duration {
        Duration::from_millis(1)
    }
}

/// A whole `edgeflow run` daemon serving the tiny model from a real MLflow server.
struct Whole {
    // Dropped in this order: the daemon before its folder and its registry.
    daemon: Option<Daemon>,
    logs: Vec<PathBuf>,
    config: String,
    dir: tempfile::TempDir,
    _mlflow: Mlflow,
}

impl Whole {
    fn start(broker: &str, public_key: &str) -> Whole {
        let mlflow = Mlflow::start(&[]);
        mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", Some("Production"), None);
        let dir = tempfile::tempdir().unwrap();
        let fleet = format!(
            "[fleet]\nbroker = \"{broker}\"\ndevice_id = \"bf-daemon\"\nspool_dir = \"{}\"\nreport_interval = \"200ms\"\ndrift_interval = \"1h\"\nkeep_alive = \"5s\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\nsignature_public_key = \"{public_key}\"\n",
            dir.path().join("spool").display()
        );
        let config = config(&mlflow.url, dir.path(), &fleet);
        let mut w = Whole { _mlflow: mlflow, dir, config, daemon: None, logs: Vec::new() };
        w.launch();
        w.daemon.as_mut().unwrap().wait_serving("1");
        w
    }

    fn launch(&mut self) {
        let mut d = Daemon::start(self.dir.path(), &self.config, None);
        self.logs.push(d.log.clone());
        d.status();
        self.daemon = Some(d);
    }
}

impl Device for Whole {
    fn id(&self) -> &'static str {
        "bf-daemon"
    }

    fn view(&mut self) -> LinkView {
        let s = self.daemon.as_mut().expect("running").status();
        let f = &s["fleet"];
        let n = |k: &str| f[k].as_u64().unwrap_or(0);
        LinkView { connected: f["connected"] == true, spool_depth: n("spool_depth"), spool_bytes: 0, delivered: n("delivered"), dropped: n("spool_dropped") }
    }

    /// Each run of a fleet command by the daemon's handler logs one `command` line naming its
    /// origin (src/app/commands.rs).
    fn executions(&self) -> BTreeMap<String, usize> {
        let mut runs = BTreeMap::new();
        for log in &self.logs {
            for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
                if !line.contains("edgeflow::app::commands") {
                    continue;
                }
                if let Some(rest) = line.split("Fleet { request_id: \"").nth(1) {
                    if let Some(id) = rest.split('"').next() {
                        *runs.entry(id.to_string()).or_default() += 1;
                    }
                }
            }
        }
        runs
    }

    fn burst(&mut self, _n: usize) -> bool {
        false
    }

    fn restart(&mut self, kill: bool) {
        let mut d = self.daemon.take().expect("running");
        if kill {
            sigkill(&mut d.child);
        } else {
            assert!(d.stop().success(), "{}", d.log());
        }
        self.launch();
    }

    fn finish(&mut self) -> PathBuf {
        if let Some(mut d) = self.daemon.take() {
            assert!(d.stop().success(), "{}", d.log());
        }
        self.dir.path().join("spool")
    }

    /// What the daemon does cheaply and without changing the model it serves.
    fn commands(&self) -> &'static [&'static str] {
        &["sync", "report", "set"]
    }

    /// Each look is a `curl` of `/status`.
    fn poll_every(&self) -> Duration {
        Duration::from_millis(20)
    }
}

// ---------------------------------------------------------------------------------------------
// The console and the observer.

/// One of `device`'s commands, with arguments.
fn command(device: &dyn Device, rng: &mut fastrand::Rng) -> (&'static str, Value) {
    let names = device.commands();
    let name = names[rng.usize(..names.len())];
    let args = match name {
        "pin" => json!({ "version": rng.u32(1..9).to_string() }),
        "set" => json!({ "poll_interval": format!("{}s", rng.u32(5..60)) }),
        _ => json!({}),
    };
    (name, args)
}

/// One command the console sent, with every send of it.
struct Sent {
    id: String,
    name: &'static str,
    topic: String,
    payload: String,
    first_sent: Instant,
    last_send: Instant,
    last_send_ok: bool,
    /// Publishes of it, all told.
    sends: u32,
    /// Publishes the broker did not take (it was down); each is repeated at the next turn.
    failed_publishes: u32,
    /// Repeats after no final reply for [`RETRY_AFTER`].
    retries: u32,
    /// Repeats of it once answered, on purpose.
    deliberate: u32,
}

/// What the observer saw, consumed incrementally from the `mosquitto_sub` output.
#[derive(Default)]
struct Observed {
    cursor: usize,
    /// Payloads of each report seq (several if it arrived more than once).
    reports: BTreeMap<u64, Vec<String>>,
    /// Seqs in the order of their first arrival.
    first_seen: Vec<u64>,
    /// Final replies by request id, in arrival order, with when they arrived.
    finals: HashMap<String, Vec<(Instant, Value)>>,
    /// `dropped` of every `spool_overflow` event (by seq, so a redelivered one counts once).
    overflow: BTreeMap<u64, u64>,
}

impl Observed {
    fn update(&mut self, sub: &Sub, device: &str) {
        let (msgs, next) = sub.since(self.cursor);
        self.cursor = next;
        let now = Instant::now();
        let reply_prefix = format!("edgeflow/{device}/reply/");
        for m in msgs {
            let channel = m.topic.strip_prefix(&format!("edgeflow/{device}/")).unwrap_or_default();
            if matches!(channel, "health" | "drift" | "events") {
                let v = m.json();
                let seq = v["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {}", m.payload));
                let copies = self.reports.entry(seq).or_default();
                if copies.is_empty() {
                    self.first_seen.push(seq);
                }
                copies.push(m.payload.clone());
                if v["event"] == "spool_overflow" {
                    self.overflow.insert(seq, v["dropped"].as_u64().unwrap_or(0));
                }
            } else if m.topic.starts_with(&reply_prefix) {
                let v = m.json();
                if v["status"] != "accepted" {
                    let id = v["request_id"].as_str().unwrap_or_default().to_string();
                    self.finals.entry(id).or_default().push((now, v));
                }
            }
        }
    }
}

struct Console {
    port: u16,
    device: &'static str,
    key: ed25519_dalek::SigningKey,
    sent: Vec<Sent>,
    next: u64,
}

impl Console {
    fn reply_topic(&self) -> String {
        format!("edgeflow/{}/reply/console", self.device)
    }

    fn send(&mut self, i: usize) -> bool {
        let reply = self.reply_topic();
        let c = &mut self.sent[i];
        c.sends += 1;
        let ok = try_publish_v5_command(self.port, &c.topic, &c.payload, &reply, &format!("{}#{}", c.id, c.sends));
        c.last_send = Instant::now();
        c.last_send_ok = ok;
        if !ok {
            c.failed_publishes += 1;
        }
        ok
    }

    /// A new command, signed, sent once; returns whether the broker took it.
    fn new_command(&mut self, name: &'static str, args: Value) -> bool {
        self.next += 1;
        let id = format!("{}-{}", self.device, self.next);
        let now = edgeflow::util::unix_now();
        let body = json!({"request_id": id, "args": args, "issued_at": now, "expires_at": now + 300});
        let payload = edgeflow::fleet::commands::sign(&self.key, self.device, name, &body);
        let at = Instant::now();
        self.sent.push(Sent {
            id,
            name,
            topic: format!("edgeflow/{}/cmd/{name}", self.device),
            payload,
            first_sent: at,
            last_send: at,
            last_send_ok: false,
            sends: 0,
            failed_publishes: 0,
            retries: 0,
            deliberate: 0,
        });
        self.send(self.sent.len() - 1)
    }

    /// Repeats what a console would: a command whose publish failed, one without a final reply
    /// for [`RETRY_AFTER`]; and, with probability `dup`, one already answered.
    fn repeat(&mut self, seen: &Observed, rng: &mut fastrand::Rng, dup: f64) {
        for i in 0..self.sent.len() {
            let c = &self.sent[i];
            if seen.finals.contains_key(&c.id) {
                continue;
            }
            if !c.last_send_ok {
                self.send(i);
            } else if c.last_send.elapsed() >= RETRY_AFTER {
                self.sent[i].retries += 1;
                self.send(i);
            }
        }
        if rng.f64() < dup {
            let answered: Vec<usize> = (0..self.sent.len()).filter(|&i| seen.finals.contains_key(&self.sent[i].id)).collect();
            if !answered.is_empty() {
                let i = answered[rng.usize(..answered.len())];
                self.sent[i].deliberate += 1;
                self.send(i);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The campaign.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kill {
    /// At the end of a random spell up.
    Timed,
    /// Right after the broker took a new command for the device.
    AfterCommand,
    /// While the device replays a backlog after reconnecting.
    MidReplay,
}

#[derive(Default)]
struct Figures {
    kills: usize,
    kills_after_command: usize,
    kills_mid_replay: usize,
    /// From each kill to the broker listening again, summed.
    broker_down: Duration,
    /// From each kill to the gate opening (the observer subscribed again first), summed.
    cut_off: Duration,
    max_reconnect: Duration,
    max_redeliver: Duration,
    /// Outages whose reconnect and replay were timed to the end.
    outages_timed: usize,
    device_restarts: Vec<Instant>,
    burst_events: usize,
    wall: Duration,
}

struct Plan {
    seed: u64,
    kills: usize,
    /// Restart the device (after this many kills): SIGKILL it while the broker is up, or stop
    /// it cleanly while the broker is down.
    restart_after: usize,
    restart_by_kill: bool,
    /// After this many kills, an outage that overflows the spool's cap (devices that can make
    /// a backlog only).
    cap_outage_after: Option<usize>,
}

struct Campaign<'a> {
    rng: fastrand::Rng,
    broker: &'a mut Mosquitto,
    gate: &'a mut Gate,
    sub: &'a Sub,
    device: &'a mut dyn Device,
    console: Console,
    seen: Observed,
    f: Figures,
}

impl Campaign<'_> {
    fn observe(&mut self) {
        self.seen.update(self.sub, self.device.id());
    }

    /// One console turn: maybe a new command, and the repeats.
    fn console_turn(&mut self, new: f64, dup: f64) {
        self.observe();
        if self.rng.f64() < new {
            let (name, args) = command(&*self.device, &mut self.rng);
            self.console.new_command(name, args);
        }
        self.console.repeat(&self.seen, &mut self.rng, dup);
    }

    /// The broker is up (the gate open) from now: watches the device reconnect and replay its
    /// spool, runs the console for the rest of `spell`, then kills the broker as `kill` says.
    fn up_then_kill(&mut self, spell: Duration, kill: Kill) {
        let opened = Instant::now();
        let at_open = self.device.view();
        let mut connected_at = None;
        let mut how = kill;
        // Watched closely until the spool is empty again (or the spell is over).
        while opened.elapsed() < spell {
            let v = self.device.view();
            if connected_at.is_none() && v.connected {
                connected_at = Some(Instant::now());
                self.f.max_reconnect = self.f.max_reconnect.max(opened.elapsed());
            }
            if let Some(c) = connected_at {
                if kill == Kill::MidReplay && v.delivered > at_open.delivered && v.spool_depth > 0 {
                    break;
                }
                if v.spool_depth == 0 {
                    self.f.max_redeliver = self.f.max_redeliver.max(c.elapsed());
                    self.f.outages_timed += 1;
                    break;
                }
            }
            std::thread::sleep(self.device.poll_every());
        }
        if kill == Kill::MidReplay && opened.elapsed() < spell && self.device.view().spool_depth > 0 {
            // The replay is under way: the kill lands in it.
        } else {
            if kill == Kill::MidReplay {
                how = Kill::Timed; // the backlog drained before a kill could land in it
            }
            while opened.elapsed() < spell {
                self.console_turn(0.25, 0.05);
                std::thread::sleep(Duration::from_millis(self.rng.u64(50..200)));
            }
        }
        if how == Kill::AfterCommand {
            let (name, args) = command(&*self.device, &mut self.rng);
            if !self.console.new_command(name, args) {
                how = Kill::Timed;
            }
        }
        self.gate.close();
        self.broker.kill();
        self.f.kills += 1;
        match how {
            Kill::AfterCommand => self.f.kills_after_command += 1,
            Kill::MidReplay => self.f.kills_mid_replay += 1,
            Kill::Timed => {}
        }
    }

    /// Starts the broker again, waits for the observer, opens the gate.
    fn back_up(&mut self, killed_at: Instant) {
        self.broker.launch();
        self.f.broker_down += killed_at.elapsed();
        assert!(self.sub.subscribed(self.broker.port, Duration::from_secs(20)), "the observer did not come back:\n{}", self.broker.log());
        self.gate.open();
        self.f.cut_off += killed_at.elapsed();
    }

    fn run(&mut self, plan: &Plan) {
        let started = Instant::now();
        self.gate.open();
        for cycle in 0..plan.kills {
            let spell = Duration::from_millis(self.rng.u64(600..2500));
            let backlog = self.device.view().spool_depth;
            let kill = match self.rng.u32(..10) {
                0..=3 => Kill::Timed,
                4..=6 => Kill::AfterCommand,
                _ if backlog >= 50 => Kill::MidReplay,
                _ => Kill::Timed,
            };
            let cap_outage = plan.cap_outage_after == Some(cycle);
            if cap_outage {
                // An empty spool first, so the outage's drops are exactly what the cap took.
                let deadline = Instant::now() + Duration::from_secs(20);
                while self.device.view().spool_depth > 0 {
                    assert!(Instant::now() < deadline, "the spool never drained");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            self.up_then_kill(if cap_outage { Duration::ZERO } else { spell }, if cap_outage { Kill::Timed } else { kill });
            let killed_at = Instant::now();
            let down = Duration::from_millis(self.rng.u64(200..2000));
            if cap_outage {
                let before = self.device.view().dropped;
                let mut n = 0;
                while self.device.view().dropped < before + 100 {
                    assert!(self.device.burst(50), "only a device that can make a backlog gets a cap outage");
                    n += 50;
                    assert!(n < 20_000, "the spool never overflowed");
                    std::thread::sleep(Duration::from_millis(5));
                }
                self.f.burst_events += n;
            } else if self.rng.f64() < 0.5 && self.device.view().spool_bytes < 32 * 1024 {
                // Well below the cap (128 KiB) with the reports of the outage added.
                let n = self.rng.usize(50..150);
                if self.device.burst(n) {
                    self.f.burst_events += n;
                }
            }
            // The console keeps going while the broker is away: its publishes fail.
            while killed_at.elapsed() < down {
                self.console_turn(0.3, 0.0);
                std::thread::sleep(Duration::from_millis(self.rng.u64(100..300)));
            }
            if cycle + 1 == plan.restart_after && !plan.restart_by_kill {
                let before = self.device.view();
                self.device.restart(false);
                self.f.device_restarts.push(Instant::now());
                // The reopened spool holds the backlog (and the reports made since).
                let deadline = Instant::now() + Duration::from_secs(10);
                while self.device.view().spool_depth < before.spool_depth {
                    assert!(Instant::now() < deadline, "the spool reopened without its backlog: {before:?} then {:?}", self.device.view());
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            self.back_up(killed_at);
            if cap_outage {
                // The capped backlog drains before the next kill: a kill in its replay would
                // start a second outage on a full spool, whose drops (the oldest then, after
                // what the replay delivered) are right but no longer one run.
                let deadline = Instant::now() + Duration::from_secs(20);
                while self.device.view().spool_depth > 0 {
                    assert!(Instant::now() < deadline, "the capped backlog never drained");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            if cycle + 1 == plan.restart_after && plan.restart_by_kill {
                // Killed while connected and reporting: what it published in its last moments
                // must not come back under other seqs.
                let until = Instant::now() + Duration::from_millis(self.rng.u64(500..1500));
                while Instant::now() < until {
                    self.console_turn(0.5, 0.0);
                    std::thread::sleep(Duration::from_millis(100));
                }
                self.device.restart(true);
                self.f.device_restarts.push(Instant::now());
            }
        }
        // Settle: the broker stays up until every command is answered and the spool is empty.
        let deadline = Instant::now() + SETTLE;
        loop {
            self.console_turn(0.0, 0.0);
            let unanswered = self.console.sent.iter().filter(|c| !self.seen.finals.contains_key(&c.id)).count();
            if unanswered == 0 && self.device.view().spool_depth == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{unanswered} commands unanswered, or the spool not drained, {SETTLE:?} after the last restart");
            std::thread::sleep(Duration::from_millis(100));
        }
        self.f.wall = started.elapsed();
    }

    /// Stops the device, reads its spool, checks everything and prints the figures.
    fn judge(mut self, plan: &Plan, what: &str) {
        let spool_dir = self.device.finish();
        let parent = spool_dir.parent().expect("the spool has a parent folder");
        let moved: Vec<_> = std::fs::read_dir(parent).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains(".corrupt-")).collect();
        assert!(moved.is_empty(), "the spool was moved aside as damaged: {moved:?}");
        // The stopped link's last handles on the database go with its runtime's tasks.
        let opened = Instant::now();
        let spool = loop {
            match Spool::open(&spool_dir, 1 << 30) {
                Ok(s) => break s,
                Err(e) => assert!(opened.elapsed() < Duration::from_secs(10), "the stopped device's spool does not open: {e}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(spool.recreated().is_none(), "the spool was damaged");
        let produced = spool.next_seq() - 1;
        let waiting: BTreeSet<u64> = spool.after(None, usize::MAX).iter().map(|r| r.seq).collect();
        let dropped = spool.dropped_total();
        drop(spool);
        // The last reports may still be on their way to the observer.
        let deadline = Instant::now() + Duration::from_secs(10);
        let missing = loop {
            self.observe();
            let missing: Vec<u64> = (1..=produced).filter(|s| !self.seen.reports.contains_key(s) && !waiting.contains(s)).collect();
            if missing.len() as u64 <= dropped || Instant::now() > deadline {
                break missing;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let delivered = self.seen.reports.keys().filter(|s| **s <= produced).count();
        let copies: usize = self.seen.reports.values().map(Vec::len).sum();
        let reused: Vec<(u64, &Vec<String>)> = self.seen.reports.iter().filter(|(_, p)| p.iter().any(|x| *x != p[0])).map(|(s, p)| (*s, p)).collect();
        let out_of_order: Vec<&[u64]> = self.seen.first_seen.windows(2).filter(|w| w[0] >= w[1]).collect();
        let overflow_reported: u64 = self.seen.overflow.values().sum();

        // Commands.
        let runs = self.device.executions();
        let mut executed = 0;
        let mut twice = Vec::new();
        let mut unanswered = Vec::new();
        let mut inconsistent = Vec::new();
        let mut lost_finals = Vec::new();
        let mut restart_excused = 0;
        let mut acked_without_repeat = 0;
        let mut duplicates_answered = 0;
        for c in &self.console.sent {
            let Some(finals) = self.seen.finals.get(&c.id) else {
                unanswered.push(c.id.clone());
                continue;
            };
            let outcome = |v: &Value| (v["status"].clone(), v["result"].clone(), v["reason"].clone());
            if finals.iter().any(|(_, v)| outcome(v) != outcome(&finals[0].1)) {
                inconsistent.push((c.id.clone(), finals.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>()));
            }
            duplicates_answered += finals.iter().filter(|(_, v)| v["duplicate"] == true).count();
            let n = if c.name == "report" {
                // The link runs `report` itself: each run answers with the seq of its report.
                finals.iter().filter_map(|(_, v)| v["result"]["health_seq"].as_u64()).collect::<BTreeSet<_>>().len()
            } else {
                runs.get(&c.id).copied().unwrap_or(0)
            };
            if n > 1 {
                twice.push((c.id.clone(), n));
            }
            executed += usize::from(n > 0);
            let (first_at, first) = &finals[0];
            if first["duplicate"] == true {
                // Its outcome existed before this repeat asked for it: the first answer was lost.
                if self.f.device_restarts.iter().any(|r| *r > c.first_sent && r < first_at) {
                    restart_excused += 1;
                } else {
                    lost_finals.push(c.id.clone());
                }
            } else if c.retries == 0 && c.deliberate == 0 {
                acked_without_repeat += 1;
            }
        }
        let sends: u32 = self.console.sent.iter().map(|c| c.sends).sum();
        let failed_publishes: u32 = self.console.sent.iter().map(|c| c.failed_publishes).sum();
        let retries: u32 = self.console.sent.iter().map(|c| c.retries).sum();
        let deliberate: u32 = self.console.sent.iter().map(|c| c.deliberate).sum();
        let acked = self.console.sent.len() - unanswered.len();

        let f = &self.f;
        eprintln!(
            "\n== broker faults, {what}: seed {}, {} kills ({} right after a command reached the broker, {} during a spool replay), {} device restart(s) ({}), wall {:.1} s",
            plan.seed,
            f.kills,
            f.kills_after_command,
            f.kills_mid_replay,
            f.device_restarts.len(),
            if plan.restart_by_kill { "SIGKILL while connected" } else { "clean, while the broker was down" },
            f.wall.as_secs_f64()
        );
        eprintln!(
            "   broker down {:.1} s in all (kill to listening again); device cut off {:.1} s in all (kill to the gate opening, once the observer was back)",
            f.broker_down.as_secs_f64(),
            f.cut_off.as_secs_f64()
        );
        eprintln!(
            "   reports: {produced} produced, {delivered} delivered, {} still spooled at the end, {dropped} dropped by the cap ({} reported in spool_overflow events), {} missing, {} duplicate copies, {} seqs reused, {} out of order; {} burst events",
            waiting.len(),
            overflow_reported,
            missing.len(),
            copies - self.seen.reports.len(),
            reused.len(),
            out_of_order.len(),
            f.burst_events
        );
        eprintln!(
            "   commands: {} sent ({sends} publishes: {failed_publishes} failed while the broker was down, {retries} console retries after {}s without a final reply, {deliberate} deliberate repeats), {executed} executed, {} executed twice, {acked} acknowledged ({acked_without_repeat} without any repeat), {duplicates_answered} duplicate answers, {} answered only from the table after a device restart, {} final replies lost",
            self.console.sent.len(),
            RETRY_AFTER.as_secs(),
            twice.len(),
            restart_excused,
            lost_finals.len()
        );
        eprintln!(
            "   reconnect after the gate opened: max {:.0} ms; spool empty again after reconnecting: max {:.0} ms (over {} outages)",
            f.max_reconnect.as_secs_f64() * 1e3,
            f.max_redeliver.as_secs_f64() * 1e3,
            f.outages_timed
        );

        assert!(reused.is_empty(), "seqs that arrived with different contents (a seq handed out twice): {:#?}", &reused[..reused.len().min(3)]);
        assert!(out_of_order.is_empty(), "first arrivals out of order: {out_of_order:?}");
        if plan.cap_outage_after.is_some() {
            assert!(dropped > 0, "the cap outage dropped nothing");
            // A message the broker took just before it was killed, without its acknowledgement
            // reaching the device, is still spooled; the cap may then drop it although it
            // arrived. At most a window's worth (16) can be in that state.
            assert!(missing.len() as u64 <= dropped && dropped - missing.len() as u64 <= 16, "{} missing against {dropped} dropped by the cap: {missing:?}", missing.len());
            if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
                assert_eq!(last - first + 1, missing.len() as u64, "the cap drops the oldest of one outage, a single run: {missing:?}");
            }
            assert_eq!(overflow_reported, dropped, "spool_overflow events report every drop");
        } else {
            assert_eq!(dropped, 0, "no outage of this campaign fills the spool");
            assert!(missing.is_empty(), "reports lost: {missing:?}");
        }
        assert!(unanswered.is_empty(), "commands never answered: {unanswered:?}");
        assert!(twice.is_empty(), "commands executed more than once: {twice:?}");
        assert!(inconsistent.is_empty(), "replies to one id that disagree: {inconsistent:#?}");
        assert!(lost_finals.is_empty(), "final replies lost by the device (answered only when repeated): {lost_finals:?}");
        assert!(duplicates_answered > 0 || deliberate == 0, "the repeats were answered as duplicates");
    }
}

/// Runs `plan` on the device `start` makes, given the gate in front of the broker and the
/// fleet's public key (hex); `id` is the device's id.
fn campaign(plan: &Plan, what: &str, id: &'static str, start: impl FnOnce(&mut Gate, &str) -> Box<dyn Device>) {
    let mut broker = Mosquitto::start("");
    let mut gate = Gate::closed(broker.port);
    let port = broker.port;
    let sub = Sub::start_with(port, &[format!("edgeflow/{id}/#").as_str()], OBSERVER);
    let key = ed25519_dalek::SigningKey::from_bytes(&KEY);
    let mut device = start(&mut gate, &hex::encode(key.verifying_key().as_bytes()));
    let console = Console { port, device: id, key, sent: Vec::new(), next: 0 };
    let mut c = Campaign {
        rng: fastrand::Rng::with_seed(plan.seed),
        broker: &mut broker,
        gate: &mut gate,
        sub: &sub,
        device: &mut *device,
        console,
        seen: Observed::default(),
        f: Figures::default(),
    };
    c.run(plan);
    c.judge(plan, what);
}

fn campaign_in_process(plan: &Plan) {
    campaign(plan, "fleet link in process", "bf-link", |gate, key| {
        let extra = format!("report_interval = \"100ms\"\ndrift_interval = \"1h\"\nkeep_alive = \"5s\"\nspool_max_bytes = \"128KiB\"\nsignature_public_key = \"{key}\"\n");
        Box::new(InProcess::start(&gate.url(), &extra))
    });
}

fn campaign_whole_daemon(plan: &Plan) {
    campaign(plan, "whole edgeflow run daemon", "bf-daemon", |gate, key| {
        // Open from the start: the daemon's first connection is part of its startup.
        gate.open();
        Box::new(Whole::start(&gate.url(), key))
    });
}

#[test]
fn broker_faults_in_process() {
    let kills = env_or("BROKER_FAULTS_KILLS", 16);
    let plan = Plan { seed: env_or("BROKER_FAULTS_SEED", 20261207), kills, restart_after: kills / 2, restart_by_kill: false, cap_outage_after: Some(kills * 3 / 4) };
    campaign_in_process(&plan);
}

#[test]
fn broker_faults_whole_daemon() {
    let kills = env_or("BROKER_FAULTS_KILLS", 8);
    let plan = Plan { seed: env_or("BROKER_FAULTS_SEED", 20261207), kills, restart_after: kills / 2, restart_by_kill: true, cap_outage_after: None };
    campaign_whole_daemon(&plan);
}

/// The larger campaign RELIABILITY.md quotes (both devices, one after the other):
/// `BROKER_FAULTS_SEED` (default 1), `BROKER_FAULTS_KILLS` (default 100 for the link in
/// process, a third of it for the daemon).
#[test]
#[ignore = "campaign: several minutes"]
fn broker_faults_campaign() {
    let seed = env_or("BROKER_FAULTS_SEED", 1);
    let kills = env_or("BROKER_FAULTS_KILLS", 100);
    campaign_in_process(&Plan { seed, kills, restart_after: kills / 2, restart_by_kill: false, cap_outage_after: Some(kills * 3 / 4) });
    let kills = (kills / 3).max(2);
    campaign_whole_daemon(&Plan { seed, kills, restart_after: kills / 2, restart_by_kill: true, cap_outage_after: None });
}

// ---------------------------------------------------------------------------------------------
// Regression tests of the defects the campaign and its review found.

/// A fleet link on `rt` to `broker` as `device`, with a spool of its own (returned to be kept)
/// and unsigned commands going to `bus`.
fn one_link(rt: &tokio::runtime::Runtime, broker: &str, device: &str, bus: Bus) -> (LinkHandle, CancellationToken, tempfile::TempDir) {
    let spool = tempfile::tempdir().unwrap();
    let (status, status_rx) = edgeflow::status::channel();
    std::mem::forget(status); // the status never changes; its receiver must not see it closed
    let shutdown = CancellationToken::new();
    let _runtime = rt.enter();
    let handle = Link::new(settings(broker, device, spool.path(), "report_interval = \"1h\"\n")).spawn(status_rx, bus, shutdown.clone()).unwrap();
    (handle, shutdown, spool)
}

/// Waits (20 s at most) until the link's state satisfies `pred`; returns that state.
fn wait_link(handle: &LinkHandle, what: &str, pred: impl Fn(&LinkState) -> bool) -> LinkState {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = handle.state().borrow().clone();
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "link never {what}: {s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Defect 1: a final reply that came while the broker was away was dropped (a reply was only
/// published on a live connection, once), so a console that saw `accepted` never heard the
/// outcome unless it sent the command again. Final replies are now held until the broker
/// acknowledges them and published again on the next connection.
#[test]
fn a_final_reply_that_comes_while_the_broker_is_away_arrives_when_it_is_back() {
    let mut broker = Mosquitto::start("");
    let mut gate = Gate::closed(broker.port);
    let port = broker.port;
    let sub = Sub::start(port, &["edgeflow/bf-hold/#"]);
    gate.open();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // A daemon whose `sync` finishes only when the test says so.
    let (bus, mut rx) = Bus::new(4);
    let (release, released) = std::sync::mpsc::channel::<()>();
    let runs = Arc::new(Mutex::new(0));
    let seen = runs.clone();
    rt.spawn(async move {
        let released = Arc::new(Mutex::new(released));
        while let Some(req) = rx.recv().await {
            *seen.lock().unwrap() += 1;
            let r = released.clone();
            tokio::task::spawn_blocking(move || {
                let _ = r.lock().unwrap().recv();
                req.respond(Ok(json!({"did": "sync"})));
            });
        }
    });
    let (handle, shutdown, _spool) = one_link(&rt, &gate.url(), "bf-hold", bus);
    wait_link(&handle, "connected", |s| s.connected);
    std::thread::sleep(Duration::from_millis(300)); // the subscription follows the CONNACK
    let payload = json!({"request_id": "held-1", "args": {}}).to_string();
    assert!(try_publish_v5_command(port, "edgeflow/bf-hold/cmd/sync", &payload, "edgeflow/bf-hold/reply/console", "c1"));
    sub.wait(|m| m.correlation == "c1" && m.payload.contains("\"accepted\""), Duration::from_secs(20)).expect("accepted");
    // The broker dies while the command runs; the command then finishes.
    gate.close();
    broker.kill();
    wait_link(&handle, "disconnected", |s| !s.connected);
    release.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    broker.launch();
    assert!(sub.subscribed(port, Duration::from_secs(20)));
    gate.open();
    // No repeat from the console: the device answers by itself.
    let done = sub.wait(|m| m.payload.contains("\"held-1\"") && m.payload.contains("\"succeeded\""), Duration::from_secs(20));
    let done = done.expect("the final reply arrives once the broker is back, without the command being sent again").json();
    assert_eq!((done["result"]["did"].as_str(), done.get("duplicate")), (Some("sync"), None), "{done}");
    assert_eq!(*runs.lock().unwrap(), 1);
    shutdown.cancel();
    rt.block_on(handle.join()).unwrap();
}

/// `edgeflow fleet run` (the link alone, a real process) with its config in `dir`.
fn fleet_run(dir: &Path, broker: &str, extra: &str) -> std::process::Child {
    let config = dir.join("edgeflow.toml");
    std::fs::write(
        &config,
        format!(
            "[fleet]\nbroker = \"{broker}\"\ndevice_id = \"bf-kill\"\nrequire_signatures = false\nspool_dir = \"{}\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\n{extra}",
            dir.join("spool").display()
        ),
    )
    .unwrap();
    common::edgeflow().args(["fleet", "run", "--config"]).arg(&config).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap()
}

fn sigkill(child: &mut std::process::Child) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

/// Defect 2: a report was published as soon as it was spooled, up to a second before the
/// spool was flushed; a device killed in that second reopened its spool with the seq counter
/// of the last flush and sent new reports under seqs the console had already received, which
/// a console dropping duplicates by seq throws away. Reports now leave only once on disk.
#[test]
fn a_killed_device_never_reuses_a_seq_it_already_sent() {
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Sub::start(port, &["edgeflow/bf-kill/health"]);
    let dir = tempfile::tempdir().unwrap();
    let mut last = 0;
    for round in 0..4 {
        let mut agent = fleet_run(dir.path(), &broker.url(), "report_interval = \"100ms\"\n");
        // Killed right after a report of this run arrived: within a second of its spooling.
        let m = sub.wait(|m| m.json()["seq"].as_u64().is_some_and(|s| s > last + 2), Duration::from_secs(20));
        sigkill(&mut agent);
        last = m.unwrap_or_else(|| panic!("round {round}: no report")).json()["seq"].as_u64().unwrap();
    }
    let mut agent = fleet_run(dir.path(), &broker.url(), "report_interval = \"100ms\"\n");
    sub.wait(|m| m.json()["seq"].as_u64().is_some_and(|s| s > last + 5), Duration::from_secs(20)).expect("reports after the last restart");
    sigkill(&mut agent);
    let mut by_seq: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for m in sub.all() {
        by_seq.entry(m.json()["seq"].as_u64().unwrap()).or_default().insert(m.payload);
    }
    let reused: Vec<_> = by_seq.iter().filter(|(_, p)| p.len() > 1).collect();
    assert!(reused.is_empty(), "{} of {} seqs were sent with two contents: {:#?}", reused.len(), by_seq.len(), &reused[..reused.len().min(2)]);
}

/// Defect 3: the link's own commands (`report`, a `set` of its intervals) ran before their id
/// was on disk, and a final reply went out before its outcome was: a device killed just after
/// answering ran a repeated `report` again (a second report, another `health_seq`), or answered
/// a repeated command `interrupted` after telling `succeeded`. Every command now acts after its
/// id is flushed, and a final reply waits for the flush that records it.
#[test]
fn a_command_answered_just_before_a_kill_is_answered_the_same_after_it() {
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Sub::start(port, &["edgeflow/bf-kill/reply/#"]);
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let mut agent = fleet_run(dir.path(), &broker.url(), "report_interval = \"1h\"\n");
        let id = format!("report-{round}");
        let payload = json!({"request_id": id, "args": {}}).to_string();
        let first = (0..100).find_map(|i| {
            try_publish_v5_command(port, "edgeflow/bf-kill/cmd/report", &payload, "edgeflow/bf-kill/reply/console", &format!("{id}#{i}"));
            sub.wait(|m| m.payload.contains(&format!("\"{id}\"")) && !m.payload.contains("\"accepted\""), Duration::from_millis(200))
        });
        let first = first.unwrap_or_else(|| panic!("{id}: no final reply")).json();
        sigkill(&mut agent);
        let mut agent = fleet_run(dir.path(), &broker.url(), "report_interval = \"1h\"\n");
        let again = (0..100).find_map(|i| {
            let corr = format!("{id}#again{i}");
            try_publish_v5_command(port, "edgeflow/bf-kill/cmd/report", &payload, "edgeflow/bf-kill/reply/console", &corr);
            sub.wait(|m| m.correlation == corr && !m.payload.contains("\"accepted\""), Duration::from_millis(200))
        });
        let again = again.unwrap_or_else(|| panic!("{id}: no answer after the restart")).json();
        sigkill(&mut agent);
        assert_eq!(first["status"], "succeeded", "{first}");
        assert_eq!(
            (again["status"].clone(), again["result"].clone(), again["duplicate"].clone()),
            (first["status"].clone(), first["result"].clone(), json!(true)),
            "{id}: first {first}, after the kill {again}"
        );
    }
}

/// Defect 4 (found reading the reconnect policy for the campaign): with `protocol = "auto"`, a
/// device whose first MQTT 5 handshake was hung up on (a broker going down mid-handshake, a dead
/// node behind a load balancer) retried at once with 3.1.1 and, as soon as that worked, kept
/// 3.1.1 for good: replies then ignored the console's response topic. A fallback earned by a
/// hang-up is now tentative: once 3.1.1 has been up a while the link leaves it cleanly and tries
/// 5 again; only a second hang-up makes 3.1.1 final.
#[test]
fn a_hang_up_while_the_broker_restarts_does_not_leave_a_new_device_on_mqtt_3_1_1() {
    let mut broker = Mosquitto::start("");
    broker.kill();
    // The gate accepts and hangs up while nothing listens behind it, as a balancer would.
    let mut gate = Gate::closed(broker.port);
    gate.open();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (bus, _rx) = Bus::new(4);
    let (handle, shutdown, _spool) = one_link(&rt, &gate.url(), "bf-auto", bus);
    let deadline = Instant::now() + Duration::from_secs(20);
    while gate.accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the link never tried");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Its MQTT 5 handshake was hung up on; the broker is back for what follows.
    broker.launch();
    // Whether the immediate 3.1.1 retry met the broker or not, the link ends on 5: a 3.1.1
    // connection after a hang-up is left once to probe 5.
    let state = wait_link(&handle, "connected with MQTT 5", |s| s.connected && s.protocol == Some("5"));
    assert_eq!(state.protocol, Some("5"), "{state:?}");
    shutdown.cancel();
    rt.block_on(handle.join()).unwrap();
}
