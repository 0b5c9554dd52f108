//! `send`: one signed command to a device or a group, and the acknowledgements it collects.
//!
//! For a group, the console first reads the retained statuses to learn who is in it and
//! online (those are expected to answer; offline members cannot, since commands are not
//! queued for them). It subscribes to the replies before it publishes, so no answer is
//! missed, and waits until every expected device has sent its final reply or `wait` passed.

use std::collections::BTreeMap;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::session::Session;
use super::view::FleetView;
use super::ConsoleError;
use crate::fleet::topics;

/// Whom a command goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Device(String),
    Group(String),
    /// Several devices, each sent its own signed command under the same request id.
    Devices(Vec<String>),
}

/// One command to send.
#[derive(Debug, Clone)]
pub struct Request {
    pub name: String,
    pub args: Value,
    pub target: Target,
    pub request_id: String,
    /// How long the signed command stays valid.
    pub ttl: Duration,
    /// How long to wait for the answers.
    pub wait: Duration,
}

/// How one device answered.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Answer {
    /// `succeeded`, `failed`, `accepted` (no final reply in time), `no_answer`, or `offline`
    /// (not sent: the device is offline).
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Answered from the device's table of recent requests (the id was seen before).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// Milliseconds from the publish to the final reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
}

/// Every device's answer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub command: String,
    pub request_id: String,
    pub target: String,
    pub answers: BTreeMap<String, Answer>,
}

impl Report {
    /// How many devices answered with each status.
    pub fn counts(&self) -> BTreeMap<&str, usize> {
        let mut c = BTreeMap::new();
        for a in self.answers.values() {
            *c.entry(a.status.as_str()).or_insert(0) += 1;
        }
        c
    }

    /// Every device it was sent to succeeded (and there was at least one).
    pub fn all_succeeded(&self) -> bool {
        !self.answers.is_empty() && self.answers.values().all(|a| a.status == "succeeded")
    }
}

/// The signed (or, with no key, plain) payloads of `r` for `prefix`, with their topics: one
/// for a device or a group, one per device for several.
pub fn payloads(r: &Request, prefix: &str, key: Option<&SigningKey>, now: u64) -> Vec<(String, String)> {
    let body = json!({"request_id": r.request_id, "args": r.args, "issued_at": now, "expires_at": now + r.ttl.as_secs()});
    let signed = |topic: String, target: &str| {
        let payload = match key {
            Some(k) => crate::fleet::commands::sign(k, target, &r.name, &body),
            None => body.to_string(),
        };
        (topic, payload)
    };
    let device = |d: &String| signed(topics::device_command(prefix, d, &r.name), d);
    match &r.target {
        Target::Device(d) => vec![device(d)],
        Target::Group(g) => vec![signed(topics::group_command(prefix, g, &r.name), &topics::group_target(prefix, g))],
        Target::Devices(ds) => ds.iter().map(device).collect(),
    }
}

/// Sends `r` and collects the answers. For a group, `view` must hold the retained statuses.
///
/// # Errors
/// [`ConsoleError`] when the broker refuses the console or goes away.
pub async fn send(session: &mut Session, prefix: &str, key: Option<&SigningKey>, r: &Request, view: &FleetView) -> Result<Report, ConsoleError> {
    let mut report = Report { command: r.name.clone(), request_id: r.request_id.clone(), ..Report::default() };
    let (reply_filter, expected): (String, Vec<String>) = match &r.target {
        Target::Device(d) => {
            report.target = d.clone();
            (format!("{prefix}/{d}/cmd/{}/reply", r.name), vec![d.clone()])
        }
        Target::Group(g) => {
            report.target = format!("group {g}");
            let mut online = Vec::new();
            for d in view.devices().filter(|d| d.in_group(g)) {
                if d.state == "online" {
                    online.push(d.device.clone());
                } else {
                    report.answers.insert(d.device.clone(), Answer { status: "offline".into(), reason: d.reason.clone(), ..Answer::default() });
                }
            }
            (format!("{prefix}/+/cmd/{}/reply", r.name), online)
        }
        Target::Devices(ds) => {
            report.target = format!("{} devices", ds.len());
            (format!("{prefix}/+/cmd/{}/reply", r.name), ds.clone())
        }
    };
    for d in &expected {
        report.answers.insert(d.clone(), Answer { status: "no_answer".into(), ..Answer::default() });
    }
    session.subscribe(&[reply_filter]).await?;
    let sent = Instant::now();
    for (topic, body) in payloads(r, prefix, key, crate::util::unix_now()) {
        session.publish(&topic, body.into_bytes()).await?;
    }
    let deadline = sent + r.wait;
    let mut waiting = expected.len();
    // A group's members not in the statuses (a device that never said hello) still answer;
    // with no expected member, wait the whole time for them.
    while waiting > 0 || (expected.is_empty() && matches!(r.target, Target::Group(_))) {
        let Some(m) = session.next(deadline).await? else { break };
        if m.retained {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else { continue };
        if v.get("kind").and_then(Value::as_str) != Some("reply") || v.get("request_id").and_then(Value::as_str) != Some(r.request_id.as_str()) {
            continue;
        }
        let Some(device) = v.get("device").and_then(Value::as_str) else { continue };
        let status = v.get("status").and_then(Value::as_str).unwrap_or_default();
        let answer = report.answers.entry(device.to_string()).or_insert_with(|| Answer { status: "no_answer".into(), ..Answer::default() });
        let was_final = matches!(answer.status.as_str(), "succeeded" | "failed");
        match status {
            "accepted" if !was_final => answer.status = "accepted".into(),
            "succeeded" | "failed" if !was_final => {
                answer.status = status.to_string();
                answer.reason = v.get("reason").and_then(Value::as_str).map(str::to_string);
                answer.result = v.get("result").cloned();
                answer.duplicate = v.get("duplicate").and_then(Value::as_bool).unwrap_or(false);
                answer.ms = Some(u64::try_from(sent.elapsed().as_millis()).unwrap_or(u64::MAX));
                if expected.iter().any(|e| e == device) {
                    waiting -= 1;
                }
            }
            _ => {}
        }
    }
    Ok(report)
}

/// The answers as a text table, then a summary line.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let width = r.answers.keys().map(|k| k.chars().count()).max().unwrap_or(6).max(6);
    out.push_str(&format!("{:<width$}  {:<10}  DETAIL\n", "DEVICE", "STATUS"));
    for (device, a) in &r.answers {
        let mut detail = match (&a.reason, &a.result) {
            (Some(reason), _) => reason.clone(),
            (None, Some(result)) if !result.is_null() => result.to_string(),
            _ => String::new(),
        };
        if let Some(ms) = a.ms {
            detail = format!("{detail} ({ms} ms)").trim_start().to_string();
        }
        if a.duplicate {
            detail.push_str(" [duplicate]");
        }
        out.push_str(format!("{device:<width$}  {:<10}  {}", a.status, crate::util::truncate(&detail, 200)).trim_end());
        out.push('\n');
    }
    let counts: Vec<String> = r.counts().iter().map(|(s, n)| format!("{n} {s}")).collect();
    out.push_str(&format!(
        "{} `{}` ({}) to {}: {}\n",
        if r.all_succeeded() { "ok:" } else { "not all succeeded:" },
        r.command,
        r.request_id,
        r.target,
        if counts.is_empty() { "no devices".into() } else { counts.join(", ") }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_payload_is_signed_for_that_group_and_opens_on_a_member() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let r = Request {
            name: "sync".into(),
            args: json!({"spread": "10s"}),
            target: Target::Group("canary".into()),
            request_id: "r-1".into(),
            ttl: Duration::from_secs(60),
            wait: Duration::from_secs(1),
        };
        let now = 1_700_000_000;
        let [(topic, body)] = &payloads(&r, "fleet/eu", Some(&key), now)[..] else { panic!("one payload for a group") };
        assert_eq!(topic, "fleet/eu/group/canary/cmd/sync");
        let member = topics::Topics::new("fleet/eu", "dev-1", &["canary".to_string()]);
        let to = member.addressed(topic).expect("a member obeys the group's topic");
        let policy = crate::fleet::commands::Policy { key: Some(key.verifying_key()), require: true, max_age: Duration::from_secs(300), not_before: None };
        let opened = crate::fleet::commands::open(body.as_bytes(), &to.target, to.name, &policy, now).expect("opens");
        assert_eq!((opened.request_id.as_str(), opened.args), ("r-1", json!({"spread": "10s"})));
        let topics: Vec<String> = payloads(&Request { target: Target::Device("dev-1".into()), ..r.clone() }, "fleet/eu", Some(&key), now).into_iter().map(|(t, _)| t).collect();
        assert_eq!(topics, ["fleet/eu/dev-1/cmd/sync"]);
        let several = payloads(&Request { target: Target::Devices(vec!["a".into(), "b".into()]), ..r }, "fleet/eu", Some(&key), now);
        assert_eq!(several.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(), ["fleet/eu/a/cmd/sync", "fleet/eu/b/cmd/sync"]);
        let b = topics::Topics::new("fleet/eu", "b", &[]);
        let to = b.addressed(&several[1].0).unwrap();
        assert!(crate::fleet::commands::open(several[1].1.as_bytes(), &to.target, to.name, &policy, now).is_ok(), "each device's command is signed for that device");
        let to_a = topics::Topics::new("fleet/eu", "a", &[]);
        let to = to_a.addressed(&several[0].0).unwrap();
        assert!(crate::fleet::commands::open(several[1].1.as_bytes(), &to.target, to.name, &policy, now).is_err(), "b's signature does not open on a's topic");
    }

    #[test]
    fn the_summary_says_who_did_not_succeed() {
        let mut r = Report { command: "report".into(), request_id: "r".into(), target: "group all".into(), ..Report::default() };
        r.answers.insert("a".into(), Answer { status: "succeeded".into(), ms: Some(12), ..Answer::default() });
        assert!(r.all_succeeded());
        r.answers.insert("b".into(), Answer { status: "no_answer".into(), ..Answer::default() });
        r.answers.insert("c".into(), Answer { status: "failed".into(), reason: Some("busy: too many".into()), ..Answer::default() });
        assert!(!r.all_succeeded());
        let t = table(&r);
        assert!(t.contains("a       succeeded   (12 ms)") && t.contains("busy: too many"), "{t}");
        assert!(t.ends_with("not all succeeded: `report` (r) to group all: 1 failed, 1 no_answer, 1 succeeded\n"), "{t}");
        assert!(!Report::default().all_succeeded(), "nobody answered is not success");
    }
}
