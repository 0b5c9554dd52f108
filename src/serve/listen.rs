//! Where the API listens, for `edgeflow run` and `edgeflow serve` alike: the Unix socket
//! (the one systemd passed, or our own, bound under a temporary name and renamed into place)
//! and the optional loopback TCP port; then one server task per listener and one way to
//! drain them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::settings::ServeSettings;
use super::{from_systemd, socket, App, SocketFile};

/// Bound listeners, not yet serving. Bind them before anything slow so `/healthz` answers
/// (and generation gets 503) while the model loads.
pub struct Listeners {
    unix: UnixListener,
    /// Our own socket file, removed when the server is done; `None` for systemd's.
    socket_file: Option<SocketFile>,
    socket_path: PathBuf,
    tcp: Option<TcpListener>,
}

impl Listeners {
    /// Takes the socket systemd passed (socket activation) or binds `settings.socket`, and
    /// listens on `settings.tcp_listen` when set.
    ///
    /// # Errors
    /// The socket is in use, its folder is missing or not ours, or the TCP address is taken.
    pub async fn bind(settings: &ServeSettings) -> anyhow::Result<Self> {
        let (unix, socket_file) = match from_systemd().context("taking the socket systemd passed")? {
            Some(listener) => (listener, None),
            None => {
                let (listener, file) = socket::bind(&settings.socket).context("binding the API socket")?;
                (listener, Some(file))
            }
        };
        let socket_path = match &socket_file {
            Some(f) => f.path().to_path_buf(),
            None => unix.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)).unwrap_or_else(|| settings.socket.path.clone()),
        };
        let tcp = match settings.tcp_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?),
            None => None,
        };
        Ok(Self { unix, socket_file, socket_path, tcp })
    }

    /// The socket's path (systemd's when it passed one).
    #[must_use]
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Starts serving `app` on every listener until `stop` is cancelled.
    pub fn serve(self, app: &App, stop: &CancellationToken) -> Serving {
        let tracker = TaskTracker::new();
        let mut tasks = vec![tracker.spawn(super::run(self.unix, app.clone(), stop.clone()))];
        if let Some(tcp) = self.tcp {
            tasks.push(tracker.spawn(super::run_tcp(tcp, app.clone(), stop.clone())));
        }
        tracker.close();
        Serving { tasks, socket_file: self.socket_file }
    }
}

/// The running servers. [`Serving::drain`] after cancelling their token: each lets its
/// in-flight requests finish within `serve.shutdown_grace`. Dropping it removes our socket file.
pub struct Serving {
    tasks: Vec<JoinHandle<()>>,
    socket_file: Option<SocketFile>,
}

impl Serving {
    /// Waits for every server to finish; a server that panicked is logged, not propagated.
    pub async fn drain(&mut self) {
        for task in self.tasks.drain(..) {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "server task failed");
            }
        }
    }

    /// Removes our socket file now (also done on drop).
    pub fn close(mut self) {
        self.socket_file.take();
    }
}
