//! Errors of the registry client, named after the step that failed and carrying the object.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("could not set up the HTTP client: {message}")]
    Setup { message: String },

    #[error("could not read the CA bundle {path}")]
    CaBundle {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("request to {url} failed")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("{url} answered {status}{}: {message}", .code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Status { url: String, status: u16, code: Option<String>, message: String },

    #[error("the registry refused the credentials ({status} from {url}); set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD: {message}")]
    Unauthorized { url: String, status: u16, message: String },

    #[error("registered model `{name}` does not exist in the registry")]
    ModelNotFound { name: String },

    #[error("model `{name}` version {version} is {status}, not READY; only READY versions are downloaded")]
    NotReady { name: String, version: String, status: String },

    #[error("model `{name}` version {version}: artifact location `{uri}` is not served by the tracking server (only mlflow-artifacts:/ locations are supported; start the server with --serve-artifacts)")]
    UnsupportedLocation { name: String, version: String, uri: String },

    #[error("{url}: unexpected answer: {message}")]
    Decode { url: String, message: String },

    /// An answer longer than anything the registry sends for this question (a runaway or
    /// hostile server); reading stopped at the limit.
    #[error("{url}: the answer is larger than {limit} bytes; refused without reading the rest")]
    TooLarge { url: String, limit: usize },

    #[error("the artifact tree under `{root}` has more than {limit} entries or is deeper than {depth} levels")]
    TreeTooLarge { root: String, limit: usize, depth: usize },

    #[error("the registry lists {path:?}, which is not a plain relative path inside the model folder (no `..`, root, backslash or control character, at most 1024 bytes); refusing the model")]
    UnsafePath { path: String },

    #[error("MLmodel of `{name}` version {version}: {message}")]
    MlModel { name: String, version: String, message: String },

    #[error("model `{name}` version {version} has flavors [{}]; edgeflow needs an ONNX GenAI folder: the `onnx` flavor with genai_config.json and the tokenizer as extra files, or a `python_function` model with the folder as an artifact", .flavors.join(", "))]
    UnsupportedFlavor { name: String, version: String, flavors: Vec<String> },
}

impl RegistryError {
    /// True for failures that may pass on their own: connection problems, timeouts, 5xx,
    /// 429 and 408. Everything else (bad credentials, unknown model, bad data) is final.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Request { source, .. } => !source.is_builder() && !source.is_redirect() && !is_tls_verification(source),
            RegistryError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }

    /// The failure as a metric label (see `telemetry::metrics::RegistryMetrics::request`).
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryError::Request { source, .. } if source.is_timeout() => "timeout",
            RegistryError::Request { source, .. } if source.is_connect() => "connect",
            RegistryError::Request { .. } => "transport",
            RegistryError::Status { status, .. } if *status >= 500 => "http_5xx",
            RegistryError::Status { .. } | RegistryError::Unauthorized { .. } => "http_4xx",
            RegistryError::TooLarge { .. } => "too_large",
            _ => "bad_answer",
        }
    }

    /// True when the registry could not be reached at all (as opposed to answering "no"):
    /// no usable answer came over the network (refused, timed out, reset before or during
    /// the answer), or the server said it is failing (5xx).
    pub fn is_unreachable(&self) -> bool {
        match self {
            // DEVNOTE: a reset or a cut answer is the network (or a proxy) failing, as much as
            // a refused connection is; `/status` says "unreachable" with the error, not "failed".
            RegistryError::Request { .. } => self.is_retryable(),
            RegistryError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// A certificate the client does not trust will not become trusted by retrying.
fn is_tls_verification(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<rustls::Error>().is_some_and(|t| matches!(t, rustls::Error::InvalidCertificate(_))) {
            return true;
        }
        let text = s.to_string();
        if text.contains("invalid peer certificate") || text.contains("UnknownIssuer") {
            return true;
        }
        source = s.source();
    }
    false
}
