//! Several sequences decoded together (continuous batching).
//!
//! Decoding one token is bound by reading the weights, not by arithmetic: a pass over four
//! sequences reads them once, as a pass over one does. So sequences that run at the same time
//! share each decode pass ([`Model::step`]), and a request that arrives while others generate
//! joins between two passes ([`Model::join`]: its prompt runs alone over its own cache row,
//! then it decodes with the rest), and leaves as soon as it ends ([`Model::retire`]) without
//! stalling the others.
//!
//! A newcomer's prompt runs whole when nothing else decodes; beside decoding sequences it runs
//! `engine.prefill_chunk` tokens per step, each chunk before that step's decode pass, so a long
//! prompt delays the others' next token by one chunk at a time instead of by all of it (the
//! step it joins included).
//!
//! Each sequence keeps its own cache row, positions, sampler and stop state, and attends only
//! to its own tokens, so its greedy output is the output it would have alone (tested over the
//! socket with 4 and 8 clients). A sequence alone runs exactly as before batching existed.
//!
//! What may run at once is bounded twice: by the decoder's rows (`engine.max_sequences`) and
//! by the KV tokens the running sequences may hold together (`engine.kv_cache`, never less
//! than one longest request); a sequence reserves its prompt plus its `max_new_tokens` when it
//! joins. Rows no sequence owns keep their tokens for prefix reuse only within what the
//! running ones leave of that budget.

use std::ops::ControlFlow;
use std::time::Instant;

use super::decoder::Cache;
use super::model::{GenerateParams, Generation, Model};
use super::sequence::{Sequence, Vocabulary};
use super::EngineError;

/// The sequences running on one model, each with the caller's `T` (where its text goes).
pub struct Batch<T> {
    entries: Vec<Entry<T>>,
    logits: Vec<f32>,
}

struct Entry<T> {
    tag: T,
    sequence: Sequence,
    cache: Cache,
    /// KV tokens reserved: the prompt and the most new tokens.
    reserved: usize,
    /// Prompt tokens of `sequence.next_input()` already run (its prompt runs in chunks while
    /// others decode).
    fed: usize,
    failed: Option<EngineError>,
}

impl<T> Entry<T> {
    fn is_running(&self) -> bool {
        !self.sequence.is_finished() && self.failed.is_none()
    }

    /// Running, with one token to feed: it takes part in the next decode pass.
    fn is_decoding(&self) -> bool {
        self.is_running() && self.sequence.next_input().len() == 1
    }

    /// Takes the logits of its last position: the next token, and its text to `on_text`
    /// (which may end the sequence); unusable logits fail it alone.
    fn accept(&mut self, logits: &mut [f32], vocab: &Vocabulary, on_text: &mut impl FnMut(&mut T, &str) -> ControlFlow<()>) {
        match self.sequence.accept(logits, vocab) {
            Ok(Some(text)) => {
                if on_text(&mut self.tag, text).is_break() {
                    self.sequence.cancel();
                }
            }
            Ok(None) => {}
            Err(e) => self.failed = Some(e),
        }
    }

    /// Running, with prompt tokens still to run.
    fn is_prefilling(&self) -> bool {
        self.is_running() && self.sequence.next_input().len() > 1
    }
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch { entries: Vec::new(), logits: Vec::new() }
    }
}

impl<T> Batch<T> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// KV tokens the running sequences reserve together.
    pub fn reserved(&self) -> usize {
        self.entries.iter().map(|e| e.reserved).sum()
    }

    /// Ends every sequence whose tag `cancelled` picks before the next step; they leave with
    /// [`super::FinishReason::Cancelled`] at the next [`Model::retire`].
    pub fn cancel_where(&mut self, cancelled: impl Fn(&T) -> bool) {
        for e in &mut self.entries {
            if !e.sequence.is_finished() && cancelled(&e.tag) {
                e.sequence.cancel();
            }
        }
    }
}

/// A sequence that could not join, with its tag back.
#[derive(Debug)]
pub struct Refused<T> {
    pub tag: T,
    pub error: EngineError,
}

/// What joining needs to know about a request before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// New tokens at most, after the context's limit.
    pub max_new: usize,
    /// KV tokens it reserves.
    pub kv_tokens: usize,
}

impl Model {
    /// Sequences that can run at once (1 when the graph's cache cannot hold several).
    pub fn max_sequences(&self) -> usize {
        self.decoder.slots()
    }

    /// KV tokens the running sequences may reserve together.
    pub fn kv_budget(&self) -> usize {
        self.kv_budget
    }

    /// Checks a request and says what it needs.
    ///
    /// # Errors
    /// An empty prompt, an id outside the vocabulary, bad sampling parameters, no new tokens,
    /// or a prompt that leaves no room in the context ([`EngineError::ContextOverflow`]).
    pub fn need(&self, prompt_ids: &[u32], params: &GenerateParams) -> Result<Need, EngineError> {
        params.sampling.validate()?;
        if prompt_ids.is_empty() {
            return Err(EngineError::InvalidParameter { name: "prompt", message: "is empty".into() });
        }
        if let Some(&bad) = prompt_ids.iter().find(|&&id| id as usize >= self.decoder.vocab()) {
            return Err(EngineError::InvalidParameter { name: "prompt", message: format!("token id {bad} is outside the vocabulary") });
        }
        if params.max_new_tokens == 0 {
            return Err(EngineError::InvalidParameter { name: "max_new_tokens", message: "must be at least 1".into() });
        }
        let context = self.context_length();
        if prompt_ids.len() >= context {
            return Err(EngineError::ContextOverflow { prompt_tokens: prompt_ids.len(), context_length: context });
        }
        let max_new = params.max_new_tokens.min(context - prompt_ids.len());
        Ok(Need { max_new, kv_tokens: prompt_ids.len() + max_new })
    }

    /// Whether a request needing `need` can join `batch` now (a lone request always can).
    pub fn has_room<T>(&self, batch: &Batch<T>, need: Need) -> bool {
        batch.is_empty() || (batch.len() < self.max_sequences() && batch.reserved() + need.kv_tokens <= self.kv_budget)
    }

    /// Starts a sequence in `batch`. When nothing else decodes, its prompt runs now (alone,
    /// over its own cache row) and its first token is sampled, its text handed to `on_text`;
    /// beside decoding sequences the prompt runs in chunks from the next [`Model::step`] on.
    /// The caller checked [`Model::has_room`].
    ///
    /// # Errors
    /// The request's problems (as [`Model::need`]) and ONNX Runtime failures, with the tag back.
    pub fn join<T>(
        &mut self,
        batch: &mut Batch<T>,
        prompt_ids: &[u32],
        params: &GenerateParams,
        started: Instant,
        tag: T,
        mut on_text: impl FnMut(&mut T, &str) -> ControlFlow<()>,
    ) -> Result<(), Box<Refused<T>>> {
        let need = match self.need(prompt_ids, params) {
            Ok(n) => n,
            Err(error) => return Err(Box::new(Refused { tag, error })),
        };
        if !self.has_room(batch, need) {
            let message = format!("{} sequences reserve {} of {} KV tokens; this one needs {}", batch.len(), batch.reserved(), self.kv_budget, need.kv_tokens);
            return Err(Box::new(Refused { tag, error: EngineError::Inference { during: "joining the batch", message } }));
        }
        // The last sampled token is never fed back, so the cache holds prompt + max_new - 1.
        let (cache, reused) = match self.decoder.start(need.kv_tokens, prompt_ids) {
            Ok(c) => c,
            Err(error) => return Err(Box::new(Refused { tag, error })),
        };
        let mut entry = Entry { tag, sequence: Sequence::new(prompt_ids, params, reused, need.max_new, started), cache, reserved: need.kv_tokens, fed: 0, failed: None };
        if let Err(error) = self.decoder.trim_idle(self.kv_budget.saturating_sub(batch.reserved() + need.kv_tokens)) {
            self.decoder.release(&entry.cache, false);
            return Err(Box::new(Refused { tag: entry.tag, error }));
        }
        // Alone, the whole prompt runs now. Beside sequences that decode, it runs a chunk per
        // step from the next step on (see `step`), so they do not stall for a long prompt, nor
        // wait for two chunks before their next token.
        if !batch.entries.iter().any(Entry::is_decoding) {
            if let Err(error) = self.prefill(&mut entry, usize::MAX, &mut batch.logits, &mut on_text) {
                self.decoder.release(&entry.cache, false);
                return Err(Box::new(Refused { tag: entry.tag, error }));
            }
        }
        batch.entries.push(entry);
        Ok(())
    }

    /// One decode step for every running sequence of `batch` (after a chunk of each prompt
    /// still running), handing each one's new text to `on_text`; returns how many sequences the
    /// decode pass advanced. A sequence whose logits are unusable fails alone (at the next
    /// retire).
    ///
    /// # Errors
    /// The pass itself failed: every sequence's cache is suspect, and the caller takes them all
    /// out with [`Model::abandon`].
    pub fn step<T>(&mut self, batch: &mut Batch<T>, mut on_text: impl FnMut(&mut T, &str) -> ControlFlow<()>) -> Result<usize, EngineError> {
        // Prompts still running take one chunk each first (a sequence whose prompt ends here
        // samples its first token and decodes in this same step).
        let chunk = if batch.entries.iter().any(Entry::is_decoding) { self.prefill_chunk } else { usize::MAX };
        for i in 0..batch.entries.len() {
            if batch.entries[i].is_prefilling() {
                let entry = &mut batch.entries[i];
                if let Err(e) = self.prefill(entry, chunk, &mut batch.logits, &mut on_text) {
                    // Its own row only: the others' keys and values are untouched.
                    entry.failed = Some(e);
                }
            }
        }
        let running: Vec<usize> = (0..batch.entries.len()).filter(|&i| batch.entries[i].is_decoding()).collect();
        if running.is_empty() {
            return Ok(0);
        }
        let mut tokens = Vec::with_capacity(running.len());
        for &i in &running {
            if let [token] = batch.entries[i].sequence.next_input() {
                tokens.push(*token);
            }
        }
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.step(tokens.len());
        }
        {
            let mut caches: Vec<&mut Cache> = Vec::with_capacity(running.len());
            let mut rest = batch.entries.iter_mut().enumerate();
            for &i in &running {
                for (j, e) in rest.by_ref() {
                    if j == i {
                        caches.push(&mut e.cache);
                        break;
                    }
                }
            }
            if let Err(e) = self.decoder.step(&mut caches, &tokens, &mut batch.logits) {
                self.decoder.forget();
                return Err(e);
            }
        }
        let vocab_size = self.decoder.vocab();
        let vocab = Vocabulary { tokenizer: &self.tokenizer, eos: &self.eos, byte_fallback: &self.byte_fallback };
        for (row, &i) in running.iter().enumerate() {
            let entry = &mut batch.entries[i];
            let logits = &mut batch.logits[row * vocab_size..(row + 1) * vocab_size];
            entry.accept(logits, &vocab, &mut on_text);
        }
        Ok(running.len())
    }

    /// Runs up to `chunk` more of `entry`'s prompt over its own row; once the prompt has run,
    /// samples its first token and hands its text to `on_text`.
    fn prefill<T>(&mut self, entry: &mut Entry<T>, chunk: usize, logits: &mut Vec<f32>, on_text: &mut impl FnMut(&mut T, &str) -> ControlFlow<()>) -> Result<(), EngineError> {
        let input = entry.sequence.next_input();
        let end = input.len().min(entry.fed.saturating_add(chunk.max(1)));
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.step(end - entry.fed);
        }
        self.decoder.forward(&mut entry.cache, &input[entry.fed..end], logits)?;
        if end < input.len() {
            entry.fed = end;
            return Ok(());
        }
        entry.fed = 0;
        let vocab = Vocabulary { tokenizer: &self.tokenizer, eos: &self.eos, byte_fallback: &self.byte_fallback };
        entry.accept(logits, &vocab, on_text);
        Ok(())
    }

    /// Takes the sequences that ended out of `batch` (their rows are free for newcomers),
    /// handing each one's last text to `on_text`, with its generation or its error.
    pub fn retire<T>(&mut self, batch: &mut Batch<T>, mut on_text: impl FnMut(&mut T, &str)) -> Vec<(T, Result<Generation, EngineError>)> {
        let mut done = Vec::new();
        let mut i = 0;
        while i < batch.entries.len() {
            if batch.entries[i].is_running() {
                i += 1;
                continue;
            }
            let Entry { mut tag, sequence, cache, failed, .. } = batch.entries.remove(i);
            // A sequence whose logits were unusable may have left keys and values no later
            // request should start from.
            self.decoder.release(&cache, failed.is_none());
            let result = match failed {
                Some(e) => Err(e),
                None => sequence.finish(&self.tokenizer).map(|(generation, tail)| {
                    if let Some(tail) = tail {
                        on_text(&mut tag, &tail);
                    }
                    generation
                }),
            };
            done.push((tag, result));
        }
        done
    }

    /// Takes every sequence out of `batch` after a failed step, freeing their rows (and
    /// forgetting what they held).
    pub fn abandon<T>(&mut self, batch: &mut Batch<T>) -> Vec<T> {
        batch
            .entries
            .drain(..)
            .map(|e| {
                self.decoder.release(&e.cache, false);
                e.tag
            })
            .collect()
    }
}
