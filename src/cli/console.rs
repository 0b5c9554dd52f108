//! `edgeflow fleet console ...`: the operator's side, over MQTT only (see [`crate::console`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::Value;

use super::UsageError;
use crate::config::Config;
use crate::console::send::{Request, Target};
use crate::console::{self, ConsoleSettings};

#[derive(Args)]
pub struct ConsoleArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    action: Action,
}

/// Where the broker is: a device's `[fleet]` section (broker, prefix, protocol, TLS files,
/// credentials from the environment), overridden by flags.
#[derive(Args)]
struct ConnArgs {
    /// Config file whose [fleet] section says how to reach the broker.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// mqtt://host[:port] or mqtts://host[:port].
    #[arg(long, value_name = "URL", global = true)]
    broker: Option<String>,
    /// The fleet's fleet.topic_prefix (default: the config's, else `edgeflow`).
    #[arg(long, value_name = "PREFIX", global = true)]
    topic_prefix: Option<String>,
    /// `auto`, `5` or `3.1.1`.
    #[arg(long, value_name = "VERSION", global = true)]
    protocol: Option<String>,
    /// PEM file of the CAs to trust for mqtts://.
    #[arg(long, value_name = "FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --tls-key-file).
    #[arg(long, value_name = "FILE", global = true)]
    cert_file: Option<PathBuf>,
    /// PEM client key for mutual TLS.
    #[arg(long, value_name = "FILE", global = true)]
    tls_key_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Action {
    /// List every device: online or offline, groups, model version, tokens/s, errors, drift
    /// alert, last seen (from the retained status and health messages).
    Devices {
        /// One JSON object per device, one per line.
        #[arg(long)]
        json: bool,
        /// Stop reading once no message came for this long.
        #[arg(long, value_name = "DURATION", default_value = "1s")]
        quiet: String,
        /// Stop reading after this long in any case.
        #[arg(long, value_name = "DURATION", default_value = "30s")]
        limit: String,
    },
    /// Send one signed command to a device or a group and collect every answer. Exit 0 when
    /// every device it went to succeeded, 1 when one failed, did not answer or was offline.
    Send(SendArgs),
    /// Pin a version on a group a step at a time (the first step's devices are the
    /// canaries), watching the devices moved for failed pins, smoke_test_failed, rolled_back
    /// or pull_failed events, API errors, drift alerts and lost devices; stop at the first.
    /// Exit 0 when every online member was moved, 1 when it stopped.
    Rollout(RolloutArgs),
    /// Receive MLflow registry webhooks (HMAC-checked) and publish a signed `sync` to a group
    /// for each new version, alias or tag, until SIGINT/SIGTERM. The webhook's secret is read
    /// from the environment (--secret-env).
    Bridge(BridgeArgs),
    /// Print status changes, events and drift alerts as they happen, until SIGINT/SIGTERM.
    Watch {
        /// One JSON object per message, with its topic.
        #[arg(long)]
        json: bool,
        /// Print every drift window, not only those with an alert.
        #[arg(long)]
        all_drift: bool,
        /// Stop after this long (default: run until interrupted).
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to", "group"])))]
struct SendArgs {
    /// Command name: sync, pin, unpin, rollback, reload, report, set.
    command: String,
    /// The device to send it to.
    #[arg(long, value_name = "DEVICE")]
    to: Option<String>,
    /// The group to send it to (`all`: every device under the prefix).
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Arguments as a JSON object, e.g. '{"version":"7"}' or '{"spread":"30s"}' for sync.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    args: String,
    /// Signing key written by `edgeflow fleet keygen`.
    #[arg(long, value_name = "FILE", required_unless_present = "unsigned")]
    key: Option<PathBuf>,
    /// Send it unsigned (only devices with fleet.require_signatures = false obey).
    #[arg(long, conflicts_with = "key")]
    unsigned: bool,
    /// How long to wait for the answers.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    wait: String,
    /// How long the signed command stays valid (at most the devices' signature_max_age).
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    ttl: String,
    /// Default: a random id. Sending the same id again is answered from each device's first
    /// result, never run twice.
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
    /// The answers as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RolloutArgs {
    /// The group to move (`all`: every device under the prefix).
    #[arg(long, value_name = "GROUP")]
    group: String,
    /// The registry version to pin.
    #[arg(long, value_name = "VERSION")]
    version: String,
    /// Share of the group's online members moved per step, e.g. 10%.
    #[arg(long, value_name = "PERCENT", default_value = "25%")]
    step: String,
    /// How long the devices moved so far are watched after each step.
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    interval: String,
    /// API errors a moved device may report in one health report before the rollout stops.
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_errors: u64,
    /// When it stops, unpin the devices it moved (they follow their alias or stage again).
    #[arg(long)]
    revert: bool,
    /// Signing key written by `edgeflow fleet keygen`.
    #[arg(long, value_name = "FILE", required_unless_present = "unsigned")]
    key: Option<PathBuf>,
    /// Send the pins unsigned (only devices with fleet.require_signatures = false obey).
    #[arg(long, conflicts_with = "key")]
    unsigned: bool,
    /// How long each step waits for its pins' answers (a pin downloads the version).
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    wait: String,
    /// How long each signed pin stays valid (at most the devices' signature_max_age).
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    ttl: String,
    /// The outcome as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BridgeArgs {
    /// Address to receive webhooks on (HTTP; put TLS in front when MLflow is elsewhere).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8085")]
    listen: std::net::SocketAddr,
    /// Signing key written by `edgeflow fleet keygen`.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The group the `sync` goes to (`all`: every device under the prefix).
    #[arg(long, value_name = "GROUP", default_value = "all")]
    group: String,
    /// A registered model whose events count (repeat for several; default: every model).
    #[arg(long = "model", value_name = "NAME")]
    models: Vec<String>,
    /// Devices poll within a random part of this after the `sync` (at most 15m).
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    spread: String,
    /// How long each signed `sync` stays valid (at most the devices' signature_max_age).
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    ttl: String,
    /// Environment variable holding the webhook's secret (not a flag: flags show in `ps`).
    #[arg(long, value_name = "VAR", default_value = "EDGEFLOW_WEBHOOK_SECRET")]
    secret_env: String,
}

/// A duration flag's value, or a usage error naming the flag.
pub(super) fn duration(flag: &str, v: &str) -> Result<Duration, UsageError> {
    humantime::parse_duration(v.trim()).map_err(|e| UsageError(format!("{flag}: `{v}` is not a duration ({e})")))
}

fn settings(c: &ConnArgs) -> anyhow::Result<ConsoleSettings> {
    let mut fleet = match &c.config {
        Some(path) => Config::load(path)?.fleet,
        None => crate::fleet::FleetConfig::default(),
    };
    if c.broker.is_some() {
        fleet.broker.clone_from(&c.broker);
    }
    if let Some(p) = &c.topic_prefix {
        fleet.topic_prefix.clone_from(p);
    }
    if let Some(p) = &c.protocol {
        fleet.protocol.clone_from(p);
    }
    if c.ca_file.is_some() {
        fleet.ca_file.clone_from(&c.ca_file);
    }
    if c.cert_file.is_some() || c.tls_key_file.is_some() {
        fleet.cert_file.clone_from(&c.cert_file);
        fleet.key_file.clone_from(&c.tls_key_file);
    }
    if fleet.broker.is_none() {
        return Err(UsageError("no broker: pass --broker or --config with fleet.broker".into()).into());
    }
    ConsoleSettings::from_fleet(&fleet).map_err(|e| UsageError(e.to_string()).into())
}

pub fn run(args: ConsoleArgs) -> anyhow::Result<()> {
    let s = settings(&args.conn)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        match args.action {
            Action::Devices { json, quiet, limit } => devices(&s, json, duration("--quiet", &quiet)?, duration("--limit", &limit)?).await,
            Action::Send(a) => send(&s, a).await,
            Action::Rollout(a) => rollout(&s, a).await,
            Action::Bridge(a) => bridge(s, a).await,
            Action::Watch { json, all_drift, duration: d } => {
                let stop = d.map(|d| duration("--for", &d)).transpose()?;
                watch(&s, json, all_drift, stop).await
            }
        }
    })
}

async fn devices(s: &ConsoleSettings, json: bool, quiet: Duration, limit: Duration) -> anyhow::Result<()> {
    let mut session = s.session().await?;
    let view = console::survey(&mut session, &s.prefix, true, quiet, limit).await?;
    session.close().await;
    if json {
        for d in view.devices() {
            println!("{}", serde_json::to_string(d)?);
        }
    } else {
        print!("{}", console::view::table(&view, crate::util::unix_now()));
    }
    Ok(())
}

async fn send(s: &ConsoleSettings, a: SendArgs) -> anyhow::Result<()> {
    let args: Value = serde_json::from_str(&a.args).map_err(|e| UsageError(format!("--args: {e}")))?;
    crate::command::Command::parse(&a.command, &args).map_err(UsageError)?;
    let key = match &a.key {
        Some(path) => Some(console::read_key(path).map_err(|e| UsageError(e.to_string()))?),
        None => None,
    };
    let target = match (a.to, a.group) {
        (Some(d), None) => Target::Device(d),
        (None, Some(g)) => Target::Group(g),
        _ => return Err(UsageError("give one of --to DEVICE or --group GROUP".into()).into()),
    };
    if let Target::Device(name) | Target::Group(name) = &target {
        crate::fleet::settings::topic_level(name).map_err(|e| UsageError(format!("`{name}` {e}")))?;
    }
    let request = Request {
        name: a.command,
        args,
        target,
        request_id: a.request_id.unwrap_or_else(|| format!("console-{:016x}", fastrand::u64(..))),
        ttl: duration("--ttl", &a.ttl)?,
        wait: duration("--wait", &a.wait)?,
    };
    let mut session = s.session().await?;
    let view = match request.target {
        Target::Group(_) => console::survey(&mut session, &s.prefix, false, Duration::from_millis(500), Duration::from_secs(30)).await?,
        Target::Device(_) | Target::Devices(_) => console::view::FleetView::new(&s.prefix),
    };
    let report = console::send::send(&mut session, &s.prefix, key.as_ref(), &request, &view).await?;
    session.close().await;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", console::send::table(&report));
    }
    if report.all_succeeded() {
        Ok(())
    } else {
        let c = report.counts();
        let failed: usize = c.iter().filter(|(k, _)| **k != "succeeded").map(|(_, n)| n).sum();
        anyhow::bail!("{failed} of {} devices did not succeed", report.answers.len())
    }
}

async fn rollout(s: &ConsoleSettings, a: RolloutArgs) -> anyhow::Result<()> {
    use console::rollout::{rollout, summary, Plan};
    crate::fleet::settings::topic_level(&a.group).map_err(|e| UsageError(format!("--group: `{}` {e}", a.group)))?;
    crate::command::Command::parse("pin", &serde_json::json!({ "version": a.version })).map_err(|e| UsageError(format!("--version: {e}")))?;
    let step = a.step.trim().trim_end_matches('%').trim().parse::<u32>().ok().filter(|p| (1..=100).contains(p));
    let step_percent = step.ok_or_else(|| UsageError(format!("--step: `{}` is not a percentage from 1% to 100%", a.step)))?;
    let key = match &a.key {
        Some(path) => Some(console::read_key(path).map_err(|e| UsageError(e.to_string()))?),
        None => None,
    };
    let plan = Plan {
        group: a.group,
        version: a.version,
        step_percent,
        interval: duration("--interval", &a.interval)?,
        wait: duration("--wait", &a.wait)?,
        ttl: duration("--ttl", &a.ttl)?,
        max_errors: a.max_errors,
        revert: a.revert,
    };
    let json = a.json;
    let outcome = rollout(s, key.as_ref(), &plan, |line| {
        if !json {
            println!("{line}");
        }
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else {
        print!("{}", summary(&outcome));
    }
    if outcome.completed {
        Ok(())
    } else {
        anyhow::bail!("the rollout of version {} to `{}` stopped", outcome.version, outcome.group)
    }
}

async fn bridge(s: ConsoleSettings, a: BridgeArgs) -> anyhow::Result<()> {
    let secret =
        std::env::var(&a.secret_env).ok().filter(|v| !v.is_empty()).ok_or_else(|| UsageError(format!("--secret-env: {} is not set (the webhook's secret)", a.secret_env)))?;
    let key = console::read_key(&a.key).map_err(|e| UsageError(e.to_string()))?;
    crate::fleet::settings::topic_level(&a.group).map_err(|e| UsageError(format!("--group: `{}` {e}", a.group)))?;
    let spread = duration("--spread", &a.spread)?;
    if spread > crate::command::MAX_SYNC_SPREAD {
        return Err(UsageError(format!("--spread: longer than {}", humantime::format_duration(crate::command::MAX_SYNC_SPREAD))).into());
    }
    let settings =
        console::bridge::BridgeSettings { listen: a.listen, secret: secret.into_bytes(), key, group: a.group, models: a.models, spread, ttl: duration("--ttl", &a.ttl)? };
    let shutdown = crate::lifecycle::Lifecycle::from_signals()?.shutdown;
    console::bridge::serve(settings, s, shutdown).await.with_context(|| format!("serving webhooks on {}", a.listen))
}

async fn watch(s: &ConsoleSettings, json: bool, all_drift: bool, stop: Option<Duration>) -> anyhow::Result<()> {
    use std::io::Write;
    use tokio::signal::unix::{signal, SignalKind};
    let mut session = s.session().await?;
    session.subscribe(&console::watch_filters(&s.prefix)).await?;
    let view = console::view::FleetView::new(&s.prefix);
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // Far enough to mean "until interrupted", near enough for tokio's timer.
    let end = tokio::time::Instant::now() + stop.unwrap_or(Duration::from_secs(100 * 365 * 86400));
    let mut out = std::io::stdout().lock();
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            m = session.next(end) => match m? {
                None => break,
                Some(m) => {
                    if let Some(line) = console::watch_line(&view, &m, all_drift, json) {
                        writeln!(out, "{line}").context("writing to stdout")?;
                        out.flush().context("writing to stdout")?;
                    }
                }
            },
        }
    }
    drop(out);
    session.close().await;
    Ok(())
}
