//! `edgeflow fleet ...`: the MQTT link without a model, and the fleet's command keys.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::command::Bus;
use crate::config::Config;
use crate::console::send::{Request, Target};
use crate::fleet::Link;
use anyhow::Context;
use clap::{Args, Subcommand};
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
    /// The operator's console: list the devices, send a signed command to a device or a
    /// group and collect the answers, watch events and drift alerts (MQTT only).
    Console(super::console::ConsoleArgs),
    /// Run many simulated devices in this process (the real registry poller, cache and fleet
    /// link; a stub instead of the engine) to size a broker and a registry: prints one JSON
    /// line of statistics every --stats-every, until SIGTERM/SIGINT or --for.
    Simulate(SimulateArgs),
    /// Print a signed command payload to publish on <prefix>/<device>/cmd/<command>, or with
    /// --group on <prefix>/group/<group>/cmd/<command>.
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
    /// Obey unsigned commands (fleet.require_signatures = false), for a link without a
    /// fleet.signature_public_key.
    #[arg(long)]
    allow_unsigned: bool,
}

#[derive(Args)]
pub struct SimulateArgs {
    /// Config file: its [registry] section (url, model, stage or alias, poll_interval), its
    /// [cache] and [fleet] sections are every simulated device's; each gets its own device
    /// id, cache and spool.
    #[arg(long, value_name = "FILE", env = "EDGEFLOW_CONFIG")]
    config: PathBuf,
    /// How many devices.
    #[arg(long, value_name = "N")]
    devices: usize,
    /// Folder for every device's cache and spool (`DIR/<device id>/`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Device ids are this followed by a five-digit number.
    #[arg(long, value_name = "PREFIX", default_value = "sim-")]
    id_prefix: String,
    /// Start the devices evenly over this long.
    #[arg(long, value_name = "DURATION", default_value = "0s")]
    ramp: String,
    /// Print statistics this often.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    stats_every: String,
    /// Stop after this long (default: run until interrupted).
    #[arg(long = "for", value_name = "DURATION")]
    duration: Option<String>,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["device_id", "group"])))]
pub struct SignArgs {
    /// Private key file written by `edgeflow fleet keygen`.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The device the command is for.
    #[arg(long, value_name = "ID")]
    device_id: Option<String>,
    /// The group the command is for (`all`: every device under the prefix); the signature
    /// names the group and the prefix.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// The fleet's fleet.topic_prefix (for --group).
    #[arg(long, value_name = "PREFIX", default_value = "edgeflow")]
    topic_prefix: String,
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
        FleetCommand::Console(args) => super::console::run(args),
        FleetCommand::Simulate(args) => simulate(args),
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
            let key = crate::console::read_key(&a.key).map_err(|e| UsageError(e.to_string()))?;
            let args: serde_json::Value = serde_json::from_str(&a.args).map_err(|e| UsageError(format!("--args: {e}")))?;
            crate::command::Command::parse(&a.command, &args).map_err(UsageError)?;
            let ttl = humantime::parse_duration(&a.ttl).map_err(|e| UsageError(format!("--ttl: {e}")))?;
            let target = match (a.device_id, a.group) {
                (Some(device), _) => Target::Device(device),
                (None, Some(group)) => Target::Group(group),
                (None, None) => return Err(UsageError("--device-id or --group is required".into()).into()),
            };
            let request = Request { name: a.command, args, target, request_id: a.request_id.unwrap_or_else(|| format!("{:016x}", fastrand::u64(..))), ttl, wait: Duration::ZERO };
            // The console's own payload, so a hand-signed command is exactly what `send` sends.
            for (_topic, payload) in crate::console::send::payloads(&request, &a.topic_prefix, Some(&key), crate::util::unix_now()) {
                println!("{payload}");
            }
            Ok(())
        }
    }
}

fn simulate(a: SimulateArgs) -> anyhow::Result<()> {
    use super::console::duration;
    if a.devices == 0 || a.devices > 100_000 {
        return Err(UsageError("--devices: from 1 to 100000".into()).into());
    }
    crate::fleet::settings::topic_level(&a.id_prefix).map_err(|e| UsageError(format!("--id-prefix: `{}` {e}", a.id_prefix)))?;
    let stats_every = duration("--stats-every", &a.stats_every)?;
    if stats_every < Duration::from_millis(100) {
        return Err(UsageError("--stats-every: at least 100ms".into()).into());
    }
    let options = crate::simulate::Options { devices: a.devices, id_prefix: a.id_prefix, dir: a.dir, ramp: duration("--ramp", &a.ramp)?, stats_every };
    let stop_after = a.duration.map(|d| duration("--for", &d)).transpose()?;
    let config = Config::load(&a.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        let stop = crate::lifecycle::Lifecycle::from_signals()?.shutdown;
        if let Some(after) = stop_after {
            let token = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                token.cancel();
            });
        }
        crate::simulate::run(config, options, stop).await
    })
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
    if args.allow_unsigned {
        config.fleet.require_signatures = Some(false);
    }
    let settings = config.fleet.resolve().map_err(|p| UsageError(p.join("\n")))?.ok_or_else(|| UsageError("no broker: pass --broker or set fleet.broker".into()))?;
    // One thread: the link is a few timers and one socket.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        let (_status, status_rx) = crate::status::channel();
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
