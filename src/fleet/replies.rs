//! The command path inside the link task: a message on `cmd/<name>` is opened and checked
//! ([`super::commands`]), refused or accepted, run (by the link itself, or through the shared
//! [`crate::command::Bus`]), and answered on its reply topic: `accepted`, then `succeeded` or
//! `failed`, duplicates answered from the table of recent requests.
//!
//! `accepted` is sent once, if connected. A final reply (`succeeded` or `failed`) is held in
//! [`Finals`] until the broker acknowledges it and published again on every new connection
//! until then, so a command whose outcome comes while the broker is away is still answered
//! when it is back, without the console asking again. It is first published after the spool's
//! database (which holds the table of recent requests) was flushed, so the outcome it tells
//! is on disk: a repeat after a crash gets the same answer. The hold is in memory and bounded;
//! a reply lost to a restart or pushed out of the hold is what the table answers when the
//! console repeats the command.

use std::collections::VecDeque;
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
/// Final replies held for the broker at most; the oldest make room.
const MAX_HELD_FINALS: usize = 64;

/// One final reply waiting for the broker's acknowledgement.
#[derive(Debug, Clone, PartialEq)]
struct Held {
    id: u64,
    topic: String,
    payload: Vec<u8>,
    correlation: Option<Bytes>,
    /// The serial of the connection it was last published on.
    sent_on: Option<u64>,
    /// Published only once this many flushes of the spool's database have completed.
    after_flush: u64,
}

/// Final replies not yet acknowledged by the broker, oldest first, at most [`MAX_HELD_FINALS`].
#[derive(Debug, Default)]
pub(super) struct Finals {
    held: VecDeque<Held>,
    next_id: u64,
}

impl Finals {
    /// Holds a reply until [`Finals::acked`], to be published once `after_flush` flushes have
    /// completed; returns false when the oldest one had to make room.
    fn hold(&mut self, topic: String, payload: Vec<u8>, correlation: Option<Bytes>, after_flush: u64) -> bool {
        let room = self.held.len() < MAX_HELD_FINALS;
        if !room {
            self.held.pop_front();
        }
        self.next_id += 1;
        self.held.push_back(Held { id: self.next_id, topic, payload, correlation, sent_on: None, after_flush });
        room
    }

    /// The broker took reply `id`.
    pub(super) fn acked(&mut self, id: u64) {
        self.held.retain(|h| h.id != id);
    }

    /// Replies not yet published on connection `serial` whose flush is done (`flushes` have
    /// completed), oldest first; a reply still waiting for its flush holds back the later ones.
    fn unsent(&mut self, serial: u64, flushes: u64) -> impl Iterator<Item = &mut Held> {
        self.held.iter_mut().take_while(move |h| h.after_flush <= flushes).filter(move |h| h.sent_on != Some(serial))
    }
}

/// A command handed to the bus, and where its reply goes.
pub(super) struct Running {
    request_id: String,
    name: &'static str,
    reply_to: String,
    correlation: Option<Bytes>,
    set: Option<Settings>,
    /// A `report` whose id is on disk, to be answered by the next health report.
    report: bool,
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
        recorded: bool,
    ) {
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
        let payload = Value::Object(m).to_string().into_bytes();
        if status != "accepted" {
            // Published by `send_finals` (after the next flush when the outcome was just
            // `recorded` in the table), on this connection and the next ones until acknowledged.
            let after_flush = if recorded { self.flushes + 1 } else { 0 };
            if !self.finals.hold(reply_to.to_string(), payload, correlation, after_flush) {
                tracing::warn!("too many command replies wait for the broker; dropped the oldest (a repeat of its command is answered from the table)");
            }
            if recorded {
                self.flush_at = Some(Instant::now());
            }
            return;
        }
        let Some(c) = &mut self.conn else { return };
        if !c.up {
            return;
        }
        match c.client().publish(reply_to, false, payload, correlation) {
            Ok(()) => c.awaiting.push_back(Tag::Other),
            Err(e) => tracing::warn!(?e, request_id, "could not queue an `accepted` reply; the final reply follows"),
        }
    }

    /// Publishes the held final replies this connection has not had yet, in order; a full
    /// request queue leaves the rest for the next turn of the loop.
    pub(super) fn send_finals(&mut self) {
        let Some(c) = &mut self.conn else { return };
        if !c.up {
            return;
        }
        for h in self.finals.unsent(c.serial, self.flushes) {
            match c.client().publish(&h.topic, false, h.payload.clone(), h.correlation.clone()) {
                Ok(()) => {
                    h.sent_on = Some(c.serial);
                    c.awaiting.push_back(Tag::Final(h.id));
                }
                Err(_) => break,
            }
        }
    }

    fn reply_final(&mut self, reply_to: &str, correlation: Option<Bytes>, request_id: &str, command: &str, f: &Final, duplicate: bool) {
        let status = if f.succeeded { "succeeded" } else { "failed" };
        // A first answer tells an outcome just recorded in the table; a duplicate's was already.
        self.reply(reply_to, correlation, Some(request_id), command, status, f.reason.as_deref(), f.result.as_ref(), duplicate, !duplicate);
    }

    fn refused(&mut self, command: &str, reply_to: &str, correlation: Option<Bytes>, request_id: Option<String>, refusal: Refusal, reason: String) {
        self.state.commands_refused += 1;
        tracing::warn!(command, request_id = ?request_id, refusal = refusal.as_str(), %reason, "command refused");
        let text = format!("{}: {reason}", refusal.as_str());
        self.reply(reply_to, correlation, request_id.as_deref(), command, "failed", Some(&text), None, false, false);
        if refusal.is_security() {
            self.push_event(Event::CommandRefused { command: command.to_string(), request_id, refusal, reason }.bounded());
        }
    }

    pub(super) fn on_command(&mut self, topic: &str, payload: &[u8], response_topic: Option<String>, correlation: Option<Bytes>) {
        let Some(addressed) = self.topics.addressed(topic) else {
            tracing::debug!(topic, "ignoring a message outside cmd/<name>");
            return;
        };
        let name = crate::util::truncate(addressed.name, 64).to_string();
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
        // A group command's signature names the group, a device command's the device: one
        // signed for a group is obeyed by its members only on that group's topic.
        let opened = match commands::open(payload, &addressed.target, &name, &self.policy, now) {
            Ok(o) => o,
            Err(r) => return self.refused(&name, &reply_to, correlation, r.request_id, r.refusal, r.reason),
        };
        match self.recent.check(&opened) {
            Seen::Duplicate(Some(done)) => return self.reply_final(&reply_to, correlation, &opened.request_id, &name, &done, true),
            Seen::Duplicate(None) => return self.reply(&reply_to, correlation, Some(&opened.request_id), &name, "accepted", None, None, true, false),
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
                // Not recorded anywhere, so nothing to flush before answering.
                self.state.commands_refused += 1;
                return self.reply(&reply_to, correlation, Some(&rid), &name, "failed", Some(&reason), None, false, false);
            }
        };
        if let Err((refusal, reason)) = self.recent.start(&opened, now) {
            return self.refused(&name, &reply_to, correlation, Some(opened.request_id), refusal, reason.into());
        }
        self.mark_dirty();
        self.state.commands_accepted += 1;
        tracing::info!(command = command.name(), request_id = %rid, signed = opened.signed, "command accepted");
        self.reply(&reply_to, correlation.clone(), Some(&rid), command.name(), "accepted", None, None, false, false);
        let run = Running { request_id: rid, name: command.name(), reply_to, correlation, set: None, report: false };
        self.dispatch(command, run);
    }

    /// Starts an accepted command; its outcome comes back through `running` (or, for
    /// `report`, with the next health report) to [`Runner::command_done`].
    ///
    /// Every command, the link's own (`report`, a `set` of the link's intervals) included,
    /// acts only once its id is on disk, and after the command before it was handed over.
    fn dispatch(&mut self, command: Command, run: Running) {
        let bus = self.bus.clone();
        let durable = self.recent.durable();
        // Commands reach the bus in the order they arrived, each after the one before.
        let (submitted, next) = tokio::sync::oneshot::channel::<()>();
        let previous = self.submit_chain.replace(next);
        self.running.spawn(async move {
            if let Some(p) = previous {
                let _ = p.await;
            }
            // The id reaches the disk before the command acts: a redelivery after a crash is
            // then a duplicate, never a second run.
            if let Some(tree) = durable {
                let flushed = match tokio::task::spawn_blocking(move || tree.flush()).await {
                    Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = flushed {
                    tracing::error!(request_id = %run.request_id, error = %e, "could not make the command's id durable; not running it");
                    return (run, Err(format!("not run: its id could not be recorded on disk ({e})")));
                }
                crate::crash::point("fleet.command_id_durable");
            }
            let mut submitted = Some(submitted);
            let command = match command {
                Command::Sync { spread } if !spread.is_zero() => {
                    // A group's members spread their polls over `spread` so the registry is
                    // not stormed; the commands after this one need not wait out its delay.
                    submitted = None;
                    let delay = spread.mul_f64(fastrand::f64());
                    tracing::info!(request_id = %run.request_id, delay_ms = delay.as_millis(), "sync: waiting a random part of its spread before polling");
                    tokio::time::sleep(delay).await;
                    Command::Sync { spread }
                }
                Command::Report => {
                    // Answered by the link: succeeded once the report is in the spool, with
                    // the seq it will carry (`command_done` queues it for the next report).
                    drop(submitted);
                    return (Running { report: true, ..run }, Ok(Ok(Value::Null)));
                }
                Command::Set(settings) if settings.poll_interval.is_none() && settings.log_level.is_none() => {
                    // Only the link's own intervals: nothing for the daemon to do.
                    drop(submitted);
                    let result = serde_json::to_value(&settings).unwrap_or(Value::Null);
                    return (Running { set: Some(settings), ..run }, Ok(Ok(result)));
                }
                command => command,
            };
            let set = match &command {
                Command::Set(s) => Some(s.clone()),
                _ => None,
            };
            let answer = bus.submit(command, Origin::Fleet { request_id: run.request_id.clone() });
            drop(submitted);
            let outcome = match answer {
                Err(e) => Err(e.to_string()),
                Ok(rx) => match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
                    Ok(Ok(o)) => Ok(o),
                    Ok(Err(_)) => Err(crate::command::CommandError::Dropped.to_string()),
                    // The daemon's handler answers before this; if it did not, the command
                    // may still be running: say so, not that it failed.
                    Err(_) => Err(format!("no answer within {}s; the command may still be running, and the status report will show its outcome", COMMAND_TIMEOUT.as_secs())),
                },
            };
            (Running { set, ..run }, outcome)
        });
    }

    pub(super) fn command_done(&mut self, r: Running, outcome: Result<Outcome, String>) {
        if r.report && matches!(outcome, Ok(Ok(_))) {
            // Its id is on disk: the next health report answers it, now.
            self.pending_reports.push(Running { report: false, ..r });
            self.next_health = Instant::now();
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(f: &mut Finals, serial: u64) -> Vec<u64> {
        f.unsent(serial, u64::MAX).map(|h| h.id).collect()
    }

    /// A held reply is offered to every connection that has not had it, until acknowledged.
    #[test]
    fn held_finals_go_out_on_each_new_connection_until_acknowledged() {
        let mut f = Finals::default();
        assert!(f.hold("t/reply".into(), b"a".to_vec(), None, 1));
        assert!(f.hold("t/reply".into(), b"b".to_vec(), Some(Bytes::from_static(b"c")), 2));
        // Each waits for the flush that puts its outcome on disk; the order is kept.
        assert!(f.unsent(1, 0).next().is_none());
        assert_eq!(f.unsent(1, 1).map(|h| h.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(ids(&mut f, 1), vec![1, 2]);
        for h in f.unsent(1, 2) {
            h.sent_on = Some(1);
        }
        assert!(ids(&mut f, 1).is_empty(), "published once per connection");
        // The connection died before the broker acknowledged either: the next one has both.
        assert_eq!(ids(&mut f, 2), vec![1, 2]);
        f.acked(1);
        assert_eq!(ids(&mut f, 3), vec![2]);
        f.acked(2);
        f.acked(2);
        assert!(f.held.is_empty());
    }

    #[test]
    fn the_hold_is_bounded_and_the_oldest_make_room() {
        let mut f = Finals::default();
        for i in 0..MAX_HELD_FINALS {
            assert!(f.hold(format!("t/{i}"), Vec::new(), None, 0));
        }
        assert!(!f.hold("t/new".into(), Vec::new(), None, 0), "full: the oldest went");
        assert_eq!(f.held.len(), MAX_HELD_FINALS);
        assert_eq!(f.held.front().map(|h| h.topic.as_str()), Some("t/1"));
        assert_eq!(f.held.back().map(|h| h.topic.as_str()), Some("t/new"));
    }
}
