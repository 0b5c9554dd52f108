//! `bridge`: MLflow registry webhooks turned into signed `sync` broadcasts, so devices pick up
//! a new version within seconds while they poll the registry rarely.
//!
//! MLflow (open source, SQL backend) POSTs a JSON body `{"entity", "action", "timestamp",
//! "data"}` with three headers: `X-MLflow-Delivery-Id`, `X-MLflow-Timestamp` (Unix seconds)
//! and `X-MLflow-Signature`, `v1,` + base64(HMAC-SHA256(secret, "<id>.<timestamp>.<body>")).
//! The bridge checks the signature in constant time, refuses a timestamp more than
//! [`MAX_SKEW`] away (a captured delivery cannot be replayed later), answers a delivery it
//! already carried out from memory (MLflow retries with the same id), and for the events that
//! can change what a device serves (a version created, an alias set, a version's tag set) of
//! the models it watches publishes one signed `sync` to a group, with a spread so the
//! registry is not stormed. The command's request id is derived from the delivery id, so a
//! repeat that reaches a device anyway is answered from its table and never polls twice.
//!
//! It answers 2xx only once the broker took the command; a broker that is down is a 503, and
//! MLflow's retries deliver again.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use ed25519_dalek::SigningKey;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use super::send::{Request, Target};
use super::ConsoleSettings;

/// How far a delivery's timestamp may be from the bridge's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// Largest webhook body read.
const MAX_BODY: usize = 256 * 1024;
/// Delivery ids remembered (a retry comes within minutes; older ones are rejected by time).
const REMEMBERED: usize = 4096;

/// What the bridge does with a delivery.
#[derive(Clone)]
pub struct BridgeSettings {
    pub listen: SocketAddr,
    /// The webhook's secret, as registered with MLflow.
    pub secret: Vec<u8>,
    pub key: SigningKey,
    /// The group the `sync` goes to.
    pub group: String,
    /// Registered models whose events count; empty: every model.
    pub models: Vec<String>,
    /// The `sync`'s spread.
    pub spread: Duration,
    /// How long the signed `sync` stays valid.
    pub ttl: Duration,
}

/// Why a delivery was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// 401: missing or wrong signature, or a timestamp out of range.
    Unauthorized(String),
    /// 400: not an MLflow webhook body.
    Malformed(String),
}

/// Checks a delivery's signature and timestamp at Unix time `now`.
///
/// # Errors
/// [`Rejected::Unauthorized`] saying which check failed.
pub fn verify(secret: &[u8], id: &str, timestamp: &str, body: &[u8], signature: &str, now: u64) -> Result<(), Rejected> {
    let ts: u64 = timestamp.trim().parse().map_err(|_| Rejected::Unauthorized(format!("X-MLflow-Timestamp `{}` is not Unix seconds", crate::util::truncate(timestamp, 40))))?;
    if ts.abs_diff(now) > MAX_SKEW.as_secs() {
        return Err(Rejected::Unauthorized(format!("X-MLflow-Timestamp is {}s away from this clock (at most {}s)", ts.abs_diff(now), MAX_SKEW.as_secs())));
    }
    let encoded = signature.trim().strip_prefix("v1,").ok_or_else(|| Rejected::Unauthorized("X-MLflow-Signature is not `v1,<base64>`".into()))?;
    let given = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|_| Rejected::Unauthorized("X-MLflow-Signature is not base64".into()))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| Rejected::Unauthorized("unusable secret".into()))?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&given).map_err(|_| Rejected::Unauthorized("X-MLflow-Signature does not match the body and the secret".into()))
}

/// What a delivery is about, when it can change what a device serves: `(model, what)`.
///
/// # Errors
/// [`Rejected::Malformed`] for a body that is not an MLflow webhook payload.
pub fn relevant(body: &[u8]) -> Result<Option<(String, String)>, Rejected> {
    let v: Value = serde_json::from_slice(body).map_err(|e| Rejected::Malformed(format!("body is not JSON: {e}")))?;
    let field = |k: &str| v.get(k).and_then(Value::as_str).ok_or_else(|| Rejected::Malformed(format!("body has no string `{k}`")));
    let (entity, action) = (field("entity")?, field("action")?);
    let data = v.get("data").filter(|d| d.is_object()).ok_or_else(|| Rejected::Malformed("body has no object `data`".into()))?;
    let s = |k: &str| data.get(k).and_then(Value::as_str).unwrap_or("?");
    let what = match (entity, action) {
        ("model_version", "created") => format!("version {} created", s("version")),
        ("model_version_alias", "created") => format!("alias @{} set to version {}", s("alias"), s("version")),
        ("model_version_tag", "set") => format!("tag {} set on version {}", s("key"), s("version")),
        _ => return Ok(None),
    };
    let model = data.get("name").and_then(Value::as_str).ok_or_else(|| Rejected::Malformed("`data` has no string `name`".into()))?;
    Ok(Some((model.to_string(), what)))
}

/// Delivery ids already carried out, the oldest forgotten first.
#[derive(Default)]
struct Seen {
    order: VecDeque<String>,
    ids: HashSet<String>,
}

impl Seen {
    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: String) {
        if self.order.len() >= REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        self.ids.insert(id.clone());
        self.order.push_back(id);
    }
}

struct Bridge {
    settings: BridgeSettings,
    console: ConsoleSettings,
    seen: Mutex<Seen>,
    /// One publish at a time: deliveries are rare, and one connection id is then enough.
    publishing: tokio::sync::Mutex<()>,
}

/// Serves webhooks on `settings.listen` until `shutdown`.
///
/// # Errors
/// When the address cannot be bound or the server fails.
pub async fn serve(settings: BridgeSettings, console: ConsoleSettings, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, group = %settings.group, models = ?settings.models, "webhook bridge listening");
    let state = Arc::new(Bridge { settings, console, seen: Mutex::new(Seen::default()), publishing: tokio::sync::Mutex::new(()) });
    let app = axum::Router::new().route("/", post(deliver)).route("/webhook", post(deliver)).layer(DefaultBodyLimit::max(MAX_BODY)).with_state(state);
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

async fn deliver(State(b): State<Arc<Bridge>>, headers: HeaderMap, body: Bytes) -> (StatusCode, axum::Json<Value>) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let (id, ts, signature) = (header("x-mlflow-delivery-id"), header("x-mlflow-timestamp"), header("x-mlflow-signature"));
    let answer = |code: StatusCode, v: Value| (code, axum::Json(v));
    if id.is_empty() || id.len() > 100 || id.chars().any(|c| !(c.is_ascii_alphanumeric() || c == '-')) {
        return answer(StatusCode::UNAUTHORIZED, json!({"error": "X-MLflow-Delivery-Id missing or not an id"}));
    }
    let checked = verify(&b.settings.secret, &id, &ts, &body, &signature, crate::util::unix_now()).and_then(|()| relevant(&body));
    let (model, what) = match checked {
        Err(Rejected::Unauthorized(reason)) => {
            tracing::warn!(delivery = %id, %reason, "webhook refused");
            return answer(StatusCode::UNAUTHORIZED, json!({"error": reason}));
        }
        Err(Rejected::Malformed(reason)) => {
            tracing::warn!(delivery = %id, %reason, "webhook refused");
            return answer(StatusCode::BAD_REQUEST, json!({"error": reason}));
        }
        Ok(None) => return answer(StatusCode::OK, json!({"ignored": "not an event that changes what devices serve"})),
        Ok(Some((model, _))) if !b.settings.models.is_empty() && !b.settings.models.contains(&model) => {
            return answer(StatusCode::OK, json!({"ignored": format!("model `{}` is not watched", crate::util::truncate(&model, 80))}));
        }
        Ok(Some(found)) => found,
    };
    let _one = b.publishing.lock().await;
    let request_id = format!("mlflow-{id}");
    if b.seen.lock().map(|s| s.contains(&id)).unwrap_or(false) {
        return answer(StatusCode::OK, json!({"duplicate": true, "request_id": request_id}));
    }
    let request = Request {
        name: "sync".into(),
        args: json!({"spread": humantime::format_duration(b.settings.spread).to_string()}),
        target: Target::Group(b.settings.group.clone()),
        request_id: request_id.clone(),
        ttl: b.settings.ttl,
        wait: Duration::ZERO,
    };
    // A group's command is one publication.
    let (topic, payload) = super::send::payloads(&request, &b.console.prefix, Some(&b.settings.key), crate::util::unix_now()).pop().unwrap_or_default();
    let published = async {
        let mut session = b.console.session().await?;
        session.publish(&topic, payload.into_bytes()).await?;
        session.close().await;
        Ok::<(), super::ConsoleError>(())
    };
    match published.await {
        Ok(()) => {
            if let Ok(mut s) = b.seen.lock() {
                s.insert(id.clone());
            }
            tracing::info!(delivery = %id, model = %crate::util::truncate(&model, 80), %what, %topic, %request_id, "published sync");
            answer(StatusCode::OK, json!({"published": topic, "request_id": request_id, "model": model, "event": what}))
        }
        Err(e) => {
            tracing::error!(delivery = %id, error = %e, "could not publish the sync; MLflow will deliver again");
            answer(StatusCode::SERVICE_UNAVAILABLE, json!({"error": e.to_string()}))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    /// The vector computed with MLflow 3.17's own `_generate_hmac_signature`.
    #[test]
    fn a_signature_made_by_mlflow_verifies_and_nothing_else_does() {
        let sig = "v1,jAyhWuvJRcQMVbD7m4Iar2/4+6HricjeksyI87v/Tkk=";
        let body = br#"{"a": 1}"#;
        assert_eq!(verify(b"secret", "id-1", "1700000000", body, sig, NOW), Ok(()));
        let (secret, other): (&[u8], &[u8]) = (b"secret", br#"{"a": 2}"#);
        let body: &[u8] = body;
        for (secret, id, ts, body, sig, now) in [
            (b"other".as_slice(), "id-1", "1700000000", body, sig, NOW),
            (secret, "id-2", "1700000000", body, sig, NOW),
            (secret, "id-1", "1700000000", other, sig, NOW),
            (secret, "id-1", "1700000000", body, "v2,jAyhWuvJRcQMVbD7m4Iar2/4+6HricjeksyI87v/Tkk=", NOW),
            (secret, "id-1", "1700000000", body, "v1,not base64!", NOW),
            (secret, "id-1", "1700000000", body, "", NOW),
            (secret, "id-1", "1700000000", body, sig, NOW + 301),
            (secret, "id-1", "soon", body, sig, NOW),
        ] {
            assert!(matches!(verify(secret, id, ts, body, sig, now), Err(Rejected::Unauthorized(_))), "{id} {ts} {sig}");
        }
    }

    #[test]
    fn only_events_that_change_what_devices_serve_count() {
        let body = |entity: &str, action: &str, data: Value| json!({"entity": entity, "action": action, "timestamp": "2026-12-07T12:00:00+00:00", "data": data}).to_string();
        let created = body("model_version", "created", json!({"name": "phi-3", "version": "7", "source": "models:/m-1"}));
        assert_eq!(relevant(created.as_bytes()), Ok(Some(("phi-3".into(), "version 7 created".into()))));
        let alias = body("model_version_alias", "created", json!({"name": "phi-3", "alias": "production", "version": "7"}));
        assert_eq!(relevant(alias.as_bytes()), Ok(Some(("phi-3".into(), "alias @production set to version 7".into()))));
        for ignored in [body("registered_model", "created", json!({"name": "phi-3"})), body("model_version_alias", "deleted", json!({"name": "phi-3", "alias": "x"}))] {
            assert_eq!(relevant(ignored.as_bytes()), Ok(None));
        }
        for bad in [
            "nope".to_string(),
            json!({"entity": "model_version"}).to_string(),
            body("model_version", "created", json!([1])),
            body("model_version", "created", json!({"version": "7"})),
        ] {
            assert!(matches!(relevant(bad.as_bytes()), Err(Rejected::Malformed(_))), "{bad}");
        }
    }

    #[test]
    fn delivery_ids_are_remembered_within_a_bound() {
        let mut s = Seen::default();
        for i in 0..REMEMBERED + 10 {
            s.insert(format!("d-{i}"));
        }
        assert!(!s.contains("d-0") && !s.contains("d-9") && s.contains("d-10") && s.contains(&format!("d-{}", REMEMBERED + 9)));
        assert_eq!((s.order.len(), s.ids.len()), (REMEMBERED, REMEMBERED));
    }
}
