//! The engine worker: one dedicated OS thread per loaded model, fed by a bounded queue.
//!
//! Inference is blocking, CPU-bound and needs `&mut Model`, so it never runs on the async
//! runtime. The thread loads the model itself (the session never crosses threads),
//! smoke-tests it, then serves jobs until every [`Worker`] handle is gone, the queue is empty
//! and the last running job has ended; then it drops the model. That ordering is what lets a
//! hot swap drain: the manager drops its handle, queued and running jobs still finish on the
//! old version, and the memory is released when the last one does.
//!
//! Jobs run together (see [`crate::engine::Batch`]): between two decode steps the thread
//! admits queued jobs while the model has room (`engine.max_sequences`, `engine.kv_cache`),
//! runs each newcomer's prompt, then steps every running job at once; a job that ends leaves
//! at once. A job that does not fit waits at the head of the queue (the queue's bound is what
//! answers 429 beyond it).
//!
//! The thread keeps a [`Heartbeat`]: each job step (rendering and tokenizing the prompt, each
//! forward pass) sets when it should be over, and the thread marks itself idle between jobs.
//! [`Worker::overdue`] reads it, so the health checks and the watchdog see a stuck engine
//! without waiting on it.

use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::{Batch, ChatMessage, EngineError, GenaiConfig, GenerateParams, Generation, Heartbeat, LoadOptions, Model, Need, PromptText, Refused, StepAllowance};
use crate::telemetry::Metrics;

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Raw text, tokenized as is.
    Text(String),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids given by the client.
    Ids(Vec<u32>),
}

/// One generation request as the worker sees it.
pub struct Job {
    pub prompt: Prompt,
    pub params: GenerateParams,
    /// Set by the request side (client gone, timeout, shutdown); checked before the job
    /// starts and between decode steps.
    pub cancel: Arc<AtomicBool>,
    /// Progress back to the request. Unbounded on purpose: the worker must never block on a
    /// slow client (that would stall every queued request), and `max_new_tokens` bounds it.
    pub events: mpsc::UnboundedSender<Event>,
    /// Which pieces of text are sent as [`Event::Text`] while generating.
    pub text: TextDelivery,
}

/// How a job's text reaches the request side while it is generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextDelivery {
    /// Only the first piece (it times the first token); the whole text comes with
    /// [`Event::Finished`]. For requests that answer once, at the end.
    FirstOnly,
    /// For streams: the first piece at once, then at most one event per interval, joining the
    /// text of the decode steps in between; what is left goes out when generation ends, before
    /// [`Event::Finished`]. A fast engine's tokens thus cost one channel send and wake-up per
    /// interval instead of one per token; a slow engine's steps, each longer than the
    /// interval, still go out one by one. Text made within the interval waits for the next
    /// decode step (the worker has no timer while the model runs), so a step much longer than
    /// its predecessors delays it by that step. Zero: every piece as it comes.
    Paced(Duration),
}

#[derive(Debug)]
pub enum Event {
    /// The prompt is tokenized and within limits; generation begins.
    Started {
        prompt_tokens: usize,
    },
    /// Newly generated text (stop-string tails are held back by the engine).
    Text(String),
    Finished(Generation),
    Failed(JobError),
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the prompt has {tokens} tokens; at most {limit} are accepted")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error("generation failed")]
    Engine(#[from] EngineError),
    #[error("the engine worker panicked; the model is no longer served")]
    WorkerPanicked,
}

#[derive(Debug)]
pub enum SubmitError {
    /// The queue is full; the estimate is how long the queue takes to drain.
    Full { retry_after: Duration },
    /// The worker thread has ended.
    Stopped,
}

/// What the worker learned while loading, sent once the smoke test passed.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: GenaiConfig,
    pub threads: usize,
    pub load_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not start the engine thread")]
    Spawn(#[source] std::io::Error),
    #[error("loading the model failed")]
    Load(#[source] EngineError),
    #[error("the model loaded but failed its smoke test (its chat template on short chats, then greedy tokens from one)")]
    SmokeTest(#[source] EngineError),
    #[error("the engine thread ended before the model was ready")]
    Vanished,
}

#[derive(Debug)]
struct Shared {
    queued: AtomicUsize,
    /// Exponentially weighted mean job time, for `Retry-After`.
    mean_job_micros: AtomicU64,
    alive: AtomicBool,
    heartbeat: Arc<Heartbeat>,
    /// Jobs the model runs at once (known once it has loaded).
    max_sequences: AtomicUsize,
    /// A job taken off the queue that waits for room in the batch (0 or 1).
    waiting: AtomicUsize,
}

/// A handle to a running worker. Cloning shares the queue; the thread ends once every
/// handle is dropped and the queue has drained.
#[derive(Clone)]
pub struct Worker {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
}

impl Worker {
    /// Queues a job without waiting.
    ///
    /// # Errors
    /// [`SubmitError::Full`] when `queue_depth` jobs are already waiting, and
    /// [`SubmitError::Stopped`] when the thread has ended.
    pub fn try_submit(&self, job: Job) -> Result<(), SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Stopped);
        }
        // Count before sending: the worker may take the job before `try_send` returns.
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        self.metrics.queue_depth.inc();
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                self.metrics.queue_depth.dec();
                match e {
                    mpsc::error::TrySendError::Full(_) => Err(SubmitError::Full { retry_after: self.retry_after() }),
                    mpsc::error::TrySendError::Closed(_) => Err(SubmitError::Stopped),
                }
            }
        }
    }

    /// False once the thread has ended or panicked.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst) && !self.jobs.is_closed()
    }

    /// How far the engine's current step has run past its allowance; `None` while it is
    /// idle or in time.
    pub fn overdue(&self) -> Option<Duration> {
        self.shared.heartbeat.overdue()
    }

    /// Jobs waiting (not counting the one running).
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// How long the current queue is expected to take, between 1 s and 60 s.
    fn retry_after(&self) -> Duration {
        let mean = Duration::from_micros(self.shared.mean_job_micros.load(Ordering::Relaxed));
        let ahead = self.queued() + self.shared.waiting.load(Ordering::Relaxed);
        let rounds = ahead / self.shared.max_sequences.load(Ordering::Relaxed).max(1) + 1;
        let wait = mean.saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX));
        Duration::from_secs(wait.as_secs_f64().ceil().clamp(1.0, 60.0) as u64)
    }
}

pub(crate) struct Started {
    pub worker: Worker,
    pub ready: oneshot::Receiver<Result<Loaded, StartError>>,
    /// Closed (its sender dropped) when the thread has ended and the model is unloaded.
    pub drained: watch::Receiver<()>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub queue_depth: usize,
    /// Caps the tokenized prompt; further capped to leave room for one new token in the
    /// model's context.
    pub max_prompt_tokens: Option<usize>,
    pub smoke_test_tokens: usize,
    /// Added to the engine thread's niceness before the model loads.
    pub nice: i32,
    /// How long one job step may take before the engine counts as stuck.
    pub allowance: StepAllowance,
}

/// Starts a thread that loads `dir`, smoke-tests it and then serves jobs.
///
/// # Errors
/// [`StartError::Spawn`] when the OS refuses a thread; load failures arrive on `ready`.
pub(crate) fn start(dir: PathBuf, options: LoadOptions, limits: Limits, metrics: Arc<Metrics>, label: &str) -> Result<Started, StartError> {
    let (jobs_tx, jobs_rx) = mpsc::channel(limits.queue_depth.max(1));
    let (ready_tx, ready_rx) = oneshot::channel();
    let (drained_tx, drained_rx) = watch::channel(());
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        mean_job_micros: AtomicU64::new(0),
        alive: AtomicBool::new(true),
        heartbeat: Arc::new(Heartbeat::new(limits.allowance)),
        max_sequences: AtomicUsize::new(1),
        waiting: AtomicUsize::new(0),
    });
    let worker = Worker { jobs: jobs_tx, shared: shared.clone(), metrics: metrics.clone() };
    let span = tracing::info_span!("engine", model = %label);
    std::thread::Builder::new()
        .name(format!("engine {label}"))
        .spawn(move || {
            let _entered = span.enter();
            // Dropped last of all locals (declared first): its closing tells the manager
            // that the model's memory is released.
            let _drained = drained_tx;
            lower_priority(limits.nice);
            let mut thread = Thread { jobs: jobs_rx, shared, metrics, limits };
            thread.run(&dir, &options, ready_tx);
        })
        .map_err(StartError::Spawn)?;
    Ok(Started { worker, ready: ready_rx, drained: drained_rx })
}

/// Lowers the calling thread's scheduling priority by `by` nice steps. On Linux niceness is
/// per thread, and threads created afterwards inherit it: ONNX Runtime's intra-op pool, made
/// when the model loads on this thread, runs at the same priority. With the engine's threads
/// filling every core, this is what lets a woken request handler (or the client reading the
/// stream) run at once instead of waiting for a scheduler tick. Raising niceness needs no
/// privilege; a failure is logged and the engine runs at the daemon's priority.
fn lower_priority(by: i32) {
    if by == 0 {
        return;
    }
    nix::errno::Errno::clear();
    // DEVNOTE: nice(2) takes and returns plain integers; -1 is also a valid result, so errno
    // tells failure apart.
    let now = unsafe { libc::nice(by) };
    if now == -1 && nix::errno::Errno::last_raw() != 0 {
        tracing::warn!(by, error = %std::io::Error::last_os_error(), "could not lower the engine thread's priority; it runs at the daemon's");
    } else {
        tracing::debug!(nice = now, "engine thread niceness");
    }
}

struct Thread {
    jobs: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    limits: Limits,
}

impl Thread {
    fn run(&mut self, dir: &std::path::Path, options: &LoadOptions, ready: oneshot::Sender<Result<Loaded, StartError>>) {
        let started = Instant::now();
        let mut model = match Model::load(dir, options) {
            Ok(m) => m,
            Err(e) => {
                self.shared.alive.store(false, Ordering::SeqCst);
                let _ = ready.send(Err(StartError::Load(e)));
                return;
            }
        };
        model.watch_steps(self.shared.heartbeat.clone());
        let smoke = smoke_test(&mut model, self.limits.smoke_test_tokens);
        self.shared.heartbeat.idle();
        if let Err(e) = smoke {
            self.shared.alive.store(false, Ordering::SeqCst);
            let _ = ready.send(Err(StartError::SmokeTest(e)));
            return;
        }
        let loaded = Loaded { config: model.config().clone(), threads: model.threads(), load_time: started.elapsed() };
        tracing::info!(load_ms = loaded.load_time.as_millis() as u64, threads = loaded.threads, "model loaded and smoke-tested");
        self.metrics.models_loaded.inc();
        let _ = ready.send(Ok(loaded));

        self.shared.max_sequences.store(model.max_sequences(), Ordering::Relaxed);
        let stopped = self.serve(&mut model);
        // Jobs still queued after a panic are dropped here; their requests see the channel
        // close and answer 503.
        self.jobs.close();
        while let Ok(job) = self.jobs.try_recv() {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            self.metrics.queue_depth.dec();
            let _ = job.events.send(Event::Failed(JobError::WorkerPanicked));
        }
        if stopped.is_err() {
            tracing::error!("engine worker panicked; the model is unloaded");
        }
        drop(model);
        crate::engine::heap::release_freed();
        self.metrics.models_loaded.dec();
        tracing::info!("model unloaded");
    }

    /// Serves jobs until every handle is gone, the queue is empty and the last sequence has
    /// ended: admits what fits between decode steps, steps every running sequence together,
    /// and lets each one leave as it ends. `Err` after a panic (the model may be mid-step with
    /// a half-updated KV cache: it is never used again).
    fn serve(&mut self, model: &mut Model) -> Result<(), ()> {
        let mut batch: Batch<Client> = Batch::default();
        // A job taken from the queue that waits for room (later ones wait behind it).
        let mut waiting: Option<Ready> = None;
        loop {
            if batch.is_empty() && waiting.is_none() {
                self.shared.heartbeat.idle();
                let Some(job) = self.jobs.blocking_recv() else { return Ok(()) };
                waiting = self.take(model, job).inspect_err(|()| self.fail_all(model, &mut batch, None))?;
            }
            // Admit while there is room, taking more from the queue without waiting.
            loop {
                if waiting.is_none() {
                    let Ok(job) = self.jobs.try_recv() else { break };
                    waiting = self.take(model, job).inspect_err(|()| self.fail_all(model, &mut batch, None))?;
                    continue;
                }
                let Some(ready) = waiting.take() else { break };
                if ready.client.gone() {
                    self.metrics.generations_cancelled.inc();
                    continue;
                }
                if !model.has_room(&batch, ready.need) {
                    waiting = Some(ready);
                    break;
                }
                self.admit(model, &mut batch, ready).inspect_err(|()| self.fail_all(model, &mut batch, None))?;
            }
            self.shared.waiting.store(usize::from(waiting.is_some()), Ordering::Relaxed);
            batch.cancel_where(Client::gone);
            let metrics = &self.metrics;
            let stepped = catch_unwind(AssertUnwindSafe(|| model.step(&mut batch, |client, piece| client.on_text(piece, metrics))));
            match stepped {
                Ok(Ok(decoded)) => {
                    if decoded > 0 {
                        self.metrics.decode_steps.inc();
                        self.metrics.decode_step_sequences.inc_by(decoded as u64);
                    }
                }
                Ok(Err(e)) => {
                    // Sequences that had already ended (or failed alone) leave as they are; the
                    // others' keys and values are suspect.
                    if self.retire(model, &mut batch).is_err() {
                        self.fail_all(model, &mut batch, waiting.take());
                        return Err(());
                    }
                    let message = crate::util::chain(&e);
                    tracing::warn!(error = %message, sequences = batch.len(), "a decode step failed; its sequences fail");
                    for client in model.abandon(&mut batch) {
                        client.finish(&self.metrics, Err(JobError::Engine(EngineError::Inference { during: "running the decoder", message: message.clone() })));
                    }
                }
                Err(_) => {
                    self.fail_all(model, &mut batch, waiting.take());
                    return Err(());
                }
            }
            if self.retire(model, &mut batch).is_err() {
                self.fail_all(model, &mut batch, waiting.take());
                return Err(());
            }
        }
    }

    /// Reads a job off the queue: renders and tokenizes its prompt and checks it. `None` when
    /// it was answered already (cancelled, or a bad prompt).
    fn take(&self, model: &mut Model, job: Job) -> Result<Option<Ready>, ()> {
        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        self.metrics.queue_depth.dec();
        // The first step: rendering and tokenizing the prompt (forward passes follow).
        self.shared.heartbeat.step(0);
        let events = job.events.clone();
        let prepared = catch_unwind(AssertUnwindSafe(|| self.prepare(model, job)));
        prepared.map_err(|_| {
            self.shared.alive.store(false, Ordering::SeqCst);
            let _ = events.send(Event::Failed(JobError::WorkerPanicked));
        })
    }

    fn prepare(&self, model: &mut Model, job: Job) -> Option<Ready> {
        let Job { prompt, params, cancel, events, text } = job;
        let client = Client { events, cancel, text, last_sent: None, held: String::new(), counted: 0, began: Instant::now() };
        if client.gone() {
            // The client left (or timed out) while queued.
            self.metrics.generations_cancelled.inc();
            return None;
        }
        let limit = model.context_length().saturating_sub(1).min(self.limits.max_prompt_tokens.unwrap_or(usize::MAX));
        let ids = match &prompt {
            Prompt::Text(text) => model.encode_prompt_within(PromptText::Raw(text), limit),
            Prompt::Chat(messages) => model.encode_prompt_within(PromptText::Chat(messages), limit),
            Prompt::Ids(ids) => Ok(Ok(ids.clone())),
        };
        let ids = match ids {
            Ok(Ok(ids)) => ids,
            Ok(Err(at_least)) => {
                let _ = client.events.send(Event::Failed(JobError::PromptTooLong { tokens: at_least, limit }));
                return None;
            }
            Err(e) => {
                let _ = client.events.send(Event::Failed(e.into()));
                return None;
            }
        };
        if ids.len() > limit {
            let _ = client.events.send(Event::Failed(JobError::PromptTooLong { tokens: ids.len(), limit }));
            return None;
        }
        match model.need(&ids, &params) {
            Ok(need) => Some(Ready { client, ids, params, need }),
            Err(e) => {
                let _ = client.events.send(Event::Failed(e.into()));
                None
            }
        }
    }

    /// Starts a job in the batch: its prompt runs and its first token comes out.
    fn admit(&self, model: &mut Model, batch: &mut Batch<Client>, ready: Ready) -> Result<(), ()> {
        let Ready { mut client, ids, params, .. } = ready;
        if client.events.send(Event::Started { prompt_tokens: ids.len() }).is_err() {
            self.metrics.generations_cancelled.inc();
            return Ok(());
        }
        client.began = Instant::now();
        self.metrics.generations_in_progress.inc();
        let events = client.events.clone();
        let metrics = &self.metrics;
        let joined = catch_unwind(AssertUnwindSafe(|| model.join(batch, &ids, &params, client.began, client, |client, piece| client.on_text(piece, metrics))));
        match joined {
            Ok(Ok(())) => {
                self.metrics.prompt_tokens.inc_by(ids.len() as u64);
                Ok(())
            }
            Ok(Err(refused)) => {
                let Refused { tag: client, error } = *refused;
                client.finish(&self.metrics, Err(error.into()));
                Ok(())
            }
            Err(_) => {
                self.metrics.generations_in_progress.dec();
                let _ = events.send(Event::Failed(JobError::WorkerPanicked));
                Err(())
            }
        }
    }

    /// Answers the sequences that ended and takes them out of the batch. `Err` after a panic
    /// (finishing a sequence decodes its last text).
    fn retire(&self, model: &mut Model, batch: &mut Batch<Client>) -> Result<(), ()> {
        let retired = catch_unwind(AssertUnwindSafe(|| model.retire(batch, |client, tail| client.flush_with(tail)))).map_err(|_| ())?;
        for (client, result) in retired {
            if let Ok(generation) = &result {
                if generation.reused_tokens > 0 {
                    self.metrics.prefix_hits.inc();
                    self.metrics.prefix_reused_tokens.inc_by(generation.reused_tokens as u64);
                }
            }
            let micros = client.began.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
            let mean = self.shared.mean_job_micros.load(Ordering::Relaxed);
            self.shared.mean_job_micros.store(if mean == 0 { micros } else { (mean * 7 + micros) / 8 }, Ordering::Relaxed);
            client.finish(&self.metrics, result.map_err(JobError::from));
        }
        self.metrics.prefix_cache_bytes.set(i64::try_from(model.prefix_cache_bytes()).unwrap_or(i64::MAX));
        Ok(())
    }

    /// After a panic: every running and waiting job is told, and the worker stops taking jobs.
    fn fail_all(&self, model: &mut Model, batch: &mut Batch<Client>, waiting: Option<Ready>) {
        self.shared.alive.store(false, Ordering::SeqCst);
        for client in catch_unwind(AssertUnwindSafe(|| model.abandon(batch))).unwrap_or_default() {
            self.metrics.generations_in_progress.dec();
            let _ = client.events.send(Event::Failed(JobError::WorkerPanicked));
        }
        if let Some(ready) = waiting {
            let _ = ready.client.events.send(Event::Failed(JobError::WorkerPanicked));
        }
    }
}

/// A job read off the queue, its prompt tokenized and checked, waiting to join the batch.
struct Ready {
    client: Client,
    ids: Vec<u32>,
    params: GenerateParams,
    need: Need,
}

/// Where a running job's text goes, and how.
struct Client {
    events: mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    text: TextDelivery,
    /// When the last piece was sent; `None` before the first (which is always sent).
    last_sent: Option<Instant>,
    /// Text waiting for the next paced send.
    held: String,
    /// Tokens already added to the generated-tokens counter.
    counted: u64,
    /// When it joined the batch (for the mean job time).
    began: Instant,
}

impl Client {
    /// The request side has gone (client left, timed out, shutting down).
    fn gone(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }

    /// A new piece of text. Called at most once per decode step (plus a final flush), so the
    /// token counter is advanced for the previous piece when the next arrives; the exact
    /// remainder is added at the end. `Break` when the request side is gone.
    fn on_text(&mut self, piece: &str, metrics: &Metrics) -> ControlFlow<()> {
        if self.last_sent.is_some() {
            metrics.generated_tokens.inc();
            self.counted += 1;
        }
        let out = match (self.text, self.last_sent) {
            (TextDelivery::FirstOnly, Some(_)) => return ControlFlow::Continue(()),
            (TextDelivery::Paced(interval), Some(t)) if t.elapsed() < interval => {
                self.held.push_str(piece);
                return ControlFlow::Continue(());
            }
            _ if self.held.is_empty() => piece.to_string(),
            _ => std::mem::take(&mut self.held) + piece,
        };
        self.last_sent = Some(Instant::now());
        if self.events.send(Event::Text(out)).is_err() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    /// The text left when generation ends, after what is held (streams only).
    fn flush_with(&mut self, tail: &str) {
        if self.text != TextDelivery::FirstOnly || self.last_sent.is_none() {
            self.held.push_str(tail);
        }
    }

    /// Sends what is held and the outcome.
    fn finish(mut self, metrics: &Metrics, result: Result<Generation, JobError>) {
        metrics.generations_in_progress.dec();
        if !self.held.is_empty() {
            let _ = self.events.send(Event::Text(std::mem::take(&mut self.held)));
        }
        match result {
            Ok(generation) => {
                metrics.generated_tokens.inc_by((generation.token_ids.len() as u64).saturating_sub(self.counted));
                if generation.finish_reason == crate::engine::FinishReason::Cancelled {
                    metrics.generations_cancelled.inc();
                }
                let _ = self.events.send(Event::Finished(generation));
            }
            Err(e) => {
                let _ = self.events.send(Event::Failed(e));
            }
        }
    }
}

/// The chat template on short chats (within its fuel and output bounds), then greedy tokens
/// from a one-message chat: proves the template, tokenizer, graph and sampler work together
/// before the model is published. Generation runs through end-of-sequence so every requested
/// step executes.
fn smoke_test(model: &mut Model, tokens: usize) -> Result<(), EngineError> {
    let tokens = tokens.max(1);
    model.tokenizer().check_chat_template()?;
    let ids = model.encode_chat(&[ChatMessage { role: "user".into(), content: "Hello".into() }])?;
    let params = GenerateParams { max_new_tokens: tokens, ignore_eos: true, ..GenerateParams::default() };
    let generation = model.generate(&ids, &params, &AtomicBool::new(false), |_| ControlFlow::Continue(()))?;
    if generation.token_ids.len() != tokens.min(model.context_length().saturating_sub(ids.len())) {
        return Err(EngineError::Inference { during: "the smoke test", message: format!("expected {tokens} tokens, got {}", generation.token_ids.len()) });
    }
    Ok(())
}
