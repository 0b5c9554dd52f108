//! Text in and out: the model's own `tokenizer.json`, its chat template, and streaming
//! detokenization that never emits half a UTF-8 character.
//!
//! The chat template comes with the model artifact, so it is code from the registry run on
//! every chat request. It is compiled once, when the model loads (a template that does not
//! compile fails the load, naming `tokenizer_config.json`), and every render is bounded: at
//! most [`super::template::CHAT_TEMPLATE_FUEL`] template instructions, minijinja's recursion
//! limit, at most [`MAX_RENDERED_BYTES`] of output (less for a short context, see
//! [`Tokenizer::limit_to_context`]), and, in the `edgeflow` binary, the memory and time of a
//! sandboxed child process ([`super::template::sandbox`]). A template past a bound is an
//! [`EngineError::Template`], never a hung engine thread or an exhausted device.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::template::{ChatTemplate, RenderError, Rendered, Spec};
use super::EngineError;

/// Rendered prompt bytes allowed per token of the model's context. Text averages 3-5 bytes a
/// token; 32 leaves room for long runs of whitespace or punctuation that tokenize densely, and
/// a prompt longer than this could not fit the context anyway.
pub const RENDERED_BYTES_PER_TOKEN: usize = 32;

/// The ceiling on a rendered prompt whatever the context (a 128k-token context reaches it):
/// four times the default request body (`serve.max_body`), small enough that tokenizing it
/// takes seconds, not minutes.
pub const MAX_RENDERED_BYTES: usize = 4 << 20;

/// Largest `tokenizer.json` loaded (real ones: 2 MiB for Phi-3, 9 MiB for Llama 3, 33 MiB for
/// Gemma's 256k vocabulary).
pub const MAX_TOKENIZER_BYTES: u64 = 128 << 20;

/// Largest `tokenizer_config.json` loaded (real ones stay under 1 MiB, added-token tables and
/// all).
pub const MAX_TOKENIZER_CONFIG_BYTES: u64 = 16 << 20;

/// The two conversations the smoke test renders (see [`Tokenizer::check_chat_template`]).
const CHECK_SYSTEM: &str = "You are a helpful assistant.";
const CHECK_USER: &str = "Hello";

/// Phi-3's template, used when `tokenizer_config.json` has none.
pub const PHI3_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The subset of `tokenizer_config.json` the engine uses.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<ChatTemplateField>,
    #[serde(default)]
    bos_token: Option<TokenField>,
    #[serde(default)]
    eos_token: Option<TokenField>,
}

impl TokenizerConfig {
    /// Parses the text of `tokenizer_config.json`; `path` names it in errors.
    ///
    /// # Errors
    /// [`EngineError::Tokenizer`] when it is not JSON of the expected shape.
    pub(crate) fn parse(text: &[u8], path: &Path) -> Result<Self, EngineError> {
        serde_json::from_slice(text).map_err(|e| EngineError::Tokenizer { path: path.to_path_buf(), message: e.to_string() })
    }

    /// The chat template it names (Phi-3's when it has none) and its special tokens.
    pub(crate) fn into_spec(self) -> Spec {
        let source = match self.chat_template {
            Some(ChatTemplateField::One(t)) => t,
            Some(ChatTemplateField::Named(list)) => {
                list.iter().find(|t| t.name == "default").or(list.first()).map(|t| t.template.clone()).unwrap_or_else(|| PHI3_CHAT_TEMPLATE.to_string())
            }
            None => PHI3_CHAT_TEMPLATE.to_string(),
        };
        Spec {
            source,
            bos_token: self.bos_token.map(|t| t.text().to_string()).unwrap_or_else(|| "<s>".into()),
            eos_token: self.eos_token.map(|t| t.text().to_string()).unwrap_or_else(|| "<|endoftext|>".into()),
        }
    }
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

/// [`Tokenizer::encode_within`] probes texts longer than this many bytes per allowed token
/// (ordinary text runs 3 to 5 bytes a token).
pub const BYTES_PER_TOKEN_PROBE: usize = 16;
/// Tokens a cut in the middle of a word may add to the probe's count.
const PROBE_MARGIN: usize = 16;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// The compiled chat template, rendered in a sandbox when this binary hosts one.
    chat: ChatTemplate,
    /// Longest rendered prompt accepted, in bytes.
    max_rendered_bytes: usize,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`, and
    /// compiles the chat template.
    ///
    /// # Errors
    /// [`EngineError::MissingFile`] / [`EngineError::Tokenizer`] naming the file at fault,
    /// including a `chat_template` that does not compile.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("tokenizer.json");
        let bytes = EngineError::read_capped(&path, MAX_TOKENIZER_BYTES)?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| EngineError::Tokenizer { path: path.clone(), message: e.to_string() })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = match EngineError::read_capped(&config_path, MAX_TOKENIZER_CONFIG_BYTES) {
            Ok(text) => TokenizerConfig::parse(&text, &config_path)?,
            Err(EngineError::MissingFile { .. }) => TokenizerConfig::default(),
            Err(e) => return Err(e),
        };
        let chat =
            ChatTemplate::new(config.into_spec()).map_err(|e| EngineError::Tokenizer { path: config_path.clone(), message: format!("its chat_template does not compile: {e}") })?;
        Ok(Tokenizer { inner, path, chat, max_rendered_bytes: MAX_RENDERED_BYTES })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bounds rendered prompts to what a context of `tokens` could hold
    /// ([`RENDERED_BYTES_PER_TOKEN`] each, at most [`MAX_RENDERED_BYTES`]).
    pub fn limit_to_context(&mut self, tokens: usize) {
        self.max_rendered_bytes = tokens.saturating_mul(RENDERED_BYTES_PER_TOKEN).clamp(1, MAX_RENDERED_BYTES);
    }

    /// The longest rendered prompt accepted, in bytes.
    pub fn max_rendered_bytes(&self) -> usize {
        self.max_rendered_bytes
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

    /// As [`Tokenizer::encode`] for a prompt that may hold at most `limit` tokens, without the
    /// cost of tokenizing all of a text far past it: a text longer than
    /// [`BYTES_PER_TOKEN_PROBE`] bytes a token of `limit` has its start tokenized first, and when
    /// that start alone is past `limit` (with a margin for the cut), the answer is `Err(n)`: at
    /// least `n` tokens. A megabyte of prompt costs seconds and a hundred megabytes to tokenize
    /// whole, only to be refused.
    ///
    /// # Errors
    /// [`EngineError::Tokenizer`] if the tokenizer rejects the text.
    pub fn encode_within(&self, text: &str, limit: usize) -> Result<Result<Vec<u32>, usize>, EngineError> {
        let probe = limit.saturating_mul(BYTES_PER_TOKEN_PROBE);
        if text.len() > probe {
            let mut cut = probe;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let start = self.encode(&text[..cut])?;
            if start.len() > limit.saturating_add(PROBE_MARGIN) {
                return Ok(Err(start.len() - PROBE_MARGIN));
            }
        }
        self.encode(text).map(Ok)
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
    /// [`EngineError::Template`] when the template fails to render (for instance a template
    /// that raises on an unsupported role), runs out of fuel, or renders more than
    /// [`Tokenizer::max_rendered_bytes`].
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.render(messages).map(|r| r.text).map_err(|e| EngineError::Template { message: e.to_string() })
    }

    /// The smoke test's check of the chat template: a user message alone, and a system
    /// message before it, must render within the bounds to something. A template may refuse
    /// the system message with `raise_exception` (some have no place for one); any other
    /// failure fails the check.
    ///
    /// # Errors
    /// [`EngineError::Template`] naming the conversation that failed.
    pub fn check_chat_template(&self) -> Result<(), EngineError> {
        let user = ChatMessage { role: "user".into(), content: CHECK_USER.into() };
        let system = ChatMessage { role: "system".into(), content: CHECK_SYSTEM.into() };
        let fail = |what: &str, e: RenderError| EngineError::Template { message: format!("rendering {what}: {e}") };
        match self.render(std::slice::from_ref(&user)) {
            Ok(r) if r.text.is_empty() => return Err(fail("a user message", RenderError::Empty)),
            Ok(_) => {}
            Err(e) => return Err(fail("a user message", e)),
        }
        match self.render(&[system, user]) {
            Ok(_) => Ok(()),
            Err(RenderError::Raised(reason)) => {
                tracing::info!(%reason, "the chat template refuses system messages");
                Ok(())
            }
            Err(e) => Err(fail("a system and a user message", e)),
        }
    }

    /// Renders `messages` within the bounds.
    fn render(&self, messages: &[ChatMessage]) -> Result<Rendered, RenderError> {
        self.chat.render(messages, self.max_rendered_bytes)
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::template::{Template, CHAT_TEMPLATE_FUEL};
    use super::*;

    /// Phi-3's tokenizer files (their template is [`PHI3_CHAT_TEMPLATE`]).
    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
    }

    fn with_template(template: &str) -> Tokenizer {
        let mut t = Tokenizer::load(&fixture()).unwrap();
        let spec = Spec { source: template.to_string(), bos_token: "<s>".into(), eos_token: "<|endoftext|>".into() };
        t.chat = ChatTemplate::InProcess(Template::compile(spec).unwrap());
        t
    }

    /// SmolLM2-135M-Instruct's template (ChatML with a default system prompt), verbatim.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// In the style of Llama 3's: trims, slices and `set` per message (more work per message).
    const LLAMA3_STYLE: &str = "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Cutting Knowledge Date: December 2023\n' }}{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}{%- if not (message.role.startswith('user') or message.role.startswith('assistant')) %}{{- raise_exception('bad role') }}{%- endif %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}";

    /// Mistral-7B-Instruct-v0.1's: raises on a system message.
    const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    /// The loop of the security report: 10^10 iterations, hours without fuel.
    const HOSTILE_LOOP: &str = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    /// A system message and `turns` user/assistant messages of chat-sized text.
    fn long_chat(turns: usize) -> Vec<ChatMessage> {
        let mut chat = vec![msg("system", "You are a helpful assistant. Answer briefly.")];
        for i in 0..turns {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            chat.push(msg(role, &format!("  Message {i}: what is the capital of country number {i}, and why?  ")));
        }
        chat
    }

    fn template_error(result: Result<String, EngineError>) -> String {
        match result {
            Err(EngineError::Template { message }) => message,
            other => panic!("expected a chat template error, got {other:?}"),
        }
    }

    #[test]
    fn a_template_looping_without_end_runs_out_of_fuel_within_seconds() {
        let t = with_template(HOSTILE_LOOP);
        let started = Instant::now();
        let message = template_error(t.apply_chat_template(&[msg("user", "Hello")]));
        println!("out of fuel after {:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        assert!(message.contains("ran out of fuel"), "{message}");
        let err = t.check_chat_template().unwrap_err();
        assert!(err.to_string().contains("ran out of fuel"), "the smoke test refuses it: {err}");
        assert!(err.is_bad_request(), "a request that meets it is answered 400");
    }

    #[test]
    fn a_template_rendering_a_huge_prompt_is_refused() {
        // 100,000 x 10,000 bytes = 1 GB, in few enough steps that fuel alone would let it by.
        let mut t = with_template("{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}");
        let message = template_error(t.apply_chat_template(&[msg("user", "Hello")]));
        assert!(message.contains(&format!("longer than {MAX_RENDERED_BYTES} bytes")), "{message}");
        // A model's context bounds it further.
        t.limit_to_context(4096);
        assert_eq!(t.max_rendered_bytes(), 4096 * RENDERED_BYTES_PER_TOKEN);
        let message = template_error(t.apply_chat_template(&[msg("user", "Hello")]));
        assert!(message.contains(&format!("longer than {} bytes", 4096 * 32)), "{message}");
        assert!(t.check_chat_template().is_err());
    }

    #[test]
    fn recursion_is_bounded() {
        for source in ["{% include 'chat' %}", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"] {
            let t = with_template(source);
            let started = Instant::now();
            let err = t.apply_chat_template(&[msg("user", "Hello")]).unwrap_err();
            assert!(matches!(err, EngineError::Template { .. }), "{source}: {err}");
            assert!(started.elapsed() < Duration::from_secs(2), "{source}: took {:?}", started.elapsed());
        }
    }

    #[test]
    fn real_templates_render_long_chats_within_the_bounds() {
        // Phi-3's, read from its tokenizer_config.json.
        let mut phi3 = Tokenizer::load(&fixture()).unwrap();
        phi3.limit_to_context(4096);
        assert_eq!(phi3.apply_chat_template(&[msg("system", "Be brief."), msg("user", "Hi")]).unwrap(), "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n");
        phi3.check_chat_template().unwrap();
        let smollm2 = with_template(SMOLLM2);
        assert_eq!(
            smollm2.apply_chat_template(&[msg("user", "Hi")]).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        smollm2.check_chat_template().unwrap();
        let llama = with_template(LLAMA3_STYLE);
        llama.check_chat_template().unwrap();
        // A chat as long as a 4k context holds (and longer): far within the fuel.
        for t in [&phi3, &smollm2, &llama] {
            let text = t.apply_chat_template(&long_chat(400)).unwrap();
            assert!(text.contains("country number 399"));
        }
    }

    /// The figures behind [`CHAT_TEMPLATE_FUEL`] (`cargo test --lib fuel_of_real -- --nocapture`).
    #[test]
    fn fuel_of_real_templates() {
        for (name, source) in [("phi3", PHI3_CHAT_TEMPLATE), ("smollm2", SMOLLM2), ("llama3-style", LLAMA3_STYLE)] {
            let t = with_template(source);
            let fuel = |turns: usize| t.render(&long_chat(turns)).unwrap().fuel;
            let (two, fifty) = (fuel(1), fuel(49));
            println!("{name}: {two} fuel for 2 messages, {fifty} for 50, {} for 400", fuel(399));
            assert!(fifty > 0, "fuel is counted");
            assert!(fifty.saturating_mul(100) <= CHAT_TEMPLATE_FUEL, "{name}: {fifty} for 50 messages leaves less than a 100x margin");
        }
    }

    #[test]
    fn the_smoke_check_lets_a_template_refuse_system_messages_but_nothing_else() {
        let mistral = with_template(MISTRAL);
        mistral.check_chat_template().unwrap();
        let err = template_error(mistral.apply_chat_template(&[msg("system", "s"), msg("user", "u")]));
        assert!(err.contains("Conversation roles must alternate"), "the template's own words reach the client: {err}");

        // Hostile only when a system message comes: the check renders that conversation too.
        let sly = with_template(
            "{% if messages[0].role == 'system' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}{{ messages[-1].content }}",
        );
        assert!(sly.check_chat_template().unwrap_err().to_string().contains("a system and a user message"));
        // A template refusing the user is no template.
        let refuses = with_template("{{ raise_exception('no') }}");
        assert!(refuses.check_chat_template().unwrap_err().to_string().contains("rendering a user message"));
        let empty = with_template("{# nothing #}");
        assert!(empty.check_chat_template().unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn a_template_that_does_not_compile_fails_the_load_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture().join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": "{% for m in messages %}{{ m.content }}"}"#).unwrap();
        let err = Tokenizer::load(dir.path()).err().expect("a template without endfor does not load").to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("chat_template does not compile"), "{err}");
    }

    #[test]
    fn oversized_tokenizer_files_are_refused_before_they_are_parsed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture().join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
        // A sparse file: one byte over the cap costs no disk, and must cost no parse.
        let config = std::fs::File::create(dir.path().join("tokenizer_config.json")).unwrap();
        config.set_len(MAX_TOKENIZER_CONFIG_BYTES + 1).unwrap();
        let err = Tokenizer::load(dir.path()).err().expect("an oversized tokenizer_config.json does not load");
        assert!(matches!(err, EngineError::TooLarge { limit: MAX_TOKENIZER_CONFIG_BYTES, .. }), "{err}");
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

        // At the cap exactly it is read (and fails as the JSON it is not).
        config.set_len(MAX_TOKENIZER_CONFIG_BYTES).unwrap();
        let err = Tokenizer::load(dir.path()).err().expect("zeros are not JSON");
        assert!(matches!(err, EngineError::Tokenizer { .. }), "{err}");

        std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        std::fs::File::options().write(true).open(dir.path().join("tokenizer.json")).unwrap().set_len(MAX_TOKENIZER_BYTES + 1).unwrap();
        let err = Tokenizer::load(dir.path()).err().expect("an oversized tokenizer.json does not load");
        assert!(matches!(err, EngineError::TooLarge { limit: MAX_TOKENIZER_BYTES, .. }), "{err}");
    }

    #[test]
    fn a_text_far_past_the_limit_is_refused_from_its_start_alone() {
        let t = Tokenizer::load(&fixture()).unwrap();
        let short = "The quick brown fox jumps over the lazy dog. ".repeat(4);
        let whole = t.encode(&short).unwrap();
        assert_eq!(t.encode_within(&short, 1000).unwrap(), Ok(whole.clone()), "under the limit: the same tokens");
        assert_eq!(t.encode_within(&short, 4).unwrap(), Ok(whole), "a short text is tokenized whole, even past a small limit");
        let long = "lorem ipsum ".repeat(20_000);
        let all = t.encode(&long).unwrap().len();
        let Err(at_least) = t.encode_within(&long, 64).unwrap() else { panic!("a 240 KB text is past 64 tokens") };
        assert!(at_least > 64 && at_least <= all, "{at_least} is a lower bound on the {all} tokens, past the limit");
        let multibyte = "é".repeat(10_000);
        assert!(t.encode_within(&multibyte, 64).unwrap().is_err(), "the probe cuts on a character boundary");
    }
}
