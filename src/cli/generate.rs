//! `edgeflow generate`: the engine alone on a local model folder, streaming to stdout.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Args;

use super::{RuntimeArgs, UsageError};
use crate::engine::{ChatMessage, GenerateParams, LoadOptions, Model, SamplingParams};

#[derive(Args)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["prompt", "chat"]))]
#[command(group = clap::ArgGroup::new("sampling").multiple(true).args(["temperature", "top_p", "top_k", "seed"]).conflicts_with("greedy"))]
pub struct GenerateArgs {
    /// Model folder: *.onnx, *.onnx.data, genai_config.json, tokenizer.json, tokenizer_config.json.
    #[arg(long, value_name = "DIR")]
    model_dir: PathBuf,
    /// Raw prompt, tokenized as is (special tokens in it are recognised).
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// JSON file with an array of {role, content} messages; the chat template is applied.
    #[arg(long, value_name = "FILE")]
    chat: Option<PathBuf>,
    /// Maximum new tokens.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_tokens: usize,
    /// Greedy decoding (the default unless the model's genai_config.json says do_sample).
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature (> 0 samples).
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Sample among the K most likely tokens (0 = all).
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Seed for reproducible sampling.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Repetition penalty (1.0 = off).
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    repetition_penalty: Option<f32>,
    /// Stop when this string is generated (repeatable).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Keep generating through end-of-sequence tokens (for benchmarks).
    #[arg(long, hide = true)]
    ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let options = LoadOptions { threads: args.runtime.threads, ort_lib: args.runtime.ort_lib.clone(), memory: None, prefix_cache: None, ..LoadOptions::default() };
    let mut model = Model::load(&args.model_dir, &options).with_context(|| format!("loading model from {}", args.model_dir.display()))?;

    let prompt_ids = match (&args.prompt, &args.chat) {
        (Some(text), _) => model.encode(text)?,
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading chat file {}", file.display()))?;
            let messages: Vec<ChatMessage> =
                serde_json::from_str(&text).map_err(|e| UsageError(format!("{}: expected a JSON array of {{\"role\", \"content\"}} objects: {e}", file.display())))?;
            if messages.is_empty() {
                return Err(UsageError(format!("{}: the chat has no messages", file.display())).into());
            }
            model.encode_chat(&messages)?
        }
        (None, None) => unreachable!("clap requires --prompt or --chat"),
    };

    let search = &model.config().search;
    let wants_sampling = args.temperature.is_some() || args.top_p.is_some() || args.top_k.is_some() || args.seed.is_some();
    let sampling = if args.greedy || (!wants_sampling && !search.do_sample) {
        SamplingParams { repetition_penalty: args.repetition_penalty.unwrap_or(1.0), ..SamplingParams::greedy() }
    } else {
        SamplingParams {
            temperature: args.temperature.unwrap_or(if search.do_sample { search.temperature } else { 1.0 }),
            top_k: args.top_k.unwrap_or(if search.do_sample { search.top_k } else { 0 }),
            top_p: args.top_p.unwrap_or(if search.do_sample { search.top_p } else { 1.0 }),
            repetition_penalty: args.repetition_penalty.unwrap_or(search.repetition_penalty),
            seed: args.seed,
        }
    };
    let params = GenerateParams { max_new_tokens: args.max_tokens, sampling, stop: args.stop.clone(), record_top_logits: 0, ignore_eos: args.ignore_eos, collect_stats: false };
    let cancel = AtomicBool::new(false);
    let stdout = std::io::stdout();
    let streaming = !args.json;
    let generation = model.generate(&prompt_ids, &params, &cancel, |piece| {
        if streaming {
            let mut out = stdout.lock();
            if out.write_all(piece.as_bytes()).and_then(|()| out.flush()).is_err() {
                // stdout closed (e.g. `| head`): stop generating.
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;

    if args.json {
        let out = serde_json::json!({
            "prompt_token_ids": generation.prompt_token_ids,
            "token_ids": generation.token_ids,
            "text": generation.text,
            "finish_reason": generation.finish_reason.as_str(),
            "time_to_first_token_ms": generation.time_to_first_token.as_secs_f64() * 1e3,
            "decode_tokens_per_s": generation.decode_tokens_per_s(),
            "threads": model.threads(),
        });
        println!("{out}");
    } else {
        println!();
    }
    Ok(())
}
