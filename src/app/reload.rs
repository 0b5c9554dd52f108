//! SIGHUP: re-read the config file, apply what can change while running (the poll interval),
//! and log what needs a restart. A change to a security setting is refused loudly (an
//! error in the journal, the STATUS= line, a `reload_refused` fleet event): the old value
//! stays in force until a restart, and nobody may believe a new key or allow-list is active.

use std::path::Path;

use crate::config::{Config, RegistrySettings};
use crate::pipeline::poller::{Control, Op};

/// SIGHUP: re-reads the config file and applies what can change while running (the poll
/// interval, then a poll); everything else is reported as needing a restart. A file that
/// does not load keeps the running config.
///
/// Returns the config now in force and the security settings whose change was refused.
pub(super) async fn reload(path: &Path, running: Config, control: &Control) -> (Config, Vec<&'static str>) {
    let fresh = match Config::load_for_daemon(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: the config file does not load; keeping the running config");
            return (running, Vec::new());
        }
    };
    let refused = security_changes(&running, &fresh);
    if !refused.is_empty() {
        tracing::error!(
            settings = %refused.join(", "),
            "SIGHUP: RELOAD REFUSED for security settings: they are not applied by a reload, and the old values stay in force; restart the service (systemctl restart edgeflow) to apply them"
        );
    }
    let (Ok(old), Ok(new)) = (running.registry.resolve(), fresh.registry.resolve()) else { return (running, refused) };
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
    (kept, refused)
}

/// The security settings that differ between `running` and `fresh`: who may command the
/// device, who may use the API, where credentials may go, which peers are trusted.
fn security_changes(running: &Config, fresh: &Config) -> Vec<&'static str> {
    let (a, b) = (&running.fleet, &fresh.fleet);
    let (sa, sb) = (&running.serve, &fresh.serve);
    let (ra, rb) = (&running.registry, &fresh.registry);
    let checks: [(&'static str, bool); 18] = [
        ("fleet.signature_public_key", a.signature_public_key != b.signature_public_key),
        ("fleet.require_signatures", a.require_signatures != b.require_signatures),
        ("fleet.signature_max_age", a.signature_max_age != b.signature_max_age),
        ("fleet.ca_file", a.ca_file != b.ca_file),
        ("fleet.cert_file", a.cert_file != b.cert_file),
        ("fleet.key_file", a.key_file != b.key_file),
        ("fleet.username_env", a.username_env != b.username_env),
        ("fleet.password_env", a.password_env != b.password_env),
        ("fleet.allow_plaintext_credentials", a.allow_plaintext_credentials != b.allow_plaintext_credentials),
        ("serve.token_env", sa.token_env != sb.token_env),
        ("serve.allowed_uids", sa.allowed_uids != sb.allowed_uids),
        ("serve.allowed_gids", sa.allowed_gids != sb.allowed_gids),
        ("serve.socket_mode", sa.socket_mode != sb.socket_mode),
        ("serve.socket_group", format!("{:?}", sa.socket_group) != format!("{:?}", sb.socket_group)),
        ("serve.tcp_listen", sa.tcp_listen != sb.tcp_listen),
        ("registry.url", ra.url != rb.url),
        ("registry.ca_bundle", ra.ca_bundle != rb.ca_bundle),
        ("registry.allow_plaintext_credentials", ra.allow_plaintext_credentials != rb.allow_plaintext_credentials),
    ];
    checks.into_iter().filter(|(_, changed)| *changed).map(|(name, _)| name).collect()
}

/// The registry settings that need a restart to change, for comparison.
#[derive(PartialEq)]
pub(super) struct RegistrySettingsView(String);

impl From<&RegistrySettings> for RegistrySettingsView {
    fn from(r: &RegistrySettings) -> Self {
        RegistrySettingsView(format!("{:?} {:?} {:?} {:?} {:?} {:?} {:?}", r.url, r.model, r.target, r.ca_bundle, r.parallel_downloads, r.bandwidth_limit, r.poll_jitter))
    }
}
