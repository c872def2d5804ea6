//! End-to-end tests of the `infer` binary on a small artifact built here. Bad input (damaged
//! artifacts and data) is covered by the experiment crate's `bad_input` suite, which runs
//! this binary too.

use std::path::Path;
use std::process::{Command, Output};

use model_spec::{InputNormalization, LayerSpec, NetworkSpec};
use runtime::{ArtifactBuilder, Granularity, Storage};
use serde_json::Value;

/// Flatten, an int8 linear layer, ReLU and an f32 linear layer: two execution modes.
fn write_artifact(path: &Path) {
    write_artifact_with(path, None);
}

fn write_artifact_with(path: &Path, normalization: Option<InputNormalization>) {
    let network = NetworkSpec {
        name: "tiny_mlp".into(),
        input: [1, 28, 28],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 784,
                out_features: 16,
            },
            LayerSpec::Relu,
            LayerSpec::Linear {
                in_features: 16,
                out_features: 10,
            },
        ],
    };
    // Deterministic, varied weights: no seed or generator needed.
    let weights = |n: usize, k: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * k % 97) as f32 - 48.0) / 480.0)
            .collect()
    };
    let mut builder = ArtifactBuilder::new(network);
    builder
        .add(
            "1.weight",
            &weights(16 * 784, 31),
            &[16, 784],
            Storage::Int8(Granularity::PerChannel),
        )
        .unwrap()
        .add("1.bias", &[0.0; 16], &[16], Storage::F32)
        .unwrap()
        .add("3.weight", &weights(10 * 16, 7), &[10, 16], Storage::F32)
        .unwrap()
        .add("3.bias", &[0.0; 10], &[10], Storage::F32)
        .unwrap();
    if let Some(n) = normalization {
        builder.set_input_normalization(n);
    }
    builder.write(path).unwrap();
}

/// The MNIST copy of the source tree.
const BUNDLED_MNIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../datasets/mnist");

fn infer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infer"))
        .args(args)
        .env(mnist_data::DATA_DIR_VAR, BUNDLED_MNIST)
        .output()
        .expect("the infer binary starts")
}

#[test]
fn scores_an_artifact_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("tiny.safetensors");
    write_artifact(&artifact);
    let output = infer(&[
        artifact.to_str().unwrap(),
        "--limit",
        "300",
        "--batch",
        "64",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["network"], "tiny_mlp");
    let norm = &report["input_normalization"];
    assert_eq!(norm["source"], "MNIST's: the artifact records none");
    assert!((norm["mean"][0].as_f64().unwrap() - 0.1307).abs() < 1e-6);
    assert_eq!(report["images"], 300);
    assert_eq!(report["batch"], 64);
    assert_eq!(
        report["size_bytes"].as_u64().unwrap(),
        std::fs::metadata(&artifact).unwrap().len()
    );
    let accuracy = report["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy), "accuracy {accuracy}");
    assert!(report["images_per_second"].as_f64().unwrap() > 0.0);
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{layers:?}");
    assert_eq!(layers[0]["index"], 1);
    assert_eq!(layers[0]["layer"], "linear");
    assert_eq!(layers[0]["execution"], "int8, dynamic-range activations");
    assert_eq!(layers[0]["stored"], "int8 (per channel)");
    assert_eq!(layers[1]["index"], 3);
    assert_eq!(layers[1]["execution"], "f32 (dense)");
    assert_eq!(layers[1]["stored"], "f32");
}

#[test]
fn prints_a_text_summary() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("tiny.safetensors");
    write_artifact(&artifact);
    let output = infer(&[artifact.to_str().unwrap(), "--limit", "10"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for needle in [
        "network:  tiny_mlp",
        "of 10 test images",
        "images/s",
        "linear   int8, dynamic-range activations, stored as int8 (per channel)",
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
}

#[test]
fn help_lists_the_options() {
    let output = infer(&["--help"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "<ARTIFACT>",
        "--data-dir",
        "--limit",
        "--batch",
        "--json",
        "--export-onnx",
    ] {
        assert!(stdout.contains(flag), "{flag}: {stdout}");
    }
}

#[test]
fn exports_onnx_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("tiny.safetensors");
    write_artifact(&artifact);
    let onnx = dir.path().join("tiny.onnx");
    let output = infer(&[
        artifact.to_str().unwrap(),
        "--export-onnx",
        onnx.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Nothing is scored.
    assert!(!stdout.contains("accuracy"), "{stdout}");
    let expected = onnx_export::export(&std::fs::read(&artifact).unwrap()).unwrap();
    assert_eq!(std::fs::read(&onnx).unwrap(), expected);
}

#[test]
fn a_failed_onnx_export_is_an_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("tiny.safetensors");
    write_artifact(&artifact);
    let onnx = dir.path().join("no such folder").join("tiny.onnx");
    let output = infer(&[
        artifact.to_str().unwrap(),
        "--export-onnx",
        onnx.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error: exporting") && stderr.contains("no such folder"),
        "{stderr}"
    );
}

#[test]
fn uses_the_normalization_the_artifact_records() {
    let dir = tempfile::tempdir().unwrap();
    let (mnist, other) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let recorded = |mean: f32, std: f32| InputNormalization::new(255.0, vec![mean], vec![std]);
    write_artifact_with(&mnist, Some(recorded(0.1307, 0.3081).unwrap()));
    write_artifact_with(&other, Some(recorded(0.9, 0.05).unwrap()));
    let run = |path: &Path| -> Value {
        let output = infer(&[path.to_str().unwrap(), "--limit", "200", "--json"]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let (a, b) = (run(&mnist), run(&other));
    assert_eq!(
        a["input_normalization"]["source"],
        "recorded in the artifact"
    );
    assert_eq!(
        b["input_normalization"]["mean"][0].as_f64().unwrap() as f32,
        0.9
    );
    // Another normalisation feeds the network other numbers: the scores move.
    assert_ne!(a["correct"], b["correct"]);
}
