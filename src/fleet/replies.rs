//! The command path inside the link task: a message on `cmd/<name>` is opened and checked
//! ([`super::commands`]), refused or accepted, run (by the link itself, or through the shared
//! [`crate::command::Bus`]), and answered on its reply topic: `accepted`, then `succeeded` or
//! `failed`, duplicates answered from the table of recent requests.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::commands::{self, Final, Refusal, Seen};
use super::events::Event;
use super::runner::{Runner, Tag};
use super::SCHEMA;
use crate::command::{Command, Origin, Outcome, Settings};
use crate::util::unix_now;

/// Commands running at once; more are refused as busy.
const MAX_RUNNING_COMMANDS: usize = 16;
/// A command whose handler has not answered by then is reported failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// A command handed to the bus, and where its reply goes.
pub(super) struct Running {
    request_id: String,
    name: &'static str,
    reply_to: String,
    correlation: Option<Bytes>,
    set: Option<Settings>,
}

impl Runner {
    // One flat call per reply shape reads better at the call sites than a builder here.
    #[allow(clippy::too_many_arguments)]
    fn reply(
        &mut self,
        reply_to: &str,
        correlation: Option<Bytes>,
        request_id: Option<&str>,
        command: &str,
        status: &str,
        reason: Option<&str>,
        result: Option<&Value>,
        duplicate: bool,
    ) {
        let Some(c) = &mut self.conn else { return };
        if !c.up {
            return;
        }
        let mut m = serde_json::Map::new();
        m.insert("schema".into(), json!(SCHEMA));
        m.insert("kind".into(), json!("reply"));
        m.insert("device".into(), json!(self.s.device_id));
        m.insert("request_id".into(), json!(request_id));
        m.insert("command".into(), json!(command));
        m.insert("status".into(), json!(status));
        if let Some(r) = reason {
            m.insert("reason".into(), json!(r));
        }
        if let Some(r) = result {
            m.insert("result".into(), r.clone());
        }
        if duplicate {
            m.insert("duplicate".into(), json!(true));
        }
        m.insert("ts".into(), json!(unix_now()));
        match c.client().publish(reply_to, false, Value::Object(m).to_string().into_bytes(), correlation) {
            Ok(()) => c.awaiting.push_back(Tag::Other),
            Err(e) => tracing::warn!(?e, request_id, "could not queue a command reply; the console's retry will get it"),
        }
    }

    fn reply_final(&mut self, reply_to: &str, correlation: Option<Bytes>, request_id: &str, command: &str, f: &Final, duplicate: bool) {
        let status = if f.succeeded { "succeeded" } else { "failed" };
        self.reply(reply_to, correlation, Some(request_id), command, status, f.reason.as_deref(), f.result.as_ref(), duplicate);
    }

    fn refused(&mut self, command: &str, reply_to: &str, correlation: Option<Bytes>, request_id: Option<String>, refusal: Refusal, reason: String) {
        self.state.commands_refused += 1;
        tracing::warn!(command, request_id = ?request_id, refusal = refusal.as_str(), %reason, "command refused");
        let text = format!("{}: {reason}", refusal.as_str());
        self.reply(reply_to, correlation, request_id.as_deref(), command, "failed", Some(&text), None, false);
        if refusal.is_security() {
            self.push_event(Event::CommandRefused { command: command.to_string(), request_id, refusal, reason }.bounded());
        }
    }

    pub(super) fn on_command(&mut self, topic: &str, payload: &[u8], response_topic: Option<String>, correlation: Option<Bytes>) {
        let Some(name) = self.topics.command_name(topic).map(|n| crate::util::truncate(n, 64).to_string()) else {
            tracing::debug!(topic, "ignoring a message outside cmd/<name>");
            return;
        };
        // Replies go only into this device's reply namespace: a sender must not make the
        // device publish on another device's topics, its own status or a command topic.
        let reply_to = match response_topic {
            Some(t) if self.topics.is_reply(&t) => t,
            Some(t) => {
                tracing::warn!(response_topic = %crate::util::truncate(&t, 128), command = %name, "response topic outside this device's reply namespace; replying on the default topic");
                self.topics.reply(&name)
            }
            None => self.topics.reply(&name),
        };
        let now = unix_now();
        let opened = match commands::open(payload, &self.s.device_id, &name, &self.policy, now) {
            Ok(o) => o,
            Err(r) => return self.refused(&name, &reply_to, correlation, r.request_id, r.refusal, r.reason),
        };
        match self.recent.check(&opened) {
            Seen::Duplicate(Some(done)) => return self.reply_final(&reply_to, correlation, &opened.request_id, &name, &done, true),
            Seen::Duplicate(None) => return self.reply(&reply_to, correlation, Some(&opened.request_id), &name, "accepted", None, None, true),
            Seen::Conflict => {
                return self.refused(&name, &reply_to, correlation, Some(opened.request_id), Refusal::Replayed, "this request id was already used for a different command".into());
            }
            Seen::New => {}
        }
        if self.running.len() >= MAX_RUNNING_COMMANDS {
            return self.refused(&name, &reply_to, correlation, Some(opened.request_id), Refusal::Busy, "too many commands running".into());
        }
        let rid = opened.request_id.clone();
        // Parsed before its id is recorded: a command that cannot run leaves no trace in the
        // replay table (a repeat is refused again the same way).
        let command = match Command::parse(&name, &opened.args) {
            Ok(c) => c,
            Err(reason) => {
                self.state.commands_refused += 1;
                let f = Final { succeeded: false, reason: Some(reason), result: None };
                return self.reply_final(&reply_to, correlation, &rid, &name, &f, false);
            }
        };
        if let Err((refusal, reason)) = self.recent.start(&opened, now) {
            return self.refused(&name, &reply_to, correlation, Some(opened.request_id), refusal, reason.into());
        }
        self.mark_dirty();
        self.state.commands_accepted += 1;
        tracing::info!(command = command.name(), request_id = %rid, signed = opened.signed, "command accepted");
        self.reply(&reply_to, correlation.clone(), Some(&rid), command.name(), "accepted", None, None, false);
        let run = Running { request_id: rid, name: command.name(), reply_to, correlation, set: None };
        self.dispatch(command, run);
    }

    /// Starts an accepted command; its outcome comes back through `running` (or, for
    /// `report`, with the next health report) to [`Runner::command_done`].
    fn dispatch(&mut self, command: Command, run: Running) {
        match command {
            Command::Report => {
                // Answered by the link: succeeded once the report is in the spool, with the
                // seq it will carry.
                self.pending_reports.push(run);
                self.next_health = Instant::now();
            }
            Command::Set(settings) if settings.poll_interval.is_none() && settings.log_level.is_none() => {
                // Only the link's own intervals: nothing for the daemon to do.
                let result = serde_json::to_value(&settings).unwrap_or(Value::Null);
                self.running.spawn(async move { (Running { set: Some(settings), ..run }, Ok(Ok(result))) });
            }
            command => {
                let set = match &command {
                    Command::Set(s) => Some(s.clone()),
                    _ => None,
                };
                let bus = self.bus.clone();
                let durable = self.recent.durable();
                // Commands reach the bus in the order they arrived, each after the one before.
                let (submitted, next) = tokio::sync::oneshot::channel::<()>();
                let previous = self.submit_chain.replace(next);
                self.running.spawn(async move {
                    if let Some(p) = previous {
                        let _ = p.await;
                    }
                    // The id reaches the disk before the command acts: a redelivery after a
                    // crash is then a duplicate, never a second run.
                    if let Some(tree) = durable {
                        let flushed = match tokio::task::spawn_blocking(move || tree.flush()).await {
                            Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                        if let Err(e) = flushed {
                            tracing::error!(request_id = %run.request_id, error = %e, "could not make the command's id durable; not running it");
                            return (Running { set, ..run }, Err(format!("not run: its id could not be recorded on disk ({e})")));
                        }
                        crate::crash::point("fleet.command_id_durable");
                    }
                    let answer = bus.submit(command, Origin::Fleet { request_id: run.request_id.clone() });
                    drop(submitted);
                    let outcome = match answer {
                        Err(e) => Err(e.to_string()),
                        Ok(rx) => match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
                            Ok(Ok(o)) => Ok(o),
                            Ok(Err(_)) => Err(crate::command::CommandError::Dropped.to_string()),
                            // The daemon's handler answers before this; if it did not, the
                            // command may still be running: say so, not that it failed.
                            Err(_) => {
                                Err(format!("no answer within {}s; the command may still be running, and the status report will show its outcome", COMMAND_TIMEOUT.as_secs()))
                            }
                        },
                    };
                    (Running { set, ..run }, outcome)
                });
            }
        }
    }

    pub(super) fn command_done(&mut self, r: Running, outcome: Result<Outcome, String>) {
        let f = match outcome {
            Ok(Ok(result)) => {
                if let Some(set) = &r.set {
                    self.apply(set);
                }
                Final { succeeded: true, reason: None, result: Some(result) }
            }
            Ok(Err(reason)) | Err(reason) => Final { succeeded: false, reason: Some(reason), result: None },
        };
        tracing::info!(command = r.name, request_id = %r.request_id, succeeded = f.succeeded, reason = ?f.reason, "command finished");
        self.recent.finish(&r.request_id, f.clone());
        self.mark_dirty();
        self.reply_final(&r.reply_to, r.correlation, &r.request_id, r.name, &f, false);
    }

    fn apply(&mut self, set: &Settings) {
        let now = Instant::now();
        if let Some(d) = set.report_interval {
            self.health_jitter.interval = d;
            self.next_health = now + self.health_jitter.next();
        }
        if let Some(d) = set.drift_interval {
            self.drift_jitter.interval = d;
            self.next_drift = now + self.drift_jitter.next();
        }
    }
}
