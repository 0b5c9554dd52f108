//! `edgeflow serve`: the local API over one model folder, until SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::UsageError;
use crate::active::{ManagerOptions, ModelSource};
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::serve::Listeners;

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let s = &mut config.serve;
    if let Some(p) = &args.socket {
        s.socket = Some(p.clone());
    }
    if let Some(m) = &args.socket_mode {
        s.socket_mode = u32::from_str_radix(m.trim_start_matches("0o"), 8).map_err(|_| UsageError(format!("--socket-mode: `{m}` is not an octal mode such as 660")))?;
    }
    if let Some(g) = &args.socket_group {
        s.socket_group = Some(g.parse().unwrap_or_else(|never| match never {}));
    }
    if let Some(a) = &args.tcp_listen {
        s.tcp_listen = Some(a.clone());
    }
    if let Some(n) = args.queue_depth {
        s.queue_depth = n;
    }
    if let Some(t) = &args.request_timeout {
        s.request_timeout = t.clone();
    }
    if args.runtime.threads.is_some() {
        config.engine.threads = args.runtime.threads;
    }
    if args.runtime.ort_lib.is_some() {
        config.engine.ort_lib = args.runtime.ort_lib.clone();
    }
    let problems = config.validate();
    if !problems.is_empty() {
        return Err(UsageError(problems.join("\n")).into());
    }
    let settings = config.serve.resolve().map_err(|p| UsageError(p.join("\n")))?;
    if !args.model_dir.is_dir() {
        return Err(UsageError(format!("--model-dir {}: not a directory", args.model_dir.display())).into());
    }
    let name = args.name.clone().unwrap_or_else(|| args.model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()));
    let source = ModelSource { dir: args.model_dir.clone(), name, version: args.model_version.clone(), digest: None };
    let options = ManagerOptions {
        load: config.load_options(),
        queue_depth: settings.queue_depth,
        max_prompt_tokens: settings.max_prompt_tokens,
        smoke_test_tokens: 1,
        swap: settings.swap,
        nice: config.engine.nice,
    };
    // The runtime only moves bytes; the engine has its own thread and the cores.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("edgeflow-io").enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async {
        let listeners = Listeners::bind(&settings).await?;
        crate::app::folder::serve(settings, options, source, args.config.clone(), listeners, Lifecycle::from_signals()?).await
    })
}

#[derive(Args)]
pub struct ServeArgs {
    /// Model folder to serve (ONNX Runtime GenAI layout); no registry, no MQTT.
    #[arg(long, value_name = "DIR")]
    model_dir: PathBuf,
    /// Unix socket to listen on (default: serve.socket, else $RUNTIME_DIRECTORY/api.sock or
    /// /run/edgeflow/api.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Config file (its [engine] and [serve] sections; flags override them).
    #[arg(long, value_name = "FILE", env = "EDGEFLOW_CONFIG")]
    config: Option<PathBuf>,
    /// Model id reported to clients (default: the folder's name).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Version reported in /v1/models and the metrics.
    #[arg(long, value_name = "VERSION", default_value = "local")]
    model_version: String,
    /// Socket permission bits, in octal (default 660).
    #[arg(long, value_name = "OCTAL")]
    socket_mode: Option<String>,
    /// Group owning the socket (name or gid).
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Also listen on this loopback TCP address (off by default).
    #[arg(long, value_name = "ADDR")]
    tcp_listen: Option<String>,
    /// Generation requests that may wait; more get 429.
    #[arg(long, value_name = "N")]
    queue_depth: Option<usize>,
    /// Per-request time limit, e.g. 30s.
    #[arg(long, value_name = "DURATION")]
    request_timeout: Option<String>,
    #[command(flatten)]
    runtime: super::RuntimeArgs,
}
