//! HTTP over the API socket with curl, and stopping child processes the way systemd does.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One curl exchange: status, headers (lower-cased names) and body.
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// curl's own exit code (7: could not connect).
    pub exit: i32,
}

impl Http {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// `curl --unix-socket SOCKET -i [args] http://edgeflow<path>`; the first arg starting with
/// `/` is the path. `as_user` runs curl as another (uid, gid), with no supplementary groups.
pub fn curl(socket: &Path, args: &[&str], as_user: Option<(u32, u32)>) -> Http {
    let mut cmd = Command::new("curl");
    cmd.args(["-q", "-sS", "-i", "-N", "--max-time", "120", "--unix-socket"]).arg(socket);
    for a in args {
        if a.starts_with('/') {
            cmd.arg(format!("http://edgeflow{a}"));
        } else {
            cmd.arg(a);
        }
    }
    if let Some((uid, gid)) = as_user {
        cmd.uid(uid).gid(gid).env("HOME", "/");
    }
    parse_curl(cmd.output().expect("run curl"))
}

pub fn parse_curl(out: Output) -> Http {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let exit = out.status.code().unwrap_or(-1);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Http { status: 0, headers: Vec::new(), body: String::from_utf8_lossy(&out.stderr).into_owned(), exit };
    };
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    Http { status, headers, body: body.to_string(), exit }
}

/// POSTs `body` (from a file, so any size and any bytes) as JSON.
pub fn curl_post(socket: &Path, path: &str, body: impl AsRef<[u8]>) -> Http {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), body).unwrap();
    let data = format!("@{}", file.path().display());
    curl(socket, &["-H", "content-type: application/json", "--data-binary", &data, path], None)
}

/// SIGTERM, then SIGKILL after 20 s; the exit status.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
