//! The one jittered exponential backoff every retry loop uses, and the per-device jitter that
//! keeps a fleet from polling in lockstep.
//!
//! Delays follow "full jitter": attempt `n` waits a uniformly random time in
//! `[0, min(max, initial * 2^n)]`, which spreads a fleet's retries after a shared outage
//! better than a fixed exponential schedule does.

use std::future::Future;
use std::time::Duration;

/// Retry policy: how long to wait between attempts and how many attempts to make.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Upper bound of the first delay.
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
    /// Attempts in total, the first included; 1 means no retry.
    pub max_attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(500), max: Duration::from_secs(30), max_attempts: 5 }
    }
}

impl Backoff {
    /// The ceiling of the delay before retry number `retry` (0 = the first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.min(30));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// A random delay in `[0, ceiling(retry)]`.
    pub fn delay(&self, retry: u32) -> Duration {
        self.ceiling(retry).mul_f64(fastrand::f64())
    }

    /// Runs `op` until it succeeds, fails with an error `retryable` rejects, or the attempts
    /// run out; sleeps a jittered delay between attempts. `on_retry` sees each error that
    /// will be retried and the delay chosen (for logs and progress output).
    ///
    /// # Errors
    /// The last error of `op`.
    pub async fn retry<T, E, F, Fut>(&self, mut op: F, retryable: impl Fn(&E) -> bool, mut on_retry: impl FnMut(&E, Duration)) -> Result<T, E>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 0;
        loop {
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) if attempt + 1 < self.max_attempts.max(1) && retryable(&e) => {
                    let delay = self.delay(attempt);
                    on_retry(&e, delay);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Spreads a periodic task over its interval, differently on every device.
///
/// The first run waits a device-specific fraction of the interval (stable across restarts,
/// so a fleet rebooted together still spreads out); every later interval is stretched or
/// shrunk by a random factor in `[1 - jitter, 1 + jitter]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jitter {
    pub interval: Duration,
    /// Fraction of the interval, in `[0, 1)`.
    pub jitter: f64,
    /// Position of this device in `[0, 1)`, from [`device_phase`].
    pub phase: f64,
}

impl Jitter {
    /// This machine's jitter for `interval` (phase from [`machine_id`]).
    pub fn for_this_device(interval: Duration, jitter: f64) -> Jitter {
        Jitter { interval, jitter, phase: device_phase(&machine_id()) }
    }

    /// Delay before the first run.
    pub fn first(&self) -> Duration {
        self.interval.mul_f64(self.phase.clamp(0.0, 1.0) * self.jitter.clamp(0.0, 1.0))
    }

    /// Delay between two runs.
    pub fn next(&self) -> Duration {
        let j = self.jitter.clamp(0.0, 0.99);
        self.interval.mul_f64(1.0 - j + 2.0 * j * fastrand::f64())
    }
}

/// A stable number in `[0, 1)` for this device: a hash of `device_id` (for example the
/// content of `/etc/machine-id`).
pub fn device_phase(device_id: &str) -> f64 {
    // FNV-1a: stable across releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device_id.trim().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's high bits barely move between similar ids ("device-1", "device-2"): finish
    // with murmur3's mixer so the phase spreads over the whole interval.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The machine id (`/etc/machine-id`, then the hostname), for [`device_phase`].
pub fn machine_id() -> String {
    for path in ["/etc/machine-id", "/var/lib/dbus/machine-id", "/proc/sys/kernel/hostname"] {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return s.trim().to_string();
            }
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn ceilings_double_and_cap() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1), max_attempts: 10 };
        let table = [(0, 100), (1, 200), (2, 400), (3, 800), (4, 1000), (40, 1000)];
        for (retry, ms) in table {
            assert_eq!(b.ceiling(retry), Duration::from_millis(ms), "retry {retry}");
            for _ in 0..50 {
                assert!(b.delay(retry) <= b.ceiling(retry));
            }
        }
    }

    #[test]
    fn device_phase_is_stable_and_spread() {
        assert_eq!(device_phase("abc"), device_phase("abc\n"));
        let phases: Vec<f64> = (0..200).map(|i| device_phase(&format!("device-{i}"))).collect();
        assert!(phases.iter().all(|p| (0.0..1.0).contains(p)));
        // Spread over the interval: every tenth of it holds some devices.
        for decile in 0..10 {
            let lo = decile as f64 / 10.0;
            assert!(phases.iter().any(|p| (lo..lo + 0.1).contains(p)), "no device in decile {decile}");
        }
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let j = Jitter { interval: Duration::from_secs(100), jitter: 0.2, phase: 0.5 };
        assert_eq!(j.first(), Duration::from_secs(10));
        for _ in 0..200 {
            let d = j.next();
            assert!(d >= Duration::from_secs(80) && d <= Duration::from_secs(120), "{d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_on_success_on_a_permanent_error_and_after_max_attempts() {
        let b = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(4), max_attempts: 4 };
        // Succeeds on the third attempt.
        let calls = AtomicU32::new(0);
        let r: Result<u32, &str> = b
            .retry(
                |n| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n < 2 {
                            Err("transient")
                        } else {
                            Ok(n)
                        }
                    }
                },
                |_| true,
                |_, _| {},
            )
            .await;
        assert_eq!(r, Ok(2));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // A permanent error is returned at once.
        let calls = AtomicU32::new(0);
        let r: Result<(), &str> = b
            .retry(
                |_| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async { Err("permanent") }
                },
                |e| *e != "permanent",
                |_, _| {},
            )
            .await;
        assert_eq!(r, Err("permanent"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Always transient: max_attempts calls, then the last error; the delays respect the ceilings.
        let mut delays = Vec::new();
        let r: Result<(), &str> = b.retry(|_| async { Err("transient") }, |_| true, |_, d| delays.push(d)).await;
        assert_eq!(r, Err("transient"));
        assert_eq!(delays.len(), 3);
        for (i, d) in delays.iter().enumerate() {
            assert!(*d <= b.ceiling(i as u32));
        }
    }
}
