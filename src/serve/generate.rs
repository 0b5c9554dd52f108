//! One generation request from admission to the last byte: queue it on the active
//! model's worker, wait for it to start (so prompt errors are still real HTTP statuses),
//! then either collect the result or stream it as server-sent events.
//!
//! Cancellation is by ownership: the request side holds a [`CancelOnDrop`]. When the
//! client disconnects, hyper drops the handler future (non-streaming) or the response body
//! (streaming), the guard sets the job's cancel flag, and the engine stops before its next
//! decode step; a streaming job's worker also stops as soon as it fails to hand over a piece
//! of text. A timeout or the end of the shutdown grace period ends the request the same way.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use tokio::sync::mpsc;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::error::ApiError;
use super::openai::{self, AssistantMessage, ChatChoice, ChatCompletion, Chunk, Completion, CompletionChoice, Endpoint, Header, Plan, Usage};
use super::App;
use crate::active::{Event, Job, TextDelivery};
use crate::engine::{FinishReason, Generation};
use crate::telemetry::drift::Observation;

/// Sets the job's cancel flag when the request side goes away before the job finished.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The request side of a running job.
struct Run {
    app: App,
    endpoint: Endpoint,
    header: Header,
    /// Registry name and version of the model that runs the job, for drift windows.
    version: (String, String),
    events: mpsc::UnboundedReceiver<Event>,
    /// The request timeout and the end of the shutdown grace period, made once per request
    /// (not per event: the stream's per-token path registers no timer of its own).
    deadline: Pin<Box<tokio::time::Sleep>>,
    hard_stop: Pin<Box<WaitForCancellationFutureOwned>>,
    received: Instant,
    first_text: bool,
    /// An event taken from the channel while coalescing text, handed out next.
    held: Option<Event>,
    _cancel: CancelOnDrop,
}

impl Run {
    /// The next event from the worker, or the reason there will be none. After an error the
    /// run is over: callers do not ask again.
    async fn next(&mut self) -> Result<Event, ApiError> {
        if let Some(event) = self.held.take() {
            return Ok(event);
        }
        // Limits first, so a worker that always has another event ready cannot outrun them.
        tokio::select! {
            biased;
            () = self.hard_stop.as_mut() => Err(ApiError::ShuttingDown),
            () = self.deadline.as_mut() => Err(ApiError::Timeout { limit: self.app.inner.limits.request_timeout }),
            event = self.events.recv() => match event {
                Some(event) => {
                    self.note(&event);
                    Ok(event)
                }
                // The worker dropped the job unanswered: it stopped (a panic on another job).
                None => Err(ApiError::NoModel { reason: "the model's engine worker stopped", retry_after: std::time::Duration::from_secs(5) }),
            },
        }
    }

    /// The next event, with every piece of text the worker has already queued behind it
    /// joined into one: a client that reads slower than the engine writes gets fewer, larger
    /// SSE events instead of one per token. (The worker itself sends at most one piece per
    /// `stream_interval`; see [`TextDelivery::Paced`].)
    async fn next_coalesced(&mut self) -> Result<Event, ApiError> {
        let mut event = self.next().await?;
        if let Event::Text(text) = &mut event {
            while let Ok(more) = self.events.try_recv() {
                self.note(&more);
                match more {
                    Event::Text(t) => text.push_str(&t),
                    other => {
                        self.held = Some(other);
                        break;
                    }
                }
            }
        }
        Ok(event)
    }

    /// Metrics and drift for an event as it leaves the worker's channel.
    fn note(&mut self, event: &Event) {
        if matches!(event, Event::Text(_)) && !self.first_text {
            self.first_text = true;
            self.app.inner.metrics.time_to_first_token.observe(self.received.elapsed().as_secs_f64());
        }
        if let (Event::Finished(g), Some(drift)) = (event, self.app.inner.drift.get()) {
            // Aggregates only: token counts, stop reason, log-probability, entropy, latency.
            // No text leaves this function.
            let o = Observation::from_generation(g, true, Some(self.received.elapsed()));
            drift.observe(&self.version.0, &self.version.1, &o);
        }
    }

    fn failed(&self, event: Event) -> ApiError {
        match event {
            Event::Failed(e) => ApiError::from_job(e, &self.header.id, self.endpoint.prompt_field()),
            Event::Finished(g) if g.finish_reason == FinishReason::Cancelled => ApiError::ShuttingDown,
            other => {
                tracing::error!(request_id = %self.header.id, event = ?other, "unexpected event from the engine worker");
                ApiError::Internal { request_id: self.header.id.clone() }
            }
        }
    }
}

/// Runs `plan` on the active model.
///
/// # Errors
/// Every [`ApiError`] a generation can end in before its response starts.
pub async fn generate(app: App, plan: Plan, received: Instant) -> Result<Response, ApiError> {
    if app.inner.hard_stop.is_cancelled() {
        return Err(ApiError::ShuttingDown);
    }
    let active = app.inner.manager.current().filter(|a| a.is_healthy()).ok_or_else(|| app.no_model())?;
    let mut params = plan.params(active.config(), app.inner.limits.max_tokens)?;
    params.collect_stats = app.inner.drift.get().is_some();
    let info = active.info();
    let header = Header {
        id: app.next_request_id(plan.endpoint),
        created: crate::util::unix_now(),
        model: info.name.clone(),
        system_fingerprint: format!("{}@{}", info.name, info.version),
    };
    tracing::Span::current().record("request_id", header.id.as_str());
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::unbounded_channel();
    let text = if plan.stream { TextDelivery::Paced(app.inner.limits.stream_interval) } else { TextDelivery::FirstOnly };
    let guard = CancelOnDrop(cancel.clone());
    let version = (info.name.clone(), info.version.clone());
    active.submit(Job { prompt: plan.prompt, params, cancel, events: tx, text }).map_err(ApiError::from_submit)?;
    // The worker holds the job now; this request must not keep a swapped-out model alive.
    drop(active);
    let deadline = Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(received + app.inner.limits.request_timeout)));
    let hard_stop = Box::pin(app.inner.hard_stop.clone().cancelled_owned());
    let mut run = Run { app, endpoint: plan.endpoint, header, version, events: rx, deadline, hard_stop, received, first_text: false, held: None, _cancel: guard };

    let prompt_tokens = match run.next().await? {
        Event::Started { prompt_tokens } => prompt_tokens,
        other => return Err(run.failed(other)),
    };
    if plan.stream {
        Ok(stream_response(run, prompt_tokens, plan.include_usage))
    } else {
        collect(run).await
    }
}

async fn collect(mut run: Run) -> Result<Response, ApiError> {
    let generation = loop {
        match run.next().await? {
            Event::Text(_) | Event::Started { .. } => {}
            Event::Finished(g) if g.finish_reason != FinishReason::Cancelled => break g,
            other => return Err(run.failed(other)),
        }
    };
    let usage = usage(&generation);
    let finish = openai::finish_reason(generation.finish_reason);
    let body = match run.endpoint {
        Endpoint::Chat => serde_json::to_value(ChatCompletion {
            header: &run.header,
            object: "chat.completion",
            choices: [ChatChoice { index: 0, message: AssistantMessage { role: "assistant", content: &generation.text }, logprobs: None, finish_reason: finish }],
            usage,
        }),
        Endpoint::Completions => serde_json::to_value(Completion {
            header: &run.header,
            object: "text_completion",
            choices: [CompletionChoice { text: &generation.text, index: 0, logprobs: None, finish_reason: Some(finish) }],
            usage,
        }),
    };
    let body = body.map_err(|e| {
        tracing::error!(error = %e, "serializing a completion failed");
        ApiError::Internal { request_id: run.header.id.clone() }
    })?;
    Ok(with_version(Json(body).into_response(), &run.header))
}

fn usage(g: &Generation) -> Usage {
    Usage::new(g.prompt_token_ids.len(), g.token_ids.len(), g.reused_tokens)
}

fn with_version(mut response: Response, header: &Header) -> Response {
    if let Ok(v) = axum::http::HeaderValue::from_str(&header.system_fingerprint) {
        response.headers_mut().insert("x-edgeflow-model", v);
    }
    if let Ok(v) = axum::http::HeaderValue::from_str(&header.id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

enum Phase {
    Opening,
    Generating,
    Done,
}

fn stream_response(run: Run, prompt_tokens: usize, include_usage: bool) -> Response {
    let header = run.header.clone();
    let events = stream::unfold((run, Phase::Opening, Vec::<SseEvent>::new()), move |(mut run, mut phase, mut pending)| async move {
        loop {
            if let Some(event) = pending.pop() {
                return Some((Ok::<_, Infallible>(event), (run, phase, pending)));
            }
            match phase {
                Phase::Done => return None,
                Phase::Opening => {
                    phase = Phase::Generating;
                    if run.endpoint == Endpoint::Chat {
                        pending.push(chunk(&run, "", true, None, include_usage.then_some(None)));
                    }
                }
                Phase::Generating => {
                    // `pending` is a stack: push the last event first.
                    match run.next_coalesced().await {
                        Ok(Event::Text(text)) => pending.push(chunk(&run, &text, false, None, include_usage.then_some(None))),
                        Ok(Event::Started { .. }) => {}
                        Ok(Event::Finished(g)) if g.finish_reason != FinishReason::Cancelled => {
                            phase = Phase::Done;
                            pending.push(SseEvent::default().data("[DONE]"));
                            if include_usage {
                                pending.push(usage_chunk(&run, Usage::new(prompt_tokens, g.token_ids.len(), g.reused_tokens)));
                            }
                            pending.push(chunk(&run, "", false, Some(openai::finish_reason(g.finish_reason)), include_usage.then_some(None)));
                        }
                        Ok(other) => {
                            let err = run.failed(other);
                            phase = Phase::Done;
                            pending.push(error_event(&run, &err));
                        }
                        Err(err) => {
                            phase = Phase::Done;
                            pending.push(error_event(&run, &err));
                        }
                    }
                }
            }
        }
    });
    with_version(Sse::new(events).into_response(), &header)
}

fn chunk(run: &Run, text: &str, role: bool, finish: Option<&'static str>, usage: Option<Option<Usage>>) -> SseEvent {
    let chunk = Chunk { header: &run.header, object: run.endpoint.chunk_object(), choices: vec![run.endpoint.chunk_choice(text, role, finish)], usage };
    json_event(&chunk)
}

fn usage_chunk(run: &Run, usage: Usage) -> SseEvent {
    json_event(&Chunk { header: &run.header, object: run.endpoint.chunk_object(), choices: Vec::new(), usage: Some(Some(usage)) })
}

/// A failure after the stream started: OpenAI's SDKs raise on a chunk with an `error` key.
fn error_event(run: &Run, err: &ApiError) -> SseEvent {
    tracing::warn!(request_id = %run.header.id, code = err.code(), "stream ended with an error: {err}");
    run.app.inner.metrics.http_errors.with_label_values(&[run.endpoint.path(), err.code()]).inc();
    json_event(&err.body())
}

fn json_event<T: serde::Serialize>(value: &T) -> SseEvent {
    match serde_json::to_string(value) {
        Ok(json) => SseEvent::default().data(json),
        Err(e) => {
            tracing::error!(error = %e, "serializing a stream chunk failed");
            SseEvent::default().data(r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":"internal_error"}}"#)
        }
    }
}
