//! The daemon, `edgeflow run`: every subsystem wired into one process with one way out.
//!
//! ```text
//!  registry::Poller ──status──▶ supervisor ──ensure──▶ active::Manager ──▶ serve (socket)
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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::active::{Manager, ManagerOptions, ModelSource};
use crate::backoff::{device_phase, machine_id, Jitter};
use crate::cache::Store;
use crate::command::{Bus, Command, Origin, Outcome};
use crate::config::{Config, RegistrySettings};
use crate::fleet::{Event, Link, LinkSender, LinkState};
use crate::notify::Notifier;
use crate::registry::poller::{condition_text, Control, Op};
use crate::registry::pull::{PullEvent, PullObserver};
use crate::registry::{Auth, Client, Poller, Puller, Status as PollStatus};
use crate::serve::{self, App};
use crate::status::{self, LoadFailure, ModelStatus, Publisher, Status};
use crate::telemetry::drift::Recorder;
use crate::telemetry::Metrics;

/// Changes the log filter while running (the fleet's `set {log_level}`).
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Commands waiting for the handler, at most.
const COMMAND_QUEUE: usize = 16;
/// How long a command waits for the engine to serve the version it brought.
const SERVE_WAIT: Duration = Duration::from_secs(15 * 60);
/// How long the fleet link may take to say goodbye and flush.
const LINK_STOP: Duration = Duration::from_secs(10);
/// How often STATUS= is refreshed (only sent when it changed).
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Runs the daemon until SIGTERM or SIGINT. `config` has passed
/// [`Config::daemon_problems`].
///
/// # Errors
/// Start-up failures only (cache locked or unreadable, socket in use, registry client
/// misconfigured); once running, failures are reported and the daemon keeps serving.
pub async fn run(config: Config, config_path: PathBuf, log: LogControl, notifier: Notifier) -> anyhow::Result<()> {
    let usage = |p: Vec<String>| anyhow::anyhow!(p.join("\n"));
    let registry = config.registry.resolve().map_err(usage)?;
    let cache = config.cache.resolve().map_err(usage)?;
    let serve_settings = config.serve.resolve().map_err(usage)?;
    let fleet = config.fleet.resolve().map_err(usage)?;
    let (Some(url), Some(model)) = (registry.url.clone(), registry.model.clone()) else {
        anyhow::bail!("registry.url and registry.model are required by `edgeflow run`");
    };
    let load = config.engine.load_options(&config.serve);
    let notifier = Arc::new(notifier);

    let store = {
        let c = cache.clone();
        tokio::task::spawn_blocking(move || Store::open(&c)).await.context("opening the cache")?.with_context(|| format!("opening the cache in {}", cache.dir.display()))?
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

    // The socket first: /healthz answers while the model loads, generation gets 503.
    let (listener, socket_file) = match serve::from_systemd().context("taking the socket systemd passed")? {
        Some(listener) => (listener, None),
        None => {
            let (listener, file) = serve::bind(&serve_settings.socket).context("binding the API socket")?;
            (listener, Some(file))
        }
    };
    // Our own socket is bound under a temporary name and renamed into place.
    let socket_path = match &socket_file {
        Some(f) => f.path().to_path_buf(),
        None => listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)).unwrap_or_else(|| serve_settings.socket.path.clone()),
    };
    let tcp = match serve_settings.tcp_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?),
        None => None,
    };

    // The fleet link, when configured: it connects in the background and spools meanwhile.
    let (bus, mut requests) = Bus::new(COMMAND_QUEUE);
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
    let link_state = link.as_ref().map(|l| l.state());
    let link_sender = link.as_ref().map(|l| l.sender());

    let app = App::from_settings(manager.clone(), metrics.clone(), &serve_settings).with_drift(drift.clone()).with_status(status_document(
        status_rx.clone(),
        link_state.clone(),
        manager.clone(),
        serve_settings.queue_depth,
        socket_path.clone(),
    ));
    let stop_http = CancellationToken::new();
    let servers = TaskTracker::new();
    servers.spawn(serve::run(listener, app.clone(), stop_http.clone()));
    if let Some(tcp) = tcp {
        servers.spawn(serve::run_tcp(tcp, app.clone(), stop_http.clone()));
    }
    servers.close();

    // The registry side.
    let client = Client::new(&url, &registry, Auth::from_env()).context("configuring the registry client")?;
    let puller = Puller::new(client, store.clone(), registry.parallel_downloads, registry.bandwidth_limit, load);
    let jitter = Jitter { interval: registry.poll_interval, jitter: registry.poll_jitter, phase: device_phase(&device_id.clone().unwrap_or_else(machine_id)) };
    let observer: PullObserver = {
        let sender = link_sender.clone();
        let model = model.clone();
        Arc::new(move |e: &PullEvent| {
            // Every file is downloaded and verified once the smoke test starts.
            if let (PullEvent::SmokeTest { version }, Some(s)) = (e, &sender) {
                s.event(Event::VersionPulled { model: model.clone(), version: version.clone(), digest: None });
            }
        })
    };
    let poller = Poller::new(puller, model.clone(), registry.target.clone(), jitter).with_observer(observer);
    let control = poller.control();
    let stop_background = CancellationToken::new();
    let background = TaskTracker::new();
    let (poller_task, polls) = poller.spawn(stop_background.clone());
    let supervisor = Supervisor {
        model: model.clone(),
        target: target_label(&registry),
        store: store.clone(),
        manager: manager.clone(),
        control: control.clone(),
        publisher: publisher.clone(),
        events: link_sender.clone(),
        notifier: notifier.clone(),
    };
    background.spawn(supervisor.run(polls, stop_background.clone()));
    let handler =
        Handler { control: control.clone(), manager: manager.clone(), store: store.clone(), model: model.clone(), publisher: publisher.clone(), link: link_sender.clone(), log };
    {
        let stop = stop_background.clone();
        let tracker = background.clone();
        background.spawn(async move {
            loop {
                let request = tokio::select! {
                    r = requests.recv() => match r { Some(r) => r, None => break },
                    () = stop.cancelled() => break,
                };
                // Each command on its own task: a report must not wait behind a download.
                let h = handler.clone();
                tracker.spawn(async move {
                    let outcome = h.handle(&request.command, &request.origin).await;
                    request.respond(outcome);
                });
            }
        });
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %config_path.display(), socket = %socket_path.display(), %model, target = %target_label(&registry), cache = %cache.dir.display(), fleet = link.is_some(), "edgeflow run started");

    // The main loop: signals, STATUS= lines and the watchdog, which is fed only while the
    // HTTP server answers its own /healthz.
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let watchdog = notifier.watchdog();
    let mut watchdog_tick = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |w| w / 2));
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    let mut last_status = String::new();
    let mut current = config;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                notifier.reloading();
                current = reload(&config_path, current, &control).await;
                notifier.ready(&status_line(&status_rx.borrow(), &manager, link_state.as_ref()));
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                let limit = watchdog.unwrap_or_default() / 4;
                match probe(&socket_path, limit).await {
                    Ok(()) => notifier.ping(),
                    Err(e) => tracing::warn!(error = %e, "the API did not answer its own health check; not feeding the watchdog"),
                }
            }
            _ = status_tick.tick() => {
                let line = status_line(&status_rx.borrow(), &manager, link_state.as_ref());
                if line != last_status {
                    notifier.status(&line);
                    last_status = line;
                }
            }
        }
    }

    // One way out.
    tracing::info!("stopping: no new requests; in-flight ones finish within the grace period");
    notifier.stopping("stopping: finishing in-flight requests");
    stop_http.cancel();
    servers.wait().await;
    stop_background.cancel();
    background.close();
    if tokio::time::timeout(Duration::from_secs(5), background.wait()).await.is_err() {
        tracing::warn!("background tasks did not stop within 5s; leaving them");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), poller_task).await;
    if let Some(link) = link {
        stop_link.cancel();
        match tokio::time::timeout(LINK_STOP, link.join()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the fleet link task failed"),
            Err(_) => tracing::warn!("the fleet link did not stop within {}s", LINK_STOP.as_secs()),
        }
    }
    manager.deactivate().await;
    drop(store);
    drop(socket_file);
    tracing::info!("stopped");
    Ok(())
}

fn target_label(r: &RegistrySettings) -> String {
    match &r.target {
        crate::config::Target::Stage(s) => format!("stage:{s}"),
        crate::config::Target::Alias(a) => format!("alias:{a}"),
    }
}

/// Makes the engine follow the poller and keeps the shared status up to date.
struct Supervisor {
    model: String,
    target: String,
    store: Store,
    manager: Manager,
    control: Control,
    publisher: Publisher,
    events: Option<LinkSender>,
    notifier: Arc<Notifier>,
}

impl Supervisor {
    async fn run(self, mut polls: watch::Receiver<PollStatus>, stop: CancellationToken) {
        let mut previous: Option<PollStatus> = None;
        let mut ready = false;
        loop {
            let current = polls.borrow_and_update().clone();
            self.publisher.update(|s| {
                s.registry = Some((&current).into());
                s.pinned = current.pinned.clone();
            });
            if let (Some(event), Some(events)) = (Event::from_poll(previous.as_ref(), &current), &self.events) {
                events.event(event);
            }
            if let Some(active) = &current.active {
                let source = ModelSource { dir: active.dir.clone(), name: self.model.clone(), version: active.version.clone(), digest: self.digest(&active.version) };
                let ensured = tokio::select! {
                    r = self.manager.ensure(source.clone()) => r,
                    () = stop.cancelled() => return,
                };
                match ensured {
                    Ok(info) => {
                        let target = if current.pinned.is_some() { format!("pinned:{}", info.version) } else { self.target.clone() };
                        self.publisher.update(|s| {
                            s.model = Some(ModelStatus {
                                name: info.name.clone(),
                                version: info.version.clone(),
                                digest: info.digest.clone(),
                                target: Some(target),
                                activated_at: info.activated_at.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs()),
                                dir: Some(info.dir.clone()),
                            });
                        });
                    }
                    Err(e) => {
                        let reason = crate::registry::chain(&e);
                        tracing::error!(version = %source.version, %reason, "the engine cannot serve this version; going back to the last-known-good one");
                        self.publisher.update(|s| s.load_failure = Some(LoadFailure { version: source.version.clone(), reason: reason.clone(), at: status::unix_now() }));
                        if let Some(events) = &self.events {
                            events.event(Event::SmokeTestFailed { model: self.model.clone(), version: source.version.clone(), reason: reason.clone() });
                        }
                        // The poller's answer arrives as a new status on `polls`.
                        if let Err(e) = self.control.call(Op::Reject { version: source.version.clone(), reason }).await {
                            tracing::error!(error = %e, "could not go back to the last-known-good version");
                        }
                    }
                }
            }
            if current.cache_read && !ready {
                ready = true;
                let line = match self.manager.current() {
                    Some(a) => format!("serving {}@{}", a.info().name, a.info().version),
                    None if current.active.is_none() => format!("waiting for the first version of {} ({})", self.model, self.target),
                    None => "no model could be loaded; see the logs".to_string(),
                };
                tracing::info!(status = %line, "ready");
                self.notifier.ready(&line);
            }
            previous = Some(current);
            tokio::select! {
                changed = polls.changed() => if changed.is_err() { return },
                () = stop.cancelled() => return,
            }
        }
    }

    fn digest(&self, version: &str) -> Option<String> {
        match self.store.version(&self.model, version) {
            Ok(Some(rec)) => Some(rec.digest()),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "reading the version's record");
                None
            }
        }
    }
}

/// Carries out commands (from the fleet link, or any later front end).
#[derive(Clone)]
struct Handler {
    control: Control,
    manager: Manager,
    store: Store,
    model: String,
    publisher: Publisher,
    link: Option<LinkSender>,
    log: LogControl,
}

impl Handler {
    async fn handle(&self, command: &Command, origin: &Origin) -> Outcome {
        tracing::info!(command = command.name(), ?origin, "command");
        let who = match origin {
            Origin::Fleet { request_id } => format!("fleet command {request_id}"),
            Origin::Local => "local command".to_string(),
        };
        match command {
            Command::Sync => self.then_serve(self.control.call(Op::Sync).await).await,
            Command::Pin { version } => self.then_serve(self.control.call(Op::Pin(version.clone())).await).await,
            Command::Unpin => self.then_serve(self.control.call(Op::Unpin).await).await,
            Command::Rollback => self.then_serve(self.control.call(Op::Rollback { reason: format!("rolled back by {who}") }).await).await,
            Command::Reload => {
                let status = self.control.call(Op::Verify).await?;
                let active = status.active.ok_or("no version is cached")?;
                let digest = self.store.version(&self.model, &active.version).ok().flatten().map(|r| r.digest());
                let source = ModelSource { dir: active.dir, name: self.model.clone(), version: active.version, digest };
                let info = self.manager.activate(source).await.map_err(|e| crate::registry::chain(&e))?;
                Ok(json!({ "version": info.version, "load_ms": info.load_time.as_millis() as u64 }))
            }
            Command::Report => match &self.link {
                Some(l) => {
                    l.report_now();
                    Ok(json!({}))
                }
                None => Err("no fleet link is configured".to_string()),
            },
            Command::Set(settings) => {
                let mut applied = serde_json::Map::new();
                if let Some(d) = settings.poll_interval {
                    self.control.call(Op::Interval(d)).await?;
                    applied.insert("poll_interval".into(), json!(humantime::format_duration(d).to_string()));
                }
                if let Some(level) = &settings.log_level {
                    (self.log)(level)?;
                    applied.insert("log_level".into(), json!(level));
                }
                Ok(Value::Object(applied))
            }
        }
    }

    /// Answers a poller operation once the engine serves the version it left active (or
    /// has refused it), so a command's `succeeded` means requests get that version.
    async fn then_serve(&self, result: crate::registry::poller::OpResult) -> Outcome {
        let status = result?;
        let Some(active) = status.active else {
            return Ok(json!({ "active": null, "registry": condition_text(&status.condition) }));
        };
        let mut rx = self.publisher.subscribe();
        let waited = tokio::time::timeout(SERVE_WAIT, async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if s.model.as_ref().is_some_and(|m| m.version == active.version) {
                        return Ok(());
                    }
                    if let Some(f) = s.load_failure.as_ref().filter(|f| f.version == active.version) {
                        return Err(format!("version {} passed its smoke test but the engine refused it: {}", f.version, f.reason));
                    }
                }
                if rx.changed().await.is_err() {
                    return Err("the daemon is stopping".to_string());
                }
            }
        })
        .await;
        match waited {
            Ok(Ok(())) => Ok(json!({ "version": active.version, "registry": condition_text(&status.condition), "pinned": status.pinned })),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("version {} is active in the cache but the engine did not serve it within {}s", active.version, SERVE_WAIT.as_secs())),
        }
    }
}

/// What `GET /status` (and so `edgeflow status`) shows.
fn status_document(status: watch::Receiver<Status>, link: Option<watch::Receiver<LinkState>>, manager: Manager, queue_capacity: usize, socket: PathBuf) -> serve::StatusFn {
    Arc::new(move || {
        let s = status.borrow().clone();
        let serving = manager.current().map(|a| {
            let i = a.info();
            json!({ "name": i.name, "version": i.version, "digest": i.digest, "context_length": i.context_length, "load_ms": i.load_time.as_millis() as u64, "healthy": a.is_healthy(), "queued": a.queued() })
        });
        let fleet = link.as_ref().map(|l| {
            let l = l.borrow();
            json!({ "connected": l.connected, "protocol": l.protocol, "reconnects": l.reconnects, "spool_depth": l.spool_depth, "spool_dropped": l.spool_dropped, "delivered": l.delivered, "last_error": l.last_error, "commands_accepted": l.commands_accepted, "commands_refused": l.commands_refused })
        });
        json!({
            "agent_version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_s": status::unix_now().saturating_sub(s.started_at),
            "socket": socket,
            "model": s.model,
            "serving": serving,
            "queue_capacity": queue_capacity,
            "swapping": manager.is_swapping(),
            "registry": s.registry,
            "pinned": s.pinned,
            "load_failure": s.load_failure,
            "fleet": fleet,
        })
    })
}

/// One line for systemd's STATUS=.
fn status_line(s: &Status, manager: &Manager, link: Option<&watch::Receiver<LinkState>>) -> String {
    let model = match manager.current() {
        Some(a) => format!("serving {}@{}, queue {}", a.info().name, a.info().version, a.queued()),
        None if manager.is_swapping() => "swapping models".to_string(),
        None => "no model loaded".to_string(),
    };
    let registry = s.registry.as_ref().map_or_else(|| "registry: not polled yet".to_string(), |r| format!("registry: {}", r.outcome));
    let pinned = s.pinned.as_ref().map(|p| format!(", pinned to {p}")).unwrap_or_default();
    let fleet = match link {
        Some(l) if l.borrow().connected => ", fleet: connected".to_string(),
        Some(l) => format!(", fleet: offline ({} spooled)", l.borrow().spool_depth),
        None => String::new(),
    };
    format!("{model}; {registry}{pinned}{fleet}")
}

/// SIGHUP: re-reads the config file and applies what can change while running (the poll
/// interval, then a poll); everything else is reported as needing a restart. A file that
/// does not load keeps the running config.
async fn reload(path: &Path, running: Config, control: &Control) -> Config {
    let fresh = match Config::load_for_daemon(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: the config file does not load; keeping the running config");
            return running;
        }
    };
    let (Ok(old), Ok(new)) = (running.registry.resolve(), fresh.registry.resolve()) else { return running };
    if old.poll_interval != new.poll_interval {
        match control.call(Op::Interval(new.poll_interval)).await {
            Ok(_) => tracing::info!(poll_interval = %humantime::format_duration(new.poll_interval), "SIGHUP: poll interval changed"),
            Err(e) => tracing::warn!(error = %e, "SIGHUP: could not change the poll interval"),
        }
    }
    let mut restart = Vec::new();
    let same_registry = RegistrySettingsView::from(&old) == RegistrySettingsView::from(&new);
    if !same_registry {
        restart.push("registry (except poll_interval)");
    }
    for (name, a, b) in [
        ("engine", format!("{:?}", running.engine), format!("{:?}", fresh.engine)),
        ("cache", format!("{:?}", running.cache), format!("{:?}", fresh.cache)),
        ("serve", format!("{:?}", running.serve), format!("{:?}", fresh.serve)),
        ("fleet", format!("{:?}", running.fleet), format!("{:?}", fresh.fleet)),
    ] {
        if a != b {
            restart.push(name);
        }
    }
    if !restart.is_empty() {
        tracing::warn!(sections = %restart.join(", "), "SIGHUP: these changes take effect at the next restart");
    }
    if let Err(e) = control.call(Op::Sync).await {
        tracing::warn!(error = %e, "SIGHUP: poll failed");
    }
    // Keep what runs: the sections that need a restart stay as they are until then.
    let mut kept = running;
    kept.registry.poll_interval = fresh.registry.poll_interval.clone();
    kept
}

/// The registry settings that need a restart to change, for comparison.
#[derive(PartialEq)]
struct RegistrySettingsView(String);

impl From<&RegistrySettings> for RegistrySettingsView {
    fn from(r: &RegistrySettings) -> Self {
        RegistrySettingsView(format!("{:?} {:?} {:?} {:?} {:?} {:?} {:?}", r.url, r.model, r.target, r.ca_bundle, r.parallel_downloads, r.bandwidth_limit, r.poll_jitter))
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

/// Reads the running daemon's `/status` over its socket (`edgeflow status`).
///
/// # Errors
/// The socket cannot be reached or the answer is not a status document.
pub fn fetch_status(socket: &Path, token: Option<&str>, timeout: Duration) -> anyhow::Result<Value> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {} (is `edgeflow run` running, and may this user use its socket?)", socket.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET /status HTTP/1.1\r\nHost: edgeflow\r\n{auth}Connection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.take(4 << 20).read_to_end(&mut raw).context("reading the answer")?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("not an HTTP answer"))?;
    let code = head.split_whitespace().nth(1).unwrap_or("?");
    if code != "200" {
        anyhow::bail!("{} answered {code}: {}", socket.display(), body.trim());
    }
    serde_json::from_str(body).context("the answer is not JSON")
}
