//! Errors of the local API and the one place they become HTTP statuses.
//!
//! Every error reaches the client in OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, so the official SDKs raise their usual
//! exception classes (`BadRequestError`, `RateLimitError`, ...). Internal details are logged
//! with the request id, never returned.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::active::{JobError, SubmitError};
use crate::engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<String> },

    #[error("this request has {tokens} prompt tokens, but this server accepts at most {limit}")]
    ContextLengthExceeded { tokens: usize, limit: usize, param: &'static str },

    #[error("missing or wrong bearer token (send `Authorization: Bearer <token>`)")]
    Unauthorized,

    #[error("{who} is not allowed to use this API")]
    Forbidden { who: String },

    #[error("no route for {method} {path}")]
    NotFound { method: String, path: String },

    #[error("method {method} is not allowed for {path}")]
    MethodNotAllowed { method: String, path: String },

    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },

    #[error("the request body did not arrive within {}s (serve.header_timeout); the connection is closed", .limit.as_secs_f64())]
    BodyTimeout { limit: Duration },

    #[error("the server is busy: the generation queue is full; retry after {}s", .retry_after.as_secs())]
    QueueFull { retry_after: Duration },

    #[error("the server already serves its limit of {limit} connections; retry after {}s", .retry_after.as_secs())]
    TooManyConnections { limit: usize, retry_after: Duration },

    #[error("uid {uid} already holds its limit of {limit} connections (serve.max_connections_per_uid); close idle ones or retry after {}s", .retry_after.as_secs())]
    TooManyConnectionsForUser { uid: u32, limit: usize, retry_after: Duration },

    #[error("{reason}")]
    NoModel { reason: &'static str, retry_after: Duration },

    #[error("the request did not finish within the server's limit of {}s", .limit.as_secs_f64())]
    Timeout { limit: Duration },

    #[error("the server is shutting down")]
    ShuttingDown,

    /// The model or the machine failed; the details are logged, not returned.
    #[error("internal error while generating (request {request_id}); see the server log")]
    Internal { request_id: String },
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError::InvalidRequest { message: message.into(), param: param.map(str::to_string) }
    }

    /// The one mapping from errors to HTTP statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::ContextLengthExceeded { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::QueueFull { .. } | ApiError::TooManyConnectionsForUser { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NoModel { .. } | ApiError::TooManyConnections { .. } | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::ContextLengthExceeded { .. }
            | ApiError::NotFound { .. }
            | ApiError::MethodNotAllowed { .. }
            | ApiError::PayloadTooLarge { .. }
            | ApiError::BodyTimeout { .. } => "invalid_request_error",
            ApiError::Unauthorized => "authentication_error",
            ApiError::Forbidden { .. } => "permission_error",
            ApiError::QueueFull { .. } | ApiError::TooManyConnectionsForUser { .. } => "rate_limit_error",
            ApiError::NoModel { .. } | ApiError::TooManyConnections { .. } | ApiError::ShuttingDown | ApiError::Timeout { .. } => "server_error",
            ApiError::Internal { .. } => "server_error",
        }
    }

    /// OpenAI's `error.code`; also the `code` label of the error metric.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::ContextLengthExceeded { .. } => "context_length_exceeded",
            ApiError::Unauthorized => "invalid_api_key",
            ApiError::Forbidden { .. } => "permission_denied",
            ApiError::NotFound { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::BodyTimeout { .. } => "request_timeout",
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::NoModel { .. } => "model_not_ready",
            ApiError::TooManyConnections { .. } | ApiError::TooManyConnectionsForUser { .. } => "too_many_connections",
            ApiError::Timeout { .. } => "timeout",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Internal { .. } => "internal_error",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.as_deref(),
            ApiError::ContextLengthExceeded { param, .. } => Some(param),
            _ => None,
        }
    }

    pub(super) fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::QueueFull { retry_after }
            | ApiError::NoModel { retry_after, .. }
            | ApiError::TooManyConnections { retry_after, .. }
            | ApiError::TooManyConnectionsForUser { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The OpenAI error object, also sent as an SSE event when a stream fails midway.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody { error: ErrorObject { message: self.to_string(), kind: self.kind(), param: self.param(), code: self.code() } }
    }

    /// Classifies a failed generation job; `prompt_param` names the request field holding
    /// the prompt. Engine faults are logged here with the request id and become an opaque
    /// [`ApiError::Internal`].
    pub fn from_job(err: JobError, request_id: &str, prompt_param: &'static str) -> Self {
        match err {
            JobError::PromptTooLong { tokens, limit } => ApiError::ContextLengthExceeded { tokens, limit, param: prompt_param },
            JobError::Engine(e) if e.is_bad_request() => ApiError::invalid(e.to_string(), engine_param(&e)),
            err => {
                tracing::error!(request_id, error = %crate::util::chain(&err), "generation failed");
                ApiError::Internal { request_id: request_id.to_string() }
            }
        }
    }

    pub fn from_submit(err: SubmitError) -> Self {
        match err {
            SubmitError::Full { retry_after } => ApiError::QueueFull { retry_after },
            SubmitError::Stopped => ApiError::NoModel { reason: "the model's engine worker has stopped; the model is being replaced", retry_after: Duration::from_secs(5) },
        }
    }
}

fn engine_param(e: &EngineError) -> Option<&'static str> {
    match e {
        EngineError::InvalidParameter { name, .. } => Some(name),
        EngineError::ContextOverflow { .. } => Some("max_tokens"),
        EngineError::Template { .. } => Some("messages"),
        _ => None,
    }
}

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: &'static str,
}

/// Marks a response as an error so the metrics layer can count it by code.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Busy and not-ready answers are expected under load and during swaps.
        if matches!(self, ApiError::Internal { .. } | ApiError::Timeout { .. }) {
            tracing::warn!(status = status.as_u16(), code = self.code(), "{self}");
        } else {
            tracing::debug!(status = status.as_u16(), code = self.code(), "{self}");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Some(after) = self.retry_after() {
            let secs = after.as_secs().max(1);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, ApiError::BodyTimeout { .. }) {
            // The rest of the body may still be coming: the connection cannot be reused.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response.extensions_mut().insert(ErrorCode(self.code()));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_the_status_and_type_openai_clients_expect() {
        let cases = [
            (ApiError::invalid("bad", Some("n")), 400, "invalid_request_error"),
            (ApiError::ContextLengthExceeded { tokens: 9, limit: 8, param: "prompt" }, 400, "invalid_request_error"),
            (ApiError::Unauthorized, 401, "authentication_error"),
            (ApiError::BodyTimeout { limit: Duration::from_secs(10) }, 408, "invalid_request_error"),
            (ApiError::Forbidden { who: "uid 1".into() }, 403, "permission_error"),
            (ApiError::NotFound { method: "GET".into(), path: "/x".into() }, 404, "invalid_request_error"),
            (ApiError::MethodNotAllowed { method: "GET".into(), path: "/x".into() }, 405, "invalid_request_error"),
            (ApiError::PayloadTooLarge { limit: 1 }, 413, "invalid_request_error"),
            (ApiError::QueueFull { retry_after: Duration::from_secs(2) }, 429, "rate_limit_error"),
            (ApiError::NoModel { reason: "none", retry_after: Duration::from_secs(1) }, 503, "server_error"),
            (ApiError::ShuttingDown, 503, "server_error"),
            (ApiError::TooManyConnections { limit: 4, retry_after: Duration::from_secs(1) }, 503, "server_error"),
            (ApiError::TooManyConnectionsForUser { uid: 7, limit: 3, retry_after: Duration::from_secs(1) }, 429, "rate_limit_error"),
            (ApiError::Timeout { limit: Duration::from_secs(1) }, 504, "server_error"),
            (ApiError::Internal { request_id: "r".into() }, 500, "server_error"),
        ];
        for (err, status, kind) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            let body = serde_json::to_value(err.body()).unwrap();
            assert_eq!(body["error"]["type"], kind, "{err:?}");
            assert_eq!(body["error"]["message"], err.to_string());
            assert_eq!(body["error"]["code"], err.code());
        }
    }

    #[test]
    fn busy_and_unready_errors_carry_retry_after() {
        let r = ApiError::QueueFull { retry_after: Duration::from_millis(300) }.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::NoModel { reason: "loading", retry_after: Duration::from_secs(7) }.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        assert!(ApiError::Unauthorized.into_response().headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn engine_faults_are_not_leaked_to_clients() {
        let err = ApiError::from_job(JobError::Engine(EngineError::Inference { during: "decode", message: "/secret/path/model.onnx: boom".into() }), "req-1", "prompt");
        assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!err.to_string().contains("secret"), "{err}");
        let err = ApiError::from_job(JobError::Engine(EngineError::InvalidParameter { name: "top_p", message: "2 is not in (0, 1]".into() }), "req-2", "prompt");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(serde_json::to_value(err.body()).unwrap()["error"]["param"], "top_p");
    }
}
