//! edgeflow: a self-updating, fleet-managed LLM endpoint for Linux edge devices.
//!
//! The data flows registry → fetch → cache → engine → serve, with fleet reporting beside it.
//! This crate is the library; `cli` is the command line over it and `main.rs` only calls `cli::main`.

pub mod active;
pub mod app;
pub mod backoff;
pub mod cache;
pub mod cli;
pub mod command;
pub mod config;
pub mod console;
pub mod crash;
pub mod engine;
pub mod fetch;
pub mod fleet;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
pub mod lifecycle;
pub mod notify;
pub mod pipeline;
pub mod registry;
pub mod serve;
pub mod simulate;
pub mod status;
pub mod telemetry;
pub mod util;
