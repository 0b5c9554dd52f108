//! What the daemon says about itself: the `/status` document the API serves (and `edgeflow
//! status` prints), and the one-line STATUS= systemd shows.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;
use tokio::sync::watch;

use crate::active::Manager;
use crate::fleet::LinkState;
use crate::serve;
use crate::status::Status;

/// What `GET /status` (and so `edgeflow status`) shows.
pub(super) fn status_document(
    status: watch::Receiver<Status>,
    link: Option<watch::Receiver<LinkState>>,
    manager: Manager,
    queue_capacity: usize,
    socket: PathBuf,
) -> serve::StatusFn {
    Arc::new(move || {
        let s = status.borrow().clone();
        let serving = manager.current().map(|a| {
            let i = a.info();
            json!({ "name": i.name, "version": i.version, "digest": i.digest, "context_length": i.context_length, "load_ms": i.load_time.as_millis() as u64, "healthy": a.is_healthy(), "queued": a.queued() })
        });
        let fleet = link.as_ref().map(|l| {
            let l = l.borrow();
            json!({ "connected": l.connected, "protocol": l.protocol, "reconnects": l.reconnects, "spool_depth": l.spool_depth, "spool_dropped": l.spool_dropped, "delivered": l.delivered, "last_error": l.last_error, "commands_accepted": l.commands_accepted, "commands_refused": l.commands_refused })
        });
        json!({
            "agent_version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_s": crate::util::unix_now().saturating_sub(s.started_at),
            "socket": socket,
            "model": s.model,
            "serving": serving,
            "queue_capacity": queue_capacity,
            "swapping": manager.is_swapping(),
            "registry": s.registry,
            "pinned": s.pinned,
            "load_failure": s.load_failure,
            "fleet": fleet,
        })
    })
}

/// One line for systemd's STATUS=.
pub(super) fn status_line(s: &Status, manager: &Manager, link: Option<&watch::Receiver<LinkState>>) -> String {
    let model = match manager.current() {
        Some(a) => format!("serving {}@{}, queue {}", a.info().name, a.info().version, a.queued()),
        None if manager.is_swapping() => "swapping models".to_string(),
        None => "no model loaded".to_string(),
    };
    let registry = s.registry.as_ref().map_or_else(|| "registry: not polled yet".to_string(), |r| format!("registry: {}", r.outcome));
    let pinned = s.pinned.as_ref().map(|p| format!(", pinned to {p}")).unwrap_or_default();
    let fleet = match link {
        Some(l) if l.borrow().connected => ", fleet: connected".to_string(),
        Some(l) => format!(", fleet: offline ({} spooled)", l.borrow().spool_depth),
        None => String::new(),
    };
    format!("{model}; {registry}{pinned}{fleet}")
}
