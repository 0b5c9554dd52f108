//! Commands from the fleet: opening the envelope, checking signatures and expiry, and the
//! table of recent request ids that makes commands idempotent and replays harmless.
//!
//! A command is published on `cmd/<name>` as a JSON object (the *body*):
//!
//! ```json
//! {"request_id": "r-42", "args": {"version": "7"}, "issued_at": 1700000000, "expires_at": 1700000300}
//! ```
//!
//! Signed, the body travels as a string next to its signature, so the exact bytes signed
//! are the bytes verified (no JSON canonicalisation to agree on):
//!
//! ```json
//! {"signed": "{\"request_id\":\"r-42\",...}", "signature": "<128 hex characters>"}
//! ```
//!
//! The signature is ed25519 over `edgeflow-command/1\n<target>\n<name>\n<signed>`, where the
//! target is the device id for `<prefix>/<device>/cmd/<name>` and `<prefix>/group/<group>` for
//! a group's `<prefix>/group/<group>/cmd/<name>` ([`super::topics::group_target`]); device ids
//! hold no `/`. A command signed for one device, group, fleet or command name is worthless on
//! another.
//!
//! Request ids are remembered (on disk, in the spool's database) for `command_window`, and
//! a signed command's id at least until it expires: a repeat with the same content is
//! answered from the first result and never run twice (a duplicate delivery or a replay);
//! a repeat with different content is refused as a replay.

use std::collections::HashMap;
use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Largest command payload read; larger ones are refused unread.
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Clock skew tolerated between the console and the device.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Request ids remembered at once.
const MAX_REMEMBERED: usize = 4096;
const CONTEXT: &str = "edgeflow-command/1";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    request_id: String,
    #[serde(default)]
    args: Value,
    issued_at: Option<u64>,
    expires_at: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedEnvelope {
    signed: String,
    signature: String,
}

/// How signatures are treated.
#[derive(Debug, Clone)]
pub struct Policy {
    pub key: Option<VerifyingKey>,
    pub require: bool,
    pub max_age: Duration,
    /// Unix seconds; signed commands issued before are refused as expired (the table of
    /// recent ids was lost with a damaged spool then, so a replay could not be recognized).
    pub not_before: Option<u64>,
}

/// A command whose envelope checked out.
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    pub request_id: String,
    pub args: Value,
    pub signed: bool,
    /// Unix seconds; the id is remembered at least this long.
    pub expires_at: Option<u64>,
    /// sha256 of the payload, to tell a duplicate from a replay with other content.
    pub digest: String,
}

/// Why a command was refused before it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    Malformed,
    Unsigned,
    BadSignature,
    Expired,
    Replayed,
    Busy,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Unsigned => "unsigned",
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::Replayed => "replayed",
            Refusal::Busy => "busy",
        }
    }

    /// Refusals worth an event: someone may be sending forged or stale commands.
    pub fn is_security(self) -> bool {
        matches!(self, Refusal::Unsigned | Refusal::BadSignature | Refusal::Expired | Refusal::Replayed)
    }
}

/// A refusal, with the request id when it could be read (for the reply).
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub request_id: Option<String>,
    pub refusal: Refusal,
    pub reason: String,
}

fn refuse(request_id: Option<&str>, refusal: Refusal, reason: impl Into<String>) -> Refused {
    Refused { request_id: request_id.map(|s| crate::util::truncate(s, 128).to_string()), refusal, reason: reason.into() }
}

/// Opens a command payload published on `cmd/<name>` for `target` (see the module's doc), at
/// Unix time `now`.
///
/// # Errors
/// [`Refused`] for a malformed, unsigned (when required), badly signed or expired command.
pub fn open(payload: &[u8], target: &str, name: &str, policy: &Policy, now: u64) -> Result<Opened, Refused> {
    if payload.len() > MAX_PAYLOAD {
        return Err(refuse(None, Refusal::Malformed, format!("payload of {} bytes is larger than {MAX_PAYLOAD}", payload.len())));
    }
    let digest = hex::encode(Sha256::digest(payload));
    let value: Value = serde_json::from_slice(payload).map_err(|e| refuse(None, Refusal::Malformed, format!("payload is not JSON: {e}")))?;
    let rid_hint = |v: &Value| v.get("request_id").and_then(Value::as_str).map(str::to_string);
    let (body_value, signed) = if value.get("signed").is_some() || value.get("signature").is_some() {
        let env: SignedEnvelope = serde_json::from_value(value).map_err(|e| refuse(None, Refusal::Malformed, format!("signed envelope: {e}")))?;
        let inner: Value = serde_json::from_str(&env.signed).map_err(|e| refuse(None, Refusal::Malformed, format!("`signed` is not a JSON object: {e}")))?;
        let rid = rid_hint(&inner);
        let Some(key) = &policy.key else {
            return Err(refuse(rid.as_deref(), Refusal::BadSignature, "the command is signed but this device has no fleet.signature_public_key"));
        };
        let sig = hex::decode(env.signature.trim())
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
            .map(|b| Signature::from_bytes(&b))
            .ok_or_else(|| refuse(rid.as_deref(), Refusal::BadSignature, "`signature` must be 64 bytes in hex"))?;
        key.verify_strict(signing_input(target, name, &env.signed).as_bytes(), &sig)
            .map_err(|_| refuse(rid.as_deref(), Refusal::BadSignature, "the signature does not match the fleet key, this target (device or group) and this command"))?;
        (inner, true)
    } else {
        (value, false)
    };
    let rid = rid_hint(&body_value);
    let body: Body = serde_json::from_value(body_value).map_err(|e| refuse(rid.as_deref(), Refusal::Malformed, format!("command body: {e}")))?;
    let id = body.request_id.trim();
    if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
        return Err(refuse(None, Refusal::Malformed, "`request_id` must be 1 to 128 printable characters"));
    }
    if policy.require && !signed {
        return Err(refuse(Some(id), Refusal::Unsigned, "this device requires signed commands"));
    }
    let skew = CLOCK_SKEW.as_secs();
    if let Some(exp) = body.expires_at {
        // `expires_at` is the sender's number: any u64, so no sum with it may overflow.
        if now > exp.saturating_add(skew) {
            return Err(refuse(Some(id), Refusal::Expired, format!("expired {}s ago", now - exp)));
        }
    }
    if signed {
        let (Some(issued), Some(exp)) = (body.issued_at, body.expires_at) else {
            return Err(refuse(Some(id), Refusal::Malformed, "a signed command needs `issued_at` and `expires_at`"));
        };
        if issued > now + skew {
            return Err(refuse(Some(id), Refusal::Expired, "`issued_at` is in the future"));
        }
        if exp < issued || exp - issued > policy.max_age.as_secs() {
            return Err(refuse(Some(id), Refusal::Expired, format!("validity of {}s exceeds fleet.signature_max_age ({}s)", exp.saturating_sub(issued), policy.max_age.as_secs())));
        }
        if now > issued.saturating_add(policy.max_age.as_secs()).saturating_add(skew) {
            return Err(refuse(Some(id), Refusal::Expired, "issued longer ago than fleet.signature_max_age"));
        }
        if policy.not_before.is_some_and(|floor| issued < floor) {
            return Err(refuse(Some(id), Refusal::Expired, "issued before the device's table of recent commands was lost with a damaged spool; sign it again"));
        }
    }
    Ok(Opened { request_id: id.to_string(), args: body.args, signed, expires_at: body.expires_at, digest })
}

/// The bytes a command's signature covers: the body as sent, bound to the target and the name.
pub(crate) fn signing_input(target: &str, name: &str, signed: &str) -> String {
    format!("{CONTEXT}\n{target}\n{name}\n{signed}")
}

/// Builds a signed command payload for `target` (a device id, or a group's
/// [`super::topics::group_target`]), for consoles, tests and `edgeflow fleet sign`.
pub fn sign(key: &SigningKey, target: &str, name: &str, body: &Value) -> String {
    let signed = body.to_string();
    let signature = key.sign(signing_input(target, name, &signed).as_bytes());
    serde_json::json!({ "signed": signed, "signature": hex::encode(signature.to_bytes()) }).to_string()
}

/// A reply's final state, kept so a duplicate gets the same answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Final {
    pub succeeded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    digest: String,
    /// Unix seconds after which the id may be forgotten.
    keep_until: u64,
    /// `None` while the command runs.
    done: Option<Final>,
    /// A signed command's id is never forgotten before it expires; an unsigned one may be
    /// evicted once it finished (replaying it is no more than sending a new unsigned command).
    #[serde(default)]
    signed: bool,
}

/// What the table says about a request id.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    New,
    /// Same content as before: answer from this (`None`: still running).
    Duplicate(Option<Final>),
    /// Same id, other content.
    Conflict,
}

/// Recent request ids, mirrored in a sled tree so a restart does not reopen replays.
pub struct Recent {
    tree: Option<sled::Tree>,
    entries: HashMap<String, Entry>,
    window: Duration,
}

impl Recent {
    /// Loads the table from `tree` (entries already expired are dropped); `None` keeps it
    /// in memory only.
    pub fn load(tree: Option<sled::Tree>, window: Duration, now: u64) -> Recent {
        let mut entries = HashMap::new();
        if let Some(t) = &tree {
            for item in t.iter().flatten() {
                let (k, v) = item;
                match (std::str::from_utf8(&k), serde_json::from_slice::<Entry>(&v)) {
                    (Ok(id), Ok(mut e)) if e.keep_until >= now => {
                        // Running when the agent stopped: its outcome is unknown, and it
                        // must not run again; a repeat learns that instead of waiting forever.
                        if e.done.is_none() {
                            e.done = Some(Final {
                                succeeded: false,
                                reason: Some("interrupted: the agent restarted before this command's outcome was recorded (it may have run); it will not run again".into()),
                                result: None,
                            });
                        }
                        entries.insert(id.to_string(), e);
                    }
                    _ => {
                        let _ = t.remove(k);
                    }
                }
            }
        }
        Recent { tree, entries, window }
    }

    pub fn check(&self, o: &Opened) -> Seen {
        match self.entries.get(&o.request_id) {
            None => Seen::New,
            Some(e) if e.digest == o.digest => Seen::Duplicate(e.done.clone()),
            Some(_) => Seen::Conflict,
        }
    }

    /// Remembers a command that is about to run (only commands that passed every check and
    /// parsed are recorded, so junk cannot fill the table).
    ///
    /// An unsigned command's id is kept for `command_window`: its `expires_at` is the sender's
    /// word and cannot make the device remember it longer. A signed one is kept until it
    /// expires, which its verified signature bounds to `signature_max_age`. When the table is
    /// full, finished unsigned entries make room, the oldest first.
    ///
    /// # Errors
    /// [`Refusal::Busy`] with the reason when the table is full of ids that must not be
    /// forgotten yet, or the id could not be written to disk (a command whose id is not on
    /// disk could run twice after a restart, so it does not run at all).
    pub fn start(&mut self, o: &Opened, now: u64) -> Result<(), (Refusal, &'static str)> {
        self.prune(now);
        if self.entries.len() >= MAX_REMEMBERED && !self.evict_one() {
            return Err((Refusal::Busy, "too many recent commands to remember"));
        }
        let window_end = now + self.window.as_secs();
        let keep_until = if o.signed { window_end.max(o.expires_at.map_or(0, |e| e + CLOCK_SKEW.as_secs())) } else { window_end };
        if !self.put(o.request_id.clone(), Entry { digest: o.digest.clone(), keep_until, done: None, signed: o.signed }) {
            self.entries.remove(&o.request_id);
            return Err((Refusal::Busy, "the command's id could not be recorded on disk"));
        }
        Ok(())
    }

    /// The on-disk table, for making a recorded id durable before its command acts (a
    /// blocking sled flush; the caller runs it off the async workers). `None`: in memory.
    pub fn durable(&self) -> Option<sled::Tree> {
        self.tree.clone()
    }

    /// Forgets the finished unsigned entry that expires first; false when there is none.
    fn evict_one(&mut self) -> bool {
        let Some(id) = self.entries.iter().filter(|(_, e)| !e.signed && e.done.is_some()).min_by_key(|(_, e)| e.keep_until).map(|(k, _)| k.clone()) else {
            return false;
        };
        self.entries.remove(&id);
        if let Some(t) = &self.tree {
            let _ = t.remove(id.as_bytes());
        }
        true
    }

    /// Records how a command ended.
    pub fn finish(&mut self, request_id: &str, done: Final) {
        if let Some(mut e) = self.entries.get(request_id).cloned() {
            e.done = Some(done);
            // A failed write only loses the outcome: the id itself is already on disk.
            let _ = self.put(request_id.to_string(), e);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records `e` in memory and, when there is a tree, on disk; false when the disk write
    /// failed (the entry is in memory either way).
    fn put(&mut self, id: String, e: Entry) -> bool {
        let mut stored = true;
        if let Some(t) = &self.tree {
            let written = serde_json::to_vec(&e).map_err(|err| err.to_string()).and_then(|bytes| t.insert(id.as_bytes(), bytes).map_err(|err| err.to_string()));
            if let Err(err) = written {
                tracing::warn!(error = %err, request_id = %id, "remembering a command id on disk failed");
                stored = false;
            }
        }
        self.entries.insert(id, e);
        stored
    }

    fn prune(&mut self, now: u64) {
        let expired: Vec<String> = self.entries.iter().filter(|(_, e)| e.keep_until < now).map(|(k, _)| k.clone()).collect();
        for id in expired {
            self.entries.remove(&id);
            if let Some(t) = &self.tree {
                let _ = t.remove(id.as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[42; 32])
    }

    fn policy(require: bool) -> Policy {
        Policy { key: Some(key().verifying_key()), require, max_age: Duration::from_secs(300), not_before: None }
    }

    fn body(id: &str) -> Value {
        json!({"request_id": id, "args": {"version": "3"}, "issued_at": NOW - 10, "expires_at": NOW + 60})
    }

    #[test]
    fn unsigned_commands_open_unless_signatures_are_required() {
        let payload = json!({"request_id": "r1", "args": {"version": "3"}}).to_string();
        let o = open(payload.as_bytes(), "dev", "pin", &policy(false), NOW).unwrap();
        assert_eq!((o.request_id.as_str(), o.signed, &o.args), ("r1", false, &json!({"version": "3"})));
        let e = open(payload.as_bytes(), "dev", "pin", &policy(true), NOW).unwrap_err();
        assert_eq!((e.refusal, e.request_id.as_deref()), (Refusal::Unsigned, Some("r1")));
    }

    #[test]
    fn signatures_bind_the_device_the_command_and_the_bytes() {
        let signed = sign(&key(), "dev", "pin", &body("r2"));
        let o = open(signed.as_bytes(), "dev", "pin", &policy(true), NOW).unwrap();
        assert!(o.signed);
        assert_eq!(o.expires_at, Some(NOW + 60));
        for (device, name) in [("other", "pin"), ("dev", "rollback")] {
            let e = open(signed.as_bytes(), device, name, &policy(true), NOW).unwrap_err();
            assert_eq!(e.refusal, Refusal::BadSignature, "{device} {name}");
            assert_eq!(e.request_id.as_deref(), Some("r2"));
        }
        // Changed content under the old signature.
        let mut env: Value = serde_json::from_str(&signed).unwrap();
        env["signed"] = Value::String(env["signed"].as_str().unwrap().replace("\"3\"", "\"4\""));
        assert_eq!(open(env.to_string().as_bytes(), "dev", "pin", &policy(true), NOW).unwrap_err().refusal, Refusal::BadSignature);
        // Another key.
        let forged = sign(&SigningKey::from_bytes(&[1; 32]), "dev", "pin", &body("r3"));
        assert_eq!(open(forged.as_bytes(), "dev", "pin", &policy(false), NOW).unwrap_err().refusal, Refusal::BadSignature);
        // Garbage signature.
        let bad = json!({"signed": body("r4").to_string(), "signature": "zz"}).to_string();
        assert_eq!(open(bad.as_bytes(), "dev", "pin", &policy(false), NOW).unwrap_err().refusal, Refusal::BadSignature);
    }

    #[test]
    fn a_group_signature_is_valid_for_that_group_of_that_fleet_only() {
        use crate::fleet::topics::group_target;
        let canary = group_target("fleet/eu", "canary");
        let signed = sign(&key(), &canary, "sync", &body("g1"));
        assert!(open(signed.as_bytes(), &canary, "sync", &policy(true), NOW).is_ok());
        for (target, name) in [
            (group_target("fleet/eu", "all"), "sync"),
            (group_target("fleet/us", "canary"), "sync"),
            ("canary".to_string(), "sync"),
            ("dev".to_string(), "sync"),
            (canary.clone(), "rollback"),
        ] {
            assert_eq!(open(signed.as_bytes(), &target, name, &policy(true), NOW).unwrap_err().refusal, Refusal::BadSignature, "{target} {name}");
        }
        // And a device's signature is no group's.
        let device = sign(&key(), "dev", "sync", &body("d1"));
        assert_eq!(open(device.as_bytes(), &canary, "sync", &policy(true), NOW).unwrap_err().refusal, Refusal::BadSignature);
    }

    #[test]
    fn expiry_and_validity_are_enforced() {
        let table = [
            (json!({"request_id": "a", "issued_at": NOW - 400, "expires_at": NOW - 100}), Refusal::Expired),
            (json!({"request_id": "b", "issued_at": NOW + 600, "expires_at": NOW + 700}), Refusal::Expired),
            (json!({"request_id": "c", "issued_at": NOW, "expires_at": NOW + 3600}), Refusal::Expired),
            (json!({"request_id": "d"}), Refusal::Malformed),
        ];
        for (b, want) in table {
            let signed = sign(&key(), "dev", "sync", &b);
            assert_eq!(open(signed.as_bytes(), "dev", "sync", &policy(true), NOW).unwrap_err().refusal, want, "{b}");
        }
        // Unsigned commands may carry an expiry too.
        let late = json!({"request_id": "e", "expires_at": NOW - 100}).to_string();
        assert_eq!(open(late.as_bytes(), "dev", "sync", &policy(false), NOW).unwrap_err().refusal, Refusal::Expired);
    }

    /// `expires_at` near `u64::MAX` overflowed the expiry check: a panic with overflow checks,
    /// a command refused as expired without (fuzz/regressions/mqtt_command/).
    #[test]
    fn timestamps_at_the_ends_of_the_range_do_not_overflow() {
        let long = Policy { max_age: Duration::from_secs(u64::MAX), ..policy(false) };
        let table = [
            (json!({"request_id": "a", "expires_at": u64::MAX}), false, policy(false), Ok(())),
            (json!({"request_id": "b", "expires_at": u64::MAX - 1}), false, policy(false), Ok(())),
            (json!({"request_id": "c", "issued_at": NOW, "expires_at": u64::MAX}), true, policy(false), Err(Refusal::Expired)),
            (json!({"request_id": "d", "issued_at": 0, "expires_at": u64::MAX}), true, long.clone(), Ok(())),
            (json!({"request_id": "e", "issued_at": NOW, "expires_at": NOW + 60}), true, long, Ok(())),
            (json!({"request_id": "f", "issued_at": u64::MAX, "expires_at": u64::MAX}), true, policy(false), Err(Refusal::Expired)),
        ];
        for (b, signed, policy, want) in table {
            let payload = if signed { sign(&key(), "dev", "sync", &b) } else { b.to_string() };
            assert_eq!(open(payload.as_bytes(), "dev", "sync", &policy, NOW).map(|_| ()).map_err(|r| r.refusal), want, "{b}");
        }
    }

    #[test]
    fn signed_commands_issued_before_the_replay_floor_are_refused() {
        let signed = sign(&key(), "dev", "sync", &json!({"request_id": "f1", "issued_at": NOW - 10, "expires_at": NOW + 60}));
        let floor = Policy { not_before: Some(NOW - 5), ..policy(true) };
        assert_eq!(open(signed.as_bytes(), "dev", "sync", &floor, NOW).map(|_| ()).map_err(|r| r.refusal), Err(Refusal::Expired));
        assert!(open(signed.as_bytes(), "dev", "sync", &Policy { not_before: Some(NOW - 10), ..policy(true) }, NOW).is_ok());
    }

    #[test]
    fn malformed_payloads_are_refused_with_a_reason() {
        let cases: &[&[u8]] =
            &[b"", b"not json", b"[1,2]", b"{\"args\":{}}", b"{\"request_id\":\"\"}", b"{\"request_id\":\"x\",\"extra\":1}", b"{\"signed\":1,\"signature\":\"00\"}", &[0xff, 0xfe]];
        for c in cases {
            let e = open(c, "dev", "sync", &policy(false), NOW).unwrap_err();
            assert_eq!(e.refusal, Refusal::Malformed, "{:?}", String::from_utf8_lossy(c));
            assert!(!e.reason.is_empty());
        }
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(open(&big, "dev", "sync", &policy(false), NOW).unwrap_err().refusal, Refusal::Malformed);
    }

    #[test]
    fn repeats_are_duplicates_or_conflicts_and_survive_a_reload() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("commands").unwrap();
        let p1 = json!({"request_id": "r1", "args": {}}).to_string();
        let p1b = json!({"request_id": "r1", "args": {"x": 1}}).to_string();
        let o1 = open(p1.as_bytes(), "dev", "sync", &policy(false), NOW).unwrap();
        let o1b = open(p1b.as_bytes(), "dev", "sync", &policy(false), NOW).unwrap();
        let mut recent = Recent::load(Some(tree.clone()), Duration::from_secs(600), NOW);
        assert_eq!(recent.check(&o1), Seen::New);
        recent.start(&o1, NOW).unwrap();
        assert_eq!(recent.check(&o1), Seen::Duplicate(None));
        let done = Final { succeeded: true, reason: None, result: Some(json!({"polled": true})) };
        recent.finish("r1", done.clone());
        assert_eq!(recent.check(&o1), Seen::Duplicate(Some(done.clone())));
        assert_eq!(recent.check(&o1b), Seen::Conflict);
        // After a restart the id is still known; after the window it is forgotten.
        let reloaded = Recent::load(Some(tree.clone()), Duration::from_secs(600), NOW + 60);
        assert_eq!(reloaded.check(&o1), Seen::Duplicate(Some(done)));
        // A command still running when the agent stopped is reported as interrupted.
        let o2 = open(json!({"request_id": "r2"}).to_string().as_bytes(), "dev", "sync", &policy(false), NOW).unwrap();
        let mut running = Recent::load(Some(tree.clone()), Duration::from_secs(600), NOW);
        running.start(&o2, NOW).unwrap();
        match Recent::load(Some(tree.clone()), Duration::from_secs(600), NOW + 1).check(&o2) {
            Seen::Duplicate(Some(Final { succeeded: false, reason: Some(r), .. })) => assert!(r.starts_with("interrupted"), "{r}"),
            other => panic!("{other:?}"),
        }
        let later = Recent::load(Some(tree), Duration::from_secs(600), NOW + 601);
        assert_eq!(later.check(&o1), Seen::New);
        assert!(later.is_empty());
    }

    #[test]
    fn unsigned_ids_cannot_pin_the_table_and_make_room_when_it_is_full() {
        let mut recent = Recent::load(None, Duration::from_secs(600), NOW);
        // An unsigned command claiming to expire in a century is kept for the window only.
        let far = open(json!({"request_id": "far", "expires_at": NOW + 100 * 365 * 86400}).to_string().as_bytes(), "dev", "sync", &policy(false), NOW).unwrap();
        recent.start(&far, NOW).unwrap();
        recent.finish("far", Final { succeeded: true, reason: None, result: None });
        assert_eq!(recent.entries["far"].keep_until, NOW + 600);
        // A full table of finished unsigned ids still takes a signed command.
        for i in 1..MAX_REMEMBERED {
            let o = open(json!({"request_id": format!("j{i}")}).to_string().as_bytes(), "dev", "sync", &policy(false), NOW).unwrap();
            recent.start(&o, NOW).unwrap();
            recent.finish(&o.request_id, Final { succeeded: true, reason: None, result: None });
        }
        assert_eq!(recent.len(), MAX_REMEMBERED);
        let signed = sign(&key(), "dev", "sync", &json!({"request_id": "s1", "issued_at": NOW, "expires_at": NOW + 300}));
        let s1 = open(signed.as_bytes(), "dev", "sync", &policy(true), NOW).unwrap();
        recent.start(&s1, NOW).expect("room is made for a signed command");
        assert_eq!(recent.len(), MAX_REMEMBERED);
        // Running or signed entries are never evicted: a table full of them says busy.
        let mut busy = Recent::load(None, Duration::from_secs(600), NOW);
        for i in 0..MAX_REMEMBERED {
            let o = open(json!({"request_id": format!("r{i}")}).to_string().as_bytes(), "dev", "sync", &policy(false), NOW).unwrap();
            busy.start(&o, NOW).unwrap();
        }
        assert_eq!(busy.start(&s1, NOW).map_err(|(r, _)| r), Err(Refusal::Busy));
    }

    #[test]
    fn a_signed_id_is_kept_until_it_expires_even_past_the_window() {
        let signed = sign(&key(), "dev", "sync", &json!({"request_id": "s1", "issued_at": NOW, "expires_at": NOW + 300}));
        let o = open(signed.as_bytes(), "dev", "sync", &policy(true), NOW).unwrap();
        let mut recent = Recent::load(None, Duration::from_secs(10), NOW);
        recent.start(&o, NOW).unwrap();
        // Another id arriving after the 10 s window prunes nothing that is still valid.
        let other = open(json!({"request_id": "u1"}).to_string().as_bytes(), "dev", "sync", &policy(false), NOW + 100).unwrap();
        recent.start(&other, NOW + 100).unwrap();
        assert_eq!(recent.check(&o), Seen::Duplicate(None));
    }
}
