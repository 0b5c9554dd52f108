//! The engine on a trained model: SmolLM2-135M-Instruct (ChatML, byte-level BPE, Llama
//! architecture with grouped-query attention), exported to an ONNX Runtime GenAI folder by
//! tests/gen/smollm2/ (`make smollm2`). The fixtures of tests/engine.rs have random weights;
//! here the logits are a real language model's, so greedy parity with onnxruntime-genai,
//! the chat template, end-of-turn handling and sampling are checked on the distributions a
//! user actually meets.
//!
//! The folder is `SMOLLM2_DIR` or `.models/smollm2-135m-instruct`; onnxruntime-genai runs
//! from the test venv (`make venv`) through tests/gen/genai_greedy.py.

mod common;

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use edgeflow::engine::{ChatMessage, FinishReason, GenerateParams, Generation, LoadOptions, Model, SamplingParams};
use serde::Deserialize;

const MAX_NEW_TOKENS: usize = 32;
/// A top-1/top-2 logit gap below this is a tie a one-ulp difference can flip.
const TIE: f64 = 1e-3;

fn load() -> Model {
    let dir = common::smollm2_dir();
    Model::load(&dir, &common::load_options()).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage { role: role.into(), content: content.into() }
}

fn user(content: &str) -> Vec<ChatMessage> {
    vec![msg("user", content)]
}

fn run(model: &mut Model, ids: &[u32], params: &GenerateParams) -> (Generation, String) {
    let mut streamed = String::new();
    let g = model
        .generate(ids, params, &AtomicBool::new(false), |piece| {
            streamed.push_str(piece);
            ControlFlow::Continue(())
        })
        .expect("generate");
    (g, streamed)
}

fn greedy(max_new_tokens: usize) -> GenerateParams {
    GenerateParams { max_new_tokens, ..GenerateParams::default() }
}

/// The first `n` words of a text, on one line.
fn words(text: &str, n: usize) -> String {
    text.split_whitespace().take(n).collect::<Vec<_>>().join(" ")
}

const CODE: &str = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\nfor i in range(10):\n\tprint(i,    fib(i))  # tab-indented,    spaced\n";

const NOTES: [&str; 10] = [
    "Edge devices often run language models without a network connection.",
    "The agent loads an ONNX model, tokenizes the prompt, and streams tokens back.",
    "Quantized weights use four bits per value with a scale for every block of thirty-two.",
    "Grouped-query attention shares each key and value head between several query heads.",
    "A key-value cache keeps the attention state so every step only processes one new token.",
    "Rotary position embeddings rotate query and key vectors by an angle that grows with position.",
    "Greedy decoding always picks the token with the highest logit, so it is fully deterministic.",
    "When the model emits an end token, generation stops and the reply is returned to the caller.",
    "Temperatures, top-k and top-p change the distribution only when sampling is enabled.",
    "Small models are useful on devices because they answer quickly from little memory.",
];

/// A chat asking for a summary of numbered notes, just over `target` prompt tokens.
fn long_chat(model: &Model, target: usize) -> Vec<ChatMessage> {
    let mut notes = String::new();
    for i in 0.. {
        notes.push_str(&format!("{}. {} ", i + 1, NOTES[i % NOTES.len()]));
        let chat = user(&format!("Summarize the notes below in one sentence.\n\n{}", notes.trim_end()));
        if model.encode_chat(&chat).expect("encode_chat").len() >= target {
            return chat;
        }
    }
    unreachable!()
}

enum Prompt {
    Raw(&'static str),
    Chat(Vec<ChatMessage>),
}

fn parity_prompts(model: &Model) -> Vec<(&'static str, Prompt)> {
    use Prompt::{Chat, Raw};
    let system = "You are a concise assistant running on an edge device.";
    vec![
        ("raw_fox", Raw("The quick brown fox jumps over the lazy dog. Once upon a time")),
        ("raw_recipe", Raw("Here is a simple recipe for pancakes:\n1.")),
        ("raw_code", Raw(CODE)),
        ("raw_french", Raw("La Révolution française a commencé en 1789. Elle")),
        ("raw_german", Raw("Die Hauptstadt von Deutschland ist Berlin. Die größte Stadt Bayerns ist")),
        ("raw_chinese", Raw("中国的首都是北京。上海是")),
        ("raw_emoji", Raw("🎉🎉 party time 🥳 naïve café façade ✓ and then")),
        ("raw_spaces", Raw("a    b\t\tc\n\n\n   d  e     f\n        indented")),
        ("chat_france", Chat(user("What is the capital of France?"))),
        ("chat_hello", Chat(user("Hello! Who are you?"))),
        ("chat_system", Chat(vec![msg("system", system), msg("user", "Name three primary colors.")])),
        ("chat_multi_turn", Chat(vec![msg("system", system), msg("user", "Give me a number between 1 and 10."), msg("assistant", "7"), msg("user", "Now double it.")])),
        ("chat_french", Chat(user("Quelle est la capitale de l'Italie ? Réponds en français."))),
        ("chat_german", Chat(user("Wie viele Tage hat eine Woche? Antworte auf Deutsch."))),
        ("chat_chinese", Chat(user("你好，请用中文介绍一下你自己。"))),
        ("chat_emoji", Chat(user("Explain 🚀 and 🌍 to a child 😀👍🏽 — quickly!"))),
        ("chat_math", Chat(user("What is 12 times 7?"))),
        ("chat_json", Chat(user("Return a JSON object with the keys name and age for a person called Ada who is 36."))),
        ("chat_code_write", Chat(user("Write a Python function that checks whether a number is prime."))),
        ("chat_code_fix", Chat(user(&format!("Fix this code:\n\n{CODE}")))),
        ("chat_rust", Chat(user("Explain what this Rust code does:\n\nfn main() {\n    let v: Vec<u32> = (1..=5).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}"))),
        ("chat_long", Chat(long_chat(model, 400))),
    ]
}

#[derive(Deserialize)]
struct GenaiRun {
    genai_version: String,
    onnxruntime_version: String,
    cases: Vec<GenaiCase>,
}

#[derive(Deserialize)]
struct GenaiCase {
    name: String,
    reference_text: String,
    reference_prompt_ids: Vec<u32>,
    token_ids: Vec<u32>,
    finish_reason: String,
    min_margin: Option<f64>,
    margins: Vec<f64>,
    steps: Vec<Vec<(u32, f32)>>,
}

/// Runs tests/gen/genai_greedy.py on the engine's prompt ids.
fn genai_greedy(dir: &std::path::Path, cases: &serde_json::Value, max_new_tokens: usize) -> GenaiRun {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("cases.json");
    std::fs::write(&file, serde_json::to_vec(cases).unwrap()).unwrap();
    let script = common::repo().join("tests/gen/genai_greedy.py");
    let out = Command::new(common::python())
        .arg(&script)
        .arg("--model-dir")
        .arg(dir)
        .arg("--cases")
        .arg(&file)
        .args(["--max-new-tokens", &max_new_tokens.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}); `make venv` installs onnxruntime-genai into .venv/test:\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{} printed no JSON ({e}): {}", script.display(), String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn greedy_tokens_match_onnxruntime_genai_on_the_trained_model() {
    let dir = common::smollm2_dir();
    let mut model = load();
    assert!(model.last_position_logits(), "the engine narrows SmolLM2's LM head to the last position");
    let prompts = parity_prompts(&model);
    assert!(prompts.len() >= 20);

    // The engine renders and tokenizes; genai is fed exactly these ids.
    let mut ours_text = Vec::new();
    let mut ours_ids = Vec::new();
    let mut cases = Vec::new();
    for (name, prompt) in &prompts {
        let (text, ids, case) = match prompt {
            Prompt::Raw(text) => {
                let ids = model.encode(text).expect("encode");
                (text.to_string(), ids.clone(), serde_json::json!({"name": name, "kind": "raw", "text": text, "token_ids": ids}))
            }
            Prompt::Chat(messages) => {
                let text = model.tokenizer().apply_chat_template(messages).expect("chat template");
                let ids = model.encode_chat(messages).expect("encode_chat");
                (text, ids.clone(), serde_json::json!({"name": name, "kind": "chat", "messages": messages, "token_ids": ids}))
            }
        };
        ours_text.push(text);
        ours_ids.push(ids);
        cases.push(case);
    }
    let reference = genai_greedy(&dir, &serde_json::json!({ "cases": cases }), MAX_NEW_TOKENS);
    assert_eq!(reference.cases.len(), prompts.len());

    println!(
        "engine vs onnxruntime-genai {} (onnxruntime {}), greedy, {MAX_NEW_TOKENS} new tokens at most, {}",
        reference.genai_version,
        reference.onnxruntime_version,
        dir.display()
    );
    println!("{:<16} {:>6} {:>4} {:>6} {:<9} {:>9} {:>9}  answer", "case", "prompt", "new", "finish", "identical", "margin", "max|dl|");
    let mut identical = 0;
    let mut tolerated = Vec::new();
    let mut worst_logit_diff = 0f32;
    let mut failures = Vec::new();
    for (((name, _), (text, ids)), theirs) in prompts.iter().zip(ours_text.iter().zip(&ours_ids)).zip(&reference.cases) {
        assert_eq!(&theirs.name, name);
        // The engine's template rendering and tokenization are the reference's (transformers'
        // jinja settings and the `tokenizers` package).
        assert_eq!(text, &theirs.reference_text, "{name}: the engine's chat template rendering differs from transformers'");
        assert_eq!(ids, &theirs.reference_prompt_ids, "{name}: the engine's prompt ids differ from the `tokenizers` package's");

        let params = GenerateParams { record_top_logits: 5, ..greedy(MAX_NEW_TOKENS) };
        let (g, streamed) = run(&mut model, ids, &params);
        assert_eq!(streamed, g.text, "{name}: streamed text equals the final text");
        // Logits of the steps both took, top-5 compared by id.
        let same_prefix = g.token_ids.iter().zip(&theirs.token_ids).take_while(|(a, b)| a == b).count();
        let mut case_diff = 0f32;
        for (ours, genai) in g.top_logits.iter().zip(&theirs.steps).take(same_prefix + 1) {
            for (id, logit) in ours {
                if let Some((_, l)) = genai.iter().find(|(i, _)| i == id) {
                    case_diff = case_diff.max((logit - l).abs());
                }
            }
        }
        worst_logit_diff = worst_logit_diff.max(case_diff);
        let same = g.token_ids == theirs.token_ids;
        if same {
            identical += 1;
            if g.finish_reason.as_str() != theirs.finish_reason {
                failures.push(format!("{name}: finish reason {} vs genai {}", g.finish_reason.as_str(), theirs.finish_reason));
            }
        } else {
            let step = same_prefix;
            let margin = theirs.margins.get(step).copied().unwrap_or(f64::INFINITY);
            let what = format!(
                "{name}: diverges at step {step}: engine {:?} vs genai {:?} (genai top-1/top-2 margin {margin:.2e}; engine top-2 {:?}, genai top-2 {:?})",
                g.token_ids.get(step),
                theirs.token_ids.get(step),
                g.top_logits.get(step).map(|t| &t[..2]),
                theirs.steps.get(step).map(|t| &t[..2])
            );
            if margin < TIE {
                tolerated.push(what);
            } else {
                failures.push(what);
            }
        }
        println!(
            "{name:<16} {:>6} {:>4} {:>6} {:<9} {:>9.4} {:>9.2e}  {:?}",
            ids.len(),
            g.token_ids.len(),
            g.finish_reason.as_str(),
            if same { "yes" } else { "NO" },
            theirs.min_margin.unwrap_or(f64::NAN),
            case_diff,
            words(&g.text, 8)
        );
        if *name == "chat_france" {
            assert!(g.text.contains("Paris"), "the trained model knows the capital of France: {:?}", g.text);
        }
    }
    let min_margin = reference.cases.iter().filter_map(|c| c.min_margin).fold(f64::INFINITY, f64::min);
    println!("{identical}/{} token-identical; smallest genai top-1/top-2 margin {min_margin:.4}; largest top-5 logit difference {worst_logit_diff:.2e}", prompts.len());
    for t in &tolerated {
        println!("TOLERATED (a tie in genai's logits): {t}");
    }
    assert!(failures.is_empty(), "the engine's greedy decode differs from onnxruntime-genai's:\n{}", failures.join("\n"));
    // Same runtime, same graph: the logits agree far below any margin that matters.
    assert!(worst_logit_diff < 1e-2, "top-5 logits differ from genai's by up to {worst_logit_diff}");
}

#[test]
fn chatml_stops_at_im_end_from_the_models_own_files() {
    let mut model = load();
    let im_end = model.tokenizer().token_to_id("<|im_end|>").expect("tokenizer.json has <|im_end|>");
    let eos = model.config().eos_token_ids();
    assert!(eos.contains(&im_end), "genai_config.json eos_token_id {eos:?} includes <|im_end|> ({im_end})");

    let chat = user("What is the capital of France?");
    let rendered = model.tokenizer().apply_chat_template(&chat).unwrap();
    assert!(rendered.ends_with("<|im_end|>\n<|im_start|>assistant\n"), "ChatML generation prompt: {rendered:?}");
    let ids = model.encode_chat(&chat).unwrap();
    let (g, streamed) = run(&mut model, &ids, &greedy(128));
    println!("{} tokens, {:?}: {:?}", g.token_ids.len(), g.finish_reason, g.text);
    assert_eq!(g.finish_reason, FinishReason::Stop, "the answer ends by itself: {:?}", g.text);
    assert_eq!(g.token_ids.last(), Some(&im_end), "ended by <|im_end|>, not <|endoftext|>: {:?}", g.token_ids);
    assert!(g.token_ids.len() < 128);
    assert_eq!(streamed, g.text);
    assert!(!g.text.contains("<|im_end|>") && !g.text.contains("<|im_start|>"), "no ChatML marker reaches the user: {:?}", g.text);
    let text = g.text.trim();
    assert!(!text.is_empty());
    let ascii = text.chars().filter(char::is_ascii).count() as f64 / text.chars().count() as f64;
    assert!(ascii > 0.95 && text.split_whitespace().any(|w| ["the", "is", "of"].contains(&w.to_lowercase().as_str())), "an English answer: {text:?}");
    assert!(text.contains("Paris"), "{text:?}");

    // A stop string from the caller ends the answer mid-way, before the model's own end.
    let ids = model.encode_chat(&user("Tell me about the Eiffel Tower.")).unwrap();
    let (full, _) = run(&mut model, &ids, &greedy(48));
    let all: Vec<&str> = full.text.split_whitespace().collect();
    assert!(all.len() >= 8, "need a longer answer to cut: {:?}", full.text);
    let stop = format!(" {}", all[all.len() / 2]);
    let cut = full.text.find(&stop).expect("the stop word is in the answer");
    let (g, streamed) = run(&mut model, &ids, &GenerateParams { stop: vec![stop.clone()], ..greedy(48) });
    println!("stop {stop:?}: {:?}", g.text);
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.text, full.text[..cut], "the text ends right before {stop:?}");
    assert_eq!(streamed, g.text, "nothing of the stop string was streamed");
    assert!(g.token_ids.len() < full.token_ids.len() && g.token_ids.last() != Some(&im_end));
}

/// What sampling at one setting produced over several prompts and seeds.
#[derive(Default)]
struct Spread {
    runs: usize,
    tokens: usize,
    logprob_sum: f64,
    entropy_sum: f64,
    /// Distinct token ids per prompt, summed over prompts.
    distinct: usize,
    /// Distinct completions per prompt, summed over prompts.
    completions: usize,
}

#[test]
fn sampling_on_real_distributions() {
    let mut model = load();
    let prompts =
        ["Write a short poem about the sea.", "Tell me a story about a robot who learns to paint.", "Give me three ideas for a rainy weekend.", "Describe your favourite food."];
    let prompts: Vec<Vec<u32>> = prompts.iter().map(|p| model.encode_chat(&user(p)).unwrap()).collect();
    let n = 20;
    let sampled = |temperature: f32, top_p: f32, seed: u64| GenerateParams {
        max_new_tokens: n,
        sampling: SamplingParams { temperature, top_k: 0, top_p, repetition_penalty: 1.0, seed: Some(seed) },
        collect_stats: true,
        ..GenerateParams::default()
    };
    let mut tokens = |params: &GenerateParams| -> Vec<Vec<u32>> { prompts.iter().map(|ids| run(&mut model, ids, params).0.token_ids).collect() };

    let greedy_out = tokens(&greedy(n));
    let a = tokens(&sampled(0.8, 0.9, 7));
    let b = tokens(&sampled(0.8, 0.9, 7));
    let c = tokens(&sampled(0.8, 0.9, 8));
    assert_eq!(a, b, "the same seed gives the same tokens");
    let other_seed = a.iter().zip(&c).filter(|(x, y)| x != y).count();
    let off_greedy = a.iter().zip(&greedy_out).filter(|(x, y)| x != y).count();
    println!("temperature 0.8, top_p 0.9: seed 7 vs 8 differ on {other_seed}/{} prompts; seed 7 vs greedy differ on {off_greedy}/{}", prompts.len(), prompts.len());
    assert!(other_seed >= 1, "another seed gives another continuation");
    assert!(off_greedy >= 1, "sampling leaves the greedy path");
    // A nucleus this small keeps only the most likely token: greedy, whatever the seed.
    for seed in [7, 8] {
        assert_eq!(tokens(&sampled(0.8, 0.01, seed)), greedy_out, "top_p 0.01 (seed {seed}) is greedy");
    }

    // Hotter sampling wanders further from the model's preferences.
    let seeds = 1..=4u64;
    let mut spreads = Vec::new();
    for t in [0.3f32, 0.8, 1.3] {
        let mut s = Spread::default();
        for ids in &prompts {
            let mut distinct = HashSet::new();
            let mut completions = HashSet::new();
            for seed in seeds.clone() {
                let g = run(&mut model, ids, &sampled(t, 0.9, seed)).0;
                s.runs += 1;
                s.tokens += g.token_ids.len();
                s.logprob_sum += g.stats.logprob_sum;
                s.entropy_sum += g.stats.entropy_sum;
                distinct.extend(g.token_ids.iter().copied());
                completions.insert(g.token_ids);
            }
            s.distinct += distinct.len();
            s.completions += completions.len();
        }
        println!(
            "temperature {t:.1}, top_p 0.9, {} runs: mean logprob {:.3}, mean entropy {:.3} nats, distinct tokens {:.3} of generated, {}/{} distinct completions",
            s.runs,
            s.logprob_sum / s.tokens as f64,
            s.entropy_sum / s.tokens as f64,
            s.distinct as f64 / s.tokens as f64,
            s.completions,
            s.runs
        );
        spreads.push((t, s));
    }
    for pair in spreads.windows(2) {
        let ((t0, cold), (t1, hot)) = (&pair[0], &pair[1]);
        let mean = |sum: f64, s: &Spread| sum / s.tokens as f64;
        assert!(mean(hot.logprob_sum, hot) < mean(cold.logprob_sum, cold), "temperature {t1} picks less likely tokens than {t0}");
        assert!(hot.distinct as f64 / hot.tokens as f64 > cold.distinct as f64 / cold.tokens as f64, "temperature {t1} uses a wider vocabulary than {t0}");
    }
    let (cold, hot) = (&spreads[0].1, &spreads[2].1);
    assert!(hot.entropy_sum / hot.tokens as f64 > cold.entropy_sum / cold.tokens as f64, "hot sampling visits less certain states");
}

/// A chat continued turn after turn, with prefix reuse: every answer is token for token the one
/// computed from scratch, and each turn reuses at least the whole earlier prompt (the earlier
/// turns render the same; the model's answer, re-tokenized from its text, mostly matches too).
#[test]
fn a_chat_continued_reuses_its_earlier_turns_without_changing_a_token() {
    let mut plain = load();
    let options = LoadOptions { prefix_cache: Some(32 << 20), ..common::load_options() };
    let dir = common::smollm2_dir();
    let mut reusing = Model::load(&dir, &options).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    let mut chat = vec![msg("system", "You are a helpful assistant. Answer in one or two sentences.")];
    let mut previous = 0;
    for (turn, question) in
        ["What is the capital of France?", "How many people live there?", "Name a famous museum in that city.", "What is its most famous painting?"].into_iter().enumerate()
    {
        chat.push(msg("user", question));
        let ids = plain.encode_chat(&chat).expect("encode_chat");
        let (a, _) = run(&mut plain, &ids, &greedy(24));
        let (b, _) = run(&mut reusing, &ids, &greedy(24));
        assert_eq!(b.token_ids, a.token_ids, "turn {}: reuse changed the answer ({:?} vs {:?})", turn + 1, b.text, a.text);
        assert_eq!(a.reused_tokens, 0);
        if turn == 0 {
            assert_eq!(b.reused_tokens, 0);
        } else {
            assert!(
                b.reused_tokens >= previous && b.reused_tokens < ids.len(),
                "turn {}: reused {} of {} (the earlier prompt had {previous})",
                turn + 1,
                b.reused_tokens,
                ids.len()
            );
        }
        previous = ids.len();
        chat.push(msg("assistant", &a.text));
    }
}
