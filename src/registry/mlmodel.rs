//! Reading a version's `MLmodel` and deciding which of its artifacts form the ONNX GenAI
//! folder the engine loads, under which local names.
//!
//! Two ways of logging Phi-3 are supported (the Phi-3 cookbook shows both):
//! - a `python_function` custom wrapper with the ONNX folder as an artifact:
//!   `flavors.python_function.artifacts.<key>.path` says where the folder sits;
//! - the `onnx` flavor: `flavors.onnx.data` is the graph (MLflow re-saves it with its
//!   weights in an external data file of a generated name, next to it), and
//!   `genai_config.json` and the tokenizer ride along in `extra_files/`.
//!
//! Anything else (e.g. a `transformers` flavor without ONNX) is refused with a message.

use std::collections::BTreeSet;
use std::path::{Component, Path};

use serde::Deserialize;

use super::client::RemoteFile;
use super::error::RegistryError;

/// Files an MLflow model folder carries for MLflow itself, never part of the ONNX folder.
const MLFLOW_FILES: [&str; 9] = [
    "MLmodel",
    "conda.yaml",
    "python_env.yaml",
    "requirements.txt",
    "constraints.txt",
    "python_model.pkl",
    "input_example.json",
    "serving_input_example.json",
    "registered_model_meta",
];

/// Where the ONNX GenAI folder is inside the model's artifacts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// pyfunc wrapper: candidate artifact folders `(key, path)`; the one holding
    /// `genai_config.json` is used.
    Pyfunc { artifacts: Vec<(String, String)> },
    /// onnx flavor: the graph file and the extra files.
    Onnx { data: String, extra_files: Vec<String> },
}

impl Layout {
    pub fn flavor(&self) -> &'static str {
        match self {
            Layout::Pyfunc { .. } => "python_function",
            Layout::Onnx { .. } => "onnx",
        }
    }
}

/// A file to fetch: where it is in the registry, and its name in the local folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// Path relative to the model's artifact root.
    pub remote: String,
    /// Path relative to the local model folder.
    pub local: String,
    pub size: u64,
}

/// Largest `MLmodel` read (MLflow writes 1-10 KiB; metadata and a signature stay far below).
pub const MAX_MLMODEL_BYTES: usize = 128 << 10;

/// Most `extra_files` of the onnx flavor, and most artifacts of a pyfunc model, read.
const MAX_LISTED: usize = 128;

// DEVNOTE: YAML aliases let a short document stand for many copies of a long value (one
// anchored list of 200k items, aliased 100k times, is 2x10^10 values from 1 MiB of text), and
// serde_norway bounds the number of aliases, not what they expand to. So nothing here is
// parsed into a `serde_norway::Value`: flavors other than the two read are skipped with
// `IgnoredAny` (which does not expand aliases), and every list read is capped at
// [`MAX_LISTED`] before its next item is parsed. What a document can expand to is then at
// most (2 + 2 x MAX_LISTED) strings of at most [`MAX_MLMODEL_BYTES`] each.

#[derive(Deserialize)]
struct MlModel {
    #[serde(default)]
    flavors: Flavors,
}

/// The two flavors edgeflow reads, and the names of the others (for the error).
#[derive(Default)]
struct Flavors {
    onnx: Option<OnnxFlavor>,
    python_function: Option<PyfuncFlavor>,
    names: Vec<String>,
}

impl<'de> Deserialize<'de> for Flavors {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Flavors;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of flavors")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Flavors, A::Error> {
                let mut flavors = Flavors::default();
                while let Some(name) = map.next_key::<String>()? {
                    if flavors.names.len() >= MAX_LISTED {
                        return Err(serde::de::Error::custom(format!("more than {MAX_LISTED} flavors")));
                    }
                    match name.as_str() {
                        "onnx" => flavors.onnx = Some(map.next_value()?),
                        "python_function" => flavors.python_function = Some(map.next_value()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                    flavors.names.push(crate::util::truncate(&name, 64).to_string());
                }
                Ok(flavors)
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct OnnxFlavor {
    data: String,
    #[serde(default)]
    extra_files: Capped<ExtraFile>,
}

#[derive(Deserialize)]
struct ExtraFile {
    path: String,
}

#[derive(Deserialize)]
struct PyfuncFlavor {
    #[serde(default)]
    artifacts: Option<CappedMap<PyfuncArtifact>>,
}

#[derive(Deserialize)]
struct PyfuncArtifact {
    path: String,
}

/// A YAML list of at most [`MAX_LISTED`] items, refused at the next one.
struct Capped<T>(Vec<T>);

/// A YAML map of at most [`MAX_LISTED`] entries, refused at the next one.
struct CappedMap<T>(Vec<(String, T)>);

impl<T> Default for Capped<T> {
    fn default() -> Self {
        Capped(Vec::new())
    }
}

fn too_many<E: serde::de::Error>() -> E {
    E::custom(format!("more than {MAX_LISTED} items"))
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Capped<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = Capped<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a list of at most {MAX_LISTED} items")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Capped<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if items.len() == MAX_LISTED {
                        return Err(too_many());
                    }
                    items.push(item);
                }
                Ok(Capped(items))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for CappedMap<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = CappedMap<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a map of at most {MAX_LISTED} entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<CappedMap<T>, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    if entries.len() == MAX_LISTED {
                        return Err(too_many());
                    }
                    entries.push(entry);
                }
                Ok(CappedMap(entries))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Parses `MLmodel` text.
///
/// # Errors
/// [`RegistryError::MlModel`] for YAML that is not an MLmodel or a path that escapes the
/// model folder; [`RegistryError::UnsupportedFlavor`] when neither supported way of
/// logging is present.
pub fn parse(text: &str, name: &str, version: &str) -> Result<Layout, RegistryError> {
    let bad = |message: String| RegistryError::MlModel { name: name.to_string(), version: version.to_string(), message };
    if text.len() > MAX_MLMODEL_BYTES {
        return Err(bad(format!("larger than {MAX_MLMODEL_BYTES} bytes")));
    }
    let m: MlModel = serde_norway::from_str(text).map_err(|e| bad(format!("not valid YAML: {e}")))?;
    if let Some(f) = m.flavors.onnx {
        check_relative(&f.data)?;
        let mut extra_files = Vec::new();
        for e in f.extra_files.0 {
            check_relative(&e.path)?;
            extra_files.push(e.path);
        }
        return Ok(Layout::Onnx { data: f.data, extra_files });
    }
    if let Some(f) = m.flavors.python_function {
        let artifacts = f.artifacts.map(|a| a.0).unwrap_or_default();
        if !artifacts.is_empty() {
            let mut list = Vec::new();
            for (key, a) in artifacts {
                check_relative(&a.path)?;
                list.push((crate::util::truncate(&key, 256).to_string(), a.path.trim_end_matches('/').to_string()));
            }
            return Ok(Layout::Pyfunc { artifacts: list });
        }
    }
    Err(RegistryError::UnsupportedFlavor { name: name.to_string(), version: version.to_string(), flavors: m.flavors.names })
}

/// Picks the files of the ONNX folder out of the whole artifact tree and names them
/// locally. `decoder_filename` is `model.decoder.filename` from `genai_config.json` (needed
/// for the onnx flavor, whose graph MLflow always names `model.onnx`).
///
/// # Errors
/// [`RegistryError::MlModel`] when the folder is not there or lacks `genai_config.json`;
/// [`RegistryError::UnsafePath`] for any path that would leave the folder.
pub fn plan(layout: &Layout, tree: &[RemoteFile], decoder_filename: Option<&str>, name: &str, version: &str) -> Result<Vec<PlannedFile>, RegistryError> {
    let bad = |message: String| RegistryError::MlModel { name: name.to_string(), version: version.to_string(), message };
    for f in tree {
        check_relative(&f.path)?;
    }
    let mut files = Vec::new();
    match layout {
        Layout::Pyfunc { artifacts } => {
            let holds_config = |dir: &str| tree.iter().any(|f| f.path == format!("{dir}/genai_config.json"));
            let Some((_, dir)) = artifacts.iter().find(|(_, dir)| holds_config(dir)) else {
                let keys: Vec<&str> = artifacts.iter().map(|(k, _)| k.as_str()).collect();
                return Err(bad(format!("none of the pyfunc artifacts [{}] is a folder holding genai_config.json", keys.join(", "))));
            };
            let prefix = format!("{dir}/");
            for f in tree {
                if let Some(local) = f.path.strip_prefix(&prefix) {
                    files.push(PlannedFile { remote: f.path.clone(), local: local.to_string(), size: f.size });
                }
            }
        }
        Layout::Onnx { data, extra_files } => {
            let size_of = |p: &str| tree.iter().find(|f| f.path == *p).map(|f| f.size);
            let Some(size) = size_of(data) else {
                return Err(bad(format!("the onnx flavor's graph `{data}` is not among the artifacts")));
            };
            let graph_name = decoder_filename.unwrap_or("model.onnx");
            check_relative(graph_name)?;
            files.push(PlannedFile { remote: data.clone(), local: graph_name.to_string(), size });
            if !extra_files.iter().any(|e| base_name(e) == "genai_config.json") {
                return Err(bad("the onnx flavor carries no genai_config.json among its extra_files (log it with extra_files=[...])".into()));
            }
            for e in extra_files {
                let Some(size) = size_of(e) else {
                    return Err(bad(format!("extra file `{e}` is not among the artifacts")));
                };
                files.push(PlannedFile { remote: e.clone(), local: base_name(e).to_string(), size });
            }
            // The external data file(s) MLflow wrote next to the graph, under generated names.
            let data_dir = parent(data);
            for f in tree {
                if parent(&f.path) == data_dir && f.path != *data && !MLFLOW_FILES.contains(&base_name(&f.path)) && !extra_files.contains(&f.path) {
                    files.push(PlannedFile { remote: f.path.clone(), local: base_name(&f.path).to_string(), size: f.size });
                }
            }
        }
    }
    let mut seen = BTreeSet::new();
    for f in &files {
        check_relative(&f.local)?;
        if !seen.insert(f.local.as_str()) {
            return Err(bad(format!("two artifacts would both become `{}` in the model folder", f.local)));
        }
    }
    if !seen.contains("genai_config.json") {
        return Err(bad("the model folder has no genai_config.json".into()));
    }
    files.sort_by(|a, b| a.local.cmp(&b.local));
    Ok(files)
}

/// `model.decoder.filename` from genai_config.json text, if present.
pub fn decoder_filename(genai_config: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(genai_config).ok()?;
    v.pointer("/model/decoder/filename")?.as_str().map(str::to_string)
}

/// Longest artifact path accepted (Linux allows 4096 bytes for a whole path).
const MAX_PATH: usize = 1024;

/// A relative path with plain components only: no `..`, no root, no empty or `.` parts, no
/// control characters (a newline would forge log lines and land in a file name), at most
/// [`MAX_PATH`] bytes.
///
/// # Errors
/// [`RegistryError::UnsafePath`] naming the path.
pub fn check_relative(path: &str) -> Result<(), RegistryError> {
    let plain = !path.is_empty()
        && path.len() <= MAX_PATH
        && !path.contains('\\')
        && !path.chars().any(char::is_control)
        && !path.split('/').any(|p| p.is_empty() || p == "." || p == "..")
        && Path::new(path).components().all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        Err(RegistryError::UnsafePath { path: path.to_string() })
    }
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PYFUNC: &str = r"
artifact_path: mlflow-artifacts:/0/models/m-1/artifacts
flavors:
  python_function:
    artifacts:
      phi3-mini-onnx:
        path: artifacts/gqa-b
        uri: /tmp/exp/gqa-b
    cloudpickle_version: 3.1.3
    loader_module: mlflow.pyfunc.model
    python_model: python_model.pkl
mlflow_version: 3.17.2
";

    const ONNX: &str = r"
flavors:
  onnx:
    code: null
    data: model.onnx
    extra_files:
    - path: extra_files/genai_config.json
    - path: extra_files/tokenizer.json
    onnx_version: 1.23.2
  python_function:
    data: model.onnx
    loader_module: mlflow.onnx
";

    fn f(path: &str, size: u64) -> RemoteFile {
        RemoteFile { path: path.into(), size }
    }

    #[test]
    fn pyfunc_folder_is_found_and_flattened() {
        let layout = parse(PYFUNC, "m", "1").unwrap();
        assert_eq!(layout, Layout::Pyfunc { artifacts: vec![("phi3-mini-onnx".into(), "artifacts/gqa-b".into())] });
        let tree =
            [f("MLmodel", 1), f("python_model.pkl", 2), f("artifacts/gqa-b/genai_config.json", 3), f("artifacts/gqa-b/model.onnx", 4), f("artifacts/gqa-b/model.onnx.data", 5)];
        let plan = plan(&layout, &tree, None, "m", "1").unwrap();
        let locals: Vec<(&str, u64)> = plan.iter().map(|p| (p.local.as_str(), p.size)).collect();
        assert_eq!(locals, vec![("genai_config.json", 3), ("model.onnx", 4), ("model.onnx.data", 5)]);
    }

    #[test]
    fn onnx_flavor_renames_the_graph_and_keeps_the_generated_data_file() {
        let layout = parse(ONNX, "m", "1").unwrap();
        let tree = [
            f("MLmodel", 1),
            f("conda.yaml", 1),
            f("requirements.txt", 1),
            f("python_env.yaml", 1),
            f("model.onnx", 10),
            f("d781f58e-e9c7-11f1-b1d6-02fc00000001.data", 99),
            f("extra_files/genai_config.json", 3),
            f("extra_files/tokenizer.json", 4),
        ];
        let plan = plan(&layout, &tree, Some("phi3.onnx"), "m", "1").unwrap();
        let locals: Vec<(&str, &str)> = plan.iter().map(|p| (p.remote.as_str(), p.local.as_str())).collect();
        assert_eq!(
            locals,
            vec![
                ("d781f58e-e9c7-11f1-b1d6-02fc00000001.data", "d781f58e-e9c7-11f1-b1d6-02fc00000001.data"),
                ("extra_files/genai_config.json", "genai_config.json"),
                ("model.onnx", "phi3.onnx"),
                ("extra_files/tokenizer.json", "tokenizer.json"),
            ]
        );
    }

    #[test]
    fn other_flavors_and_bad_paths_are_refused() {
        let err = parse("flavors:\n  transformers:\n    task: text-generation\n", "m", "3").unwrap_err();
        assert!(matches!(&err, RegistryError::UnsupportedFlavor { flavors, .. } if flavors == &["transformers"]), "{err}");
        assert!(err.to_string().contains("transformers"));
        let err = parse("flavors:\n  python_function:\n    loader_module: x\n", "m", "3").unwrap_err();
        assert!(matches!(err, RegistryError::UnsupportedFlavor { .. }));
        let err = parse("flavors:\n  python_function:\n    artifacts:\n      k:\n        path: ../../etc\n", "m", "3").unwrap_err();
        assert!(matches!(err, RegistryError::UnsafePath { .. }), "{err}");
        let err = parse("flavors:\n  onnx:\n    data: /etc/passwd\n", "m", "3").unwrap_err();
        assert!(matches!(err, RegistryError::UnsafePath { .. }), "{err}");
        assert!(matches!(parse(": : :", "m", "3"), Err(RegistryError::MlModel { .. })));
        let layout = parse(ONNX, "m", "1").unwrap();
        let err = plan(&layout, &[f("model.onnx", 1)], Some("../x.onnx"), "m", "1").unwrap_err();
        assert!(matches!(err, RegistryError::UnsafePath { .. }), "{err}");
        let err = plan(&layout, &[f("model.onnx", 1), f("../evil", 1)], None, "m", "1").unwrap_err();
        assert!(matches!(err, RegistryError::UnsafePath { .. }), "{err}");
    }

    /// YAML aliases cannot make a small MLmodel expand without bound: another flavor's
    /// aliases are skipped unexpanded, a list of the read flavors is capped, and so is the size.
    #[test]
    fn an_alias_bomb_is_refused_quickly_and_small() {
        let items = vec!["1"; 2000].join(",");
        let aliases = vec!["*a"; 2000].join(",");
        // 4 million values if expanded: skipped as another flavor, listed by name.
        let elsewhere = format!("x: &a [{items}]\nflavors:\n  bomb: [{aliases}]\n");
        let started = std::time::Instant::now();
        let err = parse(&elsewhere, "m", "3").unwrap_err();
        assert!(matches!(&err, RegistryError::UnsupportedFlavor { flavors, .. } if flavors == &["bomb"]), "{err}");
        // Inside the onnx flavor: the list stops at its cap.
        let long = "x".repeat(500);
        let inside = format!("f: &f {{path: {long}}}\nflavors:\n  onnx:\n    data: model.onnx\n    extra_files: [{}]\n", vec!["*f"; 1000].join(","));
        let err = parse(&inside, "m", "3").unwrap_err();
        assert!(err.to_string().contains(&format!("more than {MAX_LISTED} items")), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "took {:?}", started.elapsed());
        let huge = format!("flavors: {{}}\n# {}\n", "x".repeat(MAX_MLMODEL_BYTES));
        assert!(parse(&huge, "m", "3").unwrap_err().to_string().contains("larger than"));
    }

    #[test]
    fn relative_path_check() {
        for good in ["a", "a/b", "model.onnx.data", "..x"] {
            assert!(check_relative(good).is_ok(), "{good}");
        }
        for bad in ["", "/abs", "a/../b", "..", "./a", "a//b", "a/", "a\\b"] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decoder_filename_is_read_from_genai_config() {
        assert_eq!(decoder_filename(r#"{"model":{"decoder":{"filename":"x.onnx"}}}"#).as_deref(), Some("x.onnx"));
        assert_eq!(decoder_filename("{}"), None);
        assert_eq!(decoder_filename("not json"), None);
    }
}
