//! The reconnect policy of the link: when to try the broker again (equal-jitter backoff) and
//! with which protocol version (the MQTT 5 → 3.1.1 fallback of `protocol = "auto"`, tentative
//! when the broker only hung up). Pure, so its policy is tested without a broker.

use std::time::Duration;

use super::settings::Protocol;
use super::wire::{Closed, Version};
use crate::backoff::Backoff;

/// When and with which protocol version to connect next.
#[derive(Debug, Clone)]
pub(super) struct Reconnect {
    backoff: Backoff,
    mode: Protocol,
    /// The version of the next attempt.
    pub(super) version: Version,
    /// Failed attempts since the last successful connection.
    retry: u32,
    v5_ever_connected: bool,
    fallback_tried: bool,
    /// The 3.1.1 fallback came from a hang-up, not a refusal: once 3.1.1 is up, 5 is tried
    /// again ([`Reconnect::probe`]).
    tentative: bool,
    /// 5 was tried again after a tentative fallback; another hang-up makes 3.1.1 final.
    probed: bool,
}

impl Reconnect {
    pub(super) fn new(backoff: Backoff, mode: Protocol, version: Version) -> Reconnect {
        Reconnect { backoff, mode, version, retry: 0, v5_ever_connected: false, fallback_tried: false, tentative: false, probed: false }
    }

    pub(super) fn connected(&mut self) {
        self.retry = 0;
        if self.version == Version::V5 {
            self.v5_ever_connected = true;
        }
    }

    /// Whether the connection now up runs on a tentative 3.1.1 fallback, so the link should
    /// [`probe`](Reconnect::probe) 5 once it has been up a while.
    pub(super) fn tentative(&self) -> bool {
        self.tentative && self.version == Version::V311
    }

    /// The link left a tentative 3.1.1 connection on purpose: try 5 again, at once. If 5 is
    /// hung up on again the fallback is final.
    pub(super) fn probe(&mut self) {
        self.version = Version::V5;
        self.fallback_tried = false;
        self.tentative = false;
        self.probed = true;
        self.retry = 0;
    }

    /// After a connection ended: the delay before the next attempt (the version to use is
    /// then `self.version`).
    pub(super) fn closed(&mut self, c: &Closed) -> Duration {
        // A broker that cannot speak MQTT 5 gets one immediate retry with 3.1.1, and keeps
        // it if it works; a broker that once spoke 5 is never downgraded by a flaky network.
        // A hang-up is weaker evidence than a refusal (a restarting broker, a balancer with no
        // live node behind it hang up too), so the fallback it earns is checked once later.
        if self.mode == Protocol::Auto && self.version == Version::V5 && c.protocol_refused && !self.v5_ever_connected && !self.fallback_tried {
            self.version = Version::V311;
            self.fallback_tried = true;
            self.tentative = c.hung_up && !self.probed;
            return Duration::ZERO;
        }
        if self.mode == Protocol::Auto && self.version == Version::V311 && c.before_connack && self.retry > 0 {
            // 3.1.1 did not help either: the problem is elsewhere; go back to 5 and back off.
            self.version = Version::V5;
            self.fallback_tried = false;
            self.tentative = false;
        }
        if !c.before_connack {
            self.retry = 0;
        }
        // DEVNOTE: half fixed, half jittered ("equal jitter") on top of the shared full-jitter
        // backoff: full jitter alone can draw a near-zero delay, and a link must never spin.
        let d = self.backoff.ceiling(self.retry) / 2 + self.backoff.delay(self.retry) / 2;
        self.retry = self.retry.saturating_add(1);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(before_connack: bool, protocol_refused: bool) -> Closed {
        Closed { error: "x".into(), before_connack, protocol_refused, hung_up: false, refused: false }
    }

    fn hang_up() -> Closed {
        Closed { error: "eof".into(), before_connack: true, protocol_refused: true, hung_up: true, refused: false }
    }

    #[test]
    fn backoff_grows_caps_and_never_spins() {
        let b = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(60), max_attempts: u32::MAX };
        let mut r = Reconnect::new(b, Protocol::V5, Version::V5);
        let mut delays = Vec::new();
        for _ in 0..12 {
            delays.push(r.closed(&closed(true, false)));
        }
        for (i, d) in delays.iter().enumerate() {
            let ceiling = b.ceiling(i as u32);
            assert!(*d >= ceiling / 2 && *d <= ceiling, "attempt {i}: {d:?} outside [{:?}, {ceiling:?}]", ceiling / 2);
        }
        assert!(delays[11] >= Duration::from_secs(30), "capped at max, at least half of it");
        // A connection that was up and then dropped starts over from the small delay.
        r.connected();
        assert!(r.closed(&closed(false, false)) <= Duration::from_secs(1));
    }

    #[test]
    fn auto_falls_back_to_3_1_1_once_and_only_for_a_broker_that_never_spoke_5() {
        let b = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(60), max_attempts: u32::MAX };
        let mut r = Reconnect::new(b, Protocol::Auto, Version::V5);
        assert_eq!(r.closed(&closed(true, true)), Duration::ZERO, "immediate retry with 3.1.1");
        assert_eq!(r.version, Version::V311);
        r.connected();
        // Once 3.1.1 worked it stays.
        r.closed(&closed(false, false));
        assert_eq!(r.version, Version::V311);

        // A broker that spoke 5 is not downgraded by a reset during a later handshake.
        let mut r = Reconnect::new(b, Protocol::Auto, Version::V5);
        r.connected();
        assert!(r.closed(&closed(true, true)) > Duration::ZERO);
        assert_eq!(r.version, Version::V5);

        // Forced 5 never falls back.
        let mut r = Reconnect::new(b, Protocol::V5, Version::V5);
        r.closed(&closed(true, true));
        assert_eq!(r.version, Version::V5);
    }

    #[test]
    fn a_hang_up_earns_a_tentative_fallback_that_is_probed_once() {
        let b = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(60), max_attempts: u32::MAX };
        // A broker restarting (or a balancer with nothing behind it) hangs up on 5; 3.1.1 then
        // works, but only tentatively: the link probes 5 and keeps it.
        let mut r = Reconnect::new(b, Protocol::Auto, Version::V5);
        assert_eq!(r.closed(&hang_up()), Duration::ZERO);
        assert_eq!(r.version, Version::V311);
        r.connected();
        assert!(r.tentative(), "3.1.1 after a hang-up is to be checked");
        r.probe();
        assert_eq!(r.version, Version::V5);
        r.connected();
        assert!(!r.tentative());
        assert!(r.closed(&hang_up()) > Duration::ZERO, "a broker that spoke 5 is not downgraded");
        assert_eq!(r.version, Version::V5);

        // A 3.1.1-only broker that hangs up on 5: after the one probe, 3.1.1 is final.
        let mut r = Reconnect::new(b, Protocol::Auto, Version::V5);
        r.closed(&hang_up());
        r.connected();
        r.probe();
        assert_eq!(r.closed(&hang_up()), Duration::ZERO);
        assert_eq!(r.version, Version::V311);
        r.connected();
        assert!(!r.tentative(), "the second hang-up makes 3.1.1 final");

        // An explicit refusal of 5 is final at once.
        let mut r = Reconnect::new(b, Protocol::Auto, Version::V5);
        r.closed(&closed(true, true));
        r.connected();
        assert!(!r.tentative());
    }
}
