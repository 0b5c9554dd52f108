//! systemd's notification protocol (`sd_notify(3)`), spoken directly: one datagram per
//! message to the socket in `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace). Outside systemd the variable is unset and every call does nothing.
//!
//! The daemon sends `READY=1` once its socket is bound and a model serves (or the cache is
//! empty and it waits for the registry), `STATUS=` lines as things change, `WATCHDOG=1`
//! from the loop that would hang, `RELOADING=1` around a SIGHUP and `STOPPING=1` on the way
//! out.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// The notification socket, if systemd gave one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
    socket: Option<UnixDatagram>,
    watchdog: Option<Duration>,
}

#[derive(Debug, Clone)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`. The variables stay in
    /// the environment (children of the daemon are not expected to notify).
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()).map(|s| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(s.as_os_str()).to_vec();
            match bytes.strip_prefix(b"@") {
                Some(name) => Target::Abstract(name.to_vec()),
                None => Target::Path(PathBuf::from(s)),
            }
        });
        let for_us = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok()).is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC").ok().and_then(|u| u.parse::<u64>().ok()).filter(|u| *u > 0 && for_us).map(Duration::from_micros);
        let socket = target.as_ref().and_then(|_| match UnixDatagram::unbound() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the socket for systemd notifications");
                None
            }
        });
        Notifier { target, socket, watchdog }
    }

    /// A notifier that sends nothing (for `edgeflow serve` and tests).
    pub fn disabled() -> Notifier {
        Notifier { target: None, socket: None, watchdog: None }
    }

    /// True when systemd listens.
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// The watchdog timeout systemd expects pings within, if it set one.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one message (`KEY=value` lines). Failures are logged, never fatal: a daemon
    /// must not stop serving because its supervisor went away.
    pub fn send(&self, message: &str) {
        let (Some(socket), Some(target)) = (&self.socket, &self.target) else { return };
        let sent = match target {
            Target::Path(p) => socket.send_to(message.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
            }
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, message, "systemd notification not sent");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    pub fn ping(&self) {
        self.send("WATCHDOG=1");
    }

    /// `RELOADING=1` with the monotonic timestamp systemd (253+, `Type=notify-reload`)
    /// requires; older versions ignore the timestamp. `ready` ends the reload.
    pub fn reloading(&self) {
        let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000).unwrap_or(0);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }

    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }
}

/// STATUS= is one line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket_and_the_clock_is_monotonic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier { target: Some(Target::Path(path)), socket: Some(UnixDatagram::unbound().unwrap()), watchdog: None };
        n.ready("serving m@1\nqueue 0");
        n.reloading();
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(std::str::from_utf8(&buf[..len]).unwrap(), "READY=1\nSTATUS=serving m@1 queue 0");
        let len = listener.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        let usec: u64 = text.strip_prefix("RELOADING=1\nMONOTONIC_USEC=").unwrap().parse().unwrap();
        assert!(usec > 0, "{text}");
        assert!(!Notifier::disabled().is_enabled());
    }
}
