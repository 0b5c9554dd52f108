//! The one support module of the integration tests. This file owns what every kind of test
//! needs: the repo, its fixture models and the trained model, the ONNX Runtime library, the
//! test venv's python, the built binary as a clean command, and loopback ports. The peers
//! live in submodules: [`daemon`] (an `edgeflow run` process and its config), [`server`] (an
//! `edgeflow serve` process), [`http`]
//! (curl over the API socket, stopping children), [`mlflow`] (a real MLflow server and a
//! fault proxy in front of it) and [`mqtt`] (real Mosquitto brokers and clients).
#![allow(dead_code)]

pub mod daemon;
pub mod http;
pub mod mlflow;
pub mod mqtt;
pub mod server;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use edgeflow::engine::LoadOptions;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture_model(name: &str) -> PathBuf {
    repo().join("tests/fixtures/models").join(name)
}

/// The ONNX Runtime library: `ORT_DYLIB_PATH` (set by the Makefile) or the repo's `.ort/<arch>`.
pub fn ort_lib() -> PathBuf {
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo().join(".ort").join(std::env::consts::ARCH).join("libonnxruntime.so"),
    }
}

pub fn load_options() -> LoadOptions {
    LoadOptions { threads: Some(2), ort_lib: Some(ort_lib()), memory: None, prefix_cache: None, ..LoadOptions::default() }
}

/// A writable copy of a model folder; the big weight files are hard links (read-only use).
pub fn copy_model(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(src).expect("read model dir") {
        let entry = entry.expect("dir entry");
        let to = dir.path().join(entry.file_name());
        std::fs::copy(entry.path(), &to).expect("copy model file");
    }
    dir
}

/// The trained model's folder (SmolLM2-135M-Instruct, exported by `make smollm2`):
/// `SMOLLM2_DIR`, else the repo's `.models/smollm2-135m-instruct`.
pub fn smollm2_dir() -> PathBuf {
    let dir = std::env::var_os("SMOLLM2_DIR").filter(|d| !d.is_empty()).map_or_else(|| repo().join(".models/smollm2-135m-instruct"), PathBuf::from);
    assert!(
        dir.join("genai_config.json").is_file(),
        "{} has no genai_config.json: run `make smollm2` (exports SmolLM2-135M-Instruct there), or point SMOLLM2_DIR at an exported folder",
        dir.display()
    );
    dir
}

/// The test venv's python (`make venv`: the MLflow server and client, the openai SDK,
/// prometheus_client, onnxruntime-genai): `EDGEFLOW_TEST_PYTHON` (a python), else
/// `EDGEFLOW_TEST_VENV` (a venv folder), else the repo's `.venv/test`.
pub fn python() -> PathBuf {
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let py = set("EDGEFLOW_TEST_PYTHON").unwrap_or_else(|| set("EDGEFLOW_TEST_VENV").unwrap_or_else(|| repo().join(".venv/test")).join("bin/python"));
    assert!(
        py.exists(),
        "{} is missing: run `make venv` (installs tests/mlflow/requirements.txt, tests/serve/requirements.txt and tests/gen/smollm2/requirements.txt)",
        py.display()
    );
    py
}

/// What the binary reads from the environment that the shell running the tests may carry
/// (a log filter, a config file, registry credentials, systemd's socket); [`edgeflow`]
/// clears them all, and a test sets on top what it means to.
pub const AMBIENT_ENV: &[&str] = &[
    "EDGEFLOW_LOG",
    "EDGEFLOW_CONFIG",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "NOTIFY_SOCKET",
];

/// The built `edgeflow` with the tree's ONNX Runtime (`ORT_DYLIB_PATH` = [`ort_lib`]) and
/// none of [`AMBIENT_ENV`].
pub fn edgeflow() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgeflow"));
    c.env("ORT_DYLIB_PATH", ort_lib());
    for name in AMBIENT_ENV {
        c.env_remove(name);
    }
    c
}

/// A loopback port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

/// Whether something accepts connections on the loopback `port` within `timeout`.
pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A campaign's size from the environment (`name`), or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The resident set (KiB) and the open file descriptors of process `pid` (0 and 0 when it is gone).
pub fn footprint(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(Iterator::count).unwrap_or(0);
    (rss, fds)
}
