//! The whole daemon, `edgeflow run`, as a user installs it: a real MLflow server to follow, a
//! real Mosquitto broker to report to, curl over the socket as the client, and a test
//! `NOTIFY_SOCKET` standing in for systemd.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{config, Daemon, Notifications, MODEL, WAIT};
use common::mlflow::Mlflow;
use common::mqtt::{publish, Mosquitto, Sub};
use common::{edgeflow, free_port};
use serde_json::{json, Value};

#[test]
fn first_start_pulls_serves_swaps_and_a_sigterm_lets_the_stream_finish() {
    let mlflow = Mlflow::start(&[]);
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", Some("Production"), None);
    let dir = tempfile::tempdir().unwrap();
    let notify = Notifications::listen();
    // Long enough a stream that SIGTERM lands in its middle.
    let mut daemon =
        Daemon::start(dir.path(), &config(&mlflow.url, dir.path(), "max_tokens = 2000").replace("shutdown_grace = \"20s\"", "shutdown_grace = \"90s\""), Some(&notify));

    // Empty cache: READY comes at once (waiting for the registry) or once v1 serves.
    let ready = notify.wait(|m| m.starts_with("READY=1"), "READY=1");
    assert!(ready.contains("STATUS="), "{ready}");
    let status = daemon.wait_serving("1");
    assert_eq!(status["model"]["target"], "stage:Production", "{status:#}");
    assert!(status["model"]["digest"].as_str().is_some_and(|d| d.starts_with("sha256:")), "{status:#}");
    let (code, fingerprint, body) = daemon.chat();
    assert_eq!((code, fingerprint.as_str()), (200, "phi-3@1"), "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 8);
    notify.wait(|m| m == "WATCHDOG=1", "WATCHDOG=1 (fed while the API answers)");
    notify.wait(|m| m.contains("STATUS=serving phi-3@1"), "STATUS= with the version");

    // A new version in Production: pulled, smoke-tested, swapped in; the old one drains.
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-mha"), "onnx", Some("Production"), None);
    daemon.wait_serving("2");
    assert_eq!(daemon.chat().1, "phi-3@2");

    // SIGTERM in the middle of a stream: the stream completes, then the daemon exits 0.
    let body = r#"{"model":"phi-3","prompt":"A long story","max_tokens":2000,"ignore_eos":true,"stream":true}"#;
    let mut stream = Command::new("curl")
        .args(["-q", "-sS", "-N", "--max-time", "120", "--unix-socket"])
        .arg(&daemon.socket)
        .args(["--data-binary", body, "http://edgeflow/v1/completions"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(stream.stdout.take().unwrap());
    let mut first = String::new();
    while reader.read_line(&mut first).unwrap() > 0 && !first.contains("\"text\":\"") {
        first.clear();
    }
    assert!(first.contains("\"text\""), "the stream never started");
    // Keep reading while the daemon stops: a client that stopped reading would stall the
    // stream (and the shutdown) on a full socket buffer.
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
        rest
    });
    let exit = daemon.stop_gracefully(Duration::from_secs(100));
    let rest = rest.join().unwrap();
    stream.wait().unwrap();
    let events: Vec<&str> = rest.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "the stream was cut ({exit:?}): ...{}\n{}", &rest[rest.len().saturating_sub(300)..], daemon.log());
    let finish = events.iter().rev().filter(|e| **e != "[DONE]").find_map(|e| serde_json::from_str::<Value>(e).ok()).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length", "{finish}");
    assert!(exit.success(), "exit {exit:?}:\n{}", daemon.log());
    notify.wait(|m| m.starts_with("STOPPING=1"), "STOPPING=1");
    assert!(!daemon.socket.exists(), "the socket is removed on exit");
}

#[test]
fn a_restart_with_the_registry_down_serves_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mlflow = Mlflow::start(&[]);
        mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", Some("Production"), None);
        let mut daemon = Daemon::start(dir.path(), &config(&mlflow.url, dir.path(), ""), None);
        daemon.wait_serving("1");
        assert!(daemon.stop().success(), "{}", daemon.log());
    } // the MLflow server is gone from here on

    let url = format!("http://127.0.0.1:{}", free_port());
    let notify = Notifications::listen();
    let mut daemon = Daemon::start(dir.path(), &config(&url, dir.path(), ""), Some(&notify));
    let ready = notify.wait(|m| m.starts_with("READY=1"), "READY=1 with the registry down");
    assert!(ready.contains("serving phi-3@1"), "READY before the cached model served: {ready}");
    let (code, fingerprint, _) = daemon.chat();
    assert_eq!((code, fingerprint.as_str()), (200, "phi-3@1"));
    let s = daemon.wait_status(|s| s["registry"]["outcome"] == "unreachable", "registry unreachable");
    assert_eq!(s["serving"]["version"], "1");
    // `edgeflow status` reads the same over the socket.
    let out = edgeflow().args(["status", "--socket"]).arg(&daemon.socket).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("phi-3@1") && text.contains("unreachable"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(daemon.stop().success());
}

#[test]
fn a_bad_config_exits_64_listing_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = r#"
[engine]
threads = 0
memory_reserve = "lots"
[registry]
stage = "Production"
alias = "champion"
poll_interval = "often"
[serve]
queue_depth = 0
[fleet]
broker = "ftp://broker"
"#;
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    for sub in ["run", "check-config"] {
        let out = edgeflow().args([sub, "--config"]).arg(&path).env("NO_COLOR", "1").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{sub}: {err}");
        for key in [
            "engine.threads",
            "engine.memory_reserve",
            "registry.stage, registry.alias",
            "registry.poll_interval",
            "serve.queue_depth",
            "fleet.broker",
            "registry.url",
            "registry.model",
        ] {
            assert!(err.contains(&format!("{key}:")), "{sub}: {key} not reported in:\n{err}");
        }
    }
    // A key that does not exist, and a file that does not parse, are usage errors too.
    std::fs::write(&path, "[registry]\nmodle = \"x\"\n").unwrap();
    let out = edgeflow().args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("modle"));
    let out = edgeflow().args(["run", "--config"]).arg(dir.path().join("missing.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    // The shipped example, completed with the two keys it leaves to the user, is valid.
    let example = std::fs::read_to_string(common::repo().join("config.example.toml")).unwrap();
    let filled =
        example.replace("# url = \"https://mlflow.example.internal\"", "url = \"https://mlflow.example.internal\"").replace("# model = \"phi3-mini\"", "model = \"phi3-mini\"");
    std::fs::write(&path, filled).unwrap();
    let out = edgeflow().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_version_that_does_not_fit_in_memory_is_refused_and_the_daemon_keeps_running() {
    let mlflow = Mlflow::start(&[]);
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", Some("Production"), None);
    let dir = tempfile::tempdir().unwrap();
    let notify = Notifications::listen();
    let mut daemon = Daemon::start(dir.path(), &config(&mlflow.url, dir.path(), "").replace("threads = 1", "threads = 1\nmemory_reserve = \"64TiB\""), Some(&notify));
    let s = daemon.wait_status(|s| s["registry"]["outcome"] == "rejected", "a rejected version");
    let detail = s["registry"]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("not enough memory") && detail.contains("is available"), "{s:#}");
    assert!(s["serving"].is_null());
    notify.wait(|m| m.starts_with("READY=1") && m.contains("waiting"), "READY=1 while waiting");
    let (code, _, body) = daemon.chat();
    assert_eq!(code, 503, "{body}");
    assert!(daemon.stop().success());
}

#[test]
fn fleet_commands_roll_back_pin_and_unpin_with_acknowledgements() {
    let mlflow = Mlflow::start(&[]);
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", Some("Production"), None);
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Sub::start(port, &["edgeflow/dev-d/#"]);
    let dir = tempfile::tempdir().unwrap();
    let fleet = format!(
        "[fleet]\nbroker = \"{}\"\ndevice_id = \"dev-d\"\nrequire_signatures = false\nspool_dir = \"{}\"\nreport_interval = \"2s\"\ndrift_interval = \"3s\"\ndrift_min_samples = 1\n",
        broker.url(),
        dir.path().join("spool").display()
    );
    let mut daemon = Daemon::start(dir.path(), &config(&mlflow.url, dir.path(), &fleet), None);
    daemon.wait_serving("1");
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-mha"), "onnx", Some("Production"), None);
    daemon.wait_serving("2");

    // Birth, health with the model, events for the activations.
    sub.wait(|m| m.topic == "edgeflow/dev-d/status" && m.payload.contains("online"), WAIT).expect("birth message");
    let health = sub.wait(|m| m.topic == "edgeflow/dev-d/health" && m.json()["model"]["version"] == "2", WAIT).expect("health with version 2");
    assert_eq!(health.json()["model"]["name"], MODEL);
    sub.wait(|m| m.topic == "edgeflow/dev-d/events" && m.json()["event"] == "activated" && m.json()["version"] == "2", WAIT).expect("activated event");
    sub.wait(|m| m.topic == "edgeflow/dev-d/events" && m.json()["event"] == "version_pulled" && m.json()["version"] == "2", WAIT).expect("version_pulled event");

    // Requests feed drift (aggregates only; no text in the message).
    for _ in 0..3 {
        assert_eq!(daemon.chat().0, 200);
    }
    let drift = sub.wait(|m| m.topic == "edgeflow/dev-d/drift" && m.payload.contains("\"version\":\"2\""), WAIT).expect("a drift report for version 2");
    assert!(!drift.payload.contains("Hello"), "prompt text left the device: {}", drift.payload);

    let log = daemon.log.clone();
    let command = |name: &str, rid: &str, args: Value| -> Value {
        publish(port, &format!("edgeflow/dev-d/cmd/{name}"), &json!({"request_id": rid, "args": args}).to_string(), &[]);
        let reply = sub.wait(|m| m.topic == format!("edgeflow/dev-d/cmd/{name}/reply") && m.json()["request_id"] == rid && m.json()["status"] != "accepted", WAIT);
        reply.unwrap_or_else(|| panic!("no final reply to {name} {rid}:\n{}", daemon_log(&log))).json()
    };

    // Rollback: back to version 1, version 2 marked bad so polls do not bring it back.
    let r = command("rollback", "rb-1", json!({}));
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["result"]["version"], "1", "{r}");
    assert_eq!(daemon.chat().1, "phi-3@1");
    sub.wait(|m| m.topic == "edgeflow/dev-d/events" && m.json()["event"] == "rolled_back" && m.json()["to"] == "1", WAIT).expect("rolled_back event");
    std::thread::sleep(Duration::from_secs(3)); // a few polls of a stage that still says 2
    assert_eq!(daemon.status()["serving"]["version"], "1");

    // Pin an explicit version (an operator's pin retries a refused one), then unpin.
    let r = command("pin", "pin-1", json!({"version": "2"}));
    assert_eq!((r["status"].as_str(), r["result"]["version"].as_str()), (Some("succeeded"), Some("2")), "{r}");
    assert_eq!(daemon.status()["pinned"], "2");
    let r = command("pin", "pin-2", json!({"version": "99"}));
    assert_eq!(r["status"], "failed", "{r}");
    assert!(r["reason"].as_str().is_some_and(|x| x.contains("99")), "{r}");
    assert_eq!(daemon.chat().1, "phi-3@2", "a failed pin keeps serving");
    let r = command("unpin", "unpin-1", json!({}));
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(daemon.status()["pinned"].is_null());
    let r = command("set", "set-1", json!({"poll_interval": "10s", "log_level": "debug"}));
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["result"]["poll_interval"], "10s", "{r}");

    // A clean stop says offline.
    assert!(daemon.stop().success(), "{}", daemon.log());
    sub.wait(|m| m.topic == "edgeflow/dev-d/status" && m.payload.contains("\"shutdown\""), WAIT).expect("offline on shutdown");
}

fn daemon_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Issue 14 item 11: a command's id is on disk before the command acts, so a SIGKILL right
/// after it ran and a redelivery of the same command do not run it a second time.
#[test]
fn a_command_killed_right_after_it_ran_is_not_run_again_when_redelivered() {
    let mlflow = Mlflow::start(&[]);
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", Some("Production"), None);
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Sub::start(port, &["edgeflow/dev-k/#"]);
    let dir = tempfile::tempdir().unwrap();
    let fleet = format!("[fleet]\nbroker = \"{}\"\ndevice_id = \"dev-k\"\nrequire_signatures = false\nspool_dir = \"{}\"\n", broker.url(), dir.path().join("spool").display());
    let config = config(&mlflow.url, dir.path(), &fleet);
    let mut daemon = Daemon::start(dir.path(), &config, None);
    daemon.wait_serving("1");
    sub.wait(|m| m.topic == "edgeflow/dev-k/status" && m.payload.contains("online"), WAIT).expect("birth message");

    let payload = json!({"request_id": "once-1", "args": {"log_level": "debug"}}).to_string();
    let is_final = |m: &common::mqtt::Msg| m.topic == "edgeflow/dev-k/cmd/set/reply" && m.json()["request_id"] == "once-1" && m.json()["status"] != "accepted";
    publish(port, "edgeflow/dev-k/cmd/set", &payload, &[]);
    let first = sub.wait(is_final, WAIT).unwrap_or_else(|| panic!("no reply to set:\n{}", daemon.log()));
    // Killed at once: well inside the link's one-second batching of spool writes.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = daemon.child.wait();
    assert_eq!(first.json()["status"], "succeeded", "{}", first.payload);
    assert!(first.json().get("duplicate").is_none());

    let mut again = Daemon::start(dir.path(), &config, None);
    again.wait_serving("1");
    sub.wait_count(|m| m.topic == "edgeflow/dev-k/status" && m.payload.contains("online"), 2, WAIT);
    publish(port, "edgeflow/dev-k/cmd/set", &payload, &[]);
    let replies = sub.wait_count(is_final, 2, WAIT);
    assert_eq!(replies.len(), 2, "no answer to the redelivery:\n{}", again.log());
    let second = replies[1].json();
    assert_eq!(second["duplicate"], true, "the redelivered command ran again: {second}\n{}", again.log());
    assert!(!again.log().contains("command accepted"), "the second process accepted it as new:\n{}", again.log());
}

/// A version whose smoke test kills the daemon (out of memory, a crash in its graph or
/// template; here SIGKILL while it runs) is tried again after a restart, since a power cut can
/// end a smoke test too, but not forever: after two deaths it is refused without another try,
/// and the daemon keeps serving the version it had instead of dying in a restart loop.
#[test]
fn a_version_that_keeps_killing_the_daemon_is_refused_after_two_deaths() {
    let mlflow = Mlflow::start(&[]);
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", Some("Production"), None);
    let dir = tempfile::tempdir().unwrap();
    // Version 2 is the trained model with the longest smoke test (64 tokens on one thread):
    // about a second from the log line to the verdict, time enough to be killed inside it.
    let config = config(&mlflow.url, dir.path(), "").replace("[cache]\n", "[cache]\nsmoke_test_tokens = 64\n");
    {
        let mut daemon = Daemon::start(dir.path(), &config, None);
        daemon.wait_serving("1");
        assert!(daemon.stop().success());
    }
    mlflow.log_model(MODEL, &common::smollm2_dir(), "pyfunc", Some("Production"), None);
    for death in 1..=2 {
        let mut daemon = Daemon::start(dir.path(), &config, None);
        let deadline = Instant::now() + WAIT;
        while !daemon.log().contains("smoke test starting") {
            assert!(daemon.child.try_wait().unwrap().is_none() && Instant::now() < deadline, "no smoke test of version 2 (death {death}):\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
        let _ = daemon.child.wait();
        assert!(!daemon.log().contains("smoke test passed"), "killed too late (death {death}): the smoke test finished:\n{}", daemon.log());
    }
    let mut daemon = Daemon::start(dir.path(), &config, None);
    let s = daemon.wait_status(|s| s["registry"]["outcome"] == "rejected", "version 2 rejected");
    assert_eq!(s["serving"]["version"], "1", "{s:#}");
    let log = daemon.log();
    assert!(log.contains("refusing a version that keeps killing the daemon"), "{log}");
    assert!(!log.contains("smoke test starting"), "no third smoke test:\n{log}");
    let (code, fingerprint, _) = daemon.chat();
    assert_eq!((code, fingerprint.as_str()), (200, "phi-3@1"));
    assert!(daemon.stop().success(), "{}", daemon.log());
}

/// The same guard at start-up: a version the daemon dies loading (here SIGKILL right after the
/// engine loaded it, at the `active.loaded` crash point) at two starts in a row is refused at
/// the third, which goes back to the last-known-good version instead of a restart loop.
#[test]
fn a_version_the_daemon_dies_loading_at_start_up_is_refused_after_two_deaths() {
    let mlflow = Mlflow::start(&[]);
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", Some("Production"), None);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&mlflow.url, dir.path(), "");
    {
        let mut daemon = Daemon::start(dir.path(), &config, None);
        daemon.wait_serving("1");
        mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa-acc1"), "pyfunc", Some("Production"), None);
        daemon.wait_serving("2");
        assert!(daemon.stop().success());
    }
    for death in 1..=2 {
        let mut daemon = Daemon::start_env(dir.path(), &config, None, &[("EDGEFLOW_CRASH_AT", "active.loaded:1")]);
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the daemon did not die loading version 2 (death {death}):\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "death {death}: {status}\n{}", daemon.log());
        assert!(daemon.log().contains("version=2") && daemon.log().contains("activating model"), "it was loading version 2:\n{}", daemon.log());
    }
    let mut daemon = Daemon::start(dir.path(), &config, None);
    let s = daemon.wait_serving("1");
    let log = daemon.log();
    assert!(log.contains("refusing a version that keeps killing the daemon") && log.contains("died each of the last 2 times it loaded this version"), "{log}");
    assert_eq!(s["load_failure"]["version"], "2", "{s:#}");
    let (code, fingerprint, _) = daemon.chat();
    assert_eq!((code, fingerprint.as_str()), (200, "phi-3@1"));
    // The refusal sticks: the registry still says version 2, and it is not tried again.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(daemon.status()["serving"]["version"], "1");
    assert_eq!(daemon.log().matches("refusing a version that keeps killing the daemon").count(), 1, "{}", daemon.log());
    assert!(daemon.stop().success(), "{}", daemon.log());
}

/// Issue 14 items 13 and 14: credentials never cross plaintext to another machine unless the
/// operator says the network is trusted, and credentials written into the registry URL are
/// refused without being repeated anywhere (exit 64, the message redacted).
#[test]
fn plaintext_credentials_are_refused_and_a_url_password_is_never_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let check = |text: &str, env: &[(&str, &str)]| -> (Option<i32>, String) {
        std::fs::write(&path, text).unwrap();
        let mut cmd = edgeflow();
        cmd.args(["check-config", "--config"]).arg(&path).env("NO_COLOR", "1");
        for k in ["MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "EDGEFLOW_MQTT_USERNAME", "EDGEFLOW_MQTT_PASSWORD"] {
            cmd.env_remove(k);
        }
        cmd.envs(env.iter().copied());
        let out = cmd.output().unwrap();
        (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let registry = |url: &str, extra: &str| format!("[registry]\nurl = \"{url}\"\nmodel = \"m\"\n{extra}[cache]\ndir = \"{}\"\n", dir.path().join("cache").display());

    let (code, out) = check(&registry("http://mlflow.example.internal:5000", ""), &[("MLFLOW_TRACKING_TOKEN", "tok-s3cret")]);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("registry.url:") && out.contains("allow_plaintext_credentials"), "{out}");
    assert!(!out.contains("tok-s3cret"), "{out}");
    let (code, out) = check(&registry("http://mlflow.example.internal:5000", "allow_plaintext_credentials = true\n"), &[("MLFLOW_TRACKING_TOKEN", "tok-s3cret")]);
    assert_eq!(code, Some(0), "an explicit choice is honoured: {out}");
    for local in ["http://127.0.0.1:5000", "http://localhost:5000", "http://[::1]:5000"] {
        let (code, out) = check(&registry(local, ""), &[("MLFLOW_TRACKING_USERNAME", "u"), ("MLFLOW_TRACKING_PASSWORD", "pw-s3cret")]);
        assert_eq!(code, Some(0), "{local} is this machine: {out}");
    }
    let (code, out) = check(&registry("http://mlflow.example.internal:5000", ""), &[]);
    assert_eq!(code, Some(0), "no credentials, nothing to leak: {out}");

    let (code, out) = check(&registry("https://alice:pw-s3cret@mlflow.example.internal", ""), &[]);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("holds credentials") && out.contains("REDACTED@mlflow.example.internal"), "{out}");
    assert!(!out.contains("pw-s3cret") && !out.contains("alice"), "the URL's credentials were repeated: {out}");
    let (code, out) = check(&registry("ftp://alice:pw-s3cret@host", ""), &[]);
    assert_eq!(code, Some(64), "{out}");
    assert!(!out.contains("pw-s3cret"), "{out}");

    let fleet = |broker: &str, extra: &str| {
        format!("{}[fleet]\nbroker = \"{broker}\"\ndevice_id = \"d\"\nrequire_signatures = false\n{extra}", registry("https://mlflow.example.internal", ""))
    };
    let creds = [("EDGEFLOW_MQTT_USERNAME", "dev"), ("EDGEFLOW_MQTT_PASSWORD", "mq-s3cret")];
    let (code, out) = check(&fleet("mqtt://broker.example.internal", ""), &creds);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("fleet.broker:") && out.contains("allow_plaintext_credentials") && !out.contains("mq-s3cret"), "{out}");
    assert_eq!(check(&fleet("mqtt://broker.example.internal", "allow_plaintext_credentials = true\n"), &creds).0, Some(0));
    assert_eq!(check(&fleet("mqtt://127.0.0.1:1883", ""), &creds).0, Some(0));
    assert_eq!(check(&fleet("mqtts://broker.example.internal", ""), &creds).0, Some(0));
}

/// Issue 14 item 12: a reload that changes a security setting is refused loudly (journal,
/// STATUS=, a `reload_refused` event), and the old setting stays in force: an unsigned
/// command is still obeyed until the restart, and after it, refused.
#[test]
fn a_reload_that_changes_security_settings_is_refused_loudly() {
    let mlflow = Mlflow::start(&[]);
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", Some("Production"), None);
    let broker = Mosquitto::start("");
    let port = broker.port;
    let sub = Sub::start(port, &["edgeflow/dev-h/#"]);
    let dir = tempfile::tempdir().unwrap();
    let fleet = |security: &str| format!("[fleet]\nbroker = \"{}\"\ndevice_id = \"dev-h\"\nspool_dir = \"{}\"\n{security}\n", broker.url(), dir.path().join("spool").display());
    let notes = Notifications::listen();
    let mut daemon = Daemon::start(dir.path(), &config(&mlflow.url, dir.path(), &fleet("require_signatures = false")), Some(&notes));
    daemon.wait_serving("1");
    sub.wait(|m| m.topic == "edgeflow/dev-h/status" && m.payload.contains("online"), WAIT).expect("birth message");

    let key = "signature_public_key = \"3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c\"";
    std::fs::write(dir.path().join("config.toml"), config(&mlflow.url, dir.path(), &fleet(key))).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.child.id() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    let status = notes.wait(|m| m.contains("reload refused"), "a STATUS= line saying the reload was refused");
    assert!(status.contains("fleet.signature_public_key") && status.contains("fleet.require_signatures"), "{status}");
    let event = sub.wait(|m| m.topic == "edgeflow/dev-h/events" && m.json()["event"] == "reload_refused", WAIT).expect("a reload_refused event");
    let settings = event.json()["settings"].clone();
    assert_eq!(settings, json!(["fleet.signature_public_key", "fleet.require_signatures"]), "{}", event.payload);
    assert!(daemon.log().contains("RELOAD REFUSED"), "{}", daemon.log());

    // The old policy is still the one in force, as the refusal said...
    let unsigned = |rid: &str| {
        publish(port, "edgeflow/dev-h/cmd/report", &json!({"request_id": rid}).to_string(), &[]);
        sub.wait(|m| m.topic == "edgeflow/dev-h/cmd/report/reply" && m.json()["request_id"] == rid && m.json()["status"] != "accepted", WAIT).expect("a final reply").json()
    };
    assert_eq!(unsigned("before-restart")["status"], "succeeded");
    // ... and the restart applies the new one.
    assert!(daemon.stop().success());
    let mut again = Daemon::start(dir.path(), &config(&mlflow.url, dir.path(), &fleet(key)), None);
    again.wait_serving("1");
    sub.wait_count(|m| m.topic == "edgeflow/dev-h/status" && m.payload.contains("online"), 2, WAIT);
    let r = unsigned("after-restart");
    assert_eq!(r["status"], "failed", "{r}");
    assert!(r["reason"].as_str().is_some_and(|t| t.starts_with("unsigned")), "{r}");
}

/// Reliability campaign, security regressions: the daemon holds three secrets (the
/// registry's bearer token, the broker's password, the local API's token) and uses each one,
/// through a registry failure, a refused API token and a fleet command; none of them appears
/// in its log (at debug level), `/status`, `/metrics`, any MQTT message, or its spool.
#[test]
fn secrets_never_appear_in_logs_status_metrics_mqtt_or_the_spool() {
    const REGISTRY_TOKEN: &str = "tok-SECRET-registry-8f3a";
    const BROKER_PASSWORD: &str = "mq-SECRET-broker-77c1";
    const API_TOKEN: &str = "api-SECRET-local-5d2e";
    const WRONG_TOKEN: &str = "api-SECRET-wrong-0000";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mlflow = Mlflow::start(&[]);
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", Some("Production"), None);
    let proxy = rt.block_on(common::mlflow::Proxy::start(&mlflow.url));
    // The first listing fails: the registry error is logged and reported.
    proxy.add("mlflow-artifacts/artifacts?path=", common::mlflow::Action::Status(500), Some(1));
    let broker = Mosquitto::start("");
    let sub = Sub::start(broker.port, &["#"]);
    let dir = tempfile::tempdir().unwrap();
    let fleet = format!(
        "[fleet]\nbroker = \"{}\"\ndevice_id = \"dev-secrets\"\nrequire_signatures = false\nreport_interval = \"1s\"\nspool_dir = \"{}\"\n",
        broker.url(),
        dir.path().join("spool").display()
    );
    let conf = config(&proxy.url, dir.path(), &fleet).replace("[serve]\n", "[serve]\ntoken_env = \"EDGEFLOW_API_TOKEN\"\n");
    let env = [("MLFLOW_TRACKING_TOKEN", REGISTRY_TOKEN), ("EDGEFLOW_MQTT_USERNAME", "dev-user"), ("EDGEFLOW_MQTT_PASSWORD", BROKER_PASSWORD), ("EDGEFLOW_API_TOKEN", API_TOKEN)];
    let mut daemon = Daemon::start_env(dir.path(), &conf, None, &env);
    daemon.token = Some(API_TOKEN.into());
    daemon.wait_serving("1");

    // Each secret was used: the registry saw the token, the broker the user, the API the token.
    assert!(proxy.seen().iter().any(|s| s.authorization.as_deref() == Some(&format!("Bearer {REGISTRY_TOKEN}"))), "the registry token was sent");
    sub.wait(|m| m.topic == "edgeflow/dev-secrets/status" && m.payload.contains("online"), WAIT).expect("birth message");
    assert!(broker.log().contains("u'dev-user'"), "the broker saw the credentials:\n{}", broker.log());
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}).to_string();
    let chat = |token: &str| {
        common::http::curl(
            &daemon.socket,
            &["-H", "content-type: application/json", "-H", &format!("authorization: Bearer {token}"), "--data-binary", &body, "/v1/chat/completions"],
            None,
        )
    };
    assert_eq!(chat(API_TOKEN).status, 200);
    let refused = chat(WRONG_TOKEN);
    assert_eq!(refused.status, 401, "{refused:?}");
    publish(broker.port, "edgeflow/dev-secrets/cmd/report", &json!({"request_id": "secrets-1"}).to_string(), &[]);
    sub.wait(|m| m.topic == "edgeflow/dev-secrets/cmd/report/reply" && m.json()["status"] == "succeeded", WAIT).expect("the report command's reply");
    sub.wait(|m| m.topic == "edgeflow/dev-secrets/health", WAIT).expect("a health report");

    // Where a secret could leak.
    let status = daemon.status().to_string();
    let metrics = common::http::curl(&daemon.socket, &["-H", &format!("authorization: Bearer {API_TOKEN}"), "/metrics"], None).body;
    assert!(metrics.contains("edgeflow_http_requests_total"), "{metrics}");
    assert!(daemon.stop().success(), "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("500") && log.contains("DEBUG"), "the log has the registry failure, at debug level:\n{log}");
    let mqtt: String = sub.all().iter().map(|m| format!("{} {}\n", m.topic, m.payload)).collect();
    let mut spool = String::new();
    for entry in walk(&dir.path().join("spool")) {
        spool.push_str(&String::from_utf8_lossy(&std::fs::read(entry).unwrap()));
    }
    let places = [("the log", &log), ("/status", &status), ("/metrics", &metrics), ("MQTT", &mqtt), ("the spool", &spool), ("the 401 answer", &refused.body)];
    for secret in [REGISTRY_TOKEN, BROKER_PASSWORD, API_TOKEN, WRONG_TOKEN] {
        for (place, text) in &places {
            assert!(!text.contains(secret), "{secret} appears in {place}:\n{text}");
        }
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
