//! `edgeflow fleet simulate`: many devices in one process, to size a broker and a registry
//! before a fleet meets them.
//!
//! Each simulated device runs the real device code on its side of the wire: its own cache
//! ([`Store`], sled and blobs in its own folder), the registry [`Poller`] and [`Puller`]
//! (polls with the device's own jitter, downloads, verification, activation, pins and
//! rollbacks), and the fleet [`Link`] (status, retained health, events, signed commands,
//! groups, spool). Only the engine is a stub: a pulled version's smoke test checks the
//! folder's layout instead of loading it, and the device "serves" whatever the poller
//! activates. So what the broker and the registry see from N simulated devices is what N
//! devices would send them, minus inference.
//!
//! ```text
//! Poller ──status──▶ follow() ──▶ status::Publisher ──▶ Link ──MQTT──▶ broker
//!    ▲                                                   │
//!    └──── Op (sync, pin, unpin, rollback) ◀── obey() ◀──┘ commands
//! ```
//!
//! Every `stats_every` it prints one JSON line: devices up, connected, the versions they
//! serve, registry requests so far, the process's memory and threads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{device_phase, Jitter};
use crate::cache::Store;
use crate::command::{Bus, Command, Request};
use crate::config::Config;
use crate::fleet::{Event, Link, LinkHandle, LinkSender};
use crate::pipeline::poller::{condition_text, Control, Op};
use crate::pipeline::pull::SmokeTest;
use crate::pipeline::{Poller, Puller, Status as PollStatus};
use crate::registry::{Auth, Client};
use crate::status::{ModelStatus, Publisher};
use crate::telemetry::metrics::RegistryMetrics;

/// Commands a simulated device holds before refusing more (as the daemon's queue).
const COMMAND_QUEUE: usize = 16;
/// How long a simulated device's link may take to say goodbye.
const LINK_STOP: Duration = Duration::from_secs(10);
/// Open files each simulated device needs at most: its MQTT and registry sockets, two sled
/// databases, downloads in flight.
const FILES_PER_DEVICE: u64 = 12;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    pub devices: usize,
    /// Device ids are this followed by the device's number.
    pub id_prefix: String,
    /// Each device's cache and spool live in `dir/<device id>/`.
    pub dir: PathBuf,
    /// Devices start evenly over this (a fleet powering on is not one instant).
    pub ramp: Duration,
    pub stats_every: Duration,
}

/// One simulated device's handles.
struct Device {
    link: LinkHandle,
    polls: watch::Receiver<PollStatus>,
}

/// What every device shares: the config it derives its own from, and the counters.
struct Fleet {
    config: Config,
    url: String,
    model: String,
    registry: crate::config::RegistrySettings,
    metrics: RegistryMetrics,
    started: Instant,
}

/// Runs `options.devices` simulated devices from `config` until `stop`, printing statistics.
///
/// # Errors
/// A config without a registry or a broker, or a device that cannot open its folder.
pub async fn run(config: Config, options: Options, stop: CancellationToken) -> anyhow::Result<()> {
    let registry = config.registry.resolve().map_err(|p| anyhow::anyhow!(p.join("\n")))?;
    let (Some(url), Some(model)) = (registry.url.clone(), registry.model.clone()) else {
        anyhow::bail!("registry.url and registry.model are required to simulate devices");
    };
    anyhow::ensure!(config.fleet.broker.is_some(), "fleet.broker is required to simulate devices");
    raise_open_files(options.devices as u64 * FILES_PER_DEVICE + 256);
    std::fs::create_dir_all(&options.dir).with_context(|| format!("creating {}", options.dir.display()))?;
    let fleet = Arc::new(Fleet { config, url, model, registry, metrics: RegistryMetrics::new(), started: Instant::now() });
    tracing::info!(devices = options.devices, dir = %options.dir.display(), ramp_s = options.ramp.as_secs(), "simulating devices");

    let mut devices: Vec<Device> = Vec::with_capacity(options.devices);
    let mut tasks = JoinSet::new();
    let mut stats = tokio::time::interval(options.stats_every);
    let step = options.ramp.checked_div(u32::try_from(options.devices).unwrap_or(u32::MAX)).unwrap_or_default();
    let mut next_start = Instant::now();
    loop {
        let starting = devices.len() < options.devices;
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = stats.tick() => println!("{}", statistics(&fleet, &devices)),
            () = tokio::time::sleep_until(next_start), if starting => {
                let id = format!("{}{:05}", options.id_prefix, devices.len());
                let device = start(&fleet, &id, &options.dir.join(&id), &mut tasks, &stop).await.with_context(|| format!("starting simulated device {id}"))?;
                devices.push(device);
                next_start += step;
            }
        }
    }
    tracing::info!("stopping the simulated devices");
    let mut links = JoinSet::new();
    let polls: Vec<_> = devices.iter().map(|d| d.polls.clone()).collect();
    for d in devices {
        links.spawn(tokio::time::timeout(LINK_STOP, d.link.join()));
    }
    let mut late = 0;
    while let Some(r) = links.join_next().await {
        late += usize::from(!matches!(r, Ok(Ok(Ok(())))));
    }
    tasks.shutdown().await;
    let mut last = statistics(&fleet, &[]);
    last["devices"] = json!(polls.len());
    last["versions"] = versions(polls.iter());
    last["links_not_stopped_in_time"] = json!(late);
    println!("{last}");
    Ok(())
}

/// Opens a device's cache, starts its link, poller and the two stub tasks.
async fn start(fleet: &Arc<Fleet>, id: &str, dir: &Path, tasks: &mut JoinSet<()>, stop: &CancellationToken) -> anyhow::Result<Device> {
    let usage = |p: Vec<String>| anyhow::anyhow!(p.join("\n"));
    let mut cache = fleet.config.cache.clone();
    cache.dir = Some(dir.join("cache"));
    let cache = cache.resolve().map_err(usage)?;
    let store = tokio::task::spawn_blocking(move || Store::open(&cache)).await.context("opening the cache")??;
    let mut link = fleet.config.fleet.clone();
    link.device_id = Some(id.to_string());
    link.spool_dir = Some(dir.join("spool"));
    let link = link.resolve().map_err(usage)?.context("fleet.broker is required")?;

    let (publisher, status) = crate::status::channel();
    let (bus, requests) = Bus::new(COMMAND_QUEUE);
    let link = Link::new(link).cache_dir(dir.to_path_buf()).spawn(status, bus, stop.clone())?;
    let r = &fleet.registry;
    let client = Client::new(&fleet.url, r, Auth::from_env())?.with_metrics(fleet.metrics.clone());
    let puller =
        Puller::new(client, store, r.parallel_downloads, r.bandwidth_limit, crate::engine::LoadOptions::default()).with_smoke_test(SmokeTest::Check(Arc::new(check_layout)));
    let jitter = Jitter { interval: r.poll_interval, jitter: r.poll_jitter, phase: device_phase(id) };
    let poller = Poller::new(puller, fleet.model.clone(), r.target.clone(), jitter);
    let control = poller.control();
    let (poller_task, polls) = poller.spawn(stop.clone());
    tasks.spawn(async move {
        let _ = poller_task.await;
    });
    tasks.spawn(follow(polls.clone(), publisher, link.sender(), fleet.model.clone(), crate::app::target_label(r), stop.clone()));
    tasks.spawn(obey(requests, control, link.sender(), stop.clone()));
    Ok(Device { link, polls })
}

/// The stub engine: serves at once whatever the poller activates, and tells the fleet as
/// the daemon's supervisor does.
async fn follow(mut polls: watch::Receiver<PollStatus>, publisher: Publisher, events: LinkSender, model: String, target: String, stop: CancellationToken) {
    let mut previous: Option<PollStatus> = None;
    loop {
        let current = polls.borrow_and_update().clone();
        publisher.update(|s| {
            s.registry = Some((&current).into());
            s.pinned.clone_from(&current.pinned);
            let serving = s.model.as_ref().map(|m| m.version.as_str());
            let active = current.active.as_ref().map(|a| a.version.as_str());
            if serving != active {
                s.model = current.active.as_ref().map(|a| ModelStatus {
                    name: model.clone(),
                    version: a.version.clone(),
                    digest: None,
                    target: Some(if current.pinned.is_some() { format!("pinned:{}", a.version) } else { target.clone() }),
                    activated_at: Some(crate::util::unix_now()),
                    dir: None,
                });
            }
        });
        if let Some(event) = Event::from_poll(previous.as_ref(), &current) {
            events.event(event);
        }
        previous = Some(current);
        tokio::select! {
            changed = polls.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
    }
}

/// The stub command handler: registry commands become poller operations as in the daemon;
/// `reload` has no engine to reload.
async fn obey(mut requests: mpsc::Receiver<Request>, control: Control, link: LinkSender, stop: CancellationToken) {
    let mut running = JoinSet::new();
    loop {
        let request = tokio::select! {
            r = requests.recv() => match r { Some(r) => r, None => break },
            () = stop.cancelled() => break,
            Some(_) = running.join_next(), if !running.is_empty() => continue,
        };
        let (control, link) = (control.clone(), link.clone());
        running.spawn(async move {
            let op = |op: Op| control.call(op);
            let outcome = match &request.command {
                Command::Sync { .. } => answer(op(Op::Sync).await),
                Command::Pin { version } => answer(op(Op::Pin(version.clone())).await),
                Command::Unpin => answer(op(Op::Unpin).await),
                Command::Rollback => answer(op(Op::Rollback { reason: "rolled back by a fleet command".into() }).await),
                Command::Reload => Err("a simulated device has no engine to reload".to_string()),
                Command::Report => {
                    link.report_now();
                    Ok(json!({}))
                }
                Command::Set(s) => match s.poll_interval {
                    Some(d) => op(Op::Interval(d)).await.map(|_| json!({ "poll_interval": humantime::format_duration(d).to_string() })),
                    None => Ok(json!({})),
                },
            };
            request.respond(outcome);
        });
    }
    running.shutdown().await;
}

/// A poller operation's answer, as the daemon gives it once the engine serves the result.
fn answer(result: crate::pipeline::poller::OpResult) -> crate::command::Outcome {
    let status = result?;
    Ok(json!({ "version": status.active.map(|a| a.version), "registry": condition_text(&status.condition), "pinned": status.pinned }))
}

/// The stub smoke test: the folder has the ONNX GenAI layout (a `genai_config.json` naming
/// a decoder file that is there, and a tokenizer).
fn check_layout(dir: &Path) -> Result<(), String> {
    let config = std::fs::read_to_string(dir.join("genai_config.json")).map_err(|e| format!("reading genai_config.json: {e}"))?;
    let decoder = crate::registry::mlmodel::decoder_filename(&config).ok_or("genai_config.json names no decoder file")?;
    for file in [decoder.as_str(), "tokenizer.json"] {
        if !dir.join(file).is_file() {
            return Err(format!("{file} is missing"));
        }
    }
    Ok(())
}

/// One statistics line.
fn statistics(fleet: &Fleet, devices: &[Device]) -> Value {
    let connected = devices.iter().filter(|d| d.link.state().borrow().connected).count();
    let proc = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| proc.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse::<u64>().ok());
    json!({
        "t": (fleet.started.elapsed().as_millis() as f64 / 1000.0),
        "devices": devices.len(),
        "connected": connected,
        "versions": versions(devices.iter().map(|d| &d.polls)),
        "registry_api": fleet.metrics.requests_of("api"),
        "registry_download": fleet.metrics.requests_of("download"),
        "rss_kb": field("VmRSS:"),
        "threads": field("Threads:"),
    })
}

/// How many devices serve each version (`none`: nothing yet).
fn versions<'a>(polls: impl Iterator<Item = &'a watch::Receiver<PollStatus>>) -> Value {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for p in polls {
        let v = p.borrow().active.as_ref().map_or_else(|| "none".to_string(), |a| a.version.clone());
        *counts.entry(v).or_default() += 1;
    }
    json!(counts)
}

/// Raises the soft limit on open files towards `want` (up to the hard limit), warning when
/// even that is short.
fn raise_open_files(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let new = want.min(hard).max(soft);
    if new > soft {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, new, hard) {
            tracing::warn!(error = %e, "could not raise the open-files limit");
        }
    }
    if new < want {
        tracing::warn!(limit = new, want, "the open-files limit may be too low for this many devices; raise it (ulimit -Hn)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stub_smoke_test_checks_the_genai_layout() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_layout(dir.path()).unwrap_err().contains("genai_config.json"));
        std::fs::write(dir.path().join("genai_config.json"), r#"{"model": {"decoder": {"filename": "model.onnx"}}}"#).unwrap();
        assert_eq!(check_layout(dir.path()).unwrap_err(), "model.onnx is missing");
        std::fs::write(dir.path().join("model.onnx"), b"x").unwrap();
        assert_eq!(check_layout(dir.path()).unwrap_err(), "tokenizer.json is missing");
        std::fs::write(dir.path().join("tokenizer.json"), b"{}").unwrap();
        assert_eq!(check_layout(dir.path()), Ok(()));
        std::fs::write(dir.path().join("genai_config.json"), "not json").unwrap();
        assert!(check_layout(dir.path()).is_err());
    }
}
