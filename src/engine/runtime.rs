//! Finding and loading the ONNX Runtime shared library.
//!
//! edgeflow uses `ort`'s `load-dynamic` feature: the library is not linked at build time
//! (ort's build-time download cannot work on build farms or devices without internet), so
//! it is located at run time, in this order:
//! 1. an explicit path (the `--ort-lib` flag or the config file),
//! 2. the `ORT_DYLIB_PATH` environment variable,
//! 3. `lib/libonnxruntime.so` next to the executable (a tarball or a build tree),
//! 4. `../lib/edgeflow/libonnxruntime.so` from the executable's folder (the .deb's layout:
//!    `/usr/bin/edgeflow` and `/usr/lib/edgeflow/libonnxruntime.so`),
//! 5. `.ort/<arch>/libonnxruntime.so` in the nearest of the executable's first four ancestor
//!    folders that has one: where `make build` (`cross/fetch-ort.sh`) puts it, so
//!    `target/release/edgeflow` and `target/<triple>/release/edgeflow` run from a source
//!    tree with no configuration,
//! 6. the system library path (`ld.so` search: `LD_LIBRARY_PATH`, `/etc/ld.so.cache`).
//!
//! Loading happens once per process; later calls return the same environment.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::EngineError;

const LIB_NAME: &str = "libonnxruntime.so";
/// How many folders above the executable's own are searched for a build tree's `.ort`.
const BUILD_TREE_DEPTH: usize = 4;

/// The loaded runtime: which file it came from and its version.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub path: String,
    pub version: String,
    env: ort::environment::Environment,
}

impl Runtime {
    pub(crate) fn environment(&self) -> &ort::environment::Environment {
        &self.env
    }
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Loads ONNX Runtime (once per process) and returns it.
///
/// # Errors
/// [`EngineError::RuntimeNotFound`] listing every place searched when no candidate exists,
/// [`EngineError::RuntimeLoad`] when a candidate exists but cannot be loaded (not a shared
/// library, wrong architecture, or an ONNX Runtime older than this build supports).
pub fn load(explicit: Option<&Path>) -> Result<&'static Runtime, EngineError> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let _guard = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = locate_and_load(explicit)?;
    Ok(RUNTIME.get_or_init(|| rt))
}

fn candidates(explicit: Option<&Path>) -> Vec<(String, Option<PathBuf>)> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(("--ort-lib / config".to_string(), Some(p.to_path_buf())));
    }
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(v) if !v.is_empty() => out.push(("ORT_DYLIB_PATH".to_string(), Some(PathBuf::from(v)))),
        _ => {}
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)) {
        out.push(("next to the executable".to_string(), Some(dir.join("lib").join(LIB_NAME))));
        if let Some(prefix) = dir.parent() {
            out.push(("packaged beside the executable".to_string(), Some(prefix.join("lib").join("edgeflow").join(LIB_NAME))));
        }
        if let Some(lib) = build_tree_lib(&dir) {
            out.push(("the source tree's .ort (make build)".to_string(), Some(lib)));
        }
    }
    out.push(("system library path".to_string(), None));
    out
}

/// `.ort/<arch>/libonnxruntime.so` in `exe_dir` or the nearest of its ancestors that has one.
/// The architecture is the one this binary was built for, so a cross-built binary in
/// `target/aarch64-unknown-linux-gnu/release/` finds `.ort/aarch64/`.
fn build_tree_lib(exe_dir: &Path) -> Option<PathBuf> {
    exe_dir.ancestors().take(BUILD_TREE_DEPTH + 1).map(|d| d.join(".ort").join(std::env::consts::ARCH).join(LIB_NAME)).find(|p| p.is_file())
}

fn locate_and_load(explicit: Option<&Path>) -> Result<Runtime, EngineError> {
    let mut tried = Vec::new();
    for (source, path) in candidates(explicit) {
        let target = match &path {
            Some(p) => {
                if !p.exists() {
                    tried.push((format!("{} [{source}]", p.display()), "no such file".to_string()));
                    continue;
                }
                p.clone()
            }
            // A bare name makes dlopen search the system library path.
            None => PathBuf::from(LIB_NAME),
        };
        let shown = match &path {
            Some(p) => p.display().to_string(),
            None => format!("{LIB_NAME} [{source}]"),
        };
        match try_load(&target) {
            Ok((env, version)) => {
                tracing::info!(path = %shown, %version, "loaded ONNX Runtime");
                return Ok(Runtime { path: shown, version, env });
            }
            // dlopen's search of the system path cannot tell "absent" from "unloadable".
            Err(message) if path.is_none() => {
                tried.push((shown, format!("not found or not loadable: {message}")));
            }
            Err(message) => return Err(EngineError::RuntimeLoad { path: shown, message }),
        }
    }
    Err(EngineError::RuntimeNotFound { tried })
}

fn try_load(path: &Path) -> Result<(ort::environment::Environment, String), String> {
    let builder = ort::init_from(path).map_err(|e| e.to_string())?;
    let env = builder.with_name("edgeflow").with_telemetry(false).build().map_err(|e| e.to_string())?;
    let version = version_of(path);
    Ok((env, version))
}

/// ONNX Runtime's own version string, via `OrtGetApiBase`.
fn version_of(path: &Path) -> String {
    // The library is already loaded by `ort`; opening it again just bumps the refcount.
    // SAFETY: `OrtGetApiBase` is a plain C function returning a static struct.
    unsafe {
        let Ok(lib) = libloading::Library::new(path) else { return "unknown".into() };
        let Ok(getter) = lib.get::<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase>(b"OrtGetApiBase") else {
            return "unknown".into();
        };
        let base = getter();
        if base.is_null() {
            return "unknown".into();
        }
        let v = ((*base).GetVersionString)();
        std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned()
    }
}

/// Threads for ONNX Runtime's intra-op pool: the cores this process may use.
///
/// `available_parallelism` honours the cgroup CPU quota and the affinity mask, so a unit
/// with `CPUQuota=200%` on an 8-core board gets 2 threads, not 8 oversubscribed ones.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_in_order_explicit_then_beside_the_executable_then_the_system() {
        let exe_dir = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
        let explicit = PathBuf::from("/opt/ort/libonnxruntime.so");
        let found = candidates(Some(&explicit));
        let mut expected = vec![("--ort-lib / config", Some(explicit.clone()))];
        // ORT_DYLIB_PATH comes second when set (the Makefile sets it for the tests).
        if let Some(v) = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
            expected.push(("ORT_DYLIB_PATH", Some(PathBuf::from(v))));
        }
        expected.push(("next to the executable", Some(exe_dir.join("lib/libonnxruntime.so"))));
        expected.push(("packaged beside the executable", Some(exe_dir.parent().unwrap().join("lib/edgeflow/libonnxruntime.so"))));
        if let Some(lib) = build_tree_lib(&exe_dir) {
            expected.push(("the source tree's .ort (make build)", Some(lib)));
        }
        expected.push(("system library path", None));
        let found: Vec<(&str, Option<PathBuf>)> = found.iter().map(|(s, p)| (s.as_str(), p.clone())).collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn the_build_trees_ort_is_found_from_the_executables_folder_or_above() {
        let tree = tempfile::tempdir().unwrap();
        let lib_dir = tree.path().join(".ort").join(std::env::consts::ARCH);
        let release = tree.path().join("target/aarch64-unknown-linux-gnu/release");
        std::fs::create_dir_all(&release).unwrap();
        assert_eq!(build_tree_lib(&release), None, "no .ort yet");
        std::fs::create_dir_all(&lib_dir).unwrap();
        std::fs::write(lib_dir.join(LIB_NAME), b"").unwrap();
        assert_eq!(build_tree_lib(&release), Some(lib_dir.join(LIB_NAME)));
        assert_eq!(build_tree_lib(&tree.path().join("target/release")), Some(lib_dir.join(LIB_NAME)));
        // Further than four folders up is not a build tree of this binary.
        let deep = tree.path().join("a/b/c/d/e");
        std::fs::create_dir_all(&deep).unwrap();
        assert_eq!(build_tree_lib(&deep), None);
    }
}
