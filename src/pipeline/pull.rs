//! The pull job: registry version → verified files in the cache → smoke test → active.
//!
//! A version becomes active only after every file matched its listed size and was hashed
//! into the blob store, its folder was published whole, and the engine loaded it and
//! generated a few greedy tokens with finite logits. Any failure before that leaves the
//! active version as it was. A version already in the cache is re-verified instead of
//! downloaded; files whose bytes no longer match the digest recorded at first download are
//! fetched again (and must match that digest again).
//!
//! A pull can be interrupted (a rollback or a pin preempting it, see [`Puller::interruptible`])
//! only before it changes the cache: while it asks the registry, hashes cached files or
//! downloads. Partial downloads stay in `cache/tmp/` and resume at the next attempt. Once the
//! downloaded files are being stored, the version folder published, smoke-tested and
//! activated, the pull finishes (those steps are short next to a download, and a half-done
//! commit is what an interruption must never leave).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::guard::Guard;
use crate::cache::{CacheError, FileRecord, State, Store, VersionRecord};
use crate::engine::{GenerateParams, LoadOptions, Model};
use crate::fetch::{self, Downloader, FetchError, Progress};
use crate::registry::mlmodel::{self, Layout, PlannedFile};
use crate::registry::Target;
use crate::registry::{Client, ModelVersion, RegistryError};

/// Largest `genai_config.json` read.
const MAX_SMALL_FILE: usize = 1 << 20;

/// What a pull is doing, for progress output.
#[derive(Debug, Clone)]
pub enum PullEvent {
    Resolved { version: ModelVersion },
    Planned { flavor: &'static str, files: usize, bytes: u64, to_download: u64 },
    Fetch(fetch::Event),
    Repairing { version: String, files: Vec<String> },
    SmokeTest { version: String },
    Activated { version: String, dir: PathBuf },
}

pub type PullObserver = Arc<dyn Fn(&PullEvent) + Send + Sync>;

/// How the active version changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// Already active and verified.
    Unchanged,
    /// Newly activated; `previous` was active before.
    Activated { previous: Option<String>, downloaded: bool },
    /// The active version's corrupt files were fetched again.
    Repaired { files: Vec<String> },
}

#[derive(Debug, Clone, Serialize)]
pub struct PullOutcome {
    pub model: String,
    pub version: String,
    pub dir: PathBuf,
    #[serde(flatten)]
    pub change: Change,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("looking up {target} of model `{model}`")]
    Resolve {
        model: String,
        target: String,
        #[source]
        source: RegistryError,
    },

    #[error("model `{model}` has no version to follow: {}", describe_missing(.target))]
    NothingToFollow { model: String, target: Target },

    #[error("{step} of model `{model}` version {version}")]
    Registry {
        step: &'static str,
        model: String,
        version: String,
        #[source]
        source: RegistryError,
    },

    #[error("fetching model `{model}` version {version}")]
    Fetch {
        model: String,
        version: String,
        #[source]
        source: FetchError,
    },

    #[error("{step} (model `{model}` version {version})")]
    Cache {
        step: &'static str,
        model: String,
        version: String,
        #[source]
        source: CacheError,
    },

    #[error("model `{model}` version {version} failed its smoke test and was not activated: {reason}")]
    Rejected { model: String, version: String, reason: String },

    #[error("model `{model}` version {version}: {path} came back with sha256 {actual}, but {expected} was recorded at first download; the registry's bytes changed")]
    ContentChanged { model: String, version: String, path: String, expected: String, actual: String },

    #[error("a blocking task of the pull stopped unexpectedly: {message}")]
    Task { message: String },

    /// Stopped before it changed the cache (a rollback or a pin went first); its partial
    /// downloads are kept for the next attempt.
    #[error("the pull was interrupted before it changed the cache")]
    Interrupted,
}

impl PullError {
    /// True when the registry could not be reached (the cache keeps serving).
    pub fn is_unreachable(&self) -> bool {
        match self {
            PullError::Resolve { source, .. } | PullError::Registry { source, .. } => source.is_unreachable(),
            PullError::Fetch { source: FetchError::Source { source, .. }, .. } => source.unreachable,
            PullError::Fetch { source, .. } => source.is_retryable(),
            _ => false,
        }
    }

    /// True when the model itself is gone from the registry.
    pub fn is_model_deleted(&self) -> bool {
        matches!(self, PullError::Resolve { source: RegistryError::ModelNotFound { .. }, .. } | PullError::Registry { source: RegistryError::ModelNotFound { .. }, .. })
    }

    /// True when the caller asked for something that is not there or not allowed (for exit
    /// codes): unknown model, alias or empty stage, refused credentials.
    pub fn is_not_found(&self) -> bool {
        self.is_model_deleted() || matches!(self, PullError::NothingToFollow { .. })
    }
}

fn describe_missing(t: &Target) -> String {
    match t {
        Target::Stage(s) => format!("stage `{s}` holds no version"),
        Target::Alias(a) => format!("alias `{a}` does not exist"),
    }
}

pub fn describe(t: &Target) -> String {
    match t {
        Target::Stage(s) => format!("stage `{s}`"),
        Target::Alias(a) => format!("alias `{a}`"),
    }
}

/// A check of a version's folder: `Err(reason)` refuses it.
pub type FolderCheck = Arc<dyn Fn(&Path) -> Result<(), String> + Send + Sync>;

/// How a pulled version is tried before it becomes active.
#[derive(Clone)]
pub enum SmokeTest {
    /// Load it with the engine and generate a few tokens ([`smoke_test`]).
    Engine(LoadOptions),
    /// Another check of the folder, for a device without an engine (the simulated devices
    /// of `edgeflow fleet simulate`).
    Check(FolderCheck),
}

impl SmokeTest {
    fn run(&self, dir: &Path, tokens: usize) -> Result<(), String> {
        match self {
            SmokeTest::Engine(options) => smoke_test(dir, options, tokens),
            SmokeTest::Check(check) => check(dir),
        }
    }
}

/// Runs pulls against one registry and one cache.
#[derive(Clone)]
pub struct Puller {
    client: Client,
    store: Store,
    downloader: Downloader,
    smoke: SmokeTest,
    guard: Arc<Guard>,
    /// Cancelled to interrupt this puller's pulls (never, unless [`Puller::interruptible`]).
    interrupt: CancellationToken,
}

impl Puller {
    pub fn new(client: Client, store: Store, parallel_downloads: usize, bandwidth_limit: Option<u64>, load_options: LoadOptions) -> Puller {
        let downloader = Downloader::new(Arc::new(client.clone()), client.backoff(), store.tmp_dir(), parallel_downloads, bandwidth_limit)
            .with_stall_window(client.read_timeout())
            .with_metrics(client.metrics().clone());
        Puller { client, store, downloader, smoke: SmokeTest::Engine(load_options), guard: Arc::default(), interrupt: CancellationToken::new() }
    }

    /// The same puller trying each new version with `smoke` instead of the engine.
    pub fn with_smoke_test(mut self, smoke: SmokeTest) -> Puller {
        self.smoke = smoke;
        self
    }

    /// The same puller (same registry, cache, bandwidth cap and verification guard) whose
    /// pulls stop with [`PullError::Interrupted`] once `token` is cancelled, if they have not
    /// begun to change the cache yet (see the module doc); a pull past that point finishes.
    pub fn interruptible(&self, token: CancellationToken) -> Puller {
        Puller { interrupt: token, ..self.clone() }
    }

    /// `f`'s output, or [`PullError::Interrupted`] when the interrupt comes first (or came
    /// already). Dropping `f` must leave the cache as it was: only registry requests, reads
    /// and hashes of cached files, and downloads into `cache/tmp/` go through here (a
    /// blocking hash dropped this way runs to its end and its result is ignored).
    pub(super) async fn unless_interrupted<F: std::future::Future>(&self, f: F) -> Result<F::Output, PullError> {
        tokio::select! {
            biased;
            () = self.interrupt.cancelled() => Err(PullError::Interrupted),
            v = f => Ok(v),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How many times every byte of a version was read and hashed (at load, on install, for a
    /// rollback or pin, and once a day for the active version; never on a routine poll).
    pub fn full_verifications(&self) -> u64 {
        self.guard.full_verifications()
    }

    /// Reads and hashes every file of `rec` against its recorded digest.
    async fn verify(&self, rec: &VersionRecord) -> Result<Result<Vec<crate::cache::Corruption>, CacheError>, PullError> {
        self.guard.counted();
        let store = self.store.clone();
        let r = rec.clone();
        self.blocking(move || store.verify(&r)).await
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Brings the version `target` designates into the cache and makes it active.
    /// `retry_bad` tries again a version an earlier smoke test refused (an operator's
    /// explicit pull); the poller leaves those alone.
    ///
    /// # Errors
    /// [`PullError`] naming the step; the active version is unchanged by any error.
    pub async fn pull(&self, model: &str, target: &Target, observer: PullObserver, progress: Arc<Progress>, retry_bad: bool) -> Result<PullOutcome, PullError> {
        let mv = self
            .unless_interrupted(self.client.resolve(model, target))
            .await?
            .map_err(|source| PullError::Resolve { model: model.to_string(), target: describe(target), source })?
            .ok_or_else(|| PullError::NothingToFollow { model: model.to_string(), target: target.clone() })?;
        observer(&PullEvent::Resolved { version: mv.clone() });
        self.install(&mv, observer, progress, retry_bad).await
    }

    /// Makes `mv` active: from the cache when its bytes are there and verify, otherwise
    /// (or for the files that do not verify) from the registry.
    ///
    /// # Errors
    /// As [`Puller::pull`].
    pub async fn install(&self, mv: &ModelVersion, observer: PullObserver, progress: Arc<Progress>, retry_bad: bool) -> Result<PullOutcome, PullError> {
        // Whoever asks (a poll, a pin), a version the registry has not finished registering
        // (or failed to) is never installed.
        if !mv.is_ready() {
            return Err(PullError::Registry {
                step: "checking the status",
                model: mv.name.clone(),
                version: mv.version.clone(),
                source: RegistryError::NotReady { name: mv.name.clone(), version: mv.version.clone(), status: mv.status.clone() },
            });
        }
        let job = Install { model: mv.name.clone(), version: mv.version.clone() };
        let (known, repairing, previous, is_active) = match self.check_cached(mv, &job, &observer, retry_bad).await? {
            Cached::Done(outcome) => return Ok(outcome),
            Cached::Partly { known, repairing, previous, is_active } => (known, repairing, previous, is_active),
        };
        let (flavor, root, plan) = self.unless_interrupted(self.plan(mv, &job)).await??;
        let fetched = self.download(mv, &job, &root, &plan, known.as_ref(), progress, &observer, flavor).await?;

        let files: Vec<FileRecord> = plan
            .iter()
            .map(|p| {
                let sha256 = fetched.iter().find(|f| f.name == p.local).map(|f| f.sha256.clone()).or_else(|| known_digest(known.as_ref(), &p.local)).unwrap_or_default();
                FileRecord { path: p.local.clone(), size: p.size, sha256 }
            })
            .collect();
        let was_good = known.as_ref().is_some_and(|r| r.state == State::Good);
        let rec = VersionRecord {
            model: job.model.clone(),
            version: job.version.clone(),
            source: mv.source.clone(),
            run_id: mv.run_id.clone(),
            flavor: flavor.to_string(),
            files,
            state: State::Fetched,
            dir: String::new(),
            fetched_at: crate::util::unix_now(),
            activated_at: None,
            // Deaths during earlier smoke tests of these bytes still count.
            unfinished_smoke_tests: known.as_ref().map_or(0, |r| r.unfinished_smoke_tests),
        };
        let store = self.store.clone();
        let mut rec = self.blocking(move || store.commit_version(rec)).await?.map_err(job.cache_err("publishing the version folder"))?;
        let Install { model, version } = job.clone();

        if was_good && !repairing.is_empty() {
            // The same bytes as the version that passed before: no new smoke test.
            let store = self.store.clone();
            let (m, v) = (model.clone(), version.clone());
            self.blocking(move || store.mark_good(&m, &v)).await?.map_err(job.cache_err("recording the repair"))?;
            rec.state = State::Good;
            let dir = self.activate(&rec, &observer).await?;
            let change = if is_active { Change::Repaired { files: repairing } } else { Change::Activated { previous, downloaded: true } };
            return Ok(PullOutcome { model, version, dir, change });
        }

        // The folder as the engine will read it: every file hashed again (commit_version
        // checks sizes only), so no byte that was not verified reaches the smoke test. An
        // interruption here leaves a published folder that is neither good nor active; the
        // next attempt finds it, verifies it and smoke-tests it without downloading.
        let corrupt = self.unless_interrupted(self.verify(&rec)).await??.map_err(job.cache_err("verifying the new version folder"))?;
        if let Some(c) = corrupt.first() {
            return Err(PullError::Cache { step: "verifying the new version folder", model, version, source: CacheError::Corrupt { path: c.path.clone(), count: corrupt.len() } });
        }
        // DEVNOTE: the smoke test is not interrupted: it holds the new version in memory, and
        // abandoning it would leave it running beside the version a rollback makes the engine
        // load. It takes seconds; the activation after it is one symlink swap.
        observer(&PullEvent::SmokeTest { version: version.clone() });
        let store = self.store.clone();
        let (m, v) = (model.clone(), version.clone());
        let died = self.blocking(move || store.begin_smoke_test(&m, &v)).await?.map_err(job.cache_err("recording the smoke test"))?;
        if died >= SMOKE_TEST_DEATHS {
            let reason = format!(
                "the daemon died during each of the last {died} smoke tests of this version (out of memory, or a crash in its graph or chat template); refused without another try"
            );
            tracing::error!(%model, %version, %reason, "refusing a version that keeps killing the daemon; keeping the active version");
            return self.reject(&job, "recording the refusal", reason).await;
        }
        tracing::info!(%model, %version, earlier_unfinished = died, "smoke test starting");
        let dir = self.store.version_dir(&rec);
        let smoke = self.smoke.clone();
        let tokens = self.store.settings().smoke_test_tokens;
        let d = dir.clone();
        let verdict = self.blocking(move || smoke.run(&d, tokens)).await?;
        if let Err(reason) = verdict {
            tracing::warn!(%model, %version, %reason, "smoke test failed; keeping the active version");
            return self.reject(&job, "recording the failed smoke test", reason).await;
        }
        let dir = self.activate(&rec, &observer).await?;
        Ok(PullOutcome { model, version, dir, change: if repairing.is_empty() { Change::Activated { previous, downloaded: true } } else { Change::Repaired { files: repairing } } })
    }

    /// Records the version of `job` as bad (its files released, never fetched again by a
    /// poll) and refuses it with `reason`.
    async fn reject(&self, job: &Install, step: &'static str, reason: String) -> Result<PullOutcome, PullError> {
        let store = self.store.clone();
        let (m, v, r) = (job.model.clone(), job.version.clone(), reason.clone());
        self.blocking(move || store.mark_bad(&m, &v, &r)).await?.map_err(job.cache_err(step))?;
        Err(PullError::Rejected { model: job.model.clone(), version: job.version.clone(), reason })
    }

    /// What the cache already holds of `mv`: done when it is active (or served before) and
    /// verifies; otherwise its record, to reuse the files that verify and repair the rest.
    async fn check_cached(&self, mv: &ModelVersion, job: &Install, observer: &PullObserver, retry_bad: bool) -> Result<Cached, PullError> {
        let Install { model, version } = job.clone();
        let store = self.store.clone();
        let (m, v) = (model.clone(), version.clone());
        let (existing, active) =
            self.blocking(move || Ok::<_, CacheError>((store.version(&m, &v)?, store.active(&m)?))).await?.map_err(job.cache_err("reading the cache index"))?;
        let previous = active.as_ref().map(|(r, _)| r.version.clone());
        let is_active = previous.as_deref() == Some(version.as_str());
        let mut partly = Cached::Partly { known: None, repairing: Vec::new(), previous: previous.clone(), is_active };
        let Some(rec) = existing.filter(|r| r.source == mv.source) else { return Ok(partly) };
        if let State::Bad { reason } = &rec.state {
            if !retry_bad {
                return Err(PullError::Rejected { model, version, reason: format!("{reason} (refused earlier; `edgeflow pull` tries again)") });
            }
            return Ok(partly);
        }
        if rec.dir.is_empty() {
            return Ok(partly);
        }
        let dir = self.store.version_dir(&rec);
        if is_active && self.guard.unchanged(&dir, &rec.files) {
            // Hashed in full when it was installed or loaded (or within the day), and not a
            // file of it changed since: a poll costs a few `stat` calls, not a read of the model.
            return Ok(Cached::Done(PullOutcome { model, version, dir, change: Change::Unchanged }));
        }
        let corrupt = self.unless_interrupted(self.verify(&rec)).await??.map_err(job.cache_err("verifying the cached files"))?;
        let mut repairing = Vec::new();
        if corrupt.is_empty() {
            if is_active {
                self.guard.verified(&dir, &rec.files);
                return Ok(Cached::Done(PullOutcome { model, version, dir, change: Change::Unchanged }));
            }
            if rec.state == State::Good {
                // A version that served before (a rollback, or an alias moved back): its
                // bytes verified, no download and no new smoke test needed.
                let dir = self.activate(&rec, observer).await?;
                return Ok(Cached::Done(PullOutcome { model, version, dir, change: Change::Activated { previous, downloaded: false } }));
            }
        } else {
            repairing = corrupt.iter().map(|c| c.path.clone()).collect();
            tracing::warn!(%model, %version, files = ?repairing, "cached files do not match their recorded digests; fetching them again");
            observer(&PullEvent::Repairing { version: version.clone(), files: repairing.clone() });
            let store = self.store.clone();
            let digests: Vec<String> = corrupt.into_iter().map(|c| c.expected).collect();
            self.blocking(move || digests.iter().try_for_each(|d| store.discard_blob(d))).await?.map_err(job.cache_err("discarding corrupt files"))?;
        }
        partly = Cached::Partly { known: Some(rec), repairing, previous, is_active };
        Ok(partly)
    }

    /// The files of `mv` to install, from its listing and `MLmodel` (and, for the onnx
    /// flavor, `genai_config.json`'s decoder name): its flavor, artifact root and plan.
    async fn plan(&self, mv: &ModelVersion, job: &Install) -> Result<(&'static str, String, Vec<PlannedFile>), PullError> {
        let (model, version) = (&job.model, &job.version);
        let root = self.client.artifact_root(mv).await.map_err(job.reg("finding the artifacts"))?;
        let tree = self.client.tree(&root).await.map_err(job.reg("listing the artifacts"))?;
        if !tree.iter().any(|f| f.path == "MLmodel") {
            return Err(job.reg("reading MLmodel")(RegistryError::MlModel { name: model.clone(), version: version.clone(), message: "the artifacts hold no MLmodel file".into() }));
        }
        let text = self.client.read_text(&format!("{root}/MLmodel"), mlmodel::MAX_MLMODEL_BYTES).await.map_err(job.reg("reading MLmodel"))?;
        let layout = mlmodel::parse(&text, model, version).map_err(job.reg("reading MLmodel"))?;
        let decoder = match &layout {
            Layout::Onnx { extra_files, .. } => match extra_files.iter().find(|e| e.ends_with("genai_config.json")) {
                Some(path) => mlmodel::decoder_filename(&self.client.read_text(&format!("{root}/{path}"), MAX_SMALL_FILE).await.map_err(job.reg("reading genai_config.json"))?),
                None => None,
            },
            Layout::Pyfunc { .. } => None,
        };
        let plan = mlmodel::plan(&layout, &tree, decoder.as_deref(), model, version).map_err(job.reg("choosing the model files"))?;
        Ok((layout.flavor(), root, plan))
    }

    /// Downloads what the blob store lacks of `plan` (after making room), checks each file
    /// against a digest recorded earlier, and stores the verified bytes as blobs.
    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        mv: &ModelVersion,
        job: &Install,
        root: &str,
        plan: &[PlannedFile],
        known: Option<&VersionRecord>,
        progress: Arc<Progress>,
        observer: &PullObserver,
        flavor: &'static str,
    ) -> Result<Vec<fetch::Fetched>, PullError> {
        let Install { model, version } = job.clone();
        let to_fetch: Vec<_> = plan.iter().filter(|p| known_digest(known, &p.local).is_none_or(|d| !self.store.blob_path(&d).is_file())).cloned().collect();
        // Listed sizes are at most registry::MAX_FILE_BYTES each, but never trust a sum.
        let total = plan.iter().fold(0u64, |sum, p| sum.saturating_add(p.size));
        let needed = to_fetch.iter().fold(0u64, |sum, p| sum.saturating_add(p.size));
        observer(&PullEvent::Planned { flavor, files: plan.len(), bytes: total, to_download: needed });
        let store = self.store.clone();
        let (m, v) = (model.clone(), version.clone());
        // Partial downloads of these files from an earlier attempt are on the disk already.
        let partials: Vec<(PathBuf, u64)> =
            to_fetch.iter().map(|p| (store.tmp_dir().join(format!("{}.part", fetch::job_key(&model, &version, &mv.source, &p.remote))), p.size)).collect();
        self.blocking(move || {
            let on_disk = partials.iter().fold(0u64, |sum, (part, size)| sum.saturating_add(std::fs::metadata(part).map_or(0, |m| m.len().min(*size))));
            store.make_room(needed, on_disk, (&m, &v))
        })
        .await?
        .map_err(job.cache_err("making room in the cache"))?;
        let jobs = to_fetch
            .iter()
            .map(|p| fetch::Job {
                url: self.client.artifact_url(&format!("{root}/{}", p.remote)),
                name: p.local.clone(),
                size: p.size,
                key: fetch::job_key(&model, &version, &mv.source, &p.remote),
            })
            .collect();
        let fetch_observer: fetch::Observer = {
            let o = observer.clone();
            Arc::new(move |e: &fetch::Event| o(&PullEvent::Fetch(e.clone())))
        };
        // Interrupting drops the download tasks; what reached `<tmp>/<key>.part` stays there
        // and the next attempt resumes after it.
        let fetched = self.unless_interrupted(self.downloader.fetch_all(jobs, progress, fetch_observer)).await?.map_err(|source| PullError::Fetch {
            model: model.clone(),
            version: version.clone(),
            source,
        })?;
        for f in &fetched {
            if let Some(expected) = known_digest(known, &f.name) {
                if expected != f.sha256 {
                    let _ = std::fs::remove_file(&f.path);
                    return Err(PullError::ContentChanged { model, version, path: f.name.clone(), expected, actual: f.sha256.clone() });
                }
            }
        }
        let store = self.store.clone();
        let ingest = fetched.clone();
        self.blocking(move || ingest.iter().try_for_each(|f| store.ingest(&f.path, &f.sha256, f.size).map(|_| ())))
            .await?
            .map_err(job.cache_err("storing the downloaded files"))?;
        Ok(fetched)
    }

    /// What to serve at start, without the registry: the active version, re-verified (when
    /// `verify_on_load`); if its bytes are damaged, the registry is asked to repair them, and
    /// failing that the last-known-good version is activated instead.
    ///
    /// # Errors
    /// Cache errors; `Ok(None)` when nothing usable is cached.
    pub async fn load_active(&self, model: &str, observer: PullObserver) -> Result<Option<PullOutcome>, PullError> {
        let store = self.store.clone();
        let m = model.to_string();
        let cache_err = |step: &'static str| move |source| PullError::Cache { step, model: model.to_string(), version: String::new(), source };
        let active = match self.blocking(move || store.active(&m)).await? {
            Ok(active) => active,
            Err(e) => {
                // The index cannot be read (a disk too full for it to open, say): the `active`
                // link and the blobs still tell what served, and its bytes are verified below.
                let store = self.store.clone();
                let m = model.to_string();
                match self.blocking(move || store.active_from_link(&m)).await? {
                    Ok(Some(found)) => {
                        tracing::warn!(%model, version = %found.0.version, error = %crate::util::chain(&e), "the cache index cannot be read; serving the version the active link names");
                        Some(found)
                    }
                    _ => return Err(cache_err("reading the cache index")(e)),
                }
            }
        };
        let Some((rec, dir)) = active else { return Ok(None) };
        if !self.store.settings().verify_on_load {
            return Ok(Some(PullOutcome { model: rec.model, version: rec.version, dir, change: Change::Unchanged }));
        }
        let corrupt = self.unless_interrupted(self.verify(&rec)).await??.map_err(cache_err("verifying the active version"))?;
        if corrupt.is_empty() {
            self.guard.verified(&dir, &rec.files);
            return Ok(Some(PullOutcome { model: rec.model, version: rec.version, dir, change: Change::Unchanged }));
        }
        tracing::warn!(%model, version = %rec.version, files = ?corrupt.iter().map(|c| &c.path).collect::<Vec<_>>(), "the active version is damaged");
        let mv = ModelVersion {
            name: rec.model.clone(),
            version: rec.version.clone(),
            source: rec.source.clone(),
            status: "READY".into(),
            run_id: rec.run_id.clone(),
            current_stage: None,
            aliases: Vec::new(),
        };
        match self.install(&mv, observer.clone(), Arc::new(Progress::default()), false).await {
            Ok(outcome) => Ok(Some(outcome)),
            // Whatever interrupted the repair decides what serves next, not this fallback.
            Err(e @ PullError::Interrupted) => Err(e),
            Err(e) => {
                tracing::warn!(error = %crate::util::chain(&e), "could not repair the active version; falling back to the last-known-good one");
                let store = self.store.clone();
                let m = model.to_string();
                let Some(lkg) = self.blocking(move || store.last_known_good(&m)).await?.map_err(cache_err("reading the cache index"))? else {
                    return Err(e);
                };
                let corrupt = self.unless_interrupted(self.verify(&lkg)).await??.map_err(cache_err("verifying the last-known-good version"))?;
                if !corrupt.is_empty() {
                    return Err(e);
                }
                let dir = self.activate(&lkg, &observer).await?;
                Ok(Some(PullOutcome { model: lkg.model, version: lkg.version, dir, change: Change::Activated { previous: Some(rec.version), downloaded: false } }))
            }
        }
    }

    /// Makes a cached version active again without the registry (a rollback): its files
    /// are verified first, and a damaged version is refused.
    ///
    /// # Errors
    /// [`PullError::Cache`] for index errors, a missing folder or damaged files.
    pub async fn activate_cached(&self, rec: &VersionRecord) -> Result<PathBuf, PullError> {
        let cache_err = |step: &'static str| move |source| PullError::Cache { step, model: rec.model.clone(), version: rec.version.clone(), source };
        let corrupt = self.verify(rec).await?.map_err(cache_err("verifying the version"))?;
        if let Some(c) = corrupt.first() {
            return Err(PullError::Cache {
                step: "verifying the version",
                model: rec.model.clone(),
                version: rec.version.clone(),
                source: CacheError::Corrupt { path: c.path.clone(), count: corrupt.len() },
            });
        }
        let quiet: PullObserver = Arc::new(|_: &PullEvent| {});
        self.activate(rec, &quiet).await
    }

    async fn activate(&self, rec: &VersionRecord, observer: &PullObserver) -> Result<PathBuf, PullError> {
        let store = self.store.clone();
        let (m, v) = (rec.model.clone(), rec.version.clone());
        let dir = self.blocking(move || store.activate(&m, &v)).await?.map_err(|source| PullError::Cache {
            step: "activating",
            model: rec.model.clone(),
            version: rec.version.clone(),
            source,
        })?;
        tracing::info!(model = %rec.model, version = %rec.version, dir = %dir.display(), "version active");
        // Every path here verified the bytes first (hashed as downloaded, or read back).
        self.guard.verified(&dir, &rec.files);
        observer(&PullEvent::Activated { version: rec.version.clone(), dir: dir.clone() });
        Ok(dir)
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, PullError> {
        tokio::task::spawn_blocking(f).await.map_err(|e| PullError::Task { message: e.to_string() })
    }
}

/// The version an [`Puller::install`] works on, and its errors' context.
#[derive(Clone)]
struct Install {
    model: String,
    version: String,
}

impl Install {
    fn cache_err(&self, step: &'static str) -> impl FnOnce(CacheError) -> PullError + '_ {
        move |source| PullError::Cache { step, model: self.model.clone(), version: self.version.clone(), source }
    }

    fn reg(&self, step: &'static str) -> impl FnOnce(RegistryError) -> PullError + '_ {
        move |source| PullError::Registry { step, model: self.model.clone(), version: self.version.clone(), source }
    }
}

/// What [`Puller::install`] found in the cache.
enum Cached {
    /// Nothing left to do.
    Done(PullOutcome),
    /// The record to reuse verified files from (if any), the files being repaired, and
    /// what is active now.
    Partly { known: Option<VersionRecord>, repairing: Vec<String>, previous: Option<String>, is_active: bool },
}

/// The digest recorded earlier for the file at `local`, if any.
fn known_digest(known: Option<&VersionRecord>, local: &str) -> Option<String> {
    known.and_then(|r| r.files.iter().find(|f| f.path == local)).map(|f| f.sha256.clone())
}

/// Smoke tests of one version the daemon may die during before the version is refused: a power
/// cut or a restart can end one, but a version that kills the daemon every time it is tried must
/// not hold the device in a restart loop.
pub const SMOKE_TEST_DEATHS: u32 = 2;

/// Loads the folder with the engine (which compiles its chat template), renders the chat
/// template on short chats within its fuel and output bounds, and generates `tokens` greedy
/// tokens. The engine fails on non-finite logits; the count of tokens is checked here.
/// Returns the reason on failure.
///
/// # Errors
/// The reason, as text for the record and the report.
pub fn smoke_test(dir: &Path, options: &LoadOptions, tokens: usize) -> Result<(), String> {
    let started = std::time::Instant::now();
    let mut model = Model::load(dir, options).map_err(|e| format!("loading: {}", crate::util::chain(&e)))?;
    model.tokenizer().check_chat_template().map_err(|e| format!("checking the chat template of tokenizer_config.json: {}", crate::util::chain(&e)))?;
    let mut ids = model.encode("Hello").map_err(|e| format!("tokenizing: {}", crate::util::chain(&e)))?;
    if ids.is_empty() {
        ids = model.config().model.bos_token_id.into_iter().collect();
    }
    if ids.is_empty() {
        return Err("the tokenizer produced no ids for the smoke-test prompt".into());
    }
    let params = GenerateParams { max_new_tokens: tokens, ignore_eos: true, ..GenerateParams::default() };
    let g = model.generate(&ids, &params, &AtomicBool::new(false), |_| ControlFlow::Continue(())).map_err(|e| format!("generating: {}", crate::util::chain(&e)))?;
    let want = tokens.min(model.context_length().saturating_sub(ids.len()));
    if g.token_ids.len() != want {
        return Err(format!("generated {} tokens where {want} were asked for", g.token_ids.len()));
    }
    tracing::info!(dir = %dir.display(), tokens = g.token_ids.len(), ms = started.elapsed().as_millis() as u64, "smoke test passed");
    Ok(())
}
