//! Routes and the middleware every request passes: peer check, span, metrics.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, MatchedPath, Path, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tracing::Instrument;

use super::error::{ApiError, ErrorCode};
use super::openai::{Endpoint, ModelCard, ModelList, Request as OpenAiRequest};
use super::{generate, App, Peer};
use crate::active::Active;
use crate::telemetry::metrics::CONTENT_TYPE as METRICS_CONTENT_TYPE;

pub fn router(app: App) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/status", get(status))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token))
        // Over TCP no peer credentials exist, so the token (when set) also guards /metrics
        // there; on the socket the uid/gid allow-lists guard every route.
        .route("/metrics", get(metrics).route_layer(middleware::from_fn_with_state(app.clone(), require_token_over_tcp)))
        // Liveness and readiness say only "alive" and "ready": open to every peer the
        // listener and the allow-lists admit, as probes expect.
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// The daemon's state as `edgeflow status` shows it (absent under `edgeflow serve`).
async fn status(State(app): State<App>) -> Response {
    match app.inner.status.get() {
        Some(f) => Json(f()).into_response(),
        None => ApiError::NotFound { method: "GET".into(), path: "/status (served by `edgeflow run`, not `edgeflow serve`)".into() }.into_response(),
    }
}

/// Peer allow-list, a span carrying the peer's ids, and the request metrics.
async fn observe(State(app): State<App>, request: Request, next: Next) -> Response {
    let received = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".to_string());
    let peer = request.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0).unwrap_or(Peer::Unknown);
    let span = match peer {
        Peer::Unix { uid, gid, pid } => {
            tracing::info_span!("request", method = %request.method(), route = %route, uid, gid, pid = pid.unwrap_or(0), request_id = tracing::field::Empty)
        }
        Peer::Tcp(addr) => tracing::info_span!("request", method = %request.method(), route = %route, peer = %addr, request_id = tracing::field::Empty),
        Peer::Unknown => tracing::info_span!("request", method = %request.method(), route = %route, request_id = tracing::field::Empty),
    };
    let response = match app.inner.access.check_peer(peer) {
        Ok(()) => next.run(request).instrument(span.clone()).await,
        Err(e) => {
            let _entered = span.enter();
            tracing::warn!("refused: {e}");
            e.into_response()
        }
    };
    let metrics = &app.inner.metrics;
    let status = response.status();
    metrics.http_requests.with_label_values(&[route.as_str(), status.as_str()]).inc();
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        metrics.http_errors.with_label_values(&[route.as_str(), code]).inc();
    }
    span.in_scope(|| tracing::debug!(status = status.as_u16(), "responded"));
    let timer = metrics.request_duration.with_label_values(&[route.as_str()]);
    response.map(|body| Body::new(ObservedBody { inner: body, timer: Some((timer, received)) }))
}

/// Observes the request duration when the response body is finished (or dropped, when the
/// client goes away), so streamed responses are timed to their last byte.
struct ObservedBody {
    inner: Body,
    timer: Option<(prometheus::Histogram, Instant)>,
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some((timer, received)) = self.timer.take() {
            timer.observe(received.elapsed().as_secs_f64());
        }
    }
}

async fn require_token(State(app): State<App>, request: Request, next: Next) -> Response {
    let authorization = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match app.inner.access.check_token(authorization) {
        Ok(()) => next.run(request).await,
        Err(e) => {
            let mut response = e.into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// [`require_token`] for TCP peers only.
async fn require_token_over_tcp(State(app): State<App>, request: Request, next: Next) -> Response {
    let tcp = matches!(request.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0), Some(Peer::Tcp(_)));
    if tcp {
        require_token(State(app), request, next).await
    } else {
        next.run(request).await
    }
}

async fn chat_completions(State(app): State<App>, body: Body) -> Response {
    generation(app, Endpoint::Chat, body).await
}

async fn completions(State(app): State<App>, body: Body) -> Response {
    generation(app, Endpoint::Completions, body).await
}

async fn generation(app: App, endpoint: Endpoint, body: Body) -> Response {
    let received = Instant::now();
    let result = async {
        let bytes = read_body(body, app.inner.limits.max_body_bytes, app.inner.limits.header_timeout).await?;
        let plan = OpenAiRequest::from_json(&bytes)?.into_plan(endpoint, app.inner.limits.max_tokens)?;
        generate::generate(app, plan, received).await
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// Reads the whole body, refusing more than `limit` bytes (413) without buffering them, and
/// a body that takes longer than `deadline` to arrive (408, connection closed): hyper's
/// header timeout does not cover bodies, and a client trickling bytes would otherwise hold
/// its connection slot for as long as it likes.
async fn read_body(body: Body, limit: usize, deadline: Duration) -> Result<Bytes, ApiError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let read = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await.map_err(|_| ApiError::BodyTimeout { limit: deadline })?;
    read.map_err(|e| {
        let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::invalid(format!("could not read the request body: {e}"), None)
        }
    })
}

fn model_card(active: &Active) -> ModelCard {
    let info = active.info();
    ModelCard {
        id: info.name.clone(),
        object: "model",
        created: crate::util::unix_secs(info.activated_at).unwrap_or(0),
        owned_by: "edgeflow",
        version: info.version.clone(),
        digest: info.digest.clone(),
        context_length: info.context_length,
    }
}

async fn list_models(State(app): State<App>) -> Json<ModelList> {
    let data = app.inner.manager.current().map(|a| vec![model_card(&a)]).unwrap_or_default();
    Json(ModelList { object: "list", data })
}

async fn get_model(State(app): State<App>, Path(id): Path<String>) -> Result<Json<ModelCard>, ApiError> {
    match app.inner.manager.current() {
        Some(active) if active.info().name == id => Ok(Json(model_card(&active))),
        _ => Err(ApiError::NotFound { method: "GET".into(), path: format!("/v1/models/{id} (no such model is active)") }),
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "alive" }))
}

/// Ready: a model is loaded, smoke-tested, and its worker is running.
async fn readyz(State(app): State<App>) -> Result<Json<serde_json::Value>, ApiError> {
    match app.inner.manager.current().filter(|a| a.is_healthy()) {
        Some(active) => {
            let info = active.info();
            Ok(Json(serde_json::json!({ "status": "ready", "model": info.name, "version": info.version, "digest": info.digest, "queued": active.queued() })))
        }
        None => Err(app.no_model()),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], app.inner.metrics.render()).into_response()
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound { method: method.to_string(), path: uri.path().to_string() }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_string() }
}

#[cfg(test)]
mod tests {
    //! Handlers in memory (no socket, no model): routing, errors, access control.
    use std::sync::Arc;
    use std::time::Duration;

    use axum::http::Request as HttpRequest;
    use tower::ServiceExt;

    use super::*;
    use crate::active::{Manager, ManagerOptions, SwapMode};
    use crate::serve::{Access, Limits};
    use crate::telemetry::Metrics;

    fn app(access: Access) -> App {
        let metrics = Arc::new(Metrics::new());
        let manager = Manager::new(
            ManagerOptions { load: Default::default(), queue_depth: 2, max_prompt_tokens: None, smoke_test_tokens: 1, swap: SwapMode::Overlap, nice: 0 },
            metrics.clone(),
        );
        App::new(manager, metrics, access, Limits { max_body_bytes: 1024, max_tokens: 64, request_timeout: Duration::from_secs(5), ..Limits::default() }, Duration::from_secs(1))
    }

    async fn call(app: &App, method: &str, uri: &str, body: impl Into<Body>, headers: &[(&str, &str)]) -> (StatusCode, Option<String>, serde_json::Value) {
        let mut request = HttpRequest::builder().method(method).uri(uri);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = app.router().oneshot(request.body(body.into()).unwrap()).await.unwrap();
        let status = response.status();
        let retry_after = response.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_string());
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, retry_after, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

    #[tokio::test]
    async fn without_a_model_generation_is_503_and_health_is_alive() {
        let app = app(Access::default());
        let (status, retry, body) = call(&app, "POST", "/v1/chat/completions", CHAT, &[]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry.as_deref(), Some("2"));
        assert_eq!(body["error"]["code"], "model_not_ready");
        assert_eq!(call(&app, "GET", "/readyz", Body::empty(), &[]).await.0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(call(&app, "GET", "/healthz", Body::empty(), &[]).await.2["status"], "alive");
        assert_eq!(call(&app, "GET", "/v1/models", Body::empty(), &[]).await.2["data"], serde_json::json!([]));
        let metrics = app.metrics().render();
        assert!(metrics.contains(r#"edgeflow_http_request_errors_total{code="model_not_ready",route="/v1/chat/completions"} 1"#), "{metrics}");
    }

    #[tokio::test]
    async fn request_errors_are_openai_shaped_and_checked_before_the_model() {
        let app = app(Access::default());
        let cases: Vec<(&str, &str, Body, StatusCode, &str)> = vec![
            ("POST", "/v1/chat/completions", Body::from("{not json"), StatusCode::BAD_REQUEST, "invalid_request"),
            ("POST", "/v1/chat/completions", Body::from(vec![b'x'; 2048]), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ("POST", "/v1/completions", Body::from(r#"{"model":"m","prompt":"a","n":3}"#), StatusCode::BAD_REQUEST, "invalid_request"),
            ("GET", "/v1/chat/completions", Body::empty(), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ("GET", "/v2/nothing", Body::empty(), StatusCode::NOT_FOUND, "not_found"),
            ("GET", "/v1/models/other", Body::empty(), StatusCode::NOT_FOUND, "not_found"),
        ];
        for (method, uri, body, status, code) in cases {
            let (got, _, json) = call(&app, method, uri, body, &[]).await;
            assert_eq!(got, status, "{method} {uri}: {json}");
            assert_eq!(json["error"]["code"], code, "{method} {uri}: {json}");
            assert!(json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[tokio::test]
    async fn token_and_allow_list_are_enforced() {
        let app = app(Access { token: Some("s3cret".into()), allowed_uids: vec![4242], allowed_gids: vec![] });
        // In memory there is no peer: unknown credentials are refused when lists are set.
        let (status, _, body) = call(&app, "GET", "/healthz", Body::empty(), &[]).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("permission_denied")));

        let app = super::super::App::new(
            app.inner.manager.clone(),
            Arc::new(Metrics::new()),
            Access { token: Some("s3cret".into()), ..Access::default() },
            app.inner.limits.clone(),
            Duration::from_secs(1),
        );
        assert_eq!(call(&app, "GET", "/v1/models", Body::empty(), &[]).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(call(&app, "GET", "/v1/models", Body::empty(), &[("authorization", "Bearer wrong!")]).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(call(&app, "GET", "/v1/models", Body::empty(), &[("authorization", "Bearer s3cret")]).await.0, StatusCode::OK);
        assert_eq!(call(&app, "GET", "/healthz", Body::empty(), &[]).await.0, StatusCode::OK, "health needs no token");
    }

    #[test]
    fn peers_are_checked_against_uids_and_gids() {
        let access = Access { token: None, allowed_uids: vec![1000], allowed_gids: vec![50] };
        assert!(access.check_peer(Peer::Unix { uid: 1000, gid: 1, pid: None }).is_ok());
        assert!(access.check_peer(Peer::Unix { uid: 7, gid: 50, pid: Some(3) }).is_ok());
        assert!(access.check_peer(Peer::Unix { uid: 7, gid: 7, pid: None }).is_err());
        assert!(access.check_peer(Peer::Unknown).is_err());
        assert!(Access::default().check_peer(Peer::Unix { uid: 7, gid: 7, pid: None }).is_ok());
    }
}
