//! The active model: which version serves new requests, and swapping it without dropping
//! the requests already running.
//!
//! [`Manager`] is the one place a model version becomes active. `edgeflow serve` hands it a
//! local folder once; the daemon's registry side hands it each newly verified version
//! (directly with [`Manager::activate`], or by publishing on a `watch` that
//! [`Manager::follow`] consumes). The current [`Active`] model is published on a
//! `tokio::sync::watch`; request handlers take an `Arc` of it per request.
//!
//! A swap never interrupts a request: queued and running jobs finish on the worker they
//! were admitted to, and that worker drops its model once it has drained. [`SwapMode`]
//! chooses whether the new model loads before the old one drains (`overlap`: no gap in
//! service, both in memory briefly) or after (`stop-the-world`: one model in memory at a
//! time, new requests get 503 with `Retry-After` during the gap).

mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

pub use worker::{Event, Job, JobError, Prompt, StartError, SubmitError, TextDelivery, Worker};

use crate::engine::{GenaiConfig, LoadOptions, StepAllowance};
use crate::telemetry::Metrics;

/// A model version to serve: a verified folder in the ONNX Runtime GenAI layout and the
/// identity it is reported under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    pub dir: PathBuf,
    /// Registry name (or, for a local folder, its name); the OpenAI `model` id.
    pub name: String,
    pub version: String,
    /// Content digest from the registry/cache, when known.
    pub digest: Option<String>,
}

/// What clients and metrics are told about the active model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub digest: Option<String>,
    pub dir: PathBuf,
    pub context_length: usize,
    pub activated_at: SystemTime,
    pub load_time: Duration,
}

/// A loaded, smoke-tested model version and the worker that runs it.
pub struct Active {
    info: ModelInfo,
    config: GenaiConfig,
    worker: Worker,
    /// Closes when the worker thread has ended and the model is unloaded.
    drained: watch::Receiver<()>,
}

impl Active {
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The model's `genai_config.json`; its `search` section holds the generation defaults.
    pub fn config(&self) -> &GenaiConfig {
        &self.config
    }

    /// Queues a generation job on this version's worker.
    ///
    /// # Errors
    /// [`SubmitError`] when the queue is full or the worker has stopped.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.worker.try_submit(job)
    }

    /// Loaded, smoke-tested, its worker thread still running and not stuck on one step.
    pub fn is_healthy(&self) -> bool {
        self.worker.is_alive() && self.stalled().is_none()
    }

    /// How far the engine's current step (a template render, a forward pass) has run past
    /// its allowance: a stuck engine, which the watchdog answers by not feeding systemd.
    pub fn stalled(&self) -> Option<Duration> {
        self.worker.overdue()
    }

    pub fn queued(&self) -> usize {
        self.worker.queued()
    }
}

/// How a new version replaces the active one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwapMode {
    /// Load the new version while the old one serves; switch; drop the old one once drained.
    #[default]
    Overlap,
    /// Stop admitting, drain and unload the old version, then load the new one (for devices
    /// that cannot hold two models). If the new one fails, the old one is loaded again.
    StopTheWorld,
}

impl SwapMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SwapMode::Overlap => "overlap",
            SwapMode::StopTheWorld => "stop-the-world",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ManagerOptions {
    pub load: LoadOptions,
    /// Jobs that may wait per worker; more are refused (HTTP 429).
    pub queue_depth: usize,
    /// Prompt tokens accepted per job (also capped by the model's context).
    pub max_prompt_tokens: Option<usize>,
    /// Greedy tokens the smoke test generates before a version is published (at least 1).
    pub smoke_test_tokens: usize,
    pub swap: SwapMode,
    /// Added to the niceness of each engine thread (`engine.nice`).
    pub nice: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("activating {name} version {version} from {}", .dir.display())]
    Start {
        name: String,
        version: String,
        dir: PathBuf,
        #[source]
        source: StartError,
    },
}

impl ActivateError {
    /// Retrying the same folder will fail the same way; a new version may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ActivateError::Start { source: StartError::Spawn(_) | StartError::Vanished, .. })
    }
}

/// Cloneable handle to the active-model state.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    options: ManagerOptions,
    allowance: StepAllowance,
    metrics: Arc<Metrics>,
    active: watch::Sender<Option<Arc<Active>>>,
    /// Serializes activations.
    swap: Mutex<()>,
    swapping: AtomicBool,
}

impl Manager {
    pub fn new(options: ManagerOptions, metrics: Arc<Metrics>) -> Self {
        Manager::with_allowance(options, metrics, StepAllowance::DEFAULT)
    }

    /// As [`Manager::new`], with `allowance` for each step of an engine before it counts as
    /// stuck ([`Active::stalled`]).
    pub fn with_allowance(options: ManagerOptions, metrics: Arc<Metrics>, allowance: StepAllowance) -> Self {
        let (active, _) = watch::channel(None);
        Manager { inner: Arc::new(Inner { options, allowance, metrics, active, swap: Mutex::new(()), swapping: AtomicBool::new(false) }) }
    }

    /// The version serving new requests, if any.
    pub fn current(&self) -> Option<Arc<Active>> {
        self.inner.active.borrow().clone()
    }

    /// Notified on every activation (and on the gap of a stop-the-world swap).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Active>>> {
        self.inner.active.subscribe()
    }

    /// True while a stop-the-world swap has no model published.
    pub fn is_swapping(&self) -> bool {
        self.inner.swapping.load(Ordering::SeqCst)
    }

    pub fn options(&self) -> &ManagerOptions {
        &self.inner.options
    }

    /// Loads, smoke-tests and publishes `source`; returns once it serves new requests.
    /// Requests admitted to the previous version finish on it.
    ///
    /// # Errors
    /// [`ActivateError`] when the folder fails to load or its smoke test; the previous
    /// version then keeps serving (in stop-the-world mode it is loaded again first).
    pub async fn activate(&self, source: ModelSource) -> Result<ModelInfo, ActivateError> {
        let _serial = self.inner.swap.lock().await;
        self.activate_locked(source).await
    }

    /// As [`Manager::activate`], unless `source` already serves (checked under the same
    /// lock, so two callers asking for one version load it once).
    ///
    /// # Errors
    /// As [`Manager::activate`].
    pub async fn ensure(&self, source: ModelSource) -> Result<ModelInfo, ActivateError> {
        let _serial = self.inner.swap.lock().await;
        // DEVNOTE: a stuck engine (alive, `stalled`) is not loaded again beside itself: its
        // thread still holds the model's memory. The watchdog restarts the daemon instead.
        if let Some(active) = self.current().filter(|a| source_of(a.info()) == source && a.worker.is_alive()) {
            return Ok(active.info().clone());
        }
        self.activate_locked(source).await
    }

    async fn activate_locked(&self, source: ModelSource) -> Result<ModelInfo, ActivateError> {
        tracing::info!(name = %source.name, version = %source.version, dir = %source.dir.display(), mode = self.inner.options.swap.as_str(), "activating model");
        let result = match self.inner.options.swap {
            SwapMode::Overlap => self.load(&source).await,
            SwapMode::StopTheWorld => {
                // DEVNOTE: hold no `Arc<Active>` across the drain: it keeps the old worker's
                // queue open, and the drain would wait for itself.
                let old_source = self.current().map(|a| source_of(a.info()));
                self.inner.swapping.store(true, Ordering::SeqCst);
                self.unpublish_and_drain().await;
                let result = self.load(&source).await;
                if result.is_err() {
                    if let Some(old) = old_source {
                        tracing::warn!(name = %old.name, version = %old.version, "new version failed; reloading the previous one");
                        match self.load(&old).await {
                            Ok(active) => self.publish(active),
                            Err(e) => tracing::error!(error = %e, "reloading the previous version failed too; no model is served"),
                        }
                    }
                }
                result
            }
        };
        let outcome = match result {
            Ok(active) => {
                let info = active.info().clone();
                crate::crash::point("active.loaded");
                self.publish(active);
                crate::crash::point("active.published");
                tracing::info!(name = %info.name, version = %info.version, load_ms = info.load_time.as_millis() as u64, "model active");
                Ok(info)
            }
            Err(e) => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), "activation failed");
                Err(e)
            }
        };
        self.inner.swapping.store(false, Ordering::SeqCst);
        self.inner.metrics.model_swaps.with_label_values(&[if outcome.is_ok() { "ok" } else { "failed" }]).inc();
        outcome
    }

    /// Activates each version published on `versions` until `shutdown`; the registry side's
    /// way in. Failed activations are logged and the previous version keeps serving.
    pub fn follow(&self, mut versions: watch::Receiver<Option<ModelSource>>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move {
            loop {
                let next = versions.borrow_and_update().clone();
                if let Some(source) = next {
                    let _ = manager.ensure(source).await;
                }
                tokio::select! {
                    changed = versions.changed() => if changed.is_err() { return },
                    () = shutdown.cancelled() => return,
                }
            }
        })
    }

    /// Stops admitting requests and waits until every model has drained and unloaded.
    pub async fn deactivate(&self) {
        let _serial = self.inner.swap.lock().await;
        self.unpublish_and_drain().await;
    }

    async fn unpublish_and_drain(&self) {
        let previous = self.inner.active.send_replace(None);
        self.inner.metrics.clear_active_model();
        if let Some(previous) = previous {
            let mut drained = previous.drained.clone();
            let info = previous.info().clone();
            drop(previous);
            tracing::info!(name = %info.name, version = %info.version, "waiting for in-flight requests to drain");
            while drained.changed().await.is_ok() {}
            tracing::info!(name = %info.name, version = %info.version, "previous version drained and unloaded");
        }
    }

    fn publish(&self, active: Active) {
        let info = active.info().clone();
        self.inner.metrics.set_active_model(&info.name, &info.version, info.digest.as_deref().unwrap_or(""));
        if let Some(previous) = self.inner.active.send_replace(Some(Arc::new(active))) {
            // Overlap mode: the old version finishes its queue in the background.
            let mut drained = previous.drained.clone();
            let old = previous.info().clone();
            drop(previous);
            tokio::spawn(async move {
                while drained.changed().await.is_ok() {}
                tracing::info!(name = %old.name, version = %old.version, "previous version drained and unloaded");
            });
        }
    }

    async fn load(&self, source: &ModelSource) -> Result<Active, ActivateError> {
        let options = &self.inner.options;
        let fail = |source_err: StartError| ActivateError::Start { name: source.name.clone(), version: source.version.clone(), dir: source.dir.clone(), source: source_err };
        let label = format!("{}@{}", source.name, source.version);
        let started = worker::start(
            source.dir.clone(),
            options.load.clone(),
            worker::Limits {
                queue_depth: options.queue_depth,
                max_prompt_tokens: options.max_prompt_tokens,
                smoke_test_tokens: options.smoke_test_tokens,
                nice: options.nice,
                allowance: self.inner.allowance,
            },
            self.inner.metrics.clone(),
            &label,
        )
        .map_err(fail)?;
        let loaded = match started.ready.await {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(e)) => return Err(fail(e)),
            Err(_) => return Err(fail(StartError::Vanished)),
        };
        Ok(Active {
            info: ModelInfo {
                name: source.name.clone(),
                version: source.version.clone(),
                digest: source.digest.clone(),
                dir: source.dir.clone(),
                context_length: loaded.config.model.context_length,
                activated_at: SystemTime::now(),
                load_time: loaded.load_time,
            },
            config: loaded.config,
            worker: started.worker,
            drained: started.drained,
        })
    }
}

fn source_of(info: &ModelInfo) -> ModelSource {
    ModelSource { dir: info.dir.clone(), name: info.name.clone(), version: info.version.clone(), digest: info.digest.clone() }
}
