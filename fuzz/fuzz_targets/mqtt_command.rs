//! A message on a device's command topic, as the fleet link handles it: the topic's command
//! name, the MQTT 5 response topic, the payload opened (JSON, signature, expiry), the table of
//! recent ids, and the command parsed from its arguments.
//!
//! Input: the topic below `<prefix>/<device>/` (first line), the response topic (second line,
//! empty for none), then the payload. The payload is opened as sent, and again as the `signed`
//! text of an envelope signed with a test key, so the fuzzer reaches what follows a valid
//! signature; both under a policy that requires signatures and one that does not.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use edgeflow::command::Command;
use edgeflow::fleet::commands::{self, Policy, Recent, Seen};
use edgeflow::fleet::topics::Topics;
use libfuzzer_sys::fuzz_target;

const DEVICE: &str = "dev-1";
/// 2023-11-14, the time every command is opened at.
const NOW: u64 = 1_700_000_000;

static KEY: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::from_bytes(&[7; 32]));
static TOPICS: LazyLock<Topics> = LazyLock::new(|| Topics::new("fleet", DEVICE));

fn policy(require: bool) -> Policy {
    Policy { key: Some(KEY.verifying_key()), require, max_age: Duration::from_secs(300), not_before: Some(NOW - 3600) }
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let (Some(topic), Some(response), payload) = (parts.next(), parts.next(), parts.next().unwrap_or_default()) else { return };
    let (Ok(topic), Ok(response)) = (std::str::from_utf8(topic), std::str::from_utf8(response)) else { return };
    if !response.is_empty() {
        let _ = TOPICS.is_reply(response);
    }
    let Some(name) = TOPICS.command_name(&format!("fleet/{DEVICE}/{topic}")).map(|n| edgeflow::util::truncate(n, 64).to_string()) else { return };

    let mut payloads = vec![payload.to_vec()];
    if let Ok(signed) = std::str::from_utf8(payload) {
        let signature = KEY.sign(edgeflow::fuzzing::signing_input(DEVICE, &name, signed).as_bytes());
        payloads.push(serde_json::json!({ "signed": signed, "signature": hex::encode(signature.to_bytes()) }).to_string().into_bytes());
    }
    for payload in &payloads {
        for require in [false, true] {
            let Ok(opened) = commands::open(payload, DEVICE, &name, &policy(require), NOW) else { continue };
            assert!(!opened.request_id.is_empty() && opened.request_id.len() <= 128, "{opened:?}");
            assert!(opened.signed || !require, "an unsigned command passed a policy requiring signatures");
            let mut recent = Recent::load(None, Duration::from_secs(600), NOW);
            assert_eq!(recent.check(&opened), Seen::New);
            let Ok(command) = Command::parse(&name, &opened.args) else { continue };
            recent.start(&opened, NOW).expect("an empty table takes a command");
            assert!(matches!(recent.check(&opened), Seen::Duplicate(None)), "a repeat is a duplicate");
            if let Command::Set(settings) = &command {
                serde_json::to_value(settings).expect("settings serialize for the reply");
            }
        }
    }
});
