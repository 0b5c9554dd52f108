//! Prefix reuse: the keys and values of tokens a request shares with an earlier one are not
//! computed again.
//!
//! Local apps send the same long system prompt on every request and hold multi-turn chats, so
//! most of a prompt is usually a prefix the engine has already run. Two tiers keep it:
//!
//! - **Live.** The decoder's KV buffers still hold the last request's tokens (prompt and
//!   generated) when it ends. A request that starts with some of them (the same system prompt,
//!   the next turn of the same chat) begins after them, for free.
//! - **Snapshots.** Before a request overwrites live tokens it does not share, they are copied
//!   into a bounded LRU of snapshots (`engine.prefix_cache`, counted in the memory budget); a
//!   later request that starts with a snapshot's tokens copies them back, a memory copy instead
//!   of a prefill. So two apps with different system prompts, taking turns, both keep theirs.
//!
//! At least the prompt's last token always runs: its logits give the first new token.
//! Positions are implied by the order of the cache, so a prefix's keys and values are the same
//! whatever follows them, and greedy output with reuse is the output without it (tested).

/// Snapshots shorter than this are not worth a copy (or an entry).
pub(crate) const MIN_SNAPSHOT_TOKENS: usize = 16;

/// Tokens `a` and `b` start with in common.
pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The keys and values of `tokens`, copied out of the live buffers: one `Vec` per buffer
/// (layer 0 key, layer 0 value, layer 1 key, ...), each `[kv_heads, tokens.len(), head_size]`.
pub(crate) struct Snapshot {
    pub(crate) tokens: Vec<u32>,
    pub(crate) data: Vec<Vec<f32>>,
    last_used: u64,
}

impl Snapshot {
    fn bytes(&self) -> u64 {
        self.data.iter().map(|d| d.len() as u64 * 4).sum()
    }
}

/// What a request reuses, and from where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reuse {
    /// Nothing: the whole prompt runs.
    None,
    /// The first `n` tokens, already in the live buffers.
    Live(usize),
    /// The first `n` tokens of snapshot `index` (of which the first `live` are also live).
    Snapshot { index: usize, n: usize, live: usize },
}

impl Reuse {
    pub(crate) fn tokens(self) -> usize {
        match self {
            Reuse::None => 0,
            Reuse::Live(n) | Reuse::Snapshot { n, .. } => n,
        }
    }
}

/// The bounded LRU of snapshots.
pub(crate) struct PrefixStore {
    entries: Vec<Snapshot>,
    ceiling: u64,
    bytes: u64,
    bytes_per_token: u64,
    clock: u64,
}

impl PrefixStore {
    /// A store of at most `ceiling` bytes, for snapshots costing `bytes_per_token` each token.
    pub(crate) fn new(ceiling: u64, bytes_per_token: u64) -> PrefixStore {
        PrefixStore { entries: Vec::new(), ceiling, bytes: 0, bytes_per_token: bytes_per_token.max(1), clock: 0 }
    }

    pub(crate) fn bytes_per_token(&self) -> u64 {
        self.bytes_per_token
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// The most tokens a snapshot may hold.
    pub(crate) fn max_tokens(&self) -> usize {
        usize::try_from(self.ceiling / self.bytes_per_token).unwrap_or(usize::MAX)
    }

    /// How a request for `prompt` should start, given that the live buffers hold `live`:
    /// whichever tier shares more of it, never all of it (the last token must run).
    pub(crate) fn plan(&self, live: &[u32], prompt: &[u32]) -> Reuse {
        let usable = prompt.len().saturating_sub(1);
        let from_live = common_prefix(live, prompt).min(usable);
        let best = self.entries.iter().enumerate().map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(usable))).max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)));
        match best {
            Some((index, n)) if n > from_live && n >= MIN_SNAPSHOT_TOKENS => Reuse::Snapshot { index, n, live: from_live },
            _ if from_live > 0 => Reuse::Live(from_live),
            _ => Reuse::None,
        }
    }

    /// Whether the live `tokens` are worth a snapshot before they are overwritten: long
    /// enough, and not already held by an entry that starts with all of them.
    pub(crate) fn wants(&self, tokens: &[u32]) -> bool {
        self.max_tokens() >= MIN_SNAPSHOT_TOKENS
            && tokens.len() >= MIN_SNAPSHOT_TOKENS
            && !self.entries.iter().any(|e| e.tokens.len() >= tokens.len() && e.tokens.starts_with(tokens))
    }

    /// Adds a snapshot, dropping entries it extends and then the least recently used until it
    /// fits. A snapshot larger than the whole store is not kept.
    pub(crate) fn insert(&mut self, tokens: Vec<u32>, data: Vec<Vec<f32>>) {
        self.clock += 1;
        let entry = Snapshot { tokens, data, last_used: self.clock };
        let size = entry.bytes();
        if size > self.ceiling {
            return;
        }
        let mut i = 0;
        while i < self.entries.len() {
            if entry.tokens.starts_with(&self.entries[i].tokens) {
                self.remove(i);
            } else {
                i += 1;
            }
        }
        while self.bytes + size > self.ceiling {
            let Some(oldest) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i) else { break };
            self.remove(oldest);
        }
        self.bytes += size;
        self.entries.push(entry);
    }

    /// Snapshot `index`, marked as just used.
    pub(crate) fn touch(&mut self, index: usize) -> Option<&Snapshot> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.entries.get_mut(index)?;
        entry.last_used = clock;
        Some(entry)
    }

    fn remove(&mut self, index: usize) {
        let e = self.entries.swap_remove(index);
        self.bytes -= e.bytes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(r: std::ops::Range<u32>) -> Vec<u32> {
        r.collect()
    }

    /// One buffer of `n` floats per token: `bytes_per_token` is 4.
    fn data(n: usize) -> Vec<Vec<f32>> {
        vec![vec![0.0; n]]
    }

    #[test]
    fn the_longest_shared_prefix_wins_and_the_last_token_always_runs() {
        let mut s = PrefixStore::new(1 << 20, 4);
        let system = toks(0..100);
        s.insert(system.clone(), data(100));
        let mut prompt = system.clone();
        prompt.extend(500..510);
        // Live shares 40 tokens, the snapshot 100.
        assert_eq!(s.plan(&system[..40], &prompt), Reuse::Snapshot { index: 0, n: 100, live: 40 });
        // Live shares more than any snapshot.
        let mut live = prompt.clone();
        live.push(7);
        assert_eq!(s.plan(&live, &prompt), Reuse::Live(109), "all but the last prompt token");
        // The exact prompt again: its last token still runs.
        assert_eq!(s.plan(&[], &system), Reuse::Snapshot { index: 0, n: 99, live: 0 });
        // Nothing in common.
        assert_eq!(s.plan(&[9, 9], &toks(1000..1100)), Reuse::None);
        // A short shared snapshot prefix is not worth a copy.
        assert_eq!(s.plan(&[], &[0, 1, 2, 3, 77]), Reuse::None);
    }

    #[test]
    fn the_store_stays_within_its_ceiling_evicting_the_least_recently_used() {
        let mut s = PrefixStore::new(4 * 300, 4);
        assert_eq!(s.max_tokens(), 300);
        s.insert(toks(0..100), data(100));
        s.insert(toks(1000..1100), data(100));
        s.insert(toks(2000..2100), data(100));
        assert_eq!((s.len(), s.bytes()), (3, 1200));
        // Using the oldest makes the second-oldest the one to go.
        assert_eq!(s.plan(&[], &toks(0..50)), Reuse::Snapshot { index: 0, n: 49, live: 0 });
        s.touch(0);
        s.insert(toks(3000..3100), data(100));
        assert_eq!((s.len(), s.bytes()), (3, 1200));
        assert!(s.entries.iter().all(|e| e.tokens[0] != 1000), "the least recently used went");
        assert!(s.entries.iter().any(|e| e.tokens[0] == 0), "the touched one stayed");
        // Too large for the whole store: not kept, nothing evicted.
        s.insert(toks(0..301), data(301));
        assert_eq!((s.len(), s.bytes()), (3, 1200));
    }

    #[test]
    fn an_extension_replaces_its_prefix_and_a_covered_prefix_is_not_saved_twice() {
        let mut s = PrefixStore::new(1 << 20, 4);
        s.insert(toks(0..50), data(50));
        assert!(!s.wants(&toks(0..30)), "already held by the longer entry");
        assert!(s.wants(&toks(0..80)));
        s.insert(toks(0..80), data(80));
        assert_eq!((s.len(), s.bytes()), (1, 320), "the 50-token entry is a prefix of the new one");
        assert!(!s.wants(&toks(0..MIN_SNAPSHOT_TOKENS as u32 - 1)), "too short to keep");
        assert!(!PrefixStore::new(0, 4).wants(&toks(0..100)), "a store of size 0 keeps nothing");
    }
}
