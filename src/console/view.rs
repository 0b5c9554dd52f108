//! What the console knows of each device, from the retained `status` and `health` messages
//! (and, while watching, everything newer): online or not, groups, model version, speed,
//! errors, drift alert, last seen.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// One device as the console sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Device {
    pub device: String,
    /// `online`, `offline`, or `unknown` (a health report but no status yet).
    pub state: String,
    /// Why it is offline: `connection_lost` (its Last Will) or `shutdown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its groups, `all` included (from its status; empty for an agent older than groups).
    pub groups: Vec<String>,
    pub agent_version: Option<String>,
    pub model: Option<String>,
    pub version: Option<String>,
    pub tokens_per_s: Option<f64>,
    /// API errors in the interval of its latest health report.
    pub errors: Option<u64>,
    /// Its latest drift window raised an alert.
    pub drift_alert: Option<bool>,
    /// Unix seconds of its latest status or health message.
    pub last_seen: Option<u64>,
    /// Unix seconds of its latest health report.
    pub reported_at: Option<u64>,
}

impl Device {
    /// Whether it belongs to `group`.
    pub fn in_group(&self, group: &str) -> bool {
        group == crate::fleet::topics::ALL || self.groups.iter().any(|g| g == group)
    }

    fn seen(&mut self, ts: Option<u64>) {
        if let Some(ts) = ts {
            self.last_seen = Some(self.last_seen.map_or(ts, |s| s.max(ts)));
        }
    }
}

/// The fleet under one topic prefix.
#[derive(Debug, Default)]
pub struct FleetView {
    prefix: String,
    devices: BTreeMap<String, Device>,
}

impl FleetView {
    pub fn new(prefix: &str) -> FleetView {
        FleetView { prefix: prefix.to_string(), devices: BTreeMap::new() }
    }

    /// The device and the channel (`status`, `health`, `drift`, `events`, ...) of a topic
    /// under the prefix; `None` for group topics and anything else.
    pub fn split<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = topic.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?;
        let (device, channel) = rest.split_once('/')?;
        (device != crate::fleet::topics::GROUP_LEVEL && !device.is_empty()).then_some((device, channel))
    }

    /// Takes in a `status` or `health` message; returns the device it changed. Payloads that
    /// are not schema-1 JSON objects are ignored (a console must not trip over a newer agent).
    pub fn apply(&mut self, topic: &str, payload: &[u8]) -> Option<&Device> {
        let (device, channel) = self.split(topic).filter(|(_, c)| matches!(*c, "status" | "health"))?;
        let v: Value = serde_json::from_slice(payload).ok().filter(|v: &Value| v.get("schema").and_then(Value::as_u64) == Some(1))?;
        let d = self.devices.entry(device.to_string()).or_insert_with(|| Device { device: device.to_string(), state: "unknown".into(), ..Device::default() });
        let ts = v.get("ts").and_then(Value::as_u64);
        match channel {
            "status" => {
                d.state = v.get("state").and_then(Value::as_str).unwrap_or("unknown").to_string();
                d.reason = v.get("reason").and_then(Value::as_str).map(str::to_string);
                if let Some(groups) = v.get("groups").and_then(Value::as_array) {
                    d.groups = groups.iter().filter_map(Value::as_str).map(str::to_string).collect();
                }
                if let Some(a) = v.get("agent_version").and_then(Value::as_str) {
                    d.agent_version = Some(a.to_string());
                }
            }
            "health" => {
                let model = v.get("model").filter(|m| m.is_object());
                d.model = model.and_then(|m| m.get("name")).and_then(Value::as_str).map(str::to_string);
                d.version = model.and_then(|m| m.get("version")).and_then(Value::as_str).map(str::to_string);
                d.tokens_per_s = v.pointer("/requests/tokens_per_s").and_then(Value::as_f64);
                d.errors = v.pointer("/requests/errors").and_then(Value::as_u64);
                d.drift_alert = v.pointer("/drift/alert").and_then(Value::as_bool);
                d.reported_at = ts;
                if let Some(a) = v.pointer("/agent/version").and_then(Value::as_str) {
                    d.agent_version = Some(a.to_string());
                }
            }
            _ => {}
        }
        d.seen(ts);
        Some(d)
    }

    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.values()
    }

    pub fn get(&self, device: &str) -> Option<&Device> {
        self.devices.get(device)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

/// The fleet as a text table, one device per line, sorted by id.
pub fn table(view: &FleetView, now: u64) -> String {
    let mut rows = vec![["DEVICE", "STATE", "GROUPS", "MODEL", "VERSION", "TOK/S", "ERRORS", "DRIFT", "LAST SEEN"].map(String::from).to_vec()];
    for d in view.devices() {
        let dash = || "-".to_string();
        rows.push(vec![
            d.device.clone(),
            match &d.reason {
                Some(r) => format!("{} ({r})", d.state),
                None => d.state.clone(),
            },
            if d.groups.is_empty() { dash() } else { d.groups.join(",") },
            d.model.clone().unwrap_or_else(dash),
            d.version.clone().unwrap_or_else(dash),
            d.tokens_per_s.map_or_else(dash, |t| format!("{t:.1}")),
            d.errors.map_or_else(dash, |e| e.to_string()),
            d.drift_alert.map_or_else(dash, |a| if a { "ALERT".into() } else { "ok".into() }),
            d.last_seen.map_or_else(dash, |s| format!("{}s ago", now.saturating_sub(s))),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_and_health_make_one_row_per_device() {
        let mut v = FleetView::new("fleet/eu");
        let status = json!({"schema": 1, "kind": "status", "device": "d1", "state": "online", "ts": 100, "agent_version": "0.1.0", "groups": ["all", "canary"]});
        let health = json!({"schema": 1, "kind": "health", "device": "d1", "seq": 3, "ts": 160,
            "model": {"name": "phi-3", "version": "7"}, "requests": {"tokens_per_s": 12.5, "errors": 2}, "drift": {"alert": true}});
        v.apply("fleet/eu/d1/status", status.to_string().as_bytes()).unwrap();
        let d = v.apply("fleet/eu/d1/health", health.to_string().as_bytes()).unwrap().clone();
        assert_eq!(
            (d.state.as_str(), d.version.as_deref(), d.tokens_per_s, d.errors, d.drift_alert, d.last_seen),
            ("online", Some("7"), Some(12.5), Some(2), Some(true), Some(160))
        );
        assert_eq!(d.reported_at, Some(160));
        assert!(d.in_group("canary") && d.in_group("all") && !d.in_group("beta"));
        let will = json!({"schema": 1, "kind": "status", "device": "d2", "state": "offline", "reason": "connection_lost"});
        v.apply("fleet/eu/d2/status", will.to_string().as_bytes()).unwrap();
        // Not ours, not schema 1, not JSON, a group topic: ignored.
        for (topic, payload) in [
            ("fleet/us/d3/status", status.to_string()),
            ("fleet/eu/d4/status", json!({"schema": 2, "state": "online"}).to_string()),
            ("fleet/eu/d5/status", "online".to_string()),
            ("fleet/eu/group/canary/cmd", status.to_string()),
        ] {
            assert!(v.apply(topic, payload.as_bytes()).is_none(), "{topic}");
        }
        assert_eq!(v.len(), 2);
        let t = table(&v, 200);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[1].starts_with("d1") && lines[1].contains("all,canary") && lines[1].contains("ALERT") && lines[1].contains("40s ago"), "{t}");
        assert!(lines[2].contains("offline (connection_lost)"), "{t}");
    }
}
