//! SIGHUP: re-read the config file, apply what can change while running (the poll interval),
//! and log what needs a restart.

use std::path::Path;

use crate::config::{Config, RegistrySettings};
use crate::pipeline::poller::{Control, Op};

/// SIGHUP: re-reads the config file and applies what can change while running (the poll
/// interval, then a poll); everything else is reported as needing a restart. A file that
/// does not load keeps the running config.
pub(super) async fn reload(path: &Path, running: Config, control: &Control) -> Config {
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
pub(super) struct RegistrySettingsView(String);

impl From<&RegistrySettings> for RegistrySettingsView {
    fn from(r: &RegistrySettings) -> Self {
        RegistrySettingsView(format!("{:?} {:?} {:?} {:?} {:?} {:?} {:?}", r.url, r.model, r.target, r.ca_bundle, r.parallel_downloads, r.bandwidth_limit, r.poll_jitter))
    }
}
