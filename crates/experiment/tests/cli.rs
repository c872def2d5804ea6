//! End-to-end tests of the experiment binary: a real `--quick` run, and a stage that fails
//! for want of an earlier one. Bad input of every other kind is in `bad_input.rs`.

use std::process::{Command, Output};

use serde_json::Value;

/// The MNIST copy of the source tree.
const BUNDLED_MNIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../datasets/mnist");

fn experiment(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_experiment"))
        .args(args)
        .env(mnist_data::DATA_DIR_VAR, BUNDLED_MNIST)
        .output()
        .expect("the experiment binary starts")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn quick_baseline_writes_a_complete_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = experiment(&[
        "--quick",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--stages",
        "baseline",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));

    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["schema_version"], 2);
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["quick"], true);
    assert_eq!(report["seed"], 3);
    assert!(report["threads"].as_u64().unwrap() >= 1);
    assert_eq!(report["stages"]["baseline"]["status"], "ok");
    assert!(report["stages"]["baseline"]["error"].is_null());

    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["stage"], "baseline");
    assert_eq!(row["variant"], "teacher_float32");
    assert_eq!(row["engine"], "libtorch");
    // One quick epoch on 6000 images is far from converged but far above chance.
    let accuracy = row["test_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.5 && accuracy <= 1.0, "accuracy {accuracy}");
    let params = row["params"].as_u64().unwrap();
    assert_eq!(params, 225_226);
    assert!(row["nonzero_params"].as_u64().unwrap() <= params);
    for field in [
        "train_seconds",
        "train_samples_per_second",
        "infer_samples_per_second",
    ] {
        assert!(row[field].as_f64().unwrap() > 0.0, "{field}");
    }

    let artifact = out.join(row["artifact"].as_str().unwrap());
    let size = std::fs::metadata(&artifact).unwrap().len();
    assert_eq!(row["size_bytes"].as_u64().unwrap(), size);
    // The deployed artifact: batch norm folded, so fewer parameters than trained, four
    // bytes each, plus a header with the network description.
    let deployed = models::NetworkSpec::teacher_cnn()
        .without_batch_norm()
        .param_count() as u64;
    assert!(
        size >= deployed * 4 && size < deployed * 4 + 8192,
        "size {size}"
    );
    let model = runtime::Model::load(&artifact).unwrap();
    let logits = model
        .run(ndarray::Array4::<f32>::zeros((2, 1, 28, 28)).view())
        .unwrap();
    assert_eq!(logits.dim(), (2, 10));
    assert!(out.join("teacher_checkpoint.safetensors").exists());
    let gzip = row["gzip_bytes"].as_u64().unwrap();
    assert!(gzip > 0 && gzip < size, "gzip {gzip}");

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| baseline | teacher_float32 | teacher_cnn | 225226 |"),
        "{md}"
    );
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn distillation_without_a_teacher_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = experiment(&[
        "--quick",
        "--quiet",
        "--stages",
        "distillation",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("--stages baseline,distillation"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The failure is recorded in the report.
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["stages"]["distillation"]["status"], "failed");
}
