//! `edgeflow serve`: one local model folder on the API, no registry, no fleet. Stops when the
//! lifecycle says so, with the same drain as the daemon.

use std::path::PathBuf;
use std::sync::Arc;

use crate::active::{Manager, ManagerOptions, ModelSource};
use crate::config::ServeSettings;
use crate::lifecycle::Lifecycle;
use crate::serve::{App, Listeners};
use crate::telemetry::Metrics;

/// Serves `source` on `listeners` until `lifecycle.shutdown` is cancelled. The socket answers
/// `/healthz` (and 503 with Retry-After for generation) while the model loads.
///
/// # Errors
/// The model cannot be loaded.
pub async fn serve(
    settings: ServeSettings,
    options: ManagerOptions,
    source: ModelSource,
    config_path: Option<PathBuf>,
    listeners: Listeners,
    lifecycle: Lifecycle,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let manager = Manager::new(options, metrics.clone());
    let socket_path = listeners.socket_path().display().to_string();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = ?config_path,
        socket = %socket_path,
        tcp = ?settings.tcp_listen,
        model_dir = %source.dir.display(),
        "edgeflow serve starting"
    );
    let stop_http = tokio_util::sync::CancellationToken::new();
    let app = App::from_settings(manager.clone(), metrics, &settings);
    let mut servers = listeners.serve(&app, &stop_http);
    let activated = tokio::select! {
        result = manager.activate(source.clone()) => Some(result),
        () = lifecycle.shutdown.cancelled() => None,
    };
    let outcome = match activated {
        Some(Ok(info)) => {
            eprintln!("edgeflow serve: {}@{} ready on {socket_path}", info.name, info.version);
            lifecycle.shutdown.cancelled().await;
            Ok(())
        }
        Some(Err(e)) => Err(anyhow::Error::new(e)),
        None => Ok(()),
    };
    stop_http.cancel();
    servers.drain().await;
    manager.deactivate().await;
    servers.close();
    outcome
}
