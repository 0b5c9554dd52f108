//! The ONNX decoder graph and its KV cache.
//!
//! The graph's inputs and outputs are checked against `genai_config.json` at load time, so a
//! mismatched folder fails with the field at fault rather than in the middle of a request.
//!
//! Two cache strategies, chosen by `search.past_present_share_buffer` as genai does:
//! - **shared** (GroupQueryAttention): one block per buffer (layer 0 key, layer 0 value, ...)
//!   of `[slots, kv_heads, capacity, head_size]`; each running sequence owns one slot (row),
//!   and a view of its row is bound as both `past_key_values.N.*` and `present.N.*`, so the
//!   kernel appends in place and a decode step copies nothing. Several sequences decode in one
//!   pass over a view of consecutive rows (see [`Decoder::step`]); a newcomer's prompt runs
//!   alone over a view of its own row (GroupQueryAttention refuses a prompt over a past at
//!   batch > 1). The block is kept for later requests, growing by doubling up to the context.
//! - **growing**: each step's `present.*` outputs become the next step's `past_*` inputs
//!   (moved, not copied); one sequence at a time.
//!
//! With the shared block, a request that starts with tokens an earlier one ran reuses their
//! keys and values (see [`super::prefix`]); the growing strategy always starts empty.

use std::path::{Path, PathBuf};

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{IoBinding, Session};
use ort::value::{DynValue, Shape, Tensor, TensorElementType, TensorRefMut, ValueType};
use ort::AsPointer;

use super::config::{layer_name, GenaiConfig};
use super::graph::{self, MAX_GRAPH_BYTES};
use super::model::LoadOptions;
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
    /// Sequences the shared block holds at once.
    slots: usize,
    block: Option<Block>,
    context: usize,
    /// Whether requests reuse the keys and values of the prefix they share with earlier ones.
    reuse: bool,
    prefix: PrefixStore,
    /// Orders slot use, for choosing which idle slot gives its memory back first.
    clock: u64,
    /// The graph computes the logits of the last position only (see [`super::graph`]).
    last_position_only: bool,
}

/// The shared past/present block (see the module documentation).
struct Block {
    capacity: usize,
    binding: IoBinding,
    /// The rows the cache views bound now cover.
    bound: Option<Rows>,
    /// Views of the rows in `bound`, bound as the past inputs; declared before `buffers` so
    /// they are dropped first.
    views: Vec<TensorRefMut<'static, f32>>,
    /// The `[rows, 1, vocab]` logits buffer bound for decode steps over `bound`; `None` after a
    /// prompt ran with its own.
    decode_logits: Option<Tensor<f32>>,
    /// Layer 0 key, layer 0 value, layer 1 key, ...: `[slots, kv_heads, capacity, head_size]`.
    /// Read and written between runs only (snapshots, growth).
    buffers: Vec<Tensor<f32>>,
    slots: Vec<Slot>,
}

/// Consecutive rows of the block, as one view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rows {
    first: usize,
    count: usize,
}

#[derive(Debug, Default)]
struct Slot {
    /// The tokens whose keys and values the row holds, at positions `0..held.len()`.
    held: Vec<u32>,
    /// A running sequence owns it.
    busy: bool,
    last_used: u64,
}

/// Per-request cache state.
pub(crate) enum Cache {
    Shared { slot: usize, len: usize },
    Growing { len: usize, past: Vec<(DynValue, DynValue)> },
}

impl Cache {
    pub(crate) fn len(&self) -> usize {
        match self {
            Cache::Shared { len, .. } | Cache::Growing { len, .. } => *len,
        }
    }
}

fn dims(t: &ValueType) -> Option<Vec<i64>> {
    t.tensor_shape().map(|s| s.iter().copied().collect())
}

impl Decoder {
    /// Loads the decoder graph of `dir`: `options.prefix_cache` `None` turns prefix reuse off,
    /// `Some(bytes)` reuses the live buffers and keeps up to `bytes` of snapshots;
    /// `options.max_sequences` is the most sequences decoded together (1 for graphs that cannot
    /// batch). Unless `options.graph_as_shipped`, the graph computes the logits of the last
    /// position only where it allows (see [`super::graph`]).
    pub(crate) fn load(dir: &Path, config: &GenaiConfig, env: &ort::environment::Environment, threads: usize, options: &LoadOptions) -> Result<Self, EngineError> {
        let path = config.decoder_path(dir);
        if !path.is_file() {
            return Err(EngineError::MissingFile { path });
        }
        let graph_err = |e: ort::Error| EngineError::Graph { path: path.clone(), message: e.to_string() };
        let builder = || -> Result<SessionBuilder, EngineError> {
            Session::builder(env)
                .map_err(graph_err)?
                .with_optimization_level(GraphOptimizationLevel::All)
                .map_err(|e| graph_err(e.into()))?
                .with_intra_threads(threads)
                .map_err(|e| graph_err(e.into()))?
                .with_inter_threads(1)
                .map_err(|e| graph_err(e.into()))
        };
        let rewritten = if options.graph_as_shipped { None } else { last_position_graph(&path, &config.model.decoder.outputs.logits) };
        let (session, last_position_only) = match rewritten {
            Some(bytes) => {
                // DEVNOTE: loaded from memory, ONNX Runtime finds the external data (the
                // weights, `*.onnx.data`) through this folder rather than the graph's path.
                let folder = path.parent().unwrap_or(dir).to_string_lossy().into_owned();
                let loaded = builder()?
                    .with_config_entry("session.model_external_initializers_file_folder_path", folder)
                    .map_err(|e| graph_err(e.into()))
                    .and_then(|mut b| b.commit_from_memory(&bytes).map_err(graph_err));
                match loaded {
                    Ok(session) => (session, true),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "the graph computing last-position logits did not load; loading it as shipped");
                        (builder()?.commit_from_file(&path).map_err(graph_err)?, false)
                    }
                }
            }
            None => (builder()?.commit_from_file(&path).map_err(graph_err)?, false),
        };

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
            // Batched steps feed each row's length through the attention mask.
            slots: if config.search.past_present_share_buffer && d.inputs.attention_mask.is_some() { options.max_sequences.max(1) } else { 1 },
            block: None,
            context: config.model.context_length,
            reuse: options.prefix_cache.is_some(),
            prefix: PrefixStore::new(options.prefix_cache.unwrap_or(0), config.kv_bytes_per_token()),
            last_position_only,
            clock: 0,
        };
        decoder.check_io()?;
        Ok(decoder)
    }

    pub(crate) fn vocab(&self) -> usize {
        self.vocab
    }

    pub(crate) fn last_position_only(&self) -> bool {
        self.last_position_only
    }

    /// Sequences that can run at once.
    pub(crate) fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes of keys and values one token takes.
    pub(crate) fn bytes_per_token(&self) -> u64 {
        self.prefix.bytes_per_token()
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

    /// Forgets what every row holds (after a failed step its contents are suspect).
    pub(crate) fn forget(&mut self) {
        let (kv, hs) = (self.kv_heads, self.head_size);
        if let Some(block) = self.block.as_mut() {
            for slot in 0..block.slots.len() {
                block.truncate(slot, 0, kv, hs);
            }
        }
    }

    /// Starts a sequence for `prompt` that will hold at most `capacity` tokens, and returns its
    /// cache and how many of the prompt's first tokens are already in it (feed the rest).
    /// With the shared block the sequence takes the free row that gives it the most reuse.
    ///
    /// # Errors
    /// Every row is taken (the caller admits at most [`Decoder::slots`] sequences), or the
    /// block cannot grow.
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
        self.reserve(capacity, prompt)?;
        let during = "starting a sequence";
        let block = self.block.as_ref().ok_or(EngineError::Inference { during, message: "KV cache not allocated".into() })?;
        let (slot, plan) = block
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.busy)
            .map(|(i, s)| (i, if self.reuse { self.prefix.plan(&s.held, prompt) } else { Reuse::None }))
            .max_by_key(|&(i, plan)| (plan.tokens(), std::cmp::Reverse(i)))
            .ok_or(EngineError::Inference { during, message: format!("all {} KV cache rows are in use", block.slots.len()) })?;
        let keep = match plan {
            Reuse::None => 0,
            Reuse::Live(n) => n,
            Reuse::Snapshot { live, .. } => live,
        };
        let plan = if self.reuse {
            // The sequence overwrites the row's tokens from `keep` on: keep them first. Saving
            // may evict snapshots and move the others, so the plan is made again (the row's
            // tokens are unchanged: its live part is the same).
            self.save_live(slot, keep)?;
            let held = self.block.as_ref().map(|b| b.slots[slot].held.as_slice()).unwrap_or_default();
            self.prefix.plan(held, prompt)
        } else {
            plan
        };
        if let Reuse::Snapshot { index, n, live } = plan {
            self.restore(slot, index, live, n)?;
        }
        let reused = plan.tokens();
        self.clock += 1;
        let clock = self.clock;
        let (kv, hs) = (self.kv_heads, self.head_size);
        if let Some(block) = self.block.as_mut() {
            // Pages past what the row keeps go back to the system: a row's memory is what it
            // holds, which the KV budget counts.
            block.truncate(slot, reused, kv, hs);
            let row = &mut block.slots[slot];
            row.busy = true;
            row.last_used = clock;
        }
        Ok((Cache::Shared { slot, len: reused }, reused))
    }

    /// Ends a sequence: its row is free for the next one. `keep`: what the row holds stays for
    /// prefix reuse (not after a failure).
    pub(crate) fn release(&mut self, cache: &Cache, keep: bool) {
        let (kv, hs) = (self.kv_heads, self.head_size);
        if let (Cache::Shared { slot, .. }, Some(block)) = (cache, self.block.as_mut()) {
            self.clock += 1;
            if let Some(row) = block.slots.get_mut(*slot) {
                row.busy = false;
                row.last_used = self.clock;
                let kept = if keep { row.held.len() } else { 0 };
                // Also the position a step past its end wrote (a throwaway key).
                block.truncate(*slot, kept, kv, hs);
            }
        }
    }

    /// Tokens held by rows no sequence owns (kept for prefix reuse).
    pub(crate) fn idle_tokens(&self) -> usize {
        self.block.as_ref().map_or(0, |b| b.slots.iter().filter(|s| !s.busy).map(|s| s.held.len()).sum())
    }

    /// Gives back the memory of idle rows, least recently used first, until they hold at most
    /// `limit` tokens; what a row held goes to the prefix snapshots first (when they take it).
    pub(crate) fn trim_idle(&mut self, limit: usize) -> Result<(), EngineError> {
        while self.idle_tokens() > limit {
            let Some(slot) =
                self.block.as_ref().and_then(|b| b.slots.iter().enumerate().filter(|(_, s)| !s.busy && !s.held.is_empty()).min_by_key(|(_, s)| s.last_used).map(|(i, _)| i))
            else {
                break;
            };
            if self.reuse {
                self.save_live(slot, 0)?;
            }
            let (kv, hs) = (self.kv_heads, self.head_size);
            if let Some(block) = self.block.as_mut() {
                block.truncate(slot, 0, kv, hs);
            }
        }
        Ok(())
    }

    /// Makes the block hold at least `capacity` tokens per row, for a sequence about to start
    /// with `prompt`. It grows by doubling (up to the context), so a prefix is not lost to every
    /// slightly longer request; the rows' tokens are copied into the new block (running
    /// sequences go on), and pages never written are never resident.
    fn reserve(&mut self, capacity: usize, prompt: &[u32]) -> Result<(), EngineError> {
        let have = self.block.as_ref().map(|b| b.capacity);
        if have.is_some_and(|c| c >= capacity) {
            return Ok(());
        }
        let grown = have.map_or(capacity, |c| c.saturating_mul(2).min(self.context).max(capacity));
        // Idle rows are not copied: what they hold goes to the snapshots (as much as they take)
        // and the rows are emptied, so the copy below holds running sequences only and a lone
        // request grows as it always did (old buffers gone before the new ones fill). Except the
        // idle row that `prompt` continues (the next turn of a chat whose prompt outgrew the
        // block): its shared tokens are copied like a running sequence's, since a snapshot
        // holds only what `engine.prefix_cache` takes, and a long chat would lose the rest.
        let (kv, hs) = (self.kv_heads, self.head_size);
        let carried = self.block.as_ref().filter(|_| self.reuse).and_then(|b| {
            (0..b.slots.len())
                .filter(|&i| !b.slots[i].busy)
                .map(|i| (i, super::prefix::common_prefix(&b.slots[i].held, prompt).min(prompt.len().saturating_sub(1))))
                .filter(|&(_, n)| n >= super::prefix::MIN_SNAPSHOT_TOKENS)
                .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))
        });
        if let Some((slot, keep)) = carried {
            // What the row holds past the shared part may still be worth a snapshot.
            self.save_live(slot, keep)?;
            if let Some(block) = self.block.as_mut() {
                block.truncate(slot, keep, kv, hs);
            }
        }
        let idle: Vec<usize> = self
            .block
            .as_ref()
            .map(|b| (0..b.slots.len()).filter(|&i| !b.slots[i].busy && !b.slots[i].held.is_empty() && carried.is_none_or(|(c, _)| c != i)).collect())
            .unwrap_or_default();
        for slot in idle {
            if self.reuse {
                self.save_live(slot, 0)?;
            }
            if let Some(block) = self.block.as_mut() {
                block.truncate(slot, 0, kv, hs);
            }
        }
        if self.block.as_ref().is_some_and(|b| b.slots.iter().all(|s| s.held.is_empty() && !s.busy)) {
            self.block = None;
        }
        let mut new = self.allocate_block(grown)?;
        if let Some(mut old) = self.block.take() {
            let during = "growing the KV cache";
            for (from, to) in old.buffers.iter_mut().zip(new.buffers.iter_mut()) {
                let (_, from) = from.try_extract_tensor_mut::<f32>().map_err(EngineError::inference(during))?;
                let (_, to) = to.try_extract_tensor_mut::<f32>().map_err(EngineError::inference(during))?;
                for (s, slot) in old.slots.iter().enumerate() {
                    let n = slot.held.len();
                    for h in 0..kv {
                        let (a, b) = ((s * kv + h) * old.capacity * hs, (s * kv + h) * grown * hs);
                        to[b..b + n * hs].copy_from_slice(&from[a..a + n * hs]);
                    }
                }
            }
            new.slots = std::mem::take(&mut old.slots);
        }
        self.block = Some(new);
        Ok(())
    }

    /// Copies row `slot`'s tokens into a snapshot (as many as the store may hold) when a
    /// sequence is about to overwrite them from position `keep` on and they are worth keeping.
    fn save_live(&mut self, slot: usize, keep: usize) -> Result<(), EngineError> {
        let Some(block) = self.block.as_mut() else { return Ok(()) };
        let held = &block.slots[slot].held;
        // A sequence that keeps most of the row's tokens (the same prompt sampled again, an
        // answer regenerated) leaves little worth a copy; one that keeps less than half
        // switches context.
        if held.len() <= keep || keep * 2 >= held.len() {
            return Ok(());
        }
        let n = held.len().min(self.prefix.max_tokens());
        if !self.prefix.wants(&held[..n]) {
            return Ok(());
        }
        let (cap, kv, hs) = (block.capacity, self.kv_heads, self.head_size);
        let mut data = Vec::with_capacity(block.buffers.len());
        for buffer in &mut block.buffers {
            let (_, all) = buffer.try_extract_tensor_mut::<f32>().map_err(EngineError::inference("copying a prefix out of the KV cache"))?;
            let mut out = Vec::with_capacity(kv * n * hs);
            for h in 0..kv {
                let row = (slot * kv + h) * cap * hs;
                out.extend_from_slice(&all[row..row + n * hs]);
            }
            data.push(out);
        }
        self.prefix.insert(block.slots[slot].held[..n].to_vec(), data);
        Ok(())
    }

    /// Copies positions `from..n` of snapshot `index` into row `slot` (the first `from` are
    /// already there), which then holds its first `n` tokens.
    fn restore(&mut self, slot: usize, index: usize, from: usize, n: usize) -> Result<(), EngineError> {
        let during = "copying a prefix into the KV cache";
        let block = self.block.as_mut().ok_or(EngineError::Inference { during, message: "KV cache not allocated".into() })?;
        let entry = self.prefix.touch(index).ok_or(EngineError::Inference { during, message: format!("no snapshot {index}") })?;
        let (cap, kv, hs, len) = (block.capacity, self.kv_heads, self.head_size, entry.tokens.len());
        if n > len || n > cap || entry.data.len() != block.buffers.len() {
            return Err(EngineError::Inference { during, message: format!("a snapshot of {len} tokens cannot give {n} to a cache of {cap}") });
        }
        for (buffer, saved) in block.buffers.iter_mut().zip(&entry.data) {
            let (_, all) = buffer.try_extract_tensor_mut::<f32>().map_err(EngineError::inference(during))?;
            for h in 0..kv {
                let row = (slot * kv + h) * cap * hs;
                all[row + from * hs..row + n * hs].copy_from_slice(&saved[h * len * hs + from * hs..h * len * hs + n * hs]);
            }
        }
        let held = &mut block.slots[slot].held;
        held.clear();
        held.extend_from_slice(&entry.tokens[..n]);
        Ok(())
    }

    fn allocate_block(&mut self, capacity: usize) -> Result<Block, EngineError> {
        let during = "allocating the KV cache";
        let binding = self.session.create_binding().map_err(EngineError::inference(during))?;
        let mut buffers = Vec::with_capacity(self.names.past.len() * 2);
        // One long-lived block per buffer, not the session arena (whose power-of-two growth
        // would round it up, as genai's does).
        let shape = [self.slots, self.kv_heads, capacity, self.head_size];
        for _ in 0..self.names.past.len() * 2 {
            buffers.push(untouched(shape).map_err(EngineError::inference(during))?);
        }
        let slots = (0..self.slots).map(|_| Slot::default()).collect();
        Ok(Block { capacity, binding, bound: None, views: Vec::new(), decode_logits: None, buffers, slots })
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
            Cache::Shared { slot, len } => {
                let block = self.block.as_mut().ok_or(EngineError::Inference { during, message: "KV cache not allocated".into() })?;
                if total > block.capacity {
                    return Err(EngineError::Inference { during, message: format!("{total} tokens exceed the KV cache of {}", block.capacity) });
                }
                block.bind_rows(&self.names, self.kv_heads, self.head_size, Rows { first: *slot, count: 1 })?;
                block.bind_inputs(&self.names, &ids, mask.as_ref(), positions.as_ref())?;
                block.bind_logits(&self.names, self.vocab, 1, if self.last_position_only { 1 } else { n })?;
                let outputs = self.session.run_binding(&block.binding).map_err(EngineError::inference(during))?;
                let logits = outputs.get(self.names.logits.as_str()).ok_or(EngineError::Inference { during, message: "no logits output".into() })?;
                copy_last_row(logits, self.vocab, logits_out)?;
                *len = total;
                let held = &mut block.slots[*slot].held;
                held.truncate(past_len);
                held.extend_from_slice(tokens);
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

    /// One decode step for several sequences at once: `tokens[i]` is fed to `caches[i]`, and
    /// the logits of each follow one another in `logits_out` (`vocab` each, in that order).
    ///
    /// The pass runs over a view of the consecutive rows from the lowest of the sequences'
    /// rows to the highest. A row in between that no running sequence owns is fed a token at
    /// its held length, where the kernel writes keys and values nobody reads; its held tokens
    /// stay intact. Each row attends only to its own length (the attention mask is padded on
    /// the right), so a sequence's tokens do not depend on who else is in the step. A single
    /// sequence runs as [`Decoder::forward`] does.
    ///
    /// # Errors
    /// A growing cache (the graph cannot batch), a sequence past the block's capacity, and
    /// ONNX Runtime failures.
    pub(crate) fn step(&mut self, caches: &mut [&mut Cache], tokens: &[u32], logits_out: &mut Vec<f32>) -> Result<(), EngineError> {
        let during = "running the decoder on a batch";
        if caches.len() != tokens.len() {
            return Err(EngineError::Inference { during, message: format!("{} sequences but {} tokens", caches.len(), tokens.len()) });
        }
        if let ([cache], [token]) = (&mut *caches, tokens) {
            return self.forward(cache, &[*token], logits_out);
        }
        let mut running = Vec::with_capacity(caches.len());
        for cache in caches.iter() {
            match cache {
                Cache::Shared { slot, len } => running.push((*slot, *len)),
                Cache::Growing { .. } => return Err(EngineError::Inference { during, message: "this graph's cache cannot hold several sequences".into() }),
            }
        }
        let block = self.block.as_mut().ok_or(EngineError::Inference { during, message: "KV cache not allocated".into() })?;
        let cap = block.capacity;
        let first = running.iter().map(|r| r.0).min().unwrap_or(0);
        let count = running.iter().map(|r| r.0).max().unwrap_or(0) + 1 - first;
        let mut row_token = vec![0i64; count];
        let mut row_len: Vec<Option<usize>> = vec![None; count];
        for (&(slot, len), &token) in running.iter().zip(tokens) {
            if len + 1 > cap {
                return Err(EngineError::Inference { during, message: format!("{} tokens exceed the KV cache of {cap}", len + 1) });
            }
            row_token[slot - first] = i64::from(token);
            row_len[slot - first] = Some(len);
        }
        let row_len: Vec<usize> = row_len
            .iter()
            .enumerate()
            .map(|(r, len)| {
                len.unwrap_or_else(|| {
                    // An idle row: its next position takes the throwaway key (keep one free).
                    let held = &mut block.slots[first + r].held;
                    held.truncate(cap - 1);
                    held.len()
                })
            })
            .collect();
        let width = row_len.iter().max().copied().unwrap_or(0) + 1;
        let ids = Tensor::<i64>::from_array(([count, 1usize], row_token)).map_err(EngineError::inference(during))?;
        let mask = match &self.names.attention_mask {
            Some(_) => {
                let mut m = vec![0i64; count * width];
                for (r, &len) in row_len.iter().enumerate() {
                    m[r * width..r * width + len + 1].fill(1);
                }
                Some(Tensor::<i64>::from_array(([count, width], m)).map_err(EngineError::inference(during))?)
            }
            None => return Err(EngineError::Inference { during, message: "the graph has no attention mask to tell the sequences' lengths".into() }),
        };
        let positions = match &self.names.position_ids {
            Some(_) => Some(Tensor::<i64>::from_array(([count, 1usize], row_len.iter().map(|&l| l as i64).collect::<Vec<_>>())).map_err(EngineError::inference(during))?),
            None => None,
        };
        block.bind_rows(&self.names, self.kv_heads, self.head_size, Rows { first, count })?;
        block.bind_inputs(&self.names, &ids, mask.as_ref(), positions.as_ref())?;
        block.bind_logits(&self.names, self.vocab, count, 1)?;
        let outputs = self.session.run_binding(&block.binding).map_err(EngineError::inference(during))?;
        let logits = outputs.get(self.names.logits.as_str()).ok_or(EngineError::Inference { during, message: "no logits output".into() })?;
        let (shape, data) = logits.try_extract_tensor::<f32>().map_err(EngineError::inference("reading logits"))?;
        if data.len() != count * self.vocab {
            return Err(EngineError::Inference { during: "reading logits", message: format!("logits have shape {shape:?}, expected [{count}, 1, {}]", self.vocab) });
        }
        logits_out.clear();
        for &(slot, _) in &running {
            let r = slot - first;
            logits_out.extend_from_slice(&data[r * self.vocab..(r + 1) * self.vocab]);
        }
        for (cache, &token) in caches.iter_mut().zip(tokens) {
            if let Cache::Shared { slot, len } = &mut **cache {
                let held = &mut block.slots[*slot].held;
                held.truncate(*len);
                held.push(token);
                *len += 1;
            }
        }
        Ok(())
    }
}

impl Block {
    /// Binds views of `rows` as the cache inputs and outputs, unless they are bound already.
    fn bind_rows(&mut self, names: &Names, kv_heads: usize, head_size: usize, rows: Rows) -> Result<(), EngineError> {
        if self.bound == Some(rows) {
            return Ok(());
        }
        let during = "binding the KV cache";
        if rows.first + rows.count > self.slots.len() {
            return Err(EngineError::Inference { during, message: format!("rows {}..{} of a block of {}", rows.first, rows.first + rows.count, self.slots.len()) });
        }
        self.bound = None;
        self.decode_logits = None;
        self.views.clear();
        let row = kv_heads * self.capacity * head_size;
        let shape = [rows.count as i64, kv_heads as i64, self.capacity as i64, head_size as i64];
        let cpu = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(EngineError::inference(during))?;
        let buffer_names = names.past.iter().zip(&names.present).flat_map(|((pk, pv), (ok, ov))| [(pk, ok), (pv, ov)]);
        for (buffer, (input, output)) in self.buffers.iter_mut().zip(buffer_names) {
            // SAFETY: the rows lie inside the buffer (checked above against its slot count),
            // and the views are dropped before the buffer (field order, and `views.clear()`
            // before any rebinding), so they never outlive the memory they describe.
            let (past, present) = unsafe {
                let at = buffer.data_ptr_mut().cast::<f32>().add(rows.first * row).cast();
                (
                    TensorRefMut::<'static, f32>::from_raw(cpu.clone(), at, Shape::new(shape)).map_err(EngineError::inference(during))?,
                    TensorRefMut::<'static, f32>::from_raw(cpu.clone(), at, Shape::new(shape)).map_err(EngineError::inference(during))?,
                )
            };
            bind_input_in_place(&mut self.binding, input, &past).map_err(EngineError::inference(during))?;
            self.binding.bind_output(output.as_str(), present).map_err(EngineError::inference(during))?;
            self.views.push(past);
        }
        self.bound = Some(rows);
        Ok(())
    }

    fn bind_inputs(&mut self, names: &Names, ids: &Tensor<i64>, mask: Option<&Tensor<i64>>, positions: Option<&Tensor<i64>>) -> Result<(), EngineError> {
        let during = "binding the decoder's inputs";
        self.binding.bind_input(names.input_ids.as_str(), ids).map_err(EngineError::inference(during))?;
        if let (Some(name), Some(m)) = (&names.attention_mask, mask) {
            self.binding.bind_input(name.as_str(), m).map_err(EngineError::inference(during))?;
        }
        if let (Some(name), Some(p)) = (&names.position_ids, positions) {
            self.binding.bind_input(name.as_str(), p).map_err(EngineError::inference(during))?;
        }
        Ok(())
    }

    /// Binds a `[rows, tokens, vocab]` logits output: one kept buffer for decode steps (a
    /// token per row), a fresh one for a prompt.
    fn bind_logits(&mut self, names: &Names, vocab: usize, rows: usize, tokens: usize) -> Result<(), EngineError> {
        let during = "allocating the logits";
        // Allocated by ORT: `ort` binds only its own tensors as outputs (see [`untouched`]).
        let cpu = Allocator::default();
        if tokens == 1 {
            if self.decode_logits.is_none() {
                let mut t = Tensor::<f32>::new(&cpu, [rows, 1, vocab]).map_err(EngineError::inference(during))?;
                self.binding.bind_output(names.logits.as_str(), &mut t).map_err(EngineError::inference(during))?;
                self.decode_logits = Some(t);
            }
        } else {
            let mut t = Tensor::<f32>::new(&cpu, [rows, tokens, vocab]).map_err(EngineError::inference(during))?;
            self.binding.bind_output(names.logits.as_str(), &mut t).map_err(EngineError::inference(during))?;
            // The next decode step must rebind its own buffer.
            self.decode_logits = None;
        }
        Ok(())
    }

    /// Row `slot` keeps its first `n` tokens; the whole pages of every position after them
    /// go back to the system (they read as zero when touched again).
    fn truncate(&mut self, slot: usize, n: usize, kv_heads: usize, head_size: usize) {
        let Some(row) = self.slots.get_mut(slot) else { return };
        row.held.truncate(n);
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let head_bytes = self.capacity * head_size * 4;
        for buffer in &mut self.buffers {
            let base = buffer.data_ptr_mut() as usize;
            for h in 0..kv_heads {
                let head = base + (slot * kv_heads + h) * head_bytes;
                let (start, end) = ((head + n * head_size * 4).div_ceil(page) * page, (head + head_bytes) / page * page);
                if end > start {
                    // SAFETY: [start, end) lies inside head `h` of row `slot` of this buffer,
                    // past the positions the row keeps (rounded inwards to whole pages);
                    // MADV_DONTNEED only replaces the pages' contents with zeros, which is what
                    // positions nobody holds may contain.
                    unsafe {
                        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
                    }
                }
            }
        }
    }
}

/// Binds `value` as input `name` sharing its memory.
///
/// DEVNOTE: `IoBinding::bind_input` copies a tensor that does not own its memory (ort guards
/// against the caller changing it later); the cache views must alias the block, which is the
/// point of the shared buffer, so they go through the C API, which keeps a reference.
fn bind_input_in_place(binding: &mut IoBinding, name: &str, value: &Tensor<f32>) -> Result<(), ort::Error> {
    let name = std::ffi::CString::new(name).map_err(|e| ort::Error::new(e.to_string()))?;
    // SAFETY: both pointers come from live ort objects; ONNX Runtime copies the name and takes
    // its own reference to the value.
    unsafe { ort::Error::result_from_status((ort::api().BindInput)(binding.ptr_mut(), name.as_ptr(), value.ptr())) }
}

/// The graph at `path` rewritten to compute the logits of the last position only; `None`
/// (logged) where the rewrite does not apply or the file cannot be read here, which loading it
/// as shipped then reports.
fn last_position_graph(path: &Path, logits: &str) -> Option<Vec<u8>> {
    let size = std::fs::metadata(path).ok()?.len();
    if size > MAX_GRAPH_BYTES {
        tracing::debug!(path = %path.display(), size, "graph holds its weights inline; loading it as shipped");
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    match graph::last_position_logits(&bytes, logits) {
        Ok(Some(rewritten)) => Some(rewritten),
        Ok(None) => {
            tracing::info!(path = %path.display(), "the graph's LM head is not one the engine can narrow to the last position; logits are computed for every position");
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not read the graph to narrow its logits; loading it as shipped");
            None
        }
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

/// A zeroed `f32` tensor whose pages become resident only when written.
///
/// DEVNOTE: `ort`'s `Tensor::new` clears the buffer it allocates (a memset over all of it), so
/// a 4-row KV block of 1,024 positions wrote 3.2 GB on the Phi-3-mini shape the moment it grew,
/// and every row's idle capacity was resident memory. A zeroed `Vec` this large is served by
/// calloc from fresh mapped pages (see [`super::heap`]: large blocks are always mapped), which
/// read as zero without being written; ORT takes the buffer over without copying it. `ort`
/// binds such a tensor (one backed by Rust memory) only as an input, so the KV buffers are
/// bound through raw views of it (as they always were), and the logits stay ORT's own.
fn untouched<const N: usize>(shape: [usize; N]) -> ort::Result<Tensor<f32>> {
    let n = shape.iter().product();
    Tensor::from_array((shape, vec![0f32; n].into_boxed_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).expect("VmRSS in /proc/self/status")
    }

    #[test]
    fn a_new_kv_buffer_is_not_resident_until_written() {
        // `make test` fetches ONNX Runtime into `.ort/`, which a test binary finds by itself.
        super::super::runtime::load(None).expect("ONNX Runtime (run `make ort`)");
        // 256 MiB is past glibc's largest mmap threshold (32 MiB) with or without the
        // daemon's heap policy, so this holds in the test process too.
        const MIB: usize = 1024 * 1024;
        // 256 MiB of f32.
        let shape = [4usize, 8, 2048, 1024];
        let before = resident_kib();
        let mut t = untouched(shape).expect("allocating");
        let grown = resident_kib().saturating_sub(before);
        assert!(grown < 64 * 1024, "a fresh 256 MiB buffer made {grown} KiB resident");
        let (_, all) = t.try_extract_tensor_mut::<f32>().expect("viewing");
        assert!(all[..MIB].iter().all(|&x| x == 0.0), "an untouched buffer reads as zero");
        all[..MIB].fill(1.0);
        let written = resident_kib().saturating_sub(before);
        assert!(written >= 3 * 1024, "writing 4 MiB made only {written} KiB resident");
        drop(t);
        // The contrast this function exists for: ort's own constructor clears every page.
        let before = resident_kib();
        let cleared = Tensor::<f32>::new(&ort::memory::Allocator::default(), shape).expect("allocating");
        let grown = resident_kib().saturating_sub(before);
        assert!(grown >= 192 * 1024, "Tensor::new made only {grown} KiB resident; the DEVNOTE on `untouched` no longer holds");
        drop(cleared);
    }
}
