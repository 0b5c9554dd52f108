//! Commands that change what the daemon does, whoever sends them (the fleet link's MQTT
//! topics today, the local API later), and the bus that carries them to the one task that
//! acts on them.
//!
//! A sender gets an answer for every command it submits: the handler's result, or an error
//! saying the bus is full, nobody is listening, or the handler went away without answering.
//! Parsing lives here too, so every front end accepts exactly the same names and arguments.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// Something the daemon is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Poll the registry now; a fleet link first waits a random part of `spread`, so a
    /// command to a whole group does not bring every device to the registry at once.
    Sync { spread: Duration },
    /// Serve this registry version and stop following the stage or alias.
    Pin { version: String },
    /// Follow the stage or alias again.
    Unpin,
    /// Go back to the previous good version.
    Rollback,
    /// Reload the active version from the cache (re-verify, re-load, smoke-test).
    Reload,
    /// Publish a health report now.
    Report,
    /// Change run-time settings; only the fields given change.
    Set(Settings),
}

/// Run-time settings a `set` command may change. The fleet link applies `report_interval` and
/// `drift_interval` itself once the daemon has accepted the command; the daemon applies the
/// rest.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Settings {
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub poll_interval: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub report_interval: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub drift_interval: Option<Duration>,
    /// A `tracing` filter such as `info` or `edgeflow=debug`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

mod opt_duration {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

/// The names [`Command::parse`] accepts.
pub const NAMES: &[&str] = &["sync", "pin", "unpin", "rollback", "reload", "report", "set"];

/// Longest `spread` a `sync` may ask for: the poll it delays is the one that brings a new
/// version, so it must not wait longer than an operator would.
pub const MAX_SYNC_SPREAD: Duration = Duration::from_secs(15 * 60);

/// Shortest interval a `set` command may ask for: a fleet must not be able to turn a
/// device's reports into a flood.
pub const MIN_INTERVAL: Duration = Duration::from_secs(5);

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Sync { .. } => "sync",
            Command::Pin { .. } => "pin",
            Command::Unpin => "unpin",
            Command::Rollback => "rollback",
            Command::Reload => "reload",
            Command::Report => "report",
            Command::Set(_) => "set",
        }
    }

    /// Builds a command from its name and JSON arguments (`null` or `{}` when it takes none).
    ///
    /// # Errors
    /// A message for the sender: unknown command, unknown or missing argument, bad value.
    pub fn parse(name: &str, args: &Value) -> Result<Command, String> {
        let empty = serde_json::Map::new();
        let obj = match args {
            Value::Null => &empty,
            Value::Object(m) => m,
            other => return Err(format!("arguments of `{name}` must be a JSON object, not {}", kind(other))),
        };
        let allow = |keys: &[&str]| -> Result<(), String> {
            match obj.keys().find(|k| !keys.contains(&k.as_str())) {
                Some(k) if keys.is_empty() => Err(format!("`{name}` takes no arguments (got `{k}`)")),
                Some(k) => Err(format!("unknown argument `{k}` for `{name}` (expected {})", keys.join(", "))),
                None => Ok(()),
            }
        };
        let command = match name {
            "sync" => {
                allow(&["spread"])?;
                let spread = match obj.get("spread") {
                    None => Duration::ZERO,
                    Some(Value::String(v)) => match humantime::parse_duration(v.trim()) {
                        Ok(d) if d <= MAX_SYNC_SPREAD => d,
                        Ok(_) => return Err(format!("spread: longer than {}", humantime::format_duration(MAX_SYNC_SPREAD))),
                        Err(e) => return Err(format!("spread: `{v}` is not a duration ({e})")),
                    },
                    Some(other) => return Err(format!("spread: expected a duration string such as \"30s\", not {}", kind(other))),
                };
                Command::Sync { spread }
            }
            "unpin" => allow(&[]).map(|()| Command::Unpin)?,
            "rollback" => allow(&[]).map(|()| Command::Rollback)?,
            "reload" => allow(&[]).map(|()| Command::Reload)?,
            "report" => allow(&[]).map(|()| Command::Report)?,
            "pin" => {
                allow(&["version"])?;
                let version = match obj.get("version") {
                    Some(Value::String(v)) if !v.trim().is_empty() && v.len() <= 128 => v.trim().to_string(),
                    Some(Value::Number(n)) => n.to_string(),
                    Some(other) => return Err(format!("`pin` needs `version` as a non-empty string of at most 128 bytes, not {}", kind(other))),
                    None => return Err("`pin` needs a `version`".to_string()),
                };
                Command::Pin { version }
            }
            "set" => {
                allow(&["poll_interval", "report_interval", "drift_interval", "log_level"])?;
                if obj.is_empty() {
                    return Err("`set` needs at least one of poll_interval, report_interval, drift_interval, log_level".to_string());
                }
                let mut problems = Vec::new();
                let mut interval = |key: &str| -> Option<Duration> {
                    let v = obj.get(key)?;
                    let parsed = v
                        .as_str()
                        .ok_or_else(|| format!("{key}: expected a duration string such as \"2m\", not {}", kind(v)))
                        .and_then(|s| humantime::parse_duration(s.trim()).map_err(|e| format!("{key}: `{s}` is not a duration ({e})")));
                    match parsed {
                        Ok(d) if d < MIN_INTERVAL => {
                            problems.push(format!("{key}: {} is shorter than the minimum of {}", humantime::format_duration(d), humantime::format_duration(MIN_INTERVAL)))
                        }
                        Ok(d) if d > Duration::from_secs(7 * 86400) => problems.push(format!("{key}: longer than 7 days")),
                        Ok(d) => return Some(d),
                        Err(e) => problems.push(e),
                    }
                    None
                };
                let settings = Settings {
                    poll_interval: interval("poll_interval"),
                    report_interval: interval("report_interval"),
                    drift_interval: interval("drift_interval"),
                    log_level: None,
                };
                let log_level = match obj.get("log_level") {
                    None => None,
                    Some(Value::String(s)) if valid_log_filter(s) => Some(s.trim().to_string()),
                    Some(v) => {
                        problems.push(format!("log_level: {} is not a log filter such as \"info\" or \"edgeflow=debug\"", v));
                        None
                    }
                };
                if !problems.is_empty() {
                    return Err(problems.join("; "));
                }
                Command::Set(Settings { log_level, ..settings })
            }
            other => return Err(format!("unknown command `{}` (known: {})", crate::util::truncate(other, 64), NAMES.join(", "))),
        };
        Ok(command)
    }
}

/// Accepts what `tracing_subscriber::EnvFilter` accepts in practice: comma-separated
/// `level` or `target=level` directives with plain characters.
fn valid_log_filter(s: &str) -> bool {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    let s = s.trim();
    !s.is_empty()
        && s.len() <= 256
        && s.split(',').all(|d| {
            let (target, level) = d.rsplit_once('=').map_or((None, d), |(t, l)| (Some(t), l));
            LEVELS.contains(&level.trim().to_ascii_lowercase().as_str())
                && target.is_none_or(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.')))
        })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Where a command came from, for logs and for handlers that treat sources differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The fleet console over MQTT, with the request id it chose.
    Fleet { request_id: String },
    /// The local API.
    Local,
}

/// What a handler answers: a result object on success, a reason on failure.
pub type Outcome = Result<Value, String>;

/// One command on its way to the handler, with the channel for its answer.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub origin: Origin,
    reply: oneshot::Sender<Outcome>,
}

impl Request {
    /// Answers the sender; a sender that stopped waiting is not an error.
    pub fn respond(self, outcome: Outcome) {
        let _ = self.reply.send(outcome);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("the command queue is full; try again later")]
    Busy,
    #[error("no handler is running for commands")]
    NoHandler,
    #[error("the command handler stopped without answering")]
    Dropped,
}

/// The sending side of the command bus; cheap to clone, one per front end.
#[derive(Debug, Clone)]
pub struct Bus {
    tx: mpsc::Sender<Request>,
}

/// Pending answer of a submitted command.
pub type Answer = oneshot::Receiver<Outcome>;

impl Bus {
    /// A bus holding at most `capacity` commands not yet taken by the handler.
    pub fn new(capacity: usize) -> (Bus, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Bus { tx }, rx)
    }

    /// Queues a command without waiting; the answer arrives on the returned receiver.
    ///
    /// # Errors
    /// [`CommandError::Busy`] when the queue is full, [`CommandError::NoHandler`] when the
    /// handler has stopped.
    pub fn submit(&self, command: Command, origin: Origin) -> Result<Answer, CommandError> {
        let (reply, answer) = oneshot::channel();
        match self.tx.try_send(Request { command, origin, reply }) {
            Ok(()) => Ok(answer),
            Err(mpsc::error::TrySendError::Full(_)) => Err(CommandError::Busy),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(CommandError::NoHandler),
        }
    }

    /// Submits a command and waits for its outcome.
    ///
    /// # Errors
    /// As [`Bus::submit`], or [`CommandError::Dropped`] when the handler never answers.
    pub async fn call(&self, command: Command, origin: Origin) -> Result<Outcome, CommandError> {
        self.submit(command, origin)?.await.map_err(|_| CommandError::Dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_command_and_rejects_bad_arguments() {
        let ok = [
            ("sync", json!(null), Command::Sync { spread: Duration::ZERO }),
            ("sync", json!({}), Command::Sync { spread: Duration::ZERO }),
            ("sync", json!({"spread": "30s"}), Command::Sync { spread: Duration::from_secs(30) }),
            ("unpin", json!({}), Command::Unpin),
            ("rollback", json!(null), Command::Rollback),
            ("reload", json!({}), Command::Reload),
            ("report", json!({}), Command::Report),
            ("pin", json!({"version": "7"}), Command::Pin { version: "7".into() }),
            ("pin", json!({"version": 7}), Command::Pin { version: "7".into() }),
            (
                "set",
                json!({"poll_interval": "10m", "log_level": "edgeflow=debug,info"}),
                Command::Set(Settings { poll_interval: Some(Duration::from_secs(600)), log_level: Some("edgeflow=debug,info".into()), ..Settings::default() }),
            ),
        ];
        for (name, args, want) in ok {
            assert_eq!(Command::parse(name, &args), Ok(want.clone()), "{name} {args}");
            assert_eq!(want.name(), name);
        }
        let bad = [
            ("launch", json!({}), "unknown command `launch`"),
            ("sync", json!({"now": true}), "unknown argument `now`"),
            ("sync", json!({"spread": "16m"}), "longer than 15m"),
            ("sync", json!({"spread": 30}), "expected a duration string"),
            ("rollback", json!({"now": true}), "takes no arguments"),
            ("sync", json!([1]), "must be a JSON object"),
            ("pin", json!({}), "needs a `version`"),
            ("pin", json!({"version": ""}), "non-empty string"),
            ("pin", json!({"version": "3", "force": true}), "unknown argument `force`"),
            ("set", json!({}), "at least one"),
            ("set", json!({"poll_interval": "1s"}), "shorter than the minimum"),
            ("set", json!({"report_interval": 30}), "expected a duration string"),
            ("set", json!({"drift_interval": "soon"}), "not a duration"),
            ("set", json!({"log_level": "loud"}), "not a log filter"),
            ("set", json!({"colour": "red"}), "unknown argument `colour`"),
        ];
        for (name, args, want) in bad {
            let err = Command::parse(name, &args).unwrap_err();
            assert!(err.contains(want), "{name} {args}: {err}");
        }
        // Every problem of a `set` is reported at once.
        let err = Command::parse("set", &json!({"poll_interval": "x", "log_level": 3})).unwrap_err();
        assert!(err.contains("poll_interval") && err.contains("log_level"), "{err}");
        // Untrusted names are echoed only in part.
        let long = "x".repeat(10_000);
        assert!(Command::parse(&long, &json!({})).unwrap_err().len() < 200);
    }

    #[tokio::test]
    async fn the_bus_answers_reports_a_full_queue_and_a_missing_handler() {
        let (bus, mut rx) = Bus::new(1);
        let handler = tokio::spawn(async move {
            let req = rx.recv().await.unwrap();
            assert_eq!(req.origin, Origin::Local);
            let name = req.command.name();
            req.respond(Ok(json!({ "did": name })));
            // The second request is dropped unanswered; then the handler stops.
            let _dropped = rx.recv().await.unwrap();
        });
        assert_eq!(bus.call(Command::Sync { spread: Duration::ZERO }, Origin::Local).await, Ok(Ok(json!({"did": "sync"}))));
        assert_eq!(bus.call(Command::Reload, Origin::Local).await, Err(CommandError::Dropped));
        handler.await.unwrap();
        assert_eq!(bus.submit(Command::Sync { spread: Duration::ZERO }, Origin::Local).unwrap_err(), CommandError::NoHandler);

        let (bus, _rx) = Bus::new(1);
        let _first = bus.submit(Command::Sync { spread: Duration::ZERO }, Origin::Local).unwrap();
        assert_eq!(bus.submit(Command::Sync { spread: Duration::ZERO }, Origin::Local).unwrap_err(), CommandError::Busy);
    }
}
