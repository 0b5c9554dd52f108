//! Crash points: named places between two durable writes, where the crash-consistency
//! campaign (tests/crash.rs, RELIABILITY.md) kills the process to prove that what is on disk
//! after any of them is consistent.
//!
//! Inert unless the process was started with one of these in its environment (read once):
//! - `EDGEFLOW_CRASH_TRACE=<file>`: append the name of every point passed to `file`, one per
//!   line (the campaign's dry run, which lists the points a scenario passes);
//! - `EDGEFLOW_CRASH_AT=<k>`: SIGKILL this process at the `k`-th point it passes (1-based,
//!   every name counted), after tracing it;
//! - `EDGEFLOW_CRASH_AT=<name>[:<n>]`: SIGKILL at the `n`-th (default first) pass of `name`.
//!
//! A SIGKILL, not a panic or an exit: nothing unwinds, no destructor or buffered write runs,
//! as after a power cut or the OOM killer (the page cache survives, which the campaign's
//! checks do not rely on beyond what fsync promises). Whoever sets a process's environment can
//! already kill it, so the hook gives nobody a power they did not have; unset, a point costs
//! one atomic load.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Passes the named point: traces it and kills the process if the environment says so.
pub fn point(name: &'static str) {
    let Some(plan) = plan() else { return };
    // Held through the kill, so the killing point is the trace's last line.
    let _guard = TRACE_LOCK.lock();
    let passed = PASSED.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(trace) = &plan.trace {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(trace) {
            let _ = writeln!(f, "{name}");
        }
    }
    let hit = match &plan.at {
        Some(At::Index(k)) => passed == *k,
        Some(At::Named(at, n)) if at == name => {
            let count = NAMED.fetch_add(1, Ordering::SeqCst) + 1;
            count == *n
        }
        _ => false,
    };
    if hit {
        tracing::warn!(point = name, passed, "crash point reached: killing this process (EDGEFLOW_CRASH_AT)");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

static PASSED: AtomicU64 = AtomicU64::new(0);
static NAMED: AtomicU64 = AtomicU64::new(0);
static TRACE_LOCK: Mutex<()> = Mutex::new(());

#[derive(Debug, PartialEq, Eq)]
enum At {
    Index(u64),
    Named(String, u64),
}

#[derive(Debug)]
struct Plan {
    trace: Option<std::path::PathBuf>,
    at: Option<At>,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let trace = std::env::var_os("EDGEFLOW_CRASH_TRACE").map(std::path::PathBuf::from);
        let at = std::env::var("EDGEFLOW_CRASH_AT").ok().and_then(|s| parse_at(&s));
        (trace.is_some() || at.is_some()).then_some(Plan { trace, at })
    })
    .as_ref()
}

fn parse_at(s: &str) -> Option<At> {
    let s = s.trim();
    if let Ok(k) = s.parse::<u64>() {
        return (k > 0).then_some(At::Index(k));
    }
    let (name, n) = match s.rsplit_once(':') {
        Some((name, n)) => (name, n.parse::<u64>().ok().filter(|&n| n > 0)?),
        None => (s, 1),
    };
    (!name.is_empty()).then(|| At::Named(name.to_string(), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_targets_parse() {
        for (text, want) in [
            ("7", Some(At::Index(7))),
            (" 12 ", Some(At::Index(12))),
            ("0", None),
            ("cache.blob.synced", Some(At::Named("cache.blob.synced".into(), 1))),
            ("cache.blob.synced:3", Some(At::Named("cache.blob.synced".into(), 3))),
            ("cache.blob.synced:0", None),
            ("cache.blob.synced:x", None),
            (":2", None),
            ("", None),
        ] {
            assert_eq!(parse_at(text), want, "{text:?}");
        }
    }
}
