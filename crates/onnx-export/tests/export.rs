//! `export` and `export_file` without ONNX Runtime: errors, and the atomic write.

use model_spec::{LayerSpec, NetworkSpec};
use onnx_export::{Error, export, export_file};
use runtime::{ArtifactBuilder, Storage};

fn artifact() -> Vec<u8> {
    let network = NetworkSpec {
        name: "tiny".into(),
        input: [1, 2, 2],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 4,
                out_features: 2,
            },
        ],
    };
    let mut b = ArtifactBuilder::new(network);
    b.add(
        "1.weight",
        &[0.5, 1.0, -1.0, 2.0, 0.0, 0.25, 3.0, -0.5],
        &[2, 4],
        Storage::F16,
    )
    .unwrap()
    .add("1.bias", &[0.1, -0.1], &[2], Storage::F32)
    .unwrap();
    b.to_bytes().unwrap()
}

#[test]
fn the_same_artifact_gives_the_same_bytes() {
    let bytes = artifact();
    let onnx = export(&bytes).unwrap();
    assert_eq!(export(&bytes).unwrap(), onnx);
    // The graph names its input and output.
    let text = String::from_utf8_lossy(&onnx);
    assert!(text.contains("input") && text.contains("logits"));
}

#[test]
fn a_damaged_artifact_is_an_artifact_error() {
    let bytes = artifact();
    let err = export(&bytes[..bytes.len() / 2]).unwrap_err();
    assert!(matches!(err, Error::Artifact(_)), "{err:?}");
    assert!(matches!(
        export(b"not an artifact"),
        Err(Error::Artifact(_))
    ));
}

#[test]
fn export_file_writes_the_model_and_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("model.safetensors");
    let dst = dir.path().join("model.onnx");
    std::fs::write(&src, artifact()).unwrap();
    export_file(&src, &dst).unwrap();
    assert_eq!(std::fs::read(&dst).unwrap(), export(&artifact()).unwrap());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_failed_export_leaves_the_destination_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("broken.safetensors");
    let dst = dir.path().join("model.onnx");
    std::fs::write(&src, b"broken").unwrap();
    std::fs::write(&dst, b"previous").unwrap();
    assert!(matches!(export_file(&src, &dst), Err(Error::Artifact(_))));
    assert_eq!(std::fs::read(&dst).unwrap(), b"previous");

    let missing = dir.path().join("missing.safetensors");
    let err = export_file(&missing, &dst).unwrap_err();
    assert!(err.to_string().contains("missing.safetensors"), "{err}");

    std::fs::write(&src, artifact()).unwrap();
    let nowhere = dir.path().join("no such folder").join("model.onnx");
    let err = export_file(&src, &nowhere).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if *path == nowhere),
        "{err:?}"
    );
}
