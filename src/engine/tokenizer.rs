//! Text in and out: the model's own `tokenizer.json`, its chat template, and streaming
//! detokenization that never emits half a UTF-8 character.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::EngineError;

/// Phi-3's template, used when `tokenizer_config.json` has none.
pub const PHI3_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The subset of `tokenizer_config.json` the engine uses.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<ChatTemplateField>,
    #[serde(default)]
    bos_token: Option<TokenField>,
    #[serde(default)]
    eos_token: Option<TokenField>,
}

/// `chat_template` is a string, or a list of named templates (`default`, `tool_use`, ...).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ChatTemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// Special tokens are written either as a string or as an AddedToken object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenField {
    Text(String),
    Object { content: String },
}

impl TokenField {
    fn text(&self) -> &str {
        match self {
            TokenField::Text(s) => s,
            TokenField::Object { content } => content,
        }
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: String,
    bos_token: String,
    eos_token: String,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    ///
    /// # Errors
    /// [`EngineError::MissingFile`] / [`EngineError::Tokenizer`] naming the file at fault.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| EngineError::read(&path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| EngineError::Tokenizer { path: path.clone(), message: e.to_string() })?;

        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| EngineError::Tokenizer { path: config_path.clone(), message: e.to_string() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenizerConfig::default(),
            Err(e) => return Err(EngineError::read(&config_path, e)),
        };
        let chat_template = match config.chat_template {
            Some(ChatTemplateField::One(t)) => t,
            Some(ChatTemplateField::Named(list)) => {
                list.iter().find(|t| t.name == "default").or(list.first()).map(|t| t.template.clone()).unwrap_or_else(|| PHI3_CHAT_TEMPLATE.to_string())
            }
            None => PHI3_CHAT_TEMPLATE.to_string(),
        };
        Ok(Tokenizer {
            inner,
            path,
            chat_template,
            bos_token: config.bos_token.map(|t| t.text().to_string()).unwrap_or_else(|| "<s>".into()),
            eos_token: config.eos_token.map(|t| t.text().to_string()).unwrap_or_else(|| "<|endoftext|>".into()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Encodes text as is: special tokens written in it are recognised, and the tokenizer's
    /// own post-processor decides whether a BOS is added.
    ///
    /// # Errors
    /// [`EngineError::Tokenizer`] if the tokenizer rejects the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.inner.encode(text, true).map(|e| e.get_ids().to_vec()).map_err(|e| EngineError::Tokenizer { path: self.path.clone(), message: e.to_string() })
    }

    /// Decodes ids to text, dropping special tokens.
    ///
    /// # Errors
    /// [`EngineError::Tokenizer`] for ids outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.inner.decode(ids, true).map_err(|e| EngineError::Tokenizer { path: self.path.clone(), message: e.to_string() })
    }

    /// Renders a conversation with the model's chat template, ending with the generation prompt.
    ///
    /// # Errors
    /// [`EngineError::Template`] when the template fails to compile or render (for instance a
    /// template that raises on an unsupported role).
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let mut env = minijinja::Environment::new();
        // Hugging Face templates call Python string methods (`.strip()`, `.startswith()`).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> { Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg)) });
        env.add_template("chat", &self.chat_template).map_err(|e| EngineError::Template { message: e.to_string() })?;
        let template = env.get_template("chat").map_err(|e| EngineError::Template { message: e.to_string() })?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| EngineError::Template { message: e.to_string() })
    }
}

/// Turns a growing list of token ids into text deltas.
///
/// SentencePiece byte-fallback tokens can split one character (an emoji, a CJK ideograph)
/// across several tokens, and the decoder's leading-space handling depends on context, so
/// each delta is the difference between two decodes of a short window, held back while the
/// window ends in an incomplete character (U+FFFD).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text it completes, if any.
    ///
    /// # Errors
    /// [`EngineError::Tokenizer`] for ids outside the vocabulary.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>, EngineError> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// Text still held back at the end of generation (an incomplete character decodes to U+FFFD).
    ///
    /// # Errors
    /// [`EngineError::Tokenizer`] for ids outside the vocabulary.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>, EngineError> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            Ok(Some(full[prefix.len()..].to_string()))
        } else {
            Ok(None)
        }
    }
}
