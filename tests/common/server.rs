//! An `edgeflow serve` process as a test drives it: a model folder served on a socket in its
//! own temp dir, with its config and log; `/metrics` read back.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::http::{curl, terminate, Http};

/// An `edgeflow serve` process on a temp socket; stopped with SIGTERM on drop.
pub struct Server {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Server {
    pub fn start(model: &str, config: &str, args: &[&str], envs: &[(&str, &str)]) -> Server {
        Server::start_folder(&super::fixture_model(model), config, args, envs)
    }

    pub fn start_folder(model: &Path, config: &str, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let config_path = dir.path().join("edgeflow.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("server.log");
        let mut cmd = super::edgeflow();
        cmd.args(["serve", "--model-dir"])
            .arg(model)
            .arg("--socket")
            .arg(&socket)
            .arg("--config")
            .arg(&config_path)
            .args(["--threads", "2", "--log", "info"])
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn edgeflow serve");
        let mut server = Server { child, dir, socket, log };
        server.wait_ready();
        server
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("edgeflow serve exited with {status}:\n{}", self.log());
            }
            if self.socket.exists() && self.curl(&["/readyz"]).status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "server not ready after 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn curl(&self, args: &[&str]) -> Http {
        curl(&self.socket, args, None)
    }

    pub fn metric(&self, line_prefix: &str) -> f64 {
        metric(&self.socket, line_prefix)
    }

    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let status = terminate(&mut self.child);
        (status, self.log())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            terminate(&mut self.child);
        }
    }
}

/// The value of the first `/metrics` line starting with `line_prefix`.
pub fn metric(socket: &Path, line_prefix: &str) -> f64 {
    let m = curl(socket, &["/metrics"], None);
    assert_eq!(m.status, 200);
    m.body
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_prefix} in:\n{}", m.body))
}
