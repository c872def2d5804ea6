//! End-to-end test of the `precision` stage: a real `--quick` run on the CPU.

use std::process::Command;

use serde_json::Value;

/// Smallest test accuracy a quick run may report: one epoch on 6000 images (and 100
/// float16 steps of the small network) is far from converged but far above chance (10%).
const MIN_QUICK_ACCURACY: f64 = 0.5;

/// The MNIST copy of the source tree.
const BUNDLED_MNIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../datasets/mnist");

#[test]
fn quick_precision_stage_reports_both_policies_the_demo_and_the_audit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_experiment"))
        .env(mnist_data::DATA_DIR_VAR, BUNDLED_MNIST)
        .args([
            "--quick",
            "--quiet",
            "--device",
            "cpu",
            "--stages",
            "precision",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .expect("the experiment binary starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");

    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["stages"]["precision"]["status"], "ok");
    let rows = report["rows"].as_array().unwrap();
    let variants: Vec<&str> = rows
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        variants,
        ["float32", "mixed_bfloat16", "mixed_float16_small_demo"]
    );
    for row in rows {
        let variant = row["variant"].as_str().unwrap();
        assert_eq!(row["stage"], "precision", "{variant}");
        assert_eq!(row["engine"], "libtorch", "{variant}");
        assert_eq!(
            row["detail"]["policy"],
            variant.trim_end_matches("_small_demo")
        );
        let accuracy = row["test_accuracy"].as_f64().unwrap();
        assert!(
            accuracy > MIN_QUICK_ACCURACY && accuracy <= 1.0,
            "{variant}: accuracy {accuracy}"
        );
        for field in [
            "train_seconds",
            "train_samples_per_second",
            "infer_samples_per_second",
        ] {
            assert!(row[field].as_f64().unwrap() > 0.0, "{variant}: {field}");
        }
    }
    let (float32, bfloat16, demo) = (&rows[0], &rows[1], &rows[2]);
    assert_eq!(float32["model"], "teacher_cnn");
    assert_eq!(float32["params"], 225_226);
    assert_eq!(bfloat16["params"], 225_226);
    // bfloat16 needs no loss scaling, so no scaler ran.
    assert!(bfloat16["detail"].get("scaling").is_none());
    let against = &bfloat16["detail"]["against_float32"];
    assert!(against["train_speedup"].as_f64().unwrap() > 0.0);
    assert!(against["accuracy_difference_pp"].is_f64());

    // The demonstration starts at 2^24, where the first gradients overflow float16: the
    // scaler must have skipped steps and backed off, and still trained.
    assert_eq!(demo["model"], "mlp_784_64_10");
    assert!(
        demo["detail"]["note"]
            .as_str()
            .unwrap()
            .contains("not a speed result")
    );
    assert_eq!(demo["detail"]["train_steps"], 100);
    let scaling = &demo["detail"]["scaling"];
    let skipped = scaling["skipped_steps"].as_u64().unwrap();
    assert!((1..100).contains(&skipped), "skipped {skipped}");
    let final_scale = scaling["final_loss_scale"].as_f64().unwrap();
    assert!((1.0..16_777_216.0).contains(&final_scale), "{final_scale}");
    let history = scaling["history"].as_array().unwrap();
    assert_eq!(history[0]["step"], 0);
    assert_eq!(history[0]["scale"], 16_777_216.0);
    assert_eq!(history.last().unwrap()["scale"].as_f64(), Some(final_scale));

    // The audit of the float32 gradients, with a recommendation.
    let audit = &float32["detail"]["gradient_audit"]["audit"];
    assert_eq!(audit["scales"].as_array().unwrap().len(), 5);
    assert!(audit["values"].as_u64().unwrap() > 225_226);
    assert!(
        float32["detail"]["gradient_audit"]["steps"]
            .as_u64()
            .unwrap()
            >= 2
    );

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for expected in [
        "| precision | float32 | teacher_cnn | 225226 |",
        "| precision | mixed_bfloat16 | teacher_cnn | 225226 |",
        "## Stage precision",
        "mixed_bfloat16: trains ",
        "percentage points",
        "Loss-scale trace of mixed_float16_small_demo",
        "| 0 | 16777216 |",
        "Gradient-underflow audit",
        "| loss scale | underflow to 0 in f16 | overflow to inf in f16 |",
        "| 2^15 |",
    ] {
        assert!(md.contains(expected), "missing {expected:?} in\n{md}");
    }
    assert!(
        md.contains("Recommended loss scale") || md.contains("No scale qualifies"),
        "{md}"
    );
}
