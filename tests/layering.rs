//! The shape of the code, checked: the top-level modules of `src/` form no cycle (read from
//! the `crate::` paths each one's code names, comments and unit tests left out), and every
//! source file opens with a `//!` comment saying what it owns. A change that ties two rooms
//! together both ways fails here with the path that does it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments, string literals and its `#[cfg(test)]` module.
fn code(text: &str) -> String {
    let text = text.find("#[cfg(test)]\nmod tests").map_or(text, |i| &text[..i]);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            // A char literal ('"', '\'', 'x'); a lifetime ('a) is code.
            '\'' => {
                let mut ahead = chars.clone();
                match (ahead.next(), ahead.next()) {
                    (Some('\\'), _) => {
                        chars.next();
                        chars.next();
                        for c in chars.by_ref() {
                            if c == '\'' {
                                break;
                            }
                        }
                    }
                    (Some(_), Some('\'')) => {
                        chars.next();
                        chars.next();
                    }
                    _ => out.push(c),
                }
            }
            // A raw string r#"..."#: up to the quote followed by as many hashes.
            'r' if chars.peek() == Some(&'#') => {
                let mut hashes = 0;
                while chars.peek() == Some(&'#') {
                    chars.next();
                    hashes += 1;
                }
                if chars.next_if_eq(&'"').is_none() {
                    out.push('r');
                    continue;
                }
                let closing = format!("\"{}", "#".repeat(hashes));
                let mut tail = String::new();
                for c in chars.by_ref() {
                    tail.push(c);
                    if tail.ends_with(&closing) {
                        break;
                    }
                }
                out.push_str("\"\"");
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                }
                out.push_str("\"\"");
            }
            _ => out.push(c),
        }
    }
    out
}

/// Top-level module names a piece of code reaches through `crate::name` or `crate::{a, b}`.
fn reached(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split on commas outside nested braces, up to the
            // brace that closes it.
            let mut depth = 0;
            let mut start = 0;
            let mut end = group.len();
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        end = j;
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
            found.insert(ident(group[start..end].trim()));
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

#[test]
fn the_top_level_modules_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let module_of = |p: &Path| {
        let rel = p.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a component").as_os_str().to_string_lossy().into_owned();
        first.trim_end_matches(".rs").to_string()
    };
    let modules: BTreeSet<String> = files.iter().map(|p| module_of(p)).filter(|m| m != "lib" && m != "main").collect();
    // module -> module it reaches -> the files that do it
    let mut graph: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in &files {
        let from = module_of(file);
        if !modules.contains(&from) {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("readable source");
        for to in reached(&code(&text)) {
            if to != from && modules.contains(&to) {
                graph.entry(from.clone()).or_default().entry(to).or_default().insert(file.strip_prefix(&src).expect("under src").display().to_string());
            }
        }
    }
    for (from, tos) in &graph {
        println!("{from:<10} -> {}", tos.keys().cloned().collect::<Vec<_>>().join(", "));
    }
    // A cycle exists when some module reaches itself; report each pair that closes one.
    let reach = |start: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![start.to_string()];
        while let Some(m) = todo.pop() {
            for next in graph.get(&m).into_iter().flat_map(BTreeMap::keys) {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let mut cycles = Vec::new();
    for (from, tos) in &graph {
        for (to, via) in tos {
            if reach(to).contains(from) {
                cycles.push(format!("{from} -> {to} (in {}) while {to} reaches {from} back", via.iter().cloned().collect::<Vec<_>>().join(", ")));
            }
        }
    }
    assert!(cycles.is_empty(), "the top-level modules form a cycle:\n  {}", cycles.join("\n  "));
    assert!(graph.len() >= 10, "the graph was read ({} modules with dependencies)", graph.len());
}

#[test]
fn every_source_file_says_what_it_owns() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let silent: Vec<String> = files
        .iter()
        .filter(|p| !std::fs::read_to_string(p).expect("readable source").trim_start().starts_with("//!"))
        .map(|p| p.strip_prefix(&src).expect("under src").display().to_string())
        .collect();
    assert!(files.len() > 40, "the sources were found ({})", files.len());
    assert!(silent.is_empty(), "files without an opening //! comment: {silent:?}");
}

#[test]
fn the_reader_sees_paths_as_written() {
    let code =
        code("use crate::a::B; // crate::c\nuse crate::{d, e::{F, G}, h};\nlet s = \"crate::i\"; let q = '\"'; let t = r#\"crate::j \"x\" \"#;\nfn f<'a>(x: &'a crate::k::L) {}\n");
    assert_eq!(reached(&code), ["a", "d", "e", "h", "k"].into_iter().map(String::from).collect());
}
