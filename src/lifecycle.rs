//! How a long-running command is told to stop or reload. The library's daemons take a
//! [`Lifecycle`] instead of installing signal handlers themselves, so a test (or an embedder)
//! drives them in-process; the command line connects it to SIGTERM, SIGINT and SIGHUP with
//! [`Lifecycle::from_signals`].

use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Stop and reload requests for one daemon.
#[derive(Clone, Default)]
pub struct Lifecycle {
    /// Cancelled once: stop accepting, drain, exit.
    pub shutdown: CancellationToken,
    /// Notified for each reload request (SIGHUP); requests made while one is handled coalesce.
    pub reload: Arc<Notify>,
}

impl Lifecycle {
    /// A lifecycle only its holder triggers.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// SIGTERM and SIGINT cancel [`Lifecycle::shutdown`], SIGHUP notifies
    /// [`Lifecycle::reload`]. Needs a Tokio runtime with signals enabled.
    ///
    /// # Errors
    /// A handler cannot be installed.
    pub fn from_signals() -> anyhow::Result<Self> {
        let this = Self::new();
        let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let (shutdown, reload) = (this.shutdown.clone(), this.reload.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = terminate.recv() => break,
                    _ = interrupt.recv() => break,
                    _ = hangup.recv() => reload.notify_one(),
                    () = shutdown.cancelled() => return,
                }
            }
            tracing::info!("stop requested by signal");
            shutdown.cancel();
        });
        Ok(this)
    }
}
