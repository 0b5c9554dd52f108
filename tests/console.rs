//! The operator's console (`edgeflow fleet console`) and group commands against a real
//! Mosquitto and real agents: four `edgeflow fleet run` processes that require signed
//! commands, in groups from their configs, driven only by the console's own process.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mqtt::{publish, Mosquitto, Sub};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// An agent with its own spool, obeying only commands signed with the fleet's key.
fn agent(dir: &Path, broker: &str, id: &str, groups: &[&str], public_key: &str) -> Child {
    let folder = dir.join(id);
    std::fs::create_dir_all(&folder).unwrap();
    let config = folder.join("edgeflow.toml");
    let groups: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
    std::fs::write(
        &config,
        format!(
            "[fleet]\nbroker = \"{broker}\"\ndevice_id = \"{id}\"\ngroups = [{}]\nsignature_public_key = \"{public_key}\"\nspool_dir = \"{}\"\nkeep_alive = \"5s\"\n",
            groups.join(", "),
            folder.join("spool").display()
        ),
    )
    .unwrap();
    common::edgeflow().args(["fleet", "run", "--config"]).arg(&config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

fn console(broker: &str, args: &[&str]) -> Output {
    common::edgeflow().args(["fleet", "console", "--broker", broker]).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("exit {:?}\nstdout:\n{}\nstderr:\n{}", o.status.code(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// `console devices --json` until `pred` holds for the list (or [`WAIT`] passed).
fn devices_until(broker: &str, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let o = console(broker, &["devices", "--json", "--quiet", "300ms"]);
        assert!(o.status.success(), "{}", text(&o));
        let rows = json_lines(&o);
        if pred(&rows) {
            return rows;
        }
        assert!(start.elapsed() < WAIT, "never: {what}; last:\n{}", text(&o));
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn row<'a>(rows: &'a [Value], device: &str) -> &'a Value {
    rows.iter().find(|r| r["device"] == device).unwrap_or_else(|| panic!("{device} not in {rows:?}"))
}

fn kill(child: &mut Child) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

#[test]
fn the_console_lists_commands_and_watches_a_fleet_of_real_agents() {
    let broker = Mosquitto::start("");
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("fleet.key");
    let keygen = common::edgeflow().args(["fleet", "keygen", "--out"]).arg(&key).output().unwrap();
    assert!(keygen.status.success(), "{}", text(&keygen));
    let public = String::from_utf8(keygen.stdout).unwrap().trim().to_string();
    let key = key.display().to_string();
    let members: [(&str, &[&str]); 4] = [("d1", &["canary"]), ("d2", &["canary", "eu"]), ("d3", &["eu"]), ("d4", &[])];
    let mut agents: Vec<Child> = members.iter().map(|(id, groups)| agent(dir.path(), &url, id, groups, &public)).collect();

    // Every device, online, with its groups and its first (retained) health report.
    // (`reported_at` comes only from a health report: the retained one reaches a new console.)
    let rows = devices_until(&url, "4 devices online with health", |rows| {
        rows.len() == 4 && rows.iter().all(|r| r["state"] == "online" && r["reported_at"].is_u64() && r["agent_version"].is_string())
    });
    for (id, groups) in members {
        let mut want = vec!["all".to_string()];
        want.extend(groups.iter().map(|g| g.to_string()));
        assert_eq!(row(&rows, id)["groups"], serde_json::json!(want), "{id}");
    }
    let table = console(&url, &["devices", "--quiet", "300ms"]);
    let table_text = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.status.success() && table_text.starts_with("DEVICE") && table_text.lines().count() == 5, "{}", text(&table));

    // A group command: answered by exactly its members, each acknowledging on its own topic.
    let o = console(&url, &["send", "report", "--group", "canary", "--key", &key, "--wait", "20s", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let report: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    let answers = report["answers"].as_object().unwrap();
    assert_eq!(answers.keys().collect::<Vec<_>>(), ["d1", "d2"], "{report}");
    for a in answers.values() {
        assert_eq!(a["status"], "succeeded", "{report}");
        assert!(a["result"]["health_seq"].is_u64(), "{report}");
    }

    // A broadcast to `all` that the agents cannot carry out (`fleet run` has no registry):
    // every device answers failed, and the console's exit code says so.
    let o = console(&url, &["send", "sync", "--group", "all", "--args", r#"{"spread":"1s"}"#, "--key", &key, "--wait", "20s"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(out.lines().filter(|l| l.contains("failed") && l.contains("needs the model manager")).count(), 4, "{}", text(&o));
    assert!(out.contains("not all succeeded: `sync`") && out.contains("4 failed"), "{}", text(&o));

    // Watch, while a command signed for `canary` is replayed on `eu`'s topic and d4 dies.
    let mut watch = common::edgeflow().args(["fleet", "console", "--broker", &url, "watch", "--json"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
    {
        let lines = lines.clone();
        let stdout = watch.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}")));
            }
        });
    }
    // The watcher's subscription is live once a status it cannot have seen retained shows up.
    std::thread::sleep(Duration::from_secs(1));
    let replies = Sub::start(broker.port, &["edgeflow/+/cmd/report/reply"]);
    let signed = common::edgeflow().args(["fleet", "sign", "--key", &key, "--group", "canary", "--command", "report", "--request-id", "replayed-1"]).output().unwrap();
    assert!(signed.status.success(), "{}", text(&signed));
    publish(broker.port, "edgeflow/group/eu/cmd/report", String::from_utf8_lossy(&signed.stdout).trim(), &[]);
    let refused = replies.wait_count(|m| m.payload.contains("replayed-1") && m.payload.contains("bad_signature"), 2, WAIT);
    let mut who: Vec<String> = refused.iter().map(|m| m.json()["device"].as_str().unwrap().to_string()).collect();
    who.sort();
    assert_eq!(who, ["d2", "d3"], "the members of `eu` refuse a signature for `canary`");
    kill(&mut agents[3]);
    let start = Instant::now();
    let seen = |pred: &dyn Fn(&Value) -> bool| lines.lock().unwrap().iter().any(pred);
    while !(seen(&|l| l["device"] == "d4" && l["message"]["reason"] == "connection_lost") && seen(&|l| l["channel"] == "events" && l["message"]["event"] == "command_refused")) {
        assert!(start.elapsed() < WAIT, "watch printed: {:?}", lines.lock().unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused_events = lines.lock().unwrap().iter().filter(|l| l["message"]["event"] == "command_refused").map(|l| l["device"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert!(refused_events.iter().all(|d| d == "d2" || d == "d3") && refused_events.len() >= 2, "{refused_events:?}");
    kill(&mut watch);

    // The dead device is listed offline, and a command to it says nobody answered.
    let rows = devices_until(&url, "d4 offline", |rows| rows.iter().any(|r| r["device"] == "d4" && r["state"] == "offline"));
    assert_eq!(row(&rows, "d4")["reason"], "connection_lost");
    let o = console(&url, &["send", "report", "--to", "d4", "--key", &key, "--wait", "2s", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let report: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(report["answers"]["d4"]["status"], "no_answer", "{report}");
    // And a group command skips it as offline instead of waiting for it.
    let o = console(&url, &["send", "report", "--group", "all", "--key", &key, "--wait", "20s", "--json"]);
    let report: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(report["answers"]["d4"]["status"], "offline", "{report}");
    assert_eq!(["d1", "d2", "d3"].map(|d| report["answers"][d]["status"].as_str()), [Some("succeeded"); 3], "{report}");

    // Bad input is a usage error (64), not a hang or a panic.
    for args in [
        &["send", "pin", "--group", "eu", "--key", key.as_str()][..],
        &["send", "report", "--to", "a/b", "--key", &key],
        &["send", "report", "--group", "eu", "--key", "/nonexistent"],
    ] {
        let o = console(&url, args);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", text(&o));
    }
    for a in &mut agents {
        kill(a);
    }
}

/// The push path end to end: MLflow (SQLite backend) sends its signed webhook when an alias
/// moves, `fleet console bridge` checks it and publishes a signed `sync` to the group, and a
/// real daemon that polls only once an hour serves the new version within seconds. (Its first
/// version comes at once too: a device with nothing cached does not wait out the first poll's
/// spread.)
#[test]
fn a_registry_webhook_makes_a_rarely_polling_daemon_pick_up_a_promotion_within_seconds() {
    use common::daemon::{config, Daemon, MODEL};
    use common::mlflow::Mlflow;
    let mlflow = Mlflow::start(&["--webhooks"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", None, Some("production"));
    let broker = Mosquitto::start("");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("fleet.key");
    let keygen = common::edgeflow().args(["fleet", "keygen", "--out"]).arg(&key).output().unwrap();
    assert!(keygen.status.success(), "{}", text(&keygen));
    let public = String::from_utf8(keygen.stdout).unwrap().trim().to_string();
    let fleet = format!(
        "[fleet]\nbroker = \"{}\"\ndevice_id = \"edge-1\"\ngroups = [\"edge\"]\nsignature_public_key = \"{public}\"\nspool_dir = \"{}\"\n",
        broker.url(),
        dir.path().join("spool").display()
    );
    let daemon_config = config(&mlflow.url, dir.path(), &fleet).replace("poll_interval = \"1s\"", "poll_interval = \"1h\"\nalias = \"production\"");
    let mut daemon = Daemon::start(dir.path(), &daemon_config, None);
    daemon.wait_serving("1");

    let port = common::free_port();
    let mut bridge = common::edgeflow()
        .args(["--log", "info", "fleet", "console", "--broker", &broker.url(), "bridge", "--listen", &format!("127.0.0.1:{port}"), "--key"])
        .arg(&key)
        .args(["--group", "edge", "--model", MODEL, "--spread", "1s"])
        .env("EDGEFLOW_WEBHOOK_SECRET", "s3cret")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("bridge.log")).unwrap())
        .spawn()
        .unwrap();
    assert!(common::wait_port(port, Duration::from_secs(10)), "the bridge did not listen");
    // A forged delivery is refused before anything is published.
    let forged = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", "content-type: application/json"])
        .args(["-H", "X-MLflow-Delivery-Id: d-1", "-H", &format!("X-MLflow-Timestamp: {}", edgeflow::util::unix_now()), "-H", "X-MLflow-Signature: v1,AAAA"])
        .args(["-d", r#"{"entity":"model_version_alias","action":"created","data":{"name":"phi-3","alias":"production","version":"9"}}"#])
        .arg(format!("http://127.0.0.1:{port}/webhook"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&forged.stdout), "401");

    // The REST API names events by their proto enum names.
    let events = serde_json::json!([{"entity": "MODEL_VERSION_ALIAS", "action": "CREATED"}, {"entity": "MODEL_VERSION", "action": "CREATED"}]);
    rt.block_on(mlflow.api(
        reqwest::Method::POST,
        "webhooks",
        serde_json::json!({"name": "edgeflow-bridge", "url": format!("http://127.0.0.1:{port}/webhook"), "events": events, "secret": "s3cret"}),
    ));
    let replies = Sub::start(broker.port, &["edgeflow/edge-1/cmd/sync/reply"]);
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-mha"), "onnx", None, None);
    let promoted = Instant::now();
    rt.block_on(mlflow.set_alias(MODEL, "production", "2"));
    while daemon.status()["serving"]["version"] != "2" {
        if promoted.elapsed() > WAIT {
            let bridge_log = std::fs::read_to_string(dir.path().join("bridge.log")).unwrap_or_default();
            let server_log = mlflow.log();
            let tail: String = server_log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            panic!("version 2 not served after {WAIT:?}\nbridge:\n{bridge_log}\nmlflow (last lines):\n{tail}\ndaemon:\n{}", daemon.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = promoted.elapsed();
    assert!(took < Duration::from_secs(30), "took {took:?} with a 1h poll interval");
    let reply = replies.wait(|m| m.payload.contains("\"mlflow-") && m.payload.contains("succeeded"), WAIT).expect("the device acknowledged the bridge's sync").json();
    assert_eq!(reply["command"], "sync");
    // Both deliveries (the new version, then the alias) became a sync; MLflow sends them in
    // the background, so the second may come after the daemon already polled.
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.path().join("bridge.log")).unwrap();
        if log.contains("what=version 2 created") && log.contains("what=alias @production set to version 2") {
            break;
        }
        assert!(start.elapsed() < WAIT, "the bridge did not publish for both deliveries:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("promotion to serving with a 1h poll interval: {took:?}");
    kill(&mut bridge);
    daemon.stop();
}

/// A ring of simulated devices: who they are and what they follow.
struct Ring<'a> {
    alias: &'a str,
    group: &'a str,
    id_prefix: &'a str,
    devices: usize,
}

/// `edgeflow fleet simulate` devices (the real poller, cache and link; a stub engine) in a
/// ring, all obeying only signed commands.
fn simulate(dir: &Path, mlflow: &str, broker: &str, public_key: &str, ring: &Ring) -> Child {
    let Ring { alias, group, id_prefix, devices } = *ring;
    let folder = dir.join(id_prefix);
    std::fs::create_dir_all(&folder).unwrap();
    let config = folder.join("edgeflow.toml");
    std::fs::write(
        &config,
        format!(
            "[registry]\nurl = \"{mlflow}\"\nmodel = \"{}\"\nalias = \"{alias}\"\npoll_interval = \"1h\"\n\n[fleet]\nbroker = \"{broker}\"\ngroups = [\"{group}\"]\nsignature_public_key = \"{public_key}\"\nreport_interval = \"5s\"\nkeep_alive = \"5s\"\n",
            common::daemon::MODEL
        ),
    )
    .unwrap();
    common::edgeflow()
        .args(["fleet", "simulate", "--config"])
        .arg(&config)
        .args(["--devices", &devices.to_string(), "--id-prefix", id_prefix, "--stats-every", "1s", "--dir"])
        .arg(folder.join("devices"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(folder.join("simulate.log")).unwrap())
        .spawn()
        .unwrap()
}

/// Each listed device's version (empty when it reports none), by device id.
fn versions(rows: &[Value]) -> std::collections::BTreeMap<String, String> {
    rows.iter().map(|r| (r["device"].as_str().unwrap_or("").to_string(), r["version"].as_str().unwrap_or("").to_string())).collect()
}

/// The versions `devices --json` reports once every listed device is online and `pred` holds.
fn versions_until(broker: &str, what: &str, pred: impl Fn(&std::collections::BTreeMap<String, String>) -> bool) -> std::collections::BTreeMap<String, String> {
    versions(&devices_until(broker, what, |rows| rows.iter().all(|r| r["state"] == "online") && pred(&versions(rows))))
}

#[test]
fn rings_follow_their_alias_and_a_staged_rollout_stops_by_itself_on_a_bad_version() {
    use common::daemon::MODEL;
    use common::mlflow::Mlflow;
    let mlflow = Mlflow::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", None, Some("production"));
    rt.block_on(mlflow.set_alias(MODEL, "canary", "1"));
    mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-mha"), "pyfunc", None, None);
    // Version 3 has no tokenizer.json: it downloads, and fails its smoke test on every device.
    let work = tempfile::tempdir().unwrap();
    let broken = work.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in std::fs::read_dir(common::fixture_model("phi3-tiny-gqa")).unwrap() {
        let f = f.unwrap();
        if f.file_name() != "tokenizer.json" {
            std::fs::copy(f.path(), broken.join(f.file_name())).unwrap();
        }
    }
    mlflow.log_model(MODEL, &broken, "pyfunc", None, None);

    let broker = Mosquitto::start("");
    let url = broker.url();
    let dir = work.path();
    let key = dir.join("fleet.key");
    let keygen = common::edgeflow().args(["fleet", "keygen", "--out"]).arg(&key).output().unwrap();
    assert!(keygen.status.success(), "{}", text(&keygen));
    let public = String::from_utf8(keygen.stdout).unwrap().trim().to_string();
    let key = key.to_str().unwrap();
    // Two rings: the canaries follow @canary, the eu group @production.
    let mut canaries = simulate(dir, &mlflow.url, &url, &public, &Ring { alias: "canary", group: "canary", id_prefix: "can-", devices: 2 });
    let mut eu = simulate(dir, &mlflow.url, &url, &public, &Ring { alias: "production", group: "eu", id_prefix: "eu-", devices: 6 });
    versions_until(&url, "8 devices online on version 1", |v| v.len() == 8 && v.values().all(|v| v == "1"));

    // Ring 1: the canary alias moves, a sync to the canary group brings exactly them along.
    rt.block_on(mlflow.set_alias(MODEL, "canary", "2"));
    let o = console(&url, &["send", "sync", "--group", "canary", "--key", key, "--wait", "60s", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v = versions_until(&url, "the canaries on 2, eu on 1", |v| v.len() == 8 && v.iter().all(|(d, v)| v == if d.starts_with("can-") { "2" } else { "1" }));
    assert_eq!(v.values().filter(|v| *v == "2").count(), 2, "{v:?}");

    // A staged rollout of the bad version 3 to eu: the first step's pins fail their smoke
    // test, the rollout stops there and unpins them; the rest never see version 3.
    let o = console(&url, &["rollout", "--group", "eu", "--version", "3", "--step", "50%", "--interval", "2s", "--wait", "60s", "--revert", "--key", key, "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    assert_eq!(out["completed"], false, "{out}");
    assert_eq!(out["members"], 6, "{out}");
    let steps = out["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "stopped after the first step: {out}");
    assert_eq!(steps[0]["devices"], serde_json::json!(["eu-00000", "eu-00001", "eu-00002"]), "the first half by id: {out}");
    let problems = out["problems"].as_array().unwrap();
    assert!(problems.iter().any(|p| p["what"].as_str().unwrap().contains("tokenizer.json is missing")), "the smoke test's reason: {out}");
    assert!(problems.iter().all(|p| p["device"].as_str().unwrap() < "eu-00003"), "only moved devices: {out}");
    let reverted = &out["reverted"]["answers"];
    assert_eq!(reverted.as_object().map(|a| a.len()), Some(3), "{out}");
    assert!(reverted.as_object().unwrap().values().all(|a| a["status"] == "succeeded"), "{out}");
    versions_until(&url, "eu back on 1", |v| v.len() == 8 && v.iter().all(|(d, v)| v == if d.starts_with("can-") { "2" } else { "1" }));

    // Version 2, which the canaries serve, rolls out in two watched steps.
    let o = console(&url, &["rollout", "--group", "eu", "--version", "2", "--step", "50%", "--interval", "2s", "--wait", "60s", "--key", key]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("step 1/2: pinning 3 device(s) to version 2") && stdout.contains("step 2/2"), "{stdout}");
    assert!(stdout.contains("ok: version 2 is pinned on all 6 online member(s) of `eu` in 2 step(s)"), "{stdout}");
    versions_until(&url, "everyone on 2", |v| v.len() == 8 && v.values().all(|v| v == "2"));
    // Bad input is refused before anything is sent.
    let o = console(&url, &["rollout", "--group", "eu", "--version", "2", "--step", "0%", "--key", key]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    let o = console(&url, &["rollout", "--group", "nobody", "--version", "2", "--key", key]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("group `nobody` has no online device"), "{}", text(&o));

    for child in [&mut canaries, &mut eu] {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "simulate exits 0 on SIGTERM: {status:?}\n{}", std::fs::read_to_string(dir.join("can-/simulate.log")).unwrap_or_default());
    }
}
