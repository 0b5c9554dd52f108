//! The MLflow REST client: stage and alias lookups, version details, the artifact tree and
//! downloads through the tracking server's artifact proxy (`mlflow-artifacts:/`).
//!
//! DEVNOTE: MLflow 3.x quirks this code is built around (verified against 3.17.2):
//! - an empty stage is `200 {}`, an unknown alias is `400 INVALID_PARAMETER_VALUE`, an
//!   unknown model is `404 RESOURCE_DOES_NOT_EXIST`;
//! - empty lists are omitted from JSON and `version` is a string;
//! - artifact listings are one level deep with bare names, and directories have no size;
//! - the ETag is not a content hash, and MLflow stores no checksum at all, so the digest is
//!   computed here at first download and is the cache's reference from then on.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use futures_util::future::BoxFuture;

use super::error::RegistryError;
use super::settings::{RegistrySettings, Target};
use crate::backoff::Backoff;
use crate::fetch::SourceError;
use crate::telemetry::metrics::RegistryMetrics;

/// API answers larger than this are refused (a listing of 10 000 files is about 1 MiB).
const MAX_API_BODY: usize = 16 << 20;
/// Error bodies are read up to this much, for the message.
const MAX_ERROR_BODY: usize = 64 << 10;
/// Bounds on the artifact tree walk.
pub const MAX_TREE_ENTRIES: usize = 10_000;
pub const MAX_TREE_DEPTH: usize = 16;
/// Largest listed file size believed (1 TiB; Phi-3-medium's fp16 weights are 28 GB). With at
/// most [`MAX_TREE_ENTRIES`] files, sums of listed sizes cannot overflow.
pub const MAX_FILE_BYTES: u64 = 1 << 40;
/// Longest version string, run id or stage accepted from the registry (MLflow's are short
/// integers, 32 hex digits and a word).
const MAX_ID_BYTES: usize = 64;
/// Longest `source` or `status` accepted.
const MAX_SOURCE_BYTES: usize = 4096;

/// How requests authenticate, from the same environment variables MLflow's clients read.
#[derive(Clone, Default)]
pub enum Auth {
    #[default]
    None,
    Bearer(String),
    Basic {
        username: String,
        password: String,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log secrets.
        f.write_str(match self {
            Auth::None => "none",
            Auth::Bearer(_) => "bearer token",
            Auth::Basic { .. } => "basic",
        })
    }
}

impl Auth {
    /// `MLFLOW_TRACKING_TOKEN` (bearer), else `MLFLOW_TRACKING_USERNAME` and
    /// `MLFLOW_TRACKING_PASSWORD` (basic), else none.
    pub fn from_env() -> Auth {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(token) = var("MLFLOW_TRACKING_TOKEN") {
            Auth::Bearer(token)
        } else if let (Some(username), Some(password)) = (var("MLFLOW_TRACKING_USERNAME"), var("MLFLOW_TRACKING_PASSWORD")) {
            Auth::Basic { username, password }
        } else {
            Auth::None
        }
    }

    fn apply(&self, rb: RequestBuilder) -> RequestBuilder {
        match self {
            Auth::None => rb,
            Auth::Bearer(t) => rb.bearer_auth(t),
            Auth::Basic { username, password } => rb.basic_auth(username, Some(password)),
        }
    }
}

/// A registered model version as the registry describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub current_stage: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
}

impl ModelVersion {
    pub fn is_ready(&self) -> bool {
        self.status == "READY"
    }

    /// Version numbers compare numerically ("10" > "9").
    fn number(&self) -> u64 {
        self.version.parse().unwrap_or(0)
    }

    /// Checks an answer about model `name` before anything is done with it. The version
    /// becomes a folder name, an index key, a log field, a response header and a metric label,
    /// so it must be what MLflow makes (a decimal number); the model must be the one asked
    /// about (the cache files it under the configured name); the other texts that reach logs,
    /// status and telemetry are short and free of control characters.
    ///
    /// # Errors
    /// [`RegistryError::Decode`] naming the field, its value shown escaped and cut short.
    pub(crate) fn checked(self, name: &str) -> Result<ModelVersion, RegistryError> {
        let refuse = |message: String| RegistryError::Decode { url: format!("the registry's answer about model `{name}`"), message };
        let shown = |v: &str| format!("{:?}", crate::util::truncate(v, MAX_ID_BYTES));
        if self.name != name {
            return Err(refuse(format!("it describes model {} instead", shown(&self.name))));
        }
        let number = !self.version.is_empty() && self.version.len() <= 19 && !self.version.starts_with('0') && self.version.bytes().all(|b| b.is_ascii_digit());
        if !number {
            return Err(refuse(format!("version {} is not a version number", shown(&self.version))));
        }
        let texts = [
            ("status", self.status.as_str(), MAX_ID_BYTES),
            ("run_id", self.run_id.as_deref().unwrap_or_default(), MAX_ID_BYTES),
            ("current_stage", self.current_stage.as_deref().unwrap_or_default(), MAX_ID_BYTES),
            ("source", self.source.as_str(), MAX_SOURCE_BYTES),
        ];
        for (field, value, max) in texts {
            if value.len() > max || value.chars().any(char::is_control) {
                return Err(refuse(format!("its {field} {} is longer than {max} bytes or holds control characters", shown(value))));
            }
        }
        Ok(self)
    }
}

// The answers of the MLflow routes read here, as they come off the wire (see [`decode`]).

/// `registered-models/get-latest-versions`.
#[derive(Deserialize)]
pub(crate) struct LatestVersions {
    #[serde(default)]
    model_versions: Vec<ModelVersion>,
}

impl LatestVersions {
    /// The newest version of `name` in `stage`, every version listed checked first.
    ///
    /// # Errors
    /// As [`ModelVersion::checked`].
    pub(crate) fn newest(self, name: &str, stage: &str) -> Result<Option<ModelVersion>, RegistryError> {
        let versions = self.model_versions.into_iter().map(|v| v.checked(name)).collect::<Result<Vec<_>, _>>()?;
        Ok(versions.into_iter().filter(|v| v.current_stage.as_deref().is_none_or(|s| s.eq_ignore_ascii_case(stage))).max_by_key(ModelVersion::number))
    }
}

/// `registered-models/alias` and `model-versions/get`.
#[derive(Deserialize)]
pub(crate) struct OneVersion {
    pub(crate) model_version: ModelVersion,
}

/// `model-versions/get-download-uri`.
#[derive(Deserialize)]
pub(crate) struct DownloadUri {
    pub(crate) artifact_uri: String,
}

/// `mlflow-artifacts/artifacts`: one level of the artifact tree.
#[derive(Deserialize)]
pub(crate) struct Listing {
    #[serde(default)]
    pub(crate) files: Vec<Entry>,
}

/// One entry of an artifact listing.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Entry {
    path: String,
    #[serde(default)]
    is_dir: bool,
    #[serde(default, deserialize_with = "u64_or_string")]
    file_size: Option<u64>,
}

/// A listed entry, checked: a folder to walk or a file to fetch, by its path relative to the
/// model's artifact root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listed {
    Dir(String),
    File(RemoteFile),
}

impl Listed {
    /// Checks entry `e` of the listing of `full`, the folder `dir` under the artifact root
    /// (`""` for the root itself).
    ///
    /// # Errors
    /// [`RegistryError::UnsafePath`] for a name that is not a plain name or a path that would
    /// leave the root, [`RegistryError::Decode`] for a size past [`MAX_FILE_BYTES`].
    pub(crate) fn of(full: &str, dir: &str, e: Entry) -> Result<Listed, RegistryError> {
        // MLflow lists bare names; accept a `dir/name` echo of the parent too.
        let name = e.path.strip_prefix(&format!("{full}/")).unwrap_or(&e.path);
        check_name(name)?;
        let rel = if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") };
        super::mlmodel::check_relative(&rel)?;
        if e.is_dir {
            return Ok(Listed::Dir(rel));
        }
        let size = e.file_size.unwrap_or(0);
        if size > MAX_FILE_BYTES {
            return Err(RegistryError::Decode { url: full.to_string(), message: format!("{rel:?} is listed at {size} bytes, more than any model file ({MAX_FILE_BYTES})") });
        }
        Ok(Listed::File(RemoteFile { path: rel, size }))
    }
}

/// A file under a model's artifact root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteFile {
    /// Path relative to the model's artifact root, `/`-separated, every part checked.
    pub path: String,
    pub size: u64,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    auth: Auth,
    backoff: Backoff,
    request_timeout: Duration,
    read_timeout: Duration,
    metrics: RegistryMetrics,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base.as_str()).field("auth", &self.auth).finish()
    }
}

impl Client {
    /// A client for the tracking server at `url`.
    ///
    /// TLS verification is always on: the system trust store, or only the CAs of
    /// `settings.ca_bundle` (else `MLFLOW_TRACKING_SERVER_CERT_PATH`) when one is given.
    ///
    /// # Errors
    /// [`RegistryError::Setup`] for a bad URL or TLS setup, [`RegistryError::CaBundle`] when
    /// the bundle cannot be read.
    pub fn new(url: &str, settings: &RegistrySettings, auth: Auth) -> Result<Client, RegistryError> {
        let base = Url::parse(url.trim_end_matches('/')).map_err(|e| RegistryError::Setup { message: format!("registry URL `{url}`: {e}") })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(RegistryError::Setup { message: format!("registry URL `{url}` must be http:// or https://") });
        }
        install_crypto_provider();
        let ca_bundle = settings.ca_bundle.clone().or_else(|| std::env::var_os("MLFLOW_TRACKING_SERVER_CERT_PATH").filter(|v| !v.is_empty()).map(Into::into));
        let builder = || {
            let mut headers = HeaderMap::new();
            headers.insert("x-edgeflow", HeaderValue::from_static(env!("CARGO_PKG_VERSION")));
            reqwest::Client::builder()
                .user_agent(concat!("edgeflow/", env!("CARGO_PKG_VERSION")))
                .default_headers(headers)
                .connect_timeout(settings.connect_timeout)
                .read_timeout(settings.read_timeout)
                .pool_max_idle_per_host(settings.parallel_downloads.max(2))
                .tcp_nodelay(true)
                // Credentials must not follow a redirect to another host.
                .redirect(reqwest::redirect::Policy::limited(5))
                .https_only(base.scheme() == "https")
        };
        let http = match &ca_bundle {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| RegistryError::CaBundle { path: path.clone(), source })?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| RegistryError::Setup { message: format!("CA bundle {}: {e}", path.display()) })?;
                if certs.is_empty() {
                    return Err(RegistryError::Setup { message: format!("CA bundle {} holds no PEM certificate", path.display()) });
                }
                builder().tls_certs_only(certs).build()
            }
            None => match builder().build() {
                Ok(c) => Ok(c),
                // DEVNOTE: the platform verifier refuses to build on a machine with an empty
                // system trust store; plain HTTP must still work there.
                Err(_) if base.scheme() == "http" => builder().tls_certs_only(Vec::new()).build(),
                Err(e) => Err(e),
            },
        }
        .map_err(|e| RegistryError::Setup { message: format!("{e}") })?;
        Ok(Client { http, base, auth, backoff: settings.backoff, request_timeout: settings.request_timeout, read_timeout: settings.read_timeout, metrics: RegistryMetrics::new() })
    }

    /// The same client, counting its exchanges, retries and backoff (and its poller's polls)
    /// in `metrics` (the daemon's `/metrics`).
    pub fn with_metrics(mut self, metrics: RegistryMetrics) -> Client {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &RegistryMetrics {
        &self.metrics
    }

    /// How long a download may receive nothing (and, see `fetch`, the window over which
    /// its rate is judged).
    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
    }

    pub fn base_url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    pub fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// The version `target` designates, or `None` when the stage is empty or the alias does
    /// not exist (the model itself does).
    ///
    /// # Errors
    /// [`RegistryError::ModelNotFound`] for an unknown model; transport, status and decode
    /// errors otherwise.
    pub async fn resolve(&self, name: &str, target: &Target) -> Result<Option<ModelVersion>, RegistryError> {
        match target {
            Target::Stage(stage) => self.latest_in_stage(name, stage).await,
            Target::Alias(alias) => self.by_alias(name, alias).await,
        }
    }

    /// The newest version in `stage`.
    ///
    /// # Errors
    /// As [`Client::resolve`].
    pub async fn latest_in_stage(&self, name: &str, stage: &str) -> Result<Option<ModelVersion>, RegistryError> {
        let a: LatestVersions = self.api_get("registered-models/get-latest-versions", &[("name", name), ("stages", stage)]).await.map_err(|e| not_found_as_model(e, name))?;
        a.newest(name, stage)
    }

    /// The version `alias` points at.
    ///
    /// # Errors
    /// As [`Client::resolve`].
    pub async fn by_alias(&self, name: &str, alias: &str) -> Result<Option<ModelVersion>, RegistryError> {
        match self.api_get::<OneVersion>("registered-models/alias", &[("name", name), ("alias", alias)]).await {
            Ok(a) => a.model_version.checked(name).map(Some),
            Err(RegistryError::Status { status: 400, code, message, .. })
                if code.as_deref() == Some("INVALID_PARAMETER_VALUE") && message.contains("alias") && message.contains("not found") =>
            {
                Ok(None)
            }
            Err(e) => Err(not_found_as_model(e, name)),
        }
    }

    /// One version's details.
    ///
    /// # Errors
    /// [`RegistryError::ModelNotFound`] when the model or version is gone.
    pub async fn model_version(&self, name: &str, version: &str) -> Result<ModelVersion, RegistryError> {
        let a: OneVersion = self.api_get("model-versions/get", &[("name", name), ("version", version)]).await.map_err(|e| not_found_as_model(e, name))?;
        let mv = a.model_version.checked(name)?;
        if mv.version != version {
            return Err(RegistryError::Decode {
                url: format!("the registry's answer about model `{name}`"),
                message: format!("version {version} was asked for and {} described", mv.version),
            });
        }
        Ok(mv)
    }

    /// The artifact-proxy path of a version's files (e.g. `1/models/m-<id>/artifacts`).
    ///
    /// # Errors
    /// [`RegistryError::UnsupportedLocation`] when the artifacts are not served by the
    /// tracking server.
    pub async fn artifact_root(&self, mv: &ModelVersion) -> Result<String, RegistryError> {
        let a: DownloadUri = self.api_get("model-versions/get-download-uri", &[("name", &mv.name), ("version", &mv.version)]).await.map_err(|e| not_found_as_model(e, &mv.name))?;
        proxy_path(&a.artifact_uri).ok_or_else(|| RegistryError::UnsupportedLocation { name: mv.name.clone(), version: mv.version.clone(), uri: a.artifact_uri.clone() })
    }

    /// Every file under `root`, walked level by level (MLflow lists one level at a time),
    /// with paths relative to `root`.
    ///
    /// # Errors
    /// [`RegistryError::UnsafePath`] for a listed name that is not a plain name,
    /// [`RegistryError::TreeTooLarge`] past the bounds; request errors.
    pub async fn tree(&self, root: &str) -> Result<Vec<RemoteFile>, RegistryError> {
        let mut files = Vec::new();
        let mut dirs = vec![(String::new(), 0usize)];
        let mut entries = 0usize;
        while let Some((dir, depth)) = dirs.pop() {
            let full = if dir.is_empty() { root.to_string() } else { format!("{root}/{dir}") };
            for e in self.list(&full).await? {
                entries += 1;
                if entries > MAX_TREE_ENTRIES || depth >= MAX_TREE_DEPTH {
                    return Err(RegistryError::TreeTooLarge { root: root.to_string(), limit: MAX_TREE_ENTRIES, depth: MAX_TREE_DEPTH });
                }
                match Listed::of(&full, &dir, e)? {
                    Listed::Dir(rel) => dirs.push((rel, depth + 1)),
                    Listed::File(file) => files.push(file),
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    async fn list(&self, path: &str) -> Result<Vec<Entry>, RegistryError> {
        let url = self.endpoint(&["api", "2.0", "mlflow-artifacts", "artifacts"]);
        let a: Listing = self.get_json(url, &[("path", path)]).await?;
        Ok(a.files)
    }

    /// Reads a small artifact (MLmodel, genai_config.json) as text, at most `limit` bytes.
    ///
    /// # Errors
    /// Request and status errors; [`RegistryError::Decode`] when it is larger or not UTF-8.
    pub async fn read_text(&self, path: &str, limit: usize) -> Result<String, RegistryError> {
        let url = self.artifact_url(path);
        let shown = url.to_string();
        // The body is read inside the attempt: a cut or stalled body is retried like a
        // failed request, and the request timeout covers it.
        let body = self
            .backoff
            .retry(
                |_| {
                    self.counted(async {
                        let resp = self.send(self.request(Method::GET, url.clone()).timeout(self.request_timeout)).await?;
                        let body = read_bounded(resp, limit).await.map_err(|source| RegistryError::Request { url: shown.clone(), source })?;
                        body.ok_or_else(|| RegistryError::TooLarge { url: shown.clone(), limit })
                    })
                },
                RegistryError::is_retryable,
                |e, delay| self.retry_noted(e, delay),
            )
            .await?;
        String::from_utf8(body).map_err(|_| RegistryError::Decode { url: shown, message: "not UTF-8 text".into() })
    }

    /// The download URL of an artifact path (each segment percent-encoded).
    pub fn artifact_url(&self, path: &str) -> Url {
        let mut parts = vec!["api", "2.0", "mlflow-artifacts", "artifacts"];
        parts.extend(path.split('/').filter(|s| !s.is_empty()));
        self.endpoint(&parts)
    }

    /// Starts a download of `url` at byte `from`; `if_range` (an ETag or Last-Modified value
    /// from an earlier answer) makes the server send the whole file if it changed since.
    /// Status handling is the caller's: it needs to tell 200, 206 and 416 apart.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn download(&self, url: &Url, from: u64, if_range: Option<&str>) -> Result<Response, RegistryError> {
        let mut rb = self.request(Method::GET, url.clone());
        if from > 0 {
            rb = rb.header(reqwest::header::RANGE, format!("bytes={from}-"));
            if let Some(v) = if_range {
                rb = rb.header(reqwest::header::IF_RANGE, v);
            }
        }
        rb.send().await.map_err(|source| RegistryError::Request { url: url.to_string(), source })
    }

    /// Turns a non-success answer into an error (status, MLflow's `{error_code, message}`
    /// JSON, or whatever HTML or text came back).
    pub async fn error_for(resp: Response) -> RegistryError {
        let url = resp.url().to_string();
        let status = resp.status();
        let body = read_bounded(resp, MAX_ERROR_BODY).await.ok().flatten().unwrap_or_default();
        let (code, message) = parse_error_body(&body);
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return RegistryError::Unauthorized { url, status: status.as_u16(), message };
        }
        RegistryError::Status { url, status: status.as_u16(), code, message }
    }

    fn endpoint(&self, parts: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty().extend(parts);
        }
        url
    }

    fn request(&self, method: Method, url: Url) -> RequestBuilder {
        self.auth.apply(self.http.request(method, url))
    }

    async fn send(&self, rb: RequestBuilder) -> Result<Response, RegistryError> {
        let req = rb.build().map_err(|source| RegistryError::Request { url: String::new(), source })?;
        let url = req.url().to_string();
        let resp = self.http.execute(req).await.map_err(|source| RegistryError::Request { url, source })?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(Self::error_for(resp).await)
        }
    }

    async fn api_get<T: DeserializeOwned>(&self, route: &str, query: &[(&str, &str)]) -> Result<T, RegistryError> {
        let mut parts = vec!["api", "2.0", "mlflow"];
        parts.extend(route.split('/'));
        self.get_json(self.endpoint(&parts), query).await
    }

    async fn get_json<T: DeserializeOwned>(&self, url: Url, query: &[(&str, &str)]) -> Result<T, RegistryError> {
        let shown = url.to_string();
        self.backoff
            .retry(
                |_| {
                    self.counted(async {
                        let resp = self.send(self.request(Method::GET, url.clone()).query(query).timeout(self.request_timeout)).await?;
                        let body = read_bounded(resp, MAX_API_BODY).await.map_err(|source| RegistryError::Request { url: shown.clone(), source })?;
                        let body = body.ok_or_else(|| RegistryError::TooLarge { url: shown.clone(), limit: MAX_API_BODY })?;
                        decode(&body, &shown)
                    })
                },
                RegistryError::is_retryable,
                |e, delay| self.retry_noted(e, delay),
            )
            .await
    }

    /// Runs one API exchange and counts its result.
    async fn counted<T>(&self, exchange: impl std::future::Future<Output = Result<T, RegistryError>>) -> Result<T, RegistryError> {
        let result = exchange.await;
        self.metrics.request("api", result.as_ref().map_or_else(RegistryError::kind, |_| "ok"));
        result
    }

    /// Logs and counts a retry of an API exchange.
    fn retry_noted(&self, e: &RegistryError, delay: Duration) {
        tracing::warn!(error = %crate::util::chain(e), ?delay, "registry request failed; retrying");
        self.metrics.retrying("api", delay);
    }
}

/// Decodes the JSON answer from `url`.
///
/// # Errors
/// [`RegistryError::Decode`] with serde's message and the start of the body.
pub(crate) fn decode<T: DeserializeOwned>(body: &[u8], url: &str) -> Result<T, RegistryError> {
    serde_json::from_slice(body).map_err(|e| RegistryError::Decode { url: url.to_string(), message: format!("{e}; body starts {:?}", preview(body)) })
}

/// A 404 about the registered model becomes [`RegistryError::ModelNotFound`].
fn not_found_as_model(e: RegistryError, name: &str) -> RegistryError {
    match e {
        RegistryError::Status { status: 404, ref code, .. } if code.as_deref() == Some("RESOURCE_DOES_NOT_EXIST") => RegistryError::ModelNotFound { name: name.to_string() },
        e => e,
    }
}

/// Reads a body up to `limit` bytes; `None` when it is longer.
async fn read_bounded(mut resp: Response, limit: usize) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut out = Vec::with_capacity(resp.content_length().map_or(0, |n| (n as usize).min(limit)));
    while let Some(chunk) = resp.chunk().await? {
        if out.len() + chunk.len() > limit {
            return Ok(None);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Some(out))
}

fn preview(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned()
}

/// `(error_code, message)` from MLflow's JSON error, or the text of an HTML or plain answer.
pub(crate) fn parse_error_body(body: &[u8]) -> (Option<String>, String) {
    #[derive(Deserialize)]
    struct ApiError {
        error_code: Option<String>,
        message: Option<String>,
    }
    if let Ok(e) = serde_json::from_slice::<ApiError>(body) {
        if e.error_code.is_some() || e.message.is_some() {
            // Both go into logs, the status and fleet reports: one bounded line each.
            return (e.error_code.map(|c| crate::util::one_line(&c, 64)), crate::util::one_line(&e.message.unwrap_or_default(), 1000));
        }
    }
    let text = String::from_utf8_lossy(body);
    // Strip tags from an HTML page; keep the words.
    let mut plain = String::with_capacity(text.len());
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                plain.push(' ');
            }
            c if !in_tag => plain.push(c),
            _ => {}
        }
    }
    let mut message = crate::util::one_line(&plain, 300);
    if message.is_empty() {
        message = "(empty body)".into();
    }
    (None, message)
}

/// `mlflow-artifacts:/1/models/m-x/artifacts` (or with an authority,
/// `mlflow-artifacts://host:port/1/...`) → `1/models/m-x/artifacts`.
pub fn proxy_path(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("mlflow-artifacts:")?;
    let rest = match rest.strip_prefix("//") {
        // An authority names the server; the path after it is what the proxy serves.
        Some(with_authority) => with_authority.split_once('/').map_or("", |(_, p)| p),
        None => rest,
    };
    let path = rest.trim_matches('/');
    if path.is_empty() || path.split('/').any(|p| p == ".." || p == ".") {
        return None;
    }
    Some(path.to_string())
}

/// A listed name must be one plain path component a Linux file system can hold (at most 255
/// bytes, no control character).
fn check_name(name: &str) -> Result<(), RegistryError> {
    if name.is_empty() || name.len() > 255 || name == "." || name == ".." || name.contains('/') || name.contains('\\') || name.chars().any(char::is_control) {
        return Err(RegistryError::UnsafePath { path: name.to_string() });
    }
    Ok(())
}

fn u64_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        Num(u64),
        Text(String),
    }
    Ok(match Option::<N>::deserialize(d)? {
        None => None,
        Some(N::Num(n)) => Some(n),
        Some(N::Text(s)) => Some(s.parse().map_err(serde::de::Error::custom)?),
    })
}

/// rustls needs a process-wide crypto provider; reqwest is built without one (see Cargo.toml).
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another component may have installed one already; either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Downloads go through the registry's client: its auth, TLS, proxy and timeouts.
impl crate::fetch::Source for Client {
    fn get<'a>(&'a self, url: &'a Url, from: u64, if_range: Option<&'a str>) -> BoxFuture<'a, Result<Response, SourceError>> {
        Box::pin(async move { self.download(url, from, if_range).await.map_err(source_error) })
    }

    fn error_for(&self, resp: Response) -> BoxFuture<'static, SourceError> {
        Box::pin(async move { source_error(Client::error_for(resp).await) })
    }
}

fn source_error(e: RegistryError) -> SourceError {
    let (retryable, unreachable, kind) = (e.is_retryable(), e.is_unreachable(), e.kind());
    SourceError::new(e, retryable, unreachable).with_kind(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_uris_map_to_proxy_paths() {
        let table = [
            ("mlflow-artifacts:/1/models/m-abc/artifacts", Some("1/models/m-abc/artifacts")),
            ("mlflow-artifacts://10.0.0.5:5000/1/models/m-abc/artifacts/", Some("1/models/m-abc/artifacts")),
            ("mlflow-artifacts:/0/run/artifacts/model", Some("0/run/artifacts/model")),
            ("mlflow-artifacts:/0/../../etc", None),
            ("mlflow-artifacts:/", None),
            ("s3://bucket/1/models/m-abc/artifacts", None),
            ("file:///tmp/mlruns/1/x", None),
            ("runs:/abc/model", None),
        ];
        for (uri, want) in table {
            assert_eq!(proxy_path(uri).as_deref(), want, "{uri}");
        }
    }

    #[test]
    fn error_bodies_of_every_kind_become_messages() {
        let (code, msg) = parse_error_body(br#"{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Registered Model with name=x not found"}"#);
        assert_eq!(code.as_deref(), Some("RESOURCE_DOES_NOT_EXIST"));
        assert_eq!(msg, "Registered Model with name=x not found");
        let (code, msg) = parse_error_body(b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>");
        assert_eq!(code, None);
        assert_eq!(msg, "502 Bad Gateway 502 Bad Gateway");
        let (_, msg) = parse_error_body(b"Internal Server Error");
        assert_eq!(msg, "Internal Server Error");
        let (_, msg) = parse_error_body(b"");
        assert_eq!(msg, "(empty body)");
        let (_, msg) = parse_error_body("é".repeat(400).as_bytes());
        assert!(msg.ends_with('…') && msg.len() <= 304);
    }

    #[test]
    fn listed_names_must_be_plain() {
        for bad in ["", ".", "..", "../x", "/etc", "a/b", "a\\b", "nul\0"] {
            assert!(matches!(check_name(bad), Err(RegistryError::UnsafePath { .. })), "{bad:?}");
        }
        for good in ["MLmodel", "model.onnx.data", "..hidden", "a b"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn stage_answers_decode_with_omitted_fields() {
        let v: ModelVersion = serde_json::from_str(r#"{"name":"m","version":"12","status":"READY","source":"models:/m-1"}"#).unwrap();
        assert!(v.is_ready());
        assert_eq!(v.number(), 12);
        assert!(v.aliases.is_empty());
        let e: Entry = serde_json::from_str(r#"{"path":"a","file_size":"42"}"#).unwrap();
        assert_eq!(e.file_size, Some(42));
    }
}
