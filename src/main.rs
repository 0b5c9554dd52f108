//! The `edgeflow` command line: parses arguments, runs one subcommand, maps errors to exit codes.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use edgeflow::engine::{ChatMessage, EngineError, GenerateParams, LoadOptions, Model, SamplingParams};

/// Exit code for usage and configuration errors (sysexits EX_USAGE); systemd's
/// `RestartPreventExitStatus=64` keeps a misconfigured agent from restart-looping.
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(name = "edgeflow", version, about = "A self-updating, fleet-managed LLM endpoint for Linux edge devices")]
struct Cli {
    /// Log filter (e.g. `info`, `edgeflow=debug`); also read from EDGEFLOW_LOG.
    #[arg(long, global = true, env = "EDGEFLOW_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: follow the registry, serve the active version on the socket, report
    /// to the fleet. Stops cleanly on SIGTERM; SIGHUP re-reads the config.
    Run(daemon_cmd::RunArgs),
    /// Check a config file as `edgeflow run` would, listing every problem (exit 64).
    CheckConfig(daemon_cmd::CheckArgs),
    /// Show the running daemon's state (model, registry, fleet), read over its socket.
    Status(daemon_cmd::StatusArgs),
    /// Generate text from a local ONNX GenAI model folder.
    Generate(GenerateArgs),
    /// Pull the version a registry stage or alias designates into the cache, verify and
    /// smoke-test it, and make it active.
    Pull(PullArgs),
    /// Inspect and maintain the model cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Serve a local model folder over the OpenAI-compatible API on a Unix socket.
    Serve(ServeArgs),
    /// The fleet link on its own (check a broker, certificates and topics) and command signing.
    #[command(subcommand)]
    Fleet(fleet_cmd::FleetCommand),
}

#[derive(Args)]
struct RuntimeArgs {
    /// Path of libonnxruntime.so (default: $ORT_DYLIB_PATH, then lib/ next to the
    /// executable, then ../lib/edgeflow/ from its folder, then the system library path).
    #[arg(long, value_name = "FILE")]
    ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (default: the cores available to this process).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["prompt", "chat"]))]
#[command(group = clap::ArgGroup::new("sampling").multiple(true).args(["temperature", "top_p", "top_k", "seed"]).conflicts_with("greedy"))]
struct GenerateArgs {
    /// Model folder: *.onnx, *.onnx.data, genai_config.json, tokenizer.json, tokenizer_config.json.
    #[arg(long, value_name = "DIR")]
    model_dir: PathBuf,
    /// Raw prompt, tokenized as is (special tokens in it are recognised).
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// JSON file with an array of {role, content} messages; the chat template is applied.
    #[arg(long, value_name = "FILE")]
    chat: Option<PathBuf>,
    /// Maximum new tokens.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_tokens: usize,
    /// Greedy decoding (the default unless the model's genai_config.json says do_sample).
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature (> 0 samples).
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Sample among the K most likely tokens (0 = all).
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Seed for reproducible sampling.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Repetition penalty (1.0 = off).
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    repetition_penalty: Option<f32>,
    /// Stop when this string is generated (repeatable).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Keep generating through end-of-sequence tokens (for benchmarks).
    #[arg(long, hide = true)]
    ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    let log = init_logging(&cli.log);
    let result = match cli.command {
        Command::Run(args) => daemon_cmd::run(args, log),
        Command::CheckConfig(args) => daemon_cmd::check(args),
        Command::Status(args) => daemon_cmd::status(args),
        Command::Generate(args) => generate(args),
        Command::Pull(args) => pull::pull(args),
        Command::Cache(cmd) => pull::cache(cmd),
        Command::Serve(args) => serve_cmd::serve(args),
        Command::Fleet(cmd) => fleet_cmd::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeflow: {e:#}");
            let usage = e.chain().any(|c| {
                c.downcast_ref::<EngineError>().is_some_and(EngineError::is_bad_request)
                    || c.downcast_ref::<UsageError>().is_some()
                    || c.downcast_ref::<edgeflow::config::ConfigError>().is_some()
            });
            ExitCode::from(if usage { EXIT_USAGE } else { 1 })
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// Logs to stderr (the journal under systemd); returns the handle that changes the filter
/// while running (the fleet's `set {log_level}`).
fn init_logging(filter: &str) -> edgeflow::app::LogControl {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let initial = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("edgeflow: log filter `{filter}`: {e}; using `warn`");
        EnvFilter::new("warn")
    });
    let (layer, handle) = tracing_subscriber::reload::Layer::new(initial);
    // Under systemd the journal stamps each line; a second timestamp is noise.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if journal {
        tracing_subscriber::registry().with(layer).with(fmt.without_time()).init();
    } else {
        tracing_subscriber::registry().with(layer).with(fmt).init();
    }
    std::sync::Arc::new(move |f: &str| {
        let filter = EnvFilter::try_new(f).map_err(|e| format!("`{f}` is not a log filter: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let options = LoadOptions { threads: args.runtime.threads, ort_lib: args.runtime.ort_lib.clone(), memory: None };
    let mut model = Model::load(&args.model_dir, &options).with_context(|| format!("loading model from {}", args.model_dir.display()))?;

    let prompt_ids = match (&args.prompt, &args.chat) {
        (Some(text), _) => model.encode(text)?,
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading chat file {}", file.display()))?;
            let messages: Vec<ChatMessage> =
                serde_json::from_str(&text).map_err(|e| UsageError(format!("{}: expected a JSON array of {{\"role\", \"content\"}} objects: {e}", file.display())))?;
            if messages.is_empty() {
                return Err(UsageError(format!("{}: the chat has no messages", file.display())).into());
            }
            model.encode_chat(&messages)?
        }
        (None, None) => unreachable!("clap requires --prompt or --chat"),
    };

    let search = &model.config().search;
    let wants_sampling = args.temperature.is_some() || args.top_p.is_some() || args.top_k.is_some() || args.seed.is_some();
    let sampling = if args.greedy || (!wants_sampling && !search.do_sample) {
        SamplingParams { repetition_penalty: args.repetition_penalty.unwrap_or(1.0), ..SamplingParams::greedy() }
    } else {
        SamplingParams {
            temperature: args.temperature.unwrap_or(if search.do_sample { search.temperature } else { 1.0 }),
            top_k: args.top_k.unwrap_or(if search.do_sample { search.top_k } else { 0 }),
            top_p: args.top_p.unwrap_or(if search.do_sample { search.top_p } else { 1.0 }),
            repetition_penalty: args.repetition_penalty.unwrap_or(search.repetition_penalty),
            seed: args.seed,
        }
    };
    let params = GenerateParams { max_new_tokens: args.max_tokens, sampling, stop: args.stop.clone(), record_top_logits: 0, ignore_eos: args.ignore_eos, collect_stats: false };
    let cancel = AtomicBool::new(false);
    let stdout = std::io::stdout();
    let streaming = !args.json;
    let generation = model.generate(&prompt_ids, &params, &cancel, |piece| {
        if streaming {
            let mut out = stdout.lock();
            if out.write_all(piece.as_bytes()).and_then(|()| out.flush()).is_err() {
                // stdout closed (e.g. `| head`): stop generating.
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;

    if args.json {
        let out = serde_json::json!({
            "prompt_token_ids": generation.prompt_token_ids,
            "token_ids": generation.token_ids,
            "text": generation.text,
            "finish_reason": generation.finish_reason.as_str(),
            "time_to_first_token_ms": generation.time_to_first_token.as_secs_f64() * 1e3,
            "decode_tokens_per_s": generation.decode_tokens_per_s(),
            "threads": model.threads(),
        });
        println!("{out}");
    } else {
        println!();
    }
    Ok(())
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("target").args(["stage", "alias"]))]
struct PullArgs {
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
enum CacheCommand {
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
struct CacheArgs {
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

/// `edgeflow pull` and `edgeflow cache ...`.
mod pull {
    use std::io::{IsTerminal, Write};
    use std::path::PathBuf;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use edgeflow::cache::{self, Store};
    use edgeflow::config::{CacheSettings, Config};
    use edgeflow::fetch::{self, Progress};
    use edgeflow::registry::{Auth, Client, PullEvent, Puller};

    use super::{CacheArgs, CacheCommand, PullArgs, UsageError};

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
        let load_options = config.engine.load_options(&config.serve);

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
            let observer: edgeflow::registry::pull::PullObserver = Arc::new(move |e: &PullEvent| {
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
                    edgeflow::registry::pull::Change::Unchanged => "already active, verified".to_string(),
                    edgeflow::registry::pull::Change::Activated { previous: Some(p), .. } => format!("was {p}"),
                    edgeflow::registry::pull::Change::Activated { previous: None, .. } => "first version".to_string(),
                    edgeflow::registry::pull::Change::Repaired { files } => format!("repaired {}", files.join(", ")),
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
                    _ => {
                        return Err(
                            UsageError(format!("several models are cached ({}); pass --model", actives.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join(", "))).into()
                        )
                    }
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
                edgeflow::cache::State::Bad { reason } => Some(reason.clone()),
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
}

#[derive(Args)]
struct ServeArgs {
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
    runtime: RuntimeArgs,
}

/// `edgeflow serve`: the local API over one model folder, until SIGTERM or SIGINT.
mod serve_cmd {
    use std::sync::Arc;

    use anyhow::Context;
    use edgeflow::active::{Manager, ManagerOptions, ModelSource};
    use edgeflow::config::Config;
    use edgeflow::serve::{self, App};
    use edgeflow::telemetry::Metrics;
    use tokio::signal::unix::{signal, SignalKind};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::{ServeArgs, UsageError};

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
            load: config.engine.load_options(&config.serve),
            queue_depth: settings.queue_depth,
            max_prompt_tokens: settings.max_prompt_tokens,
            smoke_test_tokens: 1,
            swap: settings.swap,
            nice: config.engine.nice,
        };
        // The runtime only moves bytes; the engine has its own thread and the cores.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("edgeflow-io").enable_all().build().context("starting the async runtime")?;
        runtime.block_on(run(settings, options, source, args.config.clone()))
    }

    async fn run(settings: edgeflow::config::ServeSettings, options: ManagerOptions, source: ModelSource, config_path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
        let metrics = Arc::new(Metrics::new());
        let manager = Manager::new(options, metrics.clone());
        // A socket-activated unit hands over its socket; otherwise bind our own.
        let (listener, socket_file) = match serve::from_systemd().context("taking the socket systemd passed")? {
            Some(listener) => (listener, None),
            None => {
                let (listener, file) = serve::bind(&settings.socket).context("binding the API socket")?;
                (listener, Some(file))
            }
        };
        let socket_path = socket_file.as_ref().map_or_else(|| "<systemd socket>".to_string(), |f| f.path().display().to_string());
        let tcp = match settings.tcp_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?),
            None => None,
        };
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            config = ?config_path,
            socket = %socket_path,
            tcp = ?settings.tcp_listen,
            model_dir = %source.dir.display(),
            "edgeflow serve starting"
        );
        let shutdown = CancellationToken::new();
        let app = App::from_settings(manager.clone(), metrics, &settings);
        let tracker = TaskTracker::new();
        let servers = vec![tracker.spawn(serve::run(listener, app.clone(), shutdown.clone()))];
        let servers = match tcp {
            Some(tcp) => servers.into_iter().chain([tracker.spawn(serve::run_tcp(tcp, app.clone(), shutdown.clone()))]).collect(),
            None => servers,
        };
        tracker.close();

        let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        // The socket already answers /healthz (and 503 with Retry-After for generation)
        // while the model loads.
        let activated = tokio::select! {
            result = manager.activate(source.clone()) => Some(result),
            _ = terminate.recv() => None,
            _ = interrupt.recv() => None,
        };
        let outcome = match activated {
            Some(Ok(info)) => {
                eprintln!("edgeflow serve: {}@{} ready on {socket_path}", info.name, info.version);
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
                Ok(())
            }
            Some(Err(e)) => Err(anyhow::Error::new(e)),
            None => Ok(()),
        };
        shutdown.cancel();
        tracker.wait().await;
        for server in servers {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "server task failed");
            }
        }
        manager.deactivate().await;
        drop(socket_file);
        outcome
    }
}

/// `edgeflow fleet ...`: the MQTT link without a model, and the fleet's command keys.
mod fleet_cmd {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::PathBuf;
    use std::time::Duration;

    use anyhow::Context;
    use clap::{Args, Subcommand};
    use edgeflow::command::Bus;
    use edgeflow::config::Config;
    use edgeflow::fleet::Link;
    use tokio::signal::unix::{signal, SignalKind};
    use tokio_util::sync::CancellationToken;

    use super::UsageError;

    #[derive(Subcommand)]
    pub enum FleetCommand {
        /// Run the fleet link alone until SIGTERM/SIGINT: status, health and events over MQTT,
        /// `report` and `set` commands answered; commands that need a model are refused.
        Run(RunArgs),
        /// Create an ed25519 key pair for signing commands: the private key to --out (0600),
        /// the public key (hex, for fleet.signature_public_key) to stdout.
        Keygen {
            #[arg(long, value_name = "FILE")]
            out: PathBuf,
        },
        /// Print a signed command payload to publish on <prefix>/<device>/cmd/<command>.
        Sign(SignArgs),
    }

    #[derive(Args)]
    pub struct RunArgs {
        /// Config file (its [fleet] section; flags override it).
        #[arg(long, value_name = "FILE", env = "EDGEFLOW_CONFIG")]
        config: Option<PathBuf>,
        /// mqtt://host[:port] or mqtts://host[:port].
        #[arg(long, value_name = "URL")]
        broker: Option<String>,
        #[arg(long, value_name = "ID")]
        device_id: Option<String>,
        #[arg(long, value_name = "DIR")]
        spool_dir: Option<PathBuf>,
    }

    #[derive(Args)]
    pub struct SignArgs {
        /// Private key file written by `edgeflow fleet keygen`.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long, value_name = "ID")]
        device_id: String,
        /// Command name (sync, pin, unpin, rollback, reload, report, set).
        #[arg(long, value_name = "NAME")]
        command: String,
        /// Arguments as a JSON object.
        #[arg(long, value_name = "JSON", default_value = "{}")]
        args: String,
        /// Default: a random id.
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
        /// How long the command stays valid.
        #[arg(long, value_name = "DURATION", default_value = "60s")]
        ttl: String,
    }

    pub fn run(cmd: FleetCommand) -> anyhow::Result<()> {
        match cmd {
            FleetCommand::Run(args) => run_link(args),
            FleetCommand::Keygen { out } => {
                let mut seed = [0u8; 32];
                std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed)).context("reading /dev/urandom")?;
                let key = ed25519_dalek::SigningKey::from_bytes(&seed);
                let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&out).with_context(|| format!("creating {}", out.display()))?;
                writeln!(f, "{}", hex::encode(key.to_bytes())).with_context(|| format!("writing {}", out.display()))?;
                println!("{}", hex::encode(key.verifying_key().as_bytes()));
                Ok(())
            }
            FleetCommand::Sign(a) => {
                let text = std::fs::read_to_string(&a.key).with_context(|| format!("reading {}", a.key.display()))?;
                let seed: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| UsageError(format!("{}: not a key written by `edgeflow fleet keygen`", a.key.display())))?;
                let args: serde_json::Value = serde_json::from_str(&a.args).map_err(|e| UsageError(format!("--args: {e}")))?;
                edgeflow::command::Command::parse(&a.command, &args).map_err(UsageError)?;
                let ttl = humantime::parse_duration(&a.ttl).map_err(|e| UsageError(format!("--ttl: {e}")))?;
                let now = edgeflow::status::unix_now();
                let body = serde_json::json!({
                    "request_id": a.request_id.unwrap_or_else(|| format!("{:016x}", fastrand::u64(..))),
                    "args": args, "issued_at": now, "expires_at": now + ttl.as_secs(),
                });
                println!("{}", edgeflow::fleet::commands::sign(&ed25519_dalek::SigningKey::from_bytes(&seed), &a.device_id, &a.command, &body));
                Ok(())
            }
        }
    }

    fn run_link(args: RunArgs) -> anyhow::Result<()> {
        let mut config = match &args.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if args.broker.is_some() {
            config.fleet.broker = args.broker.clone();
        }
        if args.device_id.is_some() {
            config.fleet.device_id = args.device_id.clone();
        }
        if args.spool_dir.is_some() {
            config.fleet.spool_dir = args.spool_dir.clone();
        }
        let settings = config.fleet.resolve().map_err(|p| UsageError(p.join("\n")))?.ok_or_else(|| UsageError("no broker: pass --broker or set fleet.broker".into()))?;
        // One thread: the link is a few timers and one socket.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
        runtime.block_on(async move {
            let (_status, status_rx) = edgeflow::status::channel();
            let (bus, mut requests) = Bus::new(8);
            let shutdown = CancellationToken::new();
            let link = Link::new(settings).spawn(status_rx, bus, shutdown.clone())?;
            let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
            let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
            loop {
                tokio::select! {
                    _ = terminate.recv() => break,
                    _ = interrupt.recv() => break,
                    Some(req) = requests.recv() => {
                        let name = req.command.name();
                        req.respond(Err(format!("`{name}` needs the model manager; `edgeflow fleet run` only runs the link")));
                    }
                }
            }
            shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(10), link.join()).await.context("the fleet link did not stop in time")?.context("the fleet link task failed")?;
            Ok(())
        })
    }
}

/// `edgeflow run`, `check-config` and `status`: the daemon and its two companions.
mod daemon_cmd {
    use std::path::PathBuf;
    use std::time::Duration;

    use anyhow::Context;
    use clap::Args;
    use edgeflow::config::Config;
    use edgeflow::notify::Notifier;

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

    pub fn run(args: RunArgs, log: edgeflow::app::LogControl) -> anyhow::Result<()> {
        let config = load(&args.config)?;
        // The runtime only moves bytes; each model has its own engine thread.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("edgeflow-io").enable_all().build().context("starting the async runtime")?;
        let result = runtime.block_on(edgeflow::app::run(config, args.config.clone(), log, Notifier::from_env()));
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
            edgeflow::config::Target::Stage(s) => format!("stage {s}"),
            edgeflow::config::Target::Alias(a) => format!("alias {a}"),
        };
        println!(
            "  registry  {} model {} ({target}), poll every {}",
            r.url.as_deref().unwrap_or("-"),
            r.model.as_deref().unwrap_or("-"),
            humantime::format_duration(r.poll_interval)
        );
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
        let socket = args.socket.clone().or_else(|| config.serve.socket.clone()).unwrap_or_else(edgeflow::config::ServeConfig::default_socket);
        let token = config.serve.token_env.as_deref().and_then(|v| std::env::var(v).ok());
        let doc = edgeflow::app::fetch_status(&socket, token.as_deref(), Duration::from_secs(5))?;
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
}
