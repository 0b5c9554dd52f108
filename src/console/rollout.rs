//! `rollout`: one version to a group, a step at a time, stopping by itself.
//!
//! Each step pins the next share of the group's online members (sorted by id, so the same
//! devices go first every time: the canaries) and then watches every device moved so far
//! for `interval`. A pin that does not succeed, a `smoke_test_failed`, `rolled_back` or
//! `pull_failed` event, a health report with more API errors than allowed or a drift alert
//! on the new version, or a moved device lost (its Last Will) stops the rollout there;
//! with `revert`, the moved devices are unpinned, so they follow their ring's alias again.
//!
//! The watching runs on a session of its own, subscribed before the first pin, so nothing a
//! moved device says while its pin runs is missed.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::send::{send, Answer, Report, Request, Target};
use super::session::Session;
use super::view::FleetView;
use super::{survey, ConsoleError, ConsoleSettings};

/// Problems held for the rollout before the watcher drops more (it stops at the first).
const PROBLEM_QUEUE: usize = 256;

/// What to roll out, and how carefully.
#[derive(Debug, Clone)]
pub struct Plan {
    pub group: String,
    pub version: String,
    /// Share of the group's online members moved per step, in percent (1 to 100).
    pub step_percent: u32,
    /// How long the devices moved so far are watched after each step.
    pub interval: Duration,
    /// How long a step waits for its pins' answers.
    pub wait: Duration,
    /// How long each signed pin stays valid.
    pub ttl: Duration,
    /// API errors a moved device may report in one health report.
    pub max_errors: u64,
    /// Unpin the moved devices when the rollout stops.
    pub revert: bool,
}

/// Something a moved device did that stops the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub device: String,
    pub what: String,
}

/// One step: the devices it moved and how each answered its pin.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub devices: Vec<String>,
    pub pins: BTreeMap<String, Answer>,
}

/// How the rollout went.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub group: String,
    pub version: String,
    /// Online members when it began.
    pub members: usize,
    /// Members offline when it began: not moved.
    pub offline: Vec<String>,
    pub steps: Vec<Step>,
    /// Every online member was moved and watched without a problem.
    pub completed: bool,
    pub problems: Vec<Problem>,
    /// The answers to the unpin sent to the moved devices, with `revert`.
    pub reverted: Option<Report>,
}

/// How many devices each step moves: `percent` of `members`, rounded up, at least one.
pub fn step_size(members: usize, percent: u32) -> usize {
    (members * percent.clamp(1, 100) as usize).div_ceil(100).max(1)
}

/// Runs `plan`; `progress` gets one line per step and per finding.
///
/// # Errors
/// [`ConsoleError`] when the broker refuses the console or goes away, or the group has no
/// online member.
pub async fn rollout(settings: &ConsoleSettings, key: Option<&SigningKey>, plan: &Plan, mut progress: impl FnMut(&str)) -> Result<Outcome, ConsoleError> {
    let prefix = settings.prefix.clone();
    let mut watcher = settings.session().await?;
    watcher.subscribe(&["events", "health", "drift", "status"].map(|c| format!("{prefix}/+/{c}"))).await?;
    let moved: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (problem_tx, mut problems_rx) = mpsc::channel(PROBLEM_QUEUE);
    // Stopped however this returns, an error included.
    let watching = AbortOnDropHandle::new(tokio::spawn(watch_moved(watcher, prefix.clone(), plan.clone(), moved.clone(), problem_tx)));

    let mut session = settings.session().await?;
    let view = survey(&mut session, &prefix, false, Duration::from_millis(500), Duration::from_secs(30)).await?;
    let (online, offline): (Vec<_>, Vec<_>) = view.devices().filter(|d| d.in_group(&plan.group)).partition(|d| d.state == "online");
    let online: Vec<String> = online.into_iter().map(|d| d.device.clone()).collect();
    let mut outcome = Outcome {
        group: plan.group.clone(),
        version: plan.version.clone(),
        members: online.len(),
        offline: offline.into_iter().map(|d| d.device.clone()).collect(),
        steps: Vec::new(),
        completed: false,
        problems: Vec::new(),
        reverted: None,
    };
    if online.is_empty() {
        drop(watching);
        session.close().await;
        return Err(ConsoleError::Refused(format!("group `{}` has no online device", plan.group)));
    }
    if !outcome.offline.is_empty() {
        progress(&format!("{} offline member(s) are left out: {}", outcome.offline.len(), outcome.offline.join(", ")));
    }
    let size = step_size(online.len(), plan.step_percent);
    let steps = online.len().div_ceil(size);
    let rollout_id = format!("rollout-{:08x}", fastrand::u32(..));
    for (i, batch) in online.chunks(size).enumerate() {
        progress(&format!("step {}/{steps}: pinning {} device(s) to version {}: {}", i + 1, batch.len(), plan.version, batch.join(", ")));
        if let Ok(mut m) = moved.lock() {
            m.extend(batch.iter().cloned());
        }
        let request = Request {
            name: "pin".into(),
            args: json!({ "version": plan.version }),
            target: Target::Devices(batch.to_vec()),
            request_id: format!("{rollout_id}-{}", i + 1),
            ttl: plan.ttl,
            wait: plan.wait,
        };
        let report = send(&mut session, &prefix, key, &request, &view).await?;
        for (device, a) in &report.answers {
            if a.status != "succeeded" {
                outcome.problems.push(Problem { device: device.clone(), what: format!("pin {}: {}", a.status, a.reason.as_deref().unwrap_or("-")) });
            }
        }
        outcome.steps.push(Step { devices: batch.to_vec(), pins: report.answers });
        while let Ok(p) = problems_rx.try_recv() {
            outcome.problems.push(p);
        }
        if outcome.problems.is_empty() {
            progress(&format!(
                "step {}/{steps}: {} pinned; watching {} device(s) for {}",
                i + 1,
                batch.len(),
                moved.lock().map_or(0, |m| m.len()),
                humantime::format_duration(plan.interval)
            ));
            let until = Instant::now() + plan.interval;
            tokio::select! {
                Some(p) = problems_rx.recv() => outcome.problems.push(p),
                () = tokio::time::sleep_until(until) => {}
            }
        }
        if !outcome.problems.is_empty() {
            break;
        }
    }
    drop(watching);
    for p in &outcome.problems {
        progress(&format!("problem: {}: {}", p.device, p.what));
    }
    outcome.completed = outcome.problems.is_empty();
    if !outcome.completed && plan.revert {
        let mut devices: Vec<String> = moved.lock().map(|m| m.iter().cloned().collect()).unwrap_or_default();
        devices.sort();
        progress(&format!("stopped; unpinning the {} device(s) moved", devices.len()));
        let request =
            Request { name: "unpin".into(), args: json!({}), target: Target::Devices(devices), request_id: format!("{rollout_id}-revert"), ttl: plan.ttl, wait: plan.wait };
        outcome.reverted = Some(send(&mut session, &prefix, key, &request, &view).await?);
    }
    session.close().await;
    Ok(outcome)
}

/// Reports every problem of a moved device until aborted or the broker goes away.
async fn watch_moved(mut session: Session, prefix: String, plan: Plan, moved: Arc<Mutex<HashSet<String>>>, problems: mpsc::Sender<Problem>) {
    let view = FleetView::new(&prefix);
    let far = Instant::now() + Duration::from_secs(100 * 365 * 86400);
    while let Ok(Some(m)) = session.next(far).await {
        if m.retained {
            continue;
        }
        let Some((device, channel)) = view.split(&m.topic) else { continue };
        if !moved.lock().is_ok_and(|m| m.contains(device)) {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else { continue };
        if let Some(what) = problem(channel, &v, &plan) {
            let _ = problems.try_send(Problem { device: device.to_string(), what });
        }
    }
}

/// What is wrong in a message from a moved device on `channel`, if anything.
fn problem(channel: &str, v: &Value, plan: &Plan) -> Option<String> {
    let text = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or("-").to_string();
    match channel {
        "events" => match v.get("event").and_then(Value::as_str)? {
            e @ ("smoke_test_failed" | "rolled_back" | "pull_failed") => Some(format!("{e}: {}", crate::util::truncate(&text("/reason"), 300))),
            _ => None,
        },
        "health" => {
            let errors = v.pointer("/requests/errors").and_then(Value::as_u64).unwrap_or(0);
            if errors > plan.max_errors {
                return Some(format!("{errors} API errors in its latest health report (at most {} allowed)", plan.max_errors));
            }
            let alert = v.pointer("/drift/alert").and_then(Value::as_bool) == Some(true);
            (alert && text("/drift/version") == plan.version).then(|| format!("drift alert on version {}", plan.version))
        }
        "drift" => {
            let alert = v.get("alert").and_then(Value::as_bool) == Some(true);
            (alert && text("/version") == plan.version).then(|| format!("drift alert on version {}", plan.version))
        }
        "status" => (text("/state") == "offline" && text("/reason") == "connection_lost").then(|| "lost (its Last Will: connection_lost)".to_string()),
        _ => None,
    }
}

/// The outcome in words, after the progress lines.
pub fn summary(o: &Outcome) -> String {
    let moved: usize = o.steps.iter().map(|s| s.devices.len()).sum();
    if o.completed {
        format!(
            "ok: version {} is pinned on all {} online member(s) of `{}` in {} step(s). To make it the ring's version, point the group's alias at it in MLflow, then `send unpin --group {}`.\n",
            o.version,
            o.members,
            o.group,
            o.steps.len(),
            o.group
        )
    } else {
        let reverted = match &o.reverted {
            Some(r) if r.all_succeeded() => "; the moved devices were unpinned".to_string(),
            Some(r) => format!("; unpinning the moved devices: {:?}", r.counts()),
            None => "; the moved devices stay pinned (unpin them with `send unpin`, or rerun with --revert)".to_string(),
        };
        format!("stopped: version {} reached {moved} of {} online member(s) of `{}` before {} problem(s){reverted}\n", o.version, o.members, o.group, o.problems.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            group: "eu".into(),
            version: "7".into(),
            step_percent: 25,
            interval: Duration::from_secs(60),
            wait: Duration::from_secs(30),
            ttl: Duration::from_secs(60),
            max_errors: 2,
            revert: false,
        }
    }

    #[test]
    fn steps_round_up_and_move_at_least_one_device() {
        assert_eq!(step_size(8, 25), 2);
        assert_eq!(step_size(10, 25), 3);
        assert_eq!(step_size(3, 10), 1);
        assert_eq!(step_size(1000, 5), 50);
        assert_eq!(step_size(4, 100), 4);
        assert_eq!(step_size(4, 0), 1, "clamped to 1%");
    }

    #[test]
    fn failures_errors_drift_on_the_new_version_and_lost_devices_are_problems() {
        let p = plan();
        let event = |e: &str| json!({"schema": 1, "kind": "event", "event": e, "reason": "it broke"});
        assert_eq!(problem("events", &event("smoke_test_failed"), &p).as_deref(), Some("smoke_test_failed: it broke"));
        assert!(problem("events", &event("rolled_back"), &p).is_some());
        assert!(problem("events", &event("pull_failed"), &p).is_some());
        assert_eq!(problem("events", &event("activated"), &p), None);
        let health = |errors: u64, alert: bool, version: &str| json!({"requests": {"errors": errors}, "drift": {"alert": alert, "version": version}});
        assert_eq!(problem("health", &health(2, false, "7"), &p), None, "within the allowance");
        assert!(problem("health", &health(3, false, "7"), &p).unwrap().starts_with("3 API errors"));
        assert_eq!(problem("health", &health(0, true, "7"), &p).as_deref(), Some("drift alert on version 7"));
        assert_eq!(problem("health", &health(0, true, "6"), &p), None, "an alert on the old version is not the new one's");
        assert_eq!(problem("health", &json!({"drift": null}), &p), None);
        assert!(problem("drift", &json!({"alert": true, "version": "7"}), &p).is_some());
        assert_eq!(problem("drift", &json!({"alert": false, "version": "7"}), &p), None);
        assert!(problem("status", &json!({"state": "offline", "reason": "connection_lost"}), &p).is_some());
        assert_eq!(problem("status", &json!({"state": "offline", "reason": "shutdown"}), &p), None, "an orderly stop is not a failure");
    }
}
