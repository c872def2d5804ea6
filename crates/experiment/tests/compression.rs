//! End-to-end tests of the compression stages: one `--quick` run of the baseline,
//! distillation, quantization, pruning and pipeline stages, shared by the tests below.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// Structural size ratios hold in any run: int8 weights take a quarter of f32's bytes (plus
/// scales, biases and the header), f16 half. For the teacher; the student's 14k parameters
/// are too few for the header not to count.
const MIN_INT8_SIZE_RATIO: f64 = 3.9;
const MIN_FLOAT16_SIZE_RATIO: f64 = 1.95;
/// The runtime's full-integer model and LibTorch's fake-quantized model classify the same
/// images; a few may flip where a logit sits within a rounding step of another.
const QAT_ACCURACY_TOLERANCE: f64 = 0.01;

/// The MNIST copy of the source tree.
const BUNDLED_MNIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../datasets/mnist");

fn run() -> &'static (PathBuf, Value) {
    static RUN: OnceLock<(PathBuf, Value)> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let out = dir.join("run");
        let output = Command::new(env!("CARGO_BIN_EXE_experiment"))
            .env(mnist_data::DATA_DIR_VAR, BUNDLED_MNIST)
            .args(["--quick", "--quiet", "--device", "cpu", "--stages"])
            .arg("baseline,distillation,quantization,pruning,clustering,pipeline")
            .arg("--out")
            .arg(&out)
            .output()
            .expect("the experiment binary starts");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap())
            .expect("report.json is JSON");
        (out, report)
    })
}

fn rows<'a>(report: &'a Value, stage: &str, model: &str) -> Vec<&'a Value> {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["stage"] == stage && r["model"] == model)
        .collect()
}

fn f(row: &Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {row}"))
}

/// Every `.safetensors` file below `dir` that is an artifact (not a training checkpoint).
fn artifacts(dir: &std::path::Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            artifacts(&path, found);
        } else if path.extension().is_some_and(|e| e == "safetensors")
            && !path.to_string_lossy().contains("checkpoint")
        {
            found.push(path);
        }
    }
}

#[test]
fn every_artifact_records_the_input_normalisation() {
    let (out, _) = run();
    let mut found = Vec::new();
    artifacts(out, &mut found);
    assert!(found.len() >= 20, "{found:?}");
    for path in found {
        let model = runtime::Model::load(&path).unwrap();
        let norm = model
            .input_normalization()
            .unwrap_or_else(|| panic!("{} records no input normalisation", path.display()));
        assert_eq!(
            (norm.raw_max, &norm.mean[..], &norm.std[..]),
            (255.0, &[0.1307f32][..], &[0.3081f32][..]),
            "{}",
            path.display()
        );
    }
}

#[test]
fn every_row_names_a_file_on_disk_with_its_size() {
    let (out, report) = run();
    let rows = report["rows"].as_array().unwrap();
    let mut named = 0;
    for row in rows {
        let Some(artifact) = row["artifact"].as_str() else {
            continue;
        };
        let path = out.join(artifact);
        let size = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{} {}: {artifact}: {e}", row["stage"], row["variant"]))
            .len();
        assert_eq!(
            Some(size),
            row["size_bytes"].as_u64(),
            "{} {}",
            row["stage"],
            row["variant"]
        );
        named += 1;
    }
    assert!(named >= 20, "{named} rows name an artifact");
}

#[test]
fn quick_distillation_compares_two_students() {
    let (out, report) = run();
    assert_eq!(report["stages"]["distillation"]["status"], "ok");
    let rows = report["rows"].as_array().unwrap();
    let row = |variant: &str| {
        rows.iter()
            .find(|r| r["stage"] == "distillation" && r["variant"] == variant)
            .unwrap_or_else(|| panic!("no {variant} row"))
    };
    let (scratch, distilled) = (row("student_scratch"), row("student_distilled"));
    let hinted = row("student_distilled_hint");
    let hint_gain = f(&hinted["detail"]["hint"], "gain_over_distilled_mean");
    let expected = f(hinted, "test_accuracy") - f(distilled, "test_accuracy");
    assert!(
        (hint_gain - expected).abs() < 1e-12,
        "{hint_gain} vs {expected}"
    );
    let teacher_params = rows[0]["params"].as_u64().unwrap();
    for r in [scratch, distilled, hinted] {
        let accuracy = r["test_accuracy"].as_f64().unwrap();
        assert!(accuracy > 0.1 && accuracy <= 1.0, "{r}");
        assert!(r["params"].as_u64().unwrap() * 10 <= teacher_params, "{r}");
        assert_eq!(r["detail"]["seeds"].as_array().unwrap().len(), 1);
    }
    let gain = distilled["detail"]["distilled"]["accuracy_gain_mean"]
        .as_f64()
        .unwrap();
    let expected =
        distilled["test_accuracy"].as_f64().unwrap() - scratch["test_accuracy"].as_f64().unwrap();
    assert!((gain - expected).abs() < 1e-12, "{gain} vs {expected}");
    assert!(out.join(distilled["artifact"].as_str().unwrap()).exists());
}

#[test]
fn quantization_rows_cover_every_scheme_for_both_models() {
    let (out, report) = run();
    assert_eq!(report["stages"]["quantization"]["status"], "ok");
    for model in ["teacher_cnn", "student_cnn"] {
        let rows = rows(report, "quantization", model);
        let variants: Vec<&str> = rows
            .iter()
            .map(|r| r["variant"].as_str().unwrap())
            .collect();
        assert_eq!(
            variants,
            [
                "float32",
                "float16",
                "dynamic_int8",
                "static_int8_minmax",
                "static_int8_percentile",
                "static_int8_entropy",
                "static_int8_mse",
                "qat_int8"
            ],
            "{model}"
        );
        for row in &rows {
            let variant = row["variant"].as_str().unwrap();
            assert!(
                out.join(row["artifact"].as_str().unwrap()).exists(),
                "{row}"
            );
            let accuracy = f(row, "test_accuracy");
            assert!(accuracy > 0.1 && accuracy <= 1.0, "{row}");
            let expected = match variant {
                "float32" | "float16" => "f32",
                "dynamic_int8" => "int8-dynamic",
                _ => "int8-static",
            };
            let execution = row["detail"]["deployment"]["execution"].as_array().unwrap();
            assert!(!execution.is_empty());
            assert!(
                execution.iter().all(|e| e == expected),
                "{variant}: {execution:?}"
            );
            let ratio = f(&row["detail"]["deployment"], "size_ratio");
            let (min_float16, min_int8) = if model == "teacher_cnn" {
                (MIN_FLOAT16_SIZE_RATIO, MIN_INT8_SIZE_RATIO)
            } else {
                (1.5, 3.0)
            };
            match variant {
                "float32" => assert_eq!(ratio, 1.0),
                "float16" => assert!(ratio >= min_float16, "{row}"),
                _ => assert!(ratio >= min_int8, "{row}"),
            }
        }
        let selected: Vec<&str> = rows
            .iter()
            .filter(|r| r["detail"]["calibration"]["selected"] == true)
            .map(|r| r["variant"].as_str().unwrap())
            .collect();
        assert_eq!(selected, ["static_int8_percentile"], "{model}");
        let qat = rows.last().unwrap();
        let gap = (f(qat, "test_accuracy") - f(&qat["detail"]["qat"], "fake_quant_accuracy")).abs();
        assert!(
            gap <= QAT_ACCURACY_TOLERANCE,
            "{model}: runtime vs fake quantization {gap}"
        );
    }
}

/// The runtime's f32 model and LibTorch's classify the same images from the same weights; a
/// few may flip where two logits nearly tie.
const F32_ACCURACY_TOLERANCE: f64 = 0.01;

#[test]
fn clustered_rows_share_few_values_and_keep_the_pruned_zeros() {
    let (out, report) = run();
    assert_eq!(report["stages"]["clustering"]["status"], "ok");
    let rows = rows(report, "clustering", "teacher_cnn");
    assert_eq!(rows.len(), 12, "two rows per cluster count and base");
    let row = |variant: &str| {
        *rows
            .iter()
            .find(|r| r["variant"] == variant)
            .unwrap_or_else(|| panic!("no {variant} row"))
    };
    let pruned = rows_of_pruning(report, "sparsity_90");
    for (prefix, sparse) in [("", false), ("sparsity_90_", true)] {
        let mut previous_size = 0;
        for k in [8, 16, 32] {
            let palette = row(&format!("{prefix}clusters_{k}_palette"));
            let int8 = row(&format!("{prefix}clusters_{k}_int8"));
            let detail = &palette["detail"];
            // Every weight tensor shares at most k values, and zero besides where the
            // pruned zeros are kept.
            let most = k + usize::from(sparse);
            for layer in detail["layers"].as_array().unwrap() {
                assert!(f(layer, "distinct_values") as usize <= most, "{layer}");
            }
            // The artifact holds what was clustered: the same few values per tensor.
            let artifact = out.join(palette["artifact"].as_str().unwrap());
            let decoded = runtime::Artifact::load(&artifact).unwrap();
            for index in 0..decoded.graph().nodes.len() {
                let Some(layer) = decoded.layer(index) else {
                    continue;
                };
                let runtime::WeightValues::Float(values) = &layer.weight else {
                    panic!("layer {index} of {} is not f32", artifact.display());
                };
                let mut distinct: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
                distinct.sort_unstable();
                distinct.dedup();
                assert!(distinct.len() <= most, "layer {index}: {}", distinct.len());
                assert!(
                    layer.weight_scheme.name().starts_with("palette"),
                    "{}",
                    layer.weight_scheme.name()
                );
            }
            // Exact values: the runtime scores them as LibTorch does.
            assert!(
                (f(palette, "test_accuracy") - f(detail, "libtorch_accuracy")).abs()
                    <= F32_ACCURACY_TOLERANCE,
                "{palette}"
            );
            // Indices of a few bits beat int8 codes, and more clusters cost more bits.
            let size = palette["size_bytes"].as_u64().unwrap();
            assert!(size < int8["size_bytes"].as_u64().unwrap(), "{palette}");
            assert!(size > previous_size, "{palette}");
            previous_size = size;
            if sparse {
                assert!(
                    palette["nonzero_params"].as_u64() <= pruned["nonzero_params"].as_u64(),
                    "{palette}"
                );
                assert!(f(detail, "weight_sparsity") > 0.89, "{palette}");
            }
        }
    }
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    let chart = "plots/clustering_accuracy_size.svg";
    assert!(markdown.contains(chart), "{chart} not linked");
    let svg = std::fs::read_to_string(out.join(chart)).unwrap();
    assert!(svg.trim_end().ends_with("</svg>"));
}

fn rows_of_pruning<'a>(report: &'a Value, variant: &str) -> &'a Value {
    rows(report, "pruning", "teacher_cnn")
        .into_iter()
        .find(|r| r["variant"] == variant)
        .unwrap_or_else(|| panic!("no pruning {variant} row"))
}

#[test]
fn pruning_rows_reach_their_sparsity_and_shrink() {
    let (out, report) = run();
    assert_eq!(report["stages"]["pruning"]["status"], "ok");
    let rows = rows(report, "pruning", "teacher_cnn");
    let row = |variant: &str| {
        *rows
            .iter()
            .find(|r| r["variant"] == variant)
            .unwrap_or_else(|| panic!("no {variant} row"))
    };
    let dense = row("dense");
    for (variant, target) in [
        ("sparsity_50", 0.5),
        ("sparsity_75", 0.75),
        ("sparsity_90", 0.9),
    ] {
        let r = row(variant);
        // The first convolution stays dense; one magnitude threshold across the other
        // layers zeros round(s * their size) weights, where s makes the network's share the
        // target.
        let target_detail = &r["detail"]["target"];
        let layers = target_detail["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 3, "{r}");
        assert!(layers.iter().all(|l| l["name"] != "0.weight"));
        assert_eq!(target_detail["scope"], "Global");
        let s = f(&target_detail["schedule"]["PolynomialDecay"], "final_");
        assert!(s > target && s < target + 0.01, "{s}");
        let total: f64 = layers.iter().map(|l| f(l, "total")).sum();
        let zeros: f64 = layers.iter().map(|l| f(l, "zeros")).sum();
        assert!(
            (zeros - (s * total).round()).abs() <= 1.0,
            "{variant}: {zeros} of {total}"
        );
        assert!(
            (f(&r["detail"], "weight_sparsity") - target).abs() < 1e-3,
            "{r}"
        );
        assert!(r["nonzero_params"].as_u64() < dense["nonzero_params"].as_u64());
        assert!(
            r["gzip_bytes"].as_u64() < dense["gzip_bytes"].as_u64(),
            "{r}"
        );
        assert!(out.join(r["artifact"].as_str().unwrap()).exists());
    }
    // At 90% the large layers are stored as CSR and executed sparse.
    let r90 = row("sparsity_90");
    assert_eq!(
        r90["detail"]["target"]["storage"]["8.weight"], "csr",
        "{r90}"
    );
    assert!(
        r90["detail"]["deployment"]["execution"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "csr")
    );
    // Sparse and int8 together: TF-MOT's tutorial reaches 10x on MNIST.
    let r90_int8 = row("sparsity_90_int8");
    assert!(
        f(&r90_int8["detail"]["deployment"], "gzip_ratio") >= 12.0,
        "{r90_int8}"
    );
    // 2:4: every pruned layer keeps exactly half its weights.
    let n2m4 = row("n2m4");
    for layer in n2m4["detail"]["target"]["layers"].as_array().unwrap() {
        assert_eq!(f(layer, "zeros") * 2.0, f(layer, "total"), "{layer}");
    }
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    for chart in ["plots/pruning_accuracy.svg", "plots/pruning_schedule.svg"] {
        assert!(markdown.contains(chart), "{chart} not linked");
        let svg = std::fs::read_to_string(out.join(chart)).unwrap();
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}

#[test]
fn quick_pipeline_keeps_its_zeros_through_qat_and_ships_sparse_int8() {
    let (out, report) = run();
    assert_eq!(report["stages"]["pipeline"]["status"], "ok");
    let rows = rows(report, "pipeline", "compact_cnn");
    let variants: Vec<&str> = rows
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        variants,
        [
            "distilled_float32",
            "distilled_pruned_float32",
            "distilled_pruned_int8",
            "distilled_pruned_clustered_int8"
        ]
    );
    let (pruned, int8) = (rows[1], rows[2]);
    // The default target, 82% of all weights, is hit exactly by the pruning step...
    assert!(
        (f(&pruned["detail"], "weight_sparsity") - 0.82).abs() < 1e-3,
        "{pruned}"
    );
    // ...and quantization-aware training loses none of the zeros (it may add a few codes
    // that round to zero, never fewer).
    assert!(f(&int8["detail"], "weight_sparsity") >= f(&pruned["detail"], "weight_sparsity"));
    assert!(int8["nonzero_params"].as_u64() <= pruned["nonzero_params"].as_u64());
    // Sparse int8 storage: a bit per weight and a byte per kept code, so more than 100x
    // smaller than the float32 teacher whatever the accuracy of a quick run.
    assert!(
        f(&int8["detail"]["deployment"], "size_ratio") >= 100.0,
        "{int8}"
    );
    let artifact = std::fs::read(out.join(int8["artifact"].as_str().unwrap())).unwrap();
    assert_eq!(artifact.len() as u64, int8["size_bytes"].as_u64().unwrap());
    assert!(String::from_utf8_lossy(&artifact).contains("int8_sparse"));
    // Full-integer execution, and the runtime agrees with the fake-quantized network.
    assert!(
        int8["detail"]["deployment"]["execution"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e == "int8-static"),
        "{int8}"
    );
    let delta = (f(int8, "test_accuracy") - f(&int8["detail"], "fake_quant_accuracy")).abs();
    assert!(delta <= QAT_ACCURACY_TOLERANCE, "{int8}");
    assert_eq!(
        int8["detail"]["target"]["met"], false,
        "a quick run never claims the target"
    );

    // PCQAT, from the same pruned student: the zeros kept, at most 16 values per tensor
    // besides, stored palettized, and still run in integers as the fake-quantized network.
    let pcqat = rows[3];
    assert!(f(&pcqat["detail"], "weight_sparsity") >= f(&pruned["detail"], "weight_sparsity"));
    let clusters = pcqat["detail"]["clusters"].as_object().unwrap();
    assert_eq!(clusters.len(), 4, "{pcqat}");
    assert!(
        clusters.values().all(|v| v.as_u64().unwrap() <= 17),
        "{pcqat}"
    );
    let artifact = std::fs::read(out.join(pcqat["artifact"].as_str().unwrap())).unwrap();
    assert!(String::from_utf8_lossy(&artifact).contains("palette"));
    assert!(
        pcqat["size_bytes"].as_u64() < int8["size_bytes"].as_u64(),
        "{pcqat}"
    );
    assert!(
        pcqat["detail"]["deployment"]["execution"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e == "int8-static"),
        "{pcqat}"
    );
    let delta = (f(pcqat, "test_accuracy") - f(&pcqat["detail"], "fake_quant_accuracy")).abs();
    assert!(delta <= QAT_ACCURACY_TOLERANCE, "{pcqat}");
    assert_eq!(pcqat["detail"]["target"]["met"], false);
}
