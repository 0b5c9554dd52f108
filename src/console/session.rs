//! One MQTT connection for the console: connect (MQTT 5, or 3.1.1 when the broker refuses
//! it), subscribe and wait for the broker's answer, publish and wait for its acknowledgement,
//! and read messages until a deadline. Built on the device's own [`crate::fleet::wire`], so
//! the console speaks exactly what the devices speak, over the same TLS.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::ConsoleError;
use crate::fleet::settings::Protocol;
use crate::fleet::wire::{self, ConnectOptions, Connection, Version, WireEvent};

/// A message the console received.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// Sent by the broker from its store when the console subscribed, not published now.
    pub retained: bool,
}

/// A live connection to the broker.
pub struct Session {
    conn: Connection,
    /// Messages that arrived while the console waited for something else.
    pending: VecDeque<Message>,
    /// Publishes queued and not yet given a packet id, then not yet acknowledged.
    unsent: usize,
    unacked: Vec<u16>,
}

/// Longest the console waits for the broker to answer a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// Messages held while the console waits for an answer; the oldest beyond it are dropped (a
/// console subscribed to a large fleet reads as fast as the broker sends).
const MAX_PENDING: usize = 100_000;

impl Session {
    /// Connects with `protocol` (`Auto`: 5, then 3.1.1 when the broker refuses 5).
    ///
    /// # Errors
    /// [`ConsoleError::Connect`] with the broker's or the network's reason.
    pub async fn connect(options: &ConnectOptions, protocol: Protocol) -> Result<Session, ConsoleError> {
        let versions: &[Version] = match protocol {
            Protocol::Auto => &[Version::V5, Version::V311],
            Protocol::V5 => &[Version::V5],
            Protocol::V311 => &[Version::V311],
        };
        let mut last = String::new();
        for (i, &version) in versions.iter().enumerate() {
            let mut conn = wire::connect(version, options);
            let limit = options.connect_timeout + Duration::from_secs(5);
            match tokio::time::timeout(limit, conn.events.recv()).await {
                Ok(Some(WireEvent::Connected)) => return Ok(Session { conn, pending: VecDeque::new(), unsent: 0, unacked: Vec::new() }),
                Ok(Some(WireEvent::Closed(c))) if c.protocol_refused && i + 1 < versions.len() => last = c.error,
                Ok(Some(WireEvent::Closed(c))) => return Err(ConsoleError::Connect(format!("{}: {}", options.broker, c.error))),
                Ok(Some(other)) => return Err(ConsoleError::Connect(format!("{}: unexpected {other:?} before the connection was accepted", options.broker))),
                Ok(None) => return Err(ConsoleError::Connect(format!("{}: the connection ended", options.broker))),
                Err(_) => return Err(ConsoleError::Connect(format!("{}: no answer within {}s", options.broker, limit.as_secs()))),
            }
        }
        Err(ConsoleError::Connect(format!("{}: {last}", options.broker)))
    }

    /// Subscribes to every filter and waits until the broker granted them all.
    ///
    /// # Errors
    /// [`ConsoleError::Refused`] when the broker refuses one (an ACL), or the connection's end.
    pub async fn subscribe(&mut self, filters: &[String]) -> Result<(), ConsoleError> {
        for f in filters {
            self.conn.client.subscribe(f).map_err(|e| ConsoleError::Broker(format!("subscribing to {f}: {e:?}")))?;
        }
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut answered = 0;
        while answered < filters.len() {
            match self.event(deadline).await? {
                Some(WireEvent::Subscribed { granted: true }) => answered += 1,
                Some(WireEvent::Subscribed { granted: false }) => {
                    return Err(ConsoleError::Refused(format!("the broker refused a subscription to one of {filters:?} (ACL?)")));
                }
                Some(_) => {}
                None => return Err(ConsoleError::Broker(format!("no answer to the subscription within {}s", ANSWER_TIMEOUT.as_secs()))),
            }
        }
        Ok(())
    }

    /// Publishes (QoS 1, not retained) and waits for the broker's acknowledgement.
    ///
    /// # Errors
    /// [`ConsoleError::Refused`] when an MQTT 5 broker refuses it, or the connection's end.
    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), ConsoleError> {
        self.conn.client.publish(topic, false, payload, None).map_err(|e| ConsoleError::Broker(format!("publishing on {topic}: {e:?}")))?;
        self.unsent += 1;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            match self.event(deadline).await? {
                Some(WireEvent::Acked { pkid, accepted }) if self.unacked.contains(&pkid) => {
                    self.unacked.retain(|p| *p != pkid);
                    if !accepted {
                        return Err(ConsoleError::Refused(format!("the broker refused the publish on {topic} (not authorized?)")));
                    }
                    if self.unsent == 0 && self.unacked.is_empty() {
                        return Ok(());
                    }
                }
                Some(_) => {}
                None => return Err(ConsoleError::Broker(format!("the broker did not acknowledge the publish on {topic} within {}s", ANSWER_TIMEOUT.as_secs()))),
            }
        }
    }

    /// The next message, or `None` once `deadline` passed.
    ///
    /// # Errors
    /// [`ConsoleError::Broker`] when the connection ended.
    pub async fn next(&mut self, deadline: Instant) -> Result<Option<Message>, ConsoleError> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(Some(m));
        }
        loop {
            match self.event(deadline).await? {
                Some(WireEvent::Message { .. }) => {
                    if let Some(m) = self.pending.pop_front() {
                        return Ok(Some(m));
                    }
                }
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }

    /// Leaves cleanly (a DISCONNECT, so the broker knows the console meant to go).
    pub async fn close(self) {
        let mut conn = self.conn;
        if conn.client.disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async { while conn.events.recv().await.is_some() {} }).await;
        }
    }

    /// The next event before `deadline` (`None` after it); messages are also queued in
    /// `pending`, packet ids tracked.
    async fn event(&mut self, deadline: Instant) -> Result<Option<WireEvent>, ConsoleError> {
        let event = match tokio::time::timeout_at(deadline, self.conn.events.recv()).await {
            Err(_) => return Ok(None),
            Ok(None) => return Err(ConsoleError::Broker("the connection to the broker ended".into())),
            Ok(Some(e)) => e,
        };
        match &event {
            WireEvent::Closed(c) => return Err(ConsoleError::Broker(format!("the connection to the broker ended: {}", c.error))),
            WireEvent::Message { topic, payload, retained, .. } => {
                if self.pending.len() >= MAX_PENDING {
                    self.pending.pop_front();
                }
                self.pending.push_back(Message { topic: topic.clone(), payload: payload.clone(), retained: *retained });
            }
            WireEvent::Sent { pkid } if self.unsent > 0 => {
                self.unsent -= 1;
                self.unacked.push(*pkid);
            }
            _ => {}
        }
        Ok(Some(event))
    }
}
