//! Registry faults (reliability campaign): a whole `edgeflow run` daemon follows a real MLflow
//! server through the fault proxy of `common::mlflow`, while a client chats over the socket
//! the whole time. Each round moves the `champion` alias to the other of two versions and
//! breaks the registry in one way first: latency, connection resets, a 5xx burst or a 5xx
//! wall, an answer whose head comes and whose body never does, a download that trickles a few
//! bytes a second, a download that never ends, a Content-Length off either way, a JSON answer
//! of gigabytes, a listing of thousands of files, a download cut short.
//!
//! Every round checks:
//! - serving is never interrupted: every chat answer is 200 with a version's fingerprint, and
//!   while a fault blocks the pull, the version serving stays the one before;
//! - nothing is activated from bad bytes: once the fault clears (or, for the faults retries
//!   absorb, while it lasts) the new version activates and its folder holds the fixture's
//!   files byte for byte, and `edgeflow cache verify` agrees at the end;
//! - the daemon's memory stays bounded (VmRSS sampled every 20 ms; the bound is stated below);
//! - the timeouts fire: a poll that meets an answer without end fails and the next one runs;
//! - `/metrics` shows it: exchanges by result, retries and the backoff they wait, polls by
//!   outcome, the last successful poll; `/status` names the outcome and the error.
//!
//! `registry_faults_sampled` (part of `make test`) runs every fault once and prints the
//! figures table; `registry_faults_campaign` (ignored) runs `EDGEFLOW_FAULT_ROUNDS` rounds of
//! each (default 3):
//! `cargo test --release --test registry_faults -- --ignored registry_faults_campaign --nocapture`

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{config, Chatter, Daemon, MODEL};
use common::http::curl;
use common::mlflow::{digests, Action, Mlflow, Proxy};
use serde_json::Value;

/// How much the daemon's resident memory may grow over its level before a fault, at most,
/// while the fault lasts: the largest API answer read (16 MiB), the download queue (16 batches
/// of 256 KiB) and its write buffer (1 MiB), and room for a model swap's overlap (the tiny
/// fixtures hold about 12 MB each) and the allocator.
const RSS_BOUND: u64 = 64 << 20;

/// One fault: the proxy rules, whether it blocks the pull while it lasts (or retries absorb
/// it), and what the daemon must say about it.
struct Fault {
    name: &'static str,
    rules: Vec<(&'static str, Action, Option<usize>)>,
    /// The pull cannot succeed while the rules hold.
    blocks: bool,
    /// Request results (`edgeflow_registry_requests_total{result}`) at least one of which
    /// must be counted while the fault lasts (none: the fault is not in how a request ends).
    results: &'static [&'static str],
    /// Poll outcomes the fault may end in (blocking faults).
    outcomes: &'static [&'static str],
    /// Words `/status`'s registry detail holds while the fault lasts (blocking faults).
    detail: &'static str,
    /// Retries with a backoff delay must be seen.
    backoff: bool,
}

const RESOLVE: &str = "registered-models/alias";
const LISTING: &str = "mlflow-artifacts/artifacts?path=";
const WEIGHTS: &str = ".onnx.data";

fn faults() -> Vec<Fault> {
    let f = |name, rules, blocks, results, outcomes, detail, backoff| Fault { name, rules, blocks, results, outcomes, detail, backoff };
    vec![
        f(
            "latency 300 ms per API call, downloads at 4 MB/s",
            vec![("/api/2.0/mlflow/", Action::Delay(Duration::from_millis(300)), None), (WEIGHTS, Action::Throttle(4 << 20), None)],
            false,
            &[],
            &[],
            "",
            false,
        ),
        f("connection reset before any answer, every request", vec![("/api/", Action::Reset, None)], true, &["transport", "connect"], &["unreachable"], "", true),
        f("5xx burst: the next 3 requests answer 503", vec![("/api/", Action::Status(503), Some(3))], false, &["http_5xx"], &[], "", true),
        f("5xx wall: every request answers 502", vec![("/api/", Action::Status(502), None)], true, &["http_5xx"], &["unreachable"], "502", true),
        f("the alias lookup's head comes, its body never does", vec![(RESOLVE, Action::Hang, None)], true, &["timeout"], &["unreachable"], "timed out", true),
        f("the weights' head comes, their body never does", vec![(WEIGHTS, Action::Hang, None)], true, &["timeout"], &["unreachable"], "", true),
        f("the weights never end (zeros after the real head)", vec![(WEIGHTS, Action::Endless(0), None)], true, &["bad_answer"], &["failed"], "but sent", false),
        f("Content-Length 100 bytes longer than the alias lookup's body", vec![(RESOLVE, Action::WrongLength(100), None)], true, &["transport"], &["unreachable"], "", true),
        f("Content-Length 1000 bytes shorter than the weights", vec![(WEIGHTS, Action::WrongLength(-1000), None)], true, &["bad_answer"], &["failed"], "but sent", false),
        f("a 4 GiB JSON answer to the alias lookup", vec![(RESOLVE, Action::HugeJson(4 << 30), None)], true, &["too_large"], &["failed"], "larger than", false),
        f("a listing of 12,000 files", vec![(LISTING, Action::InjectFiles(12_000), None)], true, &[], &["failed"], "more than 10000 entries", false),
        f("the weights cut at 3 MB, twice", vec![(WEIGHTS, Action::CutAfter(3_000_000), Some(2))], false, &["transport", "truncated"], &[], "", true),
        // Last: before the fix, this one held the poller for good.
        f(
            "the weights trickle, 200 bytes a second",
            vec![(WEIGHTS, Action::Trickle { bytes: 100, every: Duration::from_millis(500) }, None)],
            true,
            &["stalled"],
            &["unreachable"],
            "stalling",
            true,
        ),
    ]
}

/// The daemon's VmRSS, sampled every 20 ms; `peak` since the last [`Rss::reset`].
struct Rss {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Rss {
    fn start(pid: u32) -> Rss {
        let (peak, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kb) = vm_rss_kib(pid) {
                    p.fetch_max(kb << 10, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Rss { peak, stop }
    }

    /// Starts a new peak from now; the current RSS.
    fn reset(&self, pid: u32) -> u64 {
        let now = vm_rss_kib(pid).unwrap_or(0) << 10;
        self.peak.store(now, Ordering::Relaxed);
        now
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for Rss {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The sum of a metric family's samples whose labels include every `(name, value)` of `labels`
/// (one of several values, separated by `|`), from a `/metrics` text.
fn metric(text: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, rest) = series.split_once('{').map_or((series, ""), |(n, r)| (n, r.trim_end_matches('}')));
            if name != family {
                return None;
            }
            let has = |k: &str, v: &str| rest.split(',').any(|kv| v.split('|').any(|one| kv == format!("{k}=\"{one}\"")));
            if labels.iter().all(|(k, v)| has(k, v)) {
                value.parse::<f64>().ok()
            } else {
                None
            }
        })
        .sum()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn scrape(socket: &Path) -> String {
    let r = curl(socket, &["/metrics"], None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// What one round measured, for the table.
struct Row {
    fault: &'static str,
    requests: usize,
    outcome: String,
    answers: usize,
    answers_ok: usize,
    base_rss: u64,
    peak_rss: u64,
    activation: Duration,
    failure: Option<String>,
}

struct Campaign {
    mlflow: Mlflow,
    rt: tokio::runtime::Runtime,
    proxy: Proxy,
    dir: tempfile::TempDir,
    daemon: Daemon,
    chatter: Chatter,
    rss: Rss,
    /// The fixture folder of each version, by version number - 1.
    fixtures: Vec<PathBuf>,
    serving: String,
}

impl Campaign {
    fn start() -> Campaign {
        let mlflow = Mlflow::start(&[]);
        let fixtures = vec![common::fixture_model("phi3-tiny-gqa"), common::fixture_model("phi3-tiny-gqa-acc1")];
        let v1 = mlflow.log_model(MODEL, &fixtures[0], "pyfunc", None, Some("champion"));
        let v2 = mlflow.log_model(MODEL, &fixtures[1], "pyfunc", None, None);
        assert_eq!((v1.version.as_str(), v2.version.as_str()), ("1", "2"));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let proxy = rt.block_on(Proxy::start(&mlflow.url));
        let dir = tempfile::tempdir().unwrap();
        // The alias, so the two versions can take turns; one version kept, so every turn
        // downloads the whole version again; short timeouts, so the hanging faults cost
        // seconds.
        let cfg = config(&proxy.url, dir.path(), "")
            .replace("model = \"phi-3\"", "model = \"phi-3\"\nalias = \"champion\"")
            .replace("request_timeout = \"10s\"", "request_timeout = \"3s\"\nread_timeout = \"3s\"")
            .replace("[cache]\n", "[cache]\nkeep_versions = 1\n");
        let mut daemon = Daemon::start(dir.path(), &cfg, None);
        daemon.wait_serving("1");
        let chatter = Chatter::start(&daemon.socket);
        let rss = Rss::start(daemon.child.id());
        Campaign { mlflow, rt, proxy, dir, daemon, chatter, rss, fixtures, serving: "1".into() }
    }

    fn status(&mut self) -> Value {
        self.daemon.status()
    }

    /// One round: `fault` on, the alias moved to the other version, checks, fault off.
    fn round(&mut self, fault: &Fault, failing_polls: u64) -> Row {
        let socket = self.daemon.socket.clone();
        let pid = self.daemon.child.id();
        let previous = self.serving.clone();
        let next = if previous == "1" { "2" } else { "1" }.to_string();
        let mut failures = Vec::new();
        let before = scrape(&socket);
        self.proxy.clear();
        for (path, action, times) in &fault.rules {
            self.proxy.add(path, action.clone(), *times);
        }
        let base_rss = self.rss.reset(pid);
        let started = Instant::now();
        self.rt.block_on(self.mlflow.set_alias(MODEL, "champion", &next));

        let mut outcome = String::new();
        let mut backoff_seen = false;
        let mut requests = 0;
        // The peak while the fault blocks the pull (no model swap can happen then).
        let mut peak_rss = 0;
        if fault.blocks {
            // Until enough polls have failed on the fault (or too long).
            let outcomes = fault.outcomes.join("|");
            let polls_before = metric(&before, "edgeflow_registry_polls_total", &[("outcome", &outcomes)]);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let text = scrape(&socket);
                backoff_seen |= metric(&text, "edgeflow_registry_backoff_seconds", &[]) > 0.0;
                let failed = metric(&text, "edgeflow_registry_polls_total", &[("outcome", &outcomes)]) - polls_before;
                if failed >= failing_polls as f64 {
                    break;
                }
                if Instant::now() > deadline {
                    failures.push(format!("only {failed} polls ended in {:?} within 60 s", fault.outcomes));
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let s = self.status();
            outcome = s["registry"]["outcome"].as_str().unwrap_or_default().to_string();
            let detail = s["registry"]["detail"].as_str().unwrap_or_default().to_string();
            if !fault.outcomes.contains(&outcome.as_str()) {
                failures.push(format!("/status says {outcome:?} ({detail}), expected one of {:?}", fault.outcomes));
            }
            if !detail.contains(fault.detail) {
                failures.push(format!("/status detail {detail:?} does not say {:?}", fault.detail));
            }
            if s["serving"]["version"] != previous.as_str() {
                failures.push(format!("serving {} while the fault blocks the pull", s["serving"]["version"]));
            }
            let mut prints: Vec<String> = self.chatter.between(started, Instant::now()).into_iter().map(|a| a.fingerprint).collect();
            prints.sort();
            prints.dedup();
            if prints.iter().any(|p| *p != format!("{MODEL}@{previous}")) {
                failures.push(format!("answers from {prints:?} while the fault blocked version {next}"));
            }
            peak_rss = self.rss.peak();
            if peak_rss > base_rss + RSS_BOUND {
                failures.push(format!("RSS peaked at {} MiB, {} MiB over the {} MiB before", peak_rss >> 20, (peak_rss - base_rss) >> 20, base_rss >> 20));
            }
            requests = self.proxy.seen_count();
            self.proxy.clear();
        }
        let cleared = Instant::now();
        let cleared_at = unix_now();

        // The new version activates (after the fault, or through it), from the right bytes.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status();
            let text = scrape(&socket);
            backoff_seen |= metric(&text, "edgeflow_registry_backoff_seconds", &[]) > 0.0;
            if s["serving"]["version"] == next.as_str() {
                if outcome.is_empty() {
                    outcome = s["registry"]["outcome"].as_str().unwrap_or_default().to_string();
                }
                break;
            }
            if Instant::now() > deadline {
                failures.push(format!("version {next} not serving 60 s after the fault cleared; status: {}", s["registry"]));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let activation = cleared.elapsed();
        if !fault.blocks {
            requests = self.proxy.seen_count();
            peak_rss = self.rss.peak();
        }
        self.proxy.clear();
        match edgeflow::cache::active_dir(&self.dir.path().join("cache"), MODEL) {
            Some(active) => {
                let fixture = &self.fixtures[next.parse::<usize>().unwrap_or(1) - 1];
                if digests(&active) != digests(fixture) {
                    failures.push(format!("the active folder {} does not hold version {next}'s files", active.display()));
                }
            }
            None => failures.push("no active folder in the cache".into()),
        }
        let after = scrape(&socket);
        if !fault.results.is_empty() {
            let counted = |t: &str| metric(t, "edgeflow_registry_requests_total", &[("result", &fault.results.join("|"))]);
            if counted(&after) <= counted(&before) {
                failures.push(format!("no request counted as {:?} in /metrics", fault.results));
            }
        }
        if fault.backoff {
            let retries = |t: &str| metric(t, "edgeflow_registry_retries_total", &[]);
            let waited = |t: &str| metric(t, "edgeflow_registry_backoff_waited_seconds_total", &[]);
            if retries(&after) <= retries(&before) || waited(&after) <= waited(&before) {
                failures.push("no retry with a backoff delay counted".into());
            }
            if fault.blocks && !backoff_seen {
                failures.push("edgeflow_registry_backoff_seconds never above 0 while requests failed".into());
            }
        }
        if metric(&after, "edgeflow_registry_backoff_seconds", &[]) != 0.0 {
            failures.push("edgeflow_registry_backoff_seconds is not back to 0 after a success".into());
        }
        if metric(&after, "edgeflow_registry_consecutive_failed_polls", &[]) != 0.0 {
            failures.push("edgeflow_registry_consecutive_failed_polls is not back to 0".into());
        }
        let last_success = metric(&after, "edgeflow_registry_last_success_timestamp_seconds", &[]);
        if last_success + 1.0 < cleared_at as f64 {
            failures.push(format!("edgeflow_registry_last_success_timestamp_seconds is {last_success}, before the fault cleared at {cleared_at}"));
        }
        let round = self.chatter.between(started, Instant::now());
        let (answers, answers_ok) = (round.len(), round.iter().filter(|a| a.status == 200).count());
        if answers == 0 {
            failures.push("no chat answer during the round".into());
        }
        if answers_ok != answers {
            failures.push(format!("{} of {answers} chat answers were not 200", answers - answers_ok));
        }
        if self.status()["serving"]["version"] == next.as_str() {
            self.serving = next;
        }
        Row { fault: fault.name, requests, outcome, answers, answers_ok, base_rss, peak_rss, activation, failure: (!failures.is_empty()).then(|| failures.join("; ")) }
    }

    /// Stops everything and checks what the daemon leaves: a clean exit, every answer 200
    /// with a version's fingerprint, and a cache that verifies.
    fn finish(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let answers = self.chatter.stop();
        let bad: Vec<&common::daemon::Answer> = answers.iter().filter(|a| a.status != 200 || !(a.fingerprint == "phi-3@1" || a.fingerprint == "phi-3@2")).collect();
        if !bad.is_empty() {
            problems.push(format!("{} of {} answers were not 200 with a version's fingerprint: {:?}", bad.len(), answers.len(), &bad[..bad.len().min(5)]));
        }
        eprintln!("chat answers: {} in all, {} of them 200", answers.len(), answers.iter().filter(|a| a.status == 200).count());
        if !self.daemon.stop().success() {
            problems.push(format!("no clean stop:\n{}", self.daemon.log()));
        }
        let log = self.daemon.log();
        if log.contains("panicked") {
            problems.push("the daemon panicked".into());
        }
        let verify = common::edgeflow().args(["cache", "verify", "--json", "--config"]).arg(self.dir.path().join("config.toml")).output().unwrap();
        if !verify.status.success() {
            problems.push(format!("cache verify: {}", String::from_utf8_lossy(&verify.stdout)));
        }
        problems
    }
}

fn campaign(rounds: usize, failing_polls: u64) {
    let mut c = Campaign::start();
    let started = Instant::now();
    let mut rows = Vec::new();
    for _ in 0..rounds {
        for fault in faults() {
            let row = c.round(&fault, failing_polls);
            eprintln!("{}: {}", row.fault, row.failure.as_deref().unwrap_or("ok"));
            rows.push(row);
        }
    }
    let elapsed = started.elapsed();
    let problems = c.finish();
    eprintln!("registry faults: {} rounds in {:.0} s", rows.len(), elapsed.as_secs_f64());
    eprintln!("| fault | requests seen by the proxy | outcome | chat answers (200) | RSS before → peak | v activated after the fault cleared | result |");
    eprintln!("|---|---:|---|---:|---:|---:|---|");
    for r in &rows {
        eprintln!(
            "| {} | {} | {} | {} ({}) | {} → {} MiB | {:.1} s | {} |",
            r.fault,
            r.requests,
            r.outcome,
            r.answers,
            r.answers_ok,
            r.base_rss >> 20,
            r.peak_rss >> 20,
            r.activation.as_secs_f64(),
            r.failure.as_deref().unwrap_or("ok")
        );
    }
    let failed: Vec<String> = rows.iter().filter_map(|r| r.failure.as_ref().map(|f| format!("{}: {f}", r.fault))).chain(problems).collect();
    assert!(failed.is_empty(), "{} problems:\n{}", failed.len(), failed.join("\n"));
}

/// Every fault once, until one poll has failed on it.
#[test]
fn registry_faults_sampled() {
    campaign(1, 1);
}

/// `EDGEFLOW_FAULT_ROUNDS` rounds (default 3) of every fault, each held until three polls
/// have failed on it.
#[test]
#[ignore = "the full campaign (minutes): EDGEFLOW_FAULT_ROUNDS rounds of every fault"]
fn registry_faults_campaign() {
    let rounds = std::env::var("EDGEFLOW_FAULT_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    campaign(rounds, 3);
}
