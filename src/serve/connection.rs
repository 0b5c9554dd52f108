//! Accepting connections, and what every connection is held to.
//!
//! Each listener serves at most `max_connections` at once; one more is answered 503 with
//! `Retry-After` and closed, so a client that leaks connections cannot starve the others or
//! the device. The daemon's own connections (its watchdog health probe) are not counted: a
//! full server must not fail its own liveness check and be restarted by systemd. A client has
//! `header_timeout` to send a request's headers, which is also how long a kept-alive
//! connection may sit idle. Shutdown stops accepting, lets the requests in
//! flight finish for the grace period, then ends them through the app's hard stop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::ApiError;
use super::{App, Peer};

/// Refusals written at once; beyond this, surplus connections are closed unanswered.
const REFUSALS_IN_FLIGHT: usize = 16;
/// How long a refused client has to read its 503.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// What a refused client is told to wait.
const REFUSAL_RETRY_AFTER: Duration = Duration::from_secs(1);
/// A connection's read buffer: request headers must fit in it (431 beyond). Bodies stream
/// through it and are limited separately (`max_body`).
const MAX_BUF: usize = 64 * 1024;
/// At most one warning per this period about refused connections; the metric counts all.
const REFUSAL_WARNING_PERIOD: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains (see the module
/// documentation). Failed accepts are handled by the listener; nothing here can fail.
pub(super) async fn serve<L>(mut listener: L, app: App, shutdown: CancellationToken)
where
    L: axum::serve::Listener<Addr = Peer>,
{
    let limit = app.inner.limits.max_connections;
    let slots = Arc::new(Semaphore::new(limit));
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(app.inner.limits.header_timeout).max_buf_size(MAX_BUF);
    let router = app.router();
    let closing = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut last_warning: Option<Instant> = None;
    loop {
        let (io, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let slot = if is_own(peer) { Ok(None) } else { slots.clone().try_acquire_owned().map(Some) };
        match slot {
            Ok(slot) => {
                connections.spawn(connection(http.clone(), io, peer, router.clone(), app.clone(), closing.clone(), slot));
            }
            Err(_) => {
                let refused = &app.inner.metrics.http_connections_refused;
                refused.inc();
                if last_warning.is_none_or(|t| t.elapsed() >= REFUSAL_WARNING_PERIOD) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(limit, ?peer, refused_so_far = refused.get(), "refusing a connection: the server already serves serve.max_connections");
                }
                match refusals.clone().try_acquire_owned() {
                    Ok(permit) => {
                        connections.spawn(refuse(io, limit, permit));
                    }
                    Err(_) => drop(io),
                }
            }
        }
    }
    drop(listener);
    closing.cancel();
    connections.close();
    let grace = app.inner.shutdown_grace;
    tracing::info!(grace_ms = grace.as_millis() as u64, open = limit - slots.available_permits(), "shutting down: no new connections; letting in-flight requests finish");
    if tokio::time::timeout(grace, connections.wait()).await.is_err() {
        tracing::warn!("grace period over: ending the requests still running");
        app.inner.hard_stop.cancel();
        if tokio::time::timeout(Duration::from_secs(2), connections.wait()).await.is_err() {
            tracing::warn!(open = limit - slots.available_permits(), "connections still open after the hard stop; leaving them");
        }
    }
}

/// Whether the peer is this process (the daemon's health probe).
fn is_own(peer: Peer) -> bool {
    matches!(peer, Peer::Unix { pid: Some(pid), .. } if u32::try_from(pid).is_ok_and(|p| p == std::process::id()))
}

/// Counts a connection in `edgeflow_http_connections` while it lives, however its task ends.
struct Open(prometheus::IntGauge);

impl Open {
    fn new(gauge: &prometheus::IntGauge) -> Open {
        gauge.inc();
        Open(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One connection, holding its slot (none for the daemon's own) until it closes.
async fn connection<I>(http: http1::Builder, io: I, peer: Peer, router: axum::Router, app: App, closing: CancellationToken, slot: Option<OwnedSemaphorePermit>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _open = Open::new(&app.inner.metrics.http_connections);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        // The router is always ready (axum documents `poll_ready` as always `Ready`).
        tower_service::Service::call(&mut router.clone(), request)
    });
    let conn = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = closing.cancelled() => {
            // Finishes the request in flight, if any, then closes; idle connections close now.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    // Free the slot as soon as the connection is done, before the socket is dropped.
    drop(slot);
    match result {
        Ok(()) => {}
        Err(e) if e.is_timeout() => tracing::debug!(?peer, "closed a connection that sent no complete request headers within serve.header_timeout"),
        Err(e) => tracing::debug!(?peer, error = %e, "connection ended with an error"),
    }
}

/// Answers a connection over the limit with 503 and closes it.
async fn refuse<I>(mut io: I, limit: usize, _permit: OwnedSemaphorePermit)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let err = ApiError::TooManyConnections { limit, retry_after: REFUSAL_RETRY_AFTER };
    let body = serde_json::to_vec(&err.body()).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: {}\r\nconnection: close\r\n\r\n",
        err.status().as_u16(),
        err.status().canonical_reason().unwrap_or(""),
        body.len(),
        err.retry_after().unwrap_or(REFUSAL_RETRY_AFTER).as_secs().max(1)
    );
    let answer = async {
        io.write_all(head.as_bytes()).await?;
        io.write_all(&body).await?;
        io.shutdown().await?;
        // Read what the client sent before closing (up to the read buffer's size): closing
        // with unread data can reset the connection, and the client could lose the answer.
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < MAX_BUF {
            match io.read(&mut sink).await? {
                0 => break,
                n => total += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, answer).await;
}
