//! Accepting connections, and what every connection is held to.
//!
//! Each listener serves at most `max_connections` at once; one more is answered 503 with
//! `Retry-After` and closed, so a client that leaks connections cannot starve the device. On
//! the Unix socket one user (peer uid) may hold at most `max_connections_per_uid` of them; its
//! next one is answered 429 and closed, so a client that leaks or hoards connections cannot
//! starve the other local apps either. The daemon's own connections (its watchdog health probe) are not counted: a
//! full server must not fail its own liveness check and be restarted by systemd. A client has
//! `header_timeout` to send a request's headers, which is also how long a kept-alive
//! connection may sit idle. Shutdown stops accepting, lets the requests in
//! flight finish for the grace period, then ends them through the app's hard stop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
    let users = Users::new(app.inner.limits.max_connections_per_uid.clamp(1, limit));
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
        match admit(peer, &slots, &users, limit) {
            Ok(slot) => {
                connections.spawn(connection(http.clone(), io, peer, router.clone(), app.clone(), closing.clone(), slot));
            }
            Err(refusal) => {
                let refused = &app.inner.metrics.http_connections_refused;
                refused.inc();
                if last_warning.is_none_or(|t| t.elapsed() >= REFUSAL_WARNING_PERIOD) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(?peer, refused_so_far = refused.get(), "refusing a connection: {refusal}");
                }
                match refusals.clone().try_acquire_owned() {
                    Ok(permit) => {
                        connections.spawn(refuse(io, refusal, permit));
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

/// What a served connection holds until it closes: one of the listener's slots and, for a
/// Unix peer, one of its user's. The daemon's own connections hold neither.
struct Slot {
    _listener: OwnedSemaphorePermit,
    _user: Option<UserSlot>,
}

/// Takes a slot for `peer`, or says why not (the error the refused client is sent).
fn admit(peer: Peer, slots: &Arc<Semaphore>, users: &Arc<Users>, limit: usize) -> Result<Option<Slot>, ApiError> {
    if is_own(peer) {
        return Ok(None);
    }
    let listener = slots.clone().try_acquire_owned().map_err(|_| ApiError::TooManyConnections { limit, retry_after: REFUSAL_RETRY_AFTER })?;
    let user = match peer {
        Peer::Unix { uid, .. } => Some(users.take(uid).ok_or(ApiError::TooManyConnectionsForUser { uid, limit: users.limit, retry_after: REFUSAL_RETRY_AFTER })?),
        Peer::Tcp(_) | Peer::Unknown => None,
    };
    Ok(Some(Slot { _listener: listener, _user: user }))
}

/// Connections held per peer uid. An entry lives only while its uid holds a connection, so
/// the map never has more entries than the listener has slots.
struct Users {
    limit: usize,
    held: Mutex<HashMap<u32, usize>>,
}

impl Users {
    fn new(limit: usize) -> Arc<Users> {
        Arc::new(Users { limit, held: Mutex::new(HashMap::new()) })
    }

    /// One more connection for `uid`, or `None` when it holds `limit` already.
    fn take(self: &Arc<Self>, uid: u32) -> Option<UserSlot> {
        let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = held.entry(uid).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(UserSlot { users: self.clone(), uid })
    }
}

/// One connection of `uid`, given back when dropped.
struct UserSlot {
    users: Arc<Users>,
    uid: u32,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut held = self.users.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.uid);
            }
        }
    }
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
async fn connection<I>(http: http1::Builder, io: I, peer: Peer, router: axum::Router, app: App, closing: CancellationToken, slot: Option<Slot>)
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

/// Answers a connection over a limit with `err` (503 for the listener's, 429 for the user's)
/// and closes it.
async fn refuse<I>(mut io: I, err: ApiError, _permit: OwnedSemaphorePermit)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
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

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: Peer = Peer::Unix { uid: 0, gid: 0, pid: Some(1) };
    const APP: Peer = Peer::Unix { uid: 1000, gid: 1000, pid: Some(2) };

    #[test]
    fn one_user_cannot_take_every_slot_and_slots_come_back_when_dropped() {
        let (slots, users) = (Arc::new(Semaphore::new(4)), Users::new(3));
        let mut held: Vec<_> = (0..3).map(|_| admit(ROOT, &slots, &users, 4).unwrap()).collect();
        let Err(refused) = admit(ROOT, &slots, &users, 4) else { panic!("a fourth connection of uid 0 was admitted") };
        assert_eq!((refused.status().as_u16(), refused.code()), (429, "too_many_connections"));
        assert!(refused.to_string().starts_with("uid 0 already holds its limit of 3 connections"), "{refused}");
        assert_eq!(slots.available_permits(), 1, "a refused user gives its listener slot back");
        let other = admit(APP, &slots, &users, 4).unwrap();
        let Err(full) = admit(Peer::Tcp("127.0.0.1:1".parse().unwrap()), &slots, &users, 4) else { panic!("a fifth connection was admitted") };
        assert_eq!((full.status().as_u16(), full.to_string()), (503, "the server already serves its limit of 4 connections; retry after 1s".to_string()));
        held.pop();
        assert!(admit(ROOT, &slots, &users, 4).is_ok(), "a closed connection frees its user's slot");
        drop((held, other));
        assert!(users.held.lock().unwrap().is_empty(), "no entry outlives its uid's connections");
        assert_eq!(slots.available_permits(), 4);
    }

    #[test]
    fn tcp_peers_and_the_daemons_own_connections_hold_no_user_slot() {
        let (slots, users) = (Arc::new(Semaphore::new(2)), Users::new(1));
        let own = Peer::Unix { uid: 0, gid: 0, pid: Some(std::process::id() as i32) };
        let tcp = Peer::Tcp("127.0.0.1:1".parse().unwrap());
        let held: Vec<_> = [tcp, tcp].into_iter().map(|p| admit(p, &slots, &users, 2).unwrap()).collect();
        assert!(admit(own, &slots, &users, 2).unwrap().is_none(), "the daemon's own probe is always served, outside the limits");
        assert!(users.held.lock().unwrap().is_empty());
        drop(held);
    }
}
