//! `--resume`: a run killed at several points and resumed each time ends with the same
//! report numbers (timings aside) as a run that was never interrupted, and nothing it
//! leaves behind at a kill is half-written.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const STAGES: &str = "baseline,pipeline";
/// How long a kill point may take to come (a slow machine, a loaded one).
const PATIENCE: Duration = Duration::from_secs(600);

/// The MNIST copy of the source tree.
const BUNDLED_MNIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../datasets/mnist");

fn command(out: &Path, resume: bool) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_experiment"));
    command
        .env(mnist_data::DATA_DIR_VAR, BUNDLED_MNIST)
        .args(["--quick", "--quiet", "--device", "cpu", "--seed", "5"])
        .args(["--stages", STAGES])
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        command.arg("--resume");
    }
    command
}

/// Runs to the end and returns the report of `out`.
fn finish(mut command: Command, out: &Path) -> Value {
    let output = command.output().expect("the experiment binary starts");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    report(out)
}

fn report(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap())
        .expect("report.json is complete JSON")
}

/// Starts a run and kills it (SIGKILL) as soon as `point` holds, or when it ends.
fn kill_when(mut command: Command, point: impl Fn() -> bool) -> bool {
    let mut child: Child = command.spawn().expect("the experiment binary starts");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the run failed before the kill point");
            return false;
        }
        if point() {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        assert!(start.elapsed() < PATIENCE, "the kill point never came");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every file in `dir`: reports parse, artifacts and checkpoints are whole safetensors files.
fn assert_nothing_half_written(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            assert_nothing_half_written(&path);
        } else if name.starts_with('.') {
            // A temporary file of the rename protocol: never read, removed on resume.
        } else if name.ends_with(".json") {
            serde_json::from_slice::<Value>(&std::fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{} is half-written: {e}", path.display()));
        } else if name.ends_with(".safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            safetensors::SafeTensors::deserialize(&bytes)
                .unwrap_or_else(|e| panic!("{} is half-written: {e}", path.display()));
        }
    }
}

/// The report without what differs between runs: timings, speeds, dates.
fn numbers(report: &Value) -> Value {
    fn strip(value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .filter(|(k, _)| {
                        !(k.contains("seconds")
                            || k.contains("per_second")
                            || k.contains("speedup")
                            || k.as_str() == "markdown_section")
                    })
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(strip).collect()),
            other => other.clone(),
        }
    }
    strip(&report["rows"])
}

fn exists(path: PathBuf) -> impl Fn() -> bool {
    move || path.exists()
}

#[test]
fn killed_runs_resume_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("reference");
    let reference = finish(command(&first, false), &first);

    let out = dir.path().join("interrupted");
    // Inside the baseline: its checkpoint is written, its artifact and report are not yet.
    let killed = kill_when(
        command(&out, false),
        exists(out.join("teacher_checkpoint.safetensors")),
    );
    assert!(
        killed,
        "the run ended before its first stage wrote anything"
    );
    assert_nothing_half_written(&out);
    // Twice inside the pipeline, each time resuming.
    let killed = kill_when(
        command(&out, true),
        exists(out.join("pipeline").join("distilled_float32.safetensors")),
    );
    assert!(killed);
    assert_nothing_half_written(&out);
    let killed = kill_when(
        command(&out, true),
        exists(
            out.join("pipeline")
                .join("distilled_pruned_float32.safetensors"),
        ),
    );
    assert!(killed);
    assert_nothing_half_written(&out);
    let resumed = finish(command(&out, true), &out);
    assert_nothing_half_written(&out);

    for stage in ["baseline", "pipeline"] {
        assert_eq!(resumed["stages"][stage]["status"], "ok", "{stage}");
    }
    // The last invocation kept the baseline and reran the pipeline.
    assert_eq!(resumed["stages"]["baseline"]["resumed"], true);
    assert_eq!(resumed["stages"]["pipeline"]["resumed"], false);
    assert_eq!(numbers(&resumed), numbers(&reference));

    // Resuming a complete run reruns nothing; other settings rerun what depends on them.
    let again = finish(command(&out, true), &out);
    for stage in ["baseline", "pipeline"] {
        assert_eq!(again["stages"][stage]["resumed"], true, "{stage}");
    }
    let mut other = command(&out, true);
    other.args(["--sparsity", "0.5"]);
    let changed = finish(other, &out);
    assert_eq!(changed["stages"]["baseline"]["resumed"], true);
    assert_eq!(changed["stages"]["pipeline"]["resumed"], false);
    let int8 = changed["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["variant"] == "distilled_pruned_int8")
        .expect("the pipeline's int8 row")
        .clone();
    let sparsity = int8["detail"]["weight_sparsity"].as_f64().unwrap();
    assert!((sparsity - 0.5).abs() < 0.01, "{sparsity}");
}

#[test]
fn resume_refuses_a_damaged_report_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let damaged = b"{\"schema_version\": 1, \"rows\": [";
    std::fs::write(dir.path().join("report.json"), damaged).unwrap();
    let output = command(dir.path(), true).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("--resume") && err.contains("damaged"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("report.json")).unwrap(),
        damaged
    );
}
