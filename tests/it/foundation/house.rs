//! The house's rules, checked on the source tree: no Rust file over 600 lines in the crates or
//! their tests, and no import cycle between the modules of a crate or of one of its directory
//! modules (`crate::a` using `crate::b` while `b` uses `a`, directly or round a longer loop;
//! inside `daemon/`, `crate::daemon::a` or `super::a` from a file beside it). Tests
//! (`#[cfg(test)]` and on) and comments are not counted as imports. And no function over 80
//! lines outside tests unless its doc comment says why.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::common::root;

const MAX_LINES: usize = 600;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && p.file_name().is_some_and(|n| n != "target" && n != "fixtures") {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_rust_file_is_over_600_lines() {
    let mut files = Vec::new();
    for dir in ["src", "stages", "pipelines", "serve", "tests", "benches", "fuzz/src"] {
        rust_files(&root().join(dir), &mut files);
    }
    assert!(files.len() > 50, "the walk found only {} files", files.len());
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > MAX_LINES).then(|| format!("{} ({n} lines)", f.strip_prefix(root()).unwrap().display()))
        })
        .collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines: split by behaviour: {long:?}");
}

/// The modules of the directory `src` (a crate's source, or a directory module whose path is
/// `prefix`, `crate::` for a crate's top level) and, for each, the others its code names.
fn module_graph(src: &Path, prefix: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let module = |f: &Path| {
        let rel = f.strip_prefix(src).unwrap();
        let first = rel.components().next()?.as_os_str().to_str()?.trim_end_matches(".rs").to_string();
        (!matches!(first.as_str(), "lib" | "main" | "mod")).then_some(first)
    };
    let names: BTreeSet<String> = files.iter().filter_map(|f| module(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = names.iter().map(|n| (n.clone(), BTreeSet::new())).collect();
    for f in &files {
        let Some(me) = module(f) else { continue };
        // A file right in `src` reaches its siblings by `super::` too.
        let beside = f.parent() == Some(src) && !f.ends_with("mod.rs");
        let text = std::fs::read_to_string(f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        for line in code.lines() {
            let line = line.split("//").next().unwrap();
            let mut starts: Vec<usize> = line.match_indices(prefix).map(|(i, _)| i + prefix.len()).collect();
            if beside && prefix != "crate::" {
                starts.extend(line.match_indices("super::").map(|(i, _)| i + "super::".len()));
            }
            // `PREFIX name` and the names of `use PREFIX{a, b::c}`.
            for i in starts {
                let rest = &line[i..];
                let group = rest.strip_prefix('{').map(|g| g.split('}').next().unwrap_or(g));
                let heads: Vec<&str> = match group {
                    Some(g) => g.split(',').map(|p| p.trim().split("::").next().unwrap_or("")).collect(),
                    None => vec![rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("")],
                };
                for h in heads {
                    if h != me && names.contains(h) {
                        graph.get_mut(&me).unwrap().insert(h.to_string());
                    }
                }
            }
        }
    }
    graph
}

/// `src` and its directory modules, each with its path (`crate::`, `crate::daemon::`, ...).
fn module_dirs(src: &Path, prefix: &str, out: &mut Vec<(PathBuf, String)>) {
    out.push((src.to_path_buf(), prefix.to_string()));
    let Ok(entries) = std::fs::read_dir(src) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && p.join("mod.rs").is_file() {
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            module_dirs(&p, &format!("{prefix}{name}::"), out);
        }
    }
}

/// A cycle of `graph`, if it has one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut c = path[at..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in &graph[n] {
            if let Some(c) = visit(m, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    // The check itself: a cycle is found, and a graph without one passes.
    let g = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])).map(|c| c.len()), Some(4));
    assert_eq!(cycle(&g(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    let mut checked = 0;
    for src in ["src", "stages/src", "pipelines/src", "serve/src"] {
        let graph = module_graph(&root().join(src), "crate::");
        assert!(graph.len() > 3 && graph.values().any(|e| !e.is_empty()), "{src}: {graph:?}");
        let mut dirs = Vec::new();
        module_dirs(&root().join(src), "crate::", &mut dirs);
        for (dir, prefix) in dirs {
            let graph = module_graph(&dir, &prefix);
            checked += graph.values().filter(|e| !e.is_empty()).count();
            if let Some(c) = cycle(&graph) {
                panic!("{}: an import cycle between modules: {}", dir.display(), c.join(" -> "));
            }
        }
    }
    assert!(checked > 20, "only {checked} modules import a sibling: is the walk right?");
}

/// Longest a function may be outside tests, unless its doc comment says why (a line with
/// `Long because`).
const MAX_FN_LINES: usize = 80;

/// The functions of `text` (before its tests) longer than [`MAX_FN_LINES`] whose doc comment
/// gives no reason: (name, first line, lines). A function ends at the first `}` at its own
/// indentation (rustfmt's layout).
fn long_functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.split("#[cfg(test)]").next().unwrap().lines().collect();
    let mut long = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        let indent = line.len() - code.len();
        let signature = code.strip_prefix("pub(crate) ").or_else(|| code.strip_prefix("pub(super) "));
        let signature = signature.or_else(|| code.strip_prefix("pub ")).unwrap_or(code);
        let signature = signature.strip_prefix("async ").unwrap_or(signature);
        let Some(rest) = signature.strip_prefix("fn ") else { continue };
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        // A declaration without a body (in a trait) ends with `;` before any `{`.
        let Some(open) = (i..lines.len()).find(|&j| lines[j].contains('{') || lines[j].trim_end().ends_with(';'))
        else {
            continue;
        };
        if !lines[open].contains('{') || lines[open].trim_end().ends_with('}') {
            continue;
        }
        let close = (open + 1..lines.len()).find(|&j| {
            let l = lines[j];
            l.len() > indent && l[..indent].trim().is_empty() && l[indent..].starts_with('}')
        });
        let Some(close) = close else { continue };
        let n = close - i + 1;
        let docs = lines[..i]
            .iter()
            .rev()
            .take_while(|l| l.trim_start().starts_with("///") || l.trim_start().starts_with("#["));
        let reasoned = docs.into_iter().any(|l| l.contains("Long because"));
        if n > MAX_FN_LINES && !reasoned {
            long.push((name, i + 1, n));
        }
    }
    long
}

#[test]
fn no_function_is_over_80_lines_without_a_reason() {
    let made = "fn short() {\n    a();\n}\n\nfn long() {\n".to_string() + &"    a();\n".repeat(85) + "}\n";
    assert_eq!(long_functions(&made), [("long".to_string(), 5, 87)], "the check finds a made long function");
    let reasoned = "/// Long because: one table.\n".to_string() + &made;
    assert_eq!(long_functions(&reasoned).len(), 1, "the reason covers only its own function");
    let mut files = Vec::new();
    for dir in ["src", "stages/src", "pipelines/src", "serve/src"] {
        rust_files(&root().join(dir), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .flat_map(|f| {
            let rel = f.strip_prefix(root()).unwrap().display().to_string();
            long_functions(&std::fs::read_to_string(f).unwrap())
                .into_iter()
                .map(move |(name, line, n)| format!("{rel}:{line} {name} ({n} lines)"))
        })
        .collect();
    assert!(long.is_empty(), "over {MAX_FN_LINES} lines: split it, or say why in its doc comment: {long:?}");
}
