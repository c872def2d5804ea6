//! The example in its quick mode: every step runs, and the int8 artifact the runtime
//! executes keeps the accuracy of the float model it came from.

use examples::{Options, bundled_mnist, run};

/// Accuracy the runtime's int8 artifact may lose against the pruned float32 student it came
/// from: 0.3 points.
const INT8_LOSS: f64 = 0.003;
/// Largest difference between the runtime's int8 accuracy and the fake-quantized model in
/// tch, which simulates the same grids in f32: 0.2 points (4 of 2000 images), for inputs
/// that lie within rounding of a tie between two codes.
const SIMULATION_GAP: f64 = 0.002;
/// Accuracy the clustered student's palettized artifact may lose against the pruned float32
/// student it came from: 16 values per tensor and an epoch of fine-tuning, 1 point.
const CLUSTERING_LOSS: f64 = 0.01;

#[test]
fn a_model_of_ones_own_goes_through_every_technique() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("own_mlp_int8.safetensors");
    let options = Options {
        artifact: Some(artifact.clone()),
        ..Options::quick(bundled_mnist())
    };
    let report = run(&options).unwrap();
    assert_eq!(report.test_images, 2000);
    assert!(report.teacher_accuracy > 0.9, "{report:?}");
    assert!(report.float16_accuracy > 0.9, "{report:?}");
    assert!(report.float16_scale > 1.0, "{report:?}");
    assert!(report.student_accuracy > 0.9, "{report:?}");
    assert!((report.sparsity - 0.75).abs() < 0.01, "{report:?}");
    assert!(
        report.runtime_accuracy >= report.pruned_accuracy - INT8_LOSS,
        "{report:?}"
    );
    assert!(
        (report.runtime_accuracy - report.qat_accuracy).abs() <= SIMULATION_GAP,
        "{report:?}"
    );
    assert!(
        report.execution.iter().all(|e| e.contains("Int8Static")),
        "{report:?}"
    );
    assert_eq!(
        std::fs::metadata(&artifact).unwrap().len(),
        report.artifact_bytes as u64
    );
    // 16 shared values and the kept zeros; 4-bit indices beat the int8 codes.
    assert!(report.clustered_values <= 17, "{report:?}");
    assert!(
        report.clustered_accuracy >= report.pruned_accuracy - CLUSTERING_LOSS,
        "{report:?}"
    );
    assert!(report.clustered_bytes < report.artifact_bytes, "{report:?}");
}
