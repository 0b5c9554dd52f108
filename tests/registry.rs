//! Registry pull and model cache against a real `mlflow server` (one per test binary; each
//! test has its own registered model names and cache folder). Faults a real server cannot
//! produce on demand go through the loopback fault proxy in `common::mlflow`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::mlflow::{digests, Action, Mlflow, Proxy};
use common::{edgeflow, free_port};
use edgeflow::cache::{State, Store};
use edgeflow::config::{Config, RegistrySettings, Target};
use edgeflow::fetch::Progress;
use edgeflow::pipeline::poller::Op;
use edgeflow::pipeline::pull::{Change, PullObserver};
use edgeflow::pipeline::{Condition, Poller, PullError, Puller};
use edgeflow::registry::{Auth, Client, RegistryError};
use tokio_util::sync::CancellationToken;

fn server() -> &'static Mlflow {
    static SERVER: OnceLock<Mlflow> = OnceLock::new();
    SERVER.get_or_init(|| Mlflow::start(&[]))
}

fn tiny() -> PathBuf {
    common::fixture_model("phi3-tiny-gqa")
}

/// A different model (multi-head attention), for "a newer version".
fn other() -> PathBuf {
    common::fixture_model("phi3-tiny-mha")
}

fn settings(extra: &str) -> (RegistrySettings, edgeflow::config::CacheSettings) {
    let text = format!("[registry]\nattempts = 4\nbackoff_initial = \"20ms\"\nbackoff_max = \"100ms\"\nread_timeout = \"20s\"\n{extra}");
    let c: Config = toml::from_str(&text).unwrap();
    let mut cache = c.cache.resolve().unwrap();
    cache.dir = PathBuf::new();
    (c.registry.resolve().unwrap(), cache)
}

fn puller_with(url: &str, cache: &Path, auth: Auth, extra: &str) -> Puller {
    let (reg, mut c) = settings(extra);
    c.dir = cache.to_path_buf();
    let store = Store::open(&c).unwrap();
    let client = Client::new(url, &reg, auth).unwrap();
    Puller::new(client, store, reg.parallel_downloads, reg.bandwidth_limit, common::load_options())
}

fn puller(url: &str, cache: &Path) -> Puller {
    puller_with(url, cache, Auth::None, "")
}

fn quiet() -> PullObserver {
    Arc::new(|_| {})
}

fn progress() -> Arc<Progress> {
    Arc::new(Progress::default())
}

fn alias(a: &str) -> Target {
    Target::Alias(a.into())
}

fn stage(s: &str) -> Target {
    Target::Stage(s.into())
}

/// Greedy ids of a few tokens from a model folder.
fn greedy_ids(dir: &Path) -> Vec<u32> {
    let mut m = edgeflow::engine::Model::load(dir, &common::load_options()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let ids = m.encode("<|user|>\nHello<|end|>\n<|assistant|>\n").unwrap();
    let params = edgeflow::engine::GenerateParams { max_new_tokens: 8, ignore_eos: true, ..Default::default() };
    m.generate(&ids, &params, &std::sync::atomic::AtomicBool::new(false), |_| std::ops::ControlFlow::Continue(())).unwrap().token_ids
}

/// (name, folder, flavor, stage, alias)
type Spec<'a> = (&'a str, &'a Path, &'a str, Option<&'a str>, Option<&'a str>);

/// Logs several models at once (each python start costs seconds).
fn log_all(specs: &[Spec]) -> Vec<common::mlflow::Logged> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = specs.iter().map(|(n, d, f, s, a)| scope.spawn(move || server().log_model(n, d, f, *s, *a))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_nothing_active(p: &Puller, model: &str) {
    assert!(p.store().active(model).unwrap().is_none(), "{model} must not be active");
    assert!(edgeflow::cache::active_dir(p.store().root(), model).is_none());
    assert!(p.store().versions(Some(model)).unwrap().iter().all(|r| r.dir.is_empty() || matches!(r.state, State::Bad { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_pull_in_stage_and_alias_mode_for_both_flavors() {
    let s = server();
    let (tiny, fixture) = (tiny(), digests(&tiny()));
    log_all(&[
        ("first-stage-pyfunc", &tiny, "pyfunc", Some("Production"), None),
        ("first-alias-pyfunc", &tiny, "pyfunc", None, Some("champion")),
        ("first-stage-onnx", &tiny, "onnx", Some("Production"), None),
        ("first-alias-onnx", &tiny, "onnx", None, Some("champion")),
    ]);
    let expected = greedy_ids(&tiny);
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&s.url, cache.path());
    for (model, target, flavor) in [
        ("first-stage-pyfunc", stage("Production"), "python_function"),
        ("first-alias-pyfunc", alias("champion"), "python_function"),
        ("first-stage-onnx", stage("Production"), "onnx"),
        ("first-alias-onnx", alias("champion"), "onnx"),
    ] {
        let o = p.pull(model, &target, quiet(), progress(), false).await.unwrap_or_else(|e| panic!("{model}: {}", edgeflow::util::chain(&e)));
        assert_eq!(o.version, "1");
        assert_eq!(o.change, Change::Activated { previous: None, downloaded: true }, "{model}");
        let got = digests(&o.dir);
        if flavor == "python_function" {
            // The wrapper carries the folder as is: the same files, byte for byte.
            assert_eq!(got, fixture, "{model}");
        } else {
            // The onnx flavor re-saves the graph (weights in a data file of a generated name);
            // the tokenizer and config come back unchanged, the graph under its decoder name.
            for f in ["genai_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
                assert_eq!(got.get(f), fixture.get(f), "{model}: {f}");
            }
            assert!(got.contains_key("phi3-mini-4k-instruct-cpu-int4-rtn-block-32-acc-level-4.onnx"), "{model}: {got:?}");
            assert!(got.keys().any(|k| k.ends_with(".data")), "{model}: {got:?}");
            assert!(!got.contains_key("MLmodel") && !got.contains_key("conda.yaml"));
        }
        let rec = p.store().version(model, "1").unwrap().unwrap();
        assert_eq!(rec.flavor, flavor);
        assert_eq!(rec.state, State::Good);
        // What the engine generates from the pulled folder is what it generates from the fixture.
        assert_eq!(greedy_ids(&o.dir), expected, "{model}");
        assert_eq!(edgeflow::cache::active_dir(cache.path(), model).unwrap(), o.dir.canonicalize().unwrap());
        // A second pull verifies and changes nothing.
        let again = p.pull(model, &target, quiet(), progress(), false).await.unwrap();
        assert_eq!(again.change, Change::Unchanged);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_version_is_pulled_and_activated_and_moving_the_alias_back_rolls_back() {
    let s = server();
    let name = "promote";
    let v = log_all(&[(name, &tiny(), "pyfunc", Some("Production"), Some("champion"))]);
    assert_eq!(v[0].version, "1");
    let v2 = s.log_model(name, &other(), "pyfunc", None, None);
    assert_eq!(v2.version, "2");
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&s.url, cache.path());
    let o = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap();
    assert_eq!(o.version, "1");

    s.set_alias(name, "champion", "2").await;
    let o = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap();
    assert_eq!((o.version.as_str(), o.change.clone()), ("2", Change::Activated { previous: Some("1".into()), downloaded: true }));
    assert_eq!(digests(&o.dir), digests(&other()));
    assert_eq!(greedy_ids(&o.dir), greedy_ids(&other()));

    // Alias moved back: version 1 comes from the cache, verified, without a download.
    s.set_alias(name, "champion", "1").await;
    let prog = progress();
    let o = p.pull(name, &alias("champion"), quiet(), prog.clone(), false).await.unwrap();
    assert_eq!((o.version.as_str(), o.change.clone()), ("1", Change::Activated { previous: Some("2".into()), downloaded: false }));
    assert_eq!(prog.total.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing downloaded");
    assert_eq!(digests(&o.dir), digests(&tiny()));
    assert_eq!(p.store().last_known_good(name).unwrap().unwrap().version, "2");

    // Stage mode: version 2 promoted to Production is the newest there.
    s.transition(name, "2", "Production").await;
    let o = p.pull(name, &stage("Production"), quiet(), progress(), false).await.unwrap();
    assert_eq!(o.version, "2");
    assert_eq!(p.store().active(name).unwrap().unwrap().0.version, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poller_follows_the_stage_and_keeps_serving_when_it_empties_or_the_model_is_deleted() {
    let s = server();
    let name = "poller";
    log_all(&[(name, &tiny(), "onnx", Some("Production"), None)]);
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&s.url, cache.path());
    let jitter = edgeflow::backoff::Jitter { interval: Duration::from_millis(300), jitter: 0.2, phase: 0.5 };
    let cancel = CancellationToken::new();
    let (task, mut rx) = Poller::new(p.clone(), name.into(), stage("Production"), jitter).spawn(cancel.clone());
    let wait = |rx: &mut tokio::sync::watch::Receiver<edgeflow::pipeline::Status>, what: &'static str, f: fn(&edgeflow::pipeline::Status) -> bool| {
        let mut rx = rx.clone();
        async move { tokio::time::timeout(Duration::from_secs(60), rx.wait_for(f)).await.unwrap_or_else(|_| panic!("poller never reached: {what}")).unwrap().clone() }
    };
    let st = wait(&mut rx, "version 1 active", |s| s.active.as_ref().is_some_and(|a| a.version == "1")).await;
    assert!(matches!(st.condition, Condition::Updated { ref to, .. } if to == "1"), "{st:?}");

    s.log_model(name, &other(), "onnx", None, None);
    s.transition(name, "2", "Production").await;
    let st = wait(&mut rx, "version 2 active", |s| s.active.as_ref().is_some_and(|a| a.version == "2")).await;
    assert!(matches!(st.condition, Condition::Updated { from: Some(ref f), ref to } if f == "1" && to == "2"), "{st:?}");

    // The stage empties: keep serving version 2 and say so.
    s.transition(name, "1", "Archived").await;
    s.transition(name, "2", "Archived").await;
    let st = wait(&mut rx, "stage emptied", |s| matches!(s.condition, Condition::TargetGone { .. })).await;
    assert_eq!(st.active.as_ref().unwrap().version, "2");
    assert!(matches!(&st.condition, Condition::TargetGone { detail } if detail.contains("stage `Production` holds no version")), "{st:?}");

    // The model is deleted: still serving version 2.
    s.delete_model(name).await;
    let st = wait(&mut rx, "model deleted", |s| s.condition == Condition::ModelDeleted).await;
    let active = st.active.unwrap();
    assert_eq!(active.version, "2");
    assert!(active.dir.join("genai_config.json").is_file());
    assert_eq!(p.store().active(name).unwrap().unwrap().0.version, "2");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("poller stops on cancel").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_fails_its_smoke_test_is_marked_bad_and_the_old_one_keeps_serving() {
    let s = server();
    let name = "smoke";
    // Version 2's weights are all NaN: it loads, then its logits are not finite.
    let broken = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(tiny()).unwrap() {
        let e = e.unwrap();
        let to = broken.path().join(e.file_name());
        if e.file_name().to_string_lossy().ends_with(".onnx.data") {
            std::fs::write(&to, vec![0xFFu8; e.metadata().unwrap().len() as usize]).unwrap();
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
    log_all(&[(name, &tiny(), "pyfunc", None, Some("champion"))]);
    s.log_model(name, broken.path(), "pyfunc", None, None);
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&s.url, cache.path());
    let v1 = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap();
    s.set_alias(name, "champion", "2").await;
    let err = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap_err();
    let PullError::Rejected { version, reason, .. } = &err else { panic!("{}", edgeflow::util::chain(&err)) };
    assert_eq!(version, "2");
    assert!(reason.contains("non-finite logits"), "{reason}");
    let (active, dir) = p.store().active(name).unwrap().unwrap();
    assert_eq!(active.version, "1");
    assert_eq!(dir, v1.dir);
    assert_eq!(edgeflow::cache::active_dir(cache.path(), name).unwrap(), v1.dir.canonicalize().unwrap());
    let rec = p.store().version(name, "2").unwrap().unwrap();
    assert!(matches!(rec.state, State::Bad { .. }) && rec.dir.is_empty(), "{rec:?}");
    // The poller does not fetch a refused version again.
    let err = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap_err();
    assert!(err.to_string().contains("refused earlier"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_from_the_byte_it_reached() {
    let s = server();
    let name = "resume";
    log_all(&[(name, &tiny(), "pyfunc", None, Some("champion"))]);
    let proxy = Proxy::start(&s.url).await;
    const CUT: u64 = 3_000_000;
    proxy.add(".onnx.data", Action::CutAfter(CUT), Some(1));
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&proxy.url, cache.path());
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ev = events.clone();
    let observer: PullObserver = Arc::new(move |e| ev.lock().unwrap().push(format!("{e:?}")));
    let o = p.pull(name, &alias("champion"), observer, progress(), false).await.unwrap();
    assert_eq!(digests(&o.dir), digests(&tiny()));
    let ranges: Vec<Option<String>> = proxy.seen().into_iter().filter(|r| r.path.ends_with(".onnx.data")).map(|r| r.range).collect();
    assert_eq!(ranges, vec![None, Some(format!("bytes={CUT}-"))]);
    assert!(events.lock().unwrap().iter().any(|e| e.contains("Retrying") && e.contains(&format!("at: {CUT}"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pull_resumes_after_restart_from_what_is_on_disk() {
    let s = server();
    let name = "restart";
    log_all(&[(name, &tiny(), "pyfunc", None, Some("champion"))]);
    let proxy = Proxy::start(&s.url).await;
    let cache = tempfile::tempdir().unwrap();
    let slow = cache.path().join("slow.toml");
    std::fs::write(&slow, "[registry]\nbandwidth_limit = \"1MiB/s\"\nparallel_downloads = 1\n").unwrap();
    let args = |cfg: Option<&Path>| {
        let mut c = edgeflow();
        if let Some(cfg) = cfg {
            c.arg("pull").args(["--config", cfg.to_str().unwrap()]);
        } else {
            c.arg("pull");
        }
        c.args(["--registry-url", &proxy.url, "--model", name, "--alias", "champion", "--cache-dir", cache.path().to_str().unwrap()]);
        c
    };
    let mut child = args(Some(&slow)).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    // Wait until a good part of the weights is on disk, then kill the process outright.
    let part_of_data = || -> Option<(PathBuf, u64)> {
        std::fs::read_dir(cache.path().join("tmp"))
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
            .filter(|(p, _)| p.extension().is_some_and(|x| x == "part"))
            .max_by_key(|(_, n)| *n)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while part_of_data().is_none_or(|(_, n)| n < 2_500_000) {
        assert!(std::time::Instant::now() < deadline, "the slow pull never wrote 2.5 MB");
        assert!(child.try_wait().unwrap().is_none(), "the slow pull ended early");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (_, on_disk) = part_of_data().unwrap();
    assert!(on_disk < 9_831_168, "killed before the end");
    assert!(edgeflow::cache::active_dir(cache.path(), name).is_none(), "nothing active after a killed pull");
    proxy.clear();

    let out = args(None).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resuming phi3-mini-4k-instruct-cpu-int4-rtn-block-32-acc-level-4.onnx.data at"), "{stderr}");
    let ranges: Vec<Option<String>> = proxy.seen().into_iter().filter(|r| r.path.ends_with(".onnx.data")).map(|r| r.range).collect();
    assert_eq!(ranges, vec![Some(format!("bytes={on_disk}-"))], "resumed from the bytes on disk, not from 0");
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(digests(&dir), digests(&tiny()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_the_cache_is_detected_and_repaired() {
    let s = server();
    let name = "repair";
    log_all(&[(name, &tiny(), "onnx", None, Some("champion"))]);
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&s.url, cache.path());
    let o = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap();
    let good = digests(&o.dir);
    let data = good.keys().find(|k| k.ends_with(".data")).unwrap().clone();
    let flip = |dir: &Path| {
        let f = dir.join(&data);
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[1234] ^= 0x40;
        std::fs::write(&f, bytes).unwrap();
    };
    flip(&o.dir);
    let rec = p.store().version(name, "1").unwrap().unwrap();
    let bad = p.store().verify(&rec).unwrap();
    assert_eq!(bad.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(), vec![data.as_str()]);

    // `edgeflow cache verify` reports it (the index is free: this process does not hold it).
    drop(p);
    let out = edgeflow().args(["cache", "verify", "--cache-dir", cache.path().to_str().unwrap(), "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["versions"][0]["damaged"][0]["path"], data.as_str());

    // The next pull fetches that file again and activates a rebuilt folder.
    let p = puller(&s.url, cache.path());
    let o = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap();
    assert_eq!(o.change, Change::Repaired { files: vec![data.clone()] });
    assert_eq!(digests(&o.dir), good);

    // At start (load), damage is found and repaired too.
    flip(&o.dir);
    drop(p);
    let p = puller(&s.url, cache.path());
    let o = p.load_active(name, quiet()).await.unwrap().unwrap();
    assert_eq!(o.change, Change::Repaired { files: vec![data.clone()] });
    assert_eq!(digests(&o.dir), good);
    let rec = p.store().version(name, "1").unwrap().unwrap();
    assert!(p.store().verify(&rec).unwrap().is_empty());
}

/// Security review, item 3: a blob already in the store under a file's digest was kept and
/// the freshly downloaded, verified bytes thrown away, so a rotted (or planted) blob went into
/// the new version. The fresh bytes win, and the folder is verified before its smoke test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_blob_already_in_the_store_does_not_poison_a_new_version() {
    let s = server();
    let name = "poison";
    log_all(&[(name, &tiny(), "onnx", None, Some("champion"))]);
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&s.url, cache.path());
    let tokenizer = common::mlflow::sha256_file(&tiny().join("tokenizer.json"));
    let planted = p.store().blob_path(&tokenizer);
    std::fs::write(&planted, b"{ not the tokenizer: rotted or planted bytes }").unwrap();

    let o = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap_or_else(|e| panic!("{}", edgeflow::util::chain(&e)));
    let got = digests(&o.dir);
    assert_eq!(got.get("tokenizer.json"), Some(&tokenizer), "the new version's tokenizer.json is the registry's file: {got:#?}");
    assert_eq!(common::mlflow::sha256_file(&planted), tokenizer, "the blob itself now holds the verified bytes");
    let rec = p.store().version(name, &o.version).unwrap().unwrap();
    assert!(p.store().verify(&rec).unwrap().is_empty());
}

/// Security review, item 18: `pin` installed a version without checking the registry had
/// finished registering it. A version still PENDING_REGISTRATION (or FAILED_REGISTRATION) is
/// refused, by the pin and by an install asked for it directly, and the active one keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_is_not_ready_is_neither_pinned_nor_installed() {
    let s = server();
    let name = "pin-ready";
    log_all(&[(name, &tiny(), "onnx", Some("Production"), None)]);
    s.log_model(name, &other(), "onnx", None, None);
    s.set_status(name, "2", "PENDING_REGISTRATION");
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&s.url, cache.path());
    let jitter = edgeflow::backoff::Jitter { interval: Duration::from_secs(3600), jitter: 0.0, phase: 0.0 };
    let cancel = CancellationToken::new();
    let poller = Poller::new(p.clone(), name.into(), stage("Production"), jitter);
    let control = poller.control();
    let (task, mut rx) = poller.spawn(cancel.clone());
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|s| s.active.as_ref().is_some_and(|a| a.version == "1"))).await.expect("version 1 active").unwrap();

    let err = control.call(Op::Pin("2".into())).await.expect_err("a pending version is not pinned");
    assert!(err.contains("PENDING_REGISTRATION") && err.contains("not READY"), "{err}");
    assert_eq!(p.store().model(name).unwrap().unwrap().pinned, None, "no pin was recorded");
    assert_eq!(p.store().active(name).unwrap().unwrap().0.version, "1");

    let mv = p.client().model_version(name, "2").await.unwrap();
    let e = p.install(&mv, quiet(), progress(), true).await.expect_err("not installed");
    assert!(matches!(&e, PullError::Registry { source: RegistryError::NotReady { status, .. }, .. } if status == "PENDING_REGISTRATION"), "{}", edgeflow::util::chain(&e));
    assert!(p.store().version(name, "2").unwrap().is_none(), "nothing of version 2 was downloaded");

    // Once READY it pins and serves.
    s.set_status(name, "2", "READY");
    control.call(Op::Pin("2".into())).await.expect("a ready version pins");
    assert_eq!(p.store().active(name).unwrap().unwrap().0.version, "2");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("poller stops").unwrap();
}

/// Security review, item 2: every poll used to re-hash the whole active version (minutes of
/// I/O per poll for a multi-GB model on an SD card). Now a routine poll reads no model bytes,
/// and a file changed on disk since the last full verification is still caught and repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routine_polls_do_not_rehash_the_active_version_but_a_changed_file_is_caught() {
    let s = server();
    let name = "poll-cost";
    log_all(&[(name, &tiny(), "onnx", None, Some("champion"))]);
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&s.url, cache.path());
    let o = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap();
    let good = digests(&o.dir);
    let installed = p.full_verifications();
    for _ in 0..5 {
        let again = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap();
        assert_eq!(again.change, Change::Unchanged);
    }
    assert_eq!(p.full_verifications(), installed, "five unchanged polls hashed nothing");

    // One byte flipped in place, with the file's mtime set back: the inode's ctime still moves.
    let data = good.keys().find(|k| k.ends_with(".data")).unwrap().clone();
    let f = o.dir.join(&data);
    let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[999] ^= 0x01;
    std::fs::write(&f, bytes).unwrap();
    std::fs::File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
    let o = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap();
    assert_eq!(o.change, Change::Repaired { files: vec![data.clone()] });
    assert_eq!(digests(&o.dir), good);
    assert_eq!(p.full_verifications(), installed + 1, "the changed file made the poll verify in full");

    // A restarted agent hashes the active version once at load, then polls cheaply again.
    drop(p);
    let p = puller(&s.url, cache.path());
    assert_eq!(p.load_active(name, quiet()).await.unwrap().unwrap().change, Change::Unchanged);
    assert_eq!(p.full_verifications(), 1);
    for _ in 0..3 {
        assert_eq!(p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap().change, Change::Unchanged);
    }
    assert_eq!(p.full_verifications(), 1, "polls after a verified load hash nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_registry_down_at_start_the_cache_serves() {
    let s = server();
    let name = "offline";
    log_all(&[(name, &tiny(), "pyfunc", None, Some("champion"))]);
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&s.url, cache.path());
    let pulled = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap();
    drop(p);

    let down = format!("http://127.0.0.1:{}", free_port());
    let p = puller(&down, cache.path());
    let o = p.load_active(name, quiet()).await.unwrap().expect("served from cache");
    assert_eq!((o.version.as_str(), &o.change), ("1", &Change::Unchanged));
    assert_eq!(o.dir, pulled.dir);
    let jitter = edgeflow::backoff::Jitter { interval: Duration::from_millis(200), jitter: 0.0, phase: 0.0 };
    let cancel = CancellationToken::new();
    let (_task, rx) = Poller::new(p.clone(), name.into(), alias("champion"), jitter).spawn(cancel.clone());
    let mut rx2 = rx.clone();
    let st =
        tokio::time::timeout(Duration::from_secs(30), rx2.wait_for(|s| matches!(s.condition, Condition::Unreachable { .. }))).await.expect("reports unreachable").unwrap().clone();
    assert_eq!(st.active.unwrap().version, "1");
    cancel.cancel();
    drop(p);
    // The engine runs from what the cache holds.
    let ids = greedy_ids(&o.dir);
    assert_eq!(ids, greedy_ids(&tiny()));
    // The CLI too: the pull fails clearly, `cache path` still answers.
    let dir = cache.path().to_str().unwrap();
    let out = edgeflow().args(["pull", "--registry-url", &down, "--model", name, "--alias", "champion", "--cache-dir", dir]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("looking up alias `champion` of model `{name}`")), "{}", String::from_utf8_lossy(&out.stderr));
    let out = edgeflow().args(["cache", "path", "--cache-dir", dir, "--model", name]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()), pulled.dir.canonicalize().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_bad_models_fail_clearly_and_activate_nothing() {
    let s = server();
    log_all(&[
        ("errs", &tiny(), "pyfunc", Some("Staging"), None),
        ("errs-pending", &tiny(), "pyfunc", None, Some("champion")),
        ("errs-transformers", &tiny(), "transformers", None, Some("champion")),
        ("errs-traversal", &tiny(), "traversal", None, Some("champion")),
        ("errs-listing", &tiny(), "pyfunc", None, Some("champion")),
    ]);
    s.set_status("errs-pending", "1", "PENDING_REGISTRATION");
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&s.url, cache.path());
    let chain = |e: &PullError| edgeflow::util::chain(e);

    let e = p.pull("no-such-model", &alias("champion"), quiet(), progress(), false).await.unwrap_err();
    assert!(e.is_model_deleted() && chain(&e).contains("registered model `no-such-model` does not exist"), "{}", chain(&e));
    let e = p.pull("no-such-model", &stage("Production"), quiet(), progress(), false).await.unwrap_err();
    assert!(e.is_model_deleted(), "{}", chain(&e));
    let e = p.pull("errs", &alias("nope"), quiet(), progress(), false).await.unwrap_err();
    assert!(matches!(e, PullError::NothingToFollow { .. }) && e.to_string().contains("alias `nope` does not exist"), "{}", chain(&e));
    let e = p.pull("errs", &stage("Production"), quiet(), progress(), false).await.unwrap_err();
    assert!(e.to_string().contains("stage `Production` holds no version"), "{}", chain(&e));
    let e = p.pull("errs-pending", &alias("champion"), quiet(), progress(), false).await.unwrap_err();
    assert!(matches!(&e, PullError::Registry { source: RegistryError::NotReady { status, .. }, .. } if status == "PENDING_REGISTRATION"), "{}", chain(&e));
    let e = p.pull("errs-transformers", &alias("champion"), quiet(), progress(), false).await.unwrap_err();
    assert!(matches!(&e, PullError::Registry { source: RegistryError::UnsupportedFlavor { .. }, .. }), "{}", chain(&e));
    assert!(chain(&e).contains("has flavors [transformers]"), "{}", chain(&e));
    let e = p.pull("errs-traversal", &alias("champion"), quiet(), progress(), false).await.unwrap_err();
    assert!(matches!(&e, PullError::Registry { source: RegistryError::UnsafePath { path }, .. } if path == "../../../etc"), "{}", chain(&e));

    // Faults only a proxy can produce.
    let proxy = Proxy::start(&s.url).await;
    let cache2 = tempfile::tempdir().unwrap();
    let pp = puller(&proxy.url, cache2.path());
    proxy.add("mlflow-artifacts/artifacts?path=", Action::InjectListing("../evil".into()), None);
    let e = pp.pull("errs-listing", &alias("champion"), quiet(), progress(), false).await.unwrap_err();
    assert!(matches!(&e, PullError::Registry { source: RegistryError::UnsafePath { path }, .. } if path == "../evil"), "{}", chain(&e));
    proxy.clear();
    // Security review, item 17: names with newlines or other control characters would forge
    // log lines and land in file names; they are refused like a traversal.
    for hostile in ["tokenizer.json\nversion active", "model\u{1b}[2J.onnx", "a\rb"] {
        proxy.add("mlflow-artifacts/artifacts?path=", Action::InjectListing(hostile.into()), None);
        let e = pp.pull("errs-listing", &alias("champion"), quiet(), progress(), false).await.unwrap_err();
        assert!(matches!(&e, PullError::Registry { source: RegistryError::UnsafePath { path }, .. } if path.ends_with(hostile)), "{hostile:?}: {}", chain(&e));
        assert!(!chain(&e).contains(['\n', '\r', '\u{1b}']), "the error shows the name escaped: {:?}", chain(&e));
        proxy.clear();
    }
    // A 400 is final: asked once, not retried.
    proxy.add("get-download-uri", Action::Status(400), None);
    let e = pp.pull("errs-listing", &alias("champion"), quiet(), progress(), false).await.unwrap_err();
    assert!(chain(&e).contains("answered 400"), "{}", chain(&e));
    assert_eq!(proxy.seen().iter().filter(|r| r.path.contains("get-download-uri")).count(), 1);
    for m in ["errs", "errs-pending", "errs-transformers", "errs-traversal", "errs-listing", "no-such-model"] {
        assert_nothing_active(&p, m);
        assert_nothing_active(&pp, m);
    }
    // 502 with an HTML page and 503 are retried with backoff, then the pull succeeds.
    proxy.clear();
    proxy.add("registered-models/alias", Action::Status(502), Some(1));
    proxy.add("mlflow-artifacts/artifacts?path=", Action::Status(503), Some(1));
    let o = pp.pull("errs-listing", &alias("champion"), quiet(), progress(), false).await.unwrap();
    assert_eq!(o.version, "1");
    assert_eq!(proxy.seen().iter().filter(|r| r.path.contains("registered-models/alias")).count(), 2);
    // Out of retries, the HTML page's text is the message.
    proxy.clear();
    proxy.add("registered-models/alias", Action::Status(502), None);
    let e = pp.pull("errs-listing", &alias("champion"), quiet(), progress(), false).await.unwrap_err();
    assert!(chain(&e).contains("502 Bad Gateway") && e.is_unreachable(), "{}", chain(&e));
    assert_eq!(proxy.seen().len(), 4, "4 attempts in all");
}

/// A hostile registry (or one answering in its place) is refused before it costs memory, disk
/// or the rollback version: an MLmodel YAML alias bomb, a listed size past the quota or past
/// any model file, an answer about another model, a version that is not a number (it becomes a
/// folder, a log field, a header), control characters in `source`, a directory name longer
/// than a file system holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_registry_answer_is_refused_before_it_costs_anything() {
    let s = server();
    let proxy = Proxy::start(&s.url).await;
    let cache = tempfile::tempdir().unwrap();
    let p = puller_with(&proxy.url, cache.path(), Auth::None, "[cache]\nquota = \"64MiB\"\n");
    let chain = |e: &PullError| edgeflow::util::chain(e);
    let champion = alias("champion");
    s.log_model("hostile", &tiny(), "pyfunc", None, Some("champion"));
    assert_eq!(p.pull("hostile", &champion, quiet(), progress(), false).await.unwrap().version, "1");
    s.log_model("hostile", &other(), "pyfunc", None, Some("champion"));
    assert_eq!(p.pull("hostile", &champion, quiet(), progress(), false).await.unwrap().version, "2");
    s.log_model("hostile", &tiny(), "onnx", None, Some("champion"));
    let rollback_target_kept = || {
        let v1 = p.store().versions(Some("hostile")).unwrap().into_iter().find(|r| r.version == "1").expect("version 1 is still known");
        assert!(!v1.dir.is_empty() && v1.state == State::Good, "version 1, the rollback target, is still cached: {v1:?}");
        assert_eq!(p.store().active("hostile").unwrap().map(|(r, _)| r.version).as_deref(), Some("2"), "version 2 still active");
    };
    let downloaded_nothing = |proxy: &Proxy| {
        let fetched: Vec<_> = proxy.seen().into_iter().filter(|r| r.path.contains(".onnx") || r.path.contains("tokenizer")).collect();
        assert!(fetched.is_empty(), "no model file was requested: {fetched:?}");
    };

    // An MLmodel of 12 KB standing for four million values (and a list of aliases in a flavor
    // that is read): refused at once, unexpanded.
    let (items, aliases) = (vec!["1"; 2000].join(","), vec!["*a"; 2000].join(","));
    for bomb in [
        format!("x: &a [{items}]\nflavors:\n  bomb: [{aliases}]\n"),
        format!("x: &a {{path: {}}}\nflavors:\n  onnx:\n    data: model.onnx\n    extra_files: [{aliases}]\n", "y".repeat(4000)),
    ] {
        proxy.clear();
        proxy.add("MLmodel", Action::Body(bomb.into_bytes()), None);
        let started = std::time::Instant::now();
        let e = p.pull("hostile", &champion, quiet(), progress(), false).await.unwrap_err();
        assert!(matches!(&e, PullError::Registry { source: RegistryError::UnsupportedFlavor { .. } | RegistryError::MlModel { .. }, .. }), "{}", chain(&e));
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        downloaded_nothing(&proxy);
    }

    // Listed sizes: past the quota (32 GiB), and past any model file (2 TiB). Nothing is
    // evicted for a download that could never fit, so the rollback target stays.
    fn sizes(v: &mut serde_json::Value, size: u64) {
        for f in v["files"].as_array_mut().into_iter().flatten() {
            if f["is_dir"] != true {
                f["file_size"] = size.into();
            }
        }
    }
    proxy.clear();
    proxy.add("mlflow-artifacts/artifacts?path=", Action::Rewrite(|v| sizes(v, 32 << 30)), None);
    let e = p.pull("hostile", &champion, quiet(), progress(), false).await.unwrap_err();
    assert!(chain(&e).contains("quota"), "{}", chain(&e));
    downloaded_nothing(&proxy);
    rollback_target_kept();
    proxy.clear();
    proxy.add("mlflow-artifacts/artifacts?path=", Action::Rewrite(|v| sizes(v, 2 << 40)), None);
    let e = p.pull("hostile", &champion, quiet(), progress(), false).await.unwrap_err();
    assert!(chain(&e).contains("more than any model file"), "{}", chain(&e));
    downloaded_nothing(&proxy);

    // A directory name no file system holds: refused before it is listed.
    proxy.clear();
    proxy.add(
        "mlflow-artifacts/artifacts?path=",
        Action::Rewrite(|v| v["files"].as_array_mut().unwrap().push(serde_json::json!({"path": "d".repeat(300), "is_dir": true}))),
        Some(1),
    );
    let e = p.pull("hostile", &champion, quiet(), progress(), false).await.unwrap_err();
    assert!(matches!(&e, PullError::Registry { source: RegistryError::UnsafePath { .. }, .. }), "{}", chain(&e));
    assert!(!proxy.seen().iter().any(|r| r.path.contains("ddddd")), "the long directory was never listed");

    // The version description itself.
    type Rewrite = fn(&mut serde_json::Value);
    let cases: [(Rewrite, &str); 4] = [
        (|v| v["model_version"]["name"] = "someone-else".into(), "describes model \"someone-else\""),
        (|v| v["model_version"]["version"] = "1_0".into(), "version \"1_0\" is not a version number"),
        (|v| v["model_version"]["version"] = "3\nversion 9 activated".into(), "is not a version number"),
        (|v| v["model_version"]["source"] = "models:/m-1\u{1b}[2J".into(), "its source"),
    ];
    for (rewrite, expected) in cases {
        proxy.clear();
        proxy.add("registered-models/alias", Action::Rewrite(rewrite), None);
        let e = p.pull("hostile", &champion, quiet(), progress(), false).await.unwrap_err();
        assert!(chain(&e).contains(expected), "expected `{expected}` in: {}", chain(&e));
        assert!(!chain(&e).contains(['\n', '\u{1b}']), "shown escaped: {:?}", chain(&e));
        assert!(proxy.seen().iter().all(|r| !r.path.contains("mlflow-artifacts")), "nothing was fetched for it");
    }
    rollback_target_kept();
    // Honest again: version 3 installs.
    proxy.clear();
    assert_eq!(p.pull("hostile", &champion, quiet(), progress(), false).await.unwrap().version, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_sent_and_refused_credentials_are_reported() {
    let s = server();
    let name = "bearer";
    log_all(&[(name, &tiny(), "pyfunc", None, Some("champion"))]);
    let proxy = Proxy::start(&s.url).await;
    proxy.add("/api/", Action::RequireBearer("s3cret".into()), None);
    let cache = tempfile::tempdir().unwrap();
    let p = puller_with(&proxy.url, cache.path(), Auth::Bearer("wrong".into()), "");
    let e = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap_err();
    assert!(matches!(&e, PullError::Resolve { source: RegistryError::Unauthorized { status: 401, .. }, .. }), "{}", edgeflow::util::chain(&e));
    assert!(e.to_string().contains("looking up alias"));
    assert!(edgeflow::util::chain(&e).contains("MLFLOW_TRACKING_TOKEN"));
    assert_eq!(proxy.seen().len(), 1, "refused credentials are not retried");
    assert_nothing_active(&p, name);
    drop(p);
    let p = puller_with(&proxy.url, cache.path(), Auth::Bearer("s3cret".into()), "");
    let o = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap();
    assert_eq!(digests(&o.dir), digests(&tiny()));
    assert!(proxy.seen().iter().all(|r| r.authorization.as_deref() == Some("Bearer s3cret") || r.authorization.as_deref() == Some("Bearer wrong")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pulls_and_cache_path_feeds_generate() {
    let s = server();
    let name = "cli";
    log_all(&[(name, &tiny(), "onnx", None, Some("champion"))]);
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let out = edgeflow().args(["pull", "--registry-url", &s.url, "--model", name, "--alias", "champion", "--cache-dir", dir]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Not a terminal: plain lines, no progress bar escapes.
    assert!(stderr.contains(&format!("registry: {name} version 1")) && stderr.contains("smoke test of version 1") && stderr.contains("fetched tokenizer.json"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr}");
    let pulled = String::from_utf8_lossy(&out.stdout).trim().to_string();

    let out = edgeflow().args(["cache", "path", "--cache-dir", dir, "--model", name]).output().unwrap();
    assert!(out.status.success());
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(PathBuf::from(&path), PathBuf::from(&pulled).canonicalize().unwrap());
    let out = edgeflow()
        .args(["generate", "--model-dir", &path, "--prompt", "<|user|>\nHello<|end|>\n<|assistant|>\n", "--max-tokens", "8", "--greedy", "--ignore-eos", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u32> = serde_json::from_value(v["token_ids"].clone()).unwrap();
    assert_eq!(ids, greedy_ids(&tiny()));

    let out = edgeflow().args(["cache", "ls", "--cache-dir", dir, "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["versions"][0]["model"], name);
    assert_eq!(v["versions"][0]["active"], true);
    assert_eq!(v["versions"][0]["state"], "good");
    assert_eq!(v["versions"][0]["flavor"], "onnx");
    let out = edgeflow().args(["cache", "verify", "--cache-dir", dir, "--json"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["ok"], true);
    std::fs::write(cache.path().join("tmp/stray.tmp"), b"x").unwrap();
    let out = edgeflow().args(["cache", "gc", "--cache-dir", dir, "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["temp_removed"], 1);
    // Without --model, the one cached model is meant.
    let out = edgeflow().args(["cache", "path", "--cache-dir", dir, "--json"]).output().unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["model"], name);
}

#[test]
fn cli_usage_and_config_errors_exit_64() {
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "[registry]\npoll_interval = \"often\"\n[cache]\nkeep_versions = 0\n").unwrap();
    let bad_cfg = cfg.path().to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["pull", "--stage", "Production", "--alias", "champion", "--model", "m", "--registry-url", "http://127.0.0.1:9"],
        vec!["pull", "--model", "m"],                              // no registry
        vec!["pull", "--registry-url", "http://127.0.0.1:9"],      // no model
        vec!["pull", "--registry-url", "ftp://x", "--model", "m"], // bad URL
        vec!["pull", "--config", bad_cfg, "--registry-url", "http://127.0.0.1:9", "--model", "m"],
        vec!["pull", "--config", "/nonexistent/edgeflow.toml"],
        vec!["cache", "ls", "--cache-dir", "/nonexistent/cache"],
        vec!["cache", "frobnicate"],
    ];
    for args in cases {
        let out = edgeflow().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = edgeflow().args(["pull", "--config", bad_cfg, "--registry-url", "http://127.0.0.1:9", "--model", "m"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("registry.poll_interval") && stderr.contains("cache.keep_versions"), "every problem is reported: {stderr}");
}

/// Benchmark (security review, item 2): the cost of a routine poll of an unchanged version,
/// now (a few `stat` calls) against what every poll used to cost (the same poll plus a full
/// re-hash of the version, `Store::verify`, which the old poll ran), on the trained model's
/// 116 MB folder, alternated in one run.
/// `cargo test --release --test registry -- --ignored --nocapture bench_poll_cost`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_poll_cost() {
    let s = server();
    let name = "bench-poll";
    let model = common::smollm2_dir();
    log_all(&[(name, &model, "onnx", None, Some("champion"))]);
    let cache = tempfile::tempdir().unwrap();
    let p = puller(&s.url, cache.path());
    let o = p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap();
    let bytes: u64 = p.store().version(name, &o.version).unwrap().unwrap().files.iter().map(|f| f.size).sum();
    let (mut guarded, mut full) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let t = std::time::Instant::now();
        assert_eq!(p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap().change, Change::Unchanged);
        guarded.push(t.elapsed().as_secs_f64() * 1e3);
        // The old behaviour: the same poll, then every file of the version read and hashed.
        let rec = p.store().version(name, &o.version).unwrap().unwrap();
        let t = std::time::Instant::now();
        assert_eq!(p.pull(name, &alias("champion"), quiet(), progress(), false).await.unwrap().change, Change::Unchanged);
        let store = p.store().clone();
        assert!(tokio::task::spawn_blocking(move || store.verify(&rec)).await.unwrap().unwrap().is_empty());
        full.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (g, f) = (median(&mut guarded), median(&mut full));
    println!("poll of an unchanged {:.0} MB version (median of 7, alternated, page cache warm):", bytes as f64 / 1e6);
    println!("  now (stat guard):        {g:8.1} ms");
    println!("  re-hash on every poll:   {f:8.1} ms   ({:.0} MB read and hashed per poll)", bytes as f64 / 1e6);
    println!("  ratio now / before:      {:.3}", g / f);
    assert!(p.full_verifications() <= 1, "the guarded poller verified only when it installed");
}
