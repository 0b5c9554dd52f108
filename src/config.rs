//! The daemon's configuration file: one serde struct per subsystem, unknown keys rejected,
//! defaults in one place. `config.example.toml` documents every key and is parsed by a test.
//!
//! Sections: `[engine]`, `[registry]`, `[cache]`, `[serve]` and `[fleet]`, each defined beside
//! the subsystem it configures (`engine::settings`, `registry::settings`, ...), which types and
//! checks it. Values that need parsing (durations, sizes) stay strings in the file's structs and
//! are typed by each section's `resolve`, so `validate` reports every bad value at once.

use std::path::{Path, PathBuf};

use serde::Deserialize;

// Each section lives with the subsystem it configures, which owns its type and its check;
// re-exported so every section is reachable here. Nothing below imports this module.
pub use crate::cache::settings::{CacheConfig, CacheSettings};
pub use crate::engine::settings::EngineConfig;
pub use crate::fleet::settings::{FleetConfig, FleetSettings};
pub use crate::registry::settings::{RegistryConfig, RegistrySettings, Target};
pub use crate::serve::settings::{ServeConfig, ServeSettings};
pub use crate::util::{duration, parse_size};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub registry: RegistryConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub serve: ServeConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
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
    /// How the engine loads models for the API: `[engine]`'s options, the KV cache sized for
    /// the longest request `[serve]` admits.
    #[must_use]
    pub fn load_options(&self) -> crate::engine::LoadOptions {
        self.engine.load_options(self.serve.max_prompt_tokens.map(|p| p + self.serve.max_tokens))
    }

    /// Reads, parses and validates a config file, reporting every problem with its key path.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and each offending key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_checked(path, Config::validate)
    }

    /// As [`Config::load`], with the daemon's requirements ([`Config::daemon_problems`]).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_for_daemon(path: &Path) -> Result<Self, ConfigError> {
        Self::load_checked(path, Config::daemon_problems)
    }

    fn load_checked(path: &Path, check: fn(&Config) -> Vec<String>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse_checked(&text, path, check)
    }

    /// Parses the text of a config file and runs `check` on it; `path` names it in errors.
    pub(crate) fn parse_checked(text: &str, path: &Path, check: fn(&Config) -> Vec<String>) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        let problems = check(&config);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { path: path.to_path_buf(), problems })
        }
    }

    /// Every problem `edgeflow run` would have with this config: [`Config::validate`]'s,
    /// and the keys the daemon cannot do without.
    pub fn daemon_problems(&self) -> Vec<String> {
        let mut problems = self.validate();
        if self.registry.url.is_none() {
            problems.push("registry.url: required by `edgeflow run` (the MLflow server to follow)".to_string());
        }
        if self.registry.model.is_none() {
            problems.push("registry.model: required by `edgeflow run` (the registered model to serve)".to_string());
        }
        problems
    }

    /// Every problem found, each as `key.path: message`.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = self.engine.problems();
        if let Err(p) = self.registry.resolve() {
            problems.extend(p);
        }
        if let Err(p) = self.cache.resolve() {
            problems.extend(p);
        }
        if let Err(p) = self.serve.resolve() {
            problems.extend(p);
        }
        problems.extend(self.fleet.problems());
        problems
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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

    #[test]
    fn the_example_shows_the_registry_and_cache_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let example = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let defaults = Config::default();
        assert_eq!(format!("{:?}", example.registry), format!("{:?}", defaults.registry));
        assert_eq!(format!("{:?}", example.cache), format!("{:?}", defaults.cache));
    }

    #[test]
    fn registry_and_cache_defaults_resolve() {
        let c: Config = toml::from_str("").unwrap();
        let r = c.registry.resolve().unwrap();
        assert_eq!(r.target, Target::Stage("Production".into()));
        assert_eq!(r.poll_interval, Duration::from_secs(300));
        assert_eq!(r.backoff.max_attempts, 5);
        assert_eq!(r.bandwidth_limit, None);
        let cache = c.cache.resolve().unwrap();
        assert_eq!(cache.keep_versions, 2);
        assert_eq!(cache.partial_max_age, Duration::from_secs(7 * 86400));
    }

    #[test]
    fn every_registry_and_cache_problem_is_reported() {
        let text = r#"
[registry]
url = "ftp://x"
stage = "Production"
alias = "champion"
connect_timeout = "soon"
poll_interval = "0s"
poll_jitter = 1.5
parallel_downloads = 0
bandwidth_limit = "fast"
attempts = 0
[cache]
keep_versions = 0
pinned = ["nover", "m@3"]
quota = "lots"
smoke_test_tokens = 0
"#;
        let c: Config = toml::from_str(text).unwrap();
        let problems = c.validate();
        for key in [
            "registry.url",
            "registry.stage, registry.alias",
            "registry.connect_timeout",
            "registry.poll_interval",
            "registry.poll_jitter",
            "registry.parallel_downloads",
            "registry.bandwidth_limit",
            "registry.attempts",
            "cache.keep_versions",
            "cache.pinned[0]",
            "cache.quota",
            "cache.smoke_test_tokens",
        ] {
            assert!(problems.iter().any(|p| p.starts_with(&format!("{key}:"))), "{key} not reported in {problems:#?}");
        }
        assert_eq!(problems.len(), 12, "{problems:#?}");
        let err = toml::from_str::<Config>("[registry]\nmodle = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("modle"), "{err}");
    }

    #[test]
    fn sizes_and_rates_parse() {
        let table = [("1024", 1024), ("512k", 512_000), ("2MiB", 2 * 1024 * 1024), ("1.5GB", 1_500_000_000), ("20GiB", 20 << 30)];
        for (s, want) in table {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
        assert!(parse_size("ten").is_err());
        assert!(parse_size("3 parsecs").is_err());
        let c: Config = toml::from_str("[registry]\nalias = \"champion\"\nbandwidth_limit = \"2MiB/s\"\n").unwrap();
        let r = c.registry.resolve().unwrap();
        assert_eq!(r.bandwidth_limit, Some(2 * 1024 * 1024));
        assert_eq!(r.target, Target::Alias("champion".into()));
    }

    #[test]
    fn serve_defaults_resolve() {
        let c: Config = toml::from_str("").unwrap();
        let s = c.serve.resolve().unwrap();
        assert_eq!(s.socket.mode, 0o660);
        assert_eq!((s.queue_depth, s.max_body_bytes, s.max_tokens), (8, 1 << 20, 1024));
        assert_eq!(s.request_timeout, Duration::from_secs(300));
        assert_eq!(s.tcp_listen, None, "TCP is off by default");
        assert_eq!(s.swap, crate::active::SwapMode::Overlap);
        assert_eq!(crate::serve::Limits::from(&s), crate::serve::Limits::default(), "the API's default limits are the [serve] defaults");
        let c: Config = toml::from_str("[serve]\nsocket = \"/tmp/x.sock\"\nsocket_group = \"edgeflow\"\nswap = \"stop-the-world\"\nsocket_mode = 0o600\n").unwrap();
        let s = c.serve.resolve().unwrap();
        assert_eq!(s.socket.group, Some(crate::serve::GroupSpec::Name("edgeflow".into())));
        assert_eq!(s.swap, crate::active::SwapMode::StopTheWorld);
        let c: Config = toml::from_str("[serve]\nsocket_group = 990\n").unwrap();
        assert_eq!(c.serve.socket_group, Some(crate::serve::GroupSpec::Id(990)));
        let c: Config = toml::from_str("[serve]\nstream_interval = \"0ms\"\nmax_connections = 2\nheader_timeout = \"1s\"\n").unwrap();
        let s = c.serve.resolve().unwrap();
        assert_eq!((s.stream_interval, s.max_connections, s.header_timeout), (Duration::ZERO, 2, Duration::from_secs(1)));
    }

    #[test]
    fn every_serve_problem_is_reported() {
        let text = r#"
[serve]
socket_mode = 0o1777
token_env = "EDGEFLOW_TEST_SURELY_UNSET_TOKEN"
tcp_listen = "0.0.0.0:8080"
queue_depth = 0
max_body = "12"
max_prompt_tokens = 0
max_tokens = 0
request_timeout = "forever"
shutdown_grace = "0s"
max_connections = 0
max_connections_per_uid = 0
header_timeout = "soon"
stream_interval = "2s"
"#;
        let c: Config = toml::from_str(text).unwrap();
        let problems = c.validate();
        for key in [
            "serve.socket_mode",
            "serve.token_env",
            "serve.tcp_listen",
            "serve.queue_depth",
            "serve.max_body",
            "serve.max_prompt_tokens",
            "serve.max_tokens",
            "serve.request_timeout",
            "serve.shutdown_grace",
            "serve.max_connections",
            "serve.max_connections_per_uid",
            "serve.header_timeout",
            "serve.stream_interval",
        ] {
            assert!(problems.iter().any(|p| p.starts_with(&format!("{key}:"))), "{key} not reported in {problems:#?}");
        }
        assert_eq!(problems.len(), 13, "{problems:#?}");
        let c: Config = toml::from_str("[serve]\ntcp_listen = \"127.0.0.1:8080\"\nallowed_uids = [1000]\n").unwrap();
        assert!(c.validate().iter().any(|p| p.contains("needs serve.token_env")));
        let err = toml::from_str::<Config>("[serve]\nswap = \"sometimes\"\n").unwrap_err().to_string();
        assert!(err.contains("sometimes") || err.contains("swap"), "{err}");
        let err = toml::from_str::<Config>("[serve]\nqueue_dept = 3\n").unwrap_err().to_string();
        assert!(err.contains("queue_dept"), "{err}");
    }
}
