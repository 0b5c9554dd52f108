//! The command handler: fleet and local commands (sync, pin, unpin, rollback, reload, report,
//! set) become poller operations, and each is answered once the engine serves the result, or
//! by [`ANSWER_WITHIN`] with what is true then (still running, withdrawn, still loading).

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::active::{Manager, ModelSource};
use crate::cache::Store;
use crate::command::{Command, Origin, Outcome};
use crate::fleet::LinkSender;
use crate::pipeline::poller::{condition_text, Control, Op};
use crate::status::Publisher;

use super::LogControl;

/// A command is answered within this, for the poller's operation and the engine's load
/// together: inside the fleet link's own 15-minute limit (`COMMAND_TIMEOUT`), so the reply
/// says what is actually going on rather than only that no answer came.
const ANSWER_WITHIN: Duration = Duration::from_secs(14 * 60);

/// Carries out commands (from the fleet link, or any later front end).
#[derive(Clone)]
pub(super) struct Handler {
    pub(super) control: Control,
    pub(super) manager: Manager,
    pub(super) store: Store,
    pub(super) model: String,
    pub(super) publisher: Publisher,
    pub(super) link: Option<LinkSender>,
    pub(super) log: LogControl,
}

impl Handler {
    pub(super) async fn handle(&self, command: &Command, origin: &Origin) -> Outcome {
        tracing::info!(command = command.name(), ?origin, "command");
        let who = match origin {
            Origin::Fleet { request_id } => format!("fleet command {request_id}"),
            Origin::Local => "local command".to_string(),
        };
        let deadline = Instant::now() + ANSWER_WITHIN;
        let op = |op: Op| self.control.call_within(op, deadline.saturating_duration_since(Instant::now()));
        match command {
            Command::Sync { .. } => self.then_serve(op(Op::Sync).await, deadline).await,
            Command::Pin { version } => self.then_serve(op(Op::Pin(version.clone())).await, deadline).await,
            Command::Unpin => self.then_serve(op(Op::Unpin).await, deadline).await,
            Command::Rollback => self.then_serve(op(Op::Rollback { reason: format!("rolled back by {who}") }).await, deadline).await,
            Command::Reload => {
                let status = op(Op::Verify).await?;
                let active = status.active.ok_or("no version is cached")?;
                let digest = self.store.version(&self.model, &active.version).ok().flatten().map(|r| r.digest());
                let source = ModelSource { dir: active.dir, name: self.model.clone(), version: active.version, digest };
                let info = self.manager.activate(source).await.map_err(|e| crate::util::chain(&e))?;
                Ok(json!({ "version": info.version, "load_ms": info.load_time.as_millis() as u64 }))
            }
            Command::Report => match &self.link {
                Some(l) => {
                    l.report_now();
                    Ok(json!({}))
                }
                None => Err("no fleet link is configured".to_string()),
            },
            Command::Set(settings) => {
                let mut applied = serde_json::Map::new();
                if let Some(d) = settings.poll_interval {
                    op(Op::Interval(d)).await?;
                    applied.insert("poll_interval".into(), json!(humantime::format_duration(d).to_string()));
                }
                if let Some(level) = &settings.log_level {
                    (self.log)(level)?;
                    applied.insert("log_level".into(), json!(level));
                }
                Ok(Value::Object(applied))
            }
        }
    }

    /// Answers a poller operation once the engine serves the version it left active (or
    /// has refused it), so a command's `succeeded` means requests get that version; at
    /// `deadline`, that it is not served yet.
    async fn then_serve(&self, result: crate::pipeline::poller::OpResult, deadline: Instant) -> Outcome {
        let status = result?;
        let Some(active) = status.active else {
            return Ok(json!({ "active": null, "registry": condition_text(&status.condition) }));
        };
        let mut rx = self.publisher.subscribe();
        let waited = tokio::time::timeout_at(deadline, async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if s.model.as_ref().is_some_and(|m| m.version == active.version) {
                        return Ok(());
                    }
                    if let Some(f) = s.load_failure.as_ref().filter(|f| f.version == active.version) {
                        return Err(format!("version {} passed its smoke test but the engine refused it: {}", f.version, f.reason));
                    }
                }
                if rx.changed().await.is_err() {
                    return Err("the daemon is stopping".to_string());
                }
            }
        })
        .await;
        match waited {
            Ok(Ok(())) => Ok(json!({ "version": active.version, "registry": condition_text(&status.condition), "pinned": status.pinned })),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!(
                "version {} is active in the cache but the engine was not serving it after {}s; it may still be loading, and the status report will show whether it does",
                active.version,
                ANSWER_WITHIN.as_secs()
            )),
        }
    }
}
