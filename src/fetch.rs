//! Resumable, verified downloads into the cache's temp area.
//!
//! Each file streams into `<tmp>/<key>.part` while it is hashed (sha256) on a blocking
//! thread; `<key>.part.json` beside it remembers the URL, the expected size and the
//! server's validator (ETag or Last-Modified). A dropped connection resumes with
//! `Range: bytes=N-` and `If-Range`, and so does a restarted daemon: the key is derived from
//! the model version and path, so the next run finds the same partial file. Resuming
//! re-hashes the bytes already on disk (local reads are far cheaper than the network, and
//! there is then no hash state to persist or trust).
//!
//! What survives a power loss: every [`CHECKPOINT_STEP`] bytes the file is fsynced and the
//! state records that length, the sha256 of those bytes and the boot it was written in. A
//! resume in the same boot (the daemon restarted) keeps the whole file, which the page cache
//! holds intact; a resume after a reboot keeps only the checkpointed prefix, and only if it
//! still hashes to the recorded digest (blocks written after the last fsync may hold zeros
//! or stale data). Without a validator from the server nothing is resumed: a ranged request
//! could splice two versions of the file.
//!
//! The size must match the registry's listing exactly. An answer that proves itself wrong
//! (more bytes than listed, or a Content-Length that disagrees) costs its partial file: the
//! bytes already on disk came from the same server and are no longer trusted. A download
//! that trickles (less than [`MIN_RATE`] over a `read_timeout` window, which a byte now and
//! then keeps from timing out) is dropped and resumed like a stalled one. When the disk
//! fills, every partial file of the pull is removed, so the space goes back to the version
//! serving (its index, its logs) and the next attempt starts from a clean slate.
//!
//! Files download a few at a time (`parallel_downloads`), optionally under a shared bandwidth
//! cap. The HTTP requests go through a [`Source`] (the registry's client implements it), so
//! this module knows nothing of MLflow.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::telemetry::metrics::RegistryMetrics;

/// Batches queued between the network and the writer thread.
const WRITE_QUEUE: usize = 16;
/// Network chunks are handed to the writer in batches of about this many bytes: one wakeup
/// per batch instead of one per (often 16 KiB) chunk.
const BATCH_BYTES: usize = 256 << 10;
const WRITE_BUFFER: usize = 1 << 20;
/// Writeback of this many new bytes is started while downloading, so the fsync before the
/// file is published has little left to do.
const WRITEBACK_STEP: u64 = 64 << 20;
/// The partial file is fsynced and its durable length recorded this often.
const CHECKPOINT_STEP: u64 = 2 * WRITEBACK_STEP;
/// Bytes per second below which a download counts as stalled, judged over a whole stall
/// window: a link this slow would take a month over a 2.4 GB model, and a server that sends
/// a byte now and then to beat the read timeout must not hold the poller forever.
pub const MIN_RATE: u64 = 1024;

/// Where the bytes come from: one ranged GET, and an answer that is not 200/206/416 turned
/// into an error. The registry's client implements it with its auth, TLS and timeouts.
pub trait Source: Send + Sync {
    /// Starts a GET of `url` at byte `from`; `if_range` (an ETag or Last-Modified value from
    /// an earlier answer) asks for the whole file if it changed since. Status handling is the
    /// caller's.
    fn get<'a>(&'a self, url: &'a Url, from: u64, if_range: Option<&'a str>) -> BoxFuture<'a, Result<reqwest::Response, SourceError>>;
    /// Reads an unexpected answer (status, error body) into an error.
    fn error_for(&self, resp: reqwest::Response) -> BoxFuture<'static, SourceError>;
}

/// A [`Source`]'s error, with what the downloader and its callers must know about it; shows
/// (and chains) as the error it wraps.
#[derive(Debug)]
pub struct SourceError {
    inner: Box<dyn std::error::Error + Send + Sync>,
    /// Worth another attempt (a timeout, a 5xx, a reset).
    pub retryable: bool,
    /// The server could not be reached at all.
    pub unreachable: bool,
    /// The failure as a metric label (`connect`, `timeout`, `http_5xx`...).
    pub kind: &'static str,
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source()
    }
}

impl SourceError {
    pub fn new(inner: impl std::error::Error + Send + Sync + 'static, retryable: bool, unreachable: bool) -> Self {
        Self { inner: Box::new(inner), retryable, unreachable, kind: "transport" }
    }

    /// The same error, labelled `kind` in metrics.
    pub fn with_kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }
}

/// One file to download.
#[derive(Debug, Clone)]
pub struct Job {
    pub url: Url,
    /// Name used in messages (the local path in the model folder).
    pub name: String,
    pub size: u64,
    /// Stable identity of this download across restarts (see [`job_key`]).
    pub key: String,
}

/// A downloaded, hashed file waiting in the temp area.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// Bytes that were already on disk from an earlier attempt or run.
    pub resumed_from: u64,
}

/// What happened, for progress output and logs.
#[derive(Debug, Clone)]
pub enum Event {
    Started { name: String, size: u64, resume_from: u64 },
    Retrying { name: String, error: String, delay: Duration, at: u64 },
    Finished { name: String, size: u64, sha256: String },
}

pub type Observer = Arc<dyn Fn(&Event) + Send + Sync>;

/// Byte counters shared with whoever draws a progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicU64,
    /// Bytes on disk so far (resumed bytes included).
    pub done: AtomicU64,
    /// Bytes found on disk from before, not downloaded now.
    pub resumed: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("downloading {name}")]
    Source {
        name: String,
        #[source]
        source: SourceError,
    },
    #[error("downloading {name}: the connection broke after {at} of {size} bytes")]
    Body {
        name: String,
        at: u64,
        size: u64,
        #[source]
        source: reqwest::Error,
    },
    #[error("downloading {name}: the server closed the stream after {at} of {size} bytes")]
    Truncated { name: String, at: u64, size: u64 },
    #[error("downloading {name}: the registry lists {expected} bytes but sent {actual}")]
    SizeMismatch { name: String, expected: u64, actual: u64 },
    #[error("downloading {name}: range request at {from} was refused (416); the file changed on the server")]
    RangeRefused { name: String, from: u64 },
    #[error("downloading {name}: only {received} bytes arrived in {}s (at {at} of {size} bytes), below the minimum of {min_rate} bytes/s; the server is stalling", .window.as_secs())]
    Stalled { name: String, at: u64, size: u64, received: u64, window: Duration, min_rate: u64 },
    #[error("writing {path}: the file system holding the cache is full; the partial downloads of this pull are removed to give the space back")]
    DiskFull {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the download writer for {name} stopped unexpectedly")]
    WriterGone { name: String },
}

impl FetchError {
    pub fn is_retryable(&self) -> bool {
        match self {
            FetchError::Source { source, .. } => source.retryable,
            FetchError::Body { .. } | FetchError::Truncated { .. } | FetchError::RangeRefused { .. } | FetchError::Stalled { .. } => true,
            FetchError::SizeMismatch { .. } | FetchError::DiskFull { .. } | FetchError::Io { .. } | FetchError::WriterGone { .. } => false,
        }
    }

    /// True when the local disk is full (or over its quota): not the registry's fault.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, FetchError::DiskFull { .. })
    }

    /// The failure as a metric label (see `telemetry::metrics::RegistryMetrics::request`).
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::Source { source, .. } => source.kind,
            FetchError::Body { source, .. } if source.is_timeout() => "timeout",
            FetchError::Body { .. } => "transport",
            FetchError::Truncated { .. } => "truncated",
            FetchError::SizeMismatch { .. } => "bad_answer",
            FetchError::RangeRefused { .. } => "range_refused",
            FetchError::Stalled { .. } => "stalled",
            FetchError::DiskFull { .. } | FetchError::Io { .. } | FetchError::WriterGone { .. } => "local_error",
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
        move |source| FetchError::from_io(path, source)
    }

    /// An I/O error on `path`: [`FetchError::DiskFull`] when the file system is full.
    fn from_io(path: &Path, source: std::io::Error) -> FetchError {
        if crate::util::is_out_of_space(&source) {
            FetchError::DiskFull { path: path.to_path_buf(), source }
        } else {
            FetchError::Io { path: path.to_path_buf(), source }
        }
    }
}

/// A stable key for a file of a model version: the same version, source and path give
/// the same partial file after a restart.
pub fn job_key(model: &str, version: &str, source: &str, path: &str) -> String {
    let mut h = Sha256::new();
    for part in [model, version, source, path] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..16])
}

/// What `<key>.part.json` remembers about a partial file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PartState {
    url: String,
    size: u64,
    validator: Option<String>,
    /// Bytes known to be on stable storage (fsynced), and their sha256.
    #[serde(default)]
    durable: u64,
    #[serde(default)]
    durable_sha256: Option<String>,
    /// The kernel's boot id when the state was written: within one boot the page cache
    /// holds every byte written, even unsynced ones.
    #[serde(default)]
    boot_id: Option<String>,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), if the kernel tells.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// A shared download rate cap (GCRA: each chunk books its transmission time).
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_second: f64,
    burst: Duration,
    next_free: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub fn new(bytes_per_second: u64) -> RateLimiter {
        RateLimiter { bytes_per_second: bytes_per_second.max(1) as f64, burst: Duration::from_millis(200), next_free: Mutex::new(None) }
    }

    /// Waits until `n` more bytes fit under the cap.
    pub async fn acquire(&self, n: usize) {
        let wait = {
            let now = Instant::now();
            let mut next = match self.next_free.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let start = next.map_or(now, |t| t.max(now));
            let end = start + Duration::from_secs_f64(n as f64 / self.bytes_per_second);
            *next = Some(end);
            end.saturating_duration_since(now).saturating_sub(self.burst)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Downloads files into one temp folder.
#[derive(Clone)]
pub struct Downloader {
    source: Arc<dyn Source>,
    tmp: PathBuf,
    parallel: usize,
    backoff: Backoff,
    limiter: Option<Arc<RateLimiter>>,
    /// A download receiving less than `min_rate` bytes/s over this window is stalled.
    stall_window: Duration,
    min_rate: u64,
    metrics: RegistryMetrics,
    /// One lock per partial file. A download abandoned mid-way (its pull was preempted) has
    /// a writer thread that may still be flushing; the writer holds the lock until it is
    /// done, so a resume of the same file never appends beside it.
    locks: Arc<Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Downloader {
    /// Downloads from `source` into `tmp`, `parallel` files at a time, retrying with `backoff`.
    /// A download is stalled when it receives less than [`MIN_RATE`] bytes/s (half its share
    /// of the `bandwidth_limit`, if that is lower) over 60 s; see
    /// [`Downloader::with_stall_window`].
    pub fn new(source: Arc<dyn Source>, backoff: Backoff, tmp: PathBuf, parallel: usize, bandwidth_limit: Option<u64>) -> Downloader {
        Downloader {
            source,
            tmp,
            parallel: parallel.max(1),
            backoff,
            limiter: bandwidth_limit.map(|b| Arc::new(RateLimiter::new(b))),
            stall_window: Duration::from_secs(60),
            // Under a cap, each of the files downloading at once gets its share of it.
            min_rate: bandwidth_limit.map_or(MIN_RATE, |b| MIN_RATE.min(b / (2 * parallel.max(1) as u64))),
            locks: Arc::default(),
            metrics: RegistryMetrics::new(),
        }
    }

    /// Judges the download rate over `window` (the registry's `read_timeout`: a download
    /// that receives nothing for that long has timed out already).
    pub fn with_stall_window(mut self, window: Duration) -> Downloader {
        self.stall_window = window.max(Duration::from_secs(1));
        self
    }

    /// Counts every download attempt, retry and backoff in `metrics`.
    pub fn with_metrics(mut self, metrics: RegistryMetrics) -> Downloader {
        self.metrics = metrics;
        self
    }

    /// Downloads every job, `parallel` at a time; stops at the first error that retries
    /// could not cure (the other partial files stay for the next attempt).
    ///
    /// # Errors
    /// The first [`FetchError`] that was not retryable or ran out of attempts.
    pub async fn fetch_all(&self, jobs: Vec<Job>, progress: Arc<Progress>, observer: Observer) -> Result<Vec<Fetched>, FetchError> {
        let keys: Vec<String> = jobs.iter().map(|j| j.key.clone()).collect();
        let result = self.fetch_each(jobs, progress, observer).await;
        if let Err(e) = &result {
            if e.is_disk_full() {
                // DEVNOTE: the other downloads were aborted with the JoinSet; a writer thread
                // still flushing keeps its file open, and its space comes back when it ends.
                let freed = self.discard(&keys);
                tracing::error!(error = %crate::util::chain(e), files = keys.len(), freed, "the disk is full; removed this pull's partial downloads");
            }
        }
        result
    }

    /// Where the partial file of `key` and its resume state live.
    fn partial_paths(&self, key: &str) -> [PathBuf; 2] {
        [self.tmp.join(format!("{key}.part")), self.tmp.join(format!("{key}.part.json"))]
    }

    /// Removes the partial files (and their resume state) of `keys`; the bytes freed.
    fn discard(&self, keys: &[String]) -> u64 {
        let mut freed = 0;
        for key in keys {
            for path in self.partial_paths(key) {
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                if std::fs::remove_file(&path).is_ok() {
                    freed += len;
                }
            }
        }
        freed
    }

    async fn fetch_each(&self, jobs: Vec<Job>, progress: Arc<Progress>, observer: Observer) -> Result<Vec<Fetched>, FetchError> {
        progress.total.fetch_add(jobs.iter().fold(0u64, |sum, j| sum.saturating_add(j.size)), Ordering::Relaxed);
        let semaphore = Arc::new(tokio::sync::Semaphore::new(self.parallel));
        let mut set = tokio::task::JoinSet::new();
        for (i, job) in jobs.into_iter().enumerate() {
            let this = self.clone();
            let progress = progress.clone();
            let observer = observer.clone();
            let semaphore = semaphore.clone();
            set.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                (i, this.fetch_one(&job, &progress, &observer).await)
            });
        }
        let mut done = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((i, Ok(f))) => done.push((i, f)),
                Ok((_, Err(e))) => return Err(e),
                Err(e) => return Err(FetchError::WriterGone { name: format!("download task: {e}") }),
            }
        }
        done.sort_by_key(|(i, _)| *i);
        Ok(done.into_iter().map(|(_, f)| f).collect())
    }

    /// The lock of the partial file `key` (entries no one holds are dropped on the way).
    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = match self.locks.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(key.to_string()).or_default().clone()
    }

    /// Downloads one file, resuming whatever an earlier attempt or run left.
    ///
    /// # Errors
    /// As [`Downloader::fetch_all`].
    pub async fn fetch_one(&self, job: &Job, progress: &Progress, observer: &Observer) -> Result<Fetched, FetchError> {
        let held = Arc::new(self.lock_for(&job.key).lock_owned().await);
        let [part, state_path] = self.partial_paths(&job.key);
        let url = job.url.to_string();
        let (p, s, size) = (part.clone(), state_path.clone(), job.size);
        let (mut hasher, mut have, mut validator) =
            tokio::task::spawn_blocking(move || prepare(&p, &s, &url, size)).await.map_err(|_| FetchError::WriterGone { name: job.name.clone() })??;
        let resumed_from = have;
        progress.done.fetch_add(have, Ordering::Relaxed);
        progress.resumed.fetch_add(have, Ordering::Relaxed);
        observer(&Event::Started { name: job.name.clone(), size: job.size, resume_from: have });
        let mut retry = 0;
        while have < job.size || (job.size == 0 && !part.exists()) {
            let before = have;
            let result = self.attempt(job, &part, &state_path, &mut hasher, &mut have, &mut validator, progress, &held).await;
            self.metrics.request("download", result.as_ref().map_or_else(FetchError::kind, |()| "ok"));
            match result {
                Ok(()) => {}
                Err(e) if e.is_retryable() && retry + 1 < self.backoff.max_attempts => {
                    // Progress made on this attempt earns the retries back: a flaky link that
                    // keeps moving forward is not a failing one (a stalled one is: its trickle
                    // of bytes earns nothing).
                    if have > before && !matches!(e, FetchError::Stalled { .. }) {
                        retry = 0;
                    }
                    let delay = self.backoff.delay(retry);
                    self.metrics.retrying("download", delay);
                    tracing::warn!(file = %job.name, at = have, error = %crate::util::chain(&e), ?delay, "download interrupted; resuming");
                    observer(&Event::Retrying { name: job.name.clone(), error: crate::util::chain(&e), delay, at: have });
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
                Err(e) => return Err(e),
            }
        }
        let p = part.clone();
        let digest = tokio::task::spawn_blocking(move || -> Result<String, FetchError> {
            let f = std::fs::File::open(&p).map_err(FetchError::io(&p))?;
            f.sync_all().map_err(FetchError::io(&p))?;
            crate::crash::point("fetch.file_synced");
            Ok(hex::encode(hasher.finalize()))
        })
        .await
        .map_err(|_| FetchError::WriterGone { name: job.name.clone() })??;
        observer(&Event::Finished { name: job.name.clone(), size: job.size, sha256: digest.clone() });
        Ok(Fetched { name: job.name.clone(), path: part, size: job.size, sha256: digest, resumed_from })
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        job: &Job,
        part: &Path,
        state_path: &Path,
        hasher: &mut Sha256,
        have: &mut u64,
        validator: &mut Option<String>,
        progress: &Progress,
        held: &Arc<tokio::sync::OwnedMutexGuard<()>>,
    ) -> Result<(), FetchError> {
        let reg = |source| FetchError::Source { name: job.name.clone(), source };
        let mut resp = self.source.get(&job.url, *have, validator.as_deref()).await.map_err(reg)?;
        let status = resp.status();
        let mut truncate = false;
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let start = resp.headers().get(reqwest::header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).and_then(content_range_start);
                if start != Some(*have) {
                    // Not the range asked for: drop this answer and start over cleanly.
                    truncate = true;
                }
            }
            StatusCode::OK => truncate = *have > 0, // the file changed (If-Range) or ranges are not supported
            StatusCode::RANGE_NOT_SATISFIABLE => {
                reset(part, hasher, have, progress)?;
                return Err(FetchError::RangeRefused { name: job.name.clone(), from: *have });
            }
            _ => return Err(reg(self.source.error_for(resp).await)),
        }
        if truncate {
            reset(part, hasher, have, progress)?;
            if status == StatusCode::PARTIAL_CONTENT {
                return Err(FetchError::RangeRefused { name: job.name.clone(), from: 0 });
            }
        }
        if let Some(len) = resp.content_length() {
            // The server's Content-Length is untrusted: it may be near u64::MAX.
            if have.saturating_add(len) != job.size {
                let actual = have.saturating_add(len);
                // A server that disagrees with the listing about the file is not trusted with
                // the bytes it sent before either.
                discard_partial(part, state_path, hasher, have, progress)?;
                return Err(FetchError::SizeMismatch { name: job.name.clone(), expected: job.size, actual });
            }
        }
        let new_validator =
            resp.headers().get(reqwest::header::ETAG).or_else(|| resp.headers().get(reqwest::header::LAST_MODIFIED)).and_then(|v| v.to_str().ok()).map(str::to_string);
        if *have > 0 && (new_validator.is_none() || validator.is_none()) {
            // Nothing ties the bytes on disk to the bytes now offered: start over rather
            // than splice two versions of the file.
            tracing::warn!(file = %job.name, at = *have, "the server gives no ETag or Last-Modified; downloading the file again from the start instead of resuming");
            reset(part, hasher, have, progress)?;
            return Err(FetchError::RangeRefused { name: job.name.clone(), from: 0 });
        }
        if new_validator != *validator || *have == 0 {
            *validator = new_validator;
            let state = PartState { url: job.url.to_string(), size: job.size, validator: validator.clone(), durable: 0, durable_sha256: None, boot_id: boot_id() };
            write_state(state_path, &state)?;
        }

        // The writer thread owns the file and the hasher for this attempt.
        let file = std::fs::OpenOptions::new().create(true).append(true).open(part).map_err(FetchError::io(part))?;
        let (tx, rx) = mpsc::channel::<Vec<Bytes>>(WRITE_QUEUE);
        let taken = std::mem::take(hasher);
        let path = part.to_path_buf();
        let base = *have;
        let checkpoint = Checkpoint {
            path: state_path.to_path_buf(),
            state: PartState { url: job.url.to_string(), size: job.size, validator: validator.clone(), durable: 0, durable_sha256: None, boot_id: boot_id() },
        };
        let lock = held.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let written = write_loop(file, base, taken, rx, &path, checkpoint);
            drop(lock);
            written
        });
        let stream_result = self.receive(job, &mut resp, &tx, base, progress).await;
        drop(tx);
        let (back, written) = writer.await.map_err(|_| FetchError::WriterGone { name: job.name.clone() })??;
        *hasher = back;
        *have += written;
        if let Err(e @ FetchError::SizeMismatch { .. }) = &stream_result {
            // More bytes than the listing says: this answer was not the file (a runaway or
            // hostile server, a middlebox appending to it), and the bytes it wrote before
            // proving it are no better. Keeping them would let the next attempt resume after
            // them and publish a file whose digest is only ever computed here.
            tracing::warn!(file = %job.name, error = %e, "the server sent more than the listed size; discarding the partial download");
            discard_partial(part, state_path, hasher, have, progress)?;
        }
        stream_result?;
        if *have < job.size {
            return Err(FetchError::Truncated { name: job.name.clone(), at: *have, size: job.size });
        }
        Ok(())
    }

    /// Streams the body of `resp` (which starts at byte `from`) to the writer in batches,
    /// under the bandwidth cap, counting progress. What arrived before a failure is handed
    /// over too: the next attempt resumes after it.
    async fn receive(&self, job: &Job, resp: &mut reqwest::Response, tx: &mpsc::Sender<Vec<Bytes>>, from: u64, progress: &Progress) -> Result<(), FetchError> {
        let mut received = from;
        let mut stream_result = Ok(());
        let mut batch: Vec<Bytes> = Vec::new();
        let mut batch_bytes = 0usize;
        // Bytes received since `window_start`, judged against `min_rate` once a stall window
        // has passed (the read timeout only notices total silence).
        let mut window_start = Instant::now();
        let mut window_bytes = 0u64;
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(source) => {
                    stream_result = Err(FetchError::Body { name: job.name.clone(), at: received, size: job.size, source });
                    break;
                }
            };
            received += chunk.len() as u64;
            if received > job.size {
                stream_result = Err(FetchError::SizeMismatch { name: job.name.clone(), expected: job.size, actual: received });
                break;
            }
            if let Some(l) = &self.limiter {
                l.acquire(chunk.len()).await;
            }
            batch_bytes += chunk.len();
            window_bytes += chunk.len() as u64;
            batch.push(chunk);
            // Under a bandwidth cap, hand over every chunk: bytes must reach the disk as they arrive.
            if batch_bytes >= BATCH_BYTES || self.limiter.is_some() {
                if tx.send(std::mem::take(&mut batch)).await.is_err() {
                    break; // the writer failed; its error is collected below
                }
                progress.done.fetch_add(batch_bytes as u64, Ordering::Relaxed);
                batch_bytes = 0;
            }
            let elapsed = window_start.elapsed();
            if elapsed >= self.stall_window {
                let floor = self.min_rate.saturating_mul(elapsed.as_secs());
                if window_bytes < floor {
                    // The bytes that came are genuine so far: kept, and the next attempt
                    // resumes after them.
                    stream_result =
                        Err(FetchError::Stalled { name: job.name.clone(), at: received, size: job.size, received: window_bytes, window: elapsed, min_rate: self.min_rate });
                    break;
                }
                window_start = Instant::now();
                window_bytes = 0;
            }
        }
        // What arrived before a failure is kept: the next attempt resumes after it.
        if !batch.is_empty() && tx.send(batch).await.is_ok() {
            progress.done.fetch_add(batch_bytes as u64, Ordering::Relaxed);
        }
        stream_result
    }
}

/// Reads the partial file's state; keeps and re-hashes its bytes when they belong to the
/// same URL and size and the server gave a validator, otherwise starts it over. After a
/// reboot only the checkpointed prefix is kept, and only if it still hashes as recorded.
fn prepare(part: &Path, state_path: &Path, url: &str, size: u64) -> Result<(Sha256, u64, Option<String>), FetchError> {
    prepare_in_boot(part, state_path, url, size, boot_id().as_deref())
}

fn prepare_in_boot(part: &Path, state_path: &Path, url: &str, size: u64, boot: Option<&str>) -> Result<(Sha256, u64, Option<String>), FetchError> {
    let state: Option<PartState> = std::fs::read(state_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let len = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let start_over = || -> Result<(Sha256, u64, Option<String>), FetchError> {
        if part.exists() {
            std::fs::remove_file(part).map_err(FetchError::io(part))?;
        }
        let _ = std::fs::remove_file(state_path);
        Ok((Sha256::new(), 0, None))
    };
    let Some(state) = state.filter(|s| s.url == url && s.size == size && s.validator.is_some() && len <= size) else { return start_over() };
    let same_boot = boot.is_some() && state.boot_id.as_deref() == boot;
    let keep = if same_boot { len } else { state.durable.min(len) };
    if !same_boot && state.durable > len {
        tracing::warn!(file = %part.display(), durable = state.durable, len, "a partial download is shorter than its checkpoint after a reboot; starting it over");
        return start_over();
    }
    let mut hasher = Sha256::new();
    let f = std::fs::File::open(part).map_err(FetchError::io(part))?;
    let mut reader = std::io::BufReader::with_capacity(WRITE_BUFFER, f).take(keep);
    let mut buf = vec![0u8; WRITE_BUFFER];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(FetchError::io(part))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    if !same_boot {
        if total > 0 && state.durable_sha256.as_deref() != Some(hex::encode(hasher.clone().finalize()).as_str()) {
            tracing::warn!(file = %part.display(), durable = state.durable, "a partial download's checkpointed bytes changed across a reboot; starting it over");
            return start_over();
        }
        if len > total {
            tracing::info!(file = %part.display(), kept = total, dropped = len - total, "resuming after a reboot from the last checkpoint; bytes written after it are not trusted");
            let f = std::fs::OpenOptions::new().write(true).open(part).map_err(FetchError::io(part))?;
            f.set_len(total).map_err(FetchError::io(part))?;
        }
    }
    Ok((hasher, total, state.validator))
}

/// [`reset`], and the resume state removed too: nothing of the file is trusted any more.
fn discard_partial(part: &Path, state_path: &Path, hasher: &mut Sha256, have: &mut u64, progress: &Progress) -> Result<(), FetchError> {
    reset(part, hasher, have, progress)?;
    match std::fs::remove_file(state_path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FetchError::from_io(state_path, e)),
    }
}

fn reset(part: &Path, hasher: &mut Sha256, have: &mut u64, progress: &Progress) -> Result<(), FetchError> {
    if part.exists() {
        let f = std::fs::OpenOptions::new().write(true).open(part).map_err(FetchError::io(part))?;
        f.set_len(0).map_err(FetchError::io(part))?;
    }
    progress.done.fetch_sub((*have).min(progress.done.load(Ordering::Relaxed)), Ordering::Relaxed);
    *hasher = Sha256::new();
    *have = 0;
    Ok(())
}

/// Writes the state durably: a temp file, fsynced, renamed over the old one, the folder
/// fsynced.
fn write_state(path: &Path, state: &PartState) -> Result<(), FetchError> {
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec(state).map_err(|e| FetchError::Io { path: path.to_path_buf(), source: std::io::Error::other(e) })?;
    let mut f = std::fs::File::create(&tmp).map_err(FetchError::io(&tmp))?;
    f.write_all(&body).and_then(|()| f.sync_all()).map_err(FetchError::io(&tmp))?;
    crate::crash::point("fetch.state_written");
    std::fs::rename(&tmp, path).map_err(FetchError::io(path))?;
    crate::crash::point("fetch.state_renamed");
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(FetchError::io(dir))?;
    }
    Ok(())
}

/// Where the writer records its checkpoints, and the state it records them in.
struct Checkpoint {
    path: PathBuf,
    state: PartState,
}

fn write_loop(
    file: std::fs::File,
    base: u64,
    mut hasher: Sha256,
    mut rx: mpsc::Receiver<Vec<Bytes>>,
    path: &Path,
    mut checkpoint: Checkpoint,
) -> Result<(Sha256, u64), FetchError> {
    let mut out = std::io::BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut written = 0u64;
    let mut writeback_from = 0u64;
    let mut checkpoint_from = 0u64;
    while let Some(batch) = rx.blocking_recv() {
        for chunk in batch {
            out.write_all(&chunk).map_err(FetchError::io(path))?;
            hasher.update(&chunk);
            let before = written;
            written += chunk.len() as u64;
            if before >> 20 != written >> 20 {
                crate::crash::point("fetch.written_mib");
            }
        }
        if written - writeback_from >= WRITEBACK_STEP {
            out.flush().map_err(FetchError::io(path))?;
            start_writeback(out.get_ref(), base + writeback_from, written - writeback_from);
            writeback_from = written;
        }
        if written - checkpoint_from >= CHECKPOINT_STEP {
            out.flush().map_err(FetchError::io(path))?;
            out.get_ref().sync_data().map_err(FetchError::io(path))?;
            crate::crash::point("fetch.checkpoint_synced");
            checkpoint.state.durable = base + written;
            checkpoint.state.durable_sha256 = Some(hex::encode(hasher.clone().finalize()));
            write_state(&checkpoint.path, &checkpoint.state)?;
            checkpoint_from = written;
        }
    }
    let mut file = out.into_inner().map_err(|e| FetchError::from_io(path, e.into_error()))?;
    file.flush().map_err(FetchError::io(path))?;
    // Position is irrelevant in append mode; this only surfaces a deferred write error.
    file.stream_position().map_err(FetchError::io(path))?;
    Ok((hasher, written))
}

/// Asks the kernel to start writing a range to disk without waiting for it (Linux); the
/// fsync at the end then finds most pages clean. Failure only loses the head start.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
        // SAFETY: the descriptor is open for the duration of the call; the call only reads
        // its arguments.
        let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "sync_file_range failed");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// `bytes 10-19/867` → 10.
fn content_range_start(v: &str) -> Option<u64> {
    v.strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        let a = job_key("m", "1", "models:/m-1", "model.onnx.data");
        assert_eq!(a, job_key("m", "1", "models:/m-1", "model.onnx.data"));
        assert_eq!(a.len(), 32);
        for other in [job_key("m", "2", "models:/m-1", "model.onnx.data"), job_key("m", "1", "models:/m-2", "model.onnx.data"), job_key("m1", "", "models:/m-1", "model.onnx.data")]
        {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn content_range_parses() {
        assert_eq!(content_range_start("bytes 10-19/867"), Some(10));
        assert_eq!(content_range_start("bytes 0-0/1"), Some(0));
        assert_eq!(content_range_start("bytes */867"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    #[test]
    fn prepare_keeps_matching_partials_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("k.part");
        let state = dir.path().join("k.part.json");
        let st = |validator: Option<&str>| PartState {
            url: "http://x/a".into(),
            size: 10,
            validator: validator.map(str::to_string),
            durable: 0,
            durable_sha256: None,
            boot_id: boot_id(),
        };
        std::fs::write(&part, b"hello").unwrap();
        write_state(&state, &st(Some("\"e\""))).unwrap();
        let (h, have, v) = prepare(&part, &state, "http://x/a", 10).unwrap();
        assert_eq!(have, 5);
        assert_eq!(v.as_deref(), Some("\"e\""));
        assert_eq!(hex::encode(h.finalize()), hex::encode(Sha256::digest(b"hello")));
        // Another URL or size: start over.
        let (_, have, v) = prepare(&part, &state, "http://x/b", 10).unwrap();
        assert_eq!((have, v), (0, None));
        assert!(!part.exists());
        // Longer than expected: start over.
        std::fs::write(&part, b"0123456789AB").unwrap();
        write_state(&state, &st(Some("\"e\""))).unwrap();
        assert_eq!(prepare(&part, &state, "http://x/a", 10).unwrap().1, 0);
        // No validator: nothing ties the bytes to the server's file, start over.
        std::fs::write(&part, b"hello").unwrap();
        write_state(&state, &st(None)).unwrap();
        assert_eq!(prepare(&part, &state, "http://x/a", 10).unwrap().1, 0);
    }

    /// Issue 14 item 4: after a reboot only the fsynced, checkpointed prefix is trusted, and
    /// only while it hashes as recorded.
    #[test]
    fn after_a_reboot_only_the_verified_checkpoint_is_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("k.part");
        let state = dir.path().join("k.part.json");
        let checkpointed = |durable: u64, digest: &[u8]| PartState {
            url: "http://x/a".into(),
            size: 20,
            validator: Some("\"e\"".into()),
            durable,
            durable_sha256: Some(hex::encode(Sha256::digest(digest))),
            boot_id: Some("boot-1".into()),
        };
        // Same boot: every byte written is in the page cache, all 9 are kept.
        std::fs::write(&part, b"0123\0\0\0\0\0").unwrap();
        write_state(&state, &checkpointed(4, b"0123")).unwrap();
        assert_eq!(prepare_in_boot(&part, &state, "http://x/a", 20, Some("boot-1")).unwrap().1, 9);
        // Another boot: the unsynced tail (zeros after a power loss) is cut at the checkpoint.
        let (h, have, _) = prepare_in_boot(&part, &state, "http://x/a", 20, Some("boot-2")).unwrap();
        assert_eq!(have, 4);
        assert_eq!(std::fs::read(&part).unwrap(), b"0123");
        assert_eq!(hex::encode(h.finalize()), hex::encode(Sha256::digest(b"0123")));
        // Another boot, and the checkpointed bytes themselves changed: start over.
        std::fs::write(&part, b"01X3456").unwrap();
        write_state(&state, &checkpointed(4, b"0123")).unwrap();
        assert_eq!(prepare_in_boot(&part, &state, "http://x/a", 20, Some("boot-2")).unwrap().1, 0);
        assert!(!part.exists());
        // Another boot, and the file is shorter than its checkpoint (lost metadata): start over.
        std::fs::write(&part, b"01").unwrap();
        write_state(&state, &checkpointed(4, b"0123")).unwrap();
        assert_eq!(prepare_in_boot(&part, &state, "http://x/a", 20, Some("boot-2")).unwrap().1, 0);
        // A state from before checkpoints existed (no boot id): nothing durable to keep.
        std::fs::write(&part, b"0123456").unwrap();
        write_state(&state, &PartState { durable: 0, durable_sha256: None, boot_id: None, ..checkpointed(0, b"") }).unwrap();
        assert_eq!(prepare_in_boot(&part, &state, "http://x/a", 20, Some("boot-2")).unwrap().1, 0);
    }

    /// Downloads over plain reqwest, as the registry's client does (without its retries).
    struct Plain(reqwest::Client);

    impl Source for Plain {
        fn get<'a>(&'a self, url: &'a Url, from: u64, if_range: Option<&'a str>) -> BoxFuture<'a, Result<reqwest::Response, SourceError>> {
            Box::pin(async move {
                let mut rb = self.0.get(url.clone());
                if from > 0 {
                    rb = rb.header(reqwest::header::RANGE, format!("bytes={from}-"));
                    if let Some(v) = if_range {
                        rb = rb.header(reqwest::header::IF_RANGE, v);
                    }
                }
                rb.send().await.map_err(|e| SourceError::new(e, true, true))
            })
        }

        fn error_for(&self, resp: reqwest::Response) -> BoxFuture<'static, SourceError> {
            Box::pin(async move { SourceError::new(std::io::Error::other(format!("answered {}", resp.status())), false, false) })
        }
    }

    /// A loopback server answering the n-th connection with `answers[n]` (head, then body
    /// writes with a pause after each); records each request's Range header.
    async fn serve(answers: Vec<(String, Vec<Vec<u8>>, Duration)>) -> (Url, Arc<Mutex<Vec<Option<String>>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/model.onnx.data", listener.local_addr().unwrap())).unwrap();
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let seen = ranges.clone();
        tokio::spawn(async move {
            for (head, writes, pause) in answers {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") && conn.read(&mut byte).await.unwrap_or(0) == 1 {
                    request.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                seen.lock().unwrap().push(text.lines().find_map(|l| l.strip_prefix("range: ").map(str::to_string)));
                tokio::spawn(async move {
                    let _ = conn.write_all(head.as_bytes()).await;
                    for w in writes {
                        if conn.write_all(&w).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(pause).await;
                    }
                });
            }
        });
        (url, ranges)
    }

    fn downloader(tmp: &Path, window: Duration) -> Downloader {
        // reqwest is built without a crypto provider (see Cargo.toml); the daemon's client
        // installs this one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let backoff = Backoff { initial: Duration::from_millis(10), max: Duration::from_millis(10), max_attempts: 1 };
        Downloader::new(Arc::new(Plain(reqwest::Client::new())), backoff, tmp.to_path_buf(), 1, None).with_stall_window(window)
    }

    fn quiet() -> Observer {
        Arc::new(|_| {})
    }

    /// Found by the registry-faults campaign: an answer longer than the listed size (zeros
    /// after a genuine head, an ETag with it) left its bytes in the partial file, and the next
    /// attempt resumed after them, so the file was published with the zeros in it.
    #[tokio::test]
    async fn an_answer_longer_than_listed_costs_its_partial_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let overlong = "HTTP/1.1 200 OK\r\nETag: \"e\"\r\nConnection: close\r\n\r\n".to_string();
        let honest = format!("HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", file.len());
        let (url, ranges) = serve(vec![(overlong, vec![vec![0u8; 64 << 10]; 6], Duration::ZERO), (honest, vec![file.clone()], Duration::ZERO)]).await;
        let d = downloader(tmp.path(), Duration::from_secs(60));
        let job = Job { url, name: "model.onnx.data".into(), size: file.len() as u64, key: "k".into() };
        let e = d.fetch_all(vec![job.clone()], Arc::new(Progress::default()), quiet()).await.unwrap_err();
        assert!(matches!(e, FetchError::SizeMismatch { .. }), "{e}");
        assert!(!tmp.path().join("k.part").exists() || std::fs::metadata(tmp.path().join("k.part")).unwrap().len() == 0, "the overlong answer's bytes were kept");
        assert!(!tmp.path().join("k.part.json").exists(), "its resume state was kept");
        let f = d.fetch_all(vec![job], Arc::new(Progress::default()), quiet()).await.unwrap();
        assert_eq!(f[0].sha256, hex::encode(Sha256::digest(&file)), "the file is the server's, not zeros and a tail");
        assert_eq!(ranges.lock().unwrap().clone(), vec![None, None], "started over, not resumed after the zeros");
    }

    /// Found by the registry-faults campaign: a server sending a few bytes now and then never
    /// tripped the read timeout, and the pull (and with it every later poll) waited forever.
    #[tokio::test]
    async fn a_trickle_below_the_minimum_rate_is_a_stall_and_its_bytes_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let head = "HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n".to_string();
        let (url, _) = serve(vec![(head, vec![vec![7u8; 50]; 40], Duration::from_millis(100))]).await;
        let d = downloader(tmp.path(), Duration::from_secs(1));
        let job = Job { url, name: "model.onnx.data".into(), size: 100_000, key: "k".into() };
        let started = std::time::Instant::now();
        let e = d.fetch_all(vec![job], Arc::new(Progress::default()), quiet()).await.unwrap_err();
        assert!(matches!(e, FetchError::Stalled { min_rate: MIN_RATE, .. }) && e.is_retryable() && e.kind() == "stalled", "{e}");
        assert!(started.elapsed() < Duration::from_secs(3), "judged after one window: {:?}", started.elapsed());
        let kept = std::fs::metadata(tmp.path().join("k.part")).unwrap().len();
        assert!(kept >= 400 && kept.is_multiple_of(50), "the genuine bytes stay for the resume: {kept}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limiter_spaces_chunks() {
        let l = RateLimiter::new(1000);
        let start = Instant::now();
        for _ in 0..10 {
            l.acquire(500).await;
        }
        // 5000 bytes at 1000 B/s: about 5 s, less the 200 ms burst allowance.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(4700) && took <= Duration::from_millis(5000), "{took:?}");
    }
}
