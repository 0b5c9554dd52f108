//! An `MLmodel` file from the registry: parsed into a layout, then planned against an artifact
//! tree holding every file it names. Every planned local name must stay inside the model folder.
#![no_main]

use std::path::{Component, Path};

use edgeflow::registry::mlmodel::{self, Layout};
use edgeflow::registry::RemoteFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(layout) = mlmodel::parse(text, "m", "1") else { return };
    let mut paths: Vec<String> = match &layout {
        Layout::Pyfunc { artifacts } => artifacts.iter().flat_map(|(_, dir)| [format!("{dir}/genai_config.json"), format!("{dir}/model.onnx")]).collect(),
        Layout::Onnx { data, extra_files } => std::iter::once(data.clone()).chain(extra_files.iter().cloned()).collect(),
    };
    paths.push("MLmodel".into());
    let tree: Vec<RemoteFile> = paths.into_iter().map(|path| RemoteFile { path, size: 1 }).collect();
    for decoder in [None, Some("model.onnx")] {
        let Ok(plan) = mlmodel::plan(&layout, &tree, decoder, "m", "1") else { continue };
        for f in &plan {
            assert!(Path::new(&f.local).components().all(|c| matches!(c, Component::Normal(_))), "{f:?} leaves the model folder");
            assert!(mlmodel::check_relative(&f.remote).is_ok(), "{f:?}");
        }
    }
});
