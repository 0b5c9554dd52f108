//! The inference engine: an ONNX Runtime GenAI model folder in, text out.
//!
//! `runtime` finds and loads libonnxruntime.so; `config` reads `genai_config.json`;
//! `tokenizer` handles text and streaming decode; `template` renders the chat template (in a
//! memory-limited child process where the binary hosts one); `decoder` owns the ONNX
//! session and its KV cache, and `graph` what it changes in the graph before loading it;
//! `sampling` picks tokens; `sequence` is one generation between forward passes; `model`
//! ties them into the prefill/decode loop and `batch` decodes several sequences together;
//! `prefix` keeps the keys and values of prompt prefixes for later requests; `heartbeat` lets
//! other threads see a step that never ends.

mod batch;
pub mod budget;
pub(crate) mod config;
mod decoder;
mod error;
pub(crate) mod graph;
pub mod heap;
mod heartbeat;
mod model;
mod prefix;
pub mod runtime;
mod sampling;
mod sequence;
pub mod settings;
pub mod template;
pub(crate) mod tokenizer;

pub use batch::{Batch, Need, Refused};
pub use budget::MemoryBudget;
pub use config::{GenaiConfig, FILE_NAME as GENAI_CONFIG};
pub use error::EngineError;
pub use heartbeat::{Heartbeat, StepAllowance};
pub use model::{FinishReason, GenerateParams, Generation, LoadOptions, Model, PromptText, StepStats};
pub use sampling::{argmax, SamplingParams};
pub use template::CHAT_TEMPLATE_FUEL;
pub use tokenizer::{ChatMessage, StreamDecoder, Tokenizer, MAX_RENDERED_BYTES, PHI3_CHAT_TEMPLATE, RENDERED_BYTES_PER_TOKEN};
