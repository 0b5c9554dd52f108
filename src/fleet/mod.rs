//! The fleet link: this device's MQTT connection to the fleet console.
//!
//! One task ([`Link::spawn`]) owns the connection and everything it sends:
//!
//! - `status` (retained): `online` when connected, `offline` by the Last Will when the device
//!   vanishes, `offline` with reason `shutdown` on a clean stop;
//! - `health` every `report_interval`, `drift` every `drift_interval` (when there were
//!   requests), and `events` as they happen, all through the on-disk [`spool`], so nothing
//!   is lost while the broker is unreachable and everything arrives in order;
//! - replies to commands received on `cmd/<name>`, which run through the shared
//!   [`crate::command::Bus`] after their envelope, signature and request id are checked
//!   ([`commands`]).
//!
//! The link never blocks the daemon: reports are built from the status `watch`, the
//! metrics and the drift recorder, events go through a bounded queue, and a broker that is
//! down only means retries with jittered exponential backoff. README.md documents every
//! topic and payload ("MQTT topics and payloads").

pub mod commands;
pub mod events;
pub mod health;
mod link;
mod reconnect;
mod replies;
mod reports;
mod runner;
pub mod settings;
pub mod spool;
pub mod tls;
pub mod topics;
pub mod wire;

pub use events::Event;
pub use link::{Link, LinkHandle, LinkSender, LinkState};
pub use settings::{FleetConfig, FleetSettings, Protocol};

/// Version of every payload's layout; each payload carries it as `schema`.
pub const SCHEMA: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("opening the fleet spool")]
    Spool(#[from] spool::SpoolError),
}
