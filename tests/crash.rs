//! Crash consistency (issue 16): `edgeflow run` killed with SIGKILL at the crash points of
//! src/crash.rs while it pulls, verifies, activates and swaps in a new version, and while its
//! fleet spool is written (the broker is down, so every report goes to the spool).
//!
//! A dry run lists the points the scenario passes (`EDGEFLOW_CRASH_TRACE`); each trial starts
//! from the same state (version 1 serving, version 2 just promoted in a real MLflow server),
//! kills the daemon at the n-th pass of one point (`EDGEFLOW_CRASH_AT=point:n`), restarts it,
//! and checks:
//! - restarted with the registry out of reach, it serves what its cache holds: the old
//!   version or the new one, the one the `active` link names, whose answer carries its
//!   fingerprint;
//! - restarted with the registry back, the pull completes and the new version serves;
//! - after each run it stops cleanly, and `edgeflow cache verify` finds every recorded file
//!   with its digest, the `active` link names the version the index calls active, and no
//!   temporary file is left in the cache (after the offline run, only partial downloads with
//!   their resume state, which the next pull resumes);
//! - the spool opened as it was (not moved aside as damaged).
//!
//! `crash_points_sampled` (part of `make test`) runs 24 trials; `crash_consistency_campaign`
//! (ignored; `make crash`; `EDGEFLOW_CRASH_TRIALS`, default every pass the dry run met;
//! `EDGEFLOW_CRASH_SEED`) runs the campaign whose table RELIABILITY.md quotes. Every distinct
//! point gets a trial before the seeded sample fills the rest.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::{config, Daemon, MODEL};
use common::edgeflow;
use common::mlflow::Mlflow;
use serde_json::Value;

/// The starting state every trial copies, and the configuration that points at it.
struct Scenario {
    _mlflow: Mlflow,
    _root: tempfile::TempDir,
    /// Version 1 active, stopped cleanly; version 2 promoted since.
    golden: PathBuf,
    /// Where each trial runs (the config's paths point here).
    work: PathBuf,
    config: String,
    /// The same with the registry out of reach.
    offline_config: String,
}

impl Scenario {
    fn new() -> Scenario {
        let mlflow = Mlflow::start(&[]);
        mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa"), "pyfunc", Some("Production"), None);
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("work");
        let golden = root.path().join("golden");
        std::fs::create_dir_all(&work).unwrap();
        // Nothing listens on the broker's port: the link retries, and reports go to the spool.
        let fleet = format!(
            "[fleet]\nbroker = \"mqtt://127.0.0.1:{}\"\ndevice_id = \"crash\"\nrequire_signatures = false\nreport_interval = \"1s\"\nbackoff_initial = \"1s\"\nbackoff_max = \"2s\"\nspool_dir = \"{}\"\n",
            common::free_port(),
            work.join("spool").display()
        );
        let config = config(&mlflow.url, &work, &fleet);
        {
            let mut daemon = Daemon::start(&work, &config, None);
            daemon.wait_serving("1");
            // A few reports reach the spool first.
            std::thread::sleep(Duration::from_secs(2));
            assert!(daemon.stop().success(), "{}", daemon.log());
        }
        mlflow.log_model(MODEL, &common::fixture_model("phi3-tiny-gqa-acc1"), "pyfunc", Some("Production"), None);
        copy_dir(&work, &golden);
        let offline_config = config.replace(&mlflow.url, &format!("http://127.0.0.1:{}", common::free_port()));
        Scenario { _mlflow: mlflow, _root: root, golden, work, config, offline_config }
    }

    /// Puts the starting state back in `work`.
    fn reset(&self) {
        std::fs::remove_dir_all(&self.work).unwrap();
        copy_dir(&self.golden, &self.work);
    }

    /// The points a run from the starting state passes until it serves version 2.
    fn trace(&self) -> Vec<String> {
        self.reset();
        let trace = self.work.join("trace");
        let mut daemon = Daemon::start_env(&self.work, &self.config, None, &[("EDGEFLOW_CRASH_TRACE", trace.to_str().unwrap())]);
        daemon.wait_serving("2");
        // Retention and the reports that follow the swap.
        std::thread::sleep(Duration::from_secs(2));
        assert!(daemon.stop().success(), "{}", daemon.log());
        let points: Vec<String> = std::fs::read_to_string(&trace).unwrap().lines().map(str::to_string).collect();
        std::fs::remove_file(&trace).unwrap();
        self.check_cache(&daemon.log(), false);
        points
    }

    /// One trial: killed at the `n`-th pass of point `name`; `false` when this run passed
    /// that point fewer times and was not killed.
    fn trial(&self, (name, n): &(String, usize)) -> bool {
        self.reset();
        let trace = self.work.join("trace");
        let env = [("EDGEFLOW_CRASH_TRACE", trace.to_str().unwrap()), ("EDGEFLOW_CRASH_AT", &format!("{name}:{n}"))];
        let mut daemon = Daemon::start_env(&self.work, &self.config, None, &env);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let Some(status) = status else {
            assert!(daemon.stop().success(), "{}", daemon.log());
            return false;
        };
        use std::os::unix::process::ExitStatusExt;
        let what = format!("killed at {name} (pass {n})");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{what}: the daemon ended otherwise: {status}\n{}", daemon.log());
        let last = std::fs::read_to_string(&trace).unwrap().lines().last().map(str::to_string);
        assert_eq!(last.as_deref(), Some(name.as_str()), "{what}: the last point traced");
        std::fs::remove_file(&trace).unwrap();

        // First with the registry out of reach: what the cache holds must serve on its own.
        let mut offline = Daemon::start(&self.work, &self.offline_config, None);
        let first = offline.wait_status(|s| !s["serving"]["version"].is_null(), "serving a version");
        let version = first["serving"]["version"].as_str().unwrap_or_default().to_string();
        assert!(version == "1" || version == "2", "{what}: serves {version:?} after the restart:\n{}", offline.log());
        let link = self.active_link();
        assert!(link.starts_with(&format!("v{version}.")), "{what}: serves version {version} while the active link names {link}:\n{}", offline.log());
        let (code, fingerprint, body) = offline.chat();
        assert_eq!((code, fingerprint), (200, format!("phi-3@{version}")), "{what}: {body}\n{}", offline.log());
        // Partial downloads stay, with their resume state, for the next pull to resume.
        self.stop_and_check(offline, &what, true);

        // Then with the registry back: the pull completes.
        let mut again = Daemon::start(&self.work, &self.config, None);
        again.wait_serving("2");
        let (code, fingerprint, body) = again.chat();
        assert_eq!((code, fingerprint.as_str()), (200, "phi-3@2"), "{what}: {body}\n{}", again.log());
        self.stop_and_check(again, &what, false);
        true
    }

    /// Stops `daemon`, which must exit cleanly having moved nothing aside as damaged, and
    /// checks the cache it leaves ([`Scenario::check_cache`]).
    fn stop_and_check(&self, mut daemon: Daemon, what: &str, partials: bool) {
        assert!(daemon.stop().success(), "{what}: no clean stop:\n{}", daemon.log());
        let log = daemon.log();
        assert!(!log.contains("moved aside"), "{what}: the spool or the index was damaged:\n{log}");
        self.check_cache(&log, partials);
    }

    /// Where the model's `active` link points (a version folder's name).
    fn active_link(&self) -> String {
        let models = self.work.join("cache/models");
        let slug = std::fs::read_dir(&models).unwrap().next().unwrap().unwrap().path();
        std::fs::read_link(slug.join("active")).unwrap().to_string_lossy().into_owned()
    }

    /// The stopped daemon's cache: every recorded file verifies, the active link agrees with
    /// the index, nothing temporary is left (but partial downloads and their resume state,
    /// where `partials` allows them).
    fn check_cache(&self, log: &str, partials: bool) {
        let config_path = self.work.join("config.toml");
        let verify = Command::new(edgeflow_bin()).args(["cache", "verify", "--json", "--config"]).arg(&config_path).output().unwrap();
        let report = String::from_utf8_lossy(&verify.stdout);
        assert!(verify.status.success(), "cache verify failed: {report}{}\n{log}", String::from_utf8_lossy(&verify.stderr));
        let ls = Command::new(edgeflow_bin()).args(["cache", "ls", "--json", "--config"]).arg(&config_path).output().unwrap();
        assert!(ls.status.success(), "cache ls: {}", String::from_utf8_lossy(&ls.stderr));
        let listing: Value = serde_json::from_slice(&ls.stdout).unwrap();
        let active = active_version(&listing).unwrap_or_else(|| panic!("no active version: {listing:#}"));
        let link = self.active_link();
        assert!(link.starts_with(&format!("v{active}.")), "active link {link} but the index says version {active}: {listing:#}");
        let slug = std::fs::read_dir(self.work.join("cache/models")).unwrap().next().unwrap().unwrap().path();
        let mut leftovers = Vec::new();
        walk(&self.work.join("cache/tmp"), &mut leftovers);
        leftovers.retain(|p| !(partials && (p.to_string_lossy().ends_with(".part") || p.to_string_lossy().ends_with(".part.json"))));
        for entry in std::fs::read_dir(&slug).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if name.starts_with(".active-") {
                leftovers.push(slug.join(name));
            }
        }
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}\n{log}");
    }
}

fn edgeflow_bin() -> PathBuf {
    PathBuf::from(edgeflow().get_program())
}

/// The active version in `edgeflow cache ls --json`.
fn active_version(listing: &Value) -> Option<String> {
    let versions = listing.as_array().or_else(|| listing["versions"].as_array())?;
    versions.iter().find(|v| v["active"] == true).and_then(|v| v["version"].as_str()).map(str::to_string)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

/// The passes to kill at, as (point, pass number): every distinct point's first pass, then
/// a seeded sample of the other passes, `trials` in all, in the order the dry run met them.
fn choose(points: &[String], trials: usize, seed: u64) -> Vec<(String, usize)> {
    let mut passes: Vec<(String, usize)> = Vec::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for p in points {
        let n = seen.entry(p).or_default();
        *n += 1;
        passes.push((p.clone(), *n));
    }
    let (first, mut rest): (Vec<usize>, Vec<usize>) = (0..passes.len()).partition(|&i| passes[i].1 == 1);
    let mut rng = fastrand::Rng::with_seed(seed);
    rng.shuffle(&mut rest);
    let mut chosen: Vec<usize> = first.into_iter().take(trials).collect();
    let room = trials.saturating_sub(chosen.len());
    chosen.extend(rest.into_iter().take(room));
    chosen.sort_unstable();
    chosen.into_iter().map(|i| passes[i].clone()).collect()
}

fn campaign(trials: usize, seed: u64) {
    let scenario = Scenario::new();
    let points = scenario.trace();
    let distinct: std::collections::BTreeSet<&String> = points.iter().collect();
    eprintln!("dry run: {} points passed, {} distinct: {distinct:?}", points.len(), distinct.len());
    for want in ["cache.blob_renamed", "cache.version_published", "cache.active_link_swapped", "cache.activation_recorded", "active.loaded", "fleet.spool_flushing"] {
        assert!(distinct.contains(&want.to_string()), "the scenario never passes {want}: {distinct:?}");
    }
    let chosen = choose(&points, trials, seed);
    let mut by_point: BTreeMap<String, usize> = BTreeMap::new();
    let mut not_reached = 0;
    let started = Instant::now();
    for pass in &chosen {
        if scenario.trial(pass) {
            *by_point.entry(pass.0.clone()).or_default() += 1;
        } else {
            not_reached += 1;
        }
    }
    let survived: usize = by_point.values().sum();
    eprintln!(
        "crash consistency: {survived}/{survived} kills recovered ({} of the {} passes chosen, seed {seed}; {not_reached} runs passed their point fewer times and were not killed), {:.0} s",
        chosen.len(),
        points.len(),
        started.elapsed().as_secs_f64()
    );
    eprintln!("| crash point | kills | recovered |\n|---|---:|---:|");
    for (point, n) in &by_point {
        eprintln!("| `{point}` | {n} | {n} |");
    }
    assert!(survived * 10 >= chosen.len() * 9, "too few trials were killed where chosen: {survived} of {}", chosen.len());
}

#[test]
fn crash_points_sampled() {
    campaign(24, 16);
}

#[test]
#[ignore = "the full campaign (minutes): make crash"]
fn crash_consistency_campaign() {
    let trials = std::env::var("EDGEFLOW_CRASH_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(usize::MAX);
    let seed = std::env::var("EDGEFLOW_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(2026);
    campaign(trials, seed);
}
