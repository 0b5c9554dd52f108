//! The local API: OpenAI-compatible HTTP/1.1 on a Unix socket (and, when configured, a
//! loopback TCP port), plus `/healthz`, `/readyz` and `/metrics`.
//!
//! The caller binds ([`Listeners::bind`]: systemd's socket or our own, plus the optional TCP
//! port) and starts the servers with a shutdown token ([`Listeners::serve`], or [`run`] on one
//! listener); the daemon and `edgeflow serve` share this code, and tests drive it on a
//! temporary socket. Requests never run model code on the async runtime: they are checked
//! ([`openai`]), admitted to the active model's bounded queue or refused with 429/503
//! ([`generate`]), and answered from the engine worker's events. Every error leaves through
//! [`error::ApiError`], the one mapping to HTTP statuses.

mod connection;
pub mod error;
mod generate;
mod listen;
pub mod openai;
mod routes;
pub mod settings;
pub mod socket;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::active::Manager;
use crate::telemetry::drift::Recorder;
use crate::telemetry::Metrics;
use error::ApiError;
pub use listen::{Listeners, Serving};
use openai::Endpoint;
use settings::ServeSettings;
pub use socket::{bind, from_systemd, GroupSpec, Peer, SocketError, SocketFile, SocketOptions};

/// Request limits enforced before and during generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for; also the default for chat requests.
    pub max_tokens: usize,
    /// From arrival to the last byte, queueing included.
    pub request_timeout: Duration,
    /// Streams send at most one text event per interval; zero: one per piece of text.
    pub stream_interval: Duration,
    /// Connections served at once per listener; more are answered 503 and closed.
    pub max_connections: usize,
    /// Connections one Unix peer uid may hold at once (the daemon's own are not counted).
    pub max_connections_per_uid: usize,
    /// For a request's headers to arrive, and for a kept-alive connection to sit idle.
    pub header_timeout: Duration,
}

impl From<&ServeSettings> for Limits {
    fn from(settings: &ServeSettings) -> Self {
        Limits {
            max_body_bytes: settings.max_body_bytes,
            max_tokens: settings.max_tokens,
            request_timeout: settings.request_timeout,
            stream_interval: settings.stream_interval,
            max_connections: settings.max_connections,
            max_connections_per_uid: settings.max_connections_per_uid,
            header_timeout: settings.header_timeout,
        }
    }
}

impl Default for Limits {
    /// The `[serve]` defaults (a unit test keeps them equal to `ServeConfig::default()`).
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_tokens: 1024,
            request_timeout: Duration::from_secs(300),
            stream_interval: Duration::from_millis(5),
            max_connections: 64,
            max_connections_per_uid: settings::default_per_uid(64),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Who may use the API beyond the socket's file permissions.
#[derive(Clone, Default)]
pub struct Access {
    /// Required as `Authorization: Bearer <token>` on `/v1/*` when set.
    pub token: Option<String>,
    /// When either list is non-empty, Unix peers must match one of them.
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("allowed_uids", &self.allowed_uids)
            .field("allowed_gids", &self.allowed_gids)
            .finish()
    }
}

impl Access {
    /// # Errors
    /// [`ApiError::Forbidden`] for a Unix peer outside the allow-lists, or one whose
    /// credentials are unknown. TCP peers carry no credentials; configuration requires a
    /// token when TCP and allow-lists are combined.
    fn check_peer(&self, peer: Peer) -> Result<(), ApiError> {
        if self.allowed_uids.is_empty() && self.allowed_gids.is_empty() {
            return Ok(());
        }
        match peer {
            Peer::Unix { uid, gid, .. } if self.allowed_uids.contains(&uid) || self.allowed_gids.contains(&gid) => Ok(()),
            Peer::Unix { uid, gid, .. } => Err(ApiError::Forbidden { who: format!("uid {uid} (gid {gid})") }),
            Peer::Tcp(_) => Ok(()),
            Peer::Unknown => Err(ApiError::Forbidden { who: "a peer with unknown credentials".into() }),
        }
    }

    /// # Errors
    /// [`ApiError::Unauthorized`] when a token is configured and not presented.
    fn check_token(&self, authorization: Option<&[u8]>) -> Result<(), ApiError> {
        let Some(expected) = &self.token else { return Ok(()) };
        let presented = authorization.and_then(|h| h.strip_prefix(b"Bearer ")).unwrap_or(b"");
        if constant_time_eq(presented, expected.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Everything the handlers share; cheap to clone.
#[derive(Clone)]
pub struct App {
    inner: Arc<AppInner>,
}

struct AppInner {
    manager: Manager,
    metrics: Arc<Metrics>,
    access: Access,
    limits: Limits,
    shutdown_grace: Duration,
    /// Cancelled when the grace period ends: streams still running are ended.
    hard_stop: CancellationToken,
    request_nonce: u32,
    requests: AtomicU64,
    /// Fed with every finished generation (aggregates only) when the fleet link reports drift.
    drift: OnceLock<Recorder>,
    /// What `GET /status` answers (the daemon's state); 404 when unset (`edgeflow serve`).
    status: OnceLock<StatusFn>,
}

/// Produces the daemon's status document for `GET /status`.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

impl App {
    pub fn new(manager: Manager, metrics: Arc<Metrics>, access: Access, limits: Limits, shutdown_grace: Duration) -> Self {
        let request_nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() ^ (d.as_secs() as u32)).unwrap_or(0);
        App {
            inner: Arc::new(AppInner {
                manager,
                metrics,
                access,
                limits,
                shutdown_grace,
                hard_stop: CancellationToken::new(),
                request_nonce,
                requests: AtomicU64::new(0),
                drift: OnceLock::new(),
                status: OnceLock::new(),
            }),
        }
    }

    /// The app as `[serve]` configures it.
    pub fn from_settings(manager: Manager, metrics: Arc<Metrics>, settings: &ServeSettings) -> Self {
        let access = Access { token: settings.token.clone(), allowed_uids: settings.allowed_uids.clone(), allowed_gids: settings.allowed_gids.clone() };
        App::new(manager, metrics, access, Limits::from(settings), settings.shutdown_grace)
    }

    /// Feeds every finished generation's aggregates to `recorder`, and asks the engine for
    /// the per-token statistics drift needs (log-probability, entropy).
    pub fn with_drift(self, recorder: Recorder) -> Self {
        let _ = self.inner.drift.set(recorder);
        self
    }

    /// Serves `GET /status` from `status`.
    pub fn with_status(self, status: StatusFn) -> Self {
        let _ = self.inner.status.set(status);
        self
    }

    pub fn manager(&self) -> &Manager {
        &self.inner.manager
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The HTTP routes; [`run`] serves them.
    pub fn router(&self) -> axum::Router {
        routes::router(self.clone())
    }

    fn next_request_id(&self, endpoint: Endpoint) -> String {
        let n = self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        format!("{prefix}-{:08x}{n:08x}", self.inner.request_nonce)
    }

    fn no_model(&self) -> ApiError {
        let manager = &self.inner.manager;
        if manager.is_swapping() {
            ApiError::NoModel { reason: "the model is being swapped; retry shortly", retry_after: Duration::from_secs(2) }
        } else if manager.current().is_some() {
            ApiError::NoModel { reason: "the model's engine worker has stopped", retry_after: Duration::from_secs(5) }
        } else {
            ApiError::NoModel { reason: "no model is loaded yet", retry_after: Duration::from_secs(2) }
        }
    }
}

/// Serves `app` on an already-bound Unix socket until `shutdown` is cancelled, then lets
/// in-flight requests finish for the configured grace period before ending them, holding every
/// connection to `serve.max_connections` and `serve.header_timeout`.
pub async fn run(listener: UnixListener, app: App, shutdown: CancellationToken) {
    connection::serve(socket::UnixPeers(listener), app, shutdown).await;
}

/// As [`run`], on a TCP listener (configured loopback only).
pub async fn run_tcp(listener: TcpListener, app: App, shutdown: CancellationToken) {
    connection::serve(socket::TcpPeers(listener), app, shutdown).await;
}
