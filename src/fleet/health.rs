//! The numbers in a health report: the host (CPU, memory, load, disk free for the cache,
//! temperatures, uptime) from `sysinfo` and `statvfs`, and the local API's requests over the
//! last report interval from the Prometheus metrics the serving side keeps.
//!
//! Sampling reads `/proc` and `/sys`; the link runs it on a blocking thread.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use prometheus::core::Collector;
use serde::Serialize;

use crate::telemetry::Metrics;

/// Temperature sensors reported at most (the hottest ones).
const MAX_SENSORS: usize = 6;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Host {
    /// Busy share of all cores since the previous sample, in percent (0–100).
    pub cpu_pct: f64,
    pub mem_used_pct: f64,
    pub mem_available_mb: u64,
    /// 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
    pub uptime_s: u64,
    /// Free space where the cache lives (for the daemon's user), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_free_mb: Option<u64>,
    /// Degrees Celsius by sensor label; empty when the device has no sensors.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub temps_c: BTreeMap<String, f64>,
}

/// Keeps `sysinfo` state between samples (CPU usage is a difference of two readings).
pub struct HostSampler {
    sys: Option<sysinfo::System>,
    components: Option<sysinfo::Components>,
    disk_path: Option<PathBuf>,
}

impl HostSampler {
    /// `disk_path`: the folder whose filesystem's free space is reported (the cache).
    pub fn new(disk_path: Option<PathBuf>) -> HostSampler {
        let mut sys = sysinfo::System::new().map_err(|e| tracing::warn!(error = %e, "host metrics are unavailable")).ok();
        if let Some(sys) = &mut sys {
            sys.refresh_cpu_usage();
        }
        let components = sysinfo::Components::new_with_refreshed_list().ok();
        HostSampler { sys, components, disk_path }
    }

    pub fn sample(&mut self) -> Host {
        let (cpu, total, available) = match &mut self.sys {
            Some(sys) => {
                sys.refresh_cpu_usage();
                sys.refresh_memory();
                (sys.global_cpu_usage(), sys.total_memory(), sys.available_memory())
            }
            None => (0.0, 0, 0),
        };
        let load = sysinfo::System::load_average().map(|l| [round2(l.one), round2(l.five), round2(l.fifteen)]).unwrap_or_default();
        let mut temps: Vec<(String, f64)> = Vec::new();
        if let Some(c) = &mut self.components {
            c.refresh(false);
            for comp in c.iter() {
                if let Some(t) = comp.temperature().filter(|t| t.is_finite()) {
                    let label: String = comp.label().chars().filter(|c| !c.is_control()).take(32).collect();
                    temps.push((label, (f64::from(t) * 10.0).round() / 10.0));
                }
            }
        }
        temps.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut temps_c = BTreeMap::new();
        for (label, t) in temps {
            if temps_c.len() >= MAX_SENSORS {
                break;
            }
            temps_c.entry(label).or_insert(t);
        }
        Host {
            cpu_pct: (f64::from(cpu) * 10.0).round() / 10.0,
            mem_used_pct: if total == 0 { 0.0 } else { ((total.saturating_sub(available)) as f64 / total as f64 * 1000.0).round() / 10.0 },
            mem_available_mb: available >> 20,
            load,
            uptime_s: sysinfo::System::uptime().unwrap_or(0),
            disk_free_mb: self.disk_path.as_deref().and_then(disk_free_mb),
            temps_c,
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Free megabytes on the filesystem holding `path` (or its nearest existing parent).
fn disk_free_mb(path: &std::path::Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    #[allow(clippy::useless_conversion)] // the field widths differ between targets
    let bytes = u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
    Some(bytes >> 20)
}

/// Requests to the local API over one report interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Requests {
    /// Generation and model requests (`/v1/*`) since the daemon started.
    pub total: u64,
    /// ... and during this interval.
    pub window: u64,
    /// Errors during this interval (any route, including errors inside streams).
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_p95_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_p95_ms: Option<f64>,
    /// Tokens generated per second of wall time over the interval.
    pub tokens_per_s: f64,
    pub queue_depth: i64,
    pub in_progress: i64,
}

#[derive(Debug, Clone, Default)]
struct Snapshot {
    requests: u64,
    errors: u64,
    tokens: u64,
    latency: Vec<(f64, u64)>,
    ttft: Vec<(f64, u64)>,
}

/// Turns the cumulative Prometheus metrics into per-interval figures.
#[derive(Debug, Default)]
pub struct RequestWindow {
    last: Option<(Snapshot, Instant)>,
}

impl RequestWindow {
    pub fn new() -> RequestWindow {
        RequestWindow::default()
    }

    /// The figures since the previous call (since the start, the first time).
    pub fn report(&mut self, m: &Metrics) -> Requests {
        let now = Instant::now();
        let snap = snapshot(m);
        let (prev, since) = match self.last.take() {
            Some((s, t)) => (s, Some(t)),
            None => (Snapshot::default(), None),
        };
        let secs = since.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        let delta = |a: &[(f64, u64)], b: &[(f64, u64)]| -> Vec<(f64, u64)> {
            a.iter().map(|(le, c)| (*le, c.saturating_sub(b.iter().find(|(l, _)| l == le).map_or(0, |x| x.1)))).collect()
        };
        let lat = delta(&snap.latency, &prev.latency);
        let ttft = delta(&snap.ttft, &prev.ttft);
        let ms = |q: Option<f64>| q.map(|s| (s * 1e4).round() / 10.0);
        let r = Requests {
            total: snap.requests,
            window: snap.requests.saturating_sub(prev.requests),
            errors: snap.errors.saturating_sub(prev.errors),
            latency_p50_ms: ms(quantile(&lat, 0.5)),
            latency_p95_ms: ms(quantile(&lat, 0.95)),
            ttft_p50_ms: ms(quantile(&ttft, 0.5)),
            ttft_p95_ms: ms(quantile(&ttft, 0.95)),
            tokens_per_s: if secs > 0.0 { ((snap.tokens.saturating_sub(prev.tokens)) as f64 / secs * 10.0).round() / 10.0 } else { 0.0 },
            queue_depth: m.queue_depth.get(),
            in_progress: m.generations_in_progress.get(),
        };
        self.last = Some((snap, now));
        r
    }
}

fn snapshot(m: &Metrics) -> Snapshot {
    let mut s = Snapshot { tokens: m.generated_tokens.get(), ..Snapshot::default() };
    let is_api = |metric: &prometheus::proto::Metric| metric.get_label().iter().any(|l| l.name() == "route" && l.value().starts_with("/v1/"));
    for family in m.http_requests.collect() {
        s.requests += family.get_metric().iter().filter(|x| is_api(x)).map(|x| x.get_counter().get_value() as u64).sum::<u64>();
    }
    for family in m.http_errors.collect() {
        s.errors += family.get_metric().iter().map(|x| x.get_counter().get_value() as u64).sum::<u64>();
    }
    let mut latency: BTreeMap<u64, (f64, u64)> = BTreeMap::new();
    for family in m.request_duration.collect() {
        for metric in family.get_metric().iter().filter(|x| is_api(x)) {
            for b in metric.get_histogram().get_bucket() {
                let e = latency.entry(b.upper_bound().to_bits()).or_insert((b.upper_bound(), 0));
                e.1 += b.cumulative_count();
            }
        }
    }
    s.latency = latency.into_values().collect();
    s.latency.sort_by(|a, b| a.0.total_cmp(&b.0));
    for family in m.time_to_first_token.collect() {
        for metric in family.get_metric() {
            s.ttft = metric.get_histogram().get_bucket().iter().map(|b| (b.upper_bound(), b.cumulative_count())).collect();
        }
    }
    s
}

/// The `q` quantile of a cumulative histogram `[(upper bound, count <= bound)]`, linearly
/// interpolated inside its bucket, as Prometheus's `histogram_quantile` does; `None`
/// without observations. Values past the last finite bound report that bound.
pub fn quantile(cumulative: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = cumulative.last().map(|x| x.1)?;
    // Observations above the last bound are only in the sample count, not here; the
    // cumulative count of the last finite bucket is the best we have.
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut prev_bound = 0.0;
    let mut prev_count = 0u64;
    for &(bound, count) in cumulative {
        if count as f64 >= rank {
            let in_bucket = (count - prev_count) as f64;
            let frac = if in_bucket > 0.0 { (rank - prev_count as f64) / in_bucket } else { 1.0 };
            return Some(prev_bound + (bound - prev_bound) * frac.clamp(0.0, 1.0));
        }
        prev_bound = bound;
        prev_count = count;
    }
    Some(prev_bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let h = [(0.1, 0), (0.2, 50), (0.4, 100)];
        assert_eq!(quantile(&h, 0.5), Some(0.2));
        assert!((quantile(&h, 0.25).unwrap() - 0.15).abs() < 1e-9);
        assert!((quantile(&h, 0.75).unwrap() - 0.3).abs() < 1e-9);
        assert_eq!(quantile(&[(0.1, 0)], 0.5), None);
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn request_figures_cover_only_the_interval() {
        let m = Metrics::new();
        let mut w = RequestWindow::new();
        for _ in 0..10 {
            m.http_requests.with_label_values(&["/v1/chat/completions", "200"]).inc();
            m.request_duration.with_label_values(&["/v1/chat/completions"]).observe(0.3);
            m.time_to_first_token.observe(0.02);
        }
        m.http_requests.with_label_values(&["/healthz", "200"]).inc();
        m.request_duration.with_label_values(&["/healthz"]).observe(0.001);
        m.http_errors.with_label_values(&["/v1/completions", "queue_full"]).inc();
        let first = w.report(&m);
        assert_eq!((first.total, first.window, first.errors), (10, 10, 1));
        let p50 = first.latency_p50_ms.unwrap();
        assert!((250.0..=500.0).contains(&p50), "health checks are not API latency: {p50}");
        assert!(first.ttft_p95_ms.unwrap() <= 25.0);
        m.http_requests.with_label_values(&["/v1/chat/completions", "200"]).inc();
        m.request_duration.with_label_values(&["/v1/chat/completions"]).observe(2.0);
        let second = w.report(&m);
        assert_eq!((second.total, second.window, second.errors), (11, 1, 0));
        assert!(second.latency_p50_ms.unwrap() > 1000.0, "{second:?}");
        assert_eq!(second.ttft_p50_ms, None, "no first token in this interval");
    }

    #[test]
    fn the_host_sample_is_plausible() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = HostSampler::new(Some(dir.path().join("not-yet-created")));
        let h = s.sample();
        assert!((0.0..=100.0).contains(&h.cpu_pct), "{h:?}");
        assert!((0.0..=100.0).contains(&h.mem_used_pct) && h.mem_available_mb > 0, "{h:?}");
        assert!(h.uptime_s > 0);
        assert!(h.disk_free_mb.is_some(), "the nearest existing parent is measured");
        assert!(h.temps_c.len() <= MAX_SENSORS);
    }
}
