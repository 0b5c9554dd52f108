//! The daemon, `edgeflow run`: every subsystem wired into one process with one way out.
//!
//! ```text
//!  pipeline::Poller ──status──▶ supervisor ──ensure──▶ active::Manager ──▶ serve (socket)
//!        ▲  (pull, verify,        │  │                                         │
//!        │   smoke test,          │  └──▶ status::Publisher ──▶ fleet link, /status, STATUS=
//!        │   activate in cache)   └──▶ fleet events                             │
//!        └──── Op (sync, pin, rollback, verify, reject) ◀── commands ◀── MQTT   drift ◀┘
//! ```
//!
//! The poller owns the registry and the cache: it is the only task that changes what the
//! cache calls active, one change at a time. The supervisor makes the engine follow it: it
//! loads each version the poller activates ([`Manager::ensure`]) and, when the engine cannot
//! serve one that passed the smoke test (it no longer fits the memory budget, say), asks the
//! poller to go back to the last-known-good version. Commands from the fleet become poller
//! operations and are answered once the engine serves the result.
//!
//! Shutdown (SIGTERM, SIGINT) has one path: stop accepting, let in-flight requests finish
//! within `serve.shutdown_grace`, stop the poller (a download in progress resumes at the next
//! start), say offline on MQTT and flush the spool, unload the model, exit 0. SIGHUP re-reads
//! the config file and applies what can change at run time.

mod commands;
pub mod folder;
mod reload;
mod report;
mod supervisor;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::active::{Manager, ManagerOptions};
use crate::backoff::{device_phase, machine_id, Jitter};
use crate::cache::Store;
use crate::command::{Bus, Request};
use crate::config::{Config, RegistrySettings};
use crate::fleet::{Event, Link, LinkHandle, LinkSender};
use crate::lifecycle::Lifecycle;
use crate::notify::Notifier;
use crate::pipeline::poller::Control;
use crate::pipeline::pull::{PullEvent, PullObserver};
use crate::pipeline::{Poller, Puller};
use crate::registry::{Auth, Client};
use crate::serve::{App, Listeners, Serving};
use crate::status;
use crate::telemetry::drift::Recorder;
use crate::telemetry::Metrics;
use commands::Handler;
use report::{status_document, status_line};
use supervisor::Supervisor;

/// Changes the log filter while running (the fleet's `set {log_level}`).
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Commands waiting for the handler, at most.
const COMMAND_QUEUE: usize = 16;
/// How long the fleet link may take to say goodbye and flush.
const LINK_STOP: Duration = Duration::from_secs(10);
/// How often STATUS= is refreshed (only sent when it changed).
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Runs the daemon on `listeners` until `lifecycle.shutdown` is cancelled; each
/// `lifecycle.reload` re-reads `config_path`. `config` has passed [`Config::daemon_problems`].
///
/// # Errors
/// Start-up failures only (cache locked or unreadable, registry client misconfigured); once
/// running, failures are reported and the daemon keeps serving.
pub async fn run(config: Config, config_path: PathBuf, listeners: Listeners, lifecycle: Lifecycle, log: LogControl, notifier: Notifier) -> anyhow::Result<()> {
    let daemon = Daemon::start(&config, listeners, log, notifier).await?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config_path.display(),
        socket = %daemon.socket_path.display(),
        model = %daemon.model,
        target = %daemon.target,
        cache = %daemon.store.root().display(),
        fleet = daemon.link.is_some(),
        "edgeflow run started"
    );
    daemon.main_loop(&lifecycle, &config_path, config).await;
    daemon.stop().await;
    Ok(())
}

/// Every running part of the daemon, from [`Daemon::start`] to [`Daemon::stop`].
struct Daemon {
    model: String,
    target: String,
    socket_path: PathBuf,
    store: Store,
    manager: Manager,
    status: watch::Receiver<status::Status>,
    link: Option<LinkHandle>,
    stop_link: CancellationToken,
    servers: Serving,
    stop_http: CancellationToken,
    control: Control,
    poller_task: JoinHandle<()>,
    background: TaskTracker,
    stop_background: CancellationToken,
    notifier: Arc<Notifier>,
}

impl Daemon {
    /// Opens the cache, starts the fleet link (it connects in the background and spools
    /// meanwhile), the API on `listeners`, the poller, the supervisor and the command handler.
    async fn start(config: &Config, listeners: Listeners, log: LogControl, notifier: Notifier) -> anyhow::Result<Daemon> {
        let usage = |p: Vec<String>| anyhow::anyhow!(p.join("\n"));
        let registry = config.registry.resolve().map_err(usage)?;
        let cache = config.cache.resolve().map_err(usage)?;
        let serve_settings = config.serve.resolve().map_err(usage)?;
        let fleet = config.fleet.resolve().map_err(usage)?;
        let (Some(url), Some(model)) = (registry.url.clone(), registry.model.clone()) else {
            anyhow::bail!("registry.url and registry.model are required by `edgeflow run`");
        };
        let load = config.load_options();
        let notifier = Arc::new(notifier);
        let store = {
            let c = cache.clone();
            let models = vec![model.clone()];
            tokio::task::spawn_blocking(move || Store::open_recovering(&c, &models))
                .await
                .context("opening the cache")?
                .with_context(|| format!("opening the cache in {}", cache.dir.display()))?
        };

        let metrics = Arc::new(Metrics::new());
        let drift = Recorder::new();
        let (publisher, status_rx) = status::channel();
        let manager = Manager::new(
            ManagerOptions {
                load: load.clone(),
                queue_depth: serve_settings.queue_depth,
                max_prompt_tokens: serve_settings.max_prompt_tokens,
                // The poller smoke-tested the version before activating it in the cache.
                smoke_test_tokens: 1,
                swap: serve_settings.swap,
                nice: config.engine.nice,
            },
            metrics.clone(),
        );
        let socket_path = listeners.socket_path().to_path_buf();

        let (bus, requests) = Bus::new(COMMAND_QUEUE);
        let stop_link = CancellationToken::new();
        let device_id = fleet.as_ref().map(|f| f.device_id.clone());
        let link = match fleet {
            Some(settings) => Some(
                Link::new(settings)
                    .metrics(metrics.clone())
                    .drift(drift.clone())
                    .cache_dir(cache.dir.clone())
                    .spawn(status_rx.clone(), bus.clone(), stop_link.clone())
                    .context("starting the fleet link")?,
            ),
            None => None,
        };
        let link_state = link.as_ref().map(LinkHandle::state);
        let link_sender = link.as_ref().map(LinkHandle::sender);
        if let (Some(r), Some(l)) = (store.recovered(), &link) {
            l.event(Event::DatabaseRecreated { database: "cache_index", quarantined_to: r.quarantined.as_ref().map(|p| p.display().to_string()), rebuilt: r.rebuilt.clone() });
        }

        let status_doc = status_document(status_rx.clone(), link_state, manager.clone(), serve_settings.queue_depth, socket_path.clone());
        let registry_metrics = metrics.registry_metrics.clone();
        let app = App::from_settings(manager.clone(), metrics, &serve_settings).with_drift(drift).with_status(status_doc);
        let stop_http = CancellationToken::new();
        let servers = listeners.serve(&app, &stop_http);

        // The registry side: the poller owns the cache's "active", the supervisor makes the
        // engine follow it, the handler turns commands into poller operations.
        let client = Client::new(&url, &registry, Auth::from_env()).context("configuring the registry client")?.with_metrics(registry_metrics);
        let puller = Puller::new(client, store.clone(), registry.parallel_downloads, registry.bandwidth_limit, load);
        let jitter = Jitter { interval: registry.poll_interval, jitter: registry.poll_jitter, phase: device_phase(&device_id.unwrap_or_else(machine_id)) };
        let poller = Poller::new(puller, model.clone(), registry.target.clone(), jitter).with_observer(pulled_events(&model, link_sender.clone()));
        let control = poller.control();
        let stop_background = CancellationToken::new();
        let background = TaskTracker::new();
        let (poller_task, polls) = poller.spawn(stop_background.clone());
        let target = target_label(&registry);
        let supervisor = Supervisor {
            model: model.clone(),
            target: target.clone(),
            store: store.clone(),
            manager: manager.clone(),
            control: control.clone(),
            publisher: publisher.clone(),
            events: link_sender.clone(),
            notifier: notifier.clone(),
        };
        background.spawn(supervisor.run(polls, stop_background.clone()));
        let handler = Handler { control: control.clone(), manager: manager.clone(), store: store.clone(), model: model.clone(), publisher, link: link_sender, log };
        background.spawn(handle_commands(handler, requests, background.clone(), stop_background.clone()));
        Ok(Daemon {
            model,
            target,
            socket_path,
            store,
            manager,
            status: status_rx,
            link,
            stop_link,
            servers,
            stop_http,
            control,
            poller_task,
            background,
            stop_background,
            notifier,
        })
    }

    /// Until a stop request: reloads, STATUS= lines, and the watchdog, which is fed only
    /// while the HTTP server answers its own /healthz and the engine is not stuck on one step
    /// (a template render or a forward pass past its allowance, see [`crate::engine::Heartbeat`]).
    async fn main_loop(&self, lifecycle: &Lifecycle, config_path: &Path, mut current: Config) {
        let link_state = self.link.as_ref().map(LinkHandle::state);
        let watchdog = self.notifier.watchdog();
        let mut watchdog_tick = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |w| w / 2));
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        let mut last_status = String::new();
        loop {
            tokio::select! {
                () = lifecycle.shutdown.cancelled() => break,
                () = lifecycle.reload.notified() => {
                    self.notifier.reloading();
                    let refused;
                    (current, refused) = reload::reload(config_path, current, &self.control).await;
                    let mut line = status_line(&self.status.borrow(), &self.manager, link_state.as_ref());
                    if !refused.is_empty() {
                        line = format!("reload refused for security settings ({}): restart to apply; {line}", refused.join(", "));
                        if let Some(link) = &self.link {
                            link.event(Event::ReloadRefused { settings: refused.iter().map(|s| s.to_string()).collect() });
                        }
                    }
                    self.notifier.ready(&line);
                }
                _ = watchdog_tick.tick(), if watchdog.is_some() => {
                    let limit = watchdog.unwrap_or_default() / 4;
                    match (probe(&self.socket_path, limit).await, self.manager.current().and_then(|a| a.stalled())) {
                        (Ok(()), None) => self.notifier.ping(),
                        (Err(e), _) => tracing::warn!(error = %e, "the API did not answer its own health check; not feeding the watchdog"),
                        (Ok(()), Some(overdue)) => tracing::error!(overdue_s = overdue.as_secs(), "the engine is stuck on one step past its allowance; not feeding the watchdog"),
                    }
                }
                _ = status_tick.tick() => {
                    let line = status_line(&self.status.borrow(), &self.manager, link_state.as_ref());
                    if line != last_status {
                        self.notifier.status(&line);
                        last_status = line;
                    }
                }
            }
        }
    }

    /// The one way out: no new requests and in-flight ones finish within the grace period,
    /// the poller and the handlers stop, the link says offline and flushes, the model unloads.
    async fn stop(mut self) {
        tracing::info!("stopping: no new requests; in-flight ones finish within the grace period");
        self.notifier.stopping("stopping: finishing in-flight requests");
        self.stop_http.cancel();
        self.servers.drain().await;
        self.stop_background.cancel();
        self.background.close();
        if tokio::time::timeout(Duration::from_secs(5), self.background.wait()).await.is_err() {
            tracing::warn!("background tasks did not stop within 5s; leaving them");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.poller_task).await;
        if let Some(link) = self.link {
            self.stop_link.cancel();
            match tokio::time::timeout(LINK_STOP, link.join()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "the fleet link task failed"),
                Err(_) => tracing::warn!("the fleet link did not stop within {}s", LINK_STOP.as_secs()),
            }
        }
        self.manager.deactivate().await;
        drop(self.store);
        self.servers.close();
        tracing::info!("stopped");
    }
}

/// Tells the fleet a version was pulled: every file is downloaded and verified once its smoke
/// test starts.
fn pulled_events(model: &str, sender: Option<LinkSender>) -> PullObserver {
    let model = model.to_string();
    Arc::new(move |e: &PullEvent| {
        if let (PullEvent::SmokeTest { version }, Some(s)) = (e, &sender) {
            s.event(Event::VersionPulled { model: model.clone(), version: version.clone(), digest: None });
        }
    })
}

/// Runs each command on its own task (a report must not wait behind a download) until stopped.
async fn handle_commands(handler: Handler, mut requests: mpsc::Receiver<Request>, tasks: TaskTracker, stop: CancellationToken) {
    loop {
        let request = tokio::select! {
            r = requests.recv() => match r { Some(r) => r, None => break },
            () = stop.cancelled() => break,
        };
        let h = handler.clone();
        tasks.spawn(async move {
            let outcome = h.handle(&request.command, &request.origin).await;
            request.respond(outcome);
        });
    }
}

/// What a device follows, as status reports name it: `stage:Production`, `alias:champion`.
pub fn target_label(r: &RegistrySettings) -> String {
    match &r.target {
        crate::config::Target::Stage(s) => format!("stage:{s}"),
        crate::config::Target::Alias(a) => format!("alias:{a}"),
    }
}

/// GET /healthz over our own socket, within `limit`: the watchdog is fed only while the
/// runtime accepts, routes and answers.
async fn probe(socket: &Path, limit: Duration) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let check = async {
        let mut s = tokio::net::UnixStream::connect(socket).await.map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: edgeflow\r\nConnection: close\r\n\r\n").await.map_err(|e| e.to_string())?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
        if &head == b"HTTP/1.1 200" {
            Ok(())
        } else {
            Err(format!("answered {:?}", String::from_utf8_lossy(&head)))
        }
    };
    tokio::time::timeout(limit.max(Duration::from_millis(100)), check).await.map_err(|_| format!("no answer within {}ms", limit.as_millis()))?
}
