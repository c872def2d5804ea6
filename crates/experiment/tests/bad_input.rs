//! Bad input through the real binaries, `experiment` and `infer`: damaged data files, invalid
//! settings, damaged artifacts, an unusable environment. Every case must end with a clear
//! message naming what is wrong (the file, the flag, the valid range), a non-zero exit code
//! (1 for a run that fails, 2 for options clap refuses), no panic, and every file that was
//! in the case's folder before (a dataset, an artifact, an earlier run's `report.json`)
//! byte for byte as it was.
//!
//! The cases fail before any training starts, so the whole suite takes seconds. It does not
//! link LibTorch (it uses neither `tch` nor `models`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mnist_data::{Dataset, FILES, MANIFEST, Split};
use model_spec::{LayerSpec, NetworkSpec};
use runtime::{ArtifactBuilder, Encoded, Granularity, Storage};
use serde_json::Value;

const TRAIN_IMAGES: &str = FILES[0];
const TRAIN_LABELS: &str = FILES[1];
const TEST_IMAGES: &str = FILES[2];
const TEST_LABELS: &str = FILES[3];

/// Exit code of a run that fails.
const RUN_ERROR: i32 = 1;
/// Exit code of options that clap refuses.
const USAGE_ERROR: i32 = 2;

#[derive(Clone, Copy, Debug)]
enum Bin {
    Experiment,
    Infer,
}

/// One kind of bad input.
struct Case {
    /// What is wrong, for failure messages.
    kind: &'static str,
    bin: Bin,
    args: Vec<String>,
    code: i32,
    /// Substrings the error message must contain.
    expect: Vec<String>,
    /// Run from the case's folder without `TCH_MOT_MNIST_DIR`, where no default dataset is
    /// found; other cases get the bundled MNIST through that variable.
    isolated: bool,
}

impl Case {
    fn new(kind: &'static str, bin: Bin, args: &[&str], code: i32, expect: &[&str]) -> Self {
        Self {
            kind,
            bin,
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            code,
            expect: expect.iter().map(|s| (*s).to_owned()).collect(),
            isolated: false,
        }
    }

    /// The case run where no dataset is found unless named.
    fn isolated(mut self) -> Self {
        self.isolated = true;
        self
    }
}

/// The MNIST copy of the source tree.
fn bundled_mnist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist")
}

/// The experiment binary, which Cargo builds for this package's tests.
fn experiment_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_experiment"))
}

/// The `infer` binary of the same workspace. Cargo hands a test only the binaries of its
/// own package, so it is built here, once, next to the experiment binary (a no-op when
/// `cargo test --workspace` has built it already).
fn infer_bin() -> &'static Path {
    static INFER: OnceLock<PathBuf> = OnceLock::new();
    INFER.get_or_init(|| {
        let experiment = experiment_bin();
        let profile_dir = experiment.parent().expect("the binary lies in a folder");
        let target_dir = profile_dir
            .parent()
            .expect("the profile folder has a parent");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let output = Command::new(cargo)
            .args(["build", "--quiet", "--package", "infer", "--bin", "infer"])
            .args(["--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo starts");
        assert!(
            output.status.success(),
            "building infer failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        profile_dir.join(format!("infer{}", std::env::consts::EXE_SUFFIX))
    })
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.insert(path, bytes);
            }
        }
    }
    files
}

/// Runs `case` with `root` as its folder; `Err` says what went wrong.
fn check(case: &Case, root: &Path) -> Result<(), String> {
    let before = snapshot(root);
    let bin = match case.bin {
        Bin::Experiment => experiment_bin(),
        Bin::Infer => infer_bin().to_path_buf(),
    };
    let mut command = Command::new(&bin);
    command.args(&case.args);
    if case.isolated {
        command
            .current_dir(root)
            .env_remove(mnist_data::DATA_DIR_VAR);
    } else {
        command.env(mnist_data::DATA_DIR_VAR, bundled_mnist());
    }
    let output = command
        .output()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut problems = Vec::new();
    if output.status.code() != Some(case.code) {
        problems.push(format!(
            "exit status {} instead of {}",
            output.status, case.code
        ));
    }
    if stderr.contains("panicked") {
        problems.push("it panicked".to_owned());
    }
    if !stderr.starts_with("error: ") {
        problems.push("the message does not start with `error: `".to_owned());
    }
    for needle in &case.expect {
        if !stderr.contains(needle.as_str()) {
            problems.push(format!("the message lacks `{needle}`"));
        }
    }
    let after = snapshot(root);
    if after != before {
        let changed: Vec<_> = before
            .keys()
            .chain(after.keys())
            .filter(|path| before.get(*path) != after.get(*path))
            .collect();
        problems.push(format!("files changed: {changed:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} ({:?} {:?}): {}\n--- stderr ---\n{stderr}",
            case.kind,
            case.bin,
            case.args,
            problems.join("; ")
        ))
    }
}

/// Runs every case and fails with the list of those that misbehaved.
fn check_all(cases: &[Case], root: &Path) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| check(case, root).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases misbehaved:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

fn text(path: &Path) -> String {
    path.to_str().expect("temporary paths are UTF-8").to_owned()
}

/// A small synthetic dataset (so that breaking it is quick) in the MNIST layout, with its
/// SHA256SUMS.
fn small_dataset(dir: &Path) -> PathBuf {
    let split = |n: usize| Split {
        images: ndarray::Array3::from_shape_fn((n, 28, 28), |(i, r, c)| ((i + r * c) % 256) as u8),
        labels: ndarray::Array1::from_shape_fn(n, |i| (i % 10) as u8),
    };
    Dataset {
        train: split(60),
        test: split(30),
    }
    .save(dir)
    .unwrap();
    dir.to_path_buf()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Replaces the IDX content of `name` in `dir` by `edit`'s, gzipped again, and removes the
/// manifest so that the failure under test is the content, not the checksum.
fn forge(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join(name);
    let mut raw = mnist_data::gunzip(name, &std::fs::read(&path).unwrap()).unwrap();
    edit(&mut raw);
    std::fs::write(&path, gzip(&raw)).unwrap();
    let _ = std::fs::remove_file(dir.join(MANIFEST));
}

/// A dataset folder `name` under `root`, broken by `breaker`.
fn broken_dataset(root: &Path, name: &str, breaker: impl FnOnce(&Path)) -> PathBuf {
    let dir = small_dataset(&root.join(name));
    breaker(&dir);
    dir
}

/// A folder of results from an earlier run: a report and an artifact that no failed run
/// may touch.
fn earlier_results(root: &Path) -> PathBuf {
    let out = root.join("earlier-run");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("report.json"),
        br#"{"schema_version": 1, "rows": [], "note": "an earlier run"}"#,
    )
    .unwrap();
    std::fs::write(
        out.join("teacher_float32.safetensors"),
        tiny_artifact().to_bytes().unwrap(),
    )
    .unwrap();
    out
}

/// A valid artifact for MNIST images: flatten, int8 linear 784 -> 10.
fn tiny_network() -> NetworkSpec {
    NetworkSpec {
        name: "tiny".into(),
        input: [1, 28, 28],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 784,
                out_features: 10,
            },
        ],
    }
}

fn tiny_weights() -> Vec<f32> {
    (0..7840).map(|i| ((i % 13) as f32 - 6.0) / 60.0).collect()
}

fn tiny_artifact() -> ArtifactBuilder {
    let mut builder = ArtifactBuilder::new(tiny_network());
    builder
        .add(
            "1.weight",
            &tiny_weights(),
            &[10, 784],
            Storage::Int8(Granularity::PerChannel),
        )
        .unwrap()
        .add("1.bias", &[0.0; 10], &[10], Storage::F32)
        .unwrap();
    builder
}

/// Splits a safetensors file into its header JSON and its data.
fn split_safetensors(bytes: &[u8]) -> (Value, &[u8]) {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    (header, &bytes[8 + len..])
}

fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).unwrap();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json);
    bytes.extend(data);
    bytes
}

/// The artifact's bytes with its header edited by `edit`.
fn edit_header(bytes: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let (mut header, data) = split_safetensors(bytes);
    edit(&mut header);
    join_safetensors(&header, data)
}

/// The artifact's bytes with the first f32 of tensor `tensor` set to `value`.
fn set_first_f32(bytes: &[u8], tensor: &str, value: f32) -> Vec<u8> {
    let (header, data) = split_safetensors(bytes);
    let start = header[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
    let mut data = data.to_vec();
    data[start..start + 4].copy_from_slice(&value.to_le_bytes());
    join_safetensors(&header, &data)
}

#[test]
fn damaged_data_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = text(&earlier_results(root));
    let artifact = root.join("earlier-run/teacher_float32.safetensors");
    let bundled = bundled_mnist();

    // The bundled MNIST with one bit flipped: its SHA256SUMS catches it.
    let flipped = root.join("flipped");
    std::fs::create_dir(&flipped).unwrap();
    for name in FILES.iter().chain([&MANIFEST]) {
        std::fs::copy(bundled.join(name), flipped.join(name)).unwrap();
    }
    let mut bytes = std::fs::read(flipped.join(TRAIN_IMAGES)).unwrap();
    bytes[1000] ^= 0x10;
    std::fs::write(flipped.join(TRAIN_IMAGES), bytes).unwrap();

    let truncated_gzip = broken_dataset(root, "truncated-gzip", |dir| {
        let path = dir.join(TEST_IMAGES);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
    });
    let truncated_with_sums = broken_dataset(root, "truncated-with-sums", |dir| {
        let path = dir.join(TRAIN_LABELS);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 9]).unwrap();
    });
    let not_gzip = broken_dataset(root, "not-gzip", |dir| {
        std::fs::write(dir.join(TEST_LABELS), b"0,1,2,3\n").unwrap();
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
    });
    let wrong_magic = broken_dataset(root, "wrong-magic", |dir| {
        forge(dir, TEST_LABELS, |raw| raw[3] = 0x02);
    });
    let label_ten = broken_dataset(root, "label-ten", |dir| {
        forge(dir, TEST_LABELS, |raw| raw[8 + 7] = 10);
    });
    let count_mismatch = broken_dataset(root, "count-mismatch", |dir| {
        forge(dir, TEST_LABELS, |raw| {
            raw.pop();
            raw[7] -= 1;
        });
    });
    let short_idx = broken_dataset(root, "short-idx", |dir| {
        forge(dir, TRAIN_IMAGES, |raw| raw.truncate(raw.len() - 100));
    });
    let zero_rows = broken_dataset(root, "zero-rows", |dir| {
        forge(dir, TEST_IMAGES, |raw| raw[8..12].copy_from_slice(&[0; 4]));
    });
    let missing_file = broken_dataset(root, "missing-file", |dir| {
        std::fs::remove_file(dir.join(TEST_LABELS)).unwrap();
    });
    let bad_manifest = broken_dataset(root, "bad-manifest", |dir| {
        std::fs::write(dir.join(MANIFEST), "not a checksum line\n").unwrap();
    });
    let no_folder = root.join("no-such-folder");

    let experiment = |kind, data: &Path, expect: &[&str]| {
        let data = text(data);
        let args = [
            "--quick",
            "--quiet",
            "--device",
            "cpu",
            "--stages",
            "baseline",
            "--data-dir",
            data.as_str(),
            "--out",
            out.as_str(),
        ];
        Case::new(kind, Bin::Experiment, &args, RUN_ERROR, expect)
    };
    let artifact = text(&artifact);
    let infer = |kind, data: &Path, expect: &[&str]| {
        let data = text(data);
        let args = [artifact.as_str(), "--data-dir", data.as_str()];
        Case::new(kind, Bin::Infer, &args, RUN_ERROR, expect)
    };
    let cases = [
        experiment(
            "bit flip failing the checksum",
            &flipped,
            &["checksum mismatch", TRAIN_IMAGES, "loading the dataset"],
        ),
        experiment(
            "truncated gzip stream",
            &truncated_gzip,
            &["bad gzip data", TEST_IMAGES, "truncated"],
        ),
        experiment(
            "truncated file listed in SHA256SUMS",
            &truncated_with_sums,
            &["checksum mismatch", TRAIN_LABELS],
        ),
        experiment(
            "a file that is not gzip",
            &not_gzip,
            &[TEST_LABELS, "not gzip data"],
        ),
        experiment(
            "wrong IDX magic number",
            &wrong_magic,
            &["wrong magic number", TEST_LABELS, "expected 0x00000801"],
        ),
        experiment(
            "label out of range",
            &label_ten,
            &[TEST_LABELS, "label 10 at index 7 is not in 0..=9"],
        ),
        experiment(
            "image and label counts differ",
            &count_mismatch,
            &["count mismatch", "30 images", "29 labels"],
        ),
        experiment(
            "IDX payload shorter than its header says",
            &short_idx,
            &["truncated", TRAIN_IMAGES, "expected 47056 bytes, got 46956"],
        ),
        experiment(
            "images with zero rows",
            &zero_rows,
            &["wrong dimensions", TEST_IMAGES, "rows is 0"],
        ),
        experiment(
            "missing data file",
            &missing_file,
            &["missing file", TEST_LABELS],
        ),
        experiment(
            "malformed SHA256SUMS",
            &bad_manifest,
            &["malformed manifest", MANIFEST, "line 1"],
        ),
        experiment(
            "--data-dir that does not exist",
            &no_folder,
            &["the dataset folder", "no-such-folder", "does not exist"],
        ),
        infer(
            "infer: label out of range",
            &label_ten,
            &["label 10 at index 7"],
        ),
        infer(
            "infer: truncated gzip stream",
            &truncated_gzip,
            &[TEST_IMAGES, "truncated"],
        ),
        infer(
            "infer: --data-dir that does not exist",
            &no_folder,
            &["no-such-folder", "does not exist"],
        ),
    ];
    check_all(&cases, root);
}

#[test]
fn invalid_settings() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = text(&earlier_results(root));
    let artifact = text(&root.join("earlier-run/teacher_float32.safetensors"));
    let experiment = |kind, flag: &str, value: &str, expect: &[&str]| {
        let args = ["--quick", "--out", out.as_str(), flag, value];
        Case::new(kind, Bin::Experiment, &args, USAGE_ERROR, expect)
    };
    let infer = |kind, flag: &str, value: &str, expect: &[&str]| {
        let args = [artifact.as_str(), flag, value];
        Case::new(kind, Bin::Infer, &args, USAGE_ERROR, expect)
    };
    let cases = [
        experiment(
            "percentile outside (0, 100]",
            "--percentile",
            "100.5",
            &["--percentile", "percentile must be in (0, 100], got 100.5"],
        ),
        experiment(
            "percentile that is not a number",
            "--percentile",
            "high",
            &["--percentile", "`high` is not a number"],
        ),
        experiment(
            "unknown calibrator",
            "--calibrator",
            "kl",
            &["'kl'", "--calibrator", "minmax, percentile, entropy, mse"],
        ),
        experiment(
            "zero threads",
            "--threads",
            "0",
            &["--threads", "1..=2147483647"],
        ),
        experiment(
            "negative seed",
            "--seed",
            "-3",
            &["--seed", "0..=9223372036854775807"],
        ),
        experiment(
            "unknown stage name",
            "--stages",
            "baseline,frobnicate",
            &["'frobnicate'", "--stages", "baseline", "pruning"],
        ),
        experiment(
            "unknown device",
            "--device",
            "tpu",
            &["'tpu'", "--device", "auto, cpu, cuda"],
        ),
        experiment(
            "zero distillation temperature",
            "--temperature",
            "0",
            &[
                "--temperature",
                "temperature must be positive and finite, got 0",
            ],
        ),
        experiment(
            "infinite distillation temperature",
            "--temperature",
            "inf",
            &["--temperature", "must be positive and finite"],
        ),
        experiment(
            "alpha above 1",
            "--alpha",
            "1.5",
            &["--alpha", "alpha must be in [0, 1], got 1.5"],
        ),
        experiment(
            "negative initial loss scale",
            "--initial-loss-scale",
            "-1",
            &[
                "--initial-loss-scale",
                "initial scale -1 must be positive and finite",
            ],
        ),
        experiment(
            "initial loss scale below the scaler's floor",
            "--initial-loss-scale",
            "0.5",
            &["--initial-loss-scale", "scale 0.5 lies outside [1, "],
        ),
        infer(
            "infer: zero batch size",
            "--batch",
            "0",
            &["--batch", "at least 1"],
        ),
        infer(
            "infer: negative limit",
            "--limit",
            "-5",
            &["--limit", "at least 1"],
        ),
    ];
    check_all(&cases, root);
}

#[test]
fn damaged_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let valid = tiny_artifact().to_bytes().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = root.join(name);
        std::fs::write(&path, bytes).unwrap();
        text(&path)
    };

    let empty = write("empty.safetensors", b"");
    let truncated = write("truncated.safetensors", &valid[..valid.len() - 100]);
    let mut damaged = valid.clone();
    damaged[8] = b'[';
    let damaged_header = write("damaged-header.safetensors", &damaged);
    let plain = join_safetensors(
        &serde_json::json!({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}),
        &1.0f32.to_le_bytes(),
    );
    let plain = write("plain.safetensors", &plain);
    let future = edit_header(&valid, |header| {
        header["__metadata__"]["format_version"] = "99".into();
    });
    let future = write("future.safetensors", &future);
    let negative_scale = write(
        "negative-scale.safetensors",
        &set_first_f32(&valid, "1.weight.scale", -0.5),
    );
    let mut csr = ArtifactBuilder::new(tiny_network());
    csr.add_encoded(
        "1.weight",
        &[10, 784],
        Encoded::Csr {
            row_ptr: &[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            col_idx: &[784],
            values: &[0.5],
        },
    )
    .unwrap()
    .add("1.bias", &[0.0; 10], &[10], Storage::F32)
    .unwrap();
    let csr = write("csr-index.safetensors", &csr.to_bytes().unwrap());
    let mut colour = ArtifactBuilder::new(NetworkSpec {
        input: [3, 28, 28],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 3 * 784,
                out_features: 10,
            },
        ],
        ..tiny_network()
    });
    colour
        .add(
            "1.weight",
            &vec![0.0; 10 * 3 * 784],
            &[10, 3 * 784],
            Storage::F32,
        )
        .unwrap()
        .add("1.bias", &[0.0; 10], &[10], Storage::F32)
        .unwrap();
    let colour = write("colour.safetensors", &colour.to_bytes().unwrap());
    let missing = text(&root.join("missing.safetensors"));
    let folder = text(root);

    let infer = |kind, artifact: &str, expect: &[&str]| {
        Case::new(
            kind,
            Bin::Infer,
            &[artifact, "--limit", "10"],
            RUN_ERROR,
            expect,
        )
    };
    let cases = [
        infer(
            "missing artifact",
            &missing,
            &["missing.safetensors", "No such file"],
        ),
        infer(
            "a folder instead of an artifact",
            &folder,
            &["loading the artifact", &folder],
        ),
        infer(
            "empty artifact",
            &empty,
            &["empty.safetensors", "not a valid safetensors file"],
        ),
        infer(
            "truncated artifact",
            &truncated,
            &["truncated.safetensors", "not a valid safetensors file"],
        ),
        infer(
            "damaged header JSON",
            &damaged_header,
            &["damaged-header.safetensors", "not a valid safetensors file"],
        ),
        infer(
            "safetensors without the tch-mot metadata",
            &plain,
            &["plain.safetensors", "lacks the metadata entry `format`"],
        ),
        infer(
            "unknown format version",
            &future,
            &[
                "format version `99`",
                "this runtime reads versions 1, 2 and 3",
            ],
        ),
        infer(
            "negative int8 scale",
            &negative_scale,
            &[
                "`1.weight.scale` is invalid",
                "-0.5, not positive and finite",
            ],
        ),
        infer(
            "CSR column index out of range",
            &csr,
            &["`1.weight` is invalid", "784"],
        ),
        infer(
            "artifact for other images",
            &colour,
            &["colour.safetensors", "[3, 28, 28]", "[1, 28, 28]"],
        ),
    ];
    check_all(&cases, root);
}

#[test]
fn unusable_environment() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = text(&earlier_results(root));
    // Tests may run as root, for whom permissions block nothing: a regular file where a
    // folder must be created blocks everyone.
    let blocker = root.join("a-file");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let unwritable = text(&blocker.join("run"));
    let artifact = text(&root.join("earlier-run/teacher_float32.safetensors"));
    let cases = [
        Case::new(
            "output folder that cannot be created",
            Bin::Experiment,
            &[
                "--quick",
                "--quiet",
                "--device",
                "cpu",
                "--stages",
                "baseline",
                "--out",
                &unwritable,
            ],
            RUN_ERROR,
            &["creating the output folder", &unwritable],
        ),
        Case::new(
            "an output folder holding another run, without --resume",
            Bin::Experiment,
            &[
                "--quick", "--quiet", "--device", "cpu", "--stages", "baseline", "--out", &out,
            ],
            RUN_ERROR,
            &["already holds a run", "--resume"],
        ),
        Case::new(
            "a file as --data-dir",
            Bin::Experiment,
            &[
                "--quick",
                "--device",
                "cpu",
                "--data-dir",
                &text(&blocker),
                "--out",
                &out,
            ],
            RUN_ERROR,
            &["a-file", "is not a folder"],
        ),
        Case::new(
            "no dataset named and none in the current folder",
            Bin::Experiment,
            &[
                "--quick",
                "--device",
                "cpu",
                "--out",
                &text(&root.join("new-run")),
            ],
            RUN_ERROR,
            &[
                "no dataset folder found",
                "TCH_MOT_MNIST_DIR is not set",
                &text(&root.join("datasets/mnist")),
                "--data-dir DIR",
            ],
        )
        .isolated(),
        Case::new(
            "infer: no dataset named and none in the current folder",
            Bin::Infer,
            &[&artifact],
            RUN_ERROR,
            &["no dataset folder found", "TCH_MOT_MNIST_DIR=DIR"],
        )
        .isolated(),
        Case::new(
            "no artifact argument",
            Bin::Infer,
            &["--json"],
            USAGE_ERROR,
            &["<ARTIFACT>"],
        ),
    ];
    check_all(&cases, root);
}

/// `--device cuda` where CUDA is unusable is an error before anything is written; where it
/// is usable (a GPU machine), the run must succeed on the GPU.
#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = earlier_results(root);
    let args = [
        "--quick",
        "--quiet",
        "--stages",
        "baseline",
        "--device",
        "cuda",
        "--out",
        &text(&out),
    ];
    let case = Case::new(
        "--device cuda without a GPU",
        Bin::Experiment,
        &args,
        RUN_ERROR,
        &["--device cuda: no usable CUDA device", "--device cpu"],
    );
    if let Err(problem) = check(&case, root) {
        // A machine with a usable GPU: the run must really have used it.
        let report: Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        assert_eq!(report["device"], "cuda", "{problem}");
        assert_eq!(report["stages"]["baseline"]["status"], "ok", "{problem}");
    }
}
