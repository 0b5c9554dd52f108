//! Security review, item 5: a rollback or a pin must not wait behind a running pull, and every
//! caller must be told what really happened. Against a real `mlflow server`, with the fault
//! proxy in `common::mlflow` slowing the weights to 1 MB/s, so that a pull of a version takes
//! about ten seconds and an operation that waited for it is plain to see.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::mlflow::{Action, Mlflow, Proxy};
use edgeflow::backoff::Jitter;
use edgeflow::cache::{State, Store};
use edgeflow::config::{Config, Target};
use edgeflow::fetch::Event as FetchEvent;
use edgeflow::pipeline::poller::{Control, Op};
use edgeflow::pipeline::pull::{PullEvent, PullObserver};
use edgeflow::pipeline::{Condition, Poller, Puller, Status};
use edgeflow::registry::{Auth, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The weights' download rate while a pull is meant to be slow: ~10 s for a 9.8 MB file.
const SLOW: u64 = 1_000_000;
/// How soon a rollback or a pin must be done when it interrupts a download (the rest of that
/// download alone takes more than 8 s at [`SLOW`]).
const PROMPTLY: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(90);

fn server() -> &'static Mlflow {
    static SERVER: OnceLock<Mlflow> = OnceLock::new();
    SERVER.get_or_init(|| Mlflow::start(&[]))
}

/// A puller on `url` with a fresh cache (the registry settings of tests/registry.rs).
fn puller(url: &str, cache: &Path) -> Puller {
    let text = "[registry]\nattempts = 4\nbackoff_initial = \"20ms\"\nbackoff_max = \"100ms\"\nread_timeout = \"20s\"\n";
    let c: Config = toml::from_str(text).unwrap();
    let reg = c.registry.resolve().unwrap();
    let mut settings = c.cache.resolve().unwrap();
    settings.dir = cache.to_path_buf();
    let store = Store::open(&settings).unwrap();
    Puller::new(Client::new(url, &reg, Auth::None).unwrap(), store, reg.parallel_downloads, reg.bandwidth_limit, common::load_options())
}

/// Where each download started (file, byte), as the fetch events say.
#[derive(Clone, Default)]
struct Starts(Arc<Mutex<Vec<(String, u64)>>>);

impl Starts {
    fn observer(&self) -> PullObserver {
        let starts = self.0.clone();
        Arc::new(move |e| {
            if let PullEvent::Fetch(FetchEvent::Started { name, resume_from, .. }) = e {
                starts.lock().unwrap().push((name.clone(), *resume_from));
            }
        })
    }

    fn of_weights(&self) -> Vec<u64> {
        self.0.lock().unwrap().iter().filter(|(n, _)| n.ends_with(".onnx.data")).map(|(_, at)| *at).collect()
    }
}

struct Running {
    control: Control,
    rx: watch::Receiver<Status>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(p: &Puller, name: &str, interval: Duration, starts: &Starts) -> Running {
        let jitter = Jitter { interval, jitter: 0.0, phase: 0.0 };
        let poller = Poller::new(p.clone(), name.into(), Target::Alias("champion".into()), jitter).with_observer(starts.observer());
        let control = poller.control();
        let cancel = CancellationToken::new();
        let (task, rx) = poller.spawn(cancel.clone());
        Running { control, rx, cancel, task }
    }

    async fn wait(&self, what: &str, f: impl FnMut(&Status) -> bool) -> Status {
        let mut rx = self.rx.clone();
        let Ok(Ok(reached)) = tokio::time::timeout(WAIT, rx.wait_for(f)).await else {
            panic!("poller never reached: {what}; last {:?}", self.rx.borrow());
        };
        reached.clone()
    }

    async fn active(&self, version: &str) -> Status {
        self.wait(&format!("version {version} active"), |s| s.active.as_ref().is_some_and(|a| a.version == version)).await
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("poller stops on cancel").unwrap();
    }
}

/// The partial download of the weights (`*.onnx.data`) in the cache's temp folder, and its
/// size: the `.part.json` beside each partial file names its URL.
fn weights_part(cache: &Path) -> Option<(PathBuf, u64)> {
    std::fs::read_dir(cache.join("tmp")).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let state = e.path();
        let part = state.to_str()?.strip_suffix(".json").map(PathBuf::from)?;
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).ok()?).ok()?;
        v["url"].as_str()?.contains(".onnx.data").then_some(())?;
        let len = std::fs::metadata(&part).ok()?.len();
        Some((part, len))
    })
}

/// Until at least `bytes` of the weights are on disk: the pull is well under way.
async fn downloading(cache: &Path, bytes: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some((_, n)) = weights_part(cache).filter(|(_, n)| *n >= bytes) {
            return n;
        }
        assert!(Instant::now() < deadline, "the weights' download never reached {bytes} bytes");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The `Range` headers of the weights' requests the proxy saw.
fn weight_ranges(proxy: &Proxy) -> Vec<Option<String>> {
    proxy.seen().into_iter().filter(|r| r.path.ends_with(".onnx.data")).map(|r| r.range).collect()
}

fn resumed_from(range: &Option<String>) -> u64 {
    range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.strip_suffix('-')).and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn tiny() -> PathBuf {
    common::fixture_model("phi3-tiny-gqa")
}

fn other() -> PathBuf {
    common::fixture_model("phi3-tiny-mha")
}

/// Version 1 serves; a sync starts pulling version 2 over a slow link; the operator pins
/// version 1. The pin is done at once instead of after the download, version 1 stays active,
/// the sync's caller hears that its pull was interrupted and by what, and the next pull of
/// version 2 resumes from the bytes already on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_interrupts_a_running_download_and_the_sync_is_told() {
    let s = server();
    let name = "preempt-pin";
    s.log_model(name, &tiny(), "pyfunc", None, Some("champion"));
    s.log_model(name, &other(), "pyfunc", None, None);
    let proxy = Proxy::start(&s.url).await;
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&proxy.url, cache.path());
    let starts = Starts::default();
    let poller = Running::start(&p, name, Duration::from_secs(3600), &starts);
    poller.active("1").await;

    proxy.clear();
    proxy.add(".onnx.data", Action::Throttle(SLOW), None);
    s.set_alias(name, "champion", "2").await;
    let control = poller.control.clone();
    let sync = tokio::spawn(async move { control.call(Op::Sync).await });
    let before = downloading(cache.path(), 1_000_000).await;

    let asked = Instant::now();
    let pinned = poller.control.call(Op::Pin("1".into())).await.unwrap_or_else(|e| panic!("the pin failed: {e}"));
    let took = asked.elapsed();
    assert!(took < PROMPTLY, "the pin took {took:?}: it waited for the download instead of interrupting it");
    assert_eq!(pinned.active.as_ref().map(|a| a.version.as_str()), Some("1"), "{pinned:?}");
    assert_eq!(pinned.pinned.as_deref(), Some("1"));
    let answer = tokio::time::timeout(PROMPTLY, sync).await.expect("the sync is answered once its pull stopped").unwrap();
    let e = answer.expect_err("an interrupted sync does not report success");
    assert!(e.contains("interrupted by a pin to version 1") && e.contains("resume"), "{e}");
    assert_eq!(p.store().active(name).unwrap().unwrap().0.version, "1");
    assert!(p.store().version(name, "2").unwrap().is_none(), "nothing of version 2 was committed");
    let (_, kept) = weights_part(cache.path()).expect("the partial download is kept");
    assert!(kept >= before, "kept {kept} of the {before} bytes seen");
    assert_eq!(weight_ranges(&proxy), vec![None], "one download of the weights, interrupted");

    // Following the alias again, version 2 comes, from where its download stopped.
    proxy.clear();
    let st = poller.control.call(Op::Unpin).await.unwrap_or_else(|e| panic!("the unpin failed: {e}"));
    assert!(matches!(&st.condition, Condition::Updated { from: Some(f), to } if f == "1" && to == "2"), "{st:?}");
    let ranges = weight_ranges(&proxy);
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    assert!(resumed_from(&ranges[0]) >= before, "resumed from {:?}, with {before} bytes on disk", ranges[0]);
    assert_eq!(starts.of_weights().last().copied(), Some(resumed_from(&ranges[0])));
    assert_eq!(p.store().version(name, "2").unwrap().unwrap().state, State::Good);
    poller.stop().await;
}

/// Version 2 serves (1 before it); a scheduled poll is pulling version 3 over a slow link and
/// a sync joins it; the operator rolls back. The rollback is done at once, to version 1, with
/// version 2 marked bad; the sync's caller hears that the poll it joined was interrupted by
/// the rollback; the next scheduled poll takes version 3, resuming its download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_interrupts_a_scheduled_pull_and_a_sync_that_joined_it_is_told() {
    let s = server();
    let name = "preempt-rollback";
    s.log_model(name, &tiny(), "pyfunc", None, Some("champion"));
    s.log_model(name, &other(), "pyfunc", None, None);
    s.log_model(name, &common::fixture_model("phi3-tiny-gqa-acc1"), "pyfunc", None, None);
    let proxy = Proxy::start(&s.url).await;
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&proxy.url, cache.path());
    let starts = Starts::default();
    let poller = Running::start(&p, name, Duration::from_secs(1), &starts);
    poller.active("1").await;
    s.set_alias(name, "champion", "2").await;
    poller.active("2").await;

    proxy.clear();
    proxy.add(".onnx.data", Action::Throttle(SLOW), None);
    s.set_alias(name, "champion", "3").await;
    let before = downloading(cache.path(), 1_000_000).await;
    let control = poller.control.clone();
    let sync = tokio::spawn(async move { control.call(Op::Sync).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let asked = Instant::now();
    let st = poller.control.call(Op::Rollback { reason: "test rollback".into() }).await.unwrap_or_else(|e| panic!("the rollback failed: {e}"));
    let took = asked.elapsed();
    assert!(took < PROMPTLY, "the rollback took {took:?}: it waited for the download instead of interrupting it");
    assert!(matches!(&st.condition, Condition::RolledBack { from, to, .. } if from == "2" && to == "1"), "{st:?}");
    assert_eq!(p.store().active(name).unwrap().unwrap().0.version, "1");
    assert!(matches!(p.store().version(name, "2").unwrap().unwrap().state, State::Bad { .. }));
    let answer = tokio::time::timeout(PROMPTLY, sync).await.expect("the sync is answered").unwrap();
    let e = answer.expect_err("the poll the sync joined was interrupted");
    assert!(e.contains("interrupted by a rollback (test rollback)"), "{e}");
    assert_eq!(weight_ranges(&proxy), vec![None], "the sync joined the running poll instead of starting a pull of its own");

    // The schedule goes on: version 3 (never refused) comes, its download resumed.
    proxy.clear();
    poller.active("3").await;
    let ranges = weight_ranges(&proxy);
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    assert!(resumed_from(&ranges[0]) >= before, "resumed from {:?}, with {before} bytes on disk", ranges[0]);
    poller.stop().await;
}

/// A caller that stopped waiting for its operation (a command that timed out) is not served
/// late: the queued unpin is dropped, not run after the pin it waited behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_whose_caller_gave_up_is_not_run_later() {
    let s = server();
    let name = "preempt-gave-up";
    s.log_model(name, &tiny(), "pyfunc", None, Some("champion"));
    s.log_model(name, &other(), "pyfunc", None, None);
    let proxy = Proxy::start(&s.url).await;
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&proxy.url, cache.path());
    let poller = Running::start(&p, name, Duration::from_secs(3600), &Starts::default());
    poller.active("1").await;

    proxy.clear();
    proxy.add(".onnx.data", Action::Throttle(SLOW), None);
    let control = poller.control.clone();
    let pin = tokio::spawn(async move { control.call(Op::Pin("2".into())).await });
    downloading(cache.path(), 500_000).await;
    let gave_up = tokio::time::timeout(Duration::from_millis(300), poller.control.call(Op::Unpin)).await;
    assert!(gave_up.is_err(), "the unpin waits behind the pin's download: {gave_up:?}");

    let st = tokio::time::timeout(WAIT, pin).await.expect("the pin finishes").unwrap().unwrap_or_else(|e| panic!("the pin failed: {e}"));
    assert_eq!(st.active.as_ref().map(|a| a.version.as_str()), Some("2"));
    // Anything still queued runs before this sync.
    poller.control.call(Op::Sync).await.unwrap_or_else(|e| panic!("the sync failed: {e}"));
    assert_eq!(p.store().model(name).unwrap().unwrap().pinned.as_deref(), Some("2"), "the abandoned unpin did not run");
    assert_eq!(p.store().active(name).unwrap().unwrap().0.version, "2");
    assert_eq!(poller.rx.borrow().pinned.as_deref(), Some("2"));
    poller.stop().await;
}

/// A caller with a deadline hears the truth when it is up: an operation that started "is
/// still running" (and the status shows how it ended), one that had not started was
/// withdrawn and never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_out_of_time_is_told_whether_its_operation_still_runs() {
    let s = server();
    let name = "preempt-deadline";
    s.log_model(name, &tiny(), "pyfunc", None, Some("champion"));
    s.log_model(name, &other(), "pyfunc", None, None);
    let proxy = Proxy::start(&s.url).await;
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&proxy.url, cache.path());
    let poller = Running::start(&p, name, Duration::from_secs(3600), &Starts::default());
    poller.active("1").await;

    proxy.clear();
    proxy.add(".onnx.data", Action::Throttle(SLOW), None);
    let e = poller.control.call_within(Op::Pin("2".into()), Duration::from_secs(2)).await.expect_err("the pin takes longer than 2 s");
    assert_eq!(e, "a pin to version 2 is still running after 2s; the status report will show its outcome");
    let e = poller.control.call_within(Op::Unpin, Duration::from_millis(300)).await.expect_err("the unpin waits behind the pin");
    assert_eq!(e, "an unpin had not started after 300ms because the registry poller was busy with earlier work; it was withdrawn and will not run");

    let st = poller.active("2").await;
    assert_eq!(st.pinned.as_deref(), Some("2"), "the pin its caller stopped waiting for finished: {st:?}");
    poller.control.call(Op::Sync).await.unwrap_or_else(|e| panic!("the sync failed: {e}"));
    assert_eq!(p.store().model(name).unwrap().unwrap().pinned.as_deref(), Some("2"), "the withdrawn unpin did not run");
    poller.stop().await;
}
