//! The daemon's config file: parsed and checked as `edgeflow run` loads it, then typed section
//! by section as the daemon starts its subsystems. Every duration it accepts must be usable as
//! a deadline or a next run (the daemon adds them to the clock).
#![no_main]

use std::time::{Duration, Instant};

use edgeflow::serve::Limits;
use libfuzzer_sys::fuzz_target;

fn usable(durations: &[Duration]) {
    let now = Instant::now();
    for d in durations {
        // Twice the value: a jittered interval may stretch it by up to that much.
        assert!(d.checked_mul(2).and_then(|d| now.checked_add(d)).is_some(), "{d:?} overflows the clock");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = edgeflow::fuzzing::daemon_config(text) else { return };
    // A config that passed the check types without a problem.
    let _ = config.load_options();
    let registry = config.registry.resolve().expect("registry resolves after the check");
    usable(&[registry.connect_timeout, registry.request_timeout, registry.read_timeout, registry.poll_interval, registry.backoff.initial, registry.backoff.max]);
    let cache = config.cache.resolve().expect("cache resolves after the check");
    usable(&[cache.partial_max_age]);
    let serve = config.serve.resolve().expect("serve resolves after the check");
    usable(&[serve.request_timeout, serve.shutdown_grace, serve.header_timeout, serve.stream_interval]);
    let _ = Limits::from(&serve);
    if let Some(fleet) = config.fleet.resolve().expect("fleet resolves after the check") {
        usable(&[fleet.keep_alive, fleet.connect_timeout, fleet.report_interval, fleet.drift_interval, fleet.command_window, fleet.signature_max_age]);
    }
});
