//! The engine against onnxruntime-genai's greedy outputs, plus sampling, stop strings, limits,
//! cancellation, prefix reuse and bad model folders.
//!
//! The oracle runs live (tests/gen/oracle.py in the test venv, on this machine's CPU): ONNX
//! Runtime picks its kernels by instruction set, and logits from an AVX2 machine differ from
//! an AVX-512 machine's by up to a few units on these random-weight models, so only a
//! same-machine reference can be held to a tight tolerance. The recorded outputs
//! (tests/fixtures/oracle/, made on an AVX-512 machine) still fix the prompts and the token ids.

mod common;

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use edgeflow::engine::{Batch, ChatMessage, EngineError, FinishReason, GenerateParams, LoadOptions, Model, SamplingParams, Tokenizer};
use serde::Deserialize;

#[derive(Deserialize)]
struct Oracle {
    model: String,
    max_new_tokens: usize,
    min_margin: f64,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    kind: String,
    text: String,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    prompt_token_ids: Vec<u32>,
    token_ids: Vec<u32>,
    text_out: String,
    finish_reason: String,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    token_id: u32,
    top: Vec<(u32, f32)>,
}

const MODELS: [&str; 3] = ["phi3-tiny-gqa", "phi3-tiny-gqa-acc1", "phi3-tiny-mha"];

fn load(name: &str) -> Model {
    Model::load(&common::fixture_model(name), &common::load_options()).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn oracle(name: &str) -> Oracle {
    let path = common::repo().join("tests/fixtures/oracle").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn greedy(max_new_tokens: usize) -> GenerateParams {
    GenerateParams { max_new_tokens, ..GenerateParams::default() }
}

fn run(model: &mut Model, ids: &[u32], params: &GenerateParams) -> (edgeflow::engine::Generation, String) {
    let mut streamed = String::new();
    let g = model
        .generate(ids, params, &AtomicBool::new(false), |piece| {
            streamed.push_str(piece);
            ControlFlow::Continue(())
        })
        .expect("generate");
    (g, streamed)
}

/// onnxruntime-genai run now, on this machine, over the recorded oracle's prompts.
fn live_oracle(name: &str) -> Oracle {
    let out = tempfile::tempdir().unwrap();
    let run = std::process::Command::new(common::python())
        .arg(common::repo().join("tests/gen/oracle.py"))
        .arg("--out-dir")
        .arg(out.path())
        .arg(common::fixture_model(name))
        .output()
        .expect("running tests/gen/oracle.py");
    assert!(run.status.success(), "tests/gen/oracle.py failed: {}", String::from_utf8_lossy(&run.stderr));
    let path = out.path().join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Token-for-token equality with onnxruntime-genai, logits within tolerance, same text.
fn check_against_oracle(name: &str) {
    let recorded = oracle(name);
    let oracle = live_oracle(name);
    assert_eq!(oracle.cases.len(), recorded.cases.len());
    for (live, rec) in oracle.cases.iter().zip(&recorded.cases) {
        assert_eq!((&live.name, &live.prompt_token_ids), (&rec.name, &rec.prompt_token_ids), "{name}: the live oracle ran the recorded prompts");
        assert_eq!(live.token_ids, rec.token_ids, "{name}/{}: genai here chose the tokens genai chose where the oracle was recorded", live.name);
    }
    assert_eq!(oracle.model, name);
    assert!(oracle.cases.len() >= 8, "{name}: the oracle should cover at least 8 prompts");
    let mut model = load(name);
    assert!(model.last_position_logits(), "{name}: the engine narrows the LM head to the last position");
    let eos = model.config().eos_token_ids();
    for case in &oracle.cases {
        let what = format!("{name}/{}", case.name);
        // Our tokenizer must give exactly the ids genai was fed.
        let ids = match (&case.kind[..], &case.messages) {
            ("chat", Some(messages)) => {
                let rendered = model.tokenizer().apply_chat_template(messages).unwrap();
                assert_eq!(rendered, case.text, "{what}: chat template rendering");
                model.encode_chat(messages).unwrap()
            }
            _ => model.encode(&case.text).unwrap(),
        };
        assert_eq!(ids, case.prompt_token_ids, "{what}: prompt token ids");

        let params = GenerateParams { record_top_logits: 5, ..greedy(oracle.max_new_tokens) };
        let (g, streamed) = run(&mut model, &ids, &params);
        let strip = |v: &[u32]| -> Vec<u32> {
            let mut v = v.to_vec();
            if v.last().is_some_and(|t| eos.contains(t)) {
                v.pop();
            }
            v
        };
        assert_eq!(strip(&g.token_ids), strip(&case.token_ids), "{what}: generated token ids");
        assert_eq!(g.finish_reason.as_str(), case.finish_reason, "{what}: finish reason");
        assert_eq!(g.text, case.text_out, "{what}: decoded text");
        assert_eq!(streamed, g.text, "{what}: streamed text equals the final text");
        for (i, (ours, theirs)) in g.top_logits.iter().zip(&case.steps).enumerate() {
            assert_eq!(ours[0].0, theirs.token_id, "{what}: step {i} argmax");
            for ((id_a, la), (id_b, lb)) in ours.iter().zip(&theirs.top) {
                // Ids may swap only where logits tie within tolerance.
                assert!((la - lb).abs() <= 2e-3, "{what}: step {i}: logit {la} (id {id_a}) vs genai {lb} (id {id_b})");
            }
        }
    }
    eprintln!("{name}: {} cases token-exact; oracle's smallest top-1/top-2 margin {:.4}", oracle.cases.len(), oracle.min_margin);
}

#[test]
fn tiny_gqa_matches_genai() {
    check_against_oracle("phi3-tiny-gqa");
}

#[test]
fn tiny_gqa_acc1_matches_genai() {
    check_against_oracle("phi3-tiny-gqa-acc1");
}

#[test]
fn tiny_mha_matches_genai() {
    check_against_oracle("phi3-tiny-mha");
}

/// The graph narrowed to the last position's logits (see engine/graph.rs) against the graph as
/// shipped: the same tokens and logits, over prompts of one token, a few, and many (in
/// prefill chunks and whole), with and without prefix reuse.
#[test]
fn the_last_position_graph_gives_the_logits_of_the_graph_as_shipped() {
    for name in MODELS {
        for (prefill_chunk, prefix_cache) in [(0, None), (16, Some(64 << 20))] {
            let options = LoadOptions { prefill_chunk, prefix_cache, ..common::load_options() };
            let mut narrowed = Model::load(&common::fixture_model(name), &options).unwrap();
            let mut shipped = Model::load(&common::fixture_model(name), &LoadOptions { graph_as_shipped: true, ..options }).unwrap();
            assert!(narrowed.last_position_logits() && !shipped.last_position_logits(), "{name}");
            let long = "The quick brown fox jumps over the lazy dog. ".repeat(12);
            for text in ["a", "Hello there, general", long.as_str()] {
                let ids = narrowed.encode(text).unwrap();
                let params = GenerateParams { record_top_logits: 5, ignore_eos: true, ..greedy(8) };
                let (a, _) = run(&mut narrowed, &ids, &params);
                let (b, _) = run(&mut shipped, &ids, &params);
                let what = format!("{name}, chunk {prefill_chunk}, reuse {}, {} prompt tokens", prefix_cache.is_some(), ids.len());
                assert_eq!(a.token_ids, b.token_ids, "{what}");
                assert_eq!(a.top_logits.len(), 8, "{what}");
                for (step, (x, y)) in a.top_logits.iter().zip(&b.top_logits).enumerate() {
                    for ((ia, la), (ib, lb)) in x.iter().zip(y) {
                        assert!((la - lb).abs() <= 1e-3, "{what}: step {step}: {la} (id {ia}) vs {lb} (id {ib}) as shipped");
                    }
                }
            }
        }
    }
}

#[test]
fn phi3_tokenizer_encodes_the_chat_markers() {
    let model = load(MODELS[0]);
    assert_eq!(model.encode("<|user|>\nHello<|end|>\n<|assistant|>\n").unwrap(), vec![32010, 15043, 32007, 32001]);
    let chat = [ChatMessage { role: "user".into(), content: "Hello".into() }];
    assert_eq!(model.encode_chat(&chat).unwrap(), vec![32010, 15043, 32007, 32001]);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let mut model = load(MODELS[0]);
    let ids = model.encode("Once upon a time").unwrap();
    let sampled = |seed| GenerateParams {
        // The fixtures' logits are deliberately decisive, so sample hot to leave the greedy path.
        sampling: SamplingParams { temperature: 3.0, top_k: 50, top_p: 0.95, repetition_penalty: 1.0, seed: Some(seed) },
        ignore_eos: true,
        ..greedy(24)
    };
    let a = run(&mut model, &ids, &sampled(7)).0.token_ids;
    let b = run(&mut model, &ids, &sampled(7)).0.token_ids;
    let c = run(&mut model, &ids, &sampled(8)).0.token_ids;
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, c, "another seed, other tokens");
    let g = run(&mut model, &ids, &greedy(24)).0.token_ids;
    assert_ne!(a, g, "hot sampling leaves the greedy path");
}

#[test]
fn max_tokens_and_context_limits() {
    let mut model = load(MODELS[0]);
    let ids = model.encode("Count with me:").unwrap();
    let g = run(&mut model, &ids, &GenerateParams { ignore_eos: true, ..greedy(5) }).0;
    assert_eq!(g.token_ids.len(), 5);
    assert_eq!(g.finish_reason, FinishReason::Length);

    let context = model.context_length();
    let long = vec![29871u32; context];
    match model.generate(&long, &greedy(4), &AtomicBool::new(false), |_| ControlFlow::Continue(())) {
        Err(e @ EngineError::ContextOverflow { .. }) => assert!(e.is_bad_request()),
        other => panic!("expected a context overflow, got {:?}", other.map(|g| g.token_ids)),
    }
    // A prompt one short of the context gets exactly one token, finished by length.
    let g = run(&mut model, &long[..context - 1], &GenerateParams { ignore_eos: true, ..greedy(100) }).0;
    assert_eq!(g.token_ids.len(), 1);
    assert_eq!(g.finish_reason, FinishReason::Length);
}

#[test]
fn bad_parameters_are_rejected_by_name() {
    let mut model = load(MODELS[0]);
    let ids = model.encode("hi").unwrap();
    let cases: Vec<(GenerateParams, &str)> = vec![
        (greedy(0), "max_new_tokens"),
        (GenerateParams { sampling: SamplingParams { temperature: -0.5, ..SamplingParams::greedy() }, ..greedy(4) }, "temperature"),
        (GenerateParams { sampling: SamplingParams { top_p: 1.5, ..SamplingParams::greedy() }, ..greedy(4) }, "top_p"),
    ];
    for (params, name) in cases {
        match model.generate(&ids, &params, &AtomicBool::new(false), |_| ControlFlow::Continue(())) {
            Err(EngineError::InvalidParameter { name: n, .. }) => assert_eq!(n, name),
            other => panic!("expected {name} to be rejected, got {:?}", other.map(|g| g.token_ids)),
        }
    }
    match model.generate(&[99_999], &greedy(4), &AtomicBool::new(false), |_| ControlFlow::Continue(())) {
        Err(EngineError::InvalidParameter { name: "prompt", .. }) => {}
        other => panic!("expected an out-of-vocabulary prompt to be rejected, got {:?}", other.map(|g| g.token_ids)),
    }
}

#[test]
fn stop_strings_cut_the_text() {
    let mut model = load(MODELS[0]);
    let ids = model.encode("<|user|>\nTell me a story<|end|>\n<|assistant|>\n").unwrap();
    let full = run(&mut model, &ids, &GenerateParams { ignore_eos: true, ..greedy(24) }).0;
    assert!(full.text.chars().count() > 6, "need some text to cut: {:?}", full.text);
    // Stop on a piece from the middle of the greedy output.
    let chars: Vec<char> = full.text.chars().collect();
    let mid = chars.len() / 2;
    let stop: String = chars[mid..mid + 3].iter().collect();
    let expected_cut = full.text.find(&stop).unwrap();
    let params = GenerateParams { stop: vec![stop.clone()], ignore_eos: true, ..greedy(24) };
    let (g, streamed) = run(&mut model, &ids, &params);
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.text, full.text[..expected_cut], "text ends right before the stop string {stop:?}");
    assert_eq!(streamed, g.text, "no part of the stop string was streamed");
    assert!(g.token_ids.len() < full.token_ids.len());
}

#[test]
fn cancellation_stops_between_steps() {
    let mut model = load(MODELS[0]);
    let ids = model.encode("hello").unwrap();
    let cancel = AtomicBool::new(true);
    let g = model.generate(&ids, &greedy(50), &cancel, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Cancelled);
    assert!(g.token_ids.is_empty());

    // A consumer that goes away after the first piece stops generation.
    let mut pieces = 0;
    let g = model
        .generate(&ids, &GenerateParams { ignore_eos: true, ..greedy(50) }, &AtomicBool::new(false), |_| {
            pieces += 1;
            ControlFlow::Break(())
        })
        .unwrap();
    assert_eq!(g.finish_reason, FinishReason::Cancelled);
    assert_eq!(pieces, 1);
    assert!(g.token_ids.len() < 50);
}

#[test]
fn streaming_never_splits_a_character() {
    // Byte-fallback tokens for "é" (C3 A9) and "🦙" (F0 9F A6 99) generated one at a time.
    let model = load(MODELS[0]);
    let tok = model.tokenizer();
    let byte = |b: u8| tok.token_to_id(&format!("<0x{b:02X}>")).unwrap();
    let ids = [tok.token_to_id("▁a").unwrap(), byte(0xC3), byte(0xA9), byte(0xF0), byte(0x9F), byte(0xA6), byte(0x99), tok.token_to_id("▁b").unwrap()];
    let mut stream = edgeflow::engine::StreamDecoder::new();
    let mut pieces = Vec::new();
    for id in ids {
        if let Some(p) = stream.push(tok, id).unwrap() {
            assert!(!p.contains('\u{FFFD}'), "broken character streamed: {p:?}");
            pieces.push(p);
        }
    }
    assert_eq!(pieces.concat(), "aé🦙 b");
    assert_eq!(pieces.concat(), tok.decode(&ids).unwrap());
}

fn load_err(dir: &Path) -> EngineError {
    match Model::load(dir, &common::load_options()) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e,
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("genai_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn decoder_file(dir: &Path) -> String {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("genai_config.json")).unwrap()).unwrap();
    v["model"]["decoder"]["filename"].as_str().unwrap().to_string()
}

#[test]
fn bad_model_folders_name_the_file_and_field() {
    let src = common::fixture_model(MODELS[0]);

    let d = common::copy_model(&src);
    std::fs::remove_file(d.path().join("genai_config.json")).unwrap();
    let e = load_err(d.path());
    assert!(matches!(&e, EngineError::MissingFile { path } if path.ends_with("genai_config.json")), "{e}");

    let d = common::copy_model(&src);
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let e = load_err(d.path());
    assert!(matches!(&e, EngineError::MissingFile { path } if path.ends_with("tokenizer.json")), "{e}");

    let d = common::copy_model(&src);
    std::fs::write(d.path().join("tokenizer.json"), b"{\"version\": \"1.0\", \"model\": 12}").unwrap();
    let e = load_err(d.path());
    assert!(matches!(&e, EngineError::Tokenizer { path, .. } if path.ends_with("tokenizer.json")), "{e}");

    let d = common::copy_model(&src);
    let onnx = decoder_file(d.path());
    std::fs::remove_file(d.path().join(format!("{onnx}.data"))).unwrap();
    let e = load_err(d.path());
    assert!(matches!(&e, EngineError::Graph { path, .. } if path.ends_with(&onnx)), "{e}");

    let d = common::copy_model(&src);
    let f = d.path().join(&onnx);
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 3]).unwrap();
    let e = load_err(d.path());
    assert!(matches!(&e, EngineError::Graph { path, .. } if path.ends_with(&onnx)), "{e}");

    let d = common::copy_model(&src);
    edit_config(d.path(), |v| v["model"]["decoder"]["filename"] = "absent.onnx".into());
    let e = load_err(d.path());
    assert!(matches!(&e, EngineError::MissingFile { path } if path.ends_with("absent.onnx")), "{e}");

    let d = common::copy_model(&src);
    edit_config(d.path(), |v| v["model"]["decoder"]["inputs"]["attention_mask"] = "attn_mask".into());
    let e = load_err(d.path());
    assert!(matches!(&e, EngineError::GraphMismatch { field, .. } if field == "model.decoder.inputs.attention_mask"), "{e}");
    assert!(e.to_string().contains("attn_mask"), "{e}");

    let d = common::copy_model(&src);
    edit_config(d.path(), |v| v["model"]["decoder"]["inputs"]["position_ids"] = "position_ids".into());
    let e = load_err(d.path());
    assert!(matches!(&e, EngineError::GraphMismatch { field, .. } if field == "model.decoder.inputs.position_ids"), "{e}");

    let d = common::copy_model(&src);
    edit_config(d.path(), |v| v["model"]["vocab_size"] = 32008.into());
    let e = load_err(d.path());
    assert!(matches!(&e, EngineError::Tokenizer { .. }), "tokenizer larger than the model: {e}");

    let d = common::copy_model(&src);
    edit_config(d.path(), |v| {
        let heads = v["model"]["decoder"]["num_attention_heads"].as_u64().unwrap();
        v["model"]["decoder"]["num_key_value_heads"] = heads.into();
        v["model"]["decoder"]["head_size"] = 48.into();
    });
    let e = load_err(d.path());
    assert!(matches!(&e, EngineError::GraphMismatch { .. }), "{e}");

    let d = common::copy_model(&src);
    std::fs::write(d.path().join("genai_config.json"), b"{\"model\": [").unwrap();
    let e = load_err(d.path());
    assert!(matches!(&e, EngineError::Config { path, .. } if path.ends_with("genai_config.json")), "{e}");
}

/// The chat template of the security report (item 7): 10^10 loop iterations, hours of the
/// engine thread without a bound.
const NEVER_ENDING_TEMPLATE: &str = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";

/// A copy of the tiny model whose tokenizer_config.json carries `template` as its chat_template.
fn with_chat_template(template: &str) -> tempfile::TempDir {
    let d = common::copy_model(&common::fixture_model(MODELS[0]));
    let path = d.path().join("tokenizer_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["chat_template"] = template.into();
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    d
}

/// `f` on a thread of its own, failing the test when it takes longer than `limit` (the thread
/// is left behind: a hung engine cannot be stopped).
fn within<T: Send + 'static>(limit: std::time::Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what} still running after {limit:?}"))
}

#[test]
fn a_never_ending_chat_template_errs_within_seconds_and_fails_the_registry_smoke_test() {
    let d = with_chat_template(NEVER_ENDING_TEMPLATE);
    let dir = d.path().to_path_buf();
    // A chat request meets it: a template error (a 400 for the client) within seconds.
    let err = within(std::time::Duration::from_secs(10), "a chat request", move || {
        let model = Model::load(&dir, &common::load_options()).expect("the template compiles; it only loops");
        model.encode_chat(&[ChatMessage { role: "user".into(), content: "Hello".into() }]).unwrap_err()
    });
    assert!(matches!(&err, EngineError::Template { message } if message.contains("ran out of fuel")), "{err}");
    assert!(err.is_bad_request());

    // The registry's smoke test renders the template, so such a version never becomes active.
    let dir = d.path().to_path_buf();
    let verdict = within(std::time::Duration::from_secs(30), "the registry's smoke test", move || edgeflow::pipeline::pull::smoke_test(&dir, &common::load_options(), 1));
    let reason = verdict.expect_err("the smoke test refuses the version");
    assert!(reason.contains("chat template") && reason.contains("ran out of fuel"), "{reason}");

    // A template that does not compile fails the load itself, naming the file.
    let d = with_chat_template("{% for m in messages %}{{ m.content }}");
    let e = load_err(d.path());
    assert!(matches!(&e, EngineError::Tokenizer { path, message } if path.ends_with("tokenizer_config.json") && message.contains("chat_template does not compile")), "{e}");
}

/// The chat template's sandbox (a child `edgeflow` process under a memory limit) renders
/// real templates byte for byte as the engine does in process, at a cost per render that the
/// test prints; a render that outlasts the timeout (fuel counts instructions, not what they
/// cost: here 50 MB string repetitions) has its child stopped, and the next render runs in a
/// new one.
#[test]
fn the_template_sandbox_renders_as_the_engine_does_and_stops_a_render_that_outlasts_it() {
    use edgeflow::engine::template::sandbox::{Sandbox, Settings};
    use edgeflow::engine::template::{RenderError, Spec, Template};
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    const SLOW: &str =
        "{% if messages[-1].content == 'slow' %}{% for i in range(50000) %}{% set x = messages[-1].content[:1] * 50000000 %}{% endfor %}{% endif %}{{ messages[-1].content }}";
    let settings = Settings::new(env!("CARGO_BIN_EXE_edgeflow").into());
    let spec = |source: &str| Spec { source: source.into(), bos_token: "<s>".into(), eos_token: "</s>".into() };
    let mut chat = vec![ChatMessage { role: "system".into(), content: "Answer briefly.".into() }];
    for i in 0..40 {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        chat.push(ChatMessage { role: role.into(), content: format!("message {i}: caf\u{e9} \u{1f600} \"quoted\"\n\ttabbed") });
    }
    for source in [edgeflow::engine::PHI3_CHAT_TEMPLATE, CHATML] {
        let here = Template::compile(spec(source)).unwrap();
        let sandbox = Sandbox::new(settings.clone(), spec(source));
        for n in [1, 2, chat.len()] {
            let (a, b) = (here.render(&chat[..n], 1 << 20).unwrap(), sandbox.render(&chat[..n], 1 << 20).unwrap());
            assert_eq!((&a.text, a.fuel), (&b.text, b.fuel), "{n} messages");
        }
        let limit = here.render(&chat, 1 << 20).unwrap().text.len() - 1;
        assert!(matches!(sandbox.render(&chat, limit), Err(RenderError::TooLong { .. })), "the output bound holds in the sandbox");
        let timed = |f: &dyn Fn()| {
            let started = std::time::Instant::now();
            for _ in 0..50 {
                f();
            }
            started.elapsed() / 50
        };
        let in_process = timed(&|| drop(here.render(&chat, 1 << 20).unwrap()));
        let sandboxed = timed(&|| drop(sandbox.render(&chat, 1 << 20).unwrap()));
        println!("41-message render: {in_process:?} in process, {sandboxed:?} in the sandbox");
    }

    let sandbox = Sandbox::new(Settings { timeout: std::time::Duration::from_secs(1), ..settings }, spec(SLOW));
    let hello = [ChatMessage { role: "user".into(), content: "hello".into() }];
    assert_eq!(sandbox.render(&hello, 1024).unwrap().text, "hello");
    let started = std::time::Instant::now();
    let slow = [ChatMessage { role: "user".into(), content: "slow".into() }];
    match sandbox.render(&slow, 1024) {
        Err(RenderError::Sandbox(why)) => assert!(why.contains("took longer than 1s"), "{why}"),
        other => panic!("expected the sandbox to be stopped, got {other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "stopped after {:?}", started.elapsed());
    assert_eq!(sandbox.render(&hello, 1024).unwrap().text, "hello", "a new child renders the next request");

    // A program that is not an edgeflow binary fails the handshake, loudly.
    let impostor = Sandbox::new(Settings::new("/bin/cat".into()), spec(CHATML));
    match impostor.render(&hello, 1024) {
        Err(RenderError::Sandbox(why)) => assert!(why.contains("did not start"), "{why}"),
        other => panic!("expected a failed start, got {other:?}"),
    }
}

/// Greedy output with prefix reuse is, token for token, the output without it, through every
/// way a request can share a prefix: the same system prompt again (live), a context switch and
/// back (from a snapshot), a chat continued with the model's own answer, the exact prompt
/// again, and a request longer than the buffers (which grow, keeping the prefix).
fn prefix_reuse_changes_no_token(name: &str) {
    let mut plain = load(name);
    let options = LoadOptions { prefix_cache: Some(64 << 20), ..common::load_options() };
    let mut reusing = Model::load(&common::fixture_model(name), &options).unwrap_or_else(|e| panic!("loading {name}: {e}"));
    let tokenizer = Tokenizer::load(&common::fixture_model(name)).unwrap();
    let encode = |t: &str| tokenizer.encode(t).unwrap();
    let system = encode("<|system|>\nYou are the assistant of a small device at the edge of a network. Answer briefly, in plain words, and never make anything up; when you do not know, say so.<|end|>\n");
    assert!(system.len() >= 32, "{name}: a system prompt long enough to be worth reusing");
    let turn = |q: &str| -> Vec<u32> { [system.clone(), encode(&format!("<|user|>\n{q}<|end|>\n<|assistant|>\n"))].concat() };
    let other = encode(
        "<|system|>\nA different app with a different system prompt, long enough to push the first one out of the live cache.<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\n",
    );

    // The same request to both models: the same tokens; how many `reusing` reused.
    let mut step = |what: &str, ids: &[u32], params: &GenerateParams| -> (Vec<u32>, usize) {
        let (a, _) = run(&mut plain, ids, params);
        let (b, _) = run(&mut reusing, ids, params);
        assert_eq!(a.reused_tokens, 0, "{name}/{what}: reuse is off in the plain model");
        assert_eq!(b.token_ids, a.token_ids, "{name}/{what}: reuse changed the greedy output");
        assert_eq!(b.text, a.text, "{name}/{what}");
        (b.token_ids, b.reused_tokens)
    };
    let params = greedy(12);
    let first = turn("What is the capital of France?");
    assert_eq!(step("first request", &first, &params).1, 0);
    let (_, reused) = step("same system prompt", &turn("How far is the moon?"), &params);
    assert!(reused >= system.len(), "{name}: the system prompt came from the live cache ({reused} < {})", system.len());
    let in_common = other.iter().zip(&system).take_while(|(a, b)| a == b).count();
    assert!(in_common < 4, "{name}: the other app shares little more than the start of text");
    assert_eq!(step("another app", &other, &params).1, in_common, "{name}: only the tokens in common are reused");
    let again = turn("And the capital of Spain?");
    let (answer, reused) = step("back to the first app", &again, &params);
    assert!(reused >= system.len(), "{name}: the system prompt came back from a snapshot ({reused} < {})", system.len());
    let chat = [again.clone(), answer.clone(), encode("<|end|>\n<|user|>\nAre you sure?<|end|>\n<|assistant|>\n")].concat();
    let (_, reused) = step("the chat continued", &chat, &params);
    assert_eq!(reused, again.len() + answer.len() - 1, "{name}: the whole earlier turn is reused (all but its last sampled token were fed)");
    assert_eq!(step("the exact prompt again", &chat, &params).1, chat.len() - 1, "{name}: only the last token runs");
    let (_, reused) = step("a longer request", &chat, &greedy(200));
    assert_eq!(reused, chat.len() - 1, "{name}: the buffers grew and kept the prefix");
    assert!(reusing.prefix_cache_bytes() > 0 && reusing.prefix_cache_bytes() <= 64 << 20);
}

#[test]
fn prefix_reuse_gives_the_same_tokens_gqa() {
    prefix_reuse_changes_no_token("phi3-tiny-gqa");
}

#[test]
fn prefix_reuse_gives_the_same_tokens_gqa_acc1() {
    prefix_reuse_changes_no_token("phi3-tiny-gqa-acc1");
}

#[test]
fn prefix_reuse_gives_the_same_tokens_mha() {
    prefix_reuse_changes_no_token("phi3-tiny-mha");
}

/// Sequences decoded together give, token for token, what each gives alone: they join at
/// different steps, end at different lengths, and newcomers take the rows the finished ones
/// freed (so some steps run over a row no sequence owns). Returns how many joined while others
/// were running.
fn batching_changes_no_token(name: &str, prefix_cache: Option<u64>) -> usize {
    let mut alone = load(name);
    // Prompts run 8 tokens per step beside decoding sequences: most newcomers take several.
    let options = LoadOptions { max_sequences: 4, prefix_cache, prefill_chunk: 8, ..common::load_options() };
    let mut batched = Model::load(&common::fixture_model(name), &options).unwrap_or_else(|e| panic!("loading {name}: {e}"));
    assert_eq!(batched.max_sequences(), 4, "{name}: a shared-buffer graph batches");
    let tokenizer = Tokenizer::load(&common::fixture_model(name)).unwrap();
    let prompts: Vec<(Vec<u32>, usize)> = [
        ("<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n", 24),
        ("<|system|>\nYou are the assistant of a small device.<|end|>\n<|user|>\nHow far away is the moon, roughly?<|end|>\n<|assistant|>\n", 9),
        ("Once upon a time", 17),
        ("<|user|>\nList three colours.<|end|>\n<|assistant|>\n", 30),
        ("The quick brown fox jumps over the lazy dog, and then", 5),
        ("<|user|>\nHi<|end|>\n<|assistant|>\n", 21),
        ("A longer prompt that runs alone first, so that the rows hold different lengths when the others decode with it.", 12),
    ]
    .iter()
    .map(|(text, n)| (tokenizer.encode(text).unwrap(), *n))
    .collect();
    let expected: Vec<Vec<u32>> = prompts.iter().map(|(ids, n)| run(&mut alone, ids, &greedy(*n)).0.token_ids).collect();

    let mut batch: Batch<(usize, String)> = Batch::default();
    let mut done: Vec<Option<(Vec<u32>, String)>> = vec![None; prompts.len()];
    let mut next = 0;
    let mut joined_while_busy = 0;
    let mut steps = 0;
    while done.iter().any(Option::is_none) {
        // Newcomers join every third step while there is room: the batch never stays the same.
        if steps % 3 == 0 {
            while next < prompts.len() {
                let (ids, n) = &prompts[next];
                let need = batched.need(ids, &greedy(*n)).unwrap();
                if !batched.has_room(&batch, need) {
                    break;
                }
                joined_while_busy += usize::from(!batch.is_empty());
                batched
                    .join(&mut batch, ids, &greedy(*n), std::time::Instant::now(), (next, String::new()), |(_, text), piece| {
                        text.push_str(piece);
                        ControlFlow::Continue(())
                    })
                    .unwrap_or_else(|r| panic!("{name}: joining: {}", r.error));
                next += 1;
            }
        }
        for ((i, text), result) in batched.retire(&mut batch, |(_, text), piece| text.push_str(piece)) {
            let g = result.unwrap_or_else(|e| panic!("{name}: sequence {i}: {e}"));
            assert_eq!(g.text, text, "{name}: sequence {i}'s text is what it streamed");
            done[i] = Some((g.token_ids, text));
        }
        batched
            .step(&mut batch, |(_, text), piece| {
                text.push_str(piece);
                ControlFlow::Continue(())
            })
            .unwrap_or_else(|e| panic!("{name}: step {steps}: {e}"));
        steps += 1;
        assert!(steps < 1000, "{name}: the batch never ended");
    }
    for (i, (got, want)) in done.iter().zip(&expected).enumerate() {
        assert_eq!(&got.as_ref().unwrap().0, want, "{name}: sequence {i} decoded in a batch differs from alone");
    }
    joined_while_busy
}

#[test]
fn batched_sequences_decode_as_they_would_alone() {
    for name in MODELS {
        let joined = batching_changes_no_token(name, None);
        assert!(joined >= 4, "{name}: only {joined} sequences joined a running batch");
        batching_changes_no_token(name, Some(16 << 20));
    }
    // A cache that grows per step (no shared buffer) cannot batch: one sequence at a time.
    let growing = common::copy_model(&common::fixture_model("phi3-tiny-gqa"));
    edit_config(growing.path(), |c| c["search"]["past_present_share_buffer"] = serde_json::Value::Bool(false));
    let options = LoadOptions { max_sequences: 4, ..common::load_options() };
    let mut model = Model::load(growing.path(), &options).unwrap();
    assert_eq!(model.max_sequences(), 1);
    let ids = model.tokenizer().encode("Hello").unwrap();
    let need = model.need(&ids, &greedy(4)).unwrap();
    let mut batch: Batch<()> = Batch::default();
    assert!(model.has_room(&batch, need));
    model.join(&mut batch, &ids, &greedy(4), std::time::Instant::now(), (), |(), _| ControlFlow::Continue(())).unwrap_or_else(|r| panic!("{}", r.error));
    assert!(!model.has_room(&batch, need), "a second sequence waits");

    // The KV budget: what the running sequences reserve together (prompt + max new tokens).
    let options = LoadOptions { max_sequences: 4, kv_tokens: Some(64), ..common::load_options() };
    let mut model = Model::load(&common::fixture_model("phi3-tiny-gqa"), &options).unwrap();
    assert_eq!(model.kv_budget(), 64, "one longest request");
    let ids = model.tokenizer().encode("Hello").unwrap();
    let long = model.need(&ids, &greedy(40)).unwrap();
    assert_eq!(long.kv_tokens, ids.len() + 40);
    let mut batch: Batch<()> = Batch::default();
    model.join(&mut batch, &ids, &greedy(40), std::time::Instant::now(), (), |(), _| ControlFlow::Continue(())).unwrap_or_else(|r| panic!("{}", r.error));
    assert!(!model.has_room(&batch, long), "two long ones exceed the budget");
    let short = model.need(&ids, &greedy(64 - 40 - 2 * ids.len())).unwrap();
    assert!(model.has_room(&batch, short), "a short one fits beside it");
}

/// A chat whose next turn outgrows the KV buffers keeps its whole earlier turn even when the
/// snapshots could hold only a little of it (here 20 tokens' worth): the row the turn continues
/// is carried into the grown buffers. Before, growing emptied every idle row into the snapshots,
/// so a long chat on a big model (Phi-3-mini: 786 KB a token) lost all but what
/// `engine.prefix_cache` took.
#[test]
fn a_turn_that_outgrows_the_buffers_keeps_its_whole_prefix_past_the_snapshot_ceiling() {
    let name = "phi3-tiny-gqa";
    let mut plain = load(name);
    // 2 layers × 2 kv heads × 16 × (key + value) × 4 bytes = 512 bytes a token: 20 tokens.
    let options = LoadOptions { prefix_cache: Some(512 * 20), ..common::load_options() };
    let mut reusing = Model::load(&common::fixture_model(name), &options).unwrap();
    let tokenizer = Tokenizer::load(&common::fixture_model(name)).unwrap();
    let encode = |t: &str| tokenizer.encode(t).unwrap();
    let first = encode(
        "<|system|>\nYou are the assistant of a small device at the edge of a network. Answer briefly.<|end|>\n<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n",
    );
    let (a, _) = run(&mut plain, &first, &greedy(12));
    let (b, _) = run(&mut reusing, &first, &greedy(12));
    assert_eq!(b.token_ids, a.token_ids);
    let chat = [first.clone(), b.token_ids.clone(), encode("<|end|>\n<|user|>\nAnd of Spain?<|end|>\n<|assistant|>\n")].concat();
    assert!(first.len() + b.token_ids.len() > 40, "an earlier turn well past the snapshots' 20 tokens");
    // 200 new tokens: past twice the buffers sized for the first turn, so they grow.
    let (a, _) = run(&mut plain, &chat, &greedy(200));
    let (b2, _) = run(&mut reusing, &chat, &greedy(200));
    assert_eq!(b2.token_ids, a.token_ids, "reuse across the growth changed the greedy output");
    assert_eq!(b2.reused_tokens, first.len() + b.token_ids.len() - 1, "the whole earlier turn was kept through the growth");
    assert!(reusing.prefix_cache_bytes() <= 512 * 20);
}

/// A request planned to start from a snapshot must not get another one's keys and values when
/// saving the row it takes evicts that snapshot first (the store holds one snapshot here).
#[test]
fn a_snapshot_evicted_before_its_restore_is_not_restored() {
    let name = "phi3-tiny-gqa";
    let mut plain = load(name);
    // 2 layers × 2 kv heads × 16 × (key + value) × 4 bytes = 512 bytes a token: 60 tokens.
    let options = LoadOptions { prefix_cache: Some(512 * 60), ..common::load_options() };
    let mut reusing = Model::load(&common::fixture_model(name), &options).unwrap();
    let tokenizer = Tokenizer::load(&common::fixture_model(name)).unwrap();
    let encode = |t: &str| tokenizer.encode(t).unwrap();
    let system = encode("<|system|>\nYou are the assistant of a small device. Answer briefly and plainly.<|end|>\n");
    let turn = |q: &str| -> Vec<u32> { [system.clone(), encode(&format!("<|user|>\n{q}<|end|>\n<|assistant|>\n"))].concat() };
    let other = encode("<|user|>\nA different app entirely, whose long question shares nothing with the system prompt above, at all.<|end|>\n<|assistant|>\n");
    let params = greedy(12);
    let mut reused = Vec::new();
    for (what, ids) in [("first app", turn("Hello?")), ("another app", other.clone()), ("the first app again", turn("And now?"))] {
        let (a, _) = run(&mut plain, &ids, &params);
        let (b, _) = run(&mut reusing, &ids, &params);
        assert_eq!(b.token_ids, a.token_ids, "{what}: reuse changed the greedy output (reused {})", b.reused_tokens);
        reused.push(b.reused_tokens);
    }
    // The first app's ~33 tokens went to the store when the other app took the row; taking it
    // back, the other app's ~33 go there too and (60 tokens of room) evict the first app's:
    // nothing of its system prompt is held anywhere, so nothing may be claimed reused.
    assert_eq!(reused, [0, 0, 0], "the evicted snapshot was not restored (nor another in its place)");
    assert!(reusing.prefix_cache_bytes() <= 512 * 60);
}
