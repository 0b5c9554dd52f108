//! An answer of the MLflow REST API, as the registry client reads it. The first line names the
//! route (`latest`, `version`, `uri`, `listing`; anything else is read as an error answer), the
//! rest is the body. A listing is checked entry by entry and its files planned as both kinds of
//! model folder: every path kept must stay inside the artifact root and every local name inside
//! the model folder.
#![no_main]

use std::path::{Component, Path};

use edgeflow::fuzzing::registry;
use edgeflow::registry::mlmodel::{self, Layout};
use libfuzzer_sys::fuzz_target;

const ROOT: &str = "1/models/m-1/artifacts";

fn inside(path: &str) -> bool {
    !path.is_empty() && Path::new(path).components().all(|c| matches!(c, Component::Normal(_)))
}

fuzz_target!(|data: &[u8]| {
    let (route, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    match route {
        b"latest" => {
            if let Ok(Some(v)) = registry::latest_in_stage(body, "m", "Production") {
                assert!(v.name == "m" && !v.version.is_empty() && v.version.bytes().all(|b| b.is_ascii_digit()), "{v:?}");
            }
        }
        b"version" => {
            if let Ok(v) = registry::model_version(body, "m") {
                assert!(v.name == "m" && !v.version.is_empty() && v.version.bytes().all(|b| b.is_ascii_digit()), "{v:?}");
            }
        }
        b"uri" => {
            if let Ok(Some(root)) = registry::artifact_root(body) {
                assert!(root.split('/').all(|p| p != ".." && p != "."), "{root}");
            }
        }
        b"listing" => {
            let dir = "artifacts";
            let Ok((files, dirs)) = registry::listing(body, &format!("{ROOT}/{dir}"), dir) else { return };
            for path in files.iter().map(|f| &f.path).chain(&dirs) {
                assert!(inside(path) && mlmodel::check_relative(path).is_ok(), "{path:?}");
            }
            let Some(first) = files.first() else { return };
            let layouts = [
                Layout::Pyfunc { artifacts: vec![("model".into(), dir.into())] },
                Layout::Onnx { data: first.path.clone(), extra_files: files[1..].iter().map(|f| f.path.clone()).collect() },
            ];
            for layout in &layouts {
                if let Ok(plan) = mlmodel::plan(layout, &files, None, "m", "1") {
                    assert!(plan.iter().all(|f| inside(&f.local)), "{plan:?}");
                }
            }
        }
        _ => {
            let (code, message) = registry::error_body(body);
            assert!(code.is_none_or(|c| !c.contains('\n')) && !message.contains('\n'), "{message:?}");
        }
    }
});
