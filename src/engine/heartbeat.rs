//! The engine's heartbeat: when the step an engine thread is busy with should be over, so
//! that another thread (the health checks, the systemd watchdog) can tell a busy engine from
//! a stuck one without waiting on it.
//!
//! A step is one unit of work that cannot be interrupted: rendering the chat template and
//! tokenizing the prompt, or one forward pass of the model. Each is allowed
//! [`StepAllowance::base`] plus [`StepAllowance::per_token`] for every token it feeds the
//! model, so a long prefill on a slow device is not mistaken for a hang. One atomic holds the
//! deadline; reading it never blocks the engine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long one step may take before the engine counts as stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepAllowance {
    /// Any step: a template render (fuel-bounded, well under a second), tokenizing a prompt,
    /// one decode step (seconds at worst on an edge CPU).
    pub base: Duration,
    /// Added per token the step feeds the model (a prefill of the whole prompt).
    pub per_token: Duration,
}

impl StepAllowance {
    /// A minute per step and a quarter second per prompt token: two orders of magnitude above
    /// what a 4-bit 4B model takes on a Raspberry Pi class CPU.
    pub const DEFAULT: StepAllowance = StepAllowance { base: Duration::from_secs(60), per_token: Duration::from_millis(250) };

    fn for_tokens(self, tokens: usize) -> Duration {
        self.base.saturating_add(self.per_token.saturating_mul(u32::try_from(tokens).unwrap_or(u32::MAX)))
    }
}

impl Default for StepAllowance {
    fn default() -> Self {
        StepAllowance::DEFAULT
    }
}

/// When the current step of one engine thread is due to end.
#[derive(Debug)]
pub struct Heartbeat {
    allowance: StepAllowance,
    origin: Instant,
    /// Microseconds after `origin` by which the current step should have ended; 0 while idle.
    deadline: AtomicU64,
}

impl Heartbeat {
    pub fn new(allowance: StepAllowance) -> Heartbeat {
        Heartbeat { allowance, origin: Instant::now(), deadline: AtomicU64::new(0) }
    }

    pub fn allowance(&self) -> StepAllowance {
        self.allowance
    }

    /// A step that feeds the model `tokens` tokens (0 for one that feeds none) begins now.
    pub fn step(&self, tokens: usize) {
        let due = self.now().saturating_add(micros(self.allowance.for_tokens(tokens))).max(1);
        self.deadline.store(due, Ordering::Relaxed);
    }

    /// The engine waits for work: nothing can be overdue.
    pub fn idle(&self) {
        self.deadline.store(0, Ordering::Relaxed);
    }

    /// How far the current step has run past its allowance; `None` while idle or in time.
    pub fn overdue(&self) -> Option<Duration> {
        let due = self.deadline.load(Ordering::Relaxed);
        let now = self.now();
        (due != 0 && now > due).then(|| Duration::from_micros(now - due))
    }

    fn now(&self) -> u64 {
        micros(self.origin.elapsed())
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_overdue_only_past_its_allowance_and_never_while_idle() {
        let quick = Heartbeat::new(StepAllowance { base: Duration::from_millis(20), per_token: Duration::from_millis(20) });
        assert_eq!(quick.overdue(), None, "a new engine is idle");
        quick.step(0);
        assert_eq!(quick.overdue(), None, "within its allowance");
        std::thread::sleep(Duration::from_millis(40));
        assert!(quick.overdue().is_some(), "a 20 ms step still running after 40 ms");
        quick.step(5);
        assert_eq!(quick.overdue(), None, "a new step (5 tokens: 120 ms) starts the clock again");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(quick.overdue(), None, "the prefill's allowance grows with its tokens");
        quick.idle();
        assert_eq!(quick.overdue(), None);
    }

    #[test]
    fn allowances_saturate() {
        let a = StepAllowance { base: Duration::MAX, per_token: Duration::MAX };
        assert_eq!(a.for_tokens(usize::MAX), Duration::MAX);
        let h = Heartbeat::new(a);
        h.step(usize::MAX);
        assert_eq!(h.overdue(), None);
        assert_eq!(StepAllowance::DEFAULT.for_tokens(4096), Duration::from_secs(60 + 1024));
    }
}
