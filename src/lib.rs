//! edgeflow: a self-updating, fleet-managed LLM endpoint for Linux edge devices.
//!
//! The data flows registry → fetch → cache → engine → serve, with fleet reporting beside it.
//! This crate is the library; `main.rs` is a thin CLI over it.

pub mod active;
pub mod app;
pub mod backoff;
pub mod cache;
pub mod command;
pub mod config;
pub mod engine;
pub mod fetch;
pub mod fleet;
pub mod notify;
pub mod registry;
pub mod serve;
pub mod status;
pub mod telemetry;
