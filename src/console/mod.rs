//! The operator's console, `edgeflow fleet console`: the fleet seen and driven over MQTT
//! only, as the devices speak it.
//!
//! - `devices`: every device from the retained `status` and `health` messages ([`view`]);
//! - `send`: one signed command to a device or a group, with every device's answer ([`send`]);
//! - `rollout`: a version pinned on a group a step at a time, stopping at the first failure
//!   ([`rollout`]);
//! - `watch`: live status changes, events and drift alerts;
//! - `bridge`: MLflow registry webhooks turned into signed `sync` broadcasts ([`bridge`]).
//!
//! The console connects with the same code and TLS as a device ([`crate::fleet::wire`]) but
//! with no Last Will and a client id of its own, and it never publishes anything but commands.

pub mod bridge;
pub mod rollout;
pub mod send;
pub mod session;
pub mod view;

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::fleet::settings::{FleetConfig, Protocol};
use crate::fleet::wire::ConnectOptions;
use session::{Message, Session};
use view::FleetView;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("connecting to the broker: {0}")]
    Connect(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Broker(String),
    #[error("{0}")]
    Config(String),
}

/// Where the console connects, and how.
#[derive(Clone)]
pub struct ConsoleSettings {
    pub connect: ConnectOptions,
    pub protocol: Protocol,
    pub prefix: String,
}

/// Largest packet the console accepts (a retained drift report is the largest message).
const MAX_PACKET: u32 = 256 * 1024;

impl ConsoleSettings {
    /// From a `[fleet]` section (the broker, prefix, protocol, TLS files and credentials a
    /// device of the fleet uses; its device id and command settings are not the console's).
    ///
    /// # Errors
    /// [`ConsoleError::Config`] listing every problem.
    pub fn from_fleet(fleet: &FleetConfig) -> Result<ConsoleSettings, ConsoleError> {
        let link = fleet.console_link().map_err(|p| ConsoleError::Config(p.join("\n")))?;
        let client_id = format!("edgeflow-console-{:08x}", fastrand::u32(..));
        Ok(ConsoleSettings {
            connect: ConnectOptions {
                client_id,
                broker: link.broker,
                tls: link.tls,
                username: link.username,
                password: link.password,
                keep_alive: link.keep_alive,
                connect_timeout: link.connect_timeout,
                will: None,
                max_packet: MAX_PACKET,
            },
            protocol: link.protocol,
            prefix: link.topic_prefix,
        })
    }

    pub async fn session(&self) -> Result<Session, ConsoleError> {
        Session::connect(&self.connect, self.protocol).await
    }
}

/// What `devices` and `send --group` read first: the retained statuses (and, for
/// `devices`, health reports) of the whole fleet. Reading stops once `quiet` passed without
/// a new message (the broker sends its retained messages right after the subscription), or
/// at `limit`.
///
/// # Errors
/// [`ConsoleError`] when the broker refuses the subscription or goes away.
pub async fn survey(session: &mut Session, prefix: &str, health: bool, quiet: Duration, limit: Duration) -> Result<FleetView, ConsoleError> {
    let mut filters = vec![format!("{prefix}/+/status")];
    if health {
        filters.push(format!("{prefix}/+/health"));
    }
    session.subscribe(&filters).await?;
    let mut view = FleetView::new(prefix);
    let end = Instant::now() + limit;
    loop {
        let deadline = (Instant::now() + quiet).min(end);
        match session.next(deadline).await? {
            Some(m) => {
                view.apply(&m.topic, &m.payload);
            }
            None => break,
        }
    }
    Ok(view)
}

/// The topics `watch` follows.
pub fn watch_filters(prefix: &str) -> Vec<String> {
    ["status", "events", "drift"].iter().map(|c| format!("{prefix}/+/{c}")).collect()
}

/// One line of `watch` for a message, or `None` for a message not worth a line (a retained
/// one, a drift window without an alert unless `all_drift`, something unparseable).
pub fn watch_line(view: &FleetView, m: &Message, all_drift: bool, json: bool) -> Option<String> {
    if m.retained {
        return None;
    }
    let (device, channel) = view.split(&m.topic)?;
    let v: Value = serde_json::from_slice(&m.payload).ok()?;
    let alert = v.get("alert").and_then(Value::as_bool).unwrap_or(false);
    if channel == "drift" && !alert && !all_drift {
        return None;
    }
    if json {
        return Some(serde_json::json!({"topic": m.topic, "device": device, "channel": channel, "message": v}).to_string());
    }
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let ts = v.get("ts").and_then(Value::as_u64).unwrap_or_else(crate::util::unix_now);
    let text = match channel {
        "status" => match v.get("reason").and_then(Value::as_str) {
            Some(r) => format!("status {} ({r})", s("state")),
            None => format!("status {}", s("state")),
        },
        "drift" => {
            let features: Vec<String> = v
                .get("divergence")
                .and_then(Value::as_object)
                .map(|f| f.iter().filter(|(_, d)| d.get("alert").and_then(Value::as_bool) == Some(true)).map(|(k, _)| k.clone()).collect())
                .unwrap_or_default();
            format!("drift {} {} v{} n={} [{}]", if alert { "ALERT" } else { "ok" }, s("model"), s("version"), v.get("n").and_then(Value::as_u64).unwrap_or(0), features.join(","))
        }
        "events" => {
            let mut fields: Vec<String> = v
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| !matches!(k.as_str(), "schema" | "kind" | "device" | "seq" | "ts" | "event"))
                .map(|(k, x)| format!("{k}={}", x.as_str().map_or_else(|| x.to_string(), str::to_string)))
                .collect();
            fields.sort();
            format!("event {} {}", s("event"), fields.join(" "))
        }
        _ => return None,
    };
    Some(format!("{} {device} {}", humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(ts)), crate::util::truncate(&text, 600)))
}

/// The console's signing key, from a file written by `edgeflow fleet keygen`.
///
/// # Errors
/// [`ConsoleError::Config`] when it cannot be read or is not such a key.
pub fn read_key(path: &std::path::Path) -> Result<ed25519_dalek::SigningKey, ConsoleError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConsoleError::Config(format!("reading {}: {e}", path.display())))?;
    let seed: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ConsoleError::Config(format!("{}: not a key written by `edgeflow fleet keygen`", path.display())))?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn msg(topic: &str, v: Value, retained: bool) -> Message {
        Message { topic: topic.into(), payload: Bytes::from(v.to_string()), retained }
    }

    #[test]
    fn watch_prints_live_changes_and_drift_alerts_only() {
        let view = FleetView::new("f");
        let event = json!({"schema": 1, "kind": "event", "device": "d1", "seq": 4, "ts": 1_800_000_000, "event": "activated", "model": "m", "version": "3", "previous": null});
        let line = watch_line(&view, &msg("f/d1/events", event.clone(), false), false, false).unwrap();
        assert_eq!(line, "2027-01-15T08:00:00Z d1 event activated model=m previous=null version=3");
        assert!(watch_line(&view, &msg("f/d1/events", event, true), false, false).is_none(), "retained: old news");
        let quiet = json!({"schema": 1, "kind": "drift", "ts": 1_800_000_000, "alert": false, "model": "m", "version": "3", "n": 200});
        assert!(watch_line(&view, &msg("f/d1/drift", quiet.clone(), false), false, false).is_none());
        assert!(watch_line(&view, &msg("f/d1/drift", quiet, false), true, false).is_some());
        let loud = json!({"schema": 1, "kind": "drift", "ts": 1_800_000_000, "alert": true, "model": "m", "version": "3", "n": 200,
            "divergence": {"prompt_tokens": {"alert": true}, "latency_ms": {"alert": false}}});
        assert_eq!(watch_line(&view, &msg("f/d1/drift", loud.clone(), false), false, false).unwrap(), "2027-01-15T08:00:00Z d1 drift ALERT m v3 n=200 [prompt_tokens]");
        let j: Value = serde_json::from_str(&watch_line(&view, &msg("f/d1/drift", loud, false), false, true).unwrap()).unwrap();
        assert_eq!((j["device"].as_str(), j["channel"].as_str(), j["message"]["alert"].as_bool()), (Some("d1"), Some("drift"), Some(true)));
        let will = json!({"schema": 1, "kind": "status", "state": "offline", "reason": "connection_lost"});
        assert!(watch_line(&view, &msg("f/d1/status", will, false), false, false).unwrap().ends_with("d1 status offline (connection_lost)"));
    }
}
