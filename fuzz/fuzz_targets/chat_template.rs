//! A model's `tokenizer_config.json` (or, for input that is not one, a chat template alone,
//! wrapped in one): its template compiled with the engine's minijinja setup and rendered
//! in process, as the sandbox child renders it, with its fuel and output limit. A render must end
//! within those bounds: a timeout or an out-of-memory here is a finding.
#![no_main]

use std::sync::LazyLock;

use edgeflow::engine::template::Template;
use edgeflow::engine::{ChatMessage, MAX_RENDERED_BYTES};
use libfuzzer_sys::fuzz_target;

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage { role: role.into(), content: content.into() }
}

/// The smoke test's two conversations, and one with every role.
static CHATS: LazyLock<[Vec<ChatMessage>; 3]> = LazyLock::new(|| {
    [
        vec![msg("user", "Hello")],
        vec![msg("system", "You are a helpful assistant."), msg("user", "Hello")],
        vec![msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello! How can I help?"), msg("user", "  Why is the sky blue?  ")],
    ]
});

fuzz_target!(|data: &[u8]| {
    let spec = match edgeflow::fuzzing::chat_template_spec(data) {
        Ok(spec) => spec,
        Err(_) => {
            let Ok(source) = std::str::from_utf8(data) else { return };
            let wrapped = serde_json::json!({ "chat_template": source }).to_string();
            let Ok(spec) = edgeflow::fuzzing::chat_template_spec(wrapped.as_bytes()) else { return };
            spec
        }
    };
    let Ok(template) = Template::compile(spec) else { return };
    for chat in CHATS.iter() {
        if let Ok(rendered) = template.render(chat, MAX_RENDERED_BYTES) {
            assert!(rendered.text.len() <= MAX_RENDERED_BYTES);
            assert!(rendered.fuel <= edgeflow::engine::CHAT_TEMPLATE_FUEL);
        }
    }
});
