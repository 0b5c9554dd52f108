//! Soak (the reliability campaign): `edgeflow run` serving the trained model (SmolLM2) to 16
//! concurrent clients on its socket for 30 minutes while a real MLflow server moves the
//! `production` alias between two versions every 3 minutes. Passes when no answer is a 5xx,
//! every promotion is served, resident memory grows less than 5% and no file descriptor leaks.
//!
//! Ignored (it takes the whole time): `make soak`, or
//! `cargo test --release --test soak -- --ignored --nocapture`, with `EDGEFLOW_SOAK_MINUTES`
//! (30), `EDGEFLOW_SOAK_CLIENTS` (16) and `EDGEFLOW_SOAK_PROMOTE_EVERY` (seconds, 180).
//! Prints the figures RELIABILITY.md quotes.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::{config, Daemon, MODEL};
use common::env_or;
use common::http::curl;
use common::mlflow::Mlflow;
use serde_json::json;

/// One answer: when it was asked, its status (599: a stream ended by an error event), how
/// long it took.
#[derive(Clone, Copy)]
struct Answer {
    at: Duration,
    status: u16,
    took: Duration,
}

/// The daemon's footprint at one moment, and how many models it held.
#[derive(Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    models_loaded: u64,
    serving: u32,
}

fn models_loaded(socket: &Path) -> u64 {
    let m = curl(socket, &["/metrics"], None);
    m.body.lines().find_map(|l| l.strip_prefix("edgeflow_models_loaded ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

const QUESTIONS: &[&str] = &[
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea.",
    "What is 2 + 2?",
    "Give me a synonym for happy.",
    "What do bees make?",
    "Say hello in Spanish.",
    "Name a planet.",
];

#[test]
#[ignore = "a 30-minute campaign: make soak"]
fn soak_16_clients_while_versions_are_promoted() {
    let minutes: u64 = env_or("EDGEFLOW_SOAK_MINUTES", 30);
    let clients: usize = env_or("EDGEFLOW_SOAK_CLIENTS", 16);
    let promote_every = Duration::from_secs(env_or("EDGEFLOW_SOAK_PROMOTE_EVERY", 180));
    let length = Duration::from_secs(minutes * 60);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Two versions of the trained model that differ only in their files' bytes (the second's
    // genai_config.json is re-indented), so every promotion is a real pull, swap and reload.
    let mlflow = Mlflow::start(&[]);
    let model = common::smollm2_dir();
    mlflow.log_model(MODEL, &model, "pyfunc", None, Some("production"));
    let second = common::copy_model(&model);
    let genai: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(second.path().join("genai_config.json")).unwrap()).unwrap();
    std::fs::write(second.path().join("genai_config.json"), serde_json::to_string(&genai).unwrap()).unwrap();
    mlflow.log_model(MODEL, second.path(), "pyfunc", None, None);

    let dir = tempfile::tempdir().unwrap();
    let conf = config(&mlflow.url, dir.path(), "")
        .replace("[registry]\n", "[registry]\nalias = \"production\"\n")
        .replace("[engine]\nthreads = 1\n", "[engine]\nthreads = 2\n")
        .replace("[serve]\n", "[serve]\nqueue_depth = 64\nrequest_timeout = \"120s\"\n")
        .replace("poll_interval = \"1s\"", "poll_interval = \"5s\"");
    let mut daemon = Daemon::start(dir.path(), &conf, None);
    daemon.wait_serving("1");
    let pid = daemon.child.id();
    let socket = daemon.socket.clone();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));

    // The clients: each asks its own questions, half of them streamed, one after another.
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..clients)
        .map(|i| {
            let (socket, stop, answers, failures) = (socket.clone(), stop.clone(), answers.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(i as u64);
                while !stop.load(Ordering::Relaxed) {
                    let stream = rng.bool();
                    let body = json!({
                        "model": MODEL,
                        "messages": [{"role": "user", "content": QUESTIONS[rng.usize(..QUESTIONS.len())]}],
                        "max_tokens": rng.usize(8..48),
                        "temperature": 0,
                        "stream": stream,
                    })
                    .to_string();
                    let asked = Instant::now();
                    let r = curl(&socket, &["-H", "content-type: application/json", "--data-binary", &body, "/v1/chat/completions"], None);
                    let took = asked.elapsed();
                    // A stream that fails midway still started with 200: its error event counts.
                    let failed_midway = stream && r.body.contains("\"error\"");
                    let whole = stream || r.status != 200 || serde_json::from_str::<serde_json::Value>(&r.body).is_ok_and(|v| v["choices"][0]["message"]["content"].is_string());
                    if !whole {
                        failures.lock().unwrap().push(format!(
                            "{:?} in: a 200 without a chat completion: {}",
                            asked.duration_since(start),
                            r.body.chars().take(300).collect::<String>()
                        ));
                    }
                    if r.status >= 500 || r.status == 0 || failed_midway {
                        failures.lock().unwrap().push(format!("{:?} in: {} {}", asked.duration_since(start), r.status, r.body.chars().take(300).collect::<String>()));
                    }
                    answers.lock().unwrap().push(Answer { at: asked.duration_since(start), status: if failed_midway { 599 } else { r.status }, took });
                }
            })
        })
        .collect();

    // The footprint, every 2 s.
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let sampler = {
        let (socket, stop, samples) = (socket.clone(), stop.clone(), samples.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let (rss_kib, fds) = common::footprint(pid);
                let loaded = models_loaded(&socket);
                let status = curl(&socket, &["/status"], None);
                let serving = if status.status == 200 { status.json()["serving"]["version"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0) } else { 0 };
                samples.lock().unwrap().push(Sample { at: start.elapsed(), rss_kib, fds, models_loaded: loaded, serving });
                std::thread::sleep(Duration::from_secs(2));
            }
        })
    };

    // Promotions: the alias moves to the other version every `promote_every`.
    let mut promotions = Vec::new();
    let mut current = 1;
    while start.elapsed() + promote_every <= length {
        std::thread::sleep(promote_every);
        current = 3 - current;
        rt.block_on(mlflow.set_alias(MODEL, "production", &current.to_string()));
        promotions.push((start.elapsed(), current));
        let s = daemon.wait_serving(&current.to_string());
        eprintln!(
            "{:>6.1} min: promoted version {current}; serving {} after {:.1} s",
            start.elapsed().as_secs_f64() / 60.0,
            s["serving"]["version"],
            start.elapsed().saturating_sub(promotions.last().unwrap().0).as_secs_f64()
        );
    }
    std::thread::sleep(length.saturating_sub(start.elapsed()));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    sampler.join().unwrap();
    let answers = answers.lock().unwrap().clone();
    let samples = samples.lock().unwrap().clone();
    let failures = failures.lock().unwrap().clone();

    // Resident memory in steady state: samples holding one model (not mid-swap), in the
    // second window after the first promotion (both versions have served once by then) and in
    // the last one.
    let window = promote_every.min(Duration::from_secs(120));
    let steady = |from: Duration, to: Duration| -> Vec<&Sample> { samples.iter().filter(|s| s.at >= from && s.at < to && s.models_loaded == 1).collect() };
    let first_promotion = promotions.first().map_or(Duration::ZERO, |p| p.0);
    let early = steady(first_promotion + window, first_promotion + 2 * window);
    let late = steady(length.saturating_sub(window), length + Duration::from_secs(60));
    let rss_early = median(early.iter().map(|s| s.rss_kib).collect());
    let rss_late = median(late.iter().map(|s| s.rss_kib).collect());
    let fds_early = median(early.iter().map(|s| s.fds as u64).collect());
    let fds_late = median(late.iter().map(|s| s.fds as u64).collect());
    let peak_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let mut took: Vec<Duration> = answers.iter().filter(|a| a.status == 200).map(|a| a.took).collect();
    took.sort();
    let pct = |p: f64| took.get(((took.len() as f64 - 1.0) * p) as usize).map_or(0, |d| d.as_millis());
    let by_status = answers.iter().fold(std::collections::BTreeMap::<u16, usize>::new(), |mut m, a| {
        *m.entry(a.status).or_default() += 1;
        m
    });
    let versions_seen: std::collections::BTreeSet<u32> = samples.iter().map(|s| s.serving).filter(|v| *v != 0).collect();
    let last_answer = answers.iter().map(|a| a.at).max().unwrap_or_default();

    eprintln!("\n| figure | value |\n|---|---|");
    eprintln!("| duration, clients, promotions | {minutes} min, {clients} clients, {} promotions (every {} s) |", promotions.len(), promote_every.as_secs());
    eprintln!("| requests answered, by status | {} {by_status:?} |", answers.len());
    eprintln!("| 5xx (and streams ended by an error event) | {} |", failures.len());
    eprintln!("| latency of 200s: p50 / p95 / p99 / max (ms) | {} / {} / {} / {} |", pct(0.5), pct(0.95), pct(0.99), pct(1.0));
    eprintln!("| throughput | {:.2} requests/s |", answers.len() as f64 / last_answer.as_secs_f64().max(1.0));
    eprintln!(
        "| RSS, one model loaded: early / late (MiB) | {:.1} / {:.1} ({:+.2}%) |",
        rss_early as f64 / 1024.0,
        rss_late as f64 / 1024.0,
        (rss_late as f64 / rss_early.max(1) as f64 - 1.0) * 100.0
    );
    eprintln!("| RSS peak (during swaps, two models) (MiB) | {:.1} |", peak_rss as f64 / 1024.0);
    eprintln!("| open files: early / late | {fds_early} / {fds_late} |");
    eprintln!("| versions served | {versions_seen:?} |");

    assert!(failures.is_empty(), "{} answers were 5xx or failed midway; the first: {:#?}\n{}", failures.len(), &failures[..failures.len().min(10)], daemon.log());
    assert!(answers.len() >= clients * 10, "only {} answers in {minutes} min", answers.len());
    assert!(by_status.keys().all(|s| *s == 200 || *s == 429), "statuses {by_status:?}");
    assert!(early.len() >= 5 && late.len() >= 5, "too few steady samples: early {}, late {}", early.len(), late.len());
    assert!(rss_late * 100 <= rss_early * 105, "resident memory grew from {rss_early} KiB to {rss_late} KiB (more than 5%)");
    assert!(fds_late <= fds_early + 2, "open files grew from {fds_early} to {fds_late}");
    if !promotions.is_empty() {
        assert_eq!(versions_seen, [1, 2].into_iter().collect(), "both versions served");
    }
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}
