//! The ONNX decoder graph and its KV cache.
//!
//! The graph's inputs and outputs are checked against `genai_config.json` at load time, so a
//! mismatched folder fails with the field at fault rather than in the middle of a request.
//!
//! Two cache strategies, chosen by `search.past_present_share_buffer` as genai does:
//! - **shared** (GroupQueryAttention): one buffer per layer sized for the whole request, bound
//!   as both `past_key_values.N.*` and `present.N.*`; the kernel appends in place, so a
//!   decode step copies nothing. Buffers are kept and reused by later requests that fit.
//! - **growing**: each step's `present.*` outputs become the next step's `past_*` inputs
//!   (moved, not copied).
//!
//! With the shared buffers, a request that starts with tokens an earlier one ran reuses their
//! keys and values (see [`super::prefix`]); the growing strategy always starts empty.

use std::path::{Path, PathBuf};

use ort::memory::Allocator;
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::config::{layer_name, GenaiConfig};
use super::prefix::{PrefixStore, Reuse};
use super::EngineError;

struct Names {
    input_ids: String,
    attention_mask: Option<String>,
    position_ids: Option<String>,
    past: Vec<(String, String)>,
    present: Vec<(String, String)>,
    logits: String,
}

pub(crate) struct Decoder {
    session: Session,
    path: PathBuf,
    names: Names,
    kv_heads: usize,
    head_size: usize,
    vocab: usize,
    share_buffer: bool,
    shared: Option<SharedCache>,
    context: usize,
    /// Whether requests reuse the keys and values of the prefix they share with earlier ones.
    reuse: bool,
    prefix: PrefixStore,
}

/// Shared past/present buffers, `[1, kv_heads, capacity, head_size]` per layer.
struct SharedCache {
    capacity: usize,
    binding: ort::session::IoBinding,
    // Held so the bound buffers outlive the binding's use; bound by reference.
    /// Bound by reference; read and written between runs only (snapshots). Layer 0 key,
    /// layer 0 value, layer 1 key, ...
    buffers: Vec<Tensor<f32>>,
    decode_logits: Option<Tensor<f32>>,
    /// The tokens whose keys and values the buffers hold, at positions `0..held.len()`.
    held: Vec<u32>,
}

/// Per-request cache state.
pub(crate) enum Cache {
    Shared { len: usize },
    Growing { len: usize, past: Vec<(DynValue, DynValue)> },
}

impl Cache {
    pub(crate) fn len(&self) -> usize {
        match self {
            Cache::Shared { len } | Cache::Growing { len, .. } => *len,
        }
    }
}

fn dims(t: &ValueType) -> Option<Vec<i64>> {
    t.tensor_shape().map(|s| s.iter().copied().collect())
}

impl Decoder {
    /// Loads the decoder graph of `dir`. `prefix_cache`: `None` turns prefix reuse off; `Some(bytes)`
    /// reuses the live buffers and keeps up to `bytes` of snapshots.
    pub(crate) fn load(dir: &Path, config: &GenaiConfig, env: &ort::environment::Environment, threads: usize, prefix_cache: Option<u64>) -> Result<Self, EngineError> {
        let path = config.decoder_path(dir);
        if !path.is_file() {
            return Err(EngineError::MissingFile { path });
        }
        let graph_err = |e: ort::Error| EngineError::Graph { path: path.clone(), message: e.to_string() };
        let session = Session::builder(env)
            .map_err(graph_err)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| graph_err(e.into()))?
            .with_intra_threads(threads)
            .map_err(|e| graph_err(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| graph_err(e.into()))?
            .commit_from_file(&path)
            .map_err(graph_err)?;

        let d = &config.model.decoder;
        let names = Names {
            input_ids: d.inputs.input_ids.clone(),
            attention_mask: d.inputs.attention_mask.clone(),
            position_ids: d.inputs.position_ids.clone(),
            past: (0..d.num_hidden_layers).map(|l| (layer_name(&d.inputs.past_key_names, l), layer_name(&d.inputs.past_value_names, l))).collect(),
            present: (0..d.num_hidden_layers).map(|l| (layer_name(&d.outputs.present_key_names, l), layer_name(&d.outputs.present_value_names, l))).collect(),
            logits: d.outputs.logits.clone(),
        };
        let mut decoder = Decoder {
            session,
            path,
            names,
            kv_heads: d.num_key_value_heads,
            head_size: d.head_size,
            vocab: config.model.vocab_size,
            share_buffer: config.search.past_present_share_buffer,
            shared: None,
            context: config.model.context_length,
            reuse: prefix_cache.is_some(),
            prefix: PrefixStore::new(prefix_cache.unwrap_or(0), 2 * (d.num_hidden_layers * d.num_key_value_heads * d.head_size) as u64 * 4),
        };
        decoder.check_io()?;
        Ok(decoder)
    }

    pub(crate) fn vocab(&self) -> usize {
        self.vocab
    }

    /// Every name genai_config.json gives must exist in the graph with the right type, and
    /// every graph input must be one the engine knows how to feed.
    fn check_io(&mut self) -> Result<(), EngineError> {
        let mismatch = |field: &str, message: String| EngineError::GraphMismatch { path: self.path.clone(), field: field.into(), message };
        let inputs: Vec<(String, ValueType)> = self.session.inputs().iter().map(|o| (o.name().to_string(), o.dtype().clone())).collect();
        let outputs: Vec<(String, ValueType)> = self.session.outputs().iter().map(|o| (o.name().to_string(), o.dtype().clone())).collect();
        let find = |list: &[(String, ValueType)], name: &str| list.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone());

        let mut expected_inputs: Vec<(&str, String, TensorElementType)> = vec![("model.decoder.inputs.input_ids", self.names.input_ids.clone(), TensorElementType::Int64)];
        if let Some(n) = &self.names.attention_mask {
            expected_inputs.push(("model.decoder.inputs.attention_mask", n.clone(), TensorElementType::Int64));
        }
        if let Some(n) = &self.names.position_ids {
            expected_inputs.push(("model.decoder.inputs.position_ids", n.clone(), TensorElementType::Int64));
        }
        for (k, v) in &self.names.past {
            expected_inputs.push(("model.decoder.inputs.past_key_names", k.clone(), TensorElementType::Float32));
            expected_inputs.push(("model.decoder.inputs.past_value_names", v.clone(), TensorElementType::Float32));
        }
        for (field, name, ty) in &expected_inputs {
            let Some(t) = find(&inputs, name) else {
                return Err(mismatch(field, format!("the graph has no input `{name}` (its inputs: {})", list_names(&inputs))));
            };
            check_type(&t, *ty).map_err(|m| mismatch(field, format!("input `{name}`: {m}")))?;
        }
        for (name, _) in &inputs {
            if !expected_inputs.iter().any(|(_, n, _)| n == name) {
                let field = if name.contains("position") { "model.decoder.inputs.position_ids" } else { "model.decoder.inputs" };
                return Err(mismatch(field, format!("the graph needs input `{name}`, which genai_config.json does not describe")));
            }
        }

        let mut expected_outputs = vec![("model.decoder.outputs.logits", self.names.logits.clone())];
        for (k, v) in &self.names.present {
            expected_outputs.push(("model.decoder.outputs.present_key_names", k.clone()));
            expected_outputs.push(("model.decoder.outputs.present_value_names", v.clone()));
        }
        for (field, name) in &expected_outputs {
            let Some(t) = find(&outputs, name) else {
                return Err(mismatch(field, format!("the graph has no output `{name}` (its outputs: {})", list_names(&outputs))));
            };
            check_type(&t, TensorElementType::Float32).map_err(|m| mismatch(field, format!("output `{name}`: {m}")))?;
        }

        // Fixed dimensions must agree with the config.
        if let Some(d) = find(&inputs, &self.names.past[0].0).as_ref().and_then(dims) {
            if d.len() != 4 {
                return Err(mismatch("model.decoder.inputs.past_key_names", format!("expected a rank-4 cache, the graph has rank {}", d.len())));
            }
            if d[1] > 0 && d[1] as usize != self.kv_heads {
                return Err(mismatch("model.decoder.num_key_value_heads", format!("config says {}, the graph's cache has {}", self.kv_heads, d[1])));
            }
            if d[3] > 0 && d[3] as usize != self.head_size {
                return Err(mismatch("model.decoder.head_size", format!("config says {}, the graph's cache has {}", self.head_size, d[3])));
            }
        }
        if let Some(d) = find(&outputs, &self.names.logits).as_ref().and_then(dims) {
            if let Some(&last) = d.last() {
                if last > 0 && last as usize != self.vocab {
                    return Err(mismatch("model.vocab_size", format!("config says {}, the graph's logits have {last}", self.vocab)));
                }
            }
        }
        Ok(())
    }

    /// Bytes of prefix snapshots held now.
    pub(crate) fn prefix_bytes(&self) -> u64 {
        self.prefix.bytes()
    }

    /// Forgets what the live buffers hold (after a failed request their contents are suspect).
    pub(crate) fn forget(&mut self) {
        if let Some(s) = self.shared.as_mut() {
            s.held.clear();
        }
    }

    /// Starts a request for `prompt` that will hold at most `capacity` tokens, and returns how
    /// many of the prompt's first tokens are already in the cache (feed the rest).
    pub(crate) fn start(&mut self, capacity: usize, prompt: &[u32]) -> Result<(Cache, usize), EngineError> {
        if !self.share_buffer {
            let layers = self.names.past.len();
            let mut past = Vec::with_capacity(layers);
            for _ in 0..layers {
                let shape = [1usize, self.kv_heads, 0, self.head_size];
                let k = Tensor::<f32>::from_array((shape, Vec::<f32>::new())).map_err(EngineError::inference("allocating the KV cache"))?;
                let v = Tensor::<f32>::from_array((shape, Vec::<f32>::new())).map_err(EngineError::inference("allocating the KV cache"))?;
                past.push((k.into_dyn(), v.into_dyn()));
            }
            return Ok((Cache::Growing { len: 0, past }, 0));
        }
        if self.shared.as_ref().is_none_or(|s| s.capacity < capacity) {
            // What the old buffers hold goes to the snapshots (the new ones start empty).
            if self.reuse {
                self.save_live(0)?;
            }
            // Grow by doubling (up to the context), so a prefix is not lost to every slightly
            // longer request; pages never written are never resident.
            let grown = self.shared.as_ref().map_or(capacity, |s| s.capacity.saturating_mul(2).min(self.context).max(capacity));
            // Drop the old buffers before allocating new ones: peak memory matters on a device.
            self.shared = None;
            self.shared = Some(self.allocate_shared(grown)?);
        }
        let plan = match (&self.shared, self.reuse) {
            (Some(shared), true) => self.prefix.plan(&shared.held, prompt),
            _ => Reuse::None,
        };
        let keep = match plan {
            Reuse::None => 0,
            Reuse::Live(n) => n,
            Reuse::Snapshot { live, .. } => live,
        };
        if self.reuse {
            // The request overwrites the live tokens from `keep` on: keep them first.
            self.save_live(keep)?;
        }
        if let Reuse::Snapshot { index, n, live } = plan {
            self.restore(index, live, n)?;
        }
        let reused = plan.tokens();
        if let Some(shared) = self.shared.as_mut() {
            shared.held.truncate(reused);
        }
        Ok((Cache::Shared { len: reused }, reused))
    }

    /// Copies the live tokens into a snapshot (as many as the store may hold) when a request is
    /// about to overwrite them from position `keep` on and they are worth keeping.
    fn save_live(&mut self, keep: usize) -> Result<(), EngineError> {
        let Some(shared) = self.shared.as_mut() else { return Ok(()) };
        // A request that keeps most of the live tokens (the same prompt sampled again, an answer
        // regenerated) leaves little worth a copy; one that keeps less than half switches context.
        if shared.held.len() <= keep || keep * 2 >= shared.held.len() {
            return Ok(());
        }
        let n = shared.held.len().min(self.prefix.max_tokens());
        if !self.prefix.wants(&shared.held[..n]) {
            return Ok(());
        }
        let (cap, hs) = (shared.capacity, self.head_size);
        let mut data = Vec::with_capacity(shared.buffers.len());
        for buffer in &mut shared.buffers {
            let (_, all) = buffer.try_extract_tensor_mut::<f32>().map_err(EngineError::inference("copying a prefix out of the KV cache"))?;
            let mut out = Vec::with_capacity(self.kv_heads * n * hs);
            for h in 0..self.kv_heads {
                out.extend_from_slice(&all[h * cap * hs..h * cap * hs + n * hs]);
            }
            data.push(out);
        }
        self.prefix.insert(shared.held[..n].to_vec(), data);
        Ok(())
    }

    /// Copies positions `from..n` of snapshot `index` into the live buffers (the first `from`
    /// are already there), which then hold its first `n` tokens.
    fn restore(&mut self, index: usize, from: usize, n: usize) -> Result<(), EngineError> {
        let during = "copying a prefix into the KV cache";
        let shared = self.shared.as_mut().ok_or(EngineError::Inference { during, message: "KV cache not allocated".into() })?;
        let entry = self.prefix.touch(index).ok_or(EngineError::Inference { during, message: format!("no snapshot {index}") })?;
        let (cap, hs, len) = (shared.capacity, self.head_size, entry.tokens.len());
        if n > len || n > cap || entry.data.len() != shared.buffers.len() {
            return Err(EngineError::Inference { during, message: format!("a snapshot of {len} tokens cannot give {n} to a cache of {cap}") });
        }
        for (buffer, saved) in shared.buffers.iter_mut().zip(&entry.data) {
            let (_, all) = buffer.try_extract_tensor_mut::<f32>().map_err(EngineError::inference(during))?;
            for h in 0..self.kv_heads {
                all[h * cap * hs + from * hs..h * cap * hs + n * hs].copy_from_slice(&saved[h * len * hs + from * hs..h * len * hs + n * hs]);
            }
        }
        shared.held.clear();
        shared.held.extend_from_slice(&entry.tokens[..n]);
        Ok(())
    }

    fn allocate_shared(&mut self, capacity: usize) -> Result<SharedCache, EngineError> {
        let during = "allocating the KV cache";
        let mut binding = self.session.create_binding().map_err(EngineError::inference(during))?;
        let mut buffers = Vec::with_capacity(self.names.past.len() * 2);
        // ORT's plain CPU allocator, not the session arena: the cache is one long-lived block
        // per layer, and the arena's power-of-two growth would round it up (as genai does).
        let cpu = Allocator::default();
        let shape = [1usize, self.kv_heads, capacity, self.head_size];
        for ((pk, pv), (ok, ov)) in self.names.past.iter().zip(&self.names.present) {
            for (input, output) in [(pk, ok), (pv, ov)] {
                // DEVNOTE: ORT's allocator takes large blocks straight from mmap, so the pages are
                // zero and only become resident as the sequence grows; no explicit clearing.
                let mut t = Tensor::<f32>::new(&cpu, shape).map_err(EngineError::inference(during))?;
                binding.bind_input(input.as_str(), &t).map_err(EngineError::inference(during))?;
                binding.bind_output(output.as_str(), &mut t).map_err(EngineError::inference(during))?;
                buffers.push(t);
            }
        }
        Ok(SharedCache { capacity, binding, buffers, decode_logits: None, held: Vec::new() })
    }

    /// Runs `tokens` through the graph after the cached prefix and returns the logits of the
    /// last position.
    pub(crate) fn forward(&mut self, cache: &mut Cache, tokens: &[u32], logits_out: &mut Vec<f32>) -> Result<(), EngineError> {
        let past_len = cache.len();
        let total = past_len + tokens.len();
        let n = tokens.len();
        let during = "running the decoder";
        let ids = Tensor::<i64>::from_array(([1usize, n], tokens.iter().map(|&t| i64::from(t)).collect::<Vec<_>>())).map_err(EngineError::inference(during))?;
        let mask = match &self.names.attention_mask {
            Some(_) => Some(Tensor::<i64>::from_array(([1usize, total], vec![1i64; total])).map_err(EngineError::inference(during))?),
            None => None,
        };
        let positions = match &self.names.position_ids {
            Some(_) => Some(Tensor::<i64>::from_array(([1usize, n], (past_len as i64..total as i64).collect::<Vec<_>>())).map_err(EngineError::inference(during))?),
            None => None,
        };

        match cache {
            Cache::Shared { len } => {
                let shared = self.shared.as_mut().ok_or(EngineError::Inference { during, message: "KV cache not allocated".into() })?;
                if total > shared.capacity {
                    return Err(EngineError::Inference { during, message: format!("{total} tokens exceed the KV cache of {}", shared.capacity) });
                }
                let b = &mut shared.binding;
                b.bind_input(self.names.input_ids.as_str(), &ids).map_err(EngineError::inference(during))?;
                if let (Some(name), Some(m)) = (&self.names.attention_mask, &mask) {
                    b.bind_input(name.as_str(), m).map_err(EngineError::inference(during))?;
                }
                if let (Some(name), Some(p)) = (&self.names.position_ids, &positions) {
                    b.bind_input(name.as_str(), p).map_err(EngineError::inference(during))?;
                }
                // One reusable [1, 1, vocab] logits buffer for decode steps; prefill gets its own.
                let cpu = Allocator::default();
                if n == 1 {
                    if shared.decode_logits.is_none() {
                        let mut t = Tensor::<f32>::new(&cpu, [1usize, 1, self.vocab]).map_err(EngineError::inference(during))?;
                        b.bind_output(self.names.logits.as_str(), &mut t).map_err(EngineError::inference(during))?;
                        shared.decode_logits = Some(t);
                    }
                } else {
                    let mut t = Tensor::<f32>::new(&cpu, [1usize, n, self.vocab]).map_err(EngineError::inference(during))?;
                    b.bind_output(self.names.logits.as_str(), &mut t).map_err(EngineError::inference(during))?;
                    // The next decode step must rebind its own buffer.
                    shared.decode_logits = None;
                }
                let outputs = self.session.run_binding(&shared.binding).map_err(EngineError::inference(during))?;
                let logits = outputs.get(self.names.logits.as_str()).ok_or(EngineError::Inference { during, message: "no logits output".into() })?;
                copy_last_row(logits, self.vocab, logits_out)?;
                *len = total;
                shared.held.truncate(past_len);
                shared.held.extend_from_slice(tokens);
            }
            Cache::Growing { len, past } => {
                let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(3 + past.len() * 2);
                inputs.push((self.names.input_ids.clone(), ids.into()));
                if let (Some(name), Some(m)) = (&self.names.attention_mask, mask) {
                    inputs.push((name.clone(), m.into()));
                }
                if let (Some(name), Some(p)) = (&self.names.position_ids, positions) {
                    inputs.push((name.clone(), p.into()));
                }
                for ((k, v), (kn, vn)) in std::mem::take(past).into_iter().zip(&self.names.past) {
                    inputs.push((kn.clone(), k.into()));
                    inputs.push((vn.clone(), v.into()));
                }
                let mut outputs = self.session.run(inputs).map_err(EngineError::inference(during))?;
                let logits = outputs.get(self.names.logits.as_str()).ok_or(EngineError::Inference { during, message: "no logits output".into() })?;
                copy_last_row(logits, self.vocab, logits_out)?;
                let mut next = Vec::with_capacity(self.names.present.len());
                for (kn, vn) in &self.names.present {
                    let k = outputs.remove(kn.as_str()).ok_or(EngineError::Inference { during, message: format!("no output {kn}") })?;
                    let v = outputs.remove(vn.as_str()).ok_or(EngineError::Inference { during, message: format!("no output {vn}") })?;
                    next.push((k, v));
                }
                *past = next;
                *len = total;
            }
        }
        Ok(())
    }
}

fn copy_last_row(logits: &DynValue, vocab: usize, out: &mut Vec<f32>) -> Result<(), EngineError> {
    let during = "reading logits";
    let (shape, data) = logits.try_extract_tensor::<f32>().map_err(EngineError::inference(during))?;
    let last = shape.last().copied().unwrap_or(0) as usize;
    if last != vocab || data.len() < vocab {
        return Err(EngineError::Inference { during, message: format!("logits have shape {shape:?}, expected a last dimension of {vocab}") });
    }
    out.clear();
    out.extend_from_slice(&data[data.len() - vocab..]);
    Ok(())
}

fn check_type(t: &ValueType, want: TensorElementType) -> Result<(), String> {
    match t.tensor_type() {
        Some(ty) if ty == want => Ok(()),
        Some(ty) => Err(format!("has element type {ty:?}, the engine needs {want:?}")),
        None => Err("is not a tensor".into()),
    }
}

fn list_names(list: &[(String, ValueType)]) -> String {
    let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).take(8).collect();
    let more = list.len().saturating_sub(names.len());
    if more > 0 {
        format!("{}, and {more} more", names.join(", "))
    } else {
        names.join(", ")
    }
}
