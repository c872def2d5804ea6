//! Architecture invariants read from `cargo metadata`: the workspace's crates form layers
//! whose dependencies point downwards only, and the runtime, the `infer` binary and the ONNX
//! exporter built on it never link tch or any other C++ dependency.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use serde_json::Value;

/// The only packages `infer` may depend on directly (ARCHITECTURE.md); what they bring is
/// checked for C++ below.
const INFER_DIRECT_DEPENDENCIES: [&str; 8] = [
    "runtime",
    "onnx-export",
    "mnist-data",
    "model-spec",
    "ndarray",
    "clap",
    "anyhow",
    "serde_json",
];

/// Packages that bring LibTorch or C++ with them.
const FORBIDDEN: [&str; 3] = ["tch", "torch-sys", "cc"];

/// The host target triple, from `rustc -vV`.
fn host() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = Command::new(rustc)
        .arg("-vV")
        .output()
        .expect("rustc -vV runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .trim()
        .to_string()
}

/// `cargo metadata` of the workspace, for the host.
fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The host's dependencies only: offline, cargo cannot load the manifests of packages
    // that only other targets use (plotters' wasm dependencies) and that were never fetched.
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The names of the packages `package` depends on directly (normal dependencies).
fn direct_dependencies(package: &str) -> BTreeSet<String> {
    let metadata = metadata();
    let manifest = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == package)
        .unwrap_or_else(|| panic!("the {package} package is in the workspace"));
    manifest["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["kind"].is_null())
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The names of every package that `package` links: normal and build dependencies,
/// transitively (dev-dependencies are not linked into the library or binary).
fn linked_packages(package: &str) -> BTreeSet<String> {
    let metadata = metadata();
    let names: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: HashMap<&str, &Value> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let root = names
        .iter()
        .find(|(_, name)| **name == package)
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("the {package} package is in the workspace"));

    let mut visited = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if !visited.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let linked = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null() || k["kind"] == "build");
            if linked {
                stack.push(dep["pkg"].as_str().unwrap());
            }
        }
    }
    visited.iter().map(|id| names[id].to_owned()).collect()
}

fn assert_free_of_cxx(package: &str, seen: &BTreeSet<String>) {
    for forbidden in FORBIDDEN {
        assert!(
            !seen.contains(forbidden),
            "{package} depends on {forbidden}: {seen:?}"
        );
    }
}

#[test]
fn runtime_dependency_tree_has_no_tch() {
    let seen = linked_packages("runtime");
    assert!(
        seen.contains("safetensors") && seen.contains("ndarray"),
        "{seen:?}"
    );
    assert_free_of_cxx("runtime", &seen);
}

#[test]
fn infer_dependency_tree_has_no_tch() {
    let seen = linked_packages("infer");
    assert!(
        seen.contains("runtime") && seen.contains("mnist-data") && seen.contains("clap"),
        "{seen:?}"
    );
    assert_free_of_cxx("infer", &seen);
    let direct = direct_dependencies("infer");
    let allowed: BTreeSet<String> = INFER_DIRECT_DEPENDENCIES.map(String::from).into();
    assert!(
        direct.is_subset(&allowed),
        "infer depends on {:?} beyond {allowed:?}",
        direct.difference(&allowed).collect::<Vec<_>>()
    );
}

#[test]
fn onnx_export_dependency_tree_has_no_tch() {
    let seen = linked_packages("onnx-export");
    assert!(
        seen.contains("runtime") && seen.contains("onnx-protobuf"),
        "{seen:?}"
    );
    assert_free_of_cxx("onnx-export", &seen);
}

/// The dependency layers of the workspace, lowest first (ARCHITECTURE.md, "Dependency
/// layers"): a crate's normal and build dependencies among the workspace's crates are all in
/// lower layers. Every workspace crate is in exactly one.
const LAYERS: [&[&str]; 5] = [
    // The file-system primitive every writer shares: atomic writes.
    &["atomic-file"],
    // Plain Rust, no workspace dependencies but the one above.
    &["model-spec", "quantization", "mnist-data", "plots"],
    // The deployment runtime (no tch) and the training-loop techniques (tch).
    &[
        "runtime",
        "tensor-precision",
        "loss-scaling",
        "distillation",
        "pruning",
        "clustering",
    ],
    // What bridges a trained tch model and the runtime, or the runtime and other formats.
    &["models", "onnx-export"],
    // Programs and tests: nothing depends on them.
    &[
        "experiment",
        "bench",
        "infer",
        "examples",
        "integration-tests",
        "xtask",
    ],
];

#[test]
fn workspace_dependencies_point_down_the_layers() {
    let metadata = metadata();
    let members: BTreeSet<&str> = metadata["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    let layer_of = |name: &str| LAYERS.iter().position(|layer| layer.contains(&name));
    let mut checked = 0;
    for package in metadata["packages"].as_array().unwrap() {
        if !members.contains(package["id"].as_str().unwrap()) {
            continue;
        }
        let name = package["name"].as_str().unwrap();
        let layer = layer_of(name).unwrap_or_else(|| {
            panic!("workspace crate {name} has no dependency layer: add it to LAYERS and ARCHITECTURE.md")
        });
        for dep in package["dependencies"].as_array().unwrap() {
            let linked = dep["kind"].is_null() || dep["kind"] == "build";
            let dep_name = dep["name"].as_str().unwrap();
            if let (true, Some(dep_layer)) = (linked, layer_of(dep_name)) {
                assert!(
                    dep_layer < layer,
                    "{name} (layer {layer}) depends on {dep_name} (layer {dep_layer}): dependencies must point to lower layers"
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 16, "only {checked} workspace crates found");
}
