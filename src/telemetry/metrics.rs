//! The Prometheus metrics of the local API and the engine workers behind it.
//!
//! One [`Metrics`] value per process, shared by `Arc`: the HTTP layer counts requests, the
//! engine workers count tokens as they are generated (so a scrape during a long stream
//! shows progress, and a disconnected client shows the counter stopping), the model
//! manager publishes which version is active, and the registry client and poller say how
//! the registry answers ([`RegistryMetrics`]: every exchange by result, the retries and the
//! backoff they wait, every poll by outcome, the last poll that succeeded).

use std::time::Duration;

use prometheus::{Counter, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// Seconds; from a fast health check to a long generation.
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
const TTFT_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route and HTTP status.
    pub http_requests: IntCounterVec,
    /// Requests that ended in an error, by route and OpenAI error code (including errors
    /// reported inside an already-started stream).
    pub http_errors: IntCounterVec,
    /// Connections open on the API's listeners.
    pub http_connections: IntGauge,
    /// Connections refused and closed: 503 when `serve.max_connections` were open, 429 when
    /// the peer's uid held `serve.max_connections_per_uid`.
    pub http_connections_refused: IntCounter,
    /// From the request's arrival to the last byte of its response, by route.
    pub request_duration: HistogramVec,
    /// From a generation request's arrival to its first generated text.
    pub time_to_first_token: Histogram,
    pub prompt_tokens: IntCounter,
    /// Incremented while generating, not only when a request completes.
    pub generated_tokens: IntCounter,
    /// Jobs admitted and waiting for an engine worker.
    pub queue_depth: IntGauge,
    pub generations_in_progress: IntGauge,
    /// Generations stopped early: client gone, timeout or shutdown.
    pub generations_cancelled: IntCounter,
    /// Generations that reused an earlier request's prefix (its keys and values).
    pub prefix_hits: IntCounter,
    /// Prompt tokens reused rather than computed.
    pub prefix_reused_tokens: IntCounter,
    /// Bytes held by prefix snapshots (within `engine.prefix_cache`).
    pub prefix_cache_bytes: IntGauge,
    /// Decode passes, and the sequences they advanced: their ratio is the mean batch size.
    pub decode_steps: IntCounter,
    pub decode_step_sequences: IntCounter,
    /// 1 for the version serving new requests, labelled with its identity.
    pub active_model: IntGaugeVec,
    /// Activations by result (`ok`, `failed`).
    pub model_swaps: IntCounterVec,
    /// Loaded models, including ones still draining after a swap.
    pub models_loaded: IntGauge,
    /// The registry's side: handed to the registry client, which feeds it.
    pub registry_metrics: RegistryMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("edgeflow".into()), None).expect("a constant, valid namespace");
        // DEVNOTE: every name, label set and bucket list below is a constant; registration can
        // only fail on a programming error (a duplicate name), which the unit tests catch.
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone())).expect("unique metric names");
            c
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| reg(&registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"));
        let counter = |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).expect("valid metric"));
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).expect("valid metric"));
        let http_requests = counter_vec("http_requests_total", "HTTP requests answered, by route and status.", &["route", "status"]);
        let http_errors = counter_vec("http_request_errors_total", "Requests that ended in an error, by route and error code.", &["route", "code"]);
        let http_connections = gauge("http_connections", "Connections open on the API's listeners.");
        let http_connections_refused =
            counter("http_connections_refused_total", "Connections refused: 503 when serve.max_connections were open, 429 when the peer's uid held serve.max_connections_per_uid.");
        let request_duration = reg(
            &registry,
            HistogramVec::new(
                HistogramOpts::new("request_duration_seconds", "From request arrival to the last byte of the response.").buckets(LATENCY_BUCKETS.to_vec()),
                &["route"],
            )
            .expect("valid metric"),
        );
        let time_to_first_token = reg(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new("time_to_first_token_seconds", "From a generation request's arrival to its first generated text.").buckets(TTFT_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
        );
        let prompt_tokens = counter("prompt_tokens_total", "Prompt tokens of admitted generations.");
        let generated_tokens = counter("generated_tokens_total", "Tokens generated, counted as they are produced.");
        let queue_depth = gauge("queue_depth", "Generation jobs admitted and waiting for an engine worker.");
        let generations_in_progress = gauge("generations_in_progress", "Generations running on engine workers.");
        let generations_cancelled = counter("generations_cancelled_total", "Generations stopped early (client gone, timeout, shutdown).");
        let prefix_hits = counter("prefix_cache_hits_total", "Generations that reused the keys and values of a prompt prefix an earlier request ran.");
        let prefix_reused_tokens = counter("prefix_reused_tokens_total", "Prompt tokens reused from an earlier request rather than computed.");
        let prefix_cache_bytes = gauge("prefix_cache_bytes", "Bytes held by prefix snapshots (at most engine.prefix_cache).");
        let decode_steps = counter("decode_steps_total", "Decode passes over the running generations (one token each).");
        let decode_step_sequences = counter("decode_step_sequences_total", "Generations advanced by decode passes; over decode_steps_total, the mean batch size.");
        let active_model = reg(
            &registry,
            IntGaugeVec::new(Opts::new("active_model_info", "1 for the model version serving new requests."), &["name", "version", "digest"]).expect("valid metric"),
        );
        let model_swaps = counter_vec("model_activations_total", "Model activations, by result.", &["result"]);
        let models_loaded = gauge("models_loaded", "Models held in memory, including ones draining after a swap.");
        let registry_metrics = RegistryMetrics::new();
        registry_metrics.register(&registry);
        Metrics {
            registry,
            http_requests,
            http_errors,
            http_connections,
            http_connections_refused,
            request_duration,
            time_to_first_token,
            prompt_tokens,
            generated_tokens,
            queue_depth,
            generations_in_progress,
            generations_cancelled,
            prefix_hits,
            prefix_reused_tokens,
            prefix_cache_bytes,
            decode_steps,
            decode_step_sequences,
            active_model,
            model_swaps,
            models_loaded,
            registry_metrics,
        }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Marks `(name, version, digest)` as the active model, clearing the previous one.
    pub fn set_active_model(&self, name: &str, version: &str, digest: &str) {
        self.active_model.reset();
        self.active_model.with_label_values(&[name, version, digest]).set(1);
    }

    pub fn clear_active_model(&self) {
        self.active_model.reset();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the registry client and the poller count. Cheap to clone (the handles are shared);
/// [`RegistryMetrics::new`] makes a set no `/metrics` shows (the CLI's pulls, tests), and
/// [`Metrics::new`] registers its own set, `Metrics::registry_metrics`, for the daemon to hand
/// to its registry client.
#[derive(Clone)]
pub struct RegistryMetrics {
    /// HTTP exchanges with the registry, by kind (`api`: JSON and small text answers,
    /// `download`: model files) and result (`ok`, or how it failed: see [`RegistryMetrics::request`]).
    requests: IntCounterVec,
    /// Failed exchanges retried after a backoff delay, by kind.
    retries: IntCounterVec,
    /// The backoff delay chosen before the latest retry, while exchanges keep failing; 0 once
    /// one succeeds.
    backoff: Gauge,
    /// Seconds spent waiting in backoff, in all.
    backoff_waited: Counter,
    /// Polls by outcome (the names `/status` uses).
    polls: IntCounterVec,
    /// Unix seconds of the last poll that succeeded (the registry answered it).
    last_success: IntGauge,
    /// Polls that failed since the last one that succeeded.
    failed_in_a_row: IntGauge,
}

impl RegistryMetrics {
    pub fn new() -> Self {
        // DEVNOTE: constant names and labels; creation only fails on a programming error,
        // which the unit tests catch.
        let counter_vec = |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        RegistryMetrics {
            requests: counter_vec("registry_requests_total", "HTTP exchanges with the registry, by kind (api, download) and result.", &["kind", "result"]),
            retries: counter_vec("registry_retries_total", "Failed registry exchanges retried after a backoff delay, by kind.", &["kind"]),
            backoff: Gauge::new("registry_backoff_seconds", "Backoff delay before the latest retry while registry exchanges keep failing; 0 once one succeeds.")
                .expect("valid metric"),
            backoff_waited: Counter::new("registry_backoff_waited_seconds_total", "Seconds spent waiting between retries of registry exchanges.").expect("valid metric"),
            polls: counter_vec("registry_polls_total", "Registry polls by outcome (as /status names them).", &["outcome"]),
            last_success: IntGauge::new("registry_last_success_timestamp_seconds", "Unix time of the last registry poll that succeeded (0: none yet).").expect("valid metric"),
            failed_in_a_row: IntGauge::new("registry_consecutive_failed_polls", "Registry polls failed since the last one that succeeded.").expect("valid metric"),
        }
    }

    fn register(&self, r: &Registry) {
        let collectors: [Box<dyn prometheus::core::Collector>; 7] = [
            Box::new(self.requests.clone()),
            Box::new(self.retries.clone()),
            Box::new(self.backoff.clone()),
            Box::new(self.backoff_waited.clone()),
            Box::new(self.polls.clone()),
            Box::new(self.last_success.clone()),
            Box::new(self.failed_in_a_row.clone()),
        ];
        for c in collectors {
            r.register(c).expect("unique metric names");
        }
    }

    /// Counts one exchange of `kind` (`api`, `download`) that ended with `result`: `ok`, or
    /// `connect`, `timeout`, `transport` (reset, cut or unreadable answer), `http_4xx`,
    /// `http_5xx`, `too_large`, `bad_answer` (not what was asked for), `truncated`,
    /// `stalled` (a trickle below the minimum rate), `range_refused`, `local_error` (the
    /// disk, not the registry). A success ends the backoff.
    pub fn request(&self, kind: &str, result: &str) {
        self.requests.with_label_values(&[kind, result]).inc();
        if result == "ok" {
            self.backoff.set(0.0);
        }
    }

    /// Exchanges of `kind` (`api`, `download`) counted so far, whatever their result.
    pub fn requests_of(&self, kind: &str) -> u64 {
        use prometheus::core::Collector;
        let of_kind = |m: &&prometheus::proto::Metric| m.get_label().iter().any(|l| l.name() == "kind" && l.value() == kind);
        self.requests.collect().iter().flat_map(|f| f.get_metric().iter().filter(of_kind).map(|m| m.get_counter().get_value() as u64)).sum()
    }

    /// A failed exchange of `kind` is retried after `delay`.
    pub fn retrying(&self, kind: &str, delay: Duration) {
        self.retries.with_label_values(&[kind]).inc();
        self.backoff.set(delay.as_secs_f64());
        self.backoff_waited.inc_by(delay.as_secs_f64());
    }

    /// Counts a poll that ended with `outcome`; `succeeded` when the registry answered it.
    pub fn poll(&self, outcome: &str, succeeded: bool, now: u64) {
        self.polls.with_label_values(&[outcome]).inc();
        if succeeded {
            self.last_success.set(i64::try_from(now).unwrap_or(i64::MAX));
            self.failed_in_a_row.set(0);
        } else {
            self.failed_in_a_row.inc();
        }
    }
}

impl Default for RegistryMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `Content-Type` of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_the_namespace() {
        let m = Metrics::new();
        m.http_requests.with_label_values(&["/v1/models", "200"]).inc();
        m.http_errors.with_label_values(&["/v1/completions", "queue_full"]).inc();
        m.request_duration.with_label_values(&["/v1/models"]).observe(0.002);
        m.set_active_model("tiny", "3", "sha256:ab");
        m.model_swaps.with_label_values(&["ok"]).inc();
        m.generated_tokens.inc_by(5);
        let text = m.render();
        for family in [
            "edgeflow_http_requests_total",
            "edgeflow_http_request_errors_total",
            "edgeflow_request_duration_seconds_bucket",
            "edgeflow_time_to_first_token_seconds_count",
            "edgeflow_generated_tokens_total 5",
            "edgeflow_queue_depth 0",
            "edgeflow_active_model_info{digest=\"sha256:ab\",name=\"tiny\",version=\"3\"} 1",
            "edgeflow_model_activations_total{result=\"ok\"} 1",
        ] {
            assert!(text.contains(family), "missing {family} in:\n{text}");
        }
    }

    #[test]
    fn registry_backoff_rises_with_retries_and_falls_with_a_success() {
        let m = Metrics::new();
        let r = m.registry_metrics.clone();
        r.request("api", "http_5xx");
        r.retrying("api", Duration::from_millis(1500));
        r.poll("unreachable", false, 10);
        r.poll("unreachable", false, 20);
        let text = m.render();
        for line in [
            "edgeflow_registry_requests_total{kind=\"api\",result=\"http_5xx\"} 1",
            "edgeflow_registry_retries_total{kind=\"api\"} 1",
            "edgeflow_registry_backoff_seconds 1.5",
            "edgeflow_registry_backoff_waited_seconds_total 1.5",
            "edgeflow_registry_polls_total{outcome=\"unreachable\"} 2",
            "edgeflow_registry_consecutive_failed_polls 2",
            "edgeflow_registry_last_success_timestamp_seconds 0",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
        r.request("download", "ok");
        r.request("api", "ok");
        assert_eq!((r.requests_of("api"), r.requests_of("download"), r.requests_of("other")), (2, 1, 0));
        r.poll("updated", true, 30);
        let text = m.render();
        for line in ["edgeflow_registry_backoff_seconds 0", "edgeflow_registry_consecutive_failed_polls 0", "edgeflow_registry_last_success_timestamp_seconds 30"] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
    }

    #[test]
    fn a_new_active_model_replaces_the_old_label_set() {
        let m = Metrics::new();
        m.set_active_model("tiny", "1", "");
        m.set_active_model("tiny", "2", "");
        let text = m.render();
        assert!(text.contains("version=\"2\"} 1") && !text.contains("version=\"1\""), "{text}");
    }
}
