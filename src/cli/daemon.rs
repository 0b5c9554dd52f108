//! `edgeflow run`, `check-config` and `status`: the daemon and its two companions.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::notify::Notifier;
use crate::serve::Listeners;
use anyhow::Context;
use clap::Args;

use super::UsageError;

#[derive(Args)]
pub struct RunArgs {
    /// Config file (see config.example.toml).
    #[arg(long, value_name = "FILE", env = "EDGEFLOW_CONFIG", default_value = "/etc/edgeflow/config.toml")]
    config: PathBuf,
}

#[derive(Args)]
pub struct CheckArgs {
    /// Config file to check.
    #[arg(long, value_name = "FILE", env = "EDGEFLOW_CONFIG", default_value = "/etc/edgeflow/config.toml")]
    config: PathBuf,
}

#[derive(Args)]
pub struct StatusArgs {
    /// Config file naming the socket (`serve.socket`) and token (`serve.token_env`).
    #[arg(long, value_name = "FILE", env = "EDGEFLOW_CONFIG")]
    config: Option<PathBuf>,
    /// The daemon's socket (overrides the config).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the status document as JSON.
    #[arg(long)]
    json: bool,
}

/// Loads the config and lists every problem `edgeflow run` would have with it.
fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load_for_daemon(path)?)
}

pub fn run(args: RunArgs, log: crate::app::LogControl) -> anyhow::Result<()> {
    let config = load(&args.config)?;
    // The runtime only moves bytes; each model has its own engine thread.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("edgeflow-io").enable_all().build().context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let serve = config.serve.resolve().map_err(|p| UsageError(p.join("\n")))?;
        // The socket first: /healthz answers while the cache opens and the model loads.
        let listeners = Listeners::bind(&serve).await?;
        crate::app::run(config, args.config.clone(), listeners, Lifecycle::from_signals()?, log, Notifier::from_env()).await
    });
    // A smoke test or download still running on a blocking thread must not hold up exit.
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

pub fn check(args: CheckArgs) -> anyhow::Result<()> {
    let config = load(&args.config)?;
    let r = config.registry.resolve().map_err(|p| UsageError(p.join("\n")))?;
    let c = config.cache.resolve().map_err(|p| UsageError(p.join("\n")))?;
    let s = config.serve.resolve().map_err(|p| UsageError(p.join("\n")))?;
    let f = config.fleet.resolve().map_err(|p| UsageError(p.join("\n")))?;
    println!("{}: ok", args.config.display());
    let target = match &r.target {
        crate::config::Target::Stage(s) => format!("stage {s}"),
        crate::config::Target::Alias(a) => format!("alias {a}"),
    };
    println!("  registry  {} model {} ({target}), poll every {}", r.url.as_deref().unwrap_or("-"), r.model.as_deref().unwrap_or("-"), humantime::format_duration(r.poll_interval));
    println!("  cache     {} (keep {} versions)", c.dir.display(), c.keep_versions);
    println!("  serve     {} (mode {:o}, queue {}, swap {})", s.socket.path.display(), s.socket.mode, s.queue_depth, s.swap.as_str());
    match f {
        Some(f) => println!("  fleet     {} as device {} under {}/", f.broker, f.device_id, f.topic_prefix),
        None => println!("  fleet     off (fleet.broker unset)"),
    }
    Ok(())
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let socket = args.socket.clone().or_else(|| config.serve.socket.clone()).unwrap_or_else(crate::config::ServeConfig::default_socket);
    let token = config.serve.token_env.as_deref().and_then(|v| std::env::var(v).ok());
    let doc = fetch_status(&socket, token.as_deref(), Duration::from_secs(5))?;
    if args.json {
        println!("{doc}");
        return Ok(());
    }
    let field = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    println!("edgeflow {} (pid {}, up {}s) on {}", field(&doc["agent_version"]), field(&doc["pid"]), field(&doc["uptime_s"]), field(&doc["socket"]));
    match doc["serving"].as_object() {
        Some(m) => {
            println!("model     {}@{} ({}), queue {}/{}", field(&m["name"]), field(&m["version"]), field(&m["digest"]), field(&m["queued"]), field(&doc["queue_capacity"]))
        }
        None => println!("model     none loaded"),
    }
    if let Some(t) = doc["model"]["target"].as_str() {
        println!("follows   {t}");
    }
    let reg = &doc["registry"];
    println!("registry  {} ({} polls){}", field(&reg["outcome"]), field(&reg["polls"]), reg["detail"].as_str().map(|d| format!(": {d}")).unwrap_or_default());
    if let Some(f) = doc["load_failure"].as_object() {
        println!("refused   version {}: {}", field(&f["version"]), field(&f["reason"]));
    }
    match doc["fleet"].as_object() {
        Some(f) => println!(
            "fleet     {} (spool {}, reconnects {})",
            if f["connected"].as_bool() == Some(true) { "connected" } else { "offline" },
            field(&f["spool_depth"]),
            field(&f["reconnects"])
        ),
        None => println!("fleet     off"),
    }
    Ok(())
}

/// Reads the running daemon's `/status` over its socket (`edgeflow status`).
///
/// # Errors
/// The socket cannot be reached or the answer is not a status document.
fn fetch_status(socket: &std::path::Path, token: Option<&str>, timeout: Duration) -> anyhow::Result<serde_json::Value> {
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
