//! The house's rules, checked on the source tree: no Rust file over 600 lines in the crates or
//! their tests, and no import cycle between a crate's top-level modules (`crate::a` using
//! `crate::b` while `b` uses `a`, directly or round a longer loop). Tests (`#[cfg(test)]` and
//! on) and comments are not counted as imports.

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

/// A crate's top-level modules and, for each, the others its code names as `crate::NAME`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let module = |f: &Path| {
        let rel = f.strip_prefix(src).unwrap();
        let first = rel.components().next()?.as_os_str().to_str()?.trim_end_matches(".rs").to_string();
        (!matches!(first.as_str(), "lib" | "main")).then_some(first)
    };
    let names: BTreeSet<String> = files.iter().filter_map(|f| module(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = names.iter().map(|n| (n.clone(), BTreeSet::new())).collect();
    for f in &files {
        let Some(me) = module(f) else { continue };
        let text = std::fs::read_to_string(f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        for line in code.lines() {
            let line = line.split("//").next().unwrap();
            // `crate::name` and the names of `use crate::{a, b::c}`.
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
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
    for src in ["src", "stages/src", "pipelines/src", "serve/src"] {
        let graph = module_graph(&root().join(src));
        assert!(graph.len() > 3 && graph.values().any(|e| !e.is_empty()), "{src}: {graph:?}");
        if let Some(c) = cycle(&graph) {
            panic!("{src}: an import cycle between modules: {}", c.join(" -> "));
        }
    }
}
