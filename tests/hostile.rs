//! Hostile local clients (the reliability campaign): one local user attacks the API socket of
//! an `edgeflow serve` running the trained model, phase after phase, while another local user
//! (a different uid) keeps chatting. Every attack must get a clear answer or a closed
//! connection, the other user must be served all along, and the server's memory and open
//! files must come back to where they were.
//!
//! The attacker is this test process (root, uid 0); the well-behaved client is `curl` run as
//! uid 65534. Both are allowed on the socket; a third uid is not. Needs root to run curl as
//! other users (`make test` and CI run as root).
//!
//! Figures: printed as a table at the end (RELIABILITY.md, "Hostile local clients").

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::{curl, Http};
use common::server::Server;
use serde_json::{json, Value};

/// The well-behaved client's uid and gid (`nobody`), and one the allow-list does not name.
const GOOD: (u32, u32) = (65534, 65534);
const STRANGER: (u32, u32) = (65533, 65533);
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// Samples the server's footprint every 50 ms; each phase reads the peak of its own span.
struct Sampler {
    samples: Arc<Mutex<Vec<(Instant, u64, usize)>>>,
    stop: Arc<AtomicBool>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let (samples, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (s, st) = (samples.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let (rss, fds) = common::footprint(pid);
                s.lock().unwrap().push((Instant::now(), rss, fds));
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Sampler { samples, stop }
    }

    /// The largest RSS (KiB) and open-file count seen since `from`.
    fn peak_since(&self, from: Instant) -> (u64, usize) {
        // A phase shorter than the sampling period reads the last sample taken.
        let s = self.samples.lock().unwrap();
        let first = s.iter().rposition(|(t, ..)| *t < from).unwrap_or(0);
        s[first..].iter().fold((0, 0), |(r, f), (_, rss, fds)| (r.max(*rss), f.max(*fds)))
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One answer to the well-behaved client: when it was asked, its status, how long it took.
#[derive(Clone, Copy)]
struct Answer {
    at: Instant,
    status: u16,
    took: Duration,
}

/// The well-behaved client: uid 65534 chatting over curl, one request after another, until
/// stopped.
struct GoodClient {
    answers: Arc<Mutex<Vec<Answer>>>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GoodClient {
    fn start(socket: &Path) -> GoodClient {
        let (answers, failures, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (a, f, st, socket) = (answers.clone(), failures.clone(), stop.clone(), socket.to_path_buf());
        let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0}).to_string();
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let at = Instant::now();
                let r = curl(&socket, &["-H", "content-type: application/json", "--data-binary", &body, "/v1/chat/completions"], Some(GOOD));
                if r.status != 200 {
                    f.lock().unwrap().push(format!("{} after {:?}: {}", r.status, at.elapsed(), r.body));
                }
                a.lock().unwrap().push(Answer { at, status: r.status, took: at.elapsed() });
            }
        });
        GoodClient { answers, failures, stop, thread: Some(thread) }
    }

    /// The answers that were still coming at `from` or asked after it (a request that spans
    /// a phase counts in it, with all of its wait).
    fn since(&self, from: Instant) -> Vec<Answer> {
        self.answers.lock().unwrap().iter().filter(|a| a.at + a.took >= from).copied().collect()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// What the slowloris clients got.
#[derive(Debug, Default)]
struct Slow {
    /// Held a slot until the server closed it at header_timeout, unanswered.
    cut: usize,
    longest: Duration,
    /// Refused at once, by status.
    answered: std::collections::BTreeMap<u16, usize>,
    /// Closed at once unanswered (refusals beyond the ones the server answers).
    dropped: usize,
}

/// One phase's line of the figures table.
struct Row {
    phase: &'static str,
    attack: String,
    outcome: String,
    good: String,
    peak_rss_mib: f64,
    peak_fds: usize,
}

/// What a raw connection got back: the status line's code (0: none) and the whole answer.
fn answer_of(conn: &mut UnixStream, wait: Duration) -> (u16, String) {
    conn.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ").and_then(|t| t.get(..3)).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

/// A request whose body is `body`, on a fresh connection; its status and answer.
fn raw_post(socket: &Path, path: &str, body: &[u8]) -> (u16, String) {
    let mut c = UnixStream::connect(socket).unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nhost: edgeflow\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n", body.len());
    c.write_all(head.as_bytes()).unwrap();
    let _ = c.write_all(body);
    answer_of(&mut c, Duration::from_secs(60))
}

fn error_code(answer: &str) -> String {
    answer.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str::<Value>(b).ok()).and_then(|v| v["error"]["code"].as_str().map(str::to_string)).unwrap_or_default()
}

/// Summary of the good client's answers in a span: count, all 200?, median and worst latency.
fn good_summary(answers: &[Answer]) -> String {
    let mut took: Vec<Duration> = answers.iter().map(|a| a.took).collect();
    took.sort();
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let median = took.get(took.len() / 2).copied().unwrap_or_default();
    let worst = took.last().copied().unwrap_or_default();
    format!("{ok}/{} 200, median {} ms, worst {} ms", answers.len(), median.as_millis(), worst.as_millis())
}

#[test]
fn hostile_local_clients_get_clear_answers_while_another_user_is_served() {
    assert!(nix::unistd::geteuid().is_root(), "this test runs curl as other users and needs root (make test and CI run as root)");
    let me = nix::unistd::geteuid().as_raw();
    // No prefix snapshots: they would keep the keys and values of the campaign's long legitimate
    // prompt (bounded by engine.prefix_cache, but not what "flat memory" is about here).
    let config = format!(
        "[engine]\nprefix_cache = \"off\"\n[serve]\nsocket_mode = 0o666\nallowed_uids = [{me}, {}]\nheader_timeout = \"{}s\"\nrequest_timeout = \"60s\"\nmax_tokens = 256\n",
        GOOD.0,
        HEADER_TIMEOUT.as_secs()
    );
    let model = common::smollm2_dir();
    let server = Server::start_folder(&model, &config, &[], &[]);
    std::fs::set_permissions(server.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket: PathBuf = server.socket.clone();
    let pid = server.child.id();
    let sampler = Sampler::start(pid);
    let mut rows = Vec::new();

    // Raise this process's open-file limit for the 10,000 connections.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(hard >= 12_000, "the hard limit on open files ({hard}) is too low for 10,000 connections");

    // Warm up (the first answers load the model's kernels), then the baseline. The last
    // prompt is as long as the longest legitimate one of the campaign (the 200 NULs): the
    // KV buffers grow to the longest sequence served and stay (bounded by the context), which
    // is not what an attack leaves behind.
    let long = json!({"model": "m", "prompt": "lorem ipsum ".repeat(100), "max_tokens": 2}).to_string();
    for body in [r#"{"model":"m","prompt":"Hi","max_tokens":4}"#, r#"{"model":"m","prompt":"Hi","max_tokens":4}"#, long.as_str()] {
        assert_eq!(curl(&socket, &["-H", "content-type: application/json", "--data-binary", body, "/v1/completions"], Some(GOOD)).status, 200);
    }
    let mut good = GoodClient::start(&socket);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let (base_rss, base_fds) = common::footprint(pid);
    rows.push(Row {
        phase: "baseline",
        attack: "none".into(),
        outcome: "-".into(),
        good: good_summary(&good.since(started)),
        peak_rss_mib: base_rss as f64 / 1024.0,
        peak_fds: base_fds,
    });

    // 1. Slowloris: 200 clients each sending a request's headers, then a header value a byte
    //    every 200 ms (never finishing), reconnecting 100 ms after they are cut off, for 12 s.
    let t = Instant::now();
    let tally = Arc::new(Mutex::new(Slow::default()));
    let slow: Vec<_> = (0..200)
        .map(|_| {
            let (socket, tally) = (socket.clone(), tally.clone());
            std::thread::spawn(move || {
                let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: edgeflow\r\ncontent-type: application/json\r\ncontent-length: 20\r\nx-slow: ";
                while t.elapsed() < Duration::from_secs(12) {
                    let Ok(mut c) = UnixStream::connect(&socket) else { continue };
                    let opened = Instant::now();
                    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    let mut answered = 0u16;
                    for b in head.iter().chain(std::iter::repeat(&b'a')) {
                        if c.write_all(&[*b]).is_err() {
                            break;
                        }
                        let mut buf = [0u8; 512];
                        match c.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                answered = String::from_utf8_lossy(&buf[..n]).get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                                break;
                            }
                            Err(_) => {}
                        }
                        assert!(opened.elapsed() < Duration::from_secs(30), "a slowloris connection was held for 30 s");
                    }
                    let held = opened.elapsed();
                    let mut tally = tally.lock().unwrap();
                    match answered {
                        0 if held >= HEADER_TIMEOUT - Duration::from_millis(500) => {
                            tally.cut += 1;
                            tally.longest = tally.longest.max(held);
                        }
                        0 => tally.dropped += 1,
                        status => *tally.answered.entry(status).or_default() += 1,
                    }
                    drop(tally);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    for s in slow {
        s.join().unwrap();
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    assert!(tally.cut > 0, "some slow clients got a slot and were cut off at header_timeout: {tally:?}");
    assert!(tally.longest < HEADER_TIMEOUT + Duration::from_secs(2), "a slow client held its connection for {:?}; header_timeout is {HEADER_TIMEOUT:?}", tally.longest);
    assert!(tally.answered.keys().all(|s| [429, 503].contains(s)), "refusals are 429 (this uid's share) or 503 (the listener's limit): {tally:?}");
    let (rss, fds) = sampler.peak_since(t);
    rows.push(Row {
        phase: "slowloris",
        attack: "200 clients × 12 s, headers then 1 byte / 200 ms, reconnecting".into(),
        outcome: format!(
            "{} cut off unanswered at header_timeout (longest held {:.1} s), refused at once {:?}, closed at once {}",
            tally.cut,
            tally.longest.as_secs_f64(),
            tally.answered,
            tally.dropped
        ),
        good: good_summary(&good.since(t)),
        peak_rss_mib: rss as f64 / 1024.0,
        peak_fds: fds,
    });

    // 2. 10,000 idle connections, opened as fast as the server accepts them and held 8 s.
    let t = Instant::now();
    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        match UnixStream::connect(&socket) {
            Ok(c) => idle.push(c),
            Err(e) => panic!("connection {} failed: {e}", idle.len()),
        }
    }
    let opened_in = t.elapsed();
    // Every connection has been open longer than header_timeout, with a margin.
    std::thread::sleep(Duration::from_secs(8).max(opened_in + HEADER_TIMEOUT + Duration::from_secs(2)).saturating_sub(opened_in));
    let (mut answered, mut closed, mut held) = (std::collections::BTreeMap::<u16, usize>::new(), 0usize, 0usize);
    for c in &mut idle {
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        match c.read(&mut buf) {
            Ok(0) => closed += 1,
            Ok(n) => *answered.entry(String::from_utf8_lossy(&buf[..n]).get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)).or_default() += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => held += 1,
            Err(_) => closed += 1,
        }
    }
    drop(idle);
    assert_eq!(held, 0, "idle connections still open past header_timeout ({HEADER_TIMEOUT:?}); answered {answered:?}, closed {closed}");
    assert!(answered.keys().all(|s| [429, 503].contains(s)), "refusals are 429 or 503: {answered:?}");
    let (rss, fds) = sampler.peak_since(t);
    rows.push(Row {
        phase: "10k idle connections",
        attack: format!("10,000 connections opened in {:.1} s, held ≥ 8 s, nothing sent", opened_in.as_secs_f64()),
        outcome: format!("answered {answered:?}, closed unanswered {closed}, still open {held}"),
        good: good_summary(&good.since(t)),
        peak_rss_mib: rss as f64 / 1024.0,
        peak_fds: fds,
    });

    // 3. 100 MB bodies: 4 clients announcing 100 MB and sending it, 4 sending it chunked.
    let t = Instant::now();
    let big: Vec<_> = (0..8)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = UnixStream::connect(&socket).unwrap();
                let chunked = i % 2 == 1;
                let head = if chunked {
                    "POST /v1/chat/completions HTTP/1.1\r\nhost: edgeflow\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_string()
                } else {
                    format!("POST /v1/chat/completions HTTP/1.1\r\nhost: edgeflow\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", 100 << 20)
                };
                c.write_all(head.as_bytes()).unwrap();
                c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                let piece = vec![b'['; 1 << 20];
                let mut sent = 0usize;
                for _ in 0..100 {
                    let ok = if chunked {
                        c.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).and_then(|()| c.write_all(&piece)).and_then(|()| c.write_all(b"\r\n"))
                    } else {
                        c.write_all(&piece)
                    };
                    if ok.is_err() {
                        break;
                    }
                    sent += piece.len();
                }
                let (status, answer) = answer_of(&mut c, Duration::from_secs(10));
                (status, error_code(&answer), sent)
            })
        })
        .collect();
    let big: Vec<(u16, String, usize)> = big.into_iter().map(|h| h.join().unwrap()).collect();
    for (status, code, sent) in &big {
        assert_eq!((*status, code.as_str()), (413, "payload_too_large"), "a 100 MB body is refused ({sent} bytes sent)");
    }
    let most_sent = big.iter().map(|b| b.2).max().unwrap_or(0);
    let (rss, fds) = sampler.peak_since(t);
    rows.push(Row {
        phase: "100 MB bodies",
        attack: "8 clients × 100 MB (4 with content-length, 4 chunked)".into(),
        outcome: format!("8/8 413 payload_too_large; at most {:.1} MiB written before the close", most_sent as f64 / 1048576.0),
        good: good_summary(&good.since(t)),
        peak_rss_mib: rss as f64 / 1024.0,
        peak_fds: fds,
    });

    // 4. Bodies that are hard to parse, within the 1 MiB limit.
    let t = Instant::now();
    let messages_30k: Vec<Value> = (0..30_000).map(|_| json!({"role": "user", "content": "x"})).collect();
    let nested_objects = format!("{}1{}", r#"{"a":"#.repeat(150_000), "}".repeat(150_000));
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("1,000,000 nested arrays", vec![b'['; 1_000_000], 400, "invalid_request"),
        ("150,000 nested objects", nested_objects.into_bytes(), 400, "invalid_request"),
        ("nested arrays in a message", format!(r#"{{"model":"m","messages":[{{"role":"user","content":{}}}]}}"#, "[".repeat(500_000)).into_bytes(), 400, "invalid_request"),
        ("30,000 messages", json!({"model": "m", "messages": messages_30k}).to_string().into_bytes(), 400, "context_length_exceeded|invalid_request"),
        (
            "a 900 KB prompt (past the 8,192-token context)",
            json!({"model": "m", "prompt": "lorem ipsum ".repeat(75_000), "max_tokens": 4}).to_string().into_bytes(),
            400,
            "context_length_exceeded",
        ),
        ("max_tokens 10^12", json!({"model": "m", "prompt": "Hi", "max_tokens": 1_000_000_000_000u64}).to_string().into_bytes(), 400, "invalid_request"),
        ("max_tokens -1", json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": -1}).to_string().into_bytes(), 400, "invalid_request"),
        ("invalid UTF-8", b"{\"model\":\"m\",\"prompt\":\"\xff\xfe\"}".to_vec(), 400, "invalid_request"),
        ("a prompt of 200 NULs", json!({"model": "m", "prompt": "\u{0}".repeat(200), "max_tokens": 2}).to_string().into_bytes(), 200, ""),
    ];
    let mut outcomes = Vec::new();
    for (what, body, want_status, want_code) in &cases {
        let path = if body.windows(9).any(|w| w == b"\"prompt\":") { "/v1/completions" } else { "/v1/chat/completions" };
        let asked = Instant::now();
        let (status, answer) = raw_post(&socket, path, body);
        let took = asked.elapsed();
        let code = error_code(&answer);
        assert!(status == *want_status && want_code.split('|').any(|c| c == code), "{what}: want {want_status} {want_code}, got {}", answer.chars().take(600).collect::<String>());
        // Seconds at most on a quiet machine; generous for a loaded CI one.
        assert!(took < Duration::from_secs(30), "{what} took {took:?} to answer");
        outcomes.push(format!("{what}: {status} {} in {} ms", if code.is_empty() { "ok" } else { &code }, took.as_millis()));
    }
    let (rss, fds) = sampler.peak_since(t);
    rows.push(Row {
        phase: "hostile bodies",
        attack: format!("{} bodies, one at a time", cases.len()),
        outcome: outcomes.join("; "),
        good: good_summary(&good.since(t)),
        peak_rss_mib: rss as f64 / 1024.0,
        peak_fds: fds,
    });

    // 5. A uid the allow-list does not name.
    let t = Instant::now();
    let mut refused = 0;
    for _ in 0..20 {
        let r: Http = curl(&socket, &["-H", "content-type: application/json", "--data-binary", r#"{"model":"m","prompt":"Hi","max_tokens":4}"#, "/v1/completions"], Some(STRANGER));
        assert_eq!((r.status, r.json()["error"]["code"].as_str()), (403, Some("permission_denied")), "{r:?}");
        refused += 1;
    }
    let (rss, fds) = sampler.peak_since(t);
    rows.push(Row {
        phase: "uid not allowed",
        attack: format!("20 requests from uid {}", STRANGER.0),
        outcome: format!("{refused}/20 403 permission_denied"),
        good: good_summary(&good.since(t)),
        peak_rss_mib: rss as f64 / 1024.0,
        peak_fds: fds,
    });

    // Quiet again: the good client alone for 5 s, then the footprint is compared.
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    good.stop();
    let (end_rss, end_fds) = common::footprint(pid);
    rows.push(Row { phase: "after", attack: "none".into(), outcome: "-".into(), good: good_summary(&good.since(t)), peak_rss_mib: end_rss as f64 / 1024.0, peak_fds: end_fds });

    eprintln!("\n| phase | attack | what the attacker got | the other user (uid {}) | server peak RSS (MiB) | server peak open files |\n|---|---|---|---|---:|---:|", GOOD.0);
    for r in &rows {
        eprintln!("| {} | {} | {} | {} | {:.0} | {} |", r.phase, r.attack, r.outcome, r.good, r.peak_rss_mib, r.peak_fds);
    }
    let all = good.since(started);
    let failures = good.failures.lock().unwrap().clone();
    assert!(failures.is_empty() && all.len() >= 20, "the other user was not served all along ({} requests): {failures:#?}", all.len());
    // Memory and files come back: at most 10% more resident memory than the baseline (the
    // allocator keeps some of what the attacks made it take), and the same open files.
    assert!(end_rss <= base_rss + base_rss / 10, "RSS grew from {base_rss} KiB to {end_rss} KiB");
    assert!(end_fds <= base_fds + 2, "open files: {base_fds} before, {end_fds} after");
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    drop(sampler);
}
