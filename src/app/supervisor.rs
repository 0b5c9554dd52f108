//! The supervisor: makes the engine follow what the poller activates in the cache, sends the
//! poller back to the last-known-good version when the engine cannot serve a new one, and keeps
//! the shared status (and systemd's READY/STATUS) up to date.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::active::{Manager, ModelSource};
use crate::cache::Store;
use crate::fleet::{Event, LinkSender};
use crate::notify::Notifier;
use crate::pipeline::poller::{Control, Op};
use crate::pipeline::pull::SMOKE_TEST_DEATHS;
use crate::pipeline::Status as PollStatus;
use crate::status::{LoadFailure, ModelStatus, Publisher};

/// Makes the engine follow the poller and keeps the shared status up to date.
pub(super) struct Supervisor {
    pub(super) model: String,
    pub(super) target: String,
    pub(super) store: Store,
    pub(super) manager: Manager,
    pub(super) control: Control,
    pub(super) publisher: Publisher,
    pub(super) events: Option<LinkSender>,
    pub(super) notifier: Arc<Notifier>,
}

impl Supervisor {
    pub(super) async fn run(self, mut polls: watch::Receiver<PollStatus>, stop: CancellationToken) {
        let mut previous: Option<PollStatus> = None;
        let mut ready = false;
        loop {
            let current = polls.borrow_and_update().clone();
            self.publisher.update(|s| {
                s.registry = Some((&current).into());
                s.pinned = current.pinned.clone();
            });
            if let (Some(event), Some(events)) = (Event::from_poll(previous.as_ref(), &current), &self.events) {
                events.event(event);
            }
            if let Some(active) = &current.active {
                let source = ModelSource { dir: active.dir.clone(), name: self.model.clone(), version: active.version.clone(), digest: self.digest(&active.version) };
                // Loading a version the engine does not serve yet is counted on disk first:
                // a version the daemon died loading, again and again (at every start-up, say),
                // is refused instead of crash-looping the device.
                // A version refused that way stays unloaded even when there was nothing to go
                // back to (it stays the cache's active one until a good version arrives).
                let loading = self.manager.current().is_none_or(|a| a.info().version != source.version);
                let skip = if !loading {
                    false
                } else if self.is_refused(&source.version) {
                    tracing::debug!(version = %source.version, "not loading a version refused earlier");
                    true
                } else if let Some(died) = self.load_begins(&source.version).await.filter(|d| *d >= SMOKE_TEST_DEATHS) {
                    let reason =
                        format!("the daemon died each of the last {died} times it loaded this version (out of memory, or a crash in its graph); refused without another try");
                    tracing::error!(version = %source.version, %reason, "refusing a version that keeps killing the daemon; going back to the last-known-good one");
                    self.refuse(&source.version, reason).await;
                    true
                } else {
                    false
                };
                let ensured = if skip {
                    None
                } else {
                    tokio::select! {
                        r = self.manager.ensure(source.clone()) => Some(r),
                        () = stop.cancelled() => return,
                    }
                };
                match ensured {
                    None => {}
                    Some(Ok(info)) => {
                        if loading {
                            self.load_ended(&info.version).await;
                        }
                        let target = if current.pinned.is_some() { format!("pinned:{}", info.version) } else { self.target.clone() };
                        self.publisher.update(|s| {
                            s.model = Some(ModelStatus {
                                name: info.name.clone(),
                                version: info.version.clone(),
                                digest: info.digest.clone(),
                                target: Some(target),
                                activated_at: crate::util::unix_secs(info.activated_at),
                                dir: Some(info.dir.clone()),
                            });
                        });
                    }
                    Some(Err(e)) => {
                        let reason = crate::util::chain(&e);
                        tracing::error!(version = %source.version, %reason, "the engine cannot serve this version; going back to the last-known-good one");
                        self.refuse(&source.version, reason).await;
                    }
                }
            }
            if current.cache_read && !ready {
                ready = true;
                let line = match self.manager.current() {
                    Some(a) => format!("serving {}@{}", a.info().name, a.info().version),
                    None if current.active.is_none() => format!("waiting for the first version of {} ({})", self.model, self.target),
                    None => "no model could be loaded; see the logs".to_string(),
                };
                tracing::info!(status = %line, "ready");
                self.notifier.ready(&line);
            }
            previous = Some(current);
            tokio::select! {
                changed = polls.changed() => if changed.is_err() { return },
                () = stop.cancelled() => return,
            }
        }
    }

    /// Tells the poller to go back to the last-known-good version, saying why everywhere.
    async fn refuse(&self, version: &str, reason: String) {
        self.publisher.update(|s| s.load_failure = Some(LoadFailure { version: version.to_string(), reason: reason.clone(), at: crate::util::unix_now() }));
        if let Some(events) = &self.events {
            events.event(Event::SmokeTestFailed { model: self.model.clone(), version: version.to_string(), reason: reason.clone() });
        }
        // The poller's answer arrives as a new status on `polls`.
        if let Err(e) = self.control.call(Op::Reject { version: version.to_string(), reason }).await {
            tracing::error!(error = %e, "could not go back to the last-known-good version");
        }
    }

    /// Records durably that the engine starts loading `version`, and returns how many loads
    /// of it (smoke tests count the same way) began before and never ended. `None` when the
    /// cache could not say (logged; the load goes on).
    async fn load_begins(&self, version: &str) -> Option<u32> {
        self.in_cache(version, |store, model, v| store.begin_smoke_test(model, v)).await
    }

    /// Records that the engine loaded `version`: that load is no death.
    async fn load_ended(&self, version: &str) {
        self.in_cache(version, |store, model, v| store.mark_good(model, v)).await;
    }

    /// Runs `op` on the cache off the async threads; its failure is logged and `None`.
    async fn in_cache<T: Send + 'static>(&self, version: &str, op: impl FnOnce(&Store, &str, &str) -> Result<T, crate::cache::CacheError> + Send + 'static) -> Option<T> {
        let (store, model, v) = (self.store.clone(), self.model.clone(), version.to_string());
        let result = tokio::task::spawn_blocking(move || op(&store, &model, &v)).await;
        match result.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
            Ok(t) => Some(t),
            Err(error) => {
                tracing::warn!(%version, %error, "recording the engine's load of this version");
                None
            }
        }
    }

    /// Whether the cache records `version` as refused (bad).
    fn is_refused(&self, version: &str) -> bool {
        matches!(self.store.version(&self.model, version), Ok(Some(rec)) if matches!(rec.state, crate::cache::State::Bad { .. }))
    }

    fn digest(&self, version: &str) -> Option<String> {
        match self.store.version(&self.model, version) {
            Ok(Some(rec)) => Some(rec.digest()),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "reading the version's record");
                None
            }
        }
    }
}
