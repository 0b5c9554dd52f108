//! `edgeflow pull` (one pull into the cache, with a progress bar) and `edgeflow cache ls|verify|gc|path`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::{self, Store};
use crate::config::{CacheSettings, Config};
use crate::fetch::{self, Progress};
use crate::pipeline::{PullEvent, Puller};
use crate::registry::{Auth, Client};
use anyhow::Context;
use clap::{Args, Subcommand};

use super::UsageError;

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Ok(Config::default()),
    }
}

fn usage(problems: Vec<String>) -> anyhow::Error {
    UsageError(problems.join("\n")).into()
}

pub fn pull(args: PullArgs) -> anyhow::Result<()> {
    let mut config = load_config(args.config.as_ref())?;
    if let Some(u) = args.registry_url {
        config.registry.url = Some(u);
    }
    if let Some(m) = args.model {
        config.registry.model = Some(m);
    }
    if let Some(s) = args.stage {
        config.registry.stage = Some(s);
        config.registry.alias = None;
    }
    if let Some(a) = args.alias {
        config.registry.alias = Some(a);
        config.registry.stage = None;
    }
    if let Some(d) = args.cache_dir {
        config.cache.dir = Some(d);
    }
    let registry = config.registry.resolve().map_err(usage)?;
    let cache_settings = config.cache.resolve().map_err(usage)?;
    let url = registry.url.clone().ok_or_else(|| UsageError("no registry: pass --registry-url, set MLFLOW_TRACKING_URI or registry.url".into()))?;
    let model = registry.model.clone().ok_or_else(|| UsageError("no model: pass --model or set registry.model".into()))?;
    let target = registry.target.clone();
    let load_options = config.load_options();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        let client = Client::new(&url, &registry, Auth::from_env())?;
        let store = {
            let s = cache_settings.clone();
            tokio::task::spawn_blocking(move || Store::open(&s)).await??
        };
        let puller = Puller::new(client, store, registry.parallel_downloads, registry.bandwidth_limit, load_options);
        let progress = Arc::new(Progress::default());
        let terminal = std::io::stderr().is_terminal();
        let started = Instant::now();
        // The download phase is timed on its own (plan to smoke test) for benchmarks.
        let fetch_started = std::sync::Mutex::new(None::<Instant>);
        let counters = progress.clone();
        let observer: crate::pipeline::pull::PullObserver = Arc::new(move |e: &PullEvent| {
            report(e, terminal);
            match e {
                PullEvent::Planned { .. } => *fetch_started.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now()),
                PullEvent::SmokeTest { .. } => {
                    if let Some(t) = fetch_started.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        let bytes = counters.done.load(Ordering::Relaxed).saturating_sub(counters.resumed.load(Ordering::Relaxed));
                        let secs = t.elapsed().as_secs_f64();
                        eprintln!("downloaded and verified {} in {secs:.2}s ({}/s)", human_bytes(bytes), human_bytes((bytes as f64 / secs.max(1e-9)) as u64));
                    }
                }
                _ => {}
            }
        });
        let bar = terminal.then(|| tokio::spawn(draw_bar(progress.clone())));
        let result = puller.pull(&model, &target, observer, progress.clone(), true).await;
        if let Some(bar) = bar {
            bar.abort();
            eprint!("\r\x1b[2K");
        }
        let outcome = result?;
        let downloaded = progress.done.load(Ordering::Relaxed).saturating_sub(progress.resumed.load(Ordering::Relaxed));
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "model {} version {} active ({}; {} downloaded in {:.1}s)",
            outcome.model,
            outcome.version,
            match &outcome.change {
                crate::pipeline::pull::Change::Unchanged => "already active, verified".to_string(),
                crate::pipeline::pull::Change::Activated { previous: Some(p), .. } => format!("was {p}"),
                crate::pipeline::pull::Change::Activated { previous: None, .. } => "first version".to_string(),
                crate::pipeline::pull::Change::Repaired { files } => format!("repaired {}", files.join(", ")),
            },
            human_bytes(downloaded),
            secs
        );
        println!("{}", outcome.dir.display());
        Ok(())
    })
}

fn report(e: &PullEvent, terminal: bool) {
    let line = match e {
        PullEvent::Resolved { version } => format!("registry: {} version {} (status {}, source {})", version.name, version.version, version.status, version.source),
        PullEvent::Planned { flavor, files, bytes, to_download } => {
            format!("plan: {files} files, {} ({flavor} flavor), {} to download", human_bytes(*bytes), human_bytes(*to_download))
        }
        PullEvent::Fetch(fetch::Event::Started { name, resume_from, size }) if *resume_from > 0 => {
            format!("resuming {name} at {} of {}", human_bytes(*resume_from), human_bytes(*size))
        }
        PullEvent::Fetch(fetch::Event::Started { .. }) => return,
        PullEvent::Fetch(fetch::Event::Retrying { name, error, delay, at }) => format!("{name}: {error}; resuming at byte {at} in {:.1}s", delay.as_secs_f64()),
        PullEvent::Fetch(fetch::Event::Finished { name, size, sha256 }) => {
            if terminal {
                return;
            }
            format!("fetched {name} ({}, sha256 {})", human_bytes(*size), &sha256[..16])
        }
        PullEvent::Repairing { version, files } => format!("version {version}: damaged files {}; fetching them again", files.join(", ")),
        PullEvent::SmokeTest { version } => format!("smoke test of version {version}"),
        PullEvent::Activated { version, dir } => format!("activated version {version}: {}", dir.display()),
    };
    if terminal {
        eprint!("\r\x1b[2K");
    }
    eprintln!("{line}");
}

async fn draw_bar(p: Arc<Progress>) {
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let mut rate = 0.0f64;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (total, done, resumed) = (p.total.load(Ordering::Relaxed), p.done.load(Ordering::Relaxed), p.resumed.load(Ordering::Relaxed));
        if total == 0 {
            continue;
        }
        let now = Instant::now();
        let dt = now.duration_since(last.0).as_secs_f64();
        let inst = done.saturating_sub(last.1) as f64 / dt.max(1e-3);
        rate = if rate == 0.0 { inst } else { 0.7 * rate + 0.3 * inst };
        last = (now, done);
        let width = 30usize;
        let filled = ((done as f64 / total as f64) * width as f64).round() as usize;
        let eta = if rate > 0.0 { format!("{:.0}s", total.saturating_sub(done) as f64 / rate) } else { "?".into() };
        let _ = resumed;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K[{}{}] {} / {}  {}/s  eta {}  ({:.0}s)",
            "#".repeat(filled.min(width)),
            "-".repeat(width - filled.min(width)),
            human_bytes(done),
            human_bytes(total),
            human_bytes(rate as u64),
            eta,
            started.elapsed().as_secs_f64()
        );
        let _ = err.flush();
    }
}

fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn cache_settings(args: &CacheArgs) -> anyhow::Result<(CacheSettings, Option<String>)> {
    let mut config = load_config(args.config.as_ref())?;
    if let Some(d) = &args.cache_dir {
        config.cache.dir = Some(d.clone());
    }
    let settings = config.cache.resolve().map_err(usage)?;
    Ok((settings, args.model.clone().or(config.registry.model.clone())))
}

pub fn cache(cmd: CacheCommand) -> anyhow::Result<()> {
    match cmd {
        CacheCommand::Path(args) => path(&args),
        CacheCommand::Ls(args) => ls(&args),
        CacheCommand::Verify(args) => verify(&args),
        CacheCommand::Gc(args) => gc(&args),
    }
}

fn open(settings: &CacheSettings) -> anyhow::Result<Store> {
    if !settings.dir.join("index").exists() {
        return Err(UsageError(format!("{} is not an edgeflow cache (no index/); pull a model first", settings.dir.display())).into());
    }
    Ok(Store::open(settings)?)
}

/// Reads the `active` symlink only, so it works while the daemon holds the index.
fn path(args: &CacheArgs) -> anyhow::Result<()> {
    let (settings, model) = cache_settings(args)?;
    let root = &settings.dir;
    let (model, dir) = match model {
        Some(m) => {
            let dir = cache::active_dir(root, &m).ok_or_else(|| anyhow::Error::from(cache::CacheError::NoActive { model: m.clone() }))?;
            (m, dir)
        }
        None => {
            let store = open(&settings)?;
            let mut actives = Vec::new();
            for m in store.models()? {
                if let Some(d) = cache::active_dir(root, &m.model) {
                    actives.push((m.model, d));
                }
            }
            match actives.len() {
                1 => actives.remove(0),
                0 => anyhow::bail!("no model in {} has an active version", root.display()),
                _ => return Err(UsageError(format!("several models are cached ({}); pass --model", actives.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join(", "))).into()),
            }
        }
    };
    if args.json {
        println!("{}", serde_json::json!({ "model": model, "dir": dir }));
    } else {
        println!("{}", dir.display());
    }
    Ok(())
}

fn ls(args: &CacheArgs) -> anyhow::Result<()> {
    let (settings, _) = cache_settings(args)?;
    let store = open(&settings)?;
    let mut rows = Vec::new();
    for r in store.versions(args.model.as_deref())? {
        let active = store.model(&r.model)?.and_then(|m| m.active).as_deref() == Some(r.version.as_str());
        let pinned = settings.pinned.iter().any(|(m, v)| *m == r.model && *v == r.version);
        let reason = match &r.state {
            crate::cache::State::Bad { reason } => Some(reason.clone()),
            _ => None,
        };
        rows.push(serde_json::json!({
            "model": r.model, "version": r.version, "state": r.state.as_str(), "reason": reason,
            "active": active, "pinned": pinned, "flavor": r.flavor, "source": r.source,
            "files": r.files.len(), "bytes": r.size(), "fetched_at": r.fetched_at, "activated_at": r.activated_at,
            "dir": if r.dir.is_empty() { serde_json::Value::Null } else { serde_json::json!(store.version_dir(&r)) },
        }));
    }
    if args.json {
        println!("{}", serde_json::json!({ "cache": store.root(), "bytes": store.usage()?, "versions": rows }));
        return Ok(());
    }
    println!("{:<24} {:>8} {:<8} {:<7} {:>10}  FLAVOR", "MODEL", "VERSION", "STATE", "ACTIVE", "SIZE");
    for r in &rows {
        println!(
            "{:<24} {:>8} {:<8} {:<7} {:>10}  {}{}",
            r["model"].as_str().unwrap_or(""),
            r["version"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or(""),
            if r["active"] == true {
                "*"
            } else if r["pinned"] == true {
                "pinned"
            } else {
                ""
            },
            human_bytes(r["bytes"].as_u64().unwrap_or(0)),
            r["flavor"].as_str().unwrap_or(""),
            r["reason"].as_str().map(|s| format!("  ({s})")).unwrap_or_default(),
        );
    }
    println!("{} in {}", human_bytes(store.usage()?), store.root().display());
    Ok(())
}

fn verify(args: &CacheArgs) -> anyhow::Result<()> {
    let (settings, _) = cache_settings(args)?;
    let store = open(&settings)?;
    let mut report = Vec::new();
    let mut damaged = 0;
    for r in store.versions(args.model.as_deref())? {
        if r.dir.is_empty() {
            continue;
        }
        let corrupt = store.verify(&r)?;
        damaged += corrupt.len();
        if !args.json {
            if corrupt.is_empty() {
                println!("ok       {} version {} ({} files)", r.model, r.version, r.files.len());
            }
            for c in &corrupt {
                println!("DAMAGED  {} version {}: {} expected sha256 {} found {}", r.model, r.version, c.path, c.expected, c.actual.as_deref().unwrap_or("(missing)"));
            }
        }
        report.push(serde_json::json!({ "model": r.model, "version": r.version, "ok": corrupt.is_empty(), "files": r.files.len(), "damaged": corrupt }));
    }
    if args.json {
        println!("{}", serde_json::json!({ "ok": damaged == 0, "versions": report }));
    }
    if damaged > 0 {
        anyhow::bail!("{damaged} cached file(s) do not match their recorded digests; `edgeflow pull` fetches them again");
    }
    Ok(())
}

fn gc(args: &CacheArgs) -> anyhow::Result<()> {
    let (settings, _) = cache_settings(args)?;
    let store = open(&settings)?;
    // Opening the cache already swept orphans and temp files; report that too.
    let mut report = store.swept_at_open().clone();
    report.add(&store.retain()?);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "removed {} version(s){}, {} blob(s), {} temp file(s); freed {}",
            report.versions_removed.len(),
            if report.versions_removed.is_empty() { String::new() } else { format!(" ({})", report.versions_removed.join(", ")) },
            report.blobs_removed,
            report.temp_removed,
            human_bytes(report.bytes_freed)
        );
    }
    Ok(())
}
#[derive(Args)]
#[command(group = clap::ArgGroup::new("target").args(["stage", "alias"]))]
pub struct PullArgs {
    /// Config file (its [registry] and [cache] sections; flags override them).
    #[arg(long, value_name = "FILE", env = "EDGEFLOW_CONFIG")]
    config: Option<PathBuf>,
    /// MLflow tracking server, e.g. http://127.0.0.1:5000.
    #[arg(long, value_name = "URL", env = "MLFLOW_TRACKING_URI")]
    registry_url: Option<String>,
    /// Registered model name.
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    /// Follow the latest version in this stage (default: Production).
    #[arg(long, value_name = "STAGE")]
    stage: Option<String>,
    /// Follow the version this alias points at.
    #[arg(long, value_name = "ALIAS")]
    alias: Option<String>,
    /// Cache folder.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// List cached versions.
    Ls(CacheArgs),
    /// Re-hash cached files against the digests recorded at download (exit 1 on damage).
    Verify(CacheArgs),
    /// Apply retention and remove orphans and stale temp files.
    Gc(CacheArgs),
    /// Print the active version's folder (for `edgeflow generate --model-dir`).
    Path(CacheArgs),
}

#[derive(Args)]
pub struct CacheArgs {
    /// Config file (its [cache] section and registry.model).
    #[arg(long, value_name = "FILE", env = "EDGEFLOW_CONFIG")]
    config: Option<PathBuf>,
    /// Cache folder.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Only this model.
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}
