//! An `edgeflow run` process as a test drives it: its config (a real MLflow server to follow,
//! its own cache and socket in a temp dir), its log, `/status` and a chat over curl, and what
//! systemd would hear on `NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::edgeflow;
use super::http::{curl, curl_post, terminate};

pub const MODEL: &str = "phi-3";
pub const WAIT: Duration = Duration::from_secs(90);

/// What systemd would hear on `NOTIFY_SOCKET`.
pub struct Notifications {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Notifications {
    pub fn listen() -> Notifications {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        Notifications { _dir: dir, path, seen }
    }

    pub fn all(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    pub fn wait(&self, pred: impl Fn(&str) -> bool, what: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(m) = self.all().into_iter().find(|m| pred(m)) {
                return m;
            }
            assert!(Instant::now() < deadline, "no notification {what}; got {:#?}", self.all());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// An `edgeflow run` process with its own config, cache and socket.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The API's bearer token, when its config sets one (`/status` asks for it then).
    pub token: Option<String>,
}

impl Daemon {
    pub fn start(dir: &Path, config: &str, notify: Option<&Notifications>) -> Daemon {
        Daemon::start_env(dir, config, notify, &[])
    }

    /// As [`Daemon::start`], with `env` added to the process's environment.
    pub fn start_env(dir: &Path, config: &str, notify: Option<&Notifications>, env: &[(&str, &str)]) -> Daemon {
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join(format!("daemon-{}.log", fastrand::u32(..)));
        // No NOTIFY_SOCKET unless `notify` (edgeflow() clears the one the tests may run under).
        let mut cmd = edgeflow();
        cmd.args(["--log", "info,edgeflow=debug", "run", "--config"]).arg(&config_path).env("NO_COLOR", "1").stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        if let Some(n) = notify {
            cmd.env("NOTIFY_SOCKET", &n.path).env("WATCHDOG_USEC", "1000000");
        }
        cmd.envs(env.iter().copied());
        Daemon { child: cmd.spawn().expect("spawn edgeflow run"), socket: dir.join("api.sock"), log, token: None }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /status`, once the socket answers.
    pub fn status(&mut self) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!("edgeflow run exited with {s}:\n{}", self.log());
            }
            if self.socket.exists() {
                let auth = self.token.as_ref().map(|t| format!("authorization: Bearer {t}"));
                let args: Vec<&str> = auth.iter().flat_map(|a| ["-H", a.as_str()]).chain(["/status"]).collect();
                let r = curl(&self.socket, &args, None);
                if r.status == 200 {
                    return r.json();
                }
            }
            assert!(Instant::now() < deadline, "no /status after {WAIT:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `/status` satisfies `pred`; returns that status.
    pub fn wait_status(&mut self, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "status never {what}; last: {s:#}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_serving(&mut self, version: &str) -> Value {
        self.wait_status(|s| s["serving"]["version"] == version, &format!("serving version {version}"))
    }

    pub fn chat(&self) -> (u16, String, Value) {
        let r = curl_post(&self.socket, "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}).to_string());
        let fingerprint = r.header("x-edgeflow-model").unwrap_or_default().to_string();
        let body = if r.status == 200 { r.json() } else { Value::String(r.body.clone()) };
        (r.status, fingerprint, body)
    }

    pub fn stop(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.child)
    }

    /// SIGTERM, then wait as long as the grace period allows (a loaded CI machine can make a
    /// stream slow; [`terminate`] would SIGKILL after 20 s).
    pub fn stop_gracefully(&mut self, limit: Duration) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("edgeflow run did not stop within {limit:?} of SIGTERM:\n{}", self.log());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            terminate(&mut self.child);
        }
    }
}

/// A daemon config following `mlflow` for [`MODEL`], with its cache and socket in `dir`, and
/// `extra` appended (more sections).
pub fn config(mlflow: &str, dir: &Path, extra: &str) -> String {
    format!(
        r#"
[engine]
threads = 1
[registry]
url = "{mlflow}"
model = "{MODEL}"
poll_interval = "1s"
attempts = 2
backoff_initial = "100ms"
backoff_max = "500ms"
connect_timeout = "2s"
request_timeout = "10s"
[cache]
dir = "{cache}"
[serve]
socket = "{socket}"
shutdown_grace = "20s"
{extra}
"#,
        cache = dir.join("cache").display(),
        socket = dir.join("api.sock").display(),
    )
}

/// One chat answer a [`Chatter`] got: when it ended, its status and fingerprint.
#[derive(Debug, Clone)]
pub struct Answer {
    pub at: Instant,
    pub status: u16,
    pub fingerprint: String,
}

/// A client chatting with a daemon over its socket, one short chat after another, until
/// stopped: what "serving never interrupted" is measured with.
pub struct Chatter {
    stop: Arc<std::sync::atomic::AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Chatter {
    pub fn start(socket: &Path) -> Chatter {
        let (stop, answers) = (Arc::new(std::sync::atomic::AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (s, a, socket) = (stop.clone(), answers.clone(), socket.to_path_buf());
        let thread = std::thread::spawn(move || {
            let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}).to_string();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let r = curl_post(&socket, "/v1/chat/completions", &body);
                let fingerprint = r.header("x-edgeflow-model").unwrap_or_default().to_string();
                a.lock().unwrap().push(Answer { at: Instant::now(), status: r.status, fingerprint });
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        Chatter { stop, answers, thread: Some(thread) }
    }

    /// The answers that ended in `[from, to)`.
    pub fn between(&self, from: Instant, to: Instant) -> Vec<Answer> {
        self.answers.lock().unwrap().iter().filter(|a| a.at >= from && a.at < to).cloned().collect()
    }

    /// Stops chatting; every answer.
    pub fn stop(&mut self) -> Vec<Answer> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.answers.lock().unwrap().clone()
    }
}

impl Drop for Chatter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
