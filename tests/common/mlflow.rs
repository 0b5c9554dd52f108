//! The registry tests' peers: a real `mlflow server` from the project venv (`make venv`),
//! model logging with the MLflow Python client, REST calls that move stages and aliases, a
//! fault proxy for what a real server cannot do on demand (cut a download at byte N, answer
//! 5xx, demand a token, list a hostile path, reset the connection, lie about the length,
//! answer forever), and file digests to compare pulled folders.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream as AsyncTcpStream};

use super::{free_port, python, repo};

/// A running MLflow tracking server with a sqlite backend and served artifacts.
pub struct Mlflow {
    pub url: String,
    pub dir: tempfile::TempDir,
    wrapper: Mutex<Child>,
}

impl Drop for Mlflow {
    fn drop(&mut self) {
        // Closing the wrapper's stdin stops the server group (see tests/mlflow/serve.py).
        if let Ok(mut c) = self.wrapper.lock() {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    }
}

impl Mlflow {
    /// Starts a server; `extra` goes to tests/mlflow/serve.py (`--basic-auth PW`, `--tls C K`).
    pub fn start(extra: &[&str]) -> Mlflow {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let child = Command::new(python())
            .arg(repo().join("tests/mlflow/serve.py"))
            .args(["--port", &port.to_string(), "--dir", dir.path().to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting tests/mlflow/serve.py");
        let scheme = if extra.contains(&"--tls") { "https" } else { "http" };
        let server = Mlflow { url: format!("{scheme}://127.0.0.1:{port}"), dir, wrapper: Mutex::new(child) };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                if scheme == "https" {
                    // Port open is enough for TLS; the app is up once uvicorn listens.
                    std::thread::sleep(Duration::from_millis(500));
                    break;
                }
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.1 200") {
                    break;
                }
            }
            if let Ok(Some(status)) = server.wrapper.lock().unwrap().try_wait() {
                panic!("mlflow server exited ({status}): {}", server.log());
            }
            assert!(Instant::now() < deadline, "mlflow server did not come up in 120 s: {}", server.log());
            std::thread::sleep(Duration::from_millis(250));
        }
        server
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("mlflow.db")
    }

    /// Logs `model_dir` with the MLflow Python client and registers it under `name`.
    pub fn log_model(&self, name: &str, model_dir: &Path, flavor: &str, stage: Option<&str>, alias: Option<&str>) -> Logged {
        self.log_model_env(name, model_dir, flavor, stage, alias, &[])
    }

    pub fn log_model_env(&self, name: &str, model_dir: &Path, flavor: &str, stage: Option<&str>, alias: Option<&str>, env: &[(&str, &str)]) -> Logged {
        let mut c = Command::new(python());
        c.arg(repo().join("tests/mlflow/log_model.py"))
            .args(["--tracking-uri", &self.url, "--name", name, "--model-dir", model_dir.to_str().unwrap(), "--flavor", flavor])
            .env("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
            .env("GIT_PYTHON_REFRESH", "quiet");
        if let Some(s) = stage {
            c.args(["--stage", s]);
        }
        if let Some(a) = alias {
            c.args(["--alias", a]);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().expect("running tests/mlflow/log_model.py");
        assert!(out.status.success(), "log_model.py failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON from log_model.py: {stdout}"));
        serde_json::from_str(last).expect("log_model.py JSON")
    }

    /// Sets a version's status directly in the backend store (MLflow's own API always makes
    /// versions READY at once on a sqlite backend).
    pub fn set_status(&self, name: &str, version: &str, status: &str) {
        let script = "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('update model_versions set status=? where name=? and version=?', (sys.argv[4], sys.argv[2], int(sys.argv[3]))); c.commit()";
        let ok = Command::new(python()).args(["-c", script, self.db().to_str().unwrap(), name, version, status]).status().expect("python");
        assert!(ok.success());
    }

    pub async fn api(&self, method: reqwest::Method, route: &str, body: serde_json::Value) {
        // reqwest is built without a crypto provider (see Cargo.toml); a test that has not made
        // an edgeflow registry client yet (which installs it) needs one here.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = format!("{}/api/2.0/mlflow/{route}", self.url);
        let resp = reqwest::Client::new().request(method, &url).json(&body).send().await.expect("mlflow api");
        let status = resp.status();
        assert!(status.is_success(), "{route}: {status} {}", resp.text().await.unwrap_or_default());
    }

    pub async fn set_alias(&self, name: &str, alias: &str, version: &str) {
        self.api(reqwest::Method::POST, "registered-models/alias", serde_json::json!({"name": name, "alias": alias, "version": version})).await;
    }

    pub async fn delete_alias(&self, name: &str, alias: &str) {
        self.api(reqwest::Method::DELETE, "registered-models/alias", serde_json::json!({"name": name, "alias": alias})).await;
    }

    pub async fn transition(&self, name: &str, version: &str, stage: &str) {
        self.api(
            reqwest::Method::POST,
            "model-versions/transition-stage",
            serde_json::json!({"name": name, "version": version, "stage": stage, "archive_existing_versions": false}),
        )
        .await;
    }

    pub async fn delete_model(&self, name: &str) {
        self.api(reqwest::Method::DELETE, "registered-models/delete", serde_json::json!({"name": name})).await;
    }
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Logged {
    pub name: String,
    pub version: String,
    pub source: String,
    pub status: String,
}

/// What the fault proxy does to requests whose path contains `path_contains`.
#[derive(Debug, Clone)]
pub enum Action {
    /// Forward, but close the connection after this many body bytes.
    CutAfter(u64),
    /// Answer this status without forwarding (502 gets an HTML page, others text).
    Status(u16),
    /// Answer 401 unless `Authorization: Bearer <token>`.
    RequireBearer(String),
    /// Add a file of this name to an artifact listing.
    InjectListing(String),
    /// Forward the body at this many bytes per second.
    Throttle(u64),
    /// Forward, with the JSON body changed by this function.
    Rewrite(fn(&mut serde_json::Value)),
    /// Answer 200 with this body without forwarding.
    Body(Vec<u8>),
    /// Reset the connection (RST) once the request has arrived, before any answer.
    Reset,
    /// Wait this long, then forward (latency).
    Delay(Duration),
    /// Forward the answer's head, then send nothing more, holding the connection open until
    /// the client gives up: an answer that never ends.
    Hang,
    /// Forward the body `bytes` at a time, one write every `every`: never silent for long,
    /// never done.
    Trickle { bytes: usize, every: Duration },
    /// Forward the answer's head without its length, then a body of this byte that never
    /// ends, streamed (never buffered) until the client hangs up.
    Endless(u8),
    /// Forward the answer with its Content-Length off by this many bytes (the body as is).
    WrongLength(i64),
    /// Answer 200 with a JSON document of this many bytes (a list of model versions that
    /// goes on and on), generated as it is sent.
    HugeJson(u64),
    /// Add this many small files to an artifact listing.
    InjectFiles(usize),
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub path_contains: String,
    pub action: Action,
    /// Applies this many times, then no more; `None` is always.
    pub times: Option<usize>,
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct ProxyState {
    rules: Vec<Rule>,
    seen: Vec<Seen>,
}

/// A loopback HTTP/1.1 proxy in front of the MLflow server that misbehaves on demand.
#[derive(Clone)]
pub struct Proxy {
    pub url: String,
    state: Arc<Mutex<ProxyState>>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let upstream = upstream.strip_prefix("http://").expect("http upstream").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (st, upstream) = (st.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = handle(conn, &upstream, st).await;
                });
            }
        });
        Proxy { url, state }
    }

    pub fn add(&self, path_contains: &str, action: Action, times: Option<usize>) {
        self.state.lock().unwrap().rules.push(Rule { path_contains: path_contains.to_string(), action, times });
    }

    pub fn clear(&self) {
        let mut s = self.state.lock().unwrap();
        s.rules.clear();
        s.seen.clear();
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// How many requests arrived so far.
    pub fn seen_count(&self) -> usize {
        self.state.lock().unwrap().seen.len()
    }
}

async fn handle(mut client: AsyncTcpStream, upstream: &str, state: Arc<Mutex<ProxyState>>) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await? == 0 || head.len() > 64 << 10 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let path = request_line.split(' ').nth(1).unwrap_or_default().to_string();
    let header = |name: &str| text.split("\r\n").skip(1).find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()));
    let (range, authorization) = (header("range"), header("authorization"));
    let action = {
        let mut s = state.lock().unwrap();
        s.seen.push(Seen { path: path.clone(), range: range.clone(), authorization: authorization.clone() });
        let mut chosen = None;
        for r in s.rules.iter_mut() {
            if path.contains(&r.path_contains) && r.times != Some(0) {
                if let Some(t) = r.times.as_mut() {
                    *t -= 1;
                }
                chosen = Some(r.action.clone());
                break;
            }
        }
        chosen
    };
    match &action {
        Some(Action::Status(code)) => {
            let (ctype, body) = if *code == 502 {
                ("text/html", "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>".to_string())
            } else {
                ("text/plain", format!("injected failure {code}"))
            };
            let resp = format!("HTTP/1.1 {code} Injected\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            client.write_all(resp.as_bytes()).await?;
            return client.shutdown().await;
        }
        Some(Action::Body(body)) => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            client.write_all(head.as_bytes()).await?;
            client.write_all(body).await?;
            return client.shutdown().await;
        }
        Some(Action::RequireBearer(token)) if authorization.as_deref() != Some(&format!("Bearer {token}")) => {
            let body = r#"{"error_code": "UNAUTHENTICATED", "message": "a valid bearer token is required"}"#;
            let resp = format!("HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            client.write_all(resp.as_bytes()).await?;
            return client.shutdown().await;
        }
        Some(Action::Reset) => {
            // SO_LINGER 0: closing sends RST instead of FIN.
            return client.set_zero_linger();
        }
        Some(Action::Delay(d)) => tokio::time::sleep(*d).await,
        Some(Action::HugeJson(total)) => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n");
            client.write_all(head.as_bytes()).await?;
            let open = br#"{"model_versions": ["#;
            let item = br#"{"name": "phi-3", "version": "1", "status": "READY", "source": "models:/m-0", "current_stage": "Production"}, "#;
            let mut chunk = Vec::with_capacity(64 << 10);
            while chunk.len() + item.len() <= 64 << 10 {
                chunk.extend_from_slice(item);
            }
            client.write_all(open).await?;
            let mut sent = open.len() as u64;
            while sent < *total {
                let n = chunk.len().min(usize::try_from(total - sent).unwrap_or(usize::MAX));
                client.write_all(&chunk[..n]).await?;
                sent += n as u64;
            }
            return client.shutdown().await;
        }
        _ => {}
    }
    // Forward with Connection: close, so one connection carries one exchange.
    let mut forwarded = String::new();
    forwarded.push_str(&request_line);
    forwarded.push_str("\r\n");
    for l in text.split("\r\n").skip(1).filter(|l| !l.is_empty()) {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            forwarded.push_str(l);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    let mut up = AsyncTcpStream::connect(upstream).await?;
    up.write_all(forwarded.as_bytes()).await?;
    let mut response = Vec::new();
    // Read the response head.
    while !response.ends_with(b"\r\n\r\n") {
        if up.read(&mut byte).await? == 0 {
            break;
        }
        response.push(byte[0]);
    }
    match action {
        Some(Action::InjectListing(name)) => {
            let add = move |v: &mut serde_json::Value| {
                if let Some(files) = v.get_mut("files").and_then(|f| f.as_array_mut()) {
                    files.push(serde_json::json!({"path": name, "is_dir": false, "file_size": 10}));
                }
            };
            rewrite_json(&mut client, &mut up, &response, add).await?;
        }
        Some(Action::Rewrite(f)) => rewrite_json(&mut client, &mut up, &response, f).await?,
        Some(Action::InjectFiles(n)) => {
            let add = move |v: &mut serde_json::Value| {
                if let Some(files) = v.get_mut("files").and_then(|f| f.as_array_mut()) {
                    files.extend((0..n).map(|i| serde_json::json!({"path": format!("shard-{i:06}.bin"), "is_dir": false, "file_size": 1024})));
                }
            };
            rewrite_json(&mut client, &mut up, &response, add).await?;
        }
        Some(Action::Hang) => {
            client.write_all(&response).await?;
            client.flush().await?;
            // Until the client gives up.
            let mut sink = [0u8; 1024];
            while client.read(&mut sink).await? > 0 {}
            return Ok(());
        }
        Some(Action::Trickle { bytes, every }) => {
            client.write_all(&response).await?;
            let mut buf = vec![0u8; bytes.max(1)];
            loop {
                let got = up.read(&mut buf).await?;
                if got == 0 {
                    break;
                }
                client.write_all(&buf[..got]).await?;
                client.flush().await?;
                tokio::time::sleep(every).await;
            }
        }
        Some(Action::Endless(fill)) => {
            client.write_all(rehead(&response, None).as_bytes()).await?;
            let chunk = vec![fill; 64 << 10];
            loop {
                client.write_all(&chunk).await?;
            }
        }
        Some(Action::WrongLength(delta)) => {
            let mut body = Vec::new();
            up.read_to_end(&mut body).await?;
            let declared = (body.len() as i64 + delta).max(0) as u64;
            client.write_all(rehead(&response, Some(declared)).as_bytes()).await?;
            client.write_all(&body).await?;
        }
        Some(Action::CutAfter(n)) => {
            client.write_all(&response).await?;
            let mut left = n;
            let mut buf = vec![0u8; 64 << 10];
            while left > 0 {
                let want = buf.len().min(left as usize);
                let got = up.read(&mut buf[..want]).await?;
                if got == 0 {
                    break;
                }
                client.write_all(&buf[..got]).await?;
                left -= got as u64;
            }
            client.flush().await?;
        }
        Some(Action::Throttle(rate)) => {
            client.write_all(&response).await?;
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let got = up.read(&mut buf).await?;
                if got == 0 {
                    break;
                }
                if client.write_all(&buf[..got]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs_f64(got as f64 / rate as f64)).await;
            }
        }
        _ => {
            client.write_all(&response).await?;
            tokio::io::copy(&mut up, &mut client).await?;
        }
    }
    client.shutdown().await
}

/// Forwards the upstream answer whose head is `head`, its JSON body changed by `f` (a body
/// that is not JSON becomes `{"files": []}` first).
async fn rewrite_json(client: &mut AsyncTcpStream, up: &mut AsyncTcpStream, head: &[u8], f: impl FnOnce(&mut serde_json::Value)) -> std::io::Result<()> {
    let mut body = Vec::new();
    up.read_to_end(&mut body).await?;
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|_| serde_json::json!({"files": []}));
    f(&mut v);
    let body = serde_json::to_vec(&v).unwrap();
    client.write_all(rehead(head, Some(body.len() as u64)).as_bytes()).await?;
    client.write_all(&body).await
}

/// An answer's head with its length (and transfer encoding) replaced by `content_length`,
/// or dropped (the body then ends when the connection closes).
fn rehead(head: &[u8], content_length: Option<u64>) -> String {
    let head_text = String::from_utf8_lossy(head).into_owned();
    let mut new_head = String::new();
    for l in head_text.split("\r\n").filter(|l| !l.is_empty()) {
        let lower = l.to_ascii_lowercase();
        if !lower.starts_with("content-length:") && !lower.starts_with("transfer-encoding:") {
            new_head.push_str(l);
            new_head.push_str("\r\n");
        }
    }
    if let Some(n) = content_length {
        new_head.push_str(&format!("Content-Length: {n}\r\n"));
    }
    new_head.push_str("\r\n");
    new_head
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Every file of a folder: name → sha256.
pub fn digests(dir: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), sha256_file(&e.path())))
        .collect()
}
