//! The `edgeflow generate` command as users and scripts call it.

mod common;

use std::process::{Command, Output};

use common::edgeflow;

fn tiny() -> String {
    common::fixture_model("phi3-tiny-gqa").display().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn generate_json_reports_ids_text_and_timings() {
    let out =
        edgeflow().args(["generate", "--model-dir", &tiny(), "--prompt", "<|user|>\nHello<|end|>\n<|assistant|>\n", "--max-tokens", "8", "--greedy", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(v["prompt_token_ids"], serde_json::json!([32010, 15043, 32007, 32001]));
    let n = v["token_ids"].as_array().unwrap().len();
    assert!((1..=8).contains(&n));
    assert!(["stop", "length"].contains(&v["finish_reason"].as_str().unwrap()));
    assert!(v["time_to_first_token_ms"].as_f64().unwrap() > 0.0);
    assert!(v["text"].is_string());
    assert!(v["decode_tokens_per_s"].as_f64().is_some());
}

#[test]
fn streamed_text_equals_json_text() {
    let chat = common::repo().join("tests/fixtures/chat-demo.json");
    let base = ["generate", "--model-dir", &tiny(), "--chat", chat.to_str().unwrap(), "--max-tokens", "16"];
    let streamed = edgeflow().args(base).output().unwrap();
    assert!(streamed.status.success(), "{}", stderr(&streamed));
    let json = edgeflow().args(base).arg("--json").output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let text = String::from_utf8(streamed.stdout).unwrap();
    assert_eq!(text.strip_suffix('\n').unwrap(), v["text"].as_str().unwrap());
}

#[test]
fn seeded_sampling_from_the_cli_is_reproducible() {
    let args = [
        "generate",
        "--model-dir",
        &tiny(),
        "--prompt",
        "Once",
        "--max-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--top-k",
        "40",
        "--seed",
        "11",
        "--json",
        "--ignore-eos",
    ];
    let a = edgeflow().args(args).output().unwrap();
    let b = edgeflow().args(args).output().unwrap();
    assert!(a.status.success(), "{}", stderr(&a));
    let ids = |o: &Output| serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["token_ids"].clone();
    assert_eq!(ids(&a), ids(&b));
}

#[test]
fn usage_errors_exit_64() {
    let cases: Vec<Vec<&str>> = vec![
        vec!["generate", "--prompt", "x"],                                                   // no --model-dir
        vec!["generate", "--model-dir", "/tmp"],                                             // neither --prompt nor --chat
        vec!["generate", "--model-dir", "/tmp", "--prompt", "x", "--greedy", "--seed", "1"], // conflicting
        vec!["generate", "--model-dir", "/tmp", "--prompt", "x", "--max-tokens", "-3"],
        vec!["frobnicate"],
    ];
    for args in cases {
        let out = edgeflow().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
    }
    let tiny = tiny();
    let bad_params: Vec<Vec<&str>> = vec![
        vec!["generate", "--model-dir", &tiny, "--prompt", "x", "--temperature", "-1"],
        vec!["generate", "--model-dir", &tiny, "--prompt", "x", "--top-p", "0"],
        vec!["generate", "--model-dir", &tiny, "--prompt", "x", "--max-tokens", "0"],
    ];
    for args in bad_params {
        let out = edgeflow().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("invalid generation parameter"), "{}", stderr(&out));
    }
}

#[test]
fn malformed_chat_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("chat.json");
    std::fs::write(&f, r#"{"role": "user"}"#).unwrap();
    let out = edgeflow().args(["generate", "--model-dir", &tiny(), "--chat", f.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("chat.json"), "{}", stderr(&out));
}

/// A copy of the binary in a folder of its own, outside the source tree, so no `.ort` is above it.
fn lone_binary() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin").join("edgeflow");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_edgeflow"), &bin).unwrap();
    (dir, bin)
}

#[test]
fn missing_runtime_names_every_place_searched() {
    let (_dir, bin) = lone_binary();
    let out = Command::new(&bin)
        .env_remove("EDGEFLOW_LOG")
        .env("ORT_DYLIB_PATH", "/nonexistent/ort/libonnxruntime.so")
        .env("LD_LIBRARY_PATH", "/nonexistent")
        .args(["generate", "--model-dir", &tiny(), "--prompt", "x", "--ort-lib", "/nope/libonnxruntime.so"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    for needle in [
        "/nope/libonnxruntime.so",
        "/nonexistent/ort/libonnxruntime.so",
        "ORT_DYLIB_PATH",
        "lib/libonnxruntime.so",
        "lib/edgeflow/libonnxruntime.so",
        "system library path",
        "make build",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
    assert_eq!(err.lines().count(), 1, "one clear error line: {err}");
}

#[test]
fn the_built_binary_finds_the_source_trees_runtime_unaided() {
    // No flag, no ORT_DYLIB_PATH: target/release/edgeflow finds .ort/<arch>/ (make build).
    let out = edgeflow()
        .env_remove("ORT_DYLIB_PATH")
        .args(["generate", "--model-dir", &tiny(), "--prompt", "Hello", "--max-tokens", "4", "--greedy", "--ignore-eos", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(v["token_ids"].as_array().map(Vec::len), Some(4), "{v}");
}

#[test]
fn a_missing_model_folder_is_reported_before_a_missing_runtime() {
    let (dir, bin) = lone_binary();
    let missing = dir.path().join("no-such-model");
    let out =
        Command::new(&bin).env_remove("ORT_DYLIB_PATH").env_remove("EDGEFLOW_LOG").args(["generate", "--model-dir", missing.to_str().unwrap(), "--prompt", "x"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(err.contains("no-such-model") && err.contains("genai_config.json"), "names the model folder: {err}");
    assert!(!err.contains("ONNX Runtime"), "the runtime is not the first problem: {err}");
}

#[test]
fn a_file_that_is_not_onnxruntime_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not a shared library").unwrap();
    let out = edgeflow().args(["generate", "--model-dir", &tiny(), "--prompt", "x", "--ort-lib", fake.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("could not load the ONNX Runtime library") && err.contains(fake.to_str().unwrap()), "{err}");
}

#[test]
fn help_describes_generate() {
    let out = edgeflow().args(["generate", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in ["--model-dir", "--prompt", "--chat", "--max-tokens", "--greedy", "--temperature", "--top-p", "--top-k", "--seed", "--json", "--threads", "--ort-lib"] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}
