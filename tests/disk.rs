//! Disk full and bad disks (reliability campaign): a whole `edgeflow run` daemon whose cache
//! lives on a small tmpfs, following a real MLflow server (through the fault proxy, which
//! slows one download down on demand), while a client chats over the socket the whole time.
//!
//! - A version larger than the free space is refused before a byte is written: the poll
//!   fails with a clear "no space left" in `/status` and the log, the version serving keeps
//!   serving, the free space does not move, and later polls try again; once the file system
//!   grows (`mount -o remount,size=`), the version activates, byte for byte.
//! - The disk fills during a download (another writer takes the space): the download fails
//!   with "the file system holding the cache is full", every partial file of that pull is
//!   removed so the space comes back, the version serving keeps serving; once the space is
//!   freed, the next poll pulls the version.
//! - The disk is completely full, so the cache index (sled) cannot write: a version from the
//!   cache cannot be activated, the daemon does not panic and keeps serving; a restart on the
//!   full disk serves what the cache holds.
//! - A blob corrupted on disk is caught at load (a restart with the registry out of reach):
//!   the damaged version is refused and the last good one serves; with no good version left,
//!   no model is served (503, never the damaged bytes); with the registry back, it is repaired.
//!
//! The tmpfs needs root (or CAP_SYS_ADMIN): the test fails, saying so, without them.
//! `cargo test --release --test disk -- --nocapture`

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::{config, Chatter, Daemon, MODEL};
use common::http::curl;
use common::mlflow::{digests, Action, Mlflow, Proxy};
use serde_json::Value;

/// A tmpfs of a given size mounted on a temp folder; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(dir.path()).output().expect("running mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs for the cache and needs root (or CAP_SYS_ADMIN) for it; `mount -t tmpfs` said: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, mib: u64) {
        let out = Command::new("mount").args(["-o", &format!("remount,size={mib}m")]).arg(self.path()).output().expect("running mount");
        assert!(out.status.success(), "remount: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Bytes free.
    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(self.path()).unwrap();
        #[allow(clippy::useless_conversion)]
        u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()))
    }

    /// Writes `filler` until the file system is full, then gives back `leave` bytes; the bytes
    /// it holds.
    fn fill(&self, filler: &Path, leave: u64) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(filler).unwrap();
        let chunk = vec![0x5au8; 64 << 10];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", filler.display()),
            }
        }
        let _ = f.flush();
        let keep = written.saturating_sub(leave);
        f.set_len(keep).unwrap();
        keep
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a daemon killed a moment ago may still hold a file there.
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// A copy of `fixture` with a file of `mib` MiB of random bytes added (downloaded with the
/// rest: the pyfunc flavor carries the whole folder).
fn padded(fixture: &Path, mib: usize, seed: u64) -> tempfile::TempDir {
    let dir = common::copy_model(fixture);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut bytes = vec![0u8; mib << 20];
    rng.fill(&mut bytes);
    std::fs::write(dir.path().join("padding.bin"), bytes).unwrap();
    dir
}

fn metric(socket: &Path, family: &str, label: &str) -> f64 {
    let r = curl(socket, &["/metrics"], None);
    r.body.lines().filter(|l| l.starts_with(family) && l.contains(label)).filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok()).sum()
}

fn partials(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache.join("tmp")).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

fn verify_cache(config: &Path) -> Value {
    let out = common::edgeflow().args(["cache", "verify", "--json", "--config"]).arg(config).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("cache verify: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "cache verify: {v:#}");
    v
}

const MIB: u64 = 1 << 20;

#[test]
fn a_full_disk_fails_the_pull_cleanly_gives_the_space_back_and_keeps_serving() {
    let fs = Tmpfs::mount(40);
    let mlflow = Mlflow::start(&[]);
    let tiny = common::fixture_model("phi3-tiny-gqa");
    let acc1 = common::fixture_model("phi3-tiny-gqa-acc1");
    // Version 1 fits in 40 MiB; versions 2 and 3 (the other fixture and 40 MiB more) do not.
    let (big2, big3) = (padded(&acc1, 40, 2), padded(&acc1, 40, 3));
    mlflow.log_model(MODEL, &tiny, "pyfunc", None, Some("champion"));
    mlflow.log_model(MODEL, big2.path(), "pyfunc", None, None);
    mlflow.log_model(MODEL, big3.path(), "pyfunc", None, None);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let proxy = rt.block_on(Proxy::start(&mlflow.url));

    let dir = tempfile::tempdir().unwrap();
    let cache = fs.path().join("cache");
    let cfg = config(&proxy.url, dir.path(), "")
        .replace("model = \"phi-3\"", "model = \"phi-3\"\nalias = \"champion\"")
        .replace(&dir.path().join("cache").display().to_string(), &cache.display().to_string());
    let config_path = dir.path().join("config.toml");
    let mut daemon = Daemon::start(dir.path(), &cfg, None);
    daemon.wait_serving("1");
    let mut chatter = Chatter::start(&daemon.socket);
    let mut figures = Vec::new();

    // 1. Too big for the free space: refused before a byte is written, polled again and again.
    let free_before = fs.free();
    rt.block_on(mlflow.set_alias(MODEL, "champion", "2"));
    let failed_before = metric(&daemon.socket, "edgeflow_registry_polls_total", "outcome=\"failed\"");
    let s =
        daemon.wait_status(|s| s["registry"]["outcome"] == "failed" && s["registry"]["detail"].as_str().is_some_and(|d| d.contains("no space left")), "failed for lack of space");
    let detail = s["registry"]["detail"].as_str().unwrap_or_default().to_string();
    assert!(detail.contains("version 2") && detail.contains("bytes free"), "{detail}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&daemon.socket, "edgeflow_registry_polls_total", "outcome=\"failed\"") < failed_before + 3.0 {
        assert!(Instant::now() < deadline, "the poller did not try again:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let free_during = fs.free();
    assert!(free_during + MIB >= free_before, "the refused pull wrote to the disk: {free_before} then {free_during} bytes free");
    assert!(partials(&cache).is_empty(), "partial files left: {:?}", partials(&cache));
    assert_eq!(daemon.status()["serving"]["version"], "1");
    assert!(daemon.log().contains("no space left for the download"), "the log says why:\n{}", daemon.log());
    figures.push(format!("| version 2 (52 MB) on 40 MiB | refused before writing: `{}` | {} → {} MiB |", short(&detail), free_before >> 20, free_during >> 20));

    // The file system grows: the next poll pulls it.
    fs.resize(140);
    let grown = Instant::now();
    daemon.wait_serving("2");
    let took = grown.elapsed();
    let active = edgeflow::cache::active_dir(&cache, MODEL).expect("an active folder");
    assert_eq!(digests(&active), digests(big2.path()), "version 2 byte for byte");
    figures.push(format!("| grown to 140 MiB | version 2 active {:.1} s later | {} MiB free |", took.as_secs_f64(), fs.free() >> 20));

    // 2. The disk fills during a download: the pull fails, its partial files go.
    proxy.add("padding.bin", Action::Throttle(4 << 20), None);
    rt.block_on(mlflow.set_alias(MODEL, "champion", "3"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let padding_part = loop {
        // The padding's partial file is the one still growing (the others finish at once).
        let growing = partials(&cache)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "part"))
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 2 * MIB && m.len() < 30 * MIB));
        if let Some(p) = growing {
            break p;
        }
        assert!(Instant::now() < deadline, "the throttled download never started:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let filler = fs.path().join("filler.bin");
    let free_at_fill = fs.free();
    let filled = fs.fill(&filler, 0);
    // What the pull's partial files hold once the disk is full: the space to come back.
    let held: u64 = partials(&cache).iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
    let s = daemon.wait_status(|s| s["registry"]["outcome"] == "failed" && s["registry"]["detail"].as_str().is_some_and(|d| d.contains("is full")), "failed on the full disk");
    let detail = s["registry"]["detail"].as_str().unwrap_or_default().to_string();
    assert_eq!(daemon.status()["serving"]["version"], "2", "version 2 keeps serving");
    // Every partial file of that pull is gone, and the space with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !partials(&cache).is_empty() {
        assert!(Instant::now() < deadline, "partial files left: {:?}", partials(&cache));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!padding_part.exists());
    let free_after = fs.free();
    assert!(free_after + MIB >= held && held > 2 * MIB, "the partial downloads' {held} bytes did not come back: {free_after} bytes free");
    assert!(daemon.log().contains("removed this pull's partial downloads"), "{}", daemon.log());
    figures.push(format!(
        "| disk filled during version 3's download ({} MiB filler) | `{}` | {} MiB free before the filler → 0 (partials held {} MiB) → {} MiB after they went |",
        filled >> 20,
        short(&detail),
        free_at_fill >> 20,
        held >> 20,
        free_after >> 20
    ));
    // Later polls fail cleanly (the space left is too small) and keep serving.
    daemon.wait_status(|s| s["registry"]["detail"].as_str().is_some_and(|d| d.contains("no space left")), "refused for lack of space");
    proxy.clear();
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    daemon.wait_serving("3");
    let active = edgeflow::cache::active_dir(&cache, MODEL).expect("an active folder");
    assert_eq!(digests(&active), digests(big3.path()), "version 3 byte for byte");
    figures.push(format!("| filler removed | version 3 active {:.1} s later | {} MiB free |", freed.elapsed().as_secs_f64(), fs.free() >> 20));

    // 3. Completely full: the index cannot write. Version 2 is in the cache, so moving the
    // alias back needs no download, only an activation (a symlink and two index records).
    let filled = fs.fill(&filler, 0);
    assert!(fs.free() < MIB, "{} bytes still free", fs.free());
    // sled appends to its log: a record that fits in a page it holds already still goes
    // through, so the activation may succeed; either way the daemon must agree with itself.
    let failed_before = metric(&daemon.socket, "edgeflow_registry_polls_total", "outcome=\"failed\"");
    rt.block_on(mlflow.set_alias(MODEL, "champion", "2"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let failed = metric(&daemon.socket, "edgeflow_registry_polls_total", "outcome=\"failed\"") - failed_before;
        if failed >= 2.0 || daemon.status()["serving"]["version"] == "2" {
            break;
        }
        assert!(Instant::now() < deadline, "neither a failed poll nor version 2 on the full disk; status {:#}\n{}", daemon.status(), daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = daemon.status();
    let serving = s["serving"]["version"].as_str().unwrap_or_default().to_string();
    let (code, fingerprint, _) = daemon.chat();
    assert_eq!((code, fingerprint), (200, format!("phi-3@{serving}")));
    let slug = std::fs::read_dir(cache.join("models")).unwrap().next().unwrap().unwrap().file_name();
    let link = std::fs::read_link(cache.join("models").join(slug).join("active")).unwrap();
    assert!(link.to_string_lossy().starts_with(&format!("v{serving}.")), "the active link names {} while version {serving} serves", link.display());
    let index_failed = daemon.log().contains("recording the activation failed");
    let what = if serving == "2" {
        "activated: the index's records fit in pages it held".to_string()
    } else {
        assert!(index_failed, "version 3 serves, but the log does not say the index could not write:\n{}", daemon.log());
        format!("index write refused (`{}`), link put back, version 3 serves", short(s["registry"]["detail"].as_str().unwrap_or_default()))
    };
    figures.push(format!("| disk completely full ({} MiB filler), alias back to version 2 (cached) | {what} | 0 MiB free |", filled >> 20));
    // Space back, no restart: the activation goes through.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    daemon.wait_serving("2");
    figures.push(format!("| filler removed | version 2 active {:.1} s later, no restart | {} MiB free |", freed.elapsed().as_secs_f64(), fs.free() >> 20));

    // A restart on a completely full disk serves what the cache holds.
    let filled = fs.fill(&filler, 0);
    let answers = chatter.stop();
    assert!(daemon.stop().success(), "no clean stop on the full disk:\n{}", daemon.log());
    let first_log = daemon.log();
    let mut daemon = Daemon::start(dir.path(), &cfg, None);
    daemon.wait_serving("2");
    let (code, fingerprint, _) = daemon.chat();
    assert_eq!((code, fingerprint.as_str()), (200, "phi-3@2"));
    figures.push(format!("| restart on a completely full disk ({} MiB filler) | serves version 2 from the cache | {} MiB free |", filled >> 20, fs.free() >> 20));
    std::fs::remove_file(&filler).unwrap();
    rt.block_on(mlflow.set_alias(MODEL, "champion", "3"));
    daemon.wait_serving("3");
    assert!(daemon.stop().success(), "{}", daemon.log());
    for log in [first_log, daemon.log()] {
        assert!(!log.contains("panicked"), "{log}");
    }
    let v = verify_cache(&config_path);
    assert_eq!(v["ok"], true, "{v:#}");

    let bad: Vec<&common::daemon::Answer> = answers.iter().filter(|a| a.status != 200 || !["phi-3@1", "phi-3@2", "phi-3@3"].contains(&a.fingerprint.as_str())).collect();
    eprintln!("chat answers while the disk filled: {} in all, {} not 200 with a version's fingerprint", answers.len(), bad.len());
    eprintln!("| step | outcome | free space |\n|---|---|---|");
    for f in &figures {
        eprintln!("{f}");
    }
    assert!(bad.is_empty() && !answers.is_empty(), "answers not 200: {:?}", &bad[..bad.len().min(5)]);
}

/// The start of an error, for the table.
fn short(detail: &str) -> String {
    detail.chars().take(160).collect()
}

/// A byte flipped in a cached blob (bit rot, a stray tool) is caught when the daemon loads the
/// version, with the registry out of reach: the damaged version is refused, and the last good
/// one serves; with none left, no model serves (503), never the damaged bytes. With the
/// registry back, the damaged files are fetched again.
#[test]
fn a_corrupt_blob_is_caught_at_load_and_never_served() {
    let mlflow = Mlflow::start(&[]);
    let tiny = common::fixture_model("phi3-tiny-gqa");
    let acc1 = common::fixture_model("phi3-tiny-gqa-acc1");
    mlflow.log_model(MODEL, &tiny, "pyfunc", Some("Production"), None);
    let dir = tempfile::tempdir().unwrap();
    let online = config(&mlflow.url, dir.path(), "");
    let offline = online.replace(&mlflow.url, &format!("http://127.0.0.1:{}", common::free_port()));
    let cache = dir.path().join("cache");
    {
        let mut daemon = Daemon::start(dir.path(), &online, None);
        daemon.wait_serving("1");
        mlflow.log_model(MODEL, &acc1, "pyfunc", Some("Production"), None);
        daemon.wait_serving("2");
        assert!(daemon.stop().success(), "{}", daemon.log());
    }
    let flip = |version: &str| {
        let models = std::fs::read_dir(cache.join("models")).unwrap().next().unwrap().unwrap().path();
        let folder =
            std::fs::read_dir(&models).unwrap().flatten().map(|e| e.path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("v{version}."))).unwrap();
        let data = std::fs::read_dir(&folder).unwrap().flatten().map(|e| e.path()).find(|p| p.to_string_lossy().ends_with(".onnx.data")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut bytes = std::fs::read(&data).unwrap();
        bytes[4096] ^= 0x10;
        std::fs::write(&data, bytes).unwrap();
    };

    // Version 2 (active) damaged: refused at load, version 1 serves.
    flip("2");
    let mut daemon = Daemon::start(dir.path(), &offline, None);
    daemon.wait_serving("1");
    let (code, fingerprint, _) = daemon.chat();
    assert_eq!((code, fingerprint.as_str()), (200, "phi-3@1"));
    assert!(daemon.stop().success(), "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("the active version is damaged"), "{log}");

    // Version 1 damaged too: nothing good is left; no model serves, and /status says why.
    flip("1");
    let mut daemon = Daemon::start(dir.path(), &offline, None);
    let s = daemon.wait_status(|s| s["registry"]["polls"].as_u64().is_some_and(|n| n >= 1), "the registry polled");
    assert!(s["serving"].is_null(), "a damaged version is served: {s:#}");
    for _ in 0..3 {
        let (code, fingerprint, body) = daemon.chat();
        assert_eq!(code, 503, "{fingerprint} {body}");
    }
    assert!(daemon.log().contains("the cached version cannot be served"), "{}", daemon.log());
    assert!(daemon.stop().success(), "{}", daemon.log());

    // With the registry back, the damaged files are fetched again and version 2 serves.
    let mut daemon = Daemon::start(dir.path(), &online, None);
    daemon.wait_serving("2");
    let (code, fingerprint, _) = daemon.chat();
    assert_eq!((code, fingerprint.as_str()), (200, "phi-3@2"));
    assert!(daemon.stop().success(), "{}", daemon.log());
    let active = edgeflow::cache::active_dir(&cache, MODEL).unwrap();
    assert_eq!(digests(&active), digests(&acc1));
}
