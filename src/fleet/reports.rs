//! What the link task puts in the spool: the common message header, events, the periodic
//! health report and the drift report per model version, with the drift baselines it compares
//! against (from the version's artifact or its first window) and their persistence in the
//! spool's database.

use serde_json::{json, Value};

use super::events::Event;
use super::runner::Runner;
use super::spool::Channel;
use super::SCHEMA;
use crate::telemetry::drift::{Assessment, Baseline, BaselineSource, Baselines, Sketch, VersionKey, BASELINE_FILE};
use crate::util::unix_now;

/// Largest `drift_baseline.json` read from a model version (a real sketch is a few KiB).
const MAX_BASELINE_BYTES: u64 = 1 << 20;

/// Largest report accepted into the spool.
const MAX_MESSAGE: usize = 64 * 1024;

/// The baselines persisted in `tree` (the spool's `drift_baselines`); unreadable entries are
/// skipped.
pub(super) fn load_baselines(tree: Option<&sled::Tree>) -> Baselines {
    let mut baselines = Baselines::new();
    if let Some(tree) = tree {
        for (k, v) in tree.iter().flatten() {
            if let (Ok(key), Ok(b)) = (serde_json::from_slice::<VersionKey>(&k), serde_json::from_slice::<Baseline>(&v)) {
                baselines.insert(key, b);
            }
        }
    }
    baselines
}

impl Runner {
    /// Spools one message: the common header (schema, kind, device, seq, ts) and `body`.
    fn push(&mut self, channel: Channel, kind: &str, body: serde_json::Map<String, Value>) -> Result<u64, String> {
        let seq = self.spool.next_seq();
        let mut m = serde_json::Map::new();
        m.insert("schema".into(), json!(SCHEMA));
        m.insert("kind".into(), json!(kind));
        m.insert("device".into(), json!(self.s.device_id));
        m.insert("seq".into(), json!(seq));
        m.insert("ts".into(), json!(unix_now()));
        m.extend(body);
        let bytes = serde_json::to_vec(&Value::Object(m)).unwrap_or_default();
        if bytes.len() > MAX_MESSAGE {
            tracing::error!(channel = channel.topic_suffix(), size = bytes.len(), "a report is too large to send; dropped");
            return Err(format!("the {} report is too large ({} bytes)", channel.topic_suffix(), bytes.len()));
        }
        self.spooled();
        match self.spool.push(channel, move |_| bytes) {
            Ok(p) => {
                if p.dropped > 0 {
                    tracing::warn!(dropped = p.dropped, "the spool is full; dropped the oldest messages");
                    self.overflow_unreported += p.dropped;
                }
                Ok(p.seq)
            }
            Err(e) => {
                tracing::error!(error = %e, "spooling a report failed");
                Err(e.to_string())
            }
        }
    }

    pub(super) fn push_event(&mut self, event: Event) {
        let body = match serde_json::to_value(&event) {
            Ok(Value::Object(m)) => m,
            _ => return,
        };
        let _ = self.push(Channel::Events, "event", body);
    }

    pub(super) async fn push_health(&mut self) {
        let sampler = self.sampler.clone();
        let host = tokio::task::spawn_blocking(move || sampler.lock().map(|mut s| s.sample()).ok()).await.ok().flatten();
        let requests = self.metrics.as_ref().map(|m| self.requests.report(m));
        let status = self.status.borrow().clone();
        let link = json!({
            "protocol": self.state.protocol,
            "connections": self.state.connections,
            "reconnects": self.state.reconnects,
            "spool_depth": self.spool.len(),
            "spool_dropped": self.spool.dropped_total(),
            "commands_refused": self.state.commands_refused,
        });
        let agent = json!({"version": env!("CARGO_PKG_VERSION"), "uptime_s": self.started.elapsed().as_secs(), "started_at": status.started_at});
        let pushed = {
            let mut m = serde_json::Map::new();
            m.insert("agent".into(), agent);
            m.insert("host".into(), serde_json::to_value(&host).unwrap_or(Value::Null));
            m.insert("model".into(), serde_json::to_value(&status.model).unwrap_or(Value::Null));
            m.insert("registry".into(), serde_json::to_value(&status.registry).unwrap_or(Value::Null));
            m.insert("pinned".into(), json!(status.pinned));
            m.insert("requests".into(), serde_json::to_value(&requests).unwrap_or(Value::Null));
            m.insert("link".into(), link);
            m.insert("drift".into(), self.last_drift.clone().unwrap_or(Value::Null));
            self.push(Channel::Health, "health", m)
        };
        for run in std::mem::take(&mut self.pending_reports) {
            let outcome = pushed.clone().map(|seq| json!({"health_seq": seq}));
            self.command_done(run, Ok(outcome));
        }
    }

    /// Looks for `drift_baseline.json` in the version's folder the first time a version
    /// is seen (only the active version's folder is known).
    async fn check_artifact(&mut self, key: &VersionKey) {
        if self.artifacts_checked.contains(key) || self.baselines.get(key).is_some_and(|b| b.source == BaselineSource::Artifact) {
            return;
        }
        let dir = {
            let status = self.status.borrow();
            status.model.as_ref().filter(|m| m.name == key.model && m.version == key.version).and_then(|m| m.dir.clone())
        };
        let Some(dir) = dir else { return };
        if self.artifacts_checked.len() > 64 {
            self.artifacts_checked.clear();
        }
        self.artifacts_checked.insert(key.clone());
        let path = dir.join(BASELINE_FILE);
        // A sketch is a few KiB; the file comes with the artifact, whose author may not be kind.
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || crate::util::read_capped(&path, MAX_BASELINE_BYTES)).await
        };
        match read {
            Ok(Ok(bytes)) => match serde_json::from_slice::<Sketch>(&bytes) {
                Ok(sketch) => {
                    tracing::info!(path = %path.display(), n = sketch.n, "drift baseline from the model version's artifact");
                    self.baselines.insert(key.clone(), Baseline { source: BaselineSource::Artifact, sketch });
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable drift baseline; the first window will be the baseline"),
            },
            Ok(Err(crate::util::CappedRead::Io(e))) if e.kind() == std::io::ErrorKind::NotFound => {}
            Ok(Err(crate::util::CappedRead::TooLarge { limit })) => {
                tracing::warn!(path = %path.display(), limit, "ignoring a drift baseline larger than any sketch; the first window will be the baseline");
            }
            Ok(Err(e)) => tracing::warn!(path = %path.display(), error = %e, "reading the drift baseline failed"),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "reading the drift baseline failed"),
        }
    }

    pub(super) async fn push_drift(&mut self) {
        let Some(recorder) = self.drift.clone() else { return };
        let (windows, dropped) = recorder.take();
        if dropped > 0 {
            tracing::warn!(dropped, "requests of too many model versions in one drift window were not recorded");
        }
        let interval = self.drift_jitter.interval.as_secs();
        let mut any_alert = false;
        for w in windows {
            self.check_artifact(&w.key).await;
            let assessment = self.baselines.assess(&w, &self.s.drift);
            let (baseline, divergence, alert) = match &assessment {
                Assessment::Compared { baseline, baseline_n, comparison } => {
                    (json!({"source": baseline, "n": baseline_n}), serde_json::to_value(&comparison.features).unwrap_or(Value::Null), comparison.alert)
                }
                Assessment::Baseline { n, established } => {
                    if *established {
                        self.persist_baseline(&w.key);
                    }
                    (json!({"source": "first_window", "n": n, "established": established}), Value::Null, false)
                }
            };
            if alert {
                tracing::warn!(model = %w.key.model, version = %w.key.version, "drift alert");
            }
            any_alert |= alert;
            self.last_drift = Some(json!({"alert": any_alert, "model": w.key.model, "version": w.key.version, "ts": w.last}));
            let t = self.s.drift;
            {
                let mut m = serde_json::Map::new();
                m.insert("model".into(), json!(w.key.model));
                m.insert("version".into(), json!(w.key.version));
                m.insert("window".into(), json!({"from": w.first, "to": w.last, "interval_s": interval}));
                m.insert("n".into(), json!(w.sketch.n));
                m.insert("sketch".into(), serde_json::to_value(&w.sketch).unwrap_or(Value::Null));
                m.insert("baseline".into(), baseline);
                m.insert("divergence".into(), divergence);
                m.insert("alert".into(), json!(alert));
                m.insert("thresholds".into(), json!({"psi": t.psi, "js": t.js, "min_samples": t.min_samples}));
                let _ = self.push(Channel::Drift, "drift", m);
            }
        }
    }

    fn persist_baseline(&self, key: &VersionKey) {
        let (Some(tree), Some(b)) = (&self.baseline_tree, self.baselines.get(key)) else { return };
        if let (Ok(k), Ok(v)) = (serde_json::to_vec(key), serde_json::to_vec(b)) {
            if let Err(e) = tree.insert(k, v) {
                tracing::warn!(error = %e, "storing the drift baseline failed");
            }
        }
    }
}
