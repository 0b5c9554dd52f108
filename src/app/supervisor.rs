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
                let ensured = tokio::select! {
                    r = self.manager.ensure(source.clone()) => r,
                    () = stop.cancelled() => return,
                };
                match ensured {
                    Ok(info) => {
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
                    Err(e) => {
                        let reason = crate::util::chain(&e);
                        tracing::error!(version = %source.version, %reason, "the engine cannot serve this version; going back to the last-known-good one");
                        self.publisher.update(|s| s.load_failure = Some(LoadFailure { version: source.version.clone(), reason: reason.clone(), at: crate::util::unix_now() }));
                        if let Some(events) = &self.events {
                            events.event(Event::SmokeTestFailed { model: self.model.clone(), version: source.version.clone(), reason: reason.clone() });
                        }
                        // The poller's answer arrives as a new status on `polls`.
                        if let Err(e) = self.control.call(Op::Reject { version: source.version.clone(), reason }).await {
                            tracing::error!(error = %e, "could not go back to the last-known-good version");
                        }
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
