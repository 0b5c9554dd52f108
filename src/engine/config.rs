//! `genai_config.json`: the ONNX Runtime GenAI description of a decoder-only model.
//!
//! The engine drives the graph from this file instead of hard-coding Phi-3, so other
//! genai-exported decoders (Phi-3.5, Phi-4-mini, Llama, Qwen) load through the same path.
//! Only the fields the engine uses are read; unknown fields are ignored because genai adds
//! new ones release after release.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::EngineError;

pub const FILE_NAME: &str = "genai_config.json";

/// Largest `genai_config.json` read (real ones are about 2 KiB).
const MAX_BYTES: u64 = 1 << 20;

// Largest sizes a config may give: far past any real decoder's (Llama 3.1 405B: 126 layers, 128
// heads of 128, a 128k context; Gemma: a 256k vocabulary), and small enough that what the engine
// derives from them (a name per layer, the KV cache's bytes for a whole context) stays small and
// cannot overflow a u64.
const MAX_LAYERS: usize = 1024;
const MAX_HEADS: usize = 1024;
const MAX_HEAD_SIZE: usize = 4096;
const MAX_CONTEXT: usize = 1 << 24;
const MAX_VOCAB: usize = 1 << 24;

#[derive(Debug, Clone, Deserialize)]
pub struct GenaiConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub search: SearchSection,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelSection {
    #[serde(rename = "type", default)]
    pub model_type: String,
    pub context_length: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    pub eos_token_id: TokenIds,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    pub decoder: DecoderSection,
}

/// genai writes `eos_token_id` either as one id or as a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct DecoderSection {
    pub filename: String,
    pub head_size: usize,
    #[serde(default)]
    pub hidden_size: Option<usize>,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub inputs: DecoderInputs,
    #[serde(default)]
    pub outputs: DecoderOutputs,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DecoderInputs {
    pub input_ids: String,
    pub attention_mask: Option<String>,
    pub position_ids: Option<String>,
    pub past_key_names: String,
    pub past_value_names: String,
}

impl Default for DecoderInputs {
    fn default() -> Self {
        // genai's own defaults when the section is absent.
        DecoderInputs {
            input_ids: "input_ids".into(),
            attention_mask: Some("attention_mask".into()),
            position_ids: None,
            past_key_names: "past_key_values.%d.key".into(),
            past_value_names: "past_key_values.%d.value".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DecoderOutputs {
    pub logits: String,
    pub present_key_names: String,
    pub present_value_names: String,
}

impl Default for DecoderOutputs {
    fn default() -> Self {
        DecoderOutputs { logits: "logits".into(), present_key_names: "present.%d.key".into(), present_value_names: "present.%d.value".into() }
    }
}

/// Generation defaults shipped with the model; request parameters override them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SearchSection {
    pub do_sample: bool,
    pub max_length: Option<usize>,
    pub past_present_share_buffer: bool,
    pub repetition_penalty: f32,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
}

impl Default for SearchSection {
    fn default() -> Self {
        SearchSection { do_sample: false, max_length: None, past_present_share_buffer: false, repetition_penalty: 1.0, temperature: 1.0, top_k: 50, top_p: 1.0 }
    }
}

impl GenaiConfig {
    /// Reads and checks `genai_config.json` in `dir`.
    ///
    /// # Errors
    /// [`EngineError::MissingFile`] when the file is absent, [`EngineError::Config`] when it is
    /// not valid JSON of the expected shape or a field is out of range (the message names it).
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join(FILE_NAME);
        let text = EngineError::read_capped(&path, MAX_BYTES)?;
        Self::parse(&text, &path)
    }

    /// Parses and checks the text of `genai_config.json`; `path` names it in errors.
    ///
    /// # Errors
    /// [`EngineError::Config`] as for [`GenaiConfig::load`].
    pub(crate) fn parse(text: &[u8], path: &Path) -> Result<Self, EngineError> {
        let config: GenaiConfig =
            serde_json::from_slice(text).map_err(|e| EngineError::Config { path: path.to_path_buf(), field: json_error_field(&e), message: e.to_string() })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), EngineError> {
        let bad = |field: &str, message: String| EngineError::Config { path: path.to_path_buf(), field: field.to_string(), message };
        let d = &self.model.decoder;
        if self.model.model_type.contains("vision") || self.model.model_type.contains("whisper") {
            return Err(bad("model.type", format!("`{}` is not a decoder-only text model", self.model.model_type)));
        }
        if d.filename.is_empty() || d.filename.contains('/') || d.filename.contains("..") {
            return Err(bad("model.decoder.filename", format!("`{}` must be a plain file name inside the model folder", d.filename)));
        }
        for (field, value, max) in [
            ("model.decoder.head_size", d.head_size, MAX_HEAD_SIZE),
            ("model.decoder.num_attention_heads", d.num_attention_heads, MAX_HEADS),
            ("model.decoder.num_hidden_layers", d.num_hidden_layers, MAX_LAYERS),
            ("model.decoder.num_key_value_heads", d.num_key_value_heads, MAX_HEADS),
            ("model.context_length", self.model.context_length, MAX_CONTEXT),
            ("model.vocab_size", self.model.vocab_size, MAX_VOCAB),
        ] {
            if value == 0 {
                return Err(bad(field, "must be greater than zero".into()));
            }
            if value > max {
                return Err(bad(field, format!("{value} is larger than {max}, past any model this engine loads")));
            }
        }
        if !d.num_attention_heads.is_multiple_of(d.num_key_value_heads) {
            return Err(bad("model.decoder.num_key_value_heads", format!("{} does not divide num_attention_heads {}", d.num_key_value_heads, d.num_attention_heads)));
        }
        let eos = self.model.eos_token_id.to_vec();
        if eos.is_empty() {
            return Err(bad("model.eos_token_id", "is empty".into()));
        }
        if let Some(id) = eos.iter().find(|&&id| id as usize >= self.model.vocab_size) {
            return Err(bad("model.eos_token_id", format!("{id} is outside the vocabulary of {}", self.model.vocab_size)));
        }
        for (field, template) in [
            ("model.decoder.inputs.past_key_names", &d.inputs.past_key_names),
            ("model.decoder.inputs.past_value_names", &d.inputs.past_value_names),
            ("model.decoder.outputs.present_key_names", &d.outputs.present_key_names),
            ("model.decoder.outputs.present_value_names", &d.outputs.present_value_names),
        ] {
            if template.matches("%d").count() != 1 {
                return Err(bad(field, format!("`{template}` must contain exactly one `%d` for the layer index")));
            }
        }
        Ok(())
    }

    pub fn decoder_path(&self, dir: &Path) -> PathBuf {
        dir.join(&self.model.decoder.filename)
    }

    /// Bytes of keys and values one token takes in the fp32 KV cache (key and value, every
    /// layer and kv head).
    pub fn kv_bytes_per_token(&self) -> u64 {
        let d = &self.model.decoder;
        // In u64: on a 32-bit target the product of the (checked) sizes may not fit a usize.
        2 * d.num_hidden_layers as u64 * d.num_key_value_heads as u64 * d.head_size as u64 * 4
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.model.eos_token_id.to_vec()
    }
}

/// Expands genai's `%d` layer-name template.
pub fn layer_name(template: &str, layer: usize) -> String {
    template.replacen("%d", &layer.to_string(), 1)
}

/// serde_json does not expose the failing path; its message names the field
/// (`missing field `x``) or the position, which is the best available hint.
fn json_error_field(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    if let Some(rest) = msg.strip_prefix("missing field `") {
        if let Some(end) = rest.find('`') {
            return rest[..end].to_string();
        }
    }
    format!("line {} column {}", e.line(), e.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHI3: &str = r#"{
      "model": {"bos_token_id": 1, "context_length": 4096, "type": "phi3", "vocab_size": 32064,
        "eos_token_id": [32007, 32001, 32000], "pad_token_id": 32000,
        "decoder": {"filename": "model.onnx", "head_size": 96, "hidden_size": 3072,
          "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
          "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
          "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
            "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
          "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}}},
      "search": {"do_sample": false, "max_length": 4096, "past_present_share_buffer": true, "top_k": 1}
    }"#;

    fn parse(text: &str) -> Result<GenaiConfig, EngineError> {
        let dir = tempdir();
        std::fs::write(dir.join(FILE_NAME), text).unwrap();
        GenaiConfig::load(&dir)
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("edgeflow-cfg-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_oversized_config_is_refused_unparsed() {
        // Valid JSON padded with whitespace past the cap: refused by size, not by content.
        let padded = format!("{PHI3}{}", " ".repeat(MAX_BYTES as usize));
        assert!(matches!(parse(&padded), Err(EngineError::TooLarge { limit: MAX_BYTES, .. })));
        assert!(parse(PHI3).is_ok());
    }

    #[test]
    fn parses_phi3_config() {
        let c = parse(PHI3).unwrap();
        assert_eq!(c.eos_token_ids(), vec![32007, 32001, 32000]);
        assert_eq!(c.model.decoder.num_key_value_heads, 32);
        assert!(c.search.past_present_share_buffer);
        assert_eq!(layer_name(&c.model.decoder.inputs.past_key_names, 7), "past_key_values.7.key");
    }

    #[test]
    fn rejects_bad_fields_by_name() {
        let cases = [
            (PHI3.replace("\"num_key_value_heads\": 32", "\"num_key_value_heads\": 5"), "model.decoder.num_key_value_heads"),
            (PHI3.replace("\"head_size\": 96", "\"head_size\": 0"), "model.decoder.head_size"),
            (PHI3.replace("past_key_values.%d.key", "past_key_values.key"), "model.decoder.inputs.past_key_names"),
            (PHI3.replace("[32007, 32001, 32000]", "[99999]"), "model.eos_token_id"),
            (PHI3.replace("\"model.onnx\"", "\"../x.onnx\""), "model.decoder.filename"),
            (PHI3.replace("\"context_length\": 4096,", ""), "context_length"),
            // Sizes this large overflowed the KV cache's bytes per token and would have named a
            // million layers (fuzz/regressions/genai_config/).
            (PHI3.replace("\"head_size\": 96", "\"head_size\": 1099511627776"), "model.decoder.head_size"),
            (PHI3.replace("\"num_hidden_layers\": 32", "\"num_hidden_layers\": 1048576"), "model.decoder.num_hidden_layers"),
            (
                PHI3.replace("\"num_key_value_heads\": 32", "\"num_key_value_heads\": 4096").replace("\"num_attention_heads\": 32", "\"num_attention_heads\": 4096"),
                "model.decoder.num_attention_heads",
            ),
            (PHI3.replace("\"context_length\": 4096", "\"context_length\": 18446744073709551615"), "model.context_length"),
            (PHI3.replace("\"vocab_size\": 32064", "\"vocab_size\": 4294967296"), "model.vocab_size"),
        ];
        for (text, field) in cases {
            match parse(&text) {
                Err(EngineError::Config { field: f, .. }) => assert_eq!(f, field, "for {text}"),
                other => panic!("expected a config error naming {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn single_eos_id_is_accepted() {
        let c = parse(&PHI3.replace("[32007, 32001, 32000]", "32000")).unwrap();
        assert_eq!(c.eos_token_ids(), vec![32000]);
    }
}
