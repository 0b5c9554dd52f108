//! `[registry]`: which MLflow server and model to follow, how often, and how to talk to it;
//! [`RegistryConfig::resolve`] types and checks it, naming each bad key.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::util::{duration, parse_size};
/// `[registry]`: where models come from (an MLflow Model Registry) and how to talk to it.
/// Durations are strings (`"30s"`, `"5m"`); [`RegistryConfig::resolve`] checks and types them.
/// Credentials never live here: `MLFLOW_TRACKING_TOKEN`, or `MLFLOW_TRACKING_USERNAME` and
/// `MLFLOW_TRACKING_PASSWORD`, come from the environment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Base URL of the MLflow tracking server, e.g. `https://mlflow.example.internal:5000`.
    pub url: Option<String>,
    /// Registered model name.
    pub model: Option<String>,
    /// Follow the latest version in this stage (`Production` unless `alias` is set).
    pub stage: Option<String>,
    /// Follow the version this alias points at (instead of a stage).
    pub alias: Option<String>,
    /// PEM file of the CAs to trust instead of the system store.
    pub ca_bundle: Option<PathBuf>,
    pub connect_timeout: String,
    /// Whole-request timeout for API calls (not downloads).
    pub request_timeout: String,
    /// A download that receives nothing for this long, or less than 1 KiB/s on average over
    /// this long (a server trickling bytes to beat the timeout), is dropped and resumed.
    pub read_timeout: String,
    /// Attempts per request or file, the first included.
    pub attempts: u32,
    pub backoff_initial: String,
    pub backoff_max: String,
    pub poll_interval: String,
    /// Fraction of `poll_interval` by which each device's polls are spread, in [0, 1).
    pub poll_jitter: f64,
    /// Files downloaded at once.
    pub parallel_downloads: usize,
    /// Download rate cap for metered links, e.g. `"2MiB/s"`; unset means no cap.
    pub bandwidth_limit: Option<String>,
    /// Send credentials from the environment over `http://` to a host that is not this
    /// machine. Off: such a configuration is refused (anyone on the path reads them).
    pub allow_plaintext_credentials: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            url: None,
            model: None,
            stage: None,
            alias: None,
            ca_bundle: None,
            connect_timeout: "10s".into(),
            request_timeout: "30s".into(),
            read_timeout: "60s".into(),
            attempts: 5,
            backoff_initial: "500ms".into(),
            backoff_max: "30s".into(),
            poll_interval: "5m".into(),
            poll_jitter: 0.1,
            parallel_downloads: 4,
            bandwidth_limit: None,
            allow_plaintext_credentials: false,
        }
    }
}

/// The registry URL's problems: its scheme, credentials in it (they belong in the
/// environment; the message never repeats them), and credentials (`has_credentials`) that
/// would cross plaintext to another machine.
fn check_url(url: &str, allow_plaintext: bool, has_credentials: bool, p: &mut Vec<String>) {
    let shown = crate::util::redact_url(url);
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        p.push(format!("registry.url: `{shown}` must start with http:// or https://"));
        return;
    }
    let Ok(parsed) = reqwest::Url::parse(url) else {
        p.push(format!("registry.url: `{shown}` is not a URL"));
        return;
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        p.push(format!(
            "registry.url: `{shown}` holds credentials; set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, in the environment instead"
        ));
    }
    let local = parsed.host_str().is_some_and(crate::util::is_loopback_host);
    if parsed.scheme() == "http" && has_credentials && !local && !allow_plaintext {
        p.push(format!(
            "registry.url: `{shown}` is plain http:// to another machine, and registry credentials are set in the environment: use https://, or set registry.allow_plaintext_credentials = true if the network is trusted"
        ));
    }
}

/// Which registry version to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stage(String),
    Alias(String),
}

/// `[registry]` with every value checked and typed.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub url: Option<String>,
    pub model: Option<String>,
    pub target: Target,
    pub ca_bundle: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub read_timeout: Duration,
    pub backoff: crate::backoff::Backoff,
    pub poll_interval: Duration,
    pub poll_jitter: f64,
    pub parallel_downloads: usize,
    /// Bytes per second; `None` means no cap.
    pub bandwidth_limit: Option<u64>,
}

impl RegistryConfig {
    /// Checks and types every value.
    ///
    /// # Errors
    /// Every problem found, each as `registry.key: message`.
    pub fn resolve(&self) -> Result<RegistrySettings, Vec<String>> {
        let mut p = Vec::new();
        let target = match (&self.stage, &self.alias) {
            (Some(_), Some(_)) => {
                p.push("registry.stage, registry.alias: set one or the other, not both".to_string());
                Target::Stage(String::new())
            }
            (_, Some(a)) => Target::Alias(a.clone()),
            (Some(s), None) => Target::Stage(s.clone()),
            (None, None) => Target::Stage("Production".into()),
        };
        match &target {
            Target::Stage(s) if s.is_empty() && self.alias.is_none() => p.push("registry.stage: is empty".to_string()),
            Target::Alias(a) if a.is_empty() => p.push("registry.alias: is empty".to_string()),
            _ => {}
        }
        if let Some(url) = &self.url {
            check_url(url, self.allow_plaintext_credentials, !matches!(super::Auth::from_env(), super::Auth::None), &mut p);
        }
        if self.model.as_deref() == Some("") {
            p.push("registry.model: is empty".to_string());
        }
        let connect_timeout = duration("registry.connect_timeout", &self.connect_timeout, &mut p);
        let request_timeout = duration("registry.request_timeout", &self.request_timeout, &mut p);
        let read_timeout = duration("registry.read_timeout", &self.read_timeout, &mut p);
        let initial = duration("registry.backoff_initial", &self.backoff_initial, &mut p);
        let max = duration("registry.backoff_max", &self.backoff_max, &mut p);
        let poll_interval = duration("registry.poll_interval", &self.poll_interval, &mut p);
        if self.attempts == 0 {
            p.push("registry.attempts: must be at least 1".to_string());
        }
        if !(0.0..1.0).contains(&self.poll_jitter) {
            p.push(format!("registry.poll_jitter: {} must be in [0, 1)", self.poll_jitter));
        }
        if self.parallel_downloads == 0 || self.parallel_downloads > 64 {
            p.push(format!("registry.parallel_downloads: {} must be between 1 and 64", self.parallel_downloads));
        }
        let bandwidth_limit = self.bandwidth_limit.as_deref().and_then(|s| {
            let bytes = s.trim().strip_suffix("/s").map(|b| parse_size(b.trim()));
            match bytes {
                Some(Ok(0)) | Some(Err(_)) | None => {
                    p.push(format!("registry.bandwidth_limit: `{s}` is not a rate such as \"2MiB/s\" or \"500kB/s\""));
                    None
                }
                Some(Ok(b)) => Some(b),
            }
        });
        if !p.is_empty() {
            return Err(p);
        }
        Ok(RegistrySettings {
            url: self.url.as_ref().map(|u| u.trim_end_matches('/').to_string()),
            model: self.model.clone(),
            target,
            ca_bundle: self.ca_bundle.clone(),
            connect_timeout,
            request_timeout,
            read_timeout,
            backoff: crate::backoff::Backoff { initial, max, max_attempts: self.attempts },
            poll_interval,
            poll_jitter: self.poll_jitter,
            parallel_downloads: self.parallel_downloads,
            bandwidth_limit,
        })
    }
}
