//! Drift: how the requests a model version sees, and how it answers them, move away from a
//! baseline, measured from aggregates only. No prompt or output text is ever kept here:
//! each request contributes a handful of numbers (token counts, stop reason, mean token
//! log-probability and next-token entropy, share of byte-fallback tokens, latencies) to
//! fixed-bucket histograms.
//!
//! A [`Sketch`] is one histogram per [`Feature`], with bucket edges fixed by the schema
//! version ([`SCHEMA`]). Two sketches of the same schema merge by adding counts, so a
//! console can combine windows, devices or a whole fleet, and a baseline
//! (`drift_baseline.json`, logged with the model version) is a sketch like any other.
//! [`compare`] reports the population stability index (PSI) and the Jensen–Shannon distance
//! per feature and raises an alert when either passes its threshold on enough samples.
//!
//! [`Recorder`] is the cheap, cloneable handle request handlers feed; [`Baselines`] decides,
//! per model version, what each window is compared against.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{FinishReason, Generation};

/// Version of the bucket layout below. Sketches of different schemas never merge.
pub const SCHEMA: u32 = 1;

/// File name of a baseline sketch logged next to a model version's files.
pub const BASELINE_FILE: &str = "drift_baseline.json";

/// What is measured per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feature {
    PromptTokens,
    OutputTokens,
    FinishReason,
    MeanLogprob,
    MeanEntropy,
    ByteFallbackShare,
    LatencyMs,
    TtftMs,
}

/// Categories of [`Feature::FinishReason`], in bucket order.
pub const FINISH_REASONS: &[&str] = &["stop", "length", "cancelled", "error"];

impl Feature {
    pub const ALL: [Feature; 8] = [
        Feature::PromptTokens,
        Feature::OutputTokens,
        Feature::FinishReason,
        Feature::MeanLogprob,
        Feature::MeanEntropy,
        Feature::ByteFallbackShare,
        Feature::LatencyMs,
        Feature::TtftMs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::PromptTokens => "prompt_tokens",
            Feature::OutputTokens => "output_tokens",
            Feature::FinishReason => "finish_reason",
            Feature::MeanLogprob => "mean_logprob",
            Feature::MeanEntropy => "mean_entropy",
            Feature::ByteFallbackShare => "byte_fallback_share",
            Feature::LatencyMs => "latency_ms",
            Feature::TtftMs => "ttft_ms",
        }
    }

    /// Upper (exclusive) bounds of every bucket but the last, which is open. A value `v`
    /// falls in the first bucket whose bound exceeds it. For `finish_reason` the buckets
    /// are [`FINISH_REASONS`].
    pub fn edges(self) -> &'static [f64] {
        match self {
            Feature::PromptTokens => &[8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0],
            Feature::OutputTokens => &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0],
            Feature::FinishReason => &[1.0, 2.0, 3.0],
            // Natural-log probability of the chosen token, averaged over the output.
            Feature::MeanLogprob => &[-8.0, -6.0, -4.0, -3.0, -2.5, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, -0.1],
            // Entropy of the next-token distribution in nats, averaged over the output.
            Feature::MeanEntropy => &[0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0],
            // The first bucket holds exactly zero.
            Feature::ByteFallbackShare => &[1e-9, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5],
            Feature::LatencyMs | Feature::TtftMs => &[10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0],
        }
    }

    pub fn buckets(self) -> usize {
        self.edges().len() + 1
    }

    fn bucket(self, v: f64) -> usize {
        self.edges().iter().position(|e| v < *e).unwrap_or(self.edges().len())
    }
}

/// One request, reduced to the numbers drift is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Index into [`FINISH_REASONS`].
    pub finish: usize,
    /// Mean natural-log probability of the chosen tokens; `None` when not collected.
    pub mean_logprob: Option<f64>,
    /// Mean next-token entropy in nats; `None` when not collected.
    pub mean_entropy: Option<f64>,
    pub byte_fallback_share: Option<f64>,
    pub latency: Option<Duration>,
    pub ttft: Option<Duration>,
}

impl Observation {
    /// From a finished generation; `stats_collected` says whether it ran with
    /// `GenerateParams::collect_stats` (otherwise log-probability and entropy are unknown).
    /// `latency` is the request's end-to-end time if the caller measured it, else the
    /// engine's.
    pub fn from_generation(g: &Generation, stats_collected: bool, latency: Option<Duration>) -> Observation {
        let n = g.token_ids.len();
        let mean = |sum: f64| (stats_collected && n > 0).then(|| sum / n as f64);
        Observation {
            prompt_tokens: g.prompt_token_ids.len(),
            output_tokens: n,
            finish: match g.finish_reason {
                FinishReason::Stop => 0,
                FinishReason::Length => 1,
                FinishReason::Cancelled => 2,
            },
            mean_logprob: mean(g.stats.logprob_sum),
            mean_entropy: mean(g.stats.entropy_sum),
            byte_fallback_share: (n > 0).then(|| g.stats.byte_fallback_tokens as f64 / n as f64),
            latency: Some(latency.unwrap_or(g.total_time)),
            ttft: (n > 0).then_some(g.time_to_first_token),
        }
    }

    /// A request that failed before generating (counted in the stop-reason mix only).
    pub fn failed(prompt_tokens: usize, latency: Option<Duration>) -> Observation {
        Observation { prompt_tokens, output_tokens: 0, finish: 3, mean_logprob: None, mean_entropy: None, byte_fallback_share: None, latency, ttft: None }
    }

    fn value(&self, f: Feature) -> Option<f64> {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        let v = match f {
            Feature::PromptTokens => Some(self.prompt_tokens as f64),
            Feature::OutputTokens => Some(self.output_tokens as f64),
            Feature::FinishReason => Some(self.finish.min(FINISH_REASONS.len() - 1) as f64),
            Feature::MeanLogprob => self.mean_logprob,
            Feature::MeanEntropy => self.mean_entropy,
            Feature::ByteFallbackShare => self.byte_fallback_share,
            Feature::LatencyMs => ms(self.latency),
            Feature::TtftMs => ms(self.ttft),
        };
        v.filter(|v| v.is_finite())
    }
}

/// Counts per bucket and the sum of the values (for a mean).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Histogram {
    fn empty(f: Feature) -> Histogram {
        Histogram { counts: vec![0; f.buckets()], sum: 0.0 }
    }

    pub fn n(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// One histogram per feature; serialized as `{"schema":1,"n":N,"features":{name: {counts, sum}}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "SketchWire", into = "SketchWire")]
pub struct Sketch {
    /// Requests observed.
    pub n: u64,
    hist: Vec<Histogram>,
}

#[derive(Serialize, Deserialize)]
struct SketchWire {
    schema: u32,
    n: u64,
    features: std::collections::BTreeMap<String, Histogram>,
}

impl From<Sketch> for SketchWire {
    fn from(s: Sketch) -> SketchWire {
        SketchWire { schema: SCHEMA, n: s.n, features: Feature::ALL.iter().zip(s.hist).map(|(f, h)| (f.name().to_string(), h)).collect() }
    }
}

impl TryFrom<SketchWire> for Sketch {
    type Error = String;
    fn try_from(mut w: SketchWire) -> Result<Sketch, String> {
        if w.schema != SCHEMA {
            return Err(format!("sketch schema {} is not {SCHEMA}", w.schema));
        }
        let mut hist = Vec::with_capacity(Feature::ALL.len());
        for f in Feature::ALL {
            // A feature missing from the file was not measured: an empty histogram.
            let h = w.features.remove(f.name()).unwrap_or_else(|| Histogram::empty(f));
            if h.counts.len() != f.buckets() {
                return Err(format!("feature {} has {} buckets, schema {SCHEMA} has {}", f.name(), h.counts.len(), f.buckets()));
            }
            if !h.sum.is_finite() {
                return Err(format!("feature {}: sum is not finite", f.name()));
            }
            hist.push(h);
        }
        if let Some(unknown) = w.features.keys().next() {
            return Err(format!("unknown feature `{unknown}`"));
        }
        Ok(Sketch { n: w.n, hist })
    }
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch { n: 0, hist: Feature::ALL.iter().map(|f| Histogram::empty(*f)).collect() }
    }
}

impl Sketch {
    pub fn observe(&mut self, o: &Observation) {
        self.n += 1;
        for (f, h) in Feature::ALL.iter().zip(self.hist.iter_mut()) {
            if let Some(v) = o.value(*f) {
                h.counts[f.bucket(v)] += 1;
                h.sum += v;
            }
        }
    }

    /// Adds `other`'s counts to this sketch. Same schema by construction, so this cannot
    /// fail; a sketch from another schema fails to deserialize instead.
    pub fn merge(&mut self, other: &Sketch) {
        self.n += other.n;
        for (a, b) in self.hist.iter_mut().zip(&other.hist) {
            for (x, y) in a.counts.iter_mut().zip(&b.counts) {
                *x += y;
            }
            a.sum += b.sum;
        }
    }

    pub fn histogram(&self, f: Feature) -> &Histogram {
        // `hist` is built from Feature::ALL, in order.
        &self.hist[Feature::ALL.iter().position(|x| *x == f).unwrap_or(0)]
    }
}

/// When a divergence counts as drift.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// PSI at or above this alerts (0.1 is a moderate shift, 0.25 a significant one).
    pub psi: f64,
    /// Jensen–Shannon distance (base 2, in [0, 1]) at or above this alerts.
    pub js: f64,
    /// Both the window and the baseline need this many values of a feature before it can
    /// alert: small samples diverge by chance.
    pub min_samples: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { psi: 0.25, js: 0.2, min_samples: 100 }
    }
}

/// Divergence of one feature.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureDrift {
    pub psi: f64,
    pub js: f64,
    /// Values of this feature in the window.
    pub n: u64,
    pub alert: bool,
}

/// A window against its baseline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// Per feature name; features without values on either side are left out.
    pub features: std::collections::BTreeMap<&'static str, FeatureDrift>,
    pub alert: bool,
}

/// Compares `window` with `baseline` feature by feature.
pub fn compare(baseline: &Sketch, window: &Sketch, t: &Thresholds) -> Comparison {
    let mut features = std::collections::BTreeMap::new();
    for f in Feature::ALL {
        let (b, w) = (baseline.histogram(f), window.histogram(f));
        let (nb, nw) = (b.n(), w.n());
        if nb == 0 || nw == 0 {
            continue;
        }
        let psi = psi(&b.counts, &w.counts);
        let js = js_distance(&b.counts, &w.counts);
        let alert = nb >= t.min_samples && nw >= t.min_samples && (psi >= t.psi || js >= t.js);
        features.insert(f.name(), FeatureDrift { psi: round4(psi), js: round4(js), n: nw, alert });
    }
    let alert = features.values().any(|d| d.alert);
    Comparison { features, alert }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Population stability index: Σ (w − b) · ln(w / b) over the buckets either side uses,
/// with half a count added to each so an empty bucket does not make it infinite.
pub fn psi(baseline: &[u64], window: &[u64]) -> f64 {
    let used: Vec<usize> = (0..baseline.len().min(window.len())).filter(|&i| baseline[i] + window[i] > 0).collect();
    let k = used.len() as f64;
    let nb: f64 = used.iter().map(|&i| baseline[i] as f64).sum::<f64>() + 0.5 * k;
    let nw: f64 = used.iter().map(|&i| window[i] as f64).sum::<f64>() + 0.5 * k;
    used.iter()
        .map(|&i| {
            let b = (baseline[i] as f64 + 0.5) / nb;
            let w = (window[i] as f64 + 0.5) / nw;
            (w - b) * (w / b).ln()
        })
        .sum()
}

/// Jensen–Shannon distance: the square root of the JS divergence in bits, in [0, 1].
pub fn js_distance(baseline: &[u64], window: &[u64]) -> f64 {
    let nb: f64 = baseline.iter().sum::<u64>() as f64;
    let nw: f64 = window.iter().sum::<u64>() as f64;
    if nb == 0.0 || nw == 0.0 {
        return 0.0;
    }
    let mut jsd = 0.0;
    for (b, w) in baseline.iter().zip(window) {
        let p = *b as f64 / nb;
        let q = *w as f64 / nw;
        let m = (p + q) / 2.0;
        if p > 0.0 {
            jsd += 0.5 * p * (p / m).log2();
        }
        if q > 0.0 {
            jsd += 0.5 * q * (q / m).log2();
        }
    }
    jsd.clamp(0.0, 1.0).sqrt()
}

/// A model version, as drift is kept per version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VersionKey {
    pub model: String,
    pub version: String,
}

/// The sketch of one model version over one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub key: VersionKey,
    /// Unix seconds of the first and last observation.
    pub first: u64,
    pub last: u64,
    pub sketch: Sketch,
}

/// Versions tracked at once in a window; more (only possible through a flood of swaps)
/// are dropped and counted rather than growing without bound.
const MAX_VERSIONS_PER_WINDOW: usize = 8;

/// The handle request handlers feed. Cloning shares the same windows.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    inner: Arc<Mutex<RecorderState>>,
}

#[derive(Debug, Default)]
struct RecorderState {
    windows: HashMap<VersionKey, Window>,
    dropped: u64,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Adds one request of `model`@`version` to the current window.
    pub fn observe(&self, model: &str, version: &str, o: &Observation) {
        let now = crate::util::unix_now();
        // DEVNOTE: a poisoned lock only means another observer panicked mid-update of plain
        // counters; the data is still usable, so recover instead of propagating the panic.
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = VersionKey { model: model.to_string(), version: version.to_string() };
        if !s.windows.contains_key(&key) && s.windows.len() >= MAX_VERSIONS_PER_WINDOW {
            s.dropped += 1;
            return;
        }
        let w = s.windows.entry(key.clone()).or_insert_with(|| Window { key, first: now, last: now, sketch: Sketch::default() });
        w.last = now;
        w.sketch.observe(o);
    }

    /// Ends the current window: its sketches, one per version, and observations dropped
    /// since the last call.
    pub fn take(&self) -> (Vec<Window>, u64) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut windows: Vec<Window> = s.windows.drain().map(|(_, w)| w).collect();
        windows.sort_by(|a, b| a.key.cmp(&b.key));
        (windows, std::mem::take(&mut s.dropped))
    }
}

/// Where a version's baseline came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineSource {
    /// `drift_baseline.json` logged with the model version.
    Artifact,
    /// The first window(s) after activation, until `min_samples` requests.
    FirstWindow,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub source: BaselineSource,
    pub sketch: Sketch,
}

/// What became of one window.
#[derive(Debug, Clone, PartialEq)]
pub enum Assessment {
    /// Compared with an established baseline.
    Compared { baseline: BaselineSource, baseline_n: u64, comparison: Comparison },
    /// Became part of the first-window baseline (established once `established`).
    Baseline { n: u64, established: bool },
}

/// Baselines per model version. Versions are few (the active one, and the previous during
/// a swap); the oldest are forgotten beyond a small bound.
#[derive(Debug, Default)]
pub struct Baselines {
    established: HashMap<VersionKey, Baseline>,
    pending: HashMap<VersionKey, Sketch>,
    order: Vec<VersionKey>,
}

const MAX_BASELINES: usize = 8;

impl Baselines {
    pub fn new() -> Baselines {
        Baselines::default()
    }

    pub fn get(&self, key: &VersionKey) -> Option<&Baseline> {
        self.established.get(key)
    }

    /// Installs a baseline (an artifact, or one persisted earlier); it replaces a
    /// first-window one being built.
    pub fn insert(&mut self, key: VersionKey, baseline: Baseline) {
        self.pending.remove(&key);
        self.touch(&key);
        self.established.insert(key, baseline);
    }

    fn touch(&mut self, key: &VersionKey) {
        self.order.retain(|k| k != key);
        self.order.push(key.clone());
        while self.order.len() > MAX_BASELINES {
            let old = self.order.remove(0);
            self.established.remove(&old);
            self.pending.remove(&old);
        }
    }

    /// Compares `window` with its version's baseline, or adds it to the first-window
    /// baseline being built.
    pub fn assess(&mut self, window: &Window, t: &Thresholds) -> Assessment {
        self.touch(&window.key);
        if let Some(b) = self.established.get(&window.key) {
            return Assessment::Compared { baseline: b.source, baseline_n: b.sketch.n, comparison: compare(&b.sketch, &window.sketch, t) };
        }
        let pending = self.pending.entry(window.key.clone()).or_default();
        pending.merge(&window.sketch);
        let n = pending.n;
        let established = n >= t.min_samples;
        if established {
            let sketch = self.pending.remove(&window.key).unwrap_or_default();
            self.established.insert(window.key.clone(), Baseline { source: BaselineSource::FirstWindow, sketch });
        }
        Assessment::Baseline { n, established }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(prompt: usize, output: usize, logprob: f64) -> Observation {
        Observation {
            prompt_tokens: prompt,
            output_tokens: output,
            finish: 0,
            mean_logprob: Some(logprob),
            mean_entropy: Some(-logprob * 1.5),
            byte_fallback_share: Some(0.0),
            latency: Some(Duration::from_millis(40 + output as u64)),
            ttft: Some(Duration::from_millis(8)),
        }
    }

    /// A deterministic stream of requests: prompt lengths spread around `center`.
    fn sample(center: usize, n: usize, seed: u64) -> Sketch {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut s = Sketch::default();
        for _ in 0..n {
            let prompt = (center as f64 * (0.5 + rng.f64())) as usize;
            s.observe(&obs(prompt, 1 + rng.usize(..40), -0.5 - rng.f64() * 2.0));
        }
        s
    }

    #[test]
    fn values_land_in_the_documented_buckets() {
        let table = [
            (Feature::PromptTokens, 0.0, 0),
            (Feature::PromptTokens, 7.0, 0),
            (Feature::PromptTokens, 8.0, 1),
            (Feature::PromptTokens, 1e9, 10),
            (Feature::OutputTokens, 0.0, 0),
            (Feature::OutputTokens, 1.0, 1),
            (Feature::FinishReason, 0.0, 0),
            (Feature::FinishReason, 3.0, 3),
            (Feature::MeanLogprob, -20.0, 0),
            (Feature::MeanLogprob, -0.01, 12),
            (Feature::ByteFallbackShare, 0.0, 0),
            (Feature::ByteFallbackShare, 0.005, 1),
            (Feature::LatencyMs, 120.0, 4),
        ];
        for (f, v, want) in table {
            assert_eq!(f.bucket(v), want, "{} {v}", f.name());
            assert!(want < f.buckets());
        }
    }

    #[test]
    fn sketches_merge_by_adding_counts_and_round_trip_through_json() {
        let a = sample(100, 50, 1);
        let b = sample(100, 70, 2);
        let mut merged = a.clone();
        merged.merge(&b);
        assert_eq!(merged.n, 120);
        for f in Feature::ALL {
            assert_eq!(merged.histogram(f).n(), a.histogram(f).n() + b.histogram(f).n(), "{}", f.name());
        }
        // Merging is order-independent: what a console combining devices relies on.
        let mut other_order = b.clone();
        other_order.merge(&a);
        assert_eq!(other_order.hist.iter().map(|h| h.counts.clone()).collect::<Vec<_>>(), merged.hist.iter().map(|h| h.counts.clone()).collect::<Vec<_>>());
        let text = serde_json::to_string(&merged).unwrap();
        assert!(text.starts_with("{\"schema\":1,"), "{text}");
        let back: Sketch = serde_json::from_str(&text).unwrap();
        assert_eq!(back, merged);
        // Another schema, a wrong bucket count or an unknown feature is refused, not merged.
        for bad in [text.replace("\"schema\":1", "\"schema\":2"), text.replace("\"counts\":[", "\"counts\":[0,"), text.replace("\"ttft_ms\"", "\"ttft_us\"")] {
            assert!(serde_json::from_str::<Sketch>(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn divergences_are_zero_for_identical_and_large_for_disjoint_histograms() {
        let a = [10, 20, 30, 0];
        assert!(psi(&a, &a).abs() < 1e-12);
        assert!(js_distance(&a, &a).abs() < 1e-12);
        let b = [0, 0, 0, 60];
        assert!((js_distance(&a, &b) - 1.0).abs() < 1e-9, "disjoint: JS distance is 1");
        assert!(psi(&a, &b) > 2.0);
        // Symmetric.
        let c = [15, 25, 15, 5];
        assert!((js_distance(&a, &c) - js_distance(&c, &a)).abs() < 1e-12);
        assert!((psi(&a, &c) - psi(&c, &a)).abs() < 0.05);
    }

    #[test]
    fn a_shifted_prompt_distribution_alerts_and_an_unshifted_one_does_not() {
        let t = Thresholds::default();
        let baseline = sample(60, 400, 7);
        let same = compare(&baseline, &sample(60, 300, 8), &t);
        assert!(!same.alert, "{same:#?}");
        let shifted = compare(&baseline, &sample(600, 300, 9), &t);
        assert!(shifted.alert, "{shifted:#?}");
        let p = &shifted.features["prompt_tokens"];
        assert!(p.alert && p.psi >= t.psi, "{p:?}");
        assert!(!shifted.features["output_tokens"].alert, "only the prompt moved: {shifted:#?}");
        // Too few requests never alert, however different.
        let small = compare(&baseline, &sample(600, 20, 10), &t);
        assert!(!small.alert && small.features["prompt_tokens"].psi > t.psi);
    }

    #[test]
    fn the_first_windows_become_the_baseline_then_windows_are_compared() {
        let t = Thresholds { min_samples: 100, ..Thresholds::default() };
        let key = VersionKey { model: "m".into(), version: "1".into() };
        let window = |s: Sketch| Window { key: key.clone(), first: 0, last: 0, sketch: s };
        let mut b = Baselines::new();
        assert_eq!(b.assess(&window(sample(60, 60, 1)), &t), Assessment::Baseline { n: 60, established: false });
        assert_eq!(b.assess(&window(sample(60, 60, 2)), &t), Assessment::Baseline { n: 120, established: true });
        assert_eq!(b.get(&key).unwrap().source, BaselineSource::FirstWindow);
        match b.assess(&window(sample(60, 150, 3)), &t) {
            Assessment::Compared { baseline: BaselineSource::FirstWindow, baseline_n: 120, comparison } => assert!(!comparison.alert, "{comparison:#?}"),
            other => panic!("{other:?}"),
        }
        // An artifact replaces it.
        b.insert(key.clone(), Baseline { source: BaselineSource::Artifact, sketch: sample(600, 200, 4) });
        match b.assess(&window(sample(60, 150, 5)), &t) {
            Assessment::Compared { baseline: BaselineSource::Artifact, comparison, .. } => assert!(comparison.alert),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_recorder_keeps_versions_apart_and_bounds_them() {
        let r = Recorder::new();
        r.observe("m", "1", &obs(10, 5, -1.0));
        r.observe("m", "2", &obs(10, 5, -1.0));
        r.clone().observe("m", "1", &obs(10, 5, -1.0));
        let (windows, dropped) = r.take();
        assert_eq!(windows.iter().map(|w| (w.key.version.as_str(), w.sketch.n)).collect::<Vec<_>>(), vec![("1", 2), ("2", 1)]);
        assert_eq!(dropped, 0);
        assert!(r.take().0.is_empty(), "take starts a new window");
        for v in 0..20 {
            r.observe("m", &v.to_string(), &obs(10, 5, -1.0));
        }
        let (windows, dropped) = r.take();
        assert_eq!((windows.len(), dropped), (MAX_VERSIONS_PER_WINDOW, 20 - MAX_VERSIONS_PER_WINDOW as u64));
    }

    #[test]
    fn missing_statistics_leave_their_histograms_empty() {
        let mut s = Sketch::default();
        s.observe(&Observation::failed(12, None));
        assert_eq!(s.histogram(Feature::FinishReason).counts[3], 1);
        assert_eq!(s.histogram(Feature::MeanLogprob).n(), 0);
        assert_eq!(s.histogram(Feature::LatencyMs).n(), 0);
        assert_eq!(s.histogram(Feature::PromptTokens).n(), 1);
    }
}
