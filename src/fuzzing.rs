//! Entry points for the fuzz targets in `fuzz/`, compiled only with `--cfg fuzzing` (which
//! `cargo fuzz` sets) and hidden from the docs: the parsers and checks the daemon runs on
//! untrusted bytes that are not public API, each a call into the code the daemon runs, never a
//! copy of it. The targets call the public ones (`serve::openai::Request`,
//! `fleet::commands::open`, `command::Command::parse`, `registry::mlmodel`,
//! `engine::template::Template`) directly.

use std::path::Path;

use crate::config::{Config, ConfigError};
use crate::engine::template::Spec;
use crate::engine::tokenizer::TokenizerConfig;
use crate::engine::{EngineError, GenaiConfig};

/// `genai_config.json` text, parsed and checked as [`GenaiConfig::load`] does.
///
/// # Errors
/// As [`GenaiConfig::load`].
pub fn genai_config(text: &[u8]) -> Result<GenaiConfig, EngineError> {
    GenaiConfig::parse(text, Path::new(crate::engine::GENAI_CONFIG))
}

/// The chat template and special tokens `tokenizer_config.json` text gives the engine, as
/// [`crate::engine::Tokenizer::load`] reads them.
///
/// # Errors
/// [`EngineError::Tokenizer`] when the text is not JSON of the expected shape.
pub fn chat_template_spec(text: &[u8]) -> Result<Spec, EngineError> {
    TokenizerConfig::parse(text, Path::new("tokenizer_config.json")).map(TokenizerConfig::into_spec)
}

/// The daemon's config file text, parsed and checked as `edgeflow run` checks it.
///
/// # Errors
/// As [`Config::load_for_daemon`].
pub fn daemon_config(text: &str) -> Result<Config, ConfigError> {
    Config::parse_checked(text, Path::new("config.toml"), Config::daemon_problems)
}

/// The decoder graph rewrite the engine makes before loading a model.
///
/// # Errors
/// The message of a malformed ModelProto.
pub fn last_position_logits(model: &[u8], logits: &str) -> Result<Option<Vec<u8>>, String> {
    crate::engine::graph::last_position_logits(model, logits).map_err(|e| e.to_string())
}

/// The bytes a fleet command's signature covers (see [`crate::fleet::commands`]).
pub fn signing_input(device_id: &str, name: &str, signed: &str) -> String {
    crate::fleet::commands::signing_input(device_id, name, signed)
}

/// The MLflow REST answers the registry client reads, decoded and checked as it does.
pub mod registry {
    use crate::registry::client::{self, DownloadUri, LatestVersions, Listed, Listing, OneVersion};
    use crate::registry::{ModelVersion, RegistryError, RemoteFile};

    const URL: &str = "fuzz";

    /// `registered-models/get-latest-versions`: the newest version of `name` in `stage`.
    ///
    /// # Errors
    /// [`RegistryError::Decode`].
    pub fn latest_in_stage(body: &[u8], name: &str, stage: &str) -> Result<Option<ModelVersion>, RegistryError> {
        client::decode::<LatestVersions>(body, URL)?.newest(name, stage)
    }

    /// `registered-models/alias` and `model-versions/get`: a version of `name`.
    ///
    /// # Errors
    /// [`RegistryError::Decode`].
    pub fn model_version(body: &[u8], name: &str) -> Result<ModelVersion, RegistryError> {
        client::decode::<OneVersion>(body, URL)?.model_version.checked(name)
    }

    /// `model-versions/get-download-uri`: the artifact-proxy path, if the artifacts are
    /// served by the tracking server.
    ///
    /// # Errors
    /// [`RegistryError::Decode`].
    pub fn artifact_root(body: &[u8]) -> Result<Option<String>, RegistryError> {
        Ok(crate::registry::proxy_path(&client::decode::<DownloadUri>(body, URL)?.artifact_uri))
    }

    /// One level of the artifact tree, the listing of `full` (the folder `dir` under the
    /// root): its files and its folders.
    ///
    /// # Errors
    /// [`RegistryError::Decode`], [`RegistryError::UnsafePath`].
    pub fn listing(body: &[u8], full: &str, dir: &str) -> Result<(Vec<RemoteFile>, Vec<String>), RegistryError> {
        let (mut files, mut dirs) = (Vec::new(), Vec::new());
        for e in client::decode::<Listing>(body, full)?.files {
            match Listed::of(full, dir, e)? {
                Listed::Dir(d) => dirs.push(d),
                Listed::File(f) => files.push(f),
            }
        }
        Ok((files, dirs))
    }

    /// `(error_code, message)` of an error answer.
    pub fn error_body(body: &[u8]) -> (Option<String>, String) {
        client::parse_error_body(body)
    }
}
