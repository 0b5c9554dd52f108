//! One generation's state between forward passes: what it feeds the model next, how it turns
//! the logits of its last position into a token, its text so far, and why it ends.
//!
//! The forward pass itself belongs to the decoder; everything after it (sampling, end of
//! sequence, stop strings, the text held back while it could still become a stop string,
//! drift statistics) is here, so the loop that drives one sequence ([`super::Model::generate`])
//! and a loop that drives several over one batch share it.

use std::time::{Duration, Instant};

use super::model::{FinishReason, GenerateParams, Generation, StepStats};
use super::sampling::Sampler;
use super::tokenizer::{StreamDecoder, Tokenizer};
use super::EngineError;

/// What the model knows about its vocabulary that every sequence needs after a pass.
pub(crate) struct Vocabulary<'a> {
    pub tokenizer: &'a Tokenizer,
    pub eos: &'a [u32],
    /// Per id: a SentencePiece byte-fallback token (`<0x..>`), counted for drift.
    pub byte_fallback: &'a [bool],
}

pub(crate) struct Sequence {
    params: GenerateParams,
    started: Instant,
    prompt_ids: Vec<u32>,
    reused_tokens: usize,
    max_new: usize,
    sampler: Sampler,
    stream: StreamDecoder,
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    max_stop: usize,
    /// Prompt and generated ids (repetition penalties look at both).
    history: Vec<u32>,
    token_ids: Vec<u32>,
    top_logits: Vec<Vec<(u32, f32)>>,
    stats: StepStats,
    time_to_first_token: Duration,
    /// Set once the sequence has ended.
    finish: Option<FinishReason>,
    stopped_by_string: bool,
    /// Ids the next forward pass feeds: the prompt after its reused prefix, then each
    /// sampled token.
    next_input: Vec<u32>,
}

impl Sequence {
    /// A sequence over `prompt_ids`, of which the first `reused_tokens` are already in the
    /// KV cache, generating at most `max_new` tokens.
    pub(crate) fn new(prompt_ids: &[u32], params: &GenerateParams, reused_tokens: usize, max_new: usize, started: Instant) -> Sequence {
        Sequence {
            sampler: Sampler::new(params.sampling.clone()),
            max_stop: params.stop.iter().map(String::len).max().unwrap_or(0),
            params: params.clone(),
            started,
            prompt_ids: prompt_ids.to_vec(),
            reused_tokens,
            max_new,
            stream: StreamDecoder::new(),
            text: String::new(),
            emitted: 0,
            history: prompt_ids.to_vec(),
            token_ids: Vec::new(),
            top_logits: Vec::new(),
            stats: StepStats::default(),
            time_to_first_token: Duration::ZERO,
            finish: (max_new == 0).then_some(FinishReason::Length),
            stopped_by_string: false,
            next_input: prompt_ids[reused_tokens..].to_vec(),
        }
    }

    /// The ids the next forward pass must feed.
    pub(crate) fn next_input(&self) -> &[u32] {
        &self.next_input
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Ends the sequence early (the caller cancelled, or the client went away), even on the
    /// step that would have ended it anyway: its last text was not taken.
    pub(crate) fn cancel(&mut self) {
        self.finish = Some(FinishReason::Cancelled);
    }

    /// Takes the logits of this sequence's last position after a forward pass: samples the
    /// next token, checks end of sequence and stop strings, and returns the text that can be
    /// handed out now (none while it could still become part of a stop string).
    ///
    /// # Errors
    /// [`EngineError::NonFiniteLogits`]; [`EngineError::Tokenizer`] for an id outside the
    /// vocabulary.
    pub(crate) fn accept(&mut self, logits: &mut [f32], vocab: &Vocabulary) -> Result<Option<&str>, EngineError> {
        let step = self.token_ids.len();
        if logits.iter().any(|l| !l.is_finite()) {
            return Err(EngineError::NonFiniteLogits { step });
        }
        if self.params.record_top_logits > 0 {
            self.top_logits.push(top_n(logits, self.params.record_top_logits));
        }
        let id = self.sampler.sample(logits, &self.history);
        if self.params.collect_stats {
            let (lp, entropy) = super::sampling::logprob_and_entropy(logits, id);
            self.stats.logprob_sum += f64::from(lp);
            self.stats.entropy_sum += f64::from(entropy);
        }
        if vocab.byte_fallback.get(id as usize).copied().unwrap_or(false) {
            self.stats.byte_fallback_tokens += 1;
        }
        if step == 0 {
            self.time_to_first_token = self.started.elapsed();
        }
        self.token_ids.push(id);
        self.history.push(id);
        self.next_input.clear();
        self.next_input.push(id);
        if self.token_ids.len() >= self.max_new {
            self.finish = Some(FinishReason::Length);
        }
        if !self.params.ignore_eos && vocab.eos.contains(&id) {
            self.finish = Some(FinishReason::Stop);
            return Ok(None);
        }
        if let Some(piece) = self.stream.push(vocab.tokenizer, id)? {
            self.text.push_str(&piece);
        }
        // Stop strings: search only the region the new text can complete.
        if self.max_stop > 0 {
            let from = floor_char_boundary(&self.text, self.emitted.saturating_sub(self.max_stop));
            let found = self.params.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
            if let Some(cut) = found {
                self.text.truncate(cut);
                self.stopped_by_string = true;
                self.finish = Some(FinishReason::Stop);
                return Ok(None);
            }
        }
        // Hold back a tail that could still become a stop string.
        let safe = floor_char_boundary(&self.text, self.text.len().saturating_sub(held_back(&self.text, &self.params.stop)));
        if safe > self.emitted {
            let from = std::mem::replace(&mut self.emitted, safe);
            return Ok(Some(&self.text[from..safe]));
        }
        Ok(None)
    }

    /// The generation, and the text not yet handed out (none when cancelled): an incomplete
    /// character still held by the stream decoder is flushed (as U+FFFD, as a full decode
    /// would show it) unless a stop string already cut the text.
    ///
    /// # Errors
    /// [`EngineError::Tokenizer`] for an id outside the vocabulary.
    pub(crate) fn finish(mut self, tokenizer: &Tokenizer) -> Result<(Generation, Option<String>), EngineError> {
        let finish_reason = self.finish.unwrap_or(FinishReason::Length);
        let cancelled = finish_reason == FinishReason::Cancelled;
        if !self.stopped_by_string && !cancelled {
            if let Some(rest) = self.stream.finish(tokenizer)? {
                self.text.push_str(&rest);
            }
        }
        let tail = (self.text.len() > self.emitted && !cancelled).then(|| self.text[self.emitted..].to_string());
        let generation = Generation {
            prompt_token_ids: self.prompt_ids,
            token_ids: self.token_ids,
            text: self.text,
            finish_reason,
            time_to_first_token: self.time_to_first_token,
            total_time: self.started.elapsed(),
            top_logits: self.top_logits,
            stats: self.stats,
            reused_tokens: self.reused_tokens,
        };
        Ok((generation, tail))
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for len in (1..s.len()).rev() {
            if len <= best {
                break;
            }
            if text.len() >= len && s.is_char_boundary(len) && text.ends_with(&s[..len]) {
                best = len;
                break;
            }
        }
    }
    best
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let n = n.min(idx.len());
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    idx.select_nth_unstable_by(n - 1, cmp);
    idx.truncate(n);
    idx.sort_unstable_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_finds_partial_stop() {
        let stops = vec!["\n\nUser:".to_string(), "END".to_string()];
        assert_eq!(held_back("hello\n\nUs", &stops), 4);
        assert_eq!(held_back("hello E", &stops), 1);
        assert_eq!(held_back("hello", &stops), 0);
    }

    #[test]
    fn top_n_orders_and_breaks_ties_low() {
        assert_eq!(top_n(&[1.0, 3.0, 3.0, 2.0], 3), vec![(1, 3.0), (2, 3.0), (3, 2.0)]);
    }
}
