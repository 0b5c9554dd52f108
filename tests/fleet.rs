//! The fleet link against real Mosquitto brokers (one per test, on its own loopback port,
//! plain, TLS and mutual TLS with certificates made by openssl), observed and driven with
//! `mosquitto_sub`/`mosquitto_pub`.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::free_port;
use common::mqtt::{assert_schema, publish, publish_v5_command, settings, Certs, Mosquitto, Proxy, Sub};
use edgeflow::command::{Bus, Command, Origin};
use edgeflow::fleet::{Event, Link, LinkHandle, LinkState};
use edgeflow::telemetry::drift::{Observation, Recorder};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// Commands the "daemon" received, answered `{"did": name}` (or failed for `pin 666`).
type Log = Arc<Mutex<Vec<(Command, Origin)>>>;

fn handler() -> (Bus, Log) {
    let (bus, mut rx) = Bus::new(16);
    let log: Log = Arc::default();
    let seen = log.clone();
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            seen.lock().unwrap().push((req.command.clone(), req.origin.clone()));
            let outcome = match &req.command {
                Command::Pin { version } if version == "666" => Err(format!("version {version} is not in the registry")),
                c => Ok(json!({ "did": c.name() })),
            };
            req.respond(outcome);
        }
    });
    (bus, log)
}

struct Running {
    handle: LinkHandle,
    shutdown: CancellationToken,
    _spool: Option<tempfile::TempDir>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle.join()).await.expect("the link stops").expect("no panic");
    }
}

fn spawn(settings: edgeflow::fleet::FleetSettings, bus: Bus, drift: Option<Recorder>) -> Running {
    let (_publisher, status) = edgeflow::status::channel();
    std::mem::forget(_publisher);
    spawn_with_status(settings, bus, drift, status)
}

fn spawn_with_status(settings: edgeflow::fleet::FleetSettings, bus: Bus, drift: Option<Recorder>, status: watch::Receiver<edgeflow::status::Status>) -> Running {
    let shutdown = CancellationToken::new();
    let mut link = Link::new(settings).metrics(Arc::new(edgeflow::telemetry::Metrics::new()));
    if let Some(r) = drift {
        link = link.drift(r);
    }
    let handle = link.spawn(status, bus, shutdown.clone()).expect("the link starts");
    Running { handle, shutdown, _spool: None }
}

async fn wait_state(handle: &LinkHandle, what: &str, pred: impl Fn(&LinkState) -> bool) -> LinkState {
    let mut rx = handle.state();
    let r = tokio::time::timeout(WAIT, rx.wait_for(|s| pred(s))).await;
    match r {
        Ok(Ok(s)) => s.clone(),
        _ => panic!("link never reached: {what}; last state {:?}", handle.state().borrow()),
    }
}

/// Waits on a blocking predicate without stalling the runtime the link runs on.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking helper")
}

const HEALTH: &[(&str, &str)] = &[
    ("schema", "u"),
    ("kind", "s"),
    ("device", "s"),
    ("seq", "u"),
    ("ts", "u"),
    ("agent.version", "s"),
    ("agent.uptime_s", "u"),
    ("agent.started_at", "u"),
    ("host.cpu_pct", "n"),
    ("host.mem_used_pct", "n"),
    ("host.mem_available_mb", "u"),
    ("host.load", "a"),
    ("host.uptime_s", "u"),
    ("model", "o?"),
    ("registry", "o?"),
    ("pinned", "s?"),
    ("requests.total", "u"),
    ("requests.window", "u"),
    ("requests.errors", "u"),
    ("requests.tokens_per_s", "n"),
    ("requests.queue_depth", "n"),
    ("requests.in_progress", "n"),
    ("link.protocol", "s?"),
    ("link.connections", "u"),
    ("link.reconnects", "u"),
    ("link.spool_depth", "u"),
    ("link.spool_dropped", "u"),
    ("link.commands_refused", "u"),
    ("drift", "o?"),
];

const DRIFT: &[(&str, &str)] = &[
    ("schema", "u"),
    ("kind", "s"),
    ("device", "s"),
    ("seq", "u"),
    ("ts", "u"),
    ("model", "s"),
    ("version", "s"),
    ("window.from", "u"),
    ("window.to", "u"),
    ("window.interval_s", "u"),
    ("n", "u"),
    ("sketch.schema", "u"),
    ("sketch.n", "u"),
    ("sketch.features.prompt_tokens.counts", "a"),
    ("sketch.features.prompt_tokens.sum", "n"),
    ("sketch.features.finish_reason.counts", "a"),
    ("sketch.features.mean_logprob.counts", "a"),
    ("sketch.features.mean_entropy.counts", "a"),
    ("sketch.features.byte_fallback_share.counts", "a"),
    ("sketch.features.latency_ms.counts", "a"),
    ("baseline.source", "s"),
    ("baseline.n", "u"),
    ("divergence", "o?"),
    ("alert", "b"),
    ("thresholds.psi", "n"),
    ("thresholds.js", "n"),
    ("thresholds.min_samples", "u"),
];

fn obs(prompt: usize, rng: &mut fastrand::Rng) -> Observation {
    let out = 1 + rng.usize(..30);
    Observation {
        prompt_tokens: prompt,
        output_tokens: out,
        finish: usize::from(rng.f64() < 0.3),
        mean_logprob: Some(-0.3 - rng.f64() * 2.0),
        mean_entropy: Some(0.5 + rng.f64() * 2.0),
        byte_fallback_share: Some(0.0),
        latency: Some(Duration::from_millis(30 + 5 * out as u64)),
        ttft: Some(Duration::from_millis(10 + rng.u64(..10))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn birth_then_last_will_when_the_agent_is_killed_and_goodbye_on_a_clean_stop() {
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/+/status"])).await);
    let spool = tempfile::tempdir().unwrap();
    let config = spool.path().join("edgeflow.toml");
    std::fs::write(
        &config,
        format!(
            "[fleet]\nbroker = \"{}\"\ndevice_id = \"killed\"\nkeep_alive = \"5s\"\nrequire_signatures = false\nspool_dir = \"{}\"\n",
            broker.url(),
            spool.path().join("spool").display()
        ),
    )
    .unwrap();
    let mut agent = common::edgeflow().args(["fleet", "run", "--config"]).arg(&config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let s2 = sub.clone();
    let online = blocking(move || s2.wait(|m| m.topic == "edgeflow/killed/status" && m.payload.contains("\"online\""), WAIT)).await;
    let online = online.expect("the birth message arrives").json();
    assert_schema(
        &online,
        &[("schema", "u"), ("kind", "s"), ("device", "s"), ("state", "s"), ("ts", "u"), ("agent_version", "s"), ("protocol", "s"), ("session", "s"), ("groups", "a")],
    );
    assert_eq!(online["groups"], json!(["all"]));
    assert_eq!((online["state"].as_str(), online["protocol"].as_str()), (Some("online"), Some("5")));
    // kill -9: no goodbye; the broker publishes the Last Will.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    agent.wait().unwrap();
    let will = blocking({
        let sub = sub.clone();
        move || sub.wait(|m| m.topic == "edgeflow/killed/status" && m.payload.contains("connection_lost"), WAIT)
    })
    .await
    .expect("the Last Will is published")
    .json();
    assert_eq!((will["state"].as_str(), will["session"].as_str()), (Some("offline"), online["session"].as_str()));
    // The will is retained: a late subscriber sees the device offline.
    let late = blocking({
        let port = broker.port;
        move || {
            let late = Sub::start(port, &["edgeflow/killed/status"]);
            late.wait(|m| m.retained, WAIT)
        }
    })
    .await
    .expect("a retained status");
    assert!(late.payload.contains("\"offline\""), "{late:?}");

    // A clean stop publishes offline/shutdown itself (and no will follows).
    let (bus, _log) = handler();
    let running = spawn(settings(&broker.url(), "clean", &spool.path().join("clean"), ""), bus, None);
    wait_state(&running.handle, "connected", |s| s.connected).await;
    running.stop().await;
    let bye = blocking({
        let sub = sub.clone();
        move || sub.wait(|m| m.topic == "edgeflow/clean/status" && m.payload.contains("\"shutdown\""), WAIT)
    })
    .await
    .expect("a goodbye");
    assert_eq!(bye.json()["state"], "offline");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!sub.all().iter().any(|m| m.topic == "edgeflow/clean/status" && m.payload.contains("connection_lost")), "no will after a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_drift_arrive_and_match_their_schema() {
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/dev-h/health", "edgeflow/dev-h/drift"])).await);
    let spool = tempfile::tempdir().unwrap();
    let (bus, _log) = handler();
    let recorder = Recorder::new();
    let (publisher, status) = edgeflow::status::channel();
    publisher.update(|s| {
        s.model = Some(edgeflow::status::ModelStatus {
            name: "tiny".into(),
            version: "3".into(),
            digest: Some("sha256:ab".into()),
            target: Some("stage:Production".into()),
            activated_at: Some(1),
            dir: None,
        });
        s.registry = Some(edgeflow::status::PollStatus { checked_at: Some(2), outcome: "up_to_date".into(), detail: None, polls: 4 });
    });
    let mut rng = fastrand::Rng::with_seed(3);
    for _ in 0..40 {
        recorder.observe("tiny", "3", &obs(20 + rng.usize(..20), &mut rng));
    }
    let s = settings(&broker.url(), "dev-h", spool.path(), "report_interval = \"1s\"\ndrift_interval = \"1s\"\ndrift_min_samples = 10\n");
    let running = spawn_with_status(s, bus, Some(recorder.clone()), status);
    let got = blocking({
        let sub = sub.clone();
        move || (sub.wait_count(|m| m.topic.ends_with("/health"), 2, WAIT), sub.wait(|m| m.topic.ends_with("/drift"), WAIT))
    })
    .await;
    let (health, drift) = got;
    assert!(health.len() >= 2, "periodic health: {health:?}");
    for h in &health {
        let v = h.json();
        assert_schema(&v, HEALTH);
        assert_eq!((v["kind"].as_str(), v["device"].as_str(), v["schema"].as_u64()), (Some("health"), Some("dev-h"), Some(1)));
        assert_eq!(v["model"], json!({"name": "tiny", "version": "3", "digest": "sha256:ab", "target": "stage:Production", "activated_at": 1}));
        assert_eq!(v["registry"]["outcome"], "up_to_date");
    }
    let d = drift.expect("a drift report").json();
    assert_schema(&d, DRIFT);
    assert_eq!((d["model"].as_str(), d["version"].as_str(), d["n"].as_u64()), (Some("tiny"), Some("3"), Some(40)));
    assert_eq!(d["baseline"]["source"], "first_window");
    assert_eq!(d["alert"], false);
    // Privacy: a drift report is counts, sums and divergences; no text field at all.
    let text = d.to_string();
    assert!(!text.contains("prompt\":") && !text.contains("\"text\""), "{text}");
    // A second window is compared with the first.
    for _ in 0..40 {
        recorder.observe("tiny", "3", &obs(20 + rng.usize(..20), &mut rng));
    }
    let second = blocking({
        let sub = sub.clone();
        move || sub.wait(|m| m.topic.ends_with("/drift") && m.payload.contains("\"divergence\":{"), WAIT)
    })
    .await
    .expect("a compared drift window")
    .json();
    assert_schema(
        &second,
        &[("divergence.prompt_tokens.psi", "n"), ("divergence.prompt_tokens.js", "n"), ("divergence.prompt_tokens.n", "u"), ("divergence.prompt_tokens.alert", "b")],
    );
    // Health reports after a drift window repeat its verdict, for consoles that read only
    // the retained health.
    let verdict = blocking({
        let sub = sub.clone();
        move || sub.wait(|m| m.topic.ends_with("/health") && m.payload.contains("\"drift\":{"), WAIT)
    })
    .await
    .expect("a health report with the drift verdict")
    .json();
    assert_eq!(
        (verdict["drift"]["alert"].as_bool(), verdict["drift"]["model"].as_str(), verdict["drift"]["version"].as_str()),
        (Some(false), Some("tiny"), Some("3")),
        "{verdict}"
    );
    assert!(verdict["drift"]["ts"].is_u64(), "{verdict}");
    // Health sequence numbers are increasing: one spool, one order.
    let seqs: Vec<u64> = sub.json_on("edgeflow/dev-h/health").iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    running.stop().await;
    // The latest health report stays on the broker: a console that comes later reads it.
    let late = blocking(move || Sub::start(port, &["edgeflow/dev-h/health"]).wait(|m| m.retained, WAIT)).await.expect("a retained health report");
    assert_eq!(late.json()["kind"], "health");
}

/// Sends `payload` on cmd/<name> with MQTT 5 properties; returns the replies (accepted and
/// final) correlated to `corr`.
async fn round_trip(sub: &Arc<Sub>, port: u16, device: &str, name: &str, payload: &str, corr: &str, finals: usize) -> Vec<Value> {
    let topic = format!("edgeflow/{device}/cmd/{name}");
    let reply_topic = format!("edgeflow/{device}/reply/console");
    let (payload, corr2) = (payload.to_string(), corr.to_string());
    blocking(move || publish_v5_command(port, &topic, &payload, &reply_topic, &corr2)).await;
    let corr = corr.to_string();
    let sub = sub.clone();
    blocking(move || {
        let msgs = sub.wait_count(|m| m.correlation == corr && !m.payload.contains("\"accepted\""), finals, WAIT);
        assert!(msgs.len() >= finals, "no final reply for {corr}");
        sub.all().into_iter().filter(|m| m.correlation == corr).map(|m| m.json()).collect()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_round_trips_with_a_correlated_reply() {
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/+/reply/#", "edgeflow/dev-c/health"])).await);
    let spool = tempfile::tempdir().unwrap();
    let (bus, log) = handler();
    let running = spawn(settings(&broker.url(), "dev-c", spool.path(), "report_interval = \"1h\""), bus, None);
    wait_state(&running.handle, "connected", |s| s.connected).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the subscription follows the CONNACK

    let cases = [
        ("sync", json!({}), true),
        ("pin", json!({"version": "7"}), true),
        ("unpin", json!(null), true),
        ("rollback", json!({}), true),
        ("reload", json!({}), true),
        ("report", json!({}), true),
        ("set", json!({"poll_interval": "10m", "log_level": "debug"}), true),
        ("set", json!({"report_interval": "30s"}), true),
        ("pin", json!({"version": "666"}), false),
    ];
    for (i, (name, args, ok)) in cases.iter().enumerate() {
        let rid = format!("req-{i}");
        let corr = format!("corr-{i}");
        let replies = round_trip(&sub, port, "dev-c", name, &json!({"request_id": rid, "args": args}).to_string(), &corr, 1).await;
        let statuses: Vec<&str> = replies.iter().map(|r| r["status"].as_str().unwrap()).collect();
        assert_eq!(statuses, vec!["accepted", if *ok { "succeeded" } else { "failed" }], "{name}: {replies:#?}");
        for r in &replies {
            assert_schema(r, &[("schema", "u"), ("kind", "s"), ("device", "s"), ("request_id", "s"), ("command", "s"), ("status", "s"), ("ts", "u")]);
            assert_eq!((r["request_id"].as_str(), r["command"].as_str()), (Some(rid.as_str()), Some(*name)));
        }
        let last = replies.last().unwrap();
        if *ok {
            assert!(last.get("result").is_some(), "{last}");
        } else {
            assert!(last["reason"].as_str().unwrap().contains("not in the registry"), "{last}");
        }
    }
    // `report` publishes health at once (the interval is an hour) and names its seq.
    let report = sub.all().into_iter().find(|m| m.correlation == "corr-5" && m.payload.contains("succeeded")).unwrap().json();
    let seq = report["result"]["health_seq"].as_u64().expect("health_seq");
    let s2 = sub.clone();
    let health = blocking(move || s2.wait(|m| m.topic.ends_with("/health") && m.json()["seq"].as_u64() == Some(seq), WAIT)).await;
    assert!(health.is_some(), "the report's health message arrives");
    // The daemon saw exactly the commands that need it, with their request ids; `report` and
    // an interval-only `set` are the link's own.
    let seen: Vec<(String, String)> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(c, o)| {
            (
                c.name().to_string(),
                match o {
                    Origin::Fleet { request_id } => request_id.clone(),
                    Origin::Local => String::new(),
                },
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![("sync", "req-0"), ("pin", "req-1"), ("unpin", "req-2"), ("rollback", "req-3"), ("reload", "req-4"), ("set", "req-6"), ("pin", "req-8")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    );

    // Unknown commands and malformed payloads get a failed reply, and the link carries on.
    let bad: [(&str, &str, &str); 5] = [
        ("launch", r#"{"request_id":"b1"}"#, "unknown command"),
        ("sync", "this is not json", "malformed"),
        ("sync", r#"{"args":{}}"#, "malformed"),
        ("pin", r#"{"request_id":"b4","args":{"version":""}}"#, "non-empty"),
        ("sync", r#"{"request_id":"b5","args":{},"extra":true}"#, "malformed"),
    ];
    for (i, (name, payload, want)) in bad.iter().enumerate() {
        let corr = format!("bad-{i}");
        let replies = round_trip(&sub, port, "dev-c", name, payload, &corr, 1).await;
        let last = replies.last().unwrap();
        assert_eq!(last["status"], "failed", "{name} {payload}: {replies:#?}");
        assert!(last["reason"].as_str().unwrap().contains(want), "{name} {payload}: {last}");
    }
    assert!(running.handle.state().borrow().connected, "still connected after bad input");
    assert_eq!(log.lock().unwrap().len(), 7, "no bad command reached the daemon");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_request_ids_are_answered_from_the_first_result() {
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/+/reply/#"])).await);
    let spool = tempfile::tempdir().unwrap();
    let (bus, log) = handler();
    let running = spawn(settings(&broker.url(), "dev-d", spool.path(), ""), bus, None);
    wait_state(&running.handle, "connected", |s| s.connected).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let payload = json!({"request_id": "dup-1", "args": {"version": "9"}}).to_string();
    let first = round_trip(&sub, port, "dev-d", "pin", &payload, "c1", 1).await;
    let again = round_trip(&sub, port, "dev-d", "pin", &payload, "c2", 1).await;
    assert_eq!(first.last().unwrap()["status"], "succeeded");
    let dup = again.last().unwrap();
    assert_eq!((dup["status"].as_str(), dup["duplicate"].as_bool()), (Some("succeeded"), Some(true)), "{again:#?}");
    assert_eq!(dup["result"], first.last().unwrap()["result"], "the same answer");
    assert_eq!(again.len(), 1, "a duplicate of a finished command is not accepted again: {again:#?}");
    // Same id, other content: refused, not run.
    let other = json!({"request_id": "dup-1", "args": {"version": "10"}}).to_string();
    let refused = round_trip(&sub, port, "dev-d", "pin", &other, "c3", 1).await;
    assert!(refused.last().unwrap()["reason"].as_str().unwrap().starts_with("replayed"), "{refused:#?}");
    assert_eq!(log.lock().unwrap().len(), 1, "the daemon ran the command once");
    running.stop().await;

    // After a restart the id is still remembered (the table lives in the spool's database).
    let (bus, log2) = handler();
    let running = spawn(settings(&broker.url(), "dev-d", spool.path(), ""), bus, None);
    wait_state(&running.handle, "connected", |s| s.connected).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = round_trip(&sub, port, "dev-d", "pin", &payload, "c4", 1).await;
    assert_eq!(after.last().unwrap()["duplicate"], true, "{after:#?}");
    assert!(log2.lock().unwrap().is_empty());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_unsigned_expired_and_replayed_commands() {
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let public = hex::encode(key.verifying_key().as_bytes());
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/+/reply/#", "edgeflow/dev-s/events"])).await);
    let spool = tempfile::tempdir().unwrap();
    let (bus, log) = handler();
    let extra = format!("require_signatures = true\nsignature_public_key = \"{public}\"\nsignature_max_age = \"5m\"\n");
    let running = spawn(settings(&broker.url(), "dev-s", spool.path(), &extra), bus, None);
    wait_state(&running.handle, "connected", |s| s.connected).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let now = edgeflow::util::unix_now();
    let body = |id: &str, issued: u64, ttl: u64| json!({"request_id": id, "args": {}, "issued_at": issued, "expires_at": issued + ttl});

    // Signed and fresh: runs.
    let good = edgeflow::fleet::commands::sign(&key, "dev-s", "sync", &body("s-1", now, 60));
    let r = round_trip(&sub, port, "dev-s", "sync", &good, "g1", 1).await;
    assert_eq!(r.last().unwrap()["status"], "succeeded", "{r:#?}");

    let refusals = [
        ("unsigned", json!({"request_id": "u-1", "args": {}}).to_string(), "unsigned"),
        ("wrong key", edgeflow::fleet::commands::sign(&ed25519_dalek::SigningKey::from_bytes(&[8; 32]), "dev-s", "sync", &body("k-1", now, 60)), "bad_signature"),
        ("other device", edgeflow::fleet::commands::sign(&key, "dev-other", "sync", &body("o-1", now, 60)), "bad_signature"),
        ("expired", edgeflow::fleet::commands::sign(&key, "dev-s", "sync", &body("e-1", now - 600, 60)), "expired"),
    ];
    for (i, (what, payload, want)) in refusals.iter().enumerate() {
        let r = round_trip(&sub, port, "dev-s", "sync", payload, &format!("r{i}"), 1).await;
        let last = r.last().unwrap();
        assert_eq!(last["status"], "failed", "{what}: {r:#?}");
        assert!(last["reason"].as_str().unwrap().starts_with(want), "{what}: {last}");
    }
    // Replaying the exact signed bytes does not run the command again...
    let replay = round_trip(&sub, port, "dev-s", "sync", &good, "g2", 1).await;
    assert_eq!(replay.last().unwrap()["duplicate"], true, "{replay:#?}");
    // ...and a signed command reusing an id with other content is refused as a replay.
    let reused = edgeflow::fleet::commands::sign(&key, "dev-s", "sync", &json!({"request_id": "s-1", "args": {}, "issued_at": now + 1, "expires_at": now + 61}));
    let r = round_trip(&sub, port, "dev-s", "sync", &reused, "g3", 1).await;
    assert!(r.last().unwrap()["reason"].as_str().unwrap().starts_with("replayed"), "{r:#?}");
    assert_eq!(log.lock().unwrap().len(), 1, "only the one good command ran");

    // Every refusal is reported on the events topic.
    let s2 = sub.clone();
    let events = blocking(move || s2.wait_count(|m| m.topic.ends_with("/events") && m.payload.contains("command_refused"), 5, WAIT)).await;
    let kinds: Vec<String> = events.iter().map(|m| m.json()["refusal"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, vec!["unsigned", "bad_signature", "bad_signature", "expired", "replayed"], "{events:#?}");
    assert_eq!(running.handle.state().borrow().commands_refused, 5);
    running.stop().await;
}

/// Security review, item 1: a configured key alone (no `require_signatures`) must mean only
/// signed commands run. Before the fix the default was `false` and an unsigned `rollback`
/// from anyone who could publish on the topic was obeyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_key_alone_refuses_unsigned_commands() {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let public = hex::encode(key.verifying_key().as_bytes());
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/+/reply/#", "edgeflow/dev-k/events"])).await);
    let spool = tempfile::tempdir().unwrap();
    let (bus, log) = handler();
    let running = spawn(settings(&broker.url(), "dev-k", spool.path(), &format!("signature_public_key = \"{public}\"\n")), bus, None);
    wait_state(&running.handle, "connected", |s| s.connected).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    for (i, name) in ["rollback", "pin", "sync"].iter().enumerate() {
        let args = if *name == "pin" { json!({"version": "1"}) } else { json!({}) };
        let unsigned = json!({"request_id": format!("u-{i}"), "args": args}).to_string();
        let r = round_trip(&sub, port, "dev-k", name, &unsigned, &format!("u{i}"), 1).await;
        let last = r.last().unwrap();
        assert_eq!(last["status"], "failed", "unsigned {name}: {r:#?}");
        assert!(last["reason"].as_str().unwrap().starts_with("unsigned"), "unsigned {name}: {last}");
    }
    assert!(log.lock().unwrap().is_empty(), "no unsigned command reached the handler: {:?}", log.lock().unwrap());
    // The same device obeys the fleet's signed command.
    let now = edgeflow::util::unix_now();
    let signed = edgeflow::fleet::commands::sign(&key, "dev-k", "sync", &json!({"request_id": "s-1", "args": {}, "issued_at": now, "expires_at": now + 60}));
    let r = round_trip(&sub, port, "dev-k", "sync", &signed, "s1", 1).await;
    assert_eq!(r.last().unwrap()["status"], "succeeded", "{r:#?}");
    assert_eq!(log.lock().unwrap().len(), 1);
    // Each refusal is an event the console sees.
    let s2 = sub.clone();
    let events = blocking(move || s2.wait_count(|m| m.topic.ends_with("/events") && m.payload.contains("command_refused"), 3, WAIT)).await;
    assert!(events.iter().take(3).all(|m| m.json()["refusal"] == "unsigned"), "{events:#?}");
    running.stop().await;
}

/// Security review, item 8: a command's id was recorded before the command was even parsed,
/// with `keep_until` taken from the sender's own `expires_at`, so 4,096 junk commands made
/// every later command (signed too) "busy", across restarts. Junk is no longer recorded, an
/// unsigned id is kept for the window only, and finished unsigned entries make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_commands_cannot_fill_the_replay_table() {
    let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let public = hex::encode(key.verifying_key().as_bytes());
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/dev-j/cmd/+/reply", "edgeflow/+/reply/#"])).await);
    let spool = tempfile::tempdir().unwrap();
    let (bus, log) = handler();
    let extra = format!("signature_public_key = \"{public}\"\nrequire_signatures = false\nreport_interval = \"1h\"\n");
    let running = spawn(settings(&broker.url(), "dev-j", spool.path(), &extra), bus, None);
    wait_state(&running.handle, "connected", |s| s.connected).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 4,200 `pin` commands without a version, each claiming to stay valid for a century,
    // published 50 at a time (`mosquitto_pub -l`: a message per line), each batch answered.
    let century = edgeflow::util::unix_now() + 100 * 365 * 86400;
    for batch in 0..84 {
        let junk: String = (batch * 50..(batch + 1) * 50).map(|i| format!("{{\"request_id\":\"junk-{i}\",\"args\":{{}},\"expires_at\":{century}}}\n")).collect();
        let s2 = sub.clone();
        let replies = blocking(move || {
            use std::io::Write;
            let mut child = std::process::Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", "edgeflow/dev-j/cmd/pin", "-l"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("mosquitto_pub");
            child.stdin.take().unwrap().write_all(junk.as_bytes()).unwrap();
            assert!(child.wait().unwrap().success());
            s2.wait_count(|m| m.topic == "edgeflow/dev-j/cmd/pin/reply", (batch + 1) * 50, WAIT)
        })
        .await;
        assert_eq!(replies.len(), (batch + 1) * 50, "every junk command is answered");
    }
    assert!(sub.all().iter().filter(|m| m.topic == "edgeflow/dev-j/cmd/pin/reply").all(|m| m.json()["status"] == "failed"), "junk never runs");
    assert!(log.lock().unwrap().is_empty());

    // The fleet's signed command still runs.
    let now = edgeflow::util::unix_now();
    let signed = edgeflow::fleet::commands::sign(&key, "dev-j", "sync", &json!({"request_id": "s-1", "args": {}, "issued_at": now, "expires_at": now + 60}));
    let r = round_trip(&sub, port, "dev-j", "sync", &signed, "s1", 1).await;
    assert_eq!(r.last().unwrap()["status"], "succeeded", "{r:#?}");
    running.stop().await;

    // And after a restart on the same spool.
    let (bus, log) = handler();
    let running = spawn(settings(&broker.url(), "dev-j", spool.path(), &extra), bus, None);
    wait_state(&running.handle, "connected", |s| s.connected).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signed = edgeflow::fleet::commands::sign(&key, "dev-j", "sync", &json!({"request_id": "s-2", "args": {}, "issued_at": now, "expires_at": now + 60}));
    let r = round_trip(&sub, port, "dev-j", "sync", &signed, "s2", 1).await;
    assert_eq!(r.last().unwrap()["status"], "succeeded", "{r:#?}");
    assert_eq!(log.lock().unwrap().len(), 1);
    running.stop().await;
}

/// Security review, item 9: the MQTT 5 response topic was used as given (no wildcards was the
/// only rule), so a command could make the device publish on another device's command topic or
/// on its own status. Replies now stay in the device's reply namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_stay_in_the_devices_reply_namespace() {
    let broker = Mosquitto::start("");
    let port = broker.port;
    // Everything a reply could land on, but not the command topics the test publishes on.
    let topics = ["edgeflow/victim/#", "edgeflow/+/status", "edgeflow/+/cmd/+/reply", "edgeflow/+/reply/#", "other/#"];
    let sub = Arc::new(blocking(move || Sub::start(port, &topics)).await);
    let spool = tempfile::tempdir().unwrap();
    let (bus, log) = handler();
    let running = spawn(settings(&broker.url(), "dev-r", spool.path(), "report_interval = \"1h\""), bus, None);
    wait_state(&running.handle, "connected", |s| s.connected).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    for (i, hostile) in ["edgeflow/victim/cmd/rollback", "edgeflow/dev-r/status", "other/topic"].iter().enumerate() {
        let corr = format!("h{i}");
        let payload = json!({"request_id": format!("h-{i}"), "args": {}}).to_string();
        let (topic, h, c) = ("edgeflow/dev-r/cmd/sync".to_string(), hostile.to_string(), corr.clone());
        blocking(move || publish_v5_command(port, &topic, &payload, &h, &c)).await;
        let s2 = sub.clone();
        let c2 = corr.clone();
        let finals = blocking(move || s2.wait_count(|m| m.correlation == c2 && m.payload.contains("\"succeeded\""), 1, WAIT)).await;
        assert_eq!(finals[0].topic, "edgeflow/dev-r/cmd/sync/reply", "{hostile}: the reply went to the default topic");
        // (The device's own birth message is on its status topic; no reply may be.)
        let strays: Vec<_> = sub.all().into_iter().filter(|m| m.topic == *hostile && (m.payload.contains("\"kind\":\"reply\"") || !m.correlation.is_empty())).collect();
        assert!(strays.is_empty(), "no reply published on {hostile}: {strays:#?}");
    }
    // A response topic inside the namespace is honoured.
    let r = round_trip(&sub, port, "dev-r", "sync", &json!({"request_id": "ok-1", "args": {}}).to_string(), "ok1", 1).await;
    assert_eq!(r.last().unwrap()["status"], "succeeded");
    assert!(sub.all().iter().any(|m| m.correlation == "ok1" && m.topic == "edgeflow/dev-r/reply/console"));
    assert_eq!(log.lock().unwrap().len(), 4);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_replies_on_the_reply_topic_and_auto_falls_back_to_it() {
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/+/cmd/+/reply", "edgeflow/+/status"])).await);
    let spool = tempfile::tempdir().unwrap();

    // Forced 3.1.1 straight to the broker.
    let (bus, _log) = handler();
    let running = spawn(settings(&broker.url(), "dev-4", &spool.path().join("a"), "protocol = \"3.1.1\""), bus, None);
    let state = wait_state(&running.handle, "connected", |s| s.connected).await;
    assert_eq!(state.protocol, Some("3.1.1"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocking(move || publish(port, "edgeflow/dev-4/cmd/sync", r#"{"request_id":"v4-1"}"#, &[])).await;
    let s2 = sub.clone();
    let replies = blocking(move || s2.wait_count(|m| m.topic == "edgeflow/dev-4/cmd/sync/reply", 2, WAIT)).await;
    let statuses: Vec<String> = replies.iter().map(|m| m.json()["status"].as_str().unwrap().to_string()).collect();
    assert_eq!(statuses, vec!["accepted", "succeeded"]);
    running.stop().await;

    // `auto` behind a broker that refuses MQTT 5 the way a 3.1.1-only broker does.
    let proxy = Proxy::start(broker.port, true);
    let (bus, _log) = handler();
    let running = spawn(settings(&proxy.url(), "dev-auto", &spool.path().join("b"), ""), bus, None);
    let state = wait_state(&running.handle, "connected", |s| s.connected).await;
    assert_eq!(state.protocol, Some("3.1.1"));
    assert!(proxy.refused_v5.load(std::sync::atomic::Ordering::SeqCst) >= 1, "it tried MQTT 5 first");
    let s2 = sub.clone();
    let birth = blocking(move || s2.wait(|m| m.topic == "edgeflow/dev-auto/status" && m.payload.contains("online"), WAIT)).await.expect("birth");
    assert_eq!(birth.json()["protocol"], "3.1.1");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing_and_replays_in_order() {
    let port = free_port();
    let mut broker = Mosquitto::start_on(port, &format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {{dir}}/\n"));
    // A persistent subscriber session: it survives the broker's restart.
    let sub = Arc::new(blocking(move || Sub::start_with(port, &["edgeflow/dev-o/events", "edgeflow/dev-o/health"], &["-c", "-i", "outage-watcher"])).await);
    let spool = tempfile::tempdir().unwrap();
    let (bus, _log) = handler();
    let running = spawn(settings(&broker.url(), "dev-o", spool.path(), "report_interval = \"1s\"\nkeep_alive = \"5s\"\n"), bus, None);
    wait_state(&running.handle, "connected", |s| s.connected).await;
    let mut sent = 0u64;
    for _ in 0..20 {
        assert!(running.handle.event(Event::PullFailed { model: "m".into(), reason: format!("before {sent}") }));
        sent += 1;
    }
    broker.stop();
    wait_state(&running.handle, "disconnected", |s| !s.connected).await;
    // Offline for a while: health keeps being produced, events keep coming.
    for _ in 0..30 {
        assert!(running.handle.event(Event::PullFailed { model: "m".into(), reason: format!("during {sent}") }));
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let queued = running.handle.state().borrow().spool_depth;
    assert!(queued >= 30, "messages wait in the spool: {queued}");
    broker.restart();
    let state = wait_state(&running.handle, "reconnected and drained", |s| s.connected && s.spool_depth == 0).await;
    assert!(state.reconnects >= 1);
    for _ in 0..5 {
        running.handle.event(Event::PullFailed { model: "m".into(), reason: format!("after {sent}") });
        sent += 1;
    }
    let s2 = sub.clone();
    let total = sent as usize;
    let reasons = blocking(move || {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let reasons: std::collections::HashSet<String> =
                s2.all().iter().filter(|m| m.topic.ends_with("/events")).map(|m| m.json()["reason"].as_str().unwrap().to_string()).collect();
            if reasons.len() >= total || std::time::Instant::now() > deadline {
                return reasons;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await;
    assert_eq!(reasons.len(), total, "every event arrived: {reasons:?}");
    // At least once, in order: the first sighting of each seq, in arrival order.
    let mut seen = std::collections::HashSet::new();
    let seqs: Vec<u64> = sub.all().iter().map(|m| m.json()["seq"].as_u64().unwrap()).filter(|s| seen.insert(*s)).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "arrival order follows the spool order: {seqs:?}");
    let first = *seqs.first().unwrap();
    let last = *seqs.last().unwrap();
    assert_eq!(seqs.len() as u64, last - first + 1, "no gap from {first} to {last}: {seqs:?}");
    assert!(state.delivered >= 50);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_cap_drops_the_oldest_and_says_how_many() {
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let (bus, _log) = handler();
    // No broker yet: everything waits in a 64 KiB spool.
    let running = spawn(settings(&format!("mqtt://127.0.0.1:{port}"), "dev-cap", spool.path(), "spool_max_bytes = \"64KiB\"\nreport_interval = \"1h\""), bus, None);
    let filler = "x".repeat(300);
    for i in 0..1000 {
        while !running.handle.event(Event::PullFailed { model: "m".into(), reason: format!("{i} {filler}") }) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let state = wait_state(&running.handle, "spool full", |s| s.spool_dropped > 0 && s.spool_depth + s.spool_dropped >= 1000).await;
    assert!(state.spool_bytes <= 64 * 1024, "{state:?}");
    let dropped = state.spool_dropped;
    let kept = state.spool_depth;
    assert!(kept > 50 && dropped > 500, "{state:?}");

    let broker = Mosquitto::start_on(port, &format!("listener {port} 127.0.0.1\nallow_anonymous true\n"));
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/dev-cap/events"])).await);
    let s2 = sub.clone();
    let overflow = blocking(move || s2.wait(|m| m.payload.contains("spool_overflow"), WAIT)).await.expect("an overflow event").json();
    assert_eq!(overflow["dropped"].as_u64(), Some(dropped), "{overflow}");
    let s2 = sub.clone();
    let msgs = blocking(move || s2.wait_count(|_| true, kept as usize + 1, WAIT)).await;
    let reasons: Vec<u64> = msgs.iter().filter_map(|m| m.json()["reason"].as_str().and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok())).collect();
    // The newest survive, in order; the oldest are the ones dropped. (Spooling the overflow
    // event itself may push out one more, which the next overflow event reports.)
    let first = reasons.first().copied().unwrap_or_default();
    assert!(first == dropped || first == dropped + 1, "first kept event {first}, dropped {dropped}: {reasons:?}");
    assert_eq!(reasons.last().copied(), Some(999));
    assert!(reasons.windows(2).all(|w| w[1] == w[0] + 1), "{reasons:?}");
    running.stop().await;
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_connect_and_a_wrong_ca_is_refused() {
    let certs = Certs::make();
    let (tls_port, mtls_port) = (free_port(), free_port());
    let tls = Mosquitto::start_on(tls_port, &certs.listener(tls_port, false));
    let mtls = Mosquitto::start_on(mtls_port, &certs.listener(mtls_port, true));
    let ca = certs.path("ca.pem");
    let spool = tempfile::tempdir().unwrap();
    let tls_extra = |ca: &std::path::Path, client: bool| {
        let mut s = format!("ca_file = \"{}\"\n", ca.display());
        if client {
            s += &format!("cert_file = \"{}\"\nkey_file = \"{}\"\n", certs.path("client.pem").display(), certs.path("client.key").display());
        }
        s
    };

    let cases = [
        ("tls", tls_port, tls_extra(&ca, false), true),
        ("mtls", mtls_port, tls_extra(&ca, true), true),
        ("mtls-without-client-cert", mtls_port, tls_extra(&ca, false), false),
        ("wrong-ca", tls_port, tls_extra(&certs.path("other-ca.pem"), false), false),
    ];
    for (name, port, extra, should_connect) in cases {
        let (bus, _log) = handler();
        let running = spawn(settings(&format!("mqtts://127.0.0.1:{port}"), name, &spool.path().join(name), &extra), bus, None);
        if should_connect {
            let s = wait_state(&running.handle, "connected over TLS", |s| s.connected).await;
            assert_eq!(s.protocol, Some("5"), "{name}");
        } else {
            let s = wait_state(&running.handle, "a failed attempt", |s| s.last_error.is_some()).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let s2 = running.handle.state().borrow().clone();
            assert!(!s2.connected && s2.connections == 0, "{name} must not connect: {s2:?}");
            let err = s.last_error.unwrap_or_default().to_lowercase();
            assert!(err.contains("tls") || err.contains("certificate") || err.contains("i/o") || err.contains("reset") || err.contains("alert"), "{name}: {err}");
        }
        running.stop().await;
    }
    // The broker saw a client certificate only where one was sent.
    assert!(mtls.log().contains("New client connected"), "{}", mtls.log());
    drop(tls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_flags_a_shifted_prompt_distribution_and_stays_quiet_on_an_unshifted_one() {
    // Real generations from the bundled tiny model, with the engine's per-step statistics.
    let model_dir = common::fixture_model("phi3-tiny-gqa");
    let ort = common::ort_lib();
    let batches = blocking(move || {
        let options = edgeflow::engine::LoadOptions { threads: Some(1), ort_lib: Some(ort), memory: None, prefix_cache: None, ..Default::default() };
        let mut model = edgeflow::engine::Model::load(&model_dir, &options).expect("the tiny model loads");
        let words = ["the", "device", "answers", "quickly", "while", "fleet", "reports", "drift", "over", "time"];
        let mut rng = fastrand::Rng::with_seed(11);
        let mut batch = |n: usize, min_words: usize, max_words: usize| -> Vec<Observation> {
            (0..n)
                .map(|_| {
                    let len = rng.usize(min_words..max_words);
                    let prompt: Vec<&str> = (0..len).map(|_| words[rng.usize(..words.len())]).collect();
                    let ids = model.encode(&prompt.join(" ")).expect("encode");
                    let params = edgeflow::engine::GenerateParams { max_new_tokens: 2, collect_stats: true, ..Default::default() };
                    let g = model.generate(&ids, &params, &std::sync::atomic::AtomicBool::new(false), |_| std::ops::ControlFlow::Continue(())).expect("generate");
                    Observation::from_generation(&g, true, None)
                })
                .collect()
        };
        // Baseline and unshifted are drawn from the same prompts and interleaved, so they
        // also share the machine's load (latency is a drift feature too).
        let same = batch(300, 4, 20);
        let (baseline, unshifted): (Vec<_>, Vec<_>) = same.chunks(2).map(|c| (c[0], c[1])).unzip();
        (baseline, unshifted, batch(150, 60, 200))
    })
    .await;
    let (baseline, unshifted, shifted) = batches;
    assert!(baseline.iter().all(|o| o.mean_logprob.is_some() && o.mean_entropy.is_some()), "the engine's statistics are recorded");

    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/dev-drift/drift"])).await);
    let spool = tempfile::tempdir().unwrap();
    let (bus, _log) = handler();
    let recorder = Recorder::new();
    let running =
        spawn(settings(&broker.url(), "dev-drift", spool.path(), "drift_interval = \"1s\"\ndrift_min_samples = 100\nreport_interval = \"1h\""), bus, Some(recorder.clone()));
    let mut reports = Vec::new();
    for (i, batch) in [&baseline, &unshifted, &shifted].into_iter().enumerate() {
        for o in batch {
            recorder.observe("tiny", "1", o);
        }
        let s2 = sub.clone();
        let msg = blocking(move || s2.wait_count(|m| m.json()["n"].as_u64().unwrap_or(0) > 0, i + 1, WAIT)).await;
        assert!(msg.len() > i, "drift report {i} arrives");
        reports.push(msg[i].json());
    }
    assert_eq!(reports[0]["baseline"]["established"], true, "{}", reports[0]);
    assert_eq!(reports[1]["alert"], false, "the same prompt distribution: {:#}", reports[1]["divergence"]);
    assert_eq!(reports[2]["alert"], true, "longer prompts: {:#}", reports[2]["divergence"]);
    let p = &reports[2]["divergence"]["prompt_tokens"];
    assert!(p["alert"] == true && p["psi"].as_f64().unwrap() >= 0.25, "{p}");
    assert!(reports[1]["divergence"]["prompt_tokens"]["psi"].as_f64().unwrap() < 0.25);
    running.stop().await;
}

/// Chat questions for the trained-model drift test: English ones make the baseline and the
/// unshifted window, French ones of the same shape and length the shifted window.
const EN_TEMPLATES: [&str; 12] = [
    "What is {}?",
    "Can you explain {} in simple terms?",
    "Why is {} important?",
    "Tell me an interesting fact about {}.",
    "How does {} work?",
    "What should a beginner know about {}?",
    "Describe {} in two sentences.",
    "What are the main uses of {}?",
    "Give me a quick overview of {}.",
    "What do people often get wrong about {}?",
    "Where can I learn more about {}?",
    "What is the history of {}?",
];
const EN_TOPICS: &str = "the ocean, photosynthesis, the moon, volcanoes, electricity, honey bees, the internet, rain, music, gravity, chess, coffee, the human heart, recycling, a rainbow, the weather, bicycles, bread, the desert, glaciers, the piano, tea, earthquakes, the sun, solar panels, the printing press, vaccines, trains, forests, batteries";
const FR_TEMPLATES: [&str; 12] = [
    "Qu'est-ce que {} ?",
    "Peux-tu expliquer {} simplement ?",
    "Dis-moi un fait intéressant sur {}.",
    "Comment fonctionne {} ?",
    "Que doit savoir un débutant sur {} ?",
    "Décris {} en deux phrases.",
    "Donne-moi un aperçu rapide sur {}.",
    "Quelles idées reçues existe-t-il sur {} ?",
    "Où puis-je en apprendre plus sur {} ?",
    "Que sais-tu sur {} ?",
    "Explique-moi {} comme à un enfant.",
    "Quels sont les points essentiels sur {} ?",
];
const FR_TOPICS: &str = "l'océan, la photosynthèse, la lune, les volcans, l'électricité, les abeilles, internet, la pluie, la musique, la gravité, les échecs, le café, le cœur humain, le recyclage, l'arc-en-ciel, la météo, le vélo, le pain, le désert, les glaciers, le piano, le thé, les séismes, le soleil, les panneaux solaires, l'imprimerie, les vaccins, les trains, les forêts, les batteries";

/// Every template × topic (`topics` separated by ", "), shuffled.
fn questions(templates: &[&str], topics: &str, rng: &mut fastrand::Rng) -> Vec<String> {
    let mut all: Vec<String> = templates.iter().flat_map(|t| topics.split(", ").map(move |w| t.replace("{}", w))).collect();
    rng.shuffle(&mut all);
    all
}

/// Every feature's divergence in a drift report, one line each.
fn divergence_table(report: &Value) -> String {
    let mut lines = Vec::new();
    if let Some(features) = report["divergence"].as_object() {
        for (name, d) in features {
            lines.push(format!(
                "  {name:<20} psi {:>7.4}  js {:>6.4}  n {:>4}  alert {}",
                d["psi"].as_f64().unwrap_or(f64::NAN),
                d["js"].as_f64().unwrap_or(f64::NAN),
                d["n"],
                d["alert"]
            ));
        }
    }
    lines.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_on_the_trained_model_flags_a_language_shift_and_not_an_unshifted_stream() {
    use edgeflow::engine::{ChatMessage, GenerateParams, Model};
    use edgeflow::telemetry::drift::Feature;

    let dir = common::smollm2_dir();
    let started = std::time::Instant::now();
    let (baseline, unshifted, shifted) = blocking(move || {
        let mut model = Model::load(&dir, &common::load_options()).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
        let mut rng = fastrand::Rng::with_seed(17);
        // 360 English questions split about 4:3 between the baseline and the unshifted
        // window, so both come from one generator but never share a question; 100 French
        // ones. All three are interleaved, so they share the machine's load (latency and
        // time to first token are drift features too).
        let english = questions(&EN_TEMPLATES, EN_TOPICS, &mut rng);
        let mut french = questions(&FR_TEMPLATES, FR_TOPICS, &mut rng);
        french.truncate(100);
        let mut observe = |question: &str| {
            let ids = model.encode_chat(&[ChatMessage { role: "user".into(), content: question.into() }]).expect("encode_chat");
            // A few greedy tokens: the start of the answer is where the model shows how sure it is.
            let params = GenerateParams { max_new_tokens: 3, collect_stats: true, ..GenerateParams::default() };
            let g = model.generate(&ids, &params, &std::sync::atomic::AtomicBool::new(false), |_| std::ops::ControlFlow::Continue(())).expect("generate");
            Observation::from_generation(&g, true, None)
        };
        let (mut baseline, mut unshifted, mut shifted) = (Vec::new(), Vec::new(), Vec::new());
        for (i, q) in english.iter().enumerate() {
            let o = observe(q);
            if i % 7 < 4 {
                baseline.push(o);
            } else {
                unshifted.push(o);
            }
            while shifted.len() * english.len() < (i + 1) * french.len() {
                shifted.push(observe(&french[shifted.len()]));
            }
        }
        (baseline, unshifted, shifted)
    })
    .await;
    let generation_time = started.elapsed();
    let mean = |batch: &[Observation], f: fn(&Observation) -> Option<f64>| batch.iter().filter_map(f).sum::<f64>() / batch.len() as f64;
    println!("{} English (baseline), {} English (unshifted), {} French generations in {:.1} s", baseline.len(), unshifted.len(), shifted.len(), generation_time.as_secs_f64());
    for (name, batch) in [("baseline", &baseline), ("unshifted", &unshifted), ("shifted", &shifted)] {
        println!(
            "  {name:<9} mean prompt tokens {:>5.1}  mean logprob {:>6.3}  mean entropy {:>5.3} nats  byte-fallback share {:.3}",
            mean(batch, |o| Some(o.prompt_tokens as f64)),
            mean(batch, |o| o.mean_logprob),
            mean(batch, |o| o.mean_entropy),
            mean(batch, |o| o.byte_fallback_share)
        );
    }
    assert!(baseline.iter().chain(&shifted).all(|o| o.mean_logprob.is_some() && o.mean_entropy.is_some()), "the engine's statistics are recorded");

    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/dev-smol/drift"])).await);
    let spool = tempfile::tempdir().unwrap();
    let (bus, _log) = handler();
    let recorder = Recorder::new();
    let running =
        spawn(settings(&broker.url(), "dev-smol", spool.path(), "drift_interval = \"1s\"\ndrift_min_samples = 100\nreport_interval = \"1h\""), bus, Some(recorder.clone()));
    let mut reports = Vec::new();
    for (i, batch) in [&baseline, &unshifted, &shifted].into_iter().enumerate() {
        for o in batch {
            recorder.observe("smollm2-135m-instruct", "1", o);
        }
        let s2 = sub.clone();
        let msg = blocking(move || s2.wait_count(|m| m.json()["n"].as_u64().unwrap_or(0) > 0, i + 1, WAIT)).await;
        assert!(msg.len() > i, "drift report {i} arrives");
        reports.push(msg[i].json());
    }
    running.stop().await;
    let (same, french) = (divergence_table(&reports[1]), divergence_table(&reports[2]));
    println!("unshifted English window vs the English baseline (alert {}):\n{same}", reports[1]["alert"]);
    println!("French window vs the English baseline (alert {}):\n{french}", reports[2]["alert"]);

    assert_eq!(reports[0]["baseline"]["established"], true, "{}", reports[0]);
    assert_eq!(reports[1]["alert"], false, "questions from the same generator:\n{same}");
    assert_eq!(reports[2]["alert"], true, "French questions:\n{french}");
    // The alert comes from how the model answers, not from the shape of the requests: the
    // French questions were written to be as long as the English ones.
    let model_alert = [Feature::MeanLogprob, Feature::MeanEntropy, Feature::ByteFallbackShare].iter().filter(|f| reports[2]["divergence"][f.name()]["alert"] == true).count();
    assert!(model_alert >= 1, "no statistic of the model's own alerts:\n{french}");
    assert_eq!(reports[2]["divergence"]["prompt_tokens"]["alert"], false, "prompt lengths were meant to match:\n{french}");
}

/// A device serving version `version` from a folder whose `drift_baseline.json` holds
/// `artifact` (a sketch of long prompts, as JSON) while short prompts arrive: its first drift
/// report.
async fn drift_report_against_an_artifact(device: &str, version: &str, artifact: impl FnOnce(Vec<u8>) -> Vec<u8>, rng: &mut fastrand::Rng) -> Value {
    let version_dir = tempfile::tempdir().unwrap();
    let mut baseline = edgeflow::telemetry::drift::Sketch::default();
    for _ in 0..300 {
        baseline.observe(&obs(500 + rng.usize(..500), rng));
    }
    std::fs::write(version_dir.path().join(edgeflow::telemetry::drift::BASELINE_FILE), artifact(serde_json::to_vec(&baseline).unwrap())).unwrap();
    let broker = Mosquitto::start("");
    let port = broker.port;
    let topic = format!("edgeflow/{device}/drift");
    let sub = Arc::new(blocking(move || Sub::start(port, &[&topic])).await);
    let spool = tempfile::tempdir().unwrap();
    let (bus, _log) = handler();
    let (publisher, status) = edgeflow::status::channel();
    let dir = version_dir.path().to_path_buf();
    let v = version.to_string();
    publisher.update(move |s| s.model = Some(edgeflow::status::ModelStatus { name: "tiny".into(), version: v, digest: None, target: None, activated_at: None, dir: Some(dir) }));
    let recorder = Recorder::new();
    let running = spawn_with_status(
        settings(&broker.url(), device, spool.path(), "drift_interval = \"1s\"\ndrift_min_samples = 100\nreport_interval = \"1h\""),
        bus,
        Some(recorder.clone()),
        status,
    );
    // Short prompts from the first request on.
    for _ in 0..150 {
        recorder.observe("tiny", version, &obs(10 + rng.usize(..20), rng));
    }
    let s2 = sub.clone();
    let d = blocking(move || s2.wait(|m| m.topic.ends_with("/drift"), WAIT)).await.expect("a drift report").json();
    running.stop().await;
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drift_baseline_logged_with_the_version_is_the_reference() {
    // Compared with the artifact at once, no first-window baseline needed.
    let d = drift_report_against_an_artifact("dev-art", "5", |json| json, &mut fastrand::Rng::with_seed(21)).await;
    assert_eq!((d["baseline"]["source"].as_str(), d["baseline"]["n"].as_u64()), (Some("artifact"), Some(300)), "{d}");
    assert_eq!(d["alert"], true, "{:#}", d["divergence"]);
}

/// Issue 14 item 17: a `drift_baseline.json` larger than any sketch (over 1 MiB) is not read
/// at all: the first window becomes the baseline, as with no artifact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_drift_baseline_is_ignored() {
    // Valid JSON, padded with whitespace past the cap: only its size is wrong.
    let padded = |mut json: Vec<u8>| {
        json.resize((1 << 20) + 1, b' ');
        json
    };
    let d = drift_report_against_an_artifact("dev-big", "6", padded, &mut fastrand::Rng::with_seed(22)).await;
    assert_ne!(d["baseline"]["source"], "artifact", "the oversized artifact was used: {d}");
    assert_eq!(d["alert"], false, "a first window is compared with nothing: {d}");
}

/// The status of a device serving a registry version, as the daemon would publish it.
fn populated_status() -> (edgeflow::status::Publisher, watch::Receiver<edgeflow::status::Status>) {
    let (publisher, status) = edgeflow::status::channel();
    publisher.update(|s| {
        s.model = Some(edgeflow::status::ModelStatus {
            name: "phi3-mini-support".into(),
            version: "12".into(),
            digest: Some(format!("sha256:{}", "ab".repeat(32))),
            target: Some("alias:champion".into()),
            activated_at: Some(1_795_000_000),
            dir: None,
        });
        s.registry = Some(edgeflow::status::PollStatus { checked_at: Some(1_795_000_100), outcome: "up_to_date".into(), detail: None, polls: 321 });
    });
    (publisher, status)
}

/// Figures for BENCHMARKS.md, not part of `make test`:
/// `cargo test --release --test fleet -- --ignored --nocapture --test-threads 1`.
/// How fast a spool filled during an outage drains once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_spool_replay_rate() {
    const N: usize = 5000;
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let (bus, _log) = handler();
    let running = spawn(settings(&format!("mqtt://127.0.0.1:{port}"), "dev-replay", spool.path(), "spool_max_bytes = \"16MiB\"\nreport_interval = \"1h\""), bus, None);
    for i in 0..N {
        while !running.handle.event(Event::PullFailed { model: "m".into(), reason: format!("outage event {i}: registry unreachable (connection refused)") }) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let state = wait_state(&running.handle, "all spooled", |s| s.spool_depth as usize >= N).await;
    let bytes = state.spool_bytes;
    let broker = Mosquitto::start_on(port, &format!("listener {port} 127.0.0.1\nallow_anonymous true\n"));
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/dev-replay/events"])).await);
    // Timed from the moment the link reports the connection; what it had already
    // delivered by then is left out of the count.
    let at_connect = wait_state(&running.handle, "connected", |s| s.connected).await;
    let started = std::time::Instant::now();
    wait_state(&running.handle, "drained", |s| s.spool_depth == 0).await;
    let secs = started.elapsed().as_secs_f64();
    let replayed = N as u64 - at_connect.delivered;
    let s2 = sub.clone();
    let got = blocking(move || s2.wait_count(|_| true, N, WAIT)).await;
    assert!(got.len() >= N, "all {N} arrived ({})", got.len());
    let kib = bytes as f64 / 1024.0 * replayed as f64 / N as f64;
    println!(
        "spool replay: {replayed} of {N} messages ({kib:.0} KiB) in {secs:.3} s = {:.0} msg/s, {:.0} KiB/s (QoS 1, window 16, plain TCP, loopback)",
        replayed as f64 / secs,
        kib / secs
    );
    running.stop().await;
    drop(broker);
}

/// Bytes on the wire of one fully populated health report and one drift report (model,
/// registry status, request metrics, every drift feature), through a counting relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_wire_bytes_per_report() {
    let broker = Mosquitto::start("");
    let proxy = Proxy::start(broker.port, false);
    let port = broker.port;
    let sub = Arc::new(blocking(move || Sub::start(port, &["edgeflow/dev-bytes/#"])).await);
    let spool = tempfile::tempdir().unwrap();
    let (bus, _log) = handler();
    let (_publisher, status) = populated_status();
    let metrics = Arc::new(edgeflow::telemetry::Metrics::new());
    for i in 0..50 {
        metrics.http_requests.with_label_values(&["/v1/chat/completions", "200"]).inc();
        metrics.request_duration.with_label_values(&["/v1/chat/completions"]).observe(0.2 + f64::from(i) * 0.01);
        metrics.time_to_first_token.observe(0.03);
        metrics.generated_tokens.inc_by(40);
    }
    let recorder = Recorder::new();
    let mut rng = fastrand::Rng::with_seed(5);
    for _ in 0..200 {
        recorder.observe("phi3-mini-support", "12", &obs(20 + rng.usize(..400), &mut rng));
    }
    let shutdown = CancellationToken::new();
    let s = settings(&proxy.url(), "dev-bytes", spool.path(), "report_interval = \"1h\"\ndrift_interval = \"3s\"\n");
    let handle = Link::new(s).metrics(metrics).drift(recorder.clone()).spawn(status, bus, shutdown.clone()).unwrap();
    wait_state(&handle, "connected", |s| s.connected).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = |p: &Proxy| p.up.load(std::sync::atomic::Ordering::SeqCst) + p.down.load(std::sync::atomic::Ordering::SeqCst);
    let measure = |before: u64, what: &str, payload: usize| {
        let after = total(&proxy);
        println!("{what}: {} B on the wire (payload {payload} B JSON)", after - before);
    };
    // Drift (first window: the baseline).
    let before = total(&proxy);
    let s2 = sub.clone();
    let d = blocking(move || s2.wait(|m| m.topic.ends_with("/drift"), WAIT)).await.expect("drift");
    tokio::time::sleep(Duration::from_millis(300)).await;
    measure(before, "drift (baseline window)", d.payload.len());
    for _ in 0..200 {
        recorder.observe("phi3-mini-support", "12", &obs(20 + rng.usize(..400), &mut rng));
    }
    let before = total(&proxy);
    let s2 = sub.clone();
    let d = blocking(move || s2.wait_count(|m| m.topic.ends_with("/drift"), 2, WAIT)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    measure(before, "drift (compared window)", d[1].payload.len());
    let before = total(&proxy);
    handle.report_now();
    let s2 = sub.clone();
    let h = blocking(move || s2.wait(|m| m.topic.ends_with("/health"), WAIT)).await.expect("health");
    tokio::time::sleep(Duration::from_millis(300)).await;
    measure(before, "health (model, registry, requests)", h.payload.len());
    shutdown.cancel();
    handle.join().await.unwrap();
}

/// Bytes per minute on the wire of a fully populated device (active model, registry status,
/// request metrics, drift every window) at the default intervals, through a counting relay;
/// `FLEET_BENCH_MINUTES` (default 16) long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_wire_bytes_per_minute_at_default_intervals() {
    let minutes: f64 = std::env::var("FLEET_BENCH_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(16.0);
    let broker = Mosquitto::start("");
    let proxy = Proxy::start(broker.port, false);
    let spool = tempfile::tempdir().unwrap();
    let (bus, _log) = handler();
    let (_publisher, status) = populated_status();
    let metrics = Arc::new(edgeflow::telemetry::Metrics::new());
    let recorder = Recorder::new();
    // Only the broker, device and spool differ from the defaults.
    let text = format!("[fleet]\nbroker = \"{}\"\ndevice_id = \"dev-wire\"\nrequire_signatures = false\nspool_dir = \"{}\"\n", proxy.url(), spool.path().display());
    let config: edgeflow::config::Config = toml::from_str(&text).unwrap();
    let shutdown = CancellationToken::new();
    let handle = Link::new(config.fleet.resolve().unwrap().unwrap()).metrics(metrics.clone()).drift(recorder.clone()).spawn(status, bus, shutdown.clone()).unwrap();
    wait_state(&handle, "connected", |s| s.connected).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let total = || proxy.up.load(std::sync::atomic::Ordering::SeqCst) + proxy.down.load(std::sync::atomic::Ordering::SeqCst);
    let before = total();
    let started = std::time::Instant::now();
    let mut rng = fastrand::Rng::with_seed(1);
    // A request every 2 s, as a lightly used device would see.
    while started.elapsed().as_secs_f64() < minutes * 60.0 {
        metrics.http_requests.with_label_values(&["/v1/chat/completions", "200"]).inc();
        metrics.request_duration.with_label_values(&["/v1/chat/completions"]).observe(0.2 + rng.f64());
        metrics.time_to_first_token.observe(0.02 + rng.f64() * 0.05);
        metrics.generated_tokens.inc_by(30);
        recorder.observe("phi3-mini-support", "12", &obs(20 + rng.usize(..400), &mut rng));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let per_min = (total() - before) as f64 / started.elapsed().as_secs_f64() * 60.0;
    let s = handle.state().borrow().clone();
    println!("wire at default intervals: {per_min:.0} B/min over {minutes} min (plain TCP, MQTT {}; {} delivered)", s.protocol.unwrap_or("?"), s.delivered);
    assert!(s.connected && s.delivered > 0);
    shutdown.cancel();
    handle.join().await.unwrap();
}
