//! What the daemon measures about itself: request and generation metrics exported in the
//! Prometheus text format. Drift sketches (issue: fleet reporting) will live beside them.

pub mod drift;
pub mod metrics;

pub use metrics::Metrics;
