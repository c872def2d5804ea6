//! The driver's modules form a graph without cycles: a module never reaches back, through the
//! modules it uses, to itself. Read from the sources (what `use crate::…` and `super::…`
//! name outside comments and tests), so a new cycle fails here rather than in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`stages::pipeline`) -> the modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&src, &mut files);
    let mut uses = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap().with_extension("");
        let mut parts: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod" || p == "main") {
            parts.pop();
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap()
            .lines()
            .map(|l| l.split("//").next().unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        let mut named = BTreeSet::new();
        for (prefix, base) in [("crate::", Vec::new()), ("super::", parent(&parts))] {
            for piece in code.split(prefix).skip(1) {
                let name: String = piece
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    let mut path = base.clone();
                    path.push(name);
                    named.insert(path.join("::"));
                }
            }
        }
        uses.insert(parts.join("::"), named);
    }
    let modules: BTreeSet<String> = uses.keys().cloned().collect();
    uses.into_iter()
        .map(|(module, named)| {
            let edges = named
                .into_iter()
                .filter(|n| *n != module && modules.contains(n))
                .collect();
            (module, edges)
        })
        .collect()
}

fn parent(parts: &[String]) -> Vec<String> {
    parts[..parts.len().saturating_sub(1)].to_vec()
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn no_module_reaches_back_to_itself() {
    let graph = graph();
    assert!(graph.len() > 10, "{graph:?}");
    assert!(graph["stages::baseline"].contains("teacher"), "{graph:?}");
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&String> = graph[start].iter().collect();
        while let Some(module) = stack.pop() {
            assert!(
                module != start,
                "{start} reaches back to itself through {module}: {graph:#?}"
            );
            if seen.insert(module) {
                stack.extend(graph.get(module).into_iter().flatten());
            }
        }
    }
}
