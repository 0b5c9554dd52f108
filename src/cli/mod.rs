//! The `edgeflow` command line: parses arguments, runs one subcommand, maps errors to exit
//! codes. `main.rs` only calls [`main`]; each subcommand lives in its own file here and drives
//! the library like any other caller.

mod console;
mod daemon;
mod fleet;
mod generate;
mod pull;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::engine::{template, EngineError};

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
    Run(daemon::RunArgs),
    /// Check a config file as `edgeflow run` would, listing every problem (exit 64).
    CheckConfig(daemon::CheckArgs),
    /// Show the running daemon's state (model, registry, fleet), read over its socket.
    Status(daemon::StatusArgs),
    /// Generate text from a local ONNX GenAI model folder.
    Generate(generate::GenerateArgs),
    /// Pull the version a registry stage or alias designates into the cache, verify and
    /// smoke-test it, and make it active.
    Pull(pull::PullArgs),
    /// Inspect and maintain the model cache.
    #[command(subcommand)]
    Cache(pull::CacheCommand),
    /// Serve a local model folder over the OpenAI-compatible API on a Unix socket.
    Serve(serve::ServeArgs),
    /// The fleet link on its own (check a broker, certificates and topics) and command signing.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
}

#[derive(Args)]
pub(crate) struct RuntimeArgs {
    /// Path of libonnxruntime.so (default: $ORT_DYLIB_PATH, then lib/ next to the
    /// executable, then ../lib/edgeflow/ from its folder, then .ort/<arch>/ in the source tree
    /// the executable was built in, then the system library path).
    #[arg(long, value_name = "FILE")]
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (default: the cores available to this process).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// Runs the command line this process was started with; the process exits with the returned code.
pub fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == template::sandbox::ARG) {
        return template::sandbox::child_main(&args[2..]);
    }
    crate::engine::heap::configure();
    // Chat templates of the models this process loads render in children of this binary.
    template::sandbox::host(Some(template::sandbox::Settings::this_binary()));
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    let log = init_logging(&cli.log);
    let result = match cli.command {
        Command::Run(args) => daemon::run(args, log),
        Command::CheckConfig(args) => daemon::check(args),
        Command::Status(args) => daemon::status(args),
        Command::Generate(args) => generate::generate(args),
        Command::Pull(args) => pull::pull(args),
        Command::Cache(cmd) => pull::cache(cmd),
        Command::Serve(args) => serve::serve(args),
        Command::Fleet(cmd) => fleet::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeflow: {e:#}");
            let usage = e.chain().any(|c| {
                c.downcast_ref::<EngineError>().is_some_and(EngineError::is_bad_request)
                    || c.downcast_ref::<UsageError>().is_some()
                    || c.downcast_ref::<crate::config::ConfigError>().is_some()
            });
            ExitCode::from(if usage { EXIT_USAGE } else { 1 })
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

/// Logs to stderr (the journal under systemd); returns the handle that changes the filter
/// while running (the fleet's `set {log_level}`).
fn init_logging(filter: &str) -> crate::app::LogControl {
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
