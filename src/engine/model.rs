//! A loaded model folder and the generation loop over it.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::batch::Batch;
use super::config::GenaiConfig;
use super::decoder::Decoder;
use super::heartbeat::Heartbeat;
use super::runtime;
use super::sampling::SamplingParams;
use super::sequence::Sequence;
use super::tokenizer::{ChatMessage, Tokenizer};
use super::EngineError;

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Intra-op threads; `None` means the cores available to this process.
    pub threads: Option<usize>,
    /// Explicit path of libonnxruntime.so (otherwise searched; see [`runtime`]).
    pub ort_lib: Option<PathBuf>,
    /// Refuse to load a model that does not fit in memory (see [`super::budget`]).
    pub memory: Option<super::MemoryBudget>,
    /// Prefix reuse (see [`super::prefix`]): `None` recomputes every prompt; `Some(bytes)`
    /// reuses the live KV cache and keeps up to `bytes` of prefix snapshots.
    pub prefix_cache: Option<u64>,
    /// Sequences decoded together at most (see [`super::batch`]); 0 and 1 run one at a time.
    pub max_sequences: usize,
    /// Bytes of KV cache the running sequences may reserve together; never less than one
    /// request of `kv_tokens` (or the context). `None`: exactly that.
    pub kv_cache: Option<u64>,
    /// The longest request the caller admits (prompt and new tokens); `None`: the context.
    pub kv_tokens: Option<usize>,
    /// Prompt tokens a newcomer runs per step while others decode (see [`super::batch`]); 0
    /// runs a whole prompt at once.
    pub prefill_chunk: usize,
    /// Load the decoder graph exactly as shipped, computing logits for every position of a
    /// prompt; by default the head runs on the last position only (see [`super::graph`]).
    pub graph_as_shipped: bool,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// New tokens at most; clipped to what the context length leaves.
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains any of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Record the top-N logits of every step (for oracles and debugging); 0 records none.
    pub record_top_logits: usize,
    /// Keep generating through end-of-sequence tokens (benchmarks want a fixed length).
    pub ignore_eos: bool,
    /// Collect per-step log-probability and entropy (a softmax over the vocabulary per
    /// step) for drift reporting.
    pub collect_stats: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams { max_new_tokens: 256, sampling: SamplingParams::greedy(), stop: Vec::new(), record_top_logits: 0, ignore_eos: false, collect_stats: false }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` or the context length was reached.
    Length,
    /// The caller asked to stop (client gone, shutdown, timeout).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Per-step statistics kept for drift reporting; never the text.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepStats {
    pub logprob_sum: f64,
    pub entropy_sum: f64,
    pub byte_fallback_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_token_ids: Vec<u32>,
    /// Generated ids, including a final end-of-sequence id when one ended generation.
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    #[serde(skip)]
    pub time_to_first_token: Duration,
    #[serde(skip)]
    pub total_time: Duration,
    /// Top logits per step when requested: `[(id, logit), ...]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_logits: Vec<Vec<(u32, f32)>>,
    #[serde(skip)]
    pub stats: StepStats,
    /// Prompt tokens whose keys and values were reused from an earlier request, not computed.
    pub reused_tokens: usize,
}

impl Generation {
    /// Decode throughput: tokens after the first over the time after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let n = self.token_ids.len().saturating_sub(1);
        let t = self.total_time.saturating_sub(self.time_to_first_token).as_secs_f64();
        if n == 0 || t <= 0.0 {
            0.0
        } else {
            n as f64 / t
        }
    }
}

/// A prompt as text: raw, or a chat to render with the model's template first.
#[derive(Debug, Clone, Copy)]
pub enum PromptText<'a> {
    Raw(&'a str),
    Chat(&'a [ChatMessage]),
}

pub struct Model {
    dir: PathBuf,
    config: GenaiConfig,
    pub(super) tokenizer: Tokenizer,
    pub(super) decoder: Decoder,
    pub(super) eos: Vec<u32>,
    pub(super) byte_fallback: Vec<bool>,
    threads: usize,
    /// Told of every forward pass, when someone watches this model's thread.
    pub(super) heartbeat: Option<Arc<Heartbeat>>,
    /// KV tokens the running sequences may reserve together (see [`super::batch`]).
    pub(super) kv_budget: usize,
    /// Prompt tokens a newcomer runs per step beside decoding sequences.
    pub(super) prefill_chunk: usize,
}

impl Model {
    /// Loads a model folder in the ONNX Runtime GenAI layout.
    ///
    /// # Errors
    /// Any [`EngineError`] naming the file and field at fault: runtime not found, missing
    /// files, malformed `genai_config.json`, a tokenizer larger than the model's vocabulary,
    /// or a graph whose inputs/outputs do not match the config.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self, EngineError> {
        // The folder is checked before the runtime is looked for: a mistyped model path is the
        // problem a user can act on first, and it needs no ONNX Runtime to report.
        let config = GenaiConfig::load(dir)?;
        if let Some(budget) = &options.memory {
            super::budget::admit(dir, &config, budget).map_err(|message| EngineError::Memory { message })?;
        }
        let mut tokenizer = Tokenizer::load(dir)?;
        tokenizer.limit_to_context(config.model.context_length);
        if tokenizer.vocab_size() > config.model.vocab_size {
            return Err(EngineError::Tokenizer {
                path: tokenizer.path().to_path_buf(),
                message: format!("has {} tokens but the model's vocabulary (genai_config.json model.vocab_size) is {}", tokenizer.vocab_size(), config.model.vocab_size),
            });
        }
        let rt = runtime::load(options.ort_lib.as_deref())?;
        let threads = options.threads.unwrap_or_else(runtime::default_threads).max(1);
        let decoder = Decoder::load(dir, &config, rt.environment(), threads, options)?;
        let context = config.model.context_length;
        let longest = options.kv_tokens.unwrap_or(context).min(context);
        let kv_budget = options.kv_cache.map_or(0, |bytes| usize::try_from(bytes / decoder.bytes_per_token()).unwrap_or(usize::MAX)).max(longest);
        let eos = config.eos_token_ids();
        let vocab = decoder.vocab();
        let byte_fallback = (0..vocab as u32).map(|id| tokenizer.id_to_token(id).is_some_and(|t| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>'))).collect();
        tracing::info!(dir = %dir.display(), model_type = %config.model.model_type, layers = config.model.decoder.num_hidden_layers, threads, max_sequences = decoder.slots(), kv_budget, "model loaded");
        Ok(Model {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            decoder,
            eos,
            byte_fallback,
            threads,
            heartbeat: None,
            kv_budget,
            prefill_chunk: if options.prefill_chunk == 0 { usize::MAX } else { options.prefill_chunk },
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &GenaiConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn context_length(&self) -> usize {
        self.config.model.context_length
    }

    /// Whether the graph computes the logits of the last position only, rather than of every
    /// position of a prompt (see [`super::graph`]).
    pub fn last_position_logits(&self) -> bool {
        self.decoder.last_position_only()
    }

    /// Bytes held by prefix snapshots now (see [`super::prefix`]).
    pub fn prefix_cache_bytes(&self) -> u64 {
        self.decoder.prefix_bytes()
    }

    /// Reports every forward pass of [`Model::generate`] to `heartbeat` (as a step over the
    /// tokens it feeds), so a watchdog on another thread can see a pass that never returns.
    pub fn watch_steps(&mut self, heartbeat: Arc<Heartbeat>) {
        self.heartbeat = Some(heartbeat);
    }

    /// Tokenizes raw text (special tokens recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer.encode(text)
    }

    /// As [`Model::encode`] and [`Model::encode_chat`], for a prompt of at most `limit` tokens:
    /// `Ok(Err(n))` when it has at least `n > limit` (see [`Tokenizer::encode_within`]).
    ///
    /// # Errors
    /// As [`Model::encode_chat`].
    pub fn encode_prompt_within(&self, prompt: PromptText<'_>, limit: usize) -> Result<Result<Vec<u32>, usize>, EngineError> {
        match prompt {
            PromptText::Raw(text) => self.tokenizer.encode_within(text, limit),
            PromptText::Chat(messages) => {
                let text = self.tokenizer.apply_chat_template(messages)?;
                self.tokenizer.encode_within(&text, limit)
            }
        }
    }

    /// Renders and tokenizes a chat with the generation prompt.
    ///
    /// # Errors
    /// [`EngineError::Template`] when the chat template fails or exceeds its bounds (see
    /// [`Tokenizer::apply_chat_template`]); [`EngineError::Tokenizer`] from tokenizing.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, EngineError> {
        let text = self.tokenizer.apply_chat_template(messages)?;
        self.tokenizer.encode(&text)
    }

    /// Generates from `prompt_ids`, calling `on_text` with each new piece of text.
    ///
    /// `cancel` is checked between steps; returning `ControlFlow::Break` from `on_text` also
    /// stops generation. Both end with [`FinishReason::Cancelled`].
    ///
    /// # Errors
    /// [`EngineError::ContextOverflow`] when the prompt leaves no room, invalid parameters,
    /// ONNX Runtime failures, and non-finite logits.
    pub fn generate(
        &mut self,
        prompt_ids: &[u32],
        params: &GenerateParams,
        cancel: &AtomicBool,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, EngineError> {
        let started = Instant::now();
        let need = self.need(prompt_ids, params)?;
        if cancel.load(Ordering::Relaxed) {
            let mut sequence = Sequence::new(prompt_ids, params, 0, need.max_new, started);
            sequence.cancel();
            return Ok(sequence.finish(&self.tokenizer)?.0);
        }
        // A batch of one: the same path the engine worker drives for several.
        let mut batch = Batch::default();
        self.join(&mut batch, prompt_ids, params, started, (), |(), text| on_text(text)).map_err(|refused| refused.error)?;
        loop {
            if cancel.load(Ordering::Relaxed) {
                batch.cancel_where(|()| true);
            }
            if let Some(((), result)) = self
                .retire(&mut batch, |(), text| {
                    let _ = on_text(text);
                })
                .pop()
            {
                return result;
            }
            if let Err(e) = self.step(&mut batch, |(), text| on_text(text)) {
                self.abandon(&mut batch);
                return Err(e);
            }
        }
    }
}
