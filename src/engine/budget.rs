//! Memory-budget admission: before a model is loaded, the memory it will take is compared
//! with what the process may still use, and the load is refused with the figures rather
//! than letting the kernel's OOM killer end the daemon (and every request with it).
//!
//! What a load needs: the weights (every `*.onnx` and `*.onnx.data` file, read into
//! memory by ONNX Runtime), the KV cache for the longest request the server admits (fp32,
//! as the CPU int4 builds use: 2 × layers × kv-heads × head size × tokens × 4 bytes), and a
//! configured reserve for everything else (activations, tokenizer, buffers).
//!
//! What is available: the kernel's `MemAvailable`, and under cgroup v2 the room left below
//! `memory.max` at this process's cgroup and each of its ancestors; the smallest wins. An
//! overlap swap loads the new version while the old one is resident, so the old one is
//! already subtracted from both.

use std::path::{Path, PathBuf};

use super::config::GenaiConfig;

/// What to check before loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Bytes to leave for everything besides weights and KV cache.
    pub reserve: u64,
    /// Tokens the KV cache must hold; `None` means the model's context length.
    pub kv_tokens: Option<usize>,
    /// Bytes prefix snapshots may take (`engine.prefix_cache`).
    pub prefix_cache: u64,
    /// Bytes the running sequences' KV caches may take together (`engine.kv_cache`), when more
    /// than one request of `kv_tokens`.
    pub kv_cache: Option<u64>,
    /// Where `/proc` and `/sys/fs/cgroup` are (tests point these at fixtures).
    pub proc_root: PathBuf,
    pub cgroup_root: PathBuf,
}

impl MemoryBudget {
    pub fn new(reserve: u64, kv_tokens: Option<usize>) -> MemoryBudget {
        MemoryBudget { reserve, kv_tokens, prefix_cache: 0, kv_cache: None, proc_root: PathBuf::from("/proc"), cgroup_root: PathBuf::from("/sys/fs/cgroup") }
    }
}

/// The memory a load needs, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub weights: u64,
    pub kv_cache: u64,
    pub prefix_cache: u64,
    pub reserve: u64,
}

impl Need {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.prefix_cache + self.reserve
    }
}

/// The memory this process may still use, and which limit decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Available {
    pub bytes: u64,
    /// `MemAvailable` or the cgroup whose `memory.max` is closest.
    pub limited_by: String,
}

/// Bytes of the weight files in `dir`.
///
/// # Errors
/// The folder cannot be read.
pub fn weight_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".onnx") || name.ends_with(".onnx.data") || name.ends_with(".onnx_data") {
            // Follow symlinks: a cached version's files are links to blobs.
            total += std::fs::metadata(entry.path())?.len();
        }
    }
    Ok(total)
}

/// What loading the model in `dir` with `config` needs under `budget`.
///
/// # Errors
/// The folder cannot be read.
pub fn need(dir: &Path, config: &GenaiConfig, budget: &MemoryBudget) -> std::io::Result<Need> {
    let tokens = budget.kv_tokens.unwrap_or(config.model.context_length).min(config.model.context_length) as u64;
    let kv_cache = (config.kv_bytes_per_token() * tokens).max(budget.kv_cache.unwrap_or(0));
    Ok(Need { weights: weight_bytes(dir)?, kv_cache, prefix_cache: budget.prefix_cache, reserve: budget.reserve })
}

/// What the process may still use; `None` when `/proc/meminfo` cannot be read (then no
/// admission check is possible, and the load goes ahead).
pub fn available(budget: &MemoryBudget) -> Option<Available> {
    let meminfo = std::fs::read_to_string(budget.proc_root.join("meminfo")).ok()?;
    let kib = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
    let mut best = Available { bytes: kib * 1024, limited_by: "MemAvailable".to_string() };
    if let Some(path) = std::fs::read_to_string(budget.proc_root.join("self/cgroup")).ok().as_deref().and_then(cgroup_v2_path) {
        // The process's cgroup and each ancestor up to the root: any of them may limit.
        let mut rel = PathBuf::from(path.trim_start_matches('/'));
        loop {
            let dir = budget.cgroup_root.join(&rel);
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok().and_then(|s| s.trim().parse::<u64>().ok());
            if let (Some(max), Some(current)) = (read("memory.max"), read("memory.current")) {
                let room = max.saturating_sub(current);
                if room < best.bytes {
                    best = Available { bytes: room, limited_by: format!("cgroup /{} memory.max", rel.display()) };
                }
            }
            if !rel.pop() {
                break;
            }
        }
    }
    Some(best)
}

/// The unified (v2) hierarchy's path from `/proc/self/cgroup` (`0::/system.slice/x.service`).
fn cgroup_v2_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::trim).filter(|p| p.starts_with('/'))
}

/// Refuses a load that does not fit.
///
/// # Errors
/// A message with every figure, for logs, `/readyz`, health reports and events.
pub fn admit(dir: &Path, config: &GenaiConfig, budget: &MemoryBudget) -> Result<(), String> {
    let need = need(dir, config, budget).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let Some(avail) = available(budget) else {
        tracing::debug!("no /proc/meminfo; memory budget not checked");
        return Ok(());
    };
    if need.total() > avail.bytes {
        return Err(format!(
            "not enough memory to load the model: it needs {} (weights {}, KV cache {}, prefix cache {}, reserve {}) but only {} is available (limited by {})",
            mib(need.total()),
            mib(need.weights),
            mib(need.kv_cache),
            mib(need.prefix_cache),
            mib(need.reserve),
            mib(avail.bytes),
            avail.limited_by
        ));
    }
    tracing::debug!(need = need.total(), available = avail.bytes, limited_by = %avail.limited_by, "memory budget admits the model");
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup-v2 fixture: the process's own cgroup path and, per ancestor, (path, memory.max, memory.current).
    type CgroupTree<'a> = (&'a str, &'a [(&'a str, &'a str, &'a str)]);

    fn fixture(meminfo_kib: u64, cgroup: Option<CgroupTree>) -> (tempfile::TempDir, MemoryBudget) {
        let t = tempfile::tempdir().unwrap();
        let proc_root = t.path().join("proc");
        std::fs::create_dir_all(proc_root.join("self")).unwrap();
        std::fs::write(proc_root.join("meminfo"), format!("MemTotal:       16000000 kB\nMemFree:         1000 kB\nMemAvailable:   {meminfo_kib} kB\n")).unwrap();
        let cgroup_root = t.path().join("cgroup");
        if let Some((path, levels)) = cgroup {
            std::fs::write(proc_root.join("self/cgroup"), format!("0::{path}\n")).unwrap();
            for (rel, max, current) in levels {
                let d = cgroup_root.join(rel);
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join("memory.max"), format!("{max}\n")).unwrap();
                std::fs::write(d.join("memory.current"), format!("{current}\n")).unwrap();
            }
        }
        (t, MemoryBudget { reserve: 0, kv_tokens: None, prefix_cache: 0, kv_cache: None, proc_root, cgroup_root })
    }

    #[test]
    fn the_tightest_limit_wins() {
        let (_t, b) = fixture(8 << 20, None);
        assert_eq!(available(&b), Some(Available { bytes: 8 << 30, limited_by: "MemAvailable".into() }));
        // The service's own cgroup has "max" (no limit); its slice is capped at 2 GiB.
        let (_t, b) = fixture(8 << 20, Some(("/system.slice/edgeflow.service", &[("system.slice/edgeflow.service", "max", "100"), ("system.slice", "2147483648", "1073741824")])));
        assert_eq!(available(&b), Some(Available { bytes: 1 << 30, limited_by: "cgroup /system.slice memory.max".into() }));
        let (_t, mut b) = fixture(8 << 20, None);
        b.proc_root = PathBuf::from("/nonexistent");
        assert_eq!(available(&b), None);
        assert_eq!(cgroup_v2_path("12:cpu:/x\n0::/a/b\n"), Some("/a/b"));
        assert_eq!(cgroup_v2_path("12:cpu:/x\n"), None);
    }

    #[test]
    fn a_model_that_does_not_fit_is_refused_with_its_figures() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/phi3-tiny-gqa");
        let config = GenaiConfig::load(&dir).unwrap();
        let weights = weight_bytes(&dir).unwrap();
        assert!(weights > 0);
        let (_t, mut b) = fixture(1 << 20, None);
        let n = need(&dir, &config, &b).unwrap();
        let d = &config.model.decoder;
        assert_eq!(n.kv_cache, 2 * (d.num_hidden_layers * d.num_key_value_heads * d.head_size * config.model.context_length) as u64 * 4);
        assert!(admit(&dir, &config, &b).is_ok(), "{n:?} fits in 1 GiB");
        b.reserve = 2 << 30;
        let e = admit(&dir, &config, &b).unwrap_err();
        assert!(e.contains("not enough memory") && e.contains("reserve 2048 MiB") && e.contains("1024 MiB is available (limited by MemAvailable)"), "{e}");
        b.kv_tokens = Some(16);
        assert_eq!(need(&dir, &config, &b).unwrap().kv_cache, 2 * (d.num_hidden_layers * d.num_key_value_heads * d.head_size * 16) as u64 * 4);
    }
}
