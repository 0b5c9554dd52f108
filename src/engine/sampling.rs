//! Choosing the next token from a row of logits.
//!
//! Greedy ties break towards the lowest id (as onnxruntime-genai's argmax does), so the
//! engine is token-exact with the reference when the logits agree. Sampling uses a small
//! seeded PRNG owned by the request, so a seed reproduces a completion on any machine and
//! across releases of edgeflow's dependencies.

use super::EngineError;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 1.0 disables the penalty (CTRL-style, as in Hugging Face and genai).
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: None }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// # Errors
    /// [`EngineError::InvalidParameter`] naming the first parameter out of range.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |name, message: String| Err(EngineError::InvalidParameter { name, message });
        if !self.temperature.is_finite() || self.temperature < 0.0 || self.temperature > 100.0 {
            return bad("temperature", format!("{} is not in [0, 100]", self.temperature));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 || self.repetition_penalty > 10.0 {
            return bad("repetition_penalty", format!("{} is not in (0, 10]", self.repetition_penalty));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: tiny, fast, and fixed forever.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn seeded(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn from_entropy() -> Self {
        let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        seed ^= u64::from(std::process::id()).rotate_left(32);
        seed ^= &seed as *const u64 as u64;
        Rng::seeded(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Scratch space reused across steps: (id, logit) candidates.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = params.seed.map(Rng::seeded).unwrap_or_else(Rng::from_entropy);
        Sampler { params, rng, candidates: Vec::new() }
    }

    /// Picks the next token. `history` is every token seen so far (prompt and output), used
    /// by the repetition penalty; `logits` may be modified in place.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.params.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, history, self.params.repetition_penalty);
        }
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let k = if self.params.top_k == 0 { logits.len() } else { self.params.top_k.min(logits.len()) };
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        // Sort descending by logit, ties by id, keeping only the top k.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit);

        let max = self.candidates[0].1;
        let mut total = 0.0f64;
        let mut probs: Vec<f64> = self
            .candidates
            .iter()
            .map(|&(_, l)| {
                let p = (((l - max) * inv_t) as f64).exp();
                total += p;
                p
            })
            .collect();
        for p in &mut probs {
            *p /= total;
        }
        // Nucleus: the smallest prefix whose mass reaches top_p.
        let mut keep = probs.len();
        if self.params.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept_mass: f64 = probs[..keep].iter().sum();
        let mut r = self.rng.next_f64() * kept_mass;
        for (i, p) in probs[..keep].iter().enumerate() {
            if r < *p {
                return self.candidates[i].0;
            }
            r -= p;
        }
        self.candidates[keep - 1].0
    }
}

/// Index of the largest logit; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_val = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_val {
            best = i;
            best_val = v;
        }
    }
    best as u32
}

fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &id in history {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let l = logits[i];
            logits[i] = if l > 0.0 { l / penalty } else { l * penalty };
        }
    }
}

/// Log-softmax value of `id` and the entropy (nats) of the distribution; used by drift stats.
pub fn logprob_and_entropy(logits: &[f32], id: u32) -> (f32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for &l in logits {
        sum += ((l - max) as f64).exp();
    }
    let log_z = max as f64 + sum.ln();
    let mut entropy = 0.0f64;
    for &l in logits {
        let lp = l as f64 - log_z;
        entropy -= lp.exp() * lp;
    }
    let lp = logits.get(id as usize).map(|&l| l as f64 - log_z).unwrap_or(f64::NEG_INFINITY);
    (lp as f32, entropy as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_breaks_ties_low() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1.0]), 1);
    }

    #[test]
    fn greedy_ignores_seed() {
        let mut logits = vec![0.1, 0.5, 0.2];
        let mut s = Sampler::new(SamplingParams { seed: Some(7), ..SamplingParams::greedy() });
        assert_eq!(s.sample(&mut logits, &[]), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: Some(42) };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..50).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        let other = SamplingParams { seed: Some(43), ..params.clone() };
        assert_ne!(draw(&params), draw(&other));
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let logits = vec![5.0, 4.0, 1.0, 0.0, -1.0];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 2, top_p: 1.0, repetition_penalty: 1.0, seed: Some(1) });
        for _ in 0..200 {
            assert!(s.sample(&mut logits.clone(), &[]) < 2);
        }
        // p(0) = e^5 / (e^5 + e^4 + ...) ~ 0.72 < 0.9, so top_p 0.9 keeps ids 0 and 1 only.
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.9, repetition_penalty: 1.0, seed: Some(1) });
        let mut seen = [0usize; 5];
        for _ in 0..2000 {
            seen[s.sample(&mut logits.clone(), &[]) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0);
        assert_eq!(seen[2] + seen[3] + seen[4], 0);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with p = 0.25 / 0.75.
        let logits = vec![0.0, (3.0f32).ln()];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: Some(9) });
        let n = 20_000;
        let ones = (0..n).filter(|_| s.sample(&mut logits.clone(), &[]) == 1).count();
        let share = ones as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "share {share}");
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut logits = vec![2.0, 1.9, -1.0];
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.5, ..SamplingParams::greedy() });
        assert_eq!(s.sample(&mut logits, &[0, 0, 2]), 1);
        assert!((logits[0] - 2.0 / 1.5).abs() < 1e-6);
        assert!((logits[2] + 1.5).abs() < 1e-6);
    }

    #[test]
    fn validation_names_the_parameter() {
        let cases = [
            (SamplingParams { temperature: -1.0, ..SamplingParams::greedy() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..SamplingParams::greedy() }, "top_p"),
            (SamplingParams { top_p: f32::NAN, ..SamplingParams::greedy() }, "top_p"),
            (SamplingParams { repetition_penalty: 0.0, ..SamplingParams::greedy() }, "repetition_penalty"),
        ];
        for (p, name) in cases {
            match p.validate() {
                Err(EngineError::InvalidParameter { name: n, .. }) => assert_eq!(n, name),
                other => panic!("expected {name} to be rejected, got {other:?}"),
            }
        }
    }

    #[test]
    fn entropy_of_uniform_is_log_n() {
        let (lp, h) = logprob_and_entropy(&[1.0; 4], 2);
        assert!((lp - (0.25f32).ln()).abs() < 1e-5);
        assert!((h - (4.0f32).ln()).abs() < 1e-5);
    }
}
