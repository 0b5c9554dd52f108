//! The daemon's configuration file: one serde struct per subsystem, unknown keys rejected,
//! defaults in one place. `config.example.toml` documents every key and is parsed by a test.
//!
//! Today only the engine section exists; the registry, cache, serve and fleet sections join
//! it as those subsystems land.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub engine: EngineConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Path of libonnxruntime.so; unset means ORT_DYLIB_PATH, then lib/ next to the
    /// executable, then the system library path.
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads; unset means the cores available to the process.
    pub threads: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n{}", .problems.len(), .problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

impl Config {
    /// Reads, parses and validates a config file, reporting every problem with its key path.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and each offending key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { path: path.to_path_buf(), problems })
        }
    }

    /// Every problem found, each as `key.path: message`.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.engine.threads == Some(0) {
            problems.push("engine.threads: must be at least 1 (leave unset for the available cores)".to_string());
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.engine.threads, None);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported() {
        let err = toml::from_str::<Config>("[engine]\nthreds = 2\n").unwrap_err().to_string();
        assert!(err.contains("threds"), "{err}");
        let c: Config = toml::from_str("[engine]\nthreads = 0\n").unwrap();
        assert_eq!(c.validate(), vec!["engine.threads: must be at least 1 (leave unset for the available cores)".to_string()]);
    }
}
