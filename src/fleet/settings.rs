//! `[fleet]`: the MQTT broker, this device's identity and topics, TLS material, intervals,
//! drift thresholds, the spool and command signatures. Kept as strings like the other
//! sections and typed by [`FleetConfig::resolve`], which reports every problem at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::backoff::Backoff;
use crate::telemetry::drift::Thresholds;
use crate::util::duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// `mqtt://host[:1883]` or `mqtts://host[:8883]`; unset: the fleet link is off.
    pub broker: Option<String>,
    /// This device's name in topics; unset: `/etc/machine-id` (then the hostname).
    pub device_id: Option<String>,
    /// Topics are `<topic_prefix>/<device_id>/...`.
    pub topic_prefix: String,
    /// Groups this device belongs to: it also obeys commands published to
    /// `<topic_prefix>/group/<group>/cmd/<name>`. Every device is in the group `all`.
    pub groups: Vec<String>,
    /// `auto` (MQTT 5, falling back to 3.1.1 when the broker refuses it), `5` or `3.1.1`.
    pub protocol: String,
    /// PEM file of the CAs to trust for `mqtts://`; unset: the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) and key for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Environment variables holding the MQTT username and password (never this file).
    pub username_env: String,
    pub password_env: String,
    pub keep_alive: String,
    pub connect_timeout: String,
    pub backoff_initial: String,
    pub backoff_max: String,
    /// Health reports.
    pub report_interval: String,
    /// Drift windows (a window without requests publishes nothing).
    pub drift_interval: String,
    pub drift_min_samples: u64,
    pub drift_psi_threshold: f64,
    pub drift_js_threshold: f64,
    /// Where health, drift and events wait while the broker is unreachable; unset:
    /// `$STATE_DIRECTORY/fleet-spool`, else `/var/lib/edgeflow/fleet-spool`.
    pub spool_dir: Option<PathBuf>,
    /// Bytes the spool may hold; the oldest messages are dropped (and counted) beyond it.
    pub spool_max_bytes: String,
    /// Duplicate request ids within this window are answered from the first result.
    pub command_window: String,
    /// Hex-encoded ed25519 public key of the fleet; commands signed with it are verified.
    pub signature_public_key: Option<String>,
    /// Refuse commands that are not signed with `signature_public_key`. Unset: required when
    /// a key is configured; with no key, the fleet link refuses to start until this is set to
    /// `false` explicitly (anyone who may publish on the command topics then controls the
    /// device) or a key is configured.
    pub require_signatures: Option<bool>,
    /// Longest validity (`expires_at - issued_at`) a signed command may claim.
    pub signature_max_age: String,
    /// Send the MQTT password over `mqtt://` (no TLS) to a broker that is not this machine.
    /// Off: such a configuration is refused (anyone on the path reads it).
    pub allow_plaintext_credentials: bool,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            broker: None,
            device_id: None,
            topic_prefix: "edgeflow".into(),
            groups: Vec::new(),
            protocol: "auto".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username_env: "EDGEFLOW_MQTT_USERNAME".into(),
            password_env: "EDGEFLOW_MQTT_PASSWORD".into(),
            keep_alive: "60s".into(),
            connect_timeout: "15s".into(),
            backoff_initial: "1s".into(),
            backoff_max: "5m".into(),
            report_interval: "2m".into(),
            drift_interval: "15m".into(),
            drift_min_samples: 100,
            drift_psi_threshold: 0.25,
            drift_js_threshold: 0.2,
            spool_dir: None,
            spool_max_bytes: "4MiB".into(),
            command_window: "10m".into(),
            signature_public_key: None,
            require_signatures: None,
            signature_max_age: "5m".into(),
            allow_plaintext_credentials: false,
        }
    }
}

/// Which MQTT version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 5, and 3.1.1 when the broker refuses 5.
    Auto,
    V5,
    V311,
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "{}://{host}:{}", if self.tls { "mqtts" } else { "mqtt" }, self.port)
    }
}

/// `[fleet]` with every value checked and typed, credentials read from the environment.
#[derive(Clone)]
pub struct FleetSettings {
    pub broker: Broker,
    pub device_id: String,
    pub topic_prefix: String,
    /// The groups from the config, without the implicit `all`.
    pub groups: Vec<String>,
    pub protocol: Protocol,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    pub backoff: Backoff,
    pub report_interval: Duration,
    pub drift_interval: Duration,
    pub drift: Thresholds,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub command_window: Duration,
    pub signature_key: Option<Arc<ed25519_dalek::VerifyingKey>>,
    pub require_signatures: bool,
    pub signature_max_age: Duration,
}

impl std::fmt::Debug for FleetSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSettings")
            .field("broker", &self.broker.to_string())
            .field("device_id", &self.device_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("groups", &self.groups)
            .field("protocol", &self.protocol)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("report_interval", &self.report_interval)
            .field("drift_interval", &self.drift_interval)
            .field("spool_dir", &self.spool_dir)
            .field("require_signatures", &self.require_signatures)
            .finish_non_exhaustive()
    }
}

impl FleetConfig {
    /// `fleet-spool` beside the default cache folder, in the daemon's state directory.
    pub fn default_spool_dir() -> PathBuf {
        let cache = crate::cache::settings::CacheConfig::default_dir();
        cache.parent().map_or_else(|| PathBuf::from("/var/lib/edgeflow"), PathBuf::from).join("fleet-spool")
    }

    /// Checks every value, with or without a broker (for `Config::validate`).
    pub fn problems(&self) -> Vec<String> {
        match self.check() {
            Ok(_) => Vec::new(),
            Err(p) => p,
        }
    }

    /// Checks and types every value; `Ok(None)` when no broker is configured (link off).
    ///
    /// # Errors
    /// Every problem found, each as `fleet.key: message`.
    pub fn resolve(&self) -> Result<Option<FleetSettings>, Vec<String>> {
        self.check()
    }

    fn check(&self) -> Result<Option<FleetSettings>, Vec<String>> {
        let mut p = Vec::new();
        let link = self.check_link(&mut p);
        let reports = self.check_reports(&mut p);
        let commands = self.check_commands(&mut p);
        if let (Some(b), true) = (&link.broker, p.is_empty()) {
            if b.tls {
                // Load the TLS material once now so a bad file is a config error at startup.
                if let Err(e) = super::tls::client_config(self.ca_file.as_deref(), self.cert_file.as_deref().zip(self.key_file.as_deref())) {
                    p.push(format!("fleet: {e}"));
                }
            }
        }
        if !p.is_empty() {
            return Err(p);
        }
        let Some(broker) = link.broker else { return Ok(None) };
        Ok(Some(FleetSettings {
            broker,
            device_id: link.device_id,
            topic_prefix: link.topic_prefix,
            groups: link.groups,
            protocol: link.protocol,
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            username: link.username,
            password: link.password,
            keep_alive: link.keep_alive,
            connect_timeout: link.connect_timeout,
            backoff: link.backoff,
            report_interval: reports.report_interval,
            drift_interval: reports.drift_interval,
            drift: reports.drift,
            spool_dir: self.spool_dir.clone().unwrap_or_else(Self::default_spool_dir),
            spool_max_bytes: reports.spool_max_bytes,
            command_window: commands.command_window,
            signature_key: commands.signature_key,
            require_signatures: commands.require_signatures,
            signature_max_age: commands.signature_max_age,
        }))
    }

    /// What a console needs of this section: how to reach the broker. The device id, reports
    /// and command settings are a device's, and not checked.
    ///
    /// # Errors
    /// Every problem found, each as `fleet.key: message`.
    pub fn console_link(&self) -> Result<ConsoleLink, Vec<String>> {
        let mut p = Vec::new();
        let link = self.check_link(&mut p);
        p.retain(|m| !m.starts_with("fleet.device_id") && !m.starts_with("fleet.groups"));
        let mut tls = None;
        if let (Some(b), true) = (&link.broker, p.is_empty()) {
            if b.tls {
                match super::tls::client_config(self.ca_file.as_deref(), self.cert_file.as_deref().zip(self.key_file.as_deref())) {
                    Ok(c) => tls = Some(c),
                    Err(e) => p.push(format!("fleet: {e}")),
                }
            }
        }
        match link.broker {
            Some(broker) if p.is_empty() => Ok(ConsoleLink {
                broker,
                topic_prefix: link.topic_prefix,
                protocol: link.protocol,
                tls,
                username: link.username,
                password: link.password,
                keep_alive: link.keep_alive,
                connect_timeout: link.connect_timeout,
            }),
            None if p.is_empty() => Err(vec!["fleet.broker: not set".to_string()]),
            _ => Err(p),
        }
    }

    /// The connection: broker, identity, topics, protocol, TLS files, credentials, timers.
    fn check_link(&self, p: &mut Vec<String>) -> LinkPart {
        let broker = self.broker.as_deref().and_then(|b| match parse_broker(b) {
            Ok(b) => Some(b),
            Err(e) => {
                p.push(format!("fleet.broker: {e}"));
                None
            }
        });
        let device_id = match &self.device_id {
            Some(d) => d.trim().to_string(),
            None => crate::backoff::machine_id(),
        };
        if let Err(e) = topic_level(&device_id) {
            p.push(format!("fleet.device_id: `{}` {e}", crate::util::truncate(&device_id, 80)));
        }
        if device_id == super::topics::GROUP_LEVEL {
            p.push(format!("fleet.device_id: `{}` is reserved for group topics (`<prefix>/group/<group>/...`)", super::topics::GROUP_LEVEL));
        }
        let groups = self.check_groups(p);
        let topic_prefix = self.topic_prefix.trim().to_string();
        if topic_prefix.is_empty()
            || topic_prefix.starts_with('/')
            || topic_prefix.ends_with('/')
            || topic_prefix.split('/').any(|l| topic_level(l).is_err())
            || topic_prefix.starts_with('$')
        {
            p.push(format!("fleet.topic_prefix: `{topic_prefix}` must be topic levels separated by `/`, without wildcards, empty levels or a leading `$`"));
        }
        let protocol = match self.protocol.trim() {
            "auto" => Protocol::Auto,
            "5" | "5.0" => Protocol::V5,
            "3.1.1" | "4" => Protocol::V311,
            other => {
                p.push(format!("fleet.protocol: `{other}` must be \"auto\", \"5\" or \"3.1.1\""));
                Protocol::Auto
            }
        };
        for (key, path) in [("fleet.ca_file", &self.ca_file), ("fleet.cert_file", &self.cert_file), ("fleet.key_file", &self.key_file)] {
            if let Some(path) = path {
                if !path.is_file() {
                    p.push(format!("{key}: {} is not a readable file", path.display()));
                }
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            p.push("fleet.cert_file, fleet.key_file: set both for mutual TLS, or neither".to_string());
        }
        if broker.as_ref().is_some_and(|b| !b.tls) && (self.ca_file.is_some() || self.cert_file.is_some()) {
            p.push("fleet.broker: TLS files are configured but the broker URL is mqtt://, not mqtts://".to_string());
        }
        let env = |key: &str, var: &str, p: &mut Vec<String>| -> Option<String> {
            if var.is_empty() {
                p.push(format!("fleet.{key}: is empty"));
                return None;
            }
            std::env::var(var).ok().filter(|v| !v.is_empty())
        };
        let username = env("username_env", &self.username_env, p);
        let password = env("password_env", &self.password_env, p);
        if password.is_some() && username.is_none() {
            p.push(format!("fleet.password_env: {} is set but {} (the username) is not", self.password_env, self.username_env));
        }
        if let Some(b) = broker.as_ref().filter(|b| !b.tls && !crate::util::is_loopback_host(&b.host)) {
            if password.is_some() && !self.allow_plaintext_credentials {
                p.push(format!(
                    "fleet.broker: {b} is plain mqtt:// to another machine, and {} holds a password: use mqtts://, or set fleet.allow_plaintext_credentials = true if the network is trusted",
                    self.password_env
                ));
            }
        }
        let keep_alive = duration("fleet.keep_alive", &self.keep_alive, p);
        if !keep_alive.is_zero() && (keep_alive < Duration::from_secs(5) || keep_alive > Duration::from_secs(65535)) {
            p.push("fleet.keep_alive: must be between 5s and 65535s".to_string());
        }
        let connect_timeout = duration("fleet.connect_timeout", &self.connect_timeout, p);
        let initial = duration("fleet.backoff_initial", &self.backoff_initial, p);
        let max = duration("fleet.backoff_max", &self.backoff_max, p);
        if max < initial {
            p.push("fleet.backoff_max: must not be shorter than fleet.backoff_initial".to_string());
        }
        LinkPart { broker, device_id, topic_prefix, groups, protocol, username, password, keep_alive, connect_timeout, backoff: Backoff { initial, max, max_attempts: u32::MAX } }
    }

    /// `fleet.groups`: topic levels, each once, at most [`MAX_GROUPS`].
    fn check_groups(&self, p: &mut Vec<String>) -> Vec<String> {
        let mut groups: Vec<String> = Vec::new();
        for g in &self.groups {
            let g = g.trim();
            match topic_level(g) {
                Err(e) => p.push(format!("fleet.groups: `{}` {e}", crate::util::truncate(g, 80))),
                Ok(()) if g.len() > MAX_GROUP_LEN => p.push(format!("fleet.groups: `{}` is longer than {MAX_GROUP_LEN} bytes", crate::util::truncate(g, 80))),
                Ok(()) if g == super::topics::ALL => p.push(format!("fleet.groups: every device is in `{g}` already; leave it out")),
                Ok(()) if groups.iter().any(|have| have == g) => p.push(format!("fleet.groups: `{g}` is listed twice")),
                Ok(()) => groups.push(g.to_string()),
            }
        }
        if self.groups.len() > MAX_GROUPS {
            p.push(format!("fleet.groups: {} groups; at most {MAX_GROUPS} (each is a subscription on the broker)", self.groups.len()));
        }
        groups
    }

    /// What is reported and how much of it waits offline: intervals, drift thresholds, spool.
    fn check_reports(&self, p: &mut Vec<String>) -> ReportsPart {
        let report_interval = duration("fleet.report_interval", &self.report_interval, p);
        let drift_interval = duration("fleet.drift_interval", &self.drift_interval, p);
        if self.drift_min_samples == 0 {
            p.push("fleet.drift_min_samples: must be at least 1".to_string());
        }
        if !(self.drift_psi_threshold.is_finite() && self.drift_psi_threshold > 0.0) {
            p.push(format!("fleet.drift_psi_threshold: {} must be a positive number", self.drift_psi_threshold));
        }
        if !(self.drift_js_threshold > 0.0 && self.drift_js_threshold <= 1.0) {
            p.push(format!("fleet.drift_js_threshold: {} must be in (0, 1]", self.drift_js_threshold));
        }
        let spool_max_bytes = match crate::util::parse_size(&self.spool_max_bytes) {
            Ok(b) if (64 * 1024..=(1u64 << 34)).contains(&b) => b,
            _ => {
                p.push(format!("fleet.spool_max_bytes: `{}` must be a size between 64KiB and 16GiB", self.spool_max_bytes));
                0
            }
        };
        let drift = Thresholds { psi: self.drift_psi_threshold, js: self.drift_js_threshold, min_samples: self.drift_min_samples };
        ReportsPart { report_interval, drift_interval, drift, spool_max_bytes }
    }

    /// Which commands are obeyed: the replay window and the signature policy.
    fn check_commands(&self, p: &mut Vec<String>) -> CommandsPart {
        let command_window = duration("fleet.command_window", &self.command_window, p);
        let signature_max_age = duration("fleet.signature_max_age", &self.signature_max_age, p);
        let signature_key = self.signature_public_key.as_deref().and_then(|k| match parse_public_key(k) {
            Ok(k) => Some(Arc::new(k)),
            Err(e) => {
                p.push(format!("fleet.signature_public_key: {e}"));
                None
            }
        });
        // Secure by default: a key means only signed commands run; no key is an explicit choice.
        let require_signatures = match (self.require_signatures, self.signature_public_key.is_some()) {
            (Some(true), false) => {
                p.push("fleet.require_signatures: needs fleet.signature_public_key".to_string());
                true
            }
            (None, false) if self.broker.is_some() => {
                p.push(
                    "fleet.signature_public_key: not set, so fleet commands cannot be verified: set it (see `edgeflow fleet keygen`), or set \
                     fleet.require_signatures = false to obey unsigned commands from anyone who may publish on this device's command topics"
                        .to_string(),
                );
                true
            }
            (Some(require), _) => require,
            (None, has_key) => has_key,
        };
        CommandsPart { command_window, signature_key, signature_max_age, require_signatures }
    }
}

/// How a console reaches the broker ([`FleetConfig::console_link`]).
pub struct ConsoleLink {
    pub broker: Broker,
    pub topic_prefix: String,
    pub protocol: Protocol,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
}

/// [`FleetConfig::check_link`]'s typed values.
struct LinkPart {
    broker: Option<Broker>,
    device_id: String,
    topic_prefix: String,
    groups: Vec<String>,
    protocol: Protocol,
    username: Option<String>,
    password: Option<String>,
    keep_alive: Duration,
    connect_timeout: Duration,
    backoff: Backoff,
}

/// [`FleetConfig::check_reports`]'s typed values.
struct ReportsPart {
    report_interval: Duration,
    drift_interval: Duration,
    drift: Thresholds,
    spool_max_bytes: u64,
}

/// [`FleetConfig::check_commands`]'s typed values.
struct CommandsPart {
    require_signatures: bool,
    command_window: Duration,
    signature_key: Option<Arc<ed25519_dalek::VerifyingKey>>,
    signature_max_age: Duration,
}

/// Groups a device may be in (besides `all`).
const MAX_GROUPS: usize = 16;
/// Longest group name.
const MAX_GROUP_LEN: usize = 64;

/// One topic level: non-empty, no wildcards or separators, printable, at most 128 bytes.
pub fn topic_level(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        Err("is empty")
    } else if s.len() > 128 {
        Err("is longer than 128 bytes")
    } else if s.chars().any(|c| matches!(c, '/' | '+' | '#') || c.is_control() || c.is_whitespace()) {
        Err("must not contain `/`, `+`, `#`, spaces or control characters")
    } else {
        Ok(())
    }
}

/// Parses `mqtt://host[:port]` / `mqtts://host[:port]`; IPv6 hosts in brackets.
///
/// # Errors
/// What is wrong with the URL.
pub fn parse_broker(url: &str) -> Result<Broker, String> {
    let url = url.trim();
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!("`{url}` must start with mqtt:// or mqtts://"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '@', '?', '#']) {
        return Err(format!("`{url}` must be just a scheme, host and port (credentials come from the environment)"));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or_else(|| format!("`{url}`: unclosed `[`"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("`{url}`: unexpected `{after}` after the address")),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("`{url}`: `{p}` is not a port"))?,
    };
    Ok(Broker { host, port, tls })
}

/// A 32-byte ed25519 public key in hex (64 characters).
///
/// # Errors
/// Not hex, wrong length, or not a valid curve point.
pub fn parse_public_key(s: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
    let bytes = hex::decode(s.trim()).map_err(|_| "is not hex".to_string())?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| "must be 32 bytes (64 hex characters)".to_string())?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| "is not a valid ed25519 public key".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        let table = [
            ("mqtt://127.0.0.1", Broker { host: "127.0.0.1".into(), port: 1883, tls: false }),
            ("mqtts://broker.internal", Broker { host: "broker.internal".into(), port: 8883, tls: true }),
            ("mqtt://localhost:1884/", Broker { host: "localhost".into(), port: 1884, tls: false }),
            ("mqtts://[::1]:9000", Broker { host: "::1".into(), port: 9000, tls: true }),
        ];
        for (url, want) in table {
            assert_eq!(parse_broker(url).as_ref(), Ok(&want), "{url}");
        }
        assert_eq!(parse_broker("mqtts://[::1]:9000").unwrap().to_string(), "mqtts://[::1]:9000");
        for bad in ["http://x", "mqtt://", "mqtt://h:0", "mqtt://h:99999", "mqtt://user:pw@h", "mqtt://h/topic", "mqtt://[::1"] {
            assert!(parse_broker(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_resolve_without_a_broker_and_with_one() {
        let c = FleetConfig::default();
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert!(c.resolve().unwrap().is_none(), "no broker: the link is off");
        let c = FleetConfig { broker: Some("mqtt://127.0.0.1:1883".into()), device_id: Some("dev-1".into()), require_signatures: Some(false), ..FleetConfig::default() };
        let s = c.resolve().unwrap().unwrap();
        assert_eq!((s.report_interval, s.drift_interval, s.keep_alive), (Duration::from_secs(120), Duration::from_secs(900), Duration::from_secs(60)));
        assert_eq!(s.spool_max_bytes, 4 << 20);
        assert_eq!(s.protocol, Protocol::Auto);
        assert!(!format!("{s:?}").contains("password: Some(\""));
    }

    #[test]
    fn a_key_means_signatures_are_required_and_no_key_must_be_an_explicit_choice() {
        let public = hex::encode(ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key().as_bytes());
        let base = || FleetConfig { broker: Some("mqtt://127.0.0.1:1883".into()), device_id: Some("dev-1".into()), ..FleetConfig::default() };
        // No key and no word on signatures: the link does not start.
        let p = base().problems();
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].starts_with("fleet.signature_public_key: not set") && p[0].contains("require_signatures = false"), "{p:#?}");
        // No key, unsigned commands chosen explicitly.
        let open = FleetConfig { require_signatures: Some(false), ..base() }.resolve().unwrap().unwrap();
        assert!(!open.require_signatures && open.signature_key.is_none());
        // A key and nothing else: only signed commands run.
        let keyed = FleetConfig { signature_public_key: Some(public.clone()), ..base() }.resolve().unwrap().unwrap();
        assert!(keyed.require_signatures && keyed.signature_key.is_some());
        // A key with an explicit opt-out: signed ones are verified, unsigned ones obeyed.
        let both = FleetConfig { signature_public_key: Some(public), require_signatures: Some(false), ..base() }.resolve().unwrap().unwrap();
        assert!(!both.require_signatures && both.signature_key.is_some());
        // The fleet link off (no broker): nothing to require.
        assert!(FleetConfig::default().problems().is_empty());
    }

    #[test]
    fn groups_are_topic_levels_named_once_and_all_is_implicit() {
        let base = || FleetConfig { broker: Some("mqtt://127.0.0.1:1883".into()), device_id: Some("dev-1".into()), require_signatures: Some(false), ..FleetConfig::default() };
        let ok = FleetConfig { groups: vec!["canary".into(), " eu-west ".into()], ..base() }.resolve().unwrap().unwrap();
        assert_eq!(ok.groups, ["canary", "eu-west"]);
        let bad = FleetConfig { groups: vec!["a/b".into(), "all".into(), "x".into(), "x".into(), "g".repeat(65)], ..base() }.problems();
        assert_eq!(bad.len(), 4, "{bad:#?}");
        for (p, want) in bad.iter().zip(["must not contain", "every device is in `all`", "listed twice", "longer than 64"]) {
            assert!(p.starts_with("fleet.groups: ") && p.contains(want), "{p}");
        }
        let many = FleetConfig { groups: (0..17).map(|i| format!("g{i}")).collect(), ..base() }.problems();
        assert!(many.len() == 1 && many[0].contains("at most 16"), "{many:#?}");
        let reserved = FleetConfig { device_id: Some("group".into()), ..base() }.problems();
        assert!(reserved.len() == 1 && reserved[0].contains("reserved"), "{reserved:#?}");
    }

    #[test]
    fn a_console_needs_only_the_broker_side_of_the_section() {
        // No key and no word on signatures: a device's problem, not a console's.
        let c = FleetConfig { broker: Some("mqtt://127.0.0.1:1883".into()), topic_prefix: "fleet/eu".into(), ..FleetConfig::default() };
        assert!(!c.problems().is_empty());
        let link = c.console_link().unwrap();
        assert_eq!((link.broker.port, link.topic_prefix.as_str(), link.protocol, link.tls.is_none()), (1883, "fleet/eu", Protocol::Auto, true));
        assert_eq!(FleetConfig::default().console_link().err(), Some(vec!["fleet.broker: not set".to_string()]));
        let bad = FleetConfig { broker: Some("http://x".into()), protocol: "6".into(), ..FleetConfig::default() }.console_link().err().unwrap();
        assert_eq!(bad.len(), 2, "{bad:#?}");
    }

    #[test]
    fn every_problem_is_reported() {
        let c = FleetConfig {
            broker: Some("http://x".into()),
            device_id: Some("a/b".into()),
            topic_prefix: "fleet/#".into(),
            protocol: "6".into(),
            cert_file: Some("/nonexistent/cert.pem".into()),
            keep_alive: "1s".into(),
            backoff_initial: "1m".into(),
            backoff_max: "1s".into(),
            report_interval: "never".into(),
            drift_min_samples: 0,
            drift_psi_threshold: -1.0,
            drift_js_threshold: 2.0,
            spool_max_bytes: "10".into(),
            signature_public_key: Some("zz".into()),
            require_signatures: Some(true),
            ..FleetConfig::default()
        };
        let p = c.problems();
        for key in [
            "fleet.broker",
            "fleet.device_id",
            "fleet.topic_prefix",
            "fleet.protocol",
            "fleet.cert_file",
            "fleet.cert_file, fleet.key_file",
            "fleet.keep_alive",
            "fleet.backoff_max",
            "fleet.report_interval",
            "fleet.drift_min_samples",
            "fleet.drift_psi_threshold",
            "fleet.drift_js_threshold",
            "fleet.spool_max_bytes",
            "fleet.signature_public_key",
        ] {
            assert!(p.iter().any(|x| x.starts_with(&format!("{key}:"))), "{key} missing from {p:#?}");
        }
        let c = FleetConfig { require_signatures: Some(true), ..FleetConfig::default() };
        assert_eq!(c.problems(), vec!["fleet.require_signatures: needs fleet.signature_public_key".to_string()]);
    }

    #[test]
    fn the_example_config_shows_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let config: crate::config::Config = toml::from_str(&text).unwrap();
        let (shown, default) = (config.fleet, FleetConfig::default());
        assert_eq!(format!("{shown:?}"), format!("{default:?}"), "config.example.toml's [fleet] and FleetConfig::default() disagree");
    }

    #[test]
    fn public_keys_are_checked() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        assert_eq!(parse_public_key(&hex::encode(key.as_bytes())), Ok(key));
        assert!(parse_public_key("abcd").is_err());
        assert!(parse_public_key(&"g".repeat(64)).is_err());
    }
}
