//! The MLflow Model Registry, as edgeflow reads it: the REST [`Client`] (stage and alias
//! lookups, artifact listings and downloads, with auth, TLS, timeouts and retries), `MLmodel`
//! flavor parsing, and the `[registry]` settings. What is done with a version, pulling it
//! into the cache and following the registry over time, is [`crate::pipeline`]'s.

pub(crate) mod client;
mod error;
pub mod mlmodel;
pub mod settings;

pub use client::{proxy_path, Auth, Client, ModelVersion, RemoteFile};
pub use error::RegistryError;
pub use settings::{RegistrySettings, Target};
