//! A decoder graph (a serialized ONNX ModelProto) as the engine rewrites it before loading:
//! any bytes are a rewrite, no rewrite or an error, never a panic; a rewritten graph reads
//! back without error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(rewritten)) = edgeflow::fuzzing::last_position_logits(data, "logits") {
        if let Err(e) = edgeflow::fuzzing::last_position_logits(&rewritten, "logits") {
            panic!("the rewritten graph does not read back: {e}");
        }
    }
});
