//! A model's `genai_config.json`: parsed and checked as the engine loads it, then the values
//! the engine derives from it (the KV cache's size per token, the graph's path),
//! and the decoder file name the pull reads from it to name the graph.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(name) = edgeflow::registry::mlmodel::decoder_filename(text) {
            let _ = edgeflow::registry::mlmodel::check_relative(&name);
        }
    }
    let Ok(config) = edgeflow::fuzzing::genai_config(data) else { return };
    let d = &config.model.decoder;
    assert!(d.num_attention_heads % d.num_key_value_heads == 0);
    assert!(config.eos_token_ids().iter().all(|&id| (id as usize) < config.model.vocab_size));
    let _ = config.kv_bytes_per_token();
    let graph = config.decoder_path(Path::new("/models/m"));
    assert!(graph.strip_prefix("/models/m").is_ok_and(|p| p.components().all(|c| matches!(c, Component::Normal(_)))), "{graph:?}");
});
