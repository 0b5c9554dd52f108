//! Events the fleet hears about as they happen (published on `events`, spooled when
//! offline): versions pulled, activated, rejected by the smoke test, rolled back, pulls
//! that failed, and what the link itself has to say (refused commands, spool overflow).

use serde::Serialize;

use super::commands::Refusal;
use crate::pipeline::{Condition, Status as PollStatus};

/// Longest free-text field carried in an event; longer text is cut.
const MAX_TEXT: usize = 512;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A version's files were downloaded and verified.
    VersionPulled {
        model: String,
        version: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// A version serves new requests.
    Activated { model: String, version: String, previous: Option<String> },
    /// A version failed its smoke test and was not activated.
    SmokeTestFailed { model: String, version: String, reason: String },
    /// The device went back to an earlier version.
    RolledBack { model: String, from: Option<String>, to: String, reason: String },
    /// A poll or pull failed; the active version keeps serving.
    PullFailed { model: String, reason: String },
    /// A command was refused for a security reason (unsigned, bad signature, expired, replayed).
    CommandRefused { command: String, request_id: Option<String>, refusal: Refusal, reason: String },
    /// The spool was full while offline: this many of the oldest messages were dropped.
    SpoolOverflow { dropped: u64 },
    /// A damaged local database was moved aside (`quarantined_to`) and a fresh one created:
    /// `database` is `spool` (queued telemetry and the command table were lost; signed
    /// commands issued before now are refused) or `cache_index` (`rebuilt` names the active
    /// versions recorded again from their folders).
    DatabaseRecreated {
        database: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        quarantined_to: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        rebuilt: Vec<String>,
    },
    /// A reload (SIGHUP) changed security settings, which only a restart applies: the old
    /// values stay in force.
    ReloadRefused { settings: Vec<String> },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::VersionPulled { .. } => "version_pulled",
            Event::Activated { .. } => "activated",
            Event::SmokeTestFailed { .. } => "smoke_test_failed",
            Event::RolledBack { .. } => "rolled_back",
            Event::PullFailed { .. } => "pull_failed",
            Event::CommandRefused { .. } => "command_refused",
            Event::SpoolOverflow { .. } => "spool_overflow",
            Event::DatabaseRecreated { .. } => "database_recreated",
            Event::ReloadRefused { .. } => "reload_refused",
        }
    }

    /// Cuts free text to a bounded length, so one event can never be large.
    pub(crate) fn bounded(mut self) -> Event {
        let cut = |s: &mut String| *s = crate::util::clip(s, MAX_TEXT);
        match &mut self {
            Event::SmokeTestFailed { reason, .. } | Event::RolledBack { reason, .. } | Event::PullFailed { reason, .. } | Event::CommandRefused { reason, .. } => cut(reason),
            _ => {}
        }
        self
    }

    /// The event a registry poll is worth, given the previous poll's status: a new version
    /// activated, a version rejected, or a failure that differs from the last one (a
    /// registry that stays down is reported once, not every poll).
    pub fn from_poll(previous: Option<&PollStatus>, current: &PollStatus) -> Option<Event> {
        if previous.is_some_and(|p| p.polls == current.polls && p.condition == current.condition) {
            return None;
        }
        let same_as_before = previous.is_some_and(|p| p.condition == current.condition);
        let model = current.model.clone();
        match &current.condition {
            Condition::Updated { from, to } => Some(Event::Activated { model, version: to.clone(), previous: from.clone() }),
            Condition::RolledBack { from, to, reason } => Some(Event::RolledBack { model, from: Some(from.clone()), to: to.clone(), reason: reason.clone() }),
            Condition::Rejected { version, reason } if !same_as_before => Some(Event::SmokeTestFailed { model, version: version.clone(), reason: reason.clone() }),
            Condition::Unreachable { error } | Condition::Failed { error } if !same_as_before => Some(Event::PullFailed { model, reason: error.clone() }),
            Condition::TargetGone { detail } if !same_as_before => Some(Event::PullFailed { model, reason: detail.clone() }),
            Condition::ModelDeleted if !same_as_before => Some(Event::PullFailed { model, reason: "the registered model was deleted".into() }),
            _ => None,
        }
        .map(Event::bounded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(polls: u64, condition: Condition) -> PollStatus {
        PollStatus { model: "m".into(), target: "stage Production".into(), active: None, condition, checked_at: Some(1), polls, pinned: None, cache_read: true }
    }

    #[test]
    fn polls_become_events_once() {
        let up = status(1, Condition::Updated { from: Some("1".into()), to: "2".into() });
        assert_eq!(Event::from_poll(None, &up), Some(Event::Activated { model: "m".into(), version: "2".into(), previous: Some("1".into()) }));
        assert_eq!(Event::from_poll(Some(&up), &up), None, "the same poll twice");
        let down = status(2, Condition::Unreachable { error: "connection refused".into() });
        assert_eq!(Event::from_poll(Some(&up), &down).map(|e| e.name()), Some("pull_failed"));
        let still_down = status(3, Condition::Unreachable { error: "connection refused".into() });
        assert_eq!(Event::from_poll(Some(&down), &still_down), None, "a registry that stays down is reported once");
        let rejected = status(4, Condition::Rejected { version: "3".into(), reason: "x".repeat(5000) });
        match Event::from_poll(Some(&still_down), &rejected) {
            Some(Event::SmokeTestFailed { version, reason, .. }) => assert!(version == "3" && reason.len() <= MAX_TEXT + 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(Event::from_poll(Some(&rejected), &status(5, Condition::UpToDate)), None);
    }

    #[test]
    fn events_serialize_with_their_name() {
        let e = Event::CommandRefused { command: "pin".into(), request_id: Some("r".into()), refusal: Refusal::BadSignature, reason: "no".into() };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "command_refused");
        assert_eq!(v["refusal"], "bad_signature");
        assert_eq!(e.name(), "command_refused");
    }
}
