//! The whole daemon driven in-process, as an embedder (or a test) drives it: `app::run` on
//! listeners the caller bound, stopped and reloaded through a [`Lifecycle`] the caller holds,
//! with no signals and no child process, against a real MLflow server and curl on the socket.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{curl, curl_post};
use common::mlflow::Mlflow;
use edgeflow::app::LogControl;
use edgeflow::config::Config;
use edgeflow::lifecycle::Lifecycle;
use edgeflow::notify::Notifier;
use edgeflow::serve::Listeners;
use serde_json::{json, Value};

const MODEL: &str = "phi-3";
const WAIT: Duration = Duration::from_secs(90);

fn config_text(mlflow: &str, dir: &Path, poll_interval: &str) -> String {
    format!(
        r#"
[engine]
threads = 1
ort_lib = "{ort}"
[registry]
url = "{mlflow}"
model = "{MODEL}"
poll_interval = "{poll_interval}"
poll_jitter = 0.0
attempts = 2
backoff_initial = "100ms"
backoff_max = "500ms"
[cache]
dir = "{cache}"
[serve]
socket = "{socket}"
"#,
        ort = common::ort_lib().display(),
        cache = dir.join("cache").display(),
        socket = dir.join("api.sock").display(),
    )
}

/// `/status` over the socket until `pred` holds.
async fn wait_status(socket: &Path, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = socket.to_path_buf();
        let r = tokio::task::spawn_blocking(move || curl(&s, &["/status"], None)).await.expect("curl task");
        if r.status == 200 {
            let doc = r.json();
            if pred(&doc) {
                return doc;
            }
            assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}; last status {doc:#}");
        } else {
            assert!(Instant::now() < deadline, "{what}: /status answered {} {}", r.status, r.body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_in_process_reloads_through_its_lifecycle_and_stops_on_its_token() {
    let mlflow = tokio::task::spawn_blocking(|| {
        let mlflow = Mlflow::start(&[]);
        mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", Some("Production"), None);
        mlflow
    })
    .await
    .expect("mlflow task");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgeflow.toml");
    // A poll interval no test waits for: after the first poll, only a reload brings a new one.
    std::fs::write(&path, config_text(&mlflow.url, dir.path(), "1h")).unwrap();
    let config = Config::load_for_daemon(&path).unwrap_or_else(|e| panic!("{e}"));
    let listeners = Listeners::bind(&config.serve.resolve().expect("[serve] resolves")).await.expect("binding the socket");
    let socket = listeners.socket_path().to_path_buf();
    assert_eq!(socket, dir.path().join("api.sock"));
    let lifecycle = Lifecycle::new();
    let log: LogControl = Arc::new(|_: &str| Ok(()));
    let daemon = tokio::spawn(edgeflow::app::run(config, path.clone(), listeners, lifecycle.clone(), log, Notifier::disabled()));

    let status = wait_status(&socket, |s| s["serving"]["version"] == "1", "serving version 1").await;
    assert_eq!(status["model"]["target"], "stage:Production", "{status:#}");
    let s = socket.clone();
    let r = tokio::task::spawn_blocking(move || {
        curl_post(&s, "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}).to_string())
    })
    .await
    .unwrap();
    assert_eq!((r.status, r.header("x-edgeflow-model")), (200, Some("phi-3@1")), "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 8, "{}", r.body);

    // Version 2 is promoted; with a 1h interval the daemon does not see it until a reload
    // makes the new interval (1s) apply, which the daemon follows with a poll.
    let url = mlflow.url.clone();
    let mlflow = tokio::task::spawn_blocking(move || {
        mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa-acc1"), "pyfunc", Some("Production"), None);
        mlflow
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = wait_status(&socket, |_| true, "status").await;
    assert_eq!(still["serving"]["version"], "1", "no poll without the reload: {still:#}");
    std::fs::write(&path, config_text(&url, dir.path(), "1s")).unwrap();
    lifecycle.reload.notify_one();
    wait_status(&socket, |s| s["serving"]["version"] == "2", "serving version 2 after the reload").await;

    // Stop: the token ends `run` with Ok, the socket file goes, nothing answers any more.
    lifecycle.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(60), daemon).await.expect("run returns within 60 s after the stop").expect("run did not panic");
    assert!(result.is_ok(), "run ended with {result:?}");
    assert!(!socket.exists(), "the socket file is removed on the way out");
    let s = socket.clone();
    let after = tokio::task::spawn_blocking(move || curl(&s, &["/healthz"], None)).await.unwrap();
    assert_eq!(after.exit, 7, "nothing listens after the stop: {after:?}");
    drop(mlflow);
}
