//! The daemon's configuration file: one serde struct per subsystem, unknown keys rejected,
//! defaults in one place. `config.example.toml` documents every key and is parsed by a test.
//!
//! Sections: `[engine]`, `[registry]`, `[cache]`, `[serve]` and `[fleet]` (the last defined
//! beside the fleet link, in `fleet::settings`). Values that need parsing (durations, sizes) are kept as strings here and
//! typed by each section's `resolve`, so `validate` can report every bad value at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// `[fleet]` lives with the fleet link; re-exported so every section is reachable here.
pub use crate::fleet::settings::{FleetConfig, FleetSettings};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub registry: RegistryConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub serve: ServeConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Path of libonnxruntime.so; unset means ORT_DYLIB_PATH, then lib/ next to the
    /// executable, then the system library path.
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads; unset means the cores available to the process.
    pub threads: Option<usize>,
    /// Refuse to load a version that does not fit in the memory left (MemAvailable and the
    /// cgroup's memory.max), instead of being OOM-killed.
    pub memory_check: bool,
    /// Memory to leave besides the weights and the KV cache, e.g. `"256MiB"`.
    pub memory_reserve: String,
    /// Added to the daemon's niceness for the serving engine's threads (as `nice -n`), so
    /// request handling, the fleet link and other programs preempt inference without delay.
    /// (The registry's one-off smoke test of a new version runs at the daemon's priority.)
    pub nice: i32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { ort_lib: None, threads: None, memory_check: true, memory_reserve: "256MiB".into(), nice: 5 }
    }
}

impl EngineConfig {
    /// How the daemon loads models: with the memory budget when `memory_check` is on, the
    /// KV cache sized for the longest request `serve` admits.
    pub fn load_options(&self, serve: &ServeConfig) -> crate::engine::LoadOptions {
        let reserve = parse_size(&self.memory_reserve).unwrap_or(256 << 20);
        let kv_tokens = serve.max_prompt_tokens.map(|p| p + serve.max_tokens);
        crate::engine::LoadOptions { threads: self.threads, ort_lib: self.ort_lib.clone(), memory: self.memory_check.then(|| crate::engine::MemoryBudget::new(reserve, kv_tokens)) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n{}", .problems.len(), .problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

impl Config {
    /// Reads, parses and validates a config file, reporting every problem with its key path.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and each offending key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_checked(path, Config::validate)
    }

    /// As [`Config::load`], with the daemon's requirements ([`Config::daemon_problems`]).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_for_daemon(path: &Path) -> Result<Self, ConfigError> {
        Self::load_checked(path, Config::daemon_problems)
    }

    fn load_checked(path: &Path, check: fn(&Config) -> Vec<String>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        let problems = check(&config);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { path: path.to_path_buf(), problems })
        }
    }

    /// Every problem `edgeflow run` would have with this config: [`Config::validate`]'s,
    /// and the keys the daemon cannot do without.
    pub fn daemon_problems(&self) -> Vec<String> {
        let mut problems = self.validate();
        if self.registry.url.is_none() {
            problems.push("registry.url: required by `edgeflow run` (the MLflow server to follow)".to_string());
        }
        if self.registry.model.is_none() {
            problems.push("registry.model: required by `edgeflow run` (the registered model to serve)".to_string());
        }
        problems
    }

    /// Every problem found, each as `key.path: message`.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.engine.threads == Some(0) {
            problems.push("engine.threads: must be at least 1 (leave unset for the available cores)".to_string());
        }
        if !(0..=19).contains(&self.engine.nice) {
            problems.push(format!("engine.nice: {} must be between 0 and 19", self.engine.nice));
        }
        if parse_size(&self.engine.memory_reserve).is_err() {
            problems.push(format!("engine.memory_reserve: `{}` is not a size such as \"256MiB\"", self.engine.memory_reserve));
        }
        if let Err(p) = self.registry.resolve() {
            problems.extend(p);
        }
        if let Err(p) = self.cache.resolve() {
            problems.extend(p);
        }
        if let Err(p) = self.serve.resolve() {
            problems.extend(p);
        }
        problems.extend(self.fleet.problems());
        problems
    }
}

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
    /// A download that receives nothing for this long is dropped and resumed.
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
        }
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
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                p.push(format!("registry.url: `{url}` must start with http:// or https://"));
            }
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

/// `[cache]`: the local, verified store of model versions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Cache folder; unset means `$STATE_DIRECTORY/cache` under systemd, else
    /// `/var/lib/edgeflow/cache`.
    pub dir: Option<PathBuf>,
    /// Verified versions kept per model besides pinned ones (the active one counts).
    pub keep_versions: usize,
    /// Versions never removed, as `"name@version"`.
    pub pinned: Vec<String>,
    /// Disk budget for blobs and partial downloads, e.g. `"20GiB"`; unset means no limit.
    pub quota: Option<String>,
    /// Partial downloads older than this are discarded at start instead of resumed.
    pub partial_max_age: String,
    /// Re-hash the active version's files when it is loaded.
    pub verify_on_load: bool,
    /// Greedy tokens generated by the smoke test before a version becomes active.
    pub smoke_test_tokens: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { dir: None, keep_versions: 2, pinned: Vec::new(), quota: None, partial_max_age: "7d".into(), verify_on_load: true, smoke_test_tokens: 4 }
    }
}

/// `[cache]` with every value checked and typed.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub dir: PathBuf,
    pub keep_versions: usize,
    /// `(model, version)` pairs.
    pub pinned: Vec<(String, String)>,
    pub quota: Option<u64>,
    pub partial_max_age: Duration,
    pub verify_on_load: bool,
    pub smoke_test_tokens: usize,
}

impl CacheConfig {
    /// The cache folder when none is configured.
    pub fn default_dir() -> PathBuf {
        match std::env::var_os("STATE_DIRECTORY") {
            // systemd may pass several, colon-separated; the first is ours.
            Some(s) if !s.is_empty() => PathBuf::from(s.to_string_lossy().split(':').next().unwrap_or_default()).join("cache"),
            _ => PathBuf::from("/var/lib/edgeflow/cache"),
        }
    }

    /// Checks and types every value.
    ///
    /// # Errors
    /// Every problem found, each as `cache.key: message`.
    pub fn resolve(&self) -> Result<CacheSettings, Vec<String>> {
        let mut p = Vec::new();
        if self.keep_versions == 0 {
            p.push("cache.keep_versions: must be at least 1 (the active version)".to_string());
        }
        let mut pinned = Vec::new();
        for (i, pin) in self.pinned.iter().enumerate() {
            match pin.rsplit_once('@') {
                Some((m, v)) if !m.is_empty() && !v.is_empty() => pinned.push((m.to_string(), v.to_string())),
                _ => p.push(format!("cache.pinned[{i}]: `{pin}` must be \"model@version\"")),
            }
        }
        let quota = self.quota.as_deref().and_then(|q| match parse_size(q) {
            Ok(b) if b > 0 => Some(b),
            _ => {
                p.push(format!("cache.quota: `{q}` is not a size such as \"20GiB\" or \"500MB\""));
                None
            }
        });
        let partial_max_age = duration("cache.partial_max_age", &self.partial_max_age, &mut p);
        if self.smoke_test_tokens == 0 || self.smoke_test_tokens > 64 {
            p.push(format!("cache.smoke_test_tokens: {} must be between 1 and 64", self.smoke_test_tokens));
        }
        if !p.is_empty() {
            return Err(p);
        }
        Ok(CacheSettings {
            dir: self.dir.clone().unwrap_or_else(Self::default_dir),
            keep_versions: self.keep_versions,
            pinned,
            quota,
            partial_max_age,
            verify_on_load: self.verify_on_load,
            smoke_test_tokens: self.smoke_test_tokens,
        })
    }
}

/// `[serve]`: the local OpenAI-compatible API (HTTP/1.1 on a Unix socket).
/// Durations and sizes are strings; [`ServeConfig::resolve`] checks and types them. The
/// bearer token never lives here: `token_env` names the environment variable holding it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Socket path; unset means `$RUNTIME_DIRECTORY/api.sock` under systemd, else
    /// `/run/edgeflow/api.sock`.
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket (TOML octal, e.g. `0o660`).
    pub socket_mode: u32,
    /// Group owning the socket: a name or a gid; unset keeps the daemon's group.
    pub socket_group: Option<crate::serve::GroupSpec>,
    /// When either list is non-empty, only these peer uids / primary gids may use the API.
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    /// Environment variable holding a bearer token required on `/v1/*`; unset: no token.
    pub token_env: Option<String>,
    /// Also listen on this loopback TCP address (e.g. `"127.0.0.1:8080"`); off when unset.
    pub tcp_listen: Option<String>,
    /// Generation requests that may wait for the engine; more are refused with 429.
    pub queue_depth: usize,
    /// Largest request body, e.g. `"1MiB"`; larger ones get 413.
    pub max_body: String,
    /// Largest tokenized prompt; unset means the model's context length minus one.
    pub max_prompt_tokens: Option<usize>,
    /// Largest `max_tokens` a request may ask for (and the default for chat requests).
    pub max_tokens: usize,
    /// From a request's arrival to its last byte, queueing included; then 504.
    pub request_timeout: String,
    /// On shutdown, how long in-flight requests may take to finish.
    pub shutdown_grace: String,
    /// Connections served at once (per listener); more get 503 with `Retry-After`.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, also the idle limit of a kept-alive
    /// connection; then the connection is closed.
    pub header_timeout: String,
    /// Streams send at most one text event per interval (text produced in between is joined);
    /// the first text goes out at once, the rest when generation ends. `"0ms"`: one event per
    /// piece of text.
    pub stream_interval: String,
    /// How a new model version replaces the active one: `overlap` or `stop-the-world`.
    pub swap: crate::active::SwapMode,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            socket: None,
            socket_mode: 0o660,
            socket_group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            token_env: None,
            tcp_listen: None,
            queue_depth: 8,
            max_body: "1MiB".into(),
            max_prompt_tokens: None,
            max_tokens: 1024,
            request_timeout: "5m".into(),
            shutdown_grace: "10s".into(),
            max_connections: 64,
            header_timeout: "10s".into(),
            stream_interval: "5ms".into(),
            swap: crate::active::SwapMode::Overlap,
        }
    }
}

/// `[serve]` with every value checked and typed, and the token read from the environment.
#[derive(Clone)]
pub struct ServeSettings {
    pub socket: crate::serve::SocketOptions,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    pub token: Option<String>,
    pub tcp_listen: Option<std::net::SocketAddr>,
    pub queue_depth: usize,
    pub max_body_bytes: usize,
    pub max_prompt_tokens: Option<usize>,
    pub max_tokens: usize,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub stream_interval: Duration,
    pub swap: crate::active::SwapMode,
}

impl std::fmt::Debug for ServeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeSettings")
            .field("socket", &self.socket)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tcp_listen", &self.tcp_listen)
            .field("queue_depth", &self.queue_depth)
            .finish_non_exhaustive()
    }
}

impl ServeConfig {
    /// The socket path when none is configured.
    pub fn default_socket() -> PathBuf {
        match std::env::var_os("RUNTIME_DIRECTORY") {
            Some(s) if !s.is_empty() => PathBuf::from(s.to_string_lossy().split(':').next().unwrap_or_default()).join("api.sock"),
            _ => PathBuf::from("/run/edgeflow/api.sock"),
        }
    }

    /// Checks and types every value; reads the token from the environment.
    ///
    /// # Errors
    /// Every problem found, each as `serve.key: message`.
    pub fn resolve(&self) -> Result<ServeSettings, Vec<String>> {
        let mut p = Vec::new();
        let socket = self.socket.clone().unwrap_or_else(Self::default_socket);
        // sun_path holds 108 bytes including the terminating NUL.
        if socket.as_os_str().is_empty() || socket.as_os_str().len() > 107 {
            p.push(format!("serve.socket: `{}` must be a path of 1 to 107 bytes", socket.display()));
        }
        if self.socket_mode > 0o777 || self.socket_mode & 0o600 != 0o600 {
            p.push(format!("serve.socket_mode: {:#o} must be permission bits (at most 0o777) that let the owner read and write", self.socket_mode));
        }
        if let Some(crate::serve::GroupSpec::Name(name)) = &self.socket_group {
            if name.is_empty() {
                p.push("serve.socket_group: is empty".to_string());
            }
        }
        let token = match self.token_env.as_deref() {
            None => None,
            Some("") => {
                p.push("serve.token_env: is empty (leave it unset for no token)".to_string());
                None
            }
            Some(var) => match std::env::var(var) {
                Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
                _ => {
                    p.push(format!("serve.token_env: environment variable {var} is not set or empty"));
                    None
                }
            },
        };
        let tcp_listen = self.tcp_listen.as_deref().and_then(|a| match a.parse::<std::net::SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(addr),
            Ok(_) => {
                p.push(format!("serve.tcp_listen: `{a}` is not a loopback address; the API is for local clients"));
                None
            }
            Err(_) => {
                p.push(format!("serve.tcp_listen: `{a}` is not an address such as \"127.0.0.1:8080\""));
                None
            }
        });
        if tcp_listen.is_some() && (!self.allowed_uids.is_empty() || !self.allowed_gids.is_empty()) && self.token_env.is_none() {
            p.push("serve.tcp_listen: TCP peers carry no uid/gid, so with allowed_uids/allowed_gids set it needs serve.token_env too".to_string());
        }
        if self.queue_depth == 0 || self.queue_depth > 4096 {
            p.push(format!("serve.queue_depth: {} must be between 1 and 4096", self.queue_depth));
        }
        let max_body_bytes = match parse_size(&self.max_body) {
            Ok(b) if (1024..=(1u64 << 30)).contains(&b) => b as usize,
            _ => {
                p.push(format!("serve.max_body: `{}` must be a size between 1KiB and 1GiB", self.max_body));
                0
            }
        };
        if self.max_prompt_tokens == Some(0) {
            p.push("serve.max_prompt_tokens: must be at least 1 (leave unset for the model's context)".to_string());
        }
        if self.max_tokens == 0 {
            p.push("serve.max_tokens: must be at least 1".to_string());
        }
        let request_timeout = duration("serve.request_timeout", &self.request_timeout, &mut p);
        let shutdown_grace = duration("serve.shutdown_grace", &self.shutdown_grace, &mut p);
        if self.max_connections == 0 || self.max_connections > 65536 {
            p.push(format!("serve.max_connections: {} must be between 1 and 65536", self.max_connections));
        }
        let header_timeout = duration("serve.header_timeout", &self.header_timeout, &mut p);
        let stream_interval = match humantime::parse_duration(self.stream_interval.trim()) {
            Ok(d) if d <= Duration::from_secs(1) => d,
            _ => {
                p.push(format!("serve.stream_interval: `{}` must be a duration from \"0ms\" to \"1s\"", self.stream_interval));
                Duration::ZERO
            }
        };
        if !p.is_empty() {
            return Err(p);
        }
        Ok(ServeSettings {
            socket: crate::serve::SocketOptions { path: socket, mode: self.socket_mode, group: self.socket_group.clone() },
            allowed_uids: self.allowed_uids.clone(),
            allowed_gids: self.allowed_gids.clone(),
            token,
            tcp_listen,
            queue_depth: self.queue_depth,
            max_body_bytes,
            max_prompt_tokens: self.max_prompt_tokens,
            max_tokens: self.max_tokens,
            request_timeout,
            shutdown_grace,
            max_connections: self.max_connections,
            header_timeout,
            stream_interval,
            swap: self.swap,
        })
    }
}

/// Parses a duration string for `key`, recording a problem (and returning zero) when it is
/// not one; shared by every section that validates durations.
pub fn duration(key: &str, value: &str, problems: &mut Vec<String>) -> Duration {
    match humantime::parse_duration(value.trim()) {
        Ok(d) if !d.is_zero() => d,
        Ok(_) => {
            problems.push(format!("{key}: must be longer than zero"));
            Duration::ZERO
        }
        Err(e) => {
            problems.push(format!("{key}: `{value}` is not a duration such as \"30s\" or \"5m\" ({e})"));
            Duration::ZERO
        }
    }
}

/// Parses `"20GiB"`, `"500MB"`, `"512k"`, `"1024"` (bytes; binary and decimal units).
///
/// # Errors
/// A message naming what is wrong.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().map_err(|_| format!("`{s}` has no number"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown unit `{other}`")),
    };
    Ok((num * mult).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.engine.threads, None);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported() {
        let err = toml::from_str::<Config>("[engine]\nthreds = 2\n").unwrap_err().to_string();
        assert!(err.contains("threds"), "{err}");
        let c: Config = toml::from_str("[engine]\nthreads = 0\n").unwrap();
        assert_eq!(c.validate(), vec!["engine.threads: must be at least 1 (leave unset for the available cores)".to_string()]);
    }

    #[test]
    fn the_example_shows_the_registry_and_cache_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let example = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let defaults = Config::default();
        assert_eq!(format!("{:?}", example.registry), format!("{:?}", defaults.registry));
        assert_eq!(format!("{:?}", example.cache), format!("{:?}", defaults.cache));
    }

    #[test]
    fn registry_and_cache_defaults_resolve() {
        let c: Config = toml::from_str("").unwrap();
        let r = c.registry.resolve().unwrap();
        assert_eq!(r.target, Target::Stage("Production".into()));
        assert_eq!(r.poll_interval, Duration::from_secs(300));
        assert_eq!(r.backoff.max_attempts, 5);
        assert_eq!(r.bandwidth_limit, None);
        let cache = c.cache.resolve().unwrap();
        assert_eq!(cache.keep_versions, 2);
        assert_eq!(cache.partial_max_age, Duration::from_secs(7 * 86400));
    }

    #[test]
    fn every_registry_and_cache_problem_is_reported() {
        let text = r#"
[registry]
url = "ftp://x"
stage = "Production"
alias = "champion"
connect_timeout = "soon"
poll_interval = "0s"
poll_jitter = 1.5
parallel_downloads = 0
bandwidth_limit = "fast"
attempts = 0
[cache]
keep_versions = 0
pinned = ["nover", "m@3"]
quota = "lots"
smoke_test_tokens = 0
"#;
        let c: Config = toml::from_str(text).unwrap();
        let problems = c.validate();
        for key in [
            "registry.url",
            "registry.stage, registry.alias",
            "registry.connect_timeout",
            "registry.poll_interval",
            "registry.poll_jitter",
            "registry.parallel_downloads",
            "registry.bandwidth_limit",
            "registry.attempts",
            "cache.keep_versions",
            "cache.pinned[0]",
            "cache.quota",
            "cache.smoke_test_tokens",
        ] {
            assert!(problems.iter().any(|p| p.starts_with(&format!("{key}:"))), "{key} not reported in {problems:#?}");
        }
        assert_eq!(problems.len(), 12, "{problems:#?}");
        let err = toml::from_str::<Config>("[registry]\nmodle = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("modle"), "{err}");
    }

    #[test]
    fn sizes_and_rates_parse() {
        let table = [("1024", 1024), ("512k", 512_000), ("2MiB", 2 * 1024 * 1024), ("1.5GB", 1_500_000_000), ("20GiB", 20 << 30)];
        for (s, want) in table {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
        assert!(parse_size("ten").is_err());
        assert!(parse_size("3 parsecs").is_err());
        let c: Config = toml::from_str("[registry]\nalias = \"champion\"\nbandwidth_limit = \"2MiB/s\"\n").unwrap();
        let r = c.registry.resolve().unwrap();
        assert_eq!(r.bandwidth_limit, Some(2 * 1024 * 1024));
        assert_eq!(r.target, Target::Alias("champion".into()));
    }

    #[test]
    fn serve_defaults_resolve() {
        let c: Config = toml::from_str("").unwrap();
        let s = c.serve.resolve().unwrap();
        assert_eq!(s.socket.mode, 0o660);
        assert_eq!((s.queue_depth, s.max_body_bytes, s.max_tokens), (8, 1 << 20, 1024));
        assert_eq!(s.request_timeout, Duration::from_secs(300));
        assert_eq!(s.tcp_listen, None, "TCP is off by default");
        assert_eq!(s.swap, crate::active::SwapMode::Overlap);
        assert_eq!(crate::serve::Limits::from(&s), crate::serve::Limits::default(), "the API's default limits are the [serve] defaults");
        let c: Config = toml::from_str("[serve]\nsocket = \"/tmp/x.sock\"\nsocket_group = \"edgeflow\"\nswap = \"stop-the-world\"\nsocket_mode = 0o600\n").unwrap();
        let s = c.serve.resolve().unwrap();
        assert_eq!(s.socket.group, Some(crate::serve::GroupSpec::Name("edgeflow".into())));
        assert_eq!(s.swap, crate::active::SwapMode::StopTheWorld);
        let c: Config = toml::from_str("[serve]\nsocket_group = 990\n").unwrap();
        assert_eq!(c.serve.socket_group, Some(crate::serve::GroupSpec::Id(990)));
        let c: Config = toml::from_str("[serve]\nstream_interval = \"0ms\"\nmax_connections = 2\nheader_timeout = \"1s\"\n").unwrap();
        let s = c.serve.resolve().unwrap();
        assert_eq!((s.stream_interval, s.max_connections, s.header_timeout), (Duration::ZERO, 2, Duration::from_secs(1)));
    }

    #[test]
    fn every_serve_problem_is_reported() {
        let text = r#"
[serve]
socket_mode = 0o1777
token_env = "EDGEFLOW_TEST_SURELY_UNSET_TOKEN"
tcp_listen = "0.0.0.0:8080"
queue_depth = 0
max_body = "12"
max_prompt_tokens = 0
max_tokens = 0
request_timeout = "forever"
shutdown_grace = "0s"
max_connections = 0
header_timeout = "soon"
stream_interval = "2s"
"#;
        let c: Config = toml::from_str(text).unwrap();
        let problems = c.validate();
        for key in [
            "serve.socket_mode",
            "serve.token_env",
            "serve.tcp_listen",
            "serve.queue_depth",
            "serve.max_body",
            "serve.max_prompt_tokens",
            "serve.max_tokens",
            "serve.request_timeout",
            "serve.shutdown_grace",
            "serve.max_connections",
            "serve.header_timeout",
            "serve.stream_interval",
        ] {
            assert!(problems.iter().any(|p| p.starts_with(&format!("{key}:"))), "{key} not reported in {problems:#?}");
        }
        assert_eq!(problems.len(), 12, "{problems:#?}");
        let c: Config = toml::from_str("[serve]\ntcp_listen = \"127.0.0.1:8080\"\nallowed_uids = [1000]\n").unwrap();
        assert!(c.validate().iter().any(|p| p.contains("needs serve.token_env")));
        let err = toml::from_str::<Config>("[serve]\nswap = \"sometimes\"\n").unwrap_err().to_string();
        assert!(err.contains("sometimes") || err.contains("swap"), "{err}");
        let err = toml::from_str::<Config>("[serve]\nqueue_dept = 3\n").unwrap_err().to_string();
        assert!(err.contains("queue_dept"), "{err}");
    }
}
