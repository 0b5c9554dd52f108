//! One MQTT connection, in MQTT 5 or 3.1.1, behind one small interface.
//!
//! rumqttc has a separate client for each protocol version; [`connect`] builds the right
//! one and spawns a driver task that polls its event loop and forwards what matters as
//! [`WireEvent`]s on a bounded channel. The driver is one loop for both versions: each
//! version's events and errors are mapped to the common [`WireEvent`] and [`Closed`] by a
//! small conversion function. The driver never reconnects on its own: when the
//! connection ends it sends [`WireEvent::Closed`] and stops, and the link decides when to
//! try again (with its jittered backoff). A fresh client per attempt means no request from
//! a dead connection is replayed behind the link's back; the spool is the one source of
//! what still needs sending.
//!
//! DEVNOTE: `EventLoop::poll` is not documented as cancel-safe (a partly written packet
//! could be lost), which is why it runs in its own task instead of a `select!` branch.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::settings::Broker;

/// The protocol version of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V5,
    V311,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V5 => "5",
            Version::V311 => "3.1.1",
        }
    }
}

/// Everything needed to open a connection.
#[derive(Clone)]
pub struct ConnectOptions {
    pub client_id: String,
    pub broker: Broker,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    /// Retained QoS 1 Last Will: (topic, payload); `None` for a client with no state to
    /// announce (the console).
    pub will: Option<(String, Vec<u8>)>,
    /// Largest packet either side may send.
    pub max_packet: u32,
}

/// What the link hears from a connection.
#[derive(Debug, Clone, PartialEq)]
pub enum WireEvent {
    /// The broker accepted the connection.
    Connected,
    /// A message on a subscribed topic.
    Message { topic: String, payload: Bytes, response_topic: Option<String>, correlation: Option<Bytes>, retained: bool },
    /// A publish left, with the packet id it got (0 for QoS 0); in the order of the
    /// `publish` calls that made them.
    Sent { pkid: u16 },
    /// A QoS 1 publish was acknowledged; `accepted` is false when an MQTT 5 broker refused
    /// it (not authorized, quota exceeded...).
    Acked { pkid: u16, accepted: bool },
    /// A subscription was answered.
    Subscribed { granted: bool },
    /// The connection is over; nothing more follows.
    Closed(Closed),
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    pub error: String,
    /// It ended before the broker accepted it.
    pub before_connack: bool,
    /// The broker looks like it refused the protocol version (worth one retry with 3.1.1).
    pub protocol_refused: bool,
    /// Of those, the broker only hung up: a 3.1.1-only broker does that, but so do a broker
    /// restarting and a balancer with no live node behind it, so the fallback it earns is
    /// tentative.
    pub hung_up: bool,
    /// The broker refused the credentials or the client.
    pub refused: bool,
}

impl Closed {
    /// An end that says nothing about the broker's protocol or credentials.
    pub fn other(error: impl Into<String>, before_connack: bool) -> Closed {
        Closed { error: error.into(), before_connack, protocol_refused: false, hung_up: false, refused: false }
    }
}

/// Why a request could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// The client's request queue is full; try later.
    Full,
    /// The connection's driver has stopped.
    Closed,
}

/// The request side of one connection.
#[derive(Clone)]
pub enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

impl Client {
    pub fn version(&self) -> Version {
        match self {
            Client::V5(_) => Version::V5,
            Client::V311(_) => Version::V311,
        }
    }

    /// Queues a QoS 1 publish; `correlation` is sent as MQTT 5 correlation data (ignored on 3.1.1).
    ///
    /// # Errors
    /// [`RequestError`] when the queue is full or the connection is gone.
    pub fn publish(&self, topic: &str, retain: bool, payload: Vec<u8>, correlation: Option<Bytes>) -> Result<(), RequestError> {
        match self {
            Client::V5(c) => {
                let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
                let r = match correlation {
                    Some(data) => {
                        let props = rumqttc::v5::mqttbytes::v5::PublishProperties { correlation_data: Some(data), ..Default::default() };
                        c.try_publish_with_properties(topic, qos, retain, payload, props)
                    }
                    None => c.try_publish(topic, qos, retain, payload),
                };
                r.map_err(|e| v5_error(&e))
            }
            Client::V311(c) => c.try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload).map_err(|e| v4_error(&e)),
        }
    }

    /// Queues a QoS 1 subscription.
    ///
    /// # Errors
    /// As [`Client::publish`].
    pub fn subscribe(&self, filter: &str) -> Result<(), RequestError> {
        match self {
            Client::V5(c) => c.try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).map_err(|e| v5_error(&e)),
            Client::V311(c) => c.try_subscribe(filter, rumqttc::QoS::AtLeastOnce).map_err(|e| v4_error(&e)),
        }
    }

    /// Queues a DISCONNECT: a clean goodbye, after which the broker discards the Last Will.
    pub fn disconnect(&self) -> Result<(), RequestError> {
        match self {
            Client::V5(c) => c.try_disconnect().map_err(|e| v5_error(&e)),
            Client::V311(c) => c.try_disconnect().map_err(|e| v4_error(&e)),
        }
    }
}

fn v5_error(e: &rumqttc::v5::ClientError) -> RequestError {
    match e {
        rumqttc::v5::ClientError::TryRequest(_) => RequestError::Full,
        rumqttc::v5::ClientError::Request(_) => RequestError::Closed,
    }
}

fn v4_error(e: &rumqttc::ClientError) -> RequestError {
    match e {
        rumqttc::ClientError::TryRequest(_) => RequestError::Full,
        rumqttc::ClientError::Request(_) => RequestError::Closed,
    }
}

/// One live (or connecting) connection: its client, its events and its driver task.
pub struct Connection {
    pub client: Client,
    pub events: mpsc::Receiver<WireEvent>,
    driver: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Requests a connection may have queued; beyond it publishes fail fast with `Full`.
const REQUEST_CAPACITY: usize = 64;
/// QoS 1 publishes awaiting their acknowledgement, at most (the broker may ask for fewer).
/// rumqttc sizes a table by it when the connection is made: left unset on MQTT 5 it is
/// 65,535 entries, 13.5 MiB resident per connection, found by `edgeflow fleet simulate`.
const INFLIGHT: u16 = 100;
/// Events buffered between the driver and the link.
const EVENT_CAPACITY: usize = 256;

fn transport(o: &ConnectOptions) -> rumqttc::Transport {
    match &o.tls {
        Some(config) => rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(config.clone())),
        None => rumqttc::Transport::Tcp,
    }
}

fn v5_options(o: &ConnectOptions) -> rumqttc::v5::MqttOptions {
    use rumqttc::v5::mqttbytes::v5::LastWill;
    let timeout = o.connect_timeout.as_secs().max(1);
    let mut opts = rumqttc::v5::MqttOptions::new(o.client_id.clone(), o.broker.host.clone(), o.broker.port);
    opts.set_keep_alive(o.keep_alive)
        .set_clean_start(true)
        .set_connection_timeout(timeout)
        .set_max_packet_size(Some(o.max_packet))
        .set_outgoing_inflight_upper_limit(INFLIGHT)
        .set_transport(transport(o));
    if let Some((topic, payload)) = &o.will {
        opts.set_last_will(LastWill::new(topic.clone(), payload.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce, true, None));
    }
    if let Some(u) = &o.username {
        opts.set_credentials(u.clone(), o.password.clone().unwrap_or_default());
    }
    opts
}

fn v311_options(o: &ConnectOptions) -> rumqttc::MqttOptions {
    let mut opts = rumqttc::MqttOptions::new(o.client_id.clone(), o.broker.host.clone(), o.broker.port);
    opts.set_keep_alive(o.keep_alive).set_clean_session(true).set_max_packet_size(o.max_packet as usize, o.max_packet as usize).set_inflight(INFLIGHT).set_transport(transport(o));
    if let Some((topic, payload)) = &o.will {
        opts.set_last_will(rumqttc::LastWill::new(topic.clone(), payload.clone(), rumqttc::QoS::AtLeastOnce, true));
    }
    if let Some(u) = &o.username {
        opts.set_credentials(u.clone(), o.password.clone().unwrap_or_default());
    }
    opts
}

/// Starts connecting with `version`; the outcome arrives as the first event
/// ([`WireEvent::Connected`] or [`WireEvent::Closed`]).
pub fn connect(version: Version, o: &ConnectOptions) -> Connection {
    let (tx, events) = mpsc::channel(EVENT_CAPACITY);
    let timeout = o.connect_timeout.as_secs().max(1);
    let (client, eventloop) = match version {
        Version::V5 => {
            let opts = v5_options(o);
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(opts, REQUEST_CAPACITY);
            (Client::V5(client), EventLoop::V5(eventloop))
        }
        Version::V311 => {
            let opts = v311_options(o);
            let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, REQUEST_CAPACITY);
            // The 3.1.1 options have no connection timeout of their own.
            eventloop.network_options.set_connection_timeout(timeout);
            (Client::V311(client), EventLoop::V311(eventloop))
        }
    };
    Connection { client, events, driver: tokio::spawn(drive(eventloop, tx)) }
}

/// The event loop of one connection, in either version.
// One value per connection, owned by its driver task and never moved after the spawn: the
// size difference between the versions costs nothing, a box would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum EventLoop {
    V5(rumqttc::v5::EventLoop),
    V311(rumqttc::EventLoop),
}

impl EventLoop {
    /// Polls once: `Ok(Some)` for what the link hears, `Ok(None)` for a packet it has no use
    /// for (pings, outgoing acks...), `Err` when the connection is over; `connected` says
    /// whether the broker had accepted it by then.
    async fn poll(&mut self, connected: bool) -> Result<Option<WireEvent>, Closed> {
        match self {
            EventLoop::V5(eventloop) => eventloop.poll().await.map(from_v5).map_err(|e| closed_v5(&e, connected)),
            EventLoop::V311(eventloop) => eventloop.poll().await.map(from_v4).map_err(|e| closed_v4(&e, connected)),
        }
    }
}

/// The driver task: forwards what the link hears until the connection is over (then a last
/// [`WireEvent::Closed`]) or the link stops listening.
async fn drive(mut eventloop: EventLoop, tx: mpsc::Sender<WireEvent>) {
    let mut connected = false;
    loop {
        let event = match eventloop.poll(connected).await {
            Ok(Some(event)) => event,
            Ok(None) => continue,
            Err(closed) => {
                let _ = tx.send(WireEvent::Closed(closed)).await;
                return;
            }
        };
        connected |= matches!(event, WireEvent::Connected);
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

fn from_v5(event: rumqttc::v5::Event) -> Option<WireEvent> {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
    use rumqttc::v5::Event;
    Some(match event {
        Event::Incoming(Packet::ConnAck(_)) => WireEvent::Connected,
        Event::Incoming(Packet::Publish(p)) => {
            let (response_topic, correlation) = p.properties.map(|props| (props.response_topic, props.correlation_data)).unwrap_or_default();
            WireEvent::Message { topic: String::from_utf8_lossy(&p.topic).into_owned(), payload: p.payload, response_topic, correlation, retained: p.retain }
        }
        Event::Incoming(Packet::PubAck(a)) => WireEvent::Acked { pkid: a.pkid, accepted: matches!(a.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers) },
        Event::Incoming(Packet::SubAck(s)) => WireEvent::Subscribed { granted: s.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_))) },
        Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => WireEvent::Sent { pkid },
        _ => return None,
    })
}

fn from_v4(event: rumqttc::Event) -> Option<WireEvent> {
    use rumqttc::{Event, Packet, SubscribeReasonCode};
    Some(match event {
        Event::Incoming(Packet::ConnAck(_)) => WireEvent::Connected,
        Event::Incoming(Packet::Publish(p)) => WireEvent::Message { topic: p.topic, payload: p.payload, response_topic: None, correlation: None, retained: p.retain },
        Event::Incoming(Packet::PubAck(a)) => WireEvent::Acked { pkid: a.pkid, accepted: true },
        Event::Incoming(Packet::SubAck(s)) => WireEvent::Subscribed { granted: s.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_))) },
        Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => WireEvent::Sent { pkid },
        _ => return None,
    })
}

/// Why an MQTT 5 connection ended. Before the CONNACK, a refusal of the version, a reply that
/// is no CONNACK or a hang-up look like a broker that only speaks 3.1.1.
fn closed_v5(e: &rumqttc::v5::ConnectionError, connected: bool) -> Closed {
    use rumqttc::v5::ConnectionError;
    use rumqttc::v5::StateError;
    let lost = |io: &std::io::Error| {
        matches!(io.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::BrokenPipe)
    };
    // rumqttc reports a peer's close while reading as `StateError::ConnectionAborted`, a
    // socket error while framing (a reset, a broken pipe) as an I/O error inside the codec's
    // error inside the state error, and others bare or inside the state error.
    let hung_up = !connected
        && match e {
            ConnectionError::MqttState(StateError::ConnectionAborted) => true,
            ConnectionError::MqttState(StateError::Deserialization(rumqttc::v5::mqttbytes::Error::Io(io)) | StateError::Io(io)) | ConnectionError::Io(io) => lost(io),
            _ => false,
        };
    let protocol_refused = hung_up
        || !connected
            && match e {
                ConnectionError::ConnectionRefused(code) => {
                    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
                    matches!(code, C::RefusedProtocolVersion | C::UnsupportedProtocolVersion | C::ProtocolError | C::MalformedPacket)
                }
                ConnectionError::MqttState(_) | ConnectionError::NotConnAck(_) => true,
                _ => false,
            };
    let refused = matches!(e, ConnectionError::ConnectionRefused(_)) && !protocol_refused;
    Closed { error: e.to_string(), before_connack: !connected, protocol_refused, hung_up, refused }
}

/// Why a 3.1.1 connection ended; there is no older version to fall back to.
fn closed_v4(e: &rumqttc::ConnectionError, connected: bool) -> Closed {
    let refused = matches!(e, rumqttc::ConnectionError::ConnectionRefused(_));
    Closed { error: e.to_string(), before_connack: !connected, protocol_refused: false, hung_up: false, refused }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::{mqttbytes, ConnectionError, StateError};
    use std::io::{Error, ErrorKind};

    /// rumqttc sizes its table of in-flight publishes by this limit when the connection is
    /// made; on MQTT 5 it defaults to 65,535 entries (13.5 MiB per connection).
    #[test]
    fn both_versions_cap_the_publishes_in_flight() {
        let options = ConnectOptions {
            client_id: "c".into(),
            broker: Broker { host: "127.0.0.1".into(), port: 1, tls: false },
            tls: None,
            username: None,
            password: None,
            keep_alive: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(1),
            will: None,
            max_packet: 256 * 1024,
        };
        assert_eq!(v5_options(&options).get_outgoing_inflight_upper_limit(), Some(INFLIGHT));
        assert_eq!(v311_options(&options).inflight(), INFLIGHT);
    }

    #[test]
    fn a_hang_up_before_the_connack_is_told_apart_from_a_refusal_of_version_5() {
        let hang_ups = [
            ConnectionError::MqttState(StateError::ConnectionAborted),
            ConnectionError::MqttState(StateError::Deserialization(mqttbytes::Error::Io(Error::from(ErrorKind::ConnectionReset)))),
            ConnectionError::MqttState(StateError::Deserialization(mqttbytes::Error::Io(Error::from(ErrorKind::BrokenPipe)))),
            ConnectionError::MqttState(StateError::Io(Error::from(ErrorKind::UnexpectedEof))),
            ConnectionError::Io(Error::from(ErrorKind::ConnectionAborted)),
        ];
        for e in &hang_ups {
            let c = closed_v5(e, false);
            assert!(c.hung_up && c.protocol_refused && c.before_connack && !c.refused, "{e:?}: {c:?}");
            assert!(!closed_v5(e, true).hung_up, "{e:?} after the CONNACK is a lost connection, not a hang-up on the handshake");
        }
        let refusals = [
            ConnectionError::ConnectionRefused(mqttbytes::v5::ConnectReturnCode::UnsupportedProtocolVersion),
            ConnectionError::MqttState(StateError::Deserialization(mqttbytes::Error::MalformedPacket)),
        ];
        for e in &refusals {
            let c = closed_v5(e, false);
            assert!(c.protocol_refused && !c.hung_up, "{e:?}: {c:?}");
        }
        let c = closed_v5(&ConnectionError::ConnectionRefused(mqttbytes::v5::ConnectReturnCode::NotAuthorized), false);
        assert!(c.refused && !c.protocol_refused && !c.hung_up, "{c:?}");
        let c = closed_v5(&ConnectionError::Io(Error::from(ErrorKind::ConnectionRefused)), false);
        assert!(!c.protocol_refused && !c.hung_up, "nothing listening says nothing about the version: {c:?}");
    }
}
