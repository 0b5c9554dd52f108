//! `[serve]`: the local API's socket, access, limits and timeouts; [`ServeConfig::resolve`]
//! types and checks it into [`ServeSettings`], naming each bad key.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::util::{duration, parse_size};
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
    pub socket_group: Option<super::GroupSpec>,
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
    /// Connections one local user (peer uid on the socket) may hold at once, so a client
    /// that leaks or hoards connections leaves room for the others; unset means three
    /// quarters of `max_connections` (rounded up). TCP peers carry no uid: only
    /// `max_connections` holds them.
    pub max_connections_per_uid: Option<usize>,
    /// Time a client has to send a request's headers, then its body (408), also the idle
    /// limit of a kept-alive connection; then the connection is closed.
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
            max_connections_per_uid: None,
            header_timeout: "10s".into(),
            stream_interval: "5ms".into(),
            swap: crate::active::SwapMode::Overlap,
        }
    }
}

/// `[serve]` with every value checked and typed, and the token read from the environment.
#[derive(Clone)]
pub struct ServeSettings {
    pub socket: super::SocketOptions,
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
    pub max_connections_per_uid: usize,
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

/// Three quarters of `max_connections`, rounded up: one user may take most of the
/// connections, never all of them (unless there are fewer than four).
#[must_use]
pub fn default_per_uid(max_connections: usize) -> usize {
    max_connections - max_connections / 4
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
        let (socket, token, tcp_listen) = self.check_access(&mut p);
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
        let max_connections_per_uid = self.max_connections_per_uid.unwrap_or_else(|| default_per_uid(self.max_connections));
        // Only a value given explicitly can be wrong on its own; the default follows the limit.
        if self.max_connections_per_uid.is_some() && (max_connections_per_uid == 0 || max_connections_per_uid > self.max_connections) {
            p.push(format!("serve.max_connections_per_uid: {max_connections_per_uid} must be between 1 and serve.max_connections ({})", self.max_connections));
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
            socket: super::SocketOptions { path: socket, mode: self.socket_mode, group: self.socket_group.clone() },
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
            max_connections_per_uid,
            header_timeout,
            stream_interval,
            swap: self.swap,
        })
    }

    /// Who reaches the API and where: the socket, its mode and group, the token, the TCP port.
    fn check_access(&self, p: &mut Vec<String>) -> (PathBuf, Option<String>, Option<std::net::SocketAddr>) {
        let socket = self.socket.clone().unwrap_or_else(Self::default_socket);
        // sun_path holds 108 bytes including the terminating NUL.
        if socket.as_os_str().is_empty() || socket.as_os_str().len() > 107 {
            p.push(format!("serve.socket: `{}` must be a path of 1 to 107 bytes", socket.display()));
        }
        if self.socket_mode > 0o777 || self.socket_mode & 0o600 != 0o600 {
            p.push(format!("serve.socket_mode: {:#o} must be permission bits (at most 0o777) that let the owner read and write", self.socket_mode));
        }
        if let Some(super::GroupSpec::Name(name)) = &self.socket_group {
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
        (socket, token, tcp_listen)
    }
}
