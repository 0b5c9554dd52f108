//! `[engine]`: where ONNX Runtime is, how many threads and at what priority inference runs,
//! and the memory check before a version loads.

use std::path::PathBuf;

use serde::Deserialize;

use crate::util::parse_size;
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Path of libonnxruntime.so; unset means ORT_DYLIB_PATH, then lib/ next to the
    /// executable, then the system library path.
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads; unset means the cores available to the process.
    pub threads: Option<usize>,
    /// Refuse to load a version that does not fit in the memory left (MemAvailable and the
    /// cgroup's memory.max), instead of being OOM-killed.
    pub memory_check: bool,
    /// Memory to leave besides the weights and the KV cache, e.g. `"256MiB"`.
    pub memory_reserve: String,
    /// Added to the daemon's niceness for the serving engine's threads (as `nice -n`), so
    /// request handling, the fleet link and other programs preempt inference without delay.
    /// (The registry's one-off smoke test of a new version runs at the daemon's priority.)
    pub nice: i32,
    /// Prefix reuse: a request starting with tokens an earlier one ran (a system prompt, the
    /// turns of a chat) reuses their keys and values. This is the memory for snapshots of
    /// prefixes the live cache no longer holds, e.g. `"256MiB"`; `"0"` keeps only the live
    /// cache's; `"off"` recomputes every prompt. Counted in the memory check.
    pub prefix_cache: String,
    /// Requests decoded together at most (continuous batching); more wait in the queue. 1 runs
    /// one at a time.
    pub max_sequences: usize,
    /// Memory the running requests' KV caches may take together, e.g. `"512MiB"`; `"auto"`
    /// is one longest request (prompt and `serve.max_tokens`, or the context). Never less than
    /// that. Counted in the memory check.
    pub kv_cache: String,
    /// While others decode, a newcomer's prompt runs this many tokens per decode step, so a
    /// long prompt does not stall their streams; 0 runs it whole.
    pub prefill_chunk: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            ort_lib: None,
            threads: None,
            memory_check: true,
            memory_reserve: "256MiB".into(),
            nice: 5,
            prefix_cache: "256MiB".into(),
            max_sequences: 4,
            kv_cache: "auto".into(),
            prefill_chunk: 64,
        }
    }
}

impl EngineConfig {
    /// How the daemon loads models: with the memory budget when `memory_check` is on, the
    /// KV cache sized for `kv_tokens` (the longest request the API admits; `None`: the context).
    #[must_use]
    pub fn load_options(&self, kv_tokens: Option<usize>) -> super::LoadOptions {
        let reserve = parse_size(&self.memory_reserve).unwrap_or(256 << 20);
        let prefix_cache = self.prefix_cache_bytes();
        let kv_cache = self.kv_cache_bytes();
        let memory = self.memory_check.then(|| super::MemoryBudget { prefix_cache: prefix_cache.unwrap_or(0), kv_cache, ..super::MemoryBudget::new(reserve, kv_tokens) });
        super::LoadOptions {
            threads: self.threads,
            ort_lib: self.ort_lib.clone(),
            memory,
            prefix_cache,
            max_sequences: self.max_sequences,
            kv_cache,
            kv_tokens,
            prefill_chunk: self.prefill_chunk,
            graph_as_shipped: false,
        }
    }

    /// `kv_cache` in bytes; `None` for `"auto"` (or not a size, which `problems` reports).
    fn kv_cache_bytes(&self) -> Option<u64> {
        if self.kv_cache.trim().eq_ignore_ascii_case("auto") {
            None
        } else {
            parse_size(&self.kv_cache).ok()
        }
    }

    /// `prefix_cache` in bytes; `None` when it is `"off"` (or not a size, which `problems` reports).
    fn prefix_cache_bytes(&self) -> Option<u64> {
        if self.prefix_cache.trim().eq_ignore_ascii_case("off") {
            None
        } else {
            parse_size(&self.prefix_cache).ok()
        }
    }
}

impl EngineConfig {
    /// Every problem with `[engine]`, each as `engine.key: message`.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.threads == Some(0) {
            problems.push("engine.threads: must be at least 1 (leave unset for the available cores)".to_string());
        }
        if !(0..=19).contains(&self.nice) {
            problems.push(format!("engine.nice: {} must be between 0 and 19", self.nice));
        }
        if parse_size(&self.memory_reserve).is_err() {
            problems.push(format!("engine.memory_reserve: `{}` is not a size such as \"256MiB\"", self.memory_reserve));
        }
        if !self.prefix_cache.trim().eq_ignore_ascii_case("off") && parse_size(&self.prefix_cache).is_err() {
            problems.push(format!("engine.prefix_cache: `{}` is not a size such as \"256MiB\" (or \"0\", or \"off\")", self.prefix_cache));
        }
        if !(1..=64).contains(&self.max_sequences) {
            problems.push(format!("engine.max_sequences: {} must be between 1 and 64", self.max_sequences));
        }
        if !self.kv_cache.trim().eq_ignore_ascii_case("auto") && parse_size(&self.kv_cache).is_err() {
            problems.push(format!("engine.kv_cache: `{}` is not a size such as \"512MiB\" (or \"auto\")", self.kv_cache));
        }
        problems
    }
}
