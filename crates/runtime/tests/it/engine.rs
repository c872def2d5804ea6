//! Numerical behaviour of loaded models against the f64 reference.

use model_spec::{LayerSpec, NetworkSpec};
use ndarray::Array2;
use runtime::{Execution, Granularity, Model, QParams};

use crate::common::{Store, artifact, images, mlp, params, reference, relative_error};

/// f32 GEMM and im2col against the f64 reference: the error is a few ulps times the depth.
const MAX_F32_RELATIVE_ERROR: f64 = 1e-5;
/// f16 storage: weights carry a relative error of 2^-11, outputs a little more after a few
/// layers.
const MAX_F16_RELATIVE_ERROR: f64 = 5e-3;
/// Int8 weights and u8 activations: a few percent of the largest logit.
const MAX_INT8_RELATIVE_ERROR: f64 = 0.05;

fn load(builder: &runtime::ArtifactBuilder) -> Model {
    Model::from_bytes(&builder.to_bytes().unwrap()).unwrap()
}

fn argmax_agreement(got: &Array2<f32>, expected: &Array2<f64>) -> f64 {
    let argmax = |row: Vec<f64>| {
        row.iter()
            .enumerate()
            .fold(
                (0, f64::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0
    };
    let agree = got
        .rows()
        .into_iter()
        .zip(expected.rows())
        .filter(|(g, e)| argmax(g.iter().map(|&v| f64::from(v)).collect()) == argmax(e.to_vec()))
        .count();
    agree as f64 / got.nrows() as f64
}

#[test]
fn f32_teacher_cnn_matches_the_reference() {
    let spec = NetworkSpec::teacher_cnn().without_batch_norm();
    let p = params(&spec, 1);
    let model = load(&artifact(&spec, &p, |_| Store::F32));
    assert_eq!(model.output_shape(), &[10]);
    assert!(model.execution().iter().all(|(_, e)| *e == Execution::F32));
    let x = images(3, &spec, 2);
    let (expected, _) = reference(&spec, &p, &x);
    let got = model.run(x.view()).unwrap();
    let err = relative_error(&got, &expected);
    assert!(err <= MAX_F32_RELATIVE_ERROR, "relative error {err}");
}

#[test]
fn padded_strided_convolutions_match_the_reference() {
    let spec = NetworkSpec {
        name: "strided".into(),
        input: [3, 9, 7],
        layers: vec![
            LayerSpec::Conv2d {
                in_channels: 3,
                out_channels: 5,
                kernel: 3,
                stride: 2,
                padding: 1,
            },
            LayerSpec::Relu,
            LayerSpec::Conv2d {
                in_channels: 5,
                out_channels: 4,
                kernel: 2,
                stride: 1,
                padding: 2,
            },
            LayerSpec::MaxPool2d {
                kernel: 3,
                stride: 2,
            },
            LayerSpec::Relu,
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 4 * 3 * 3,
                out_features: 6,
            },
        ],
    };
    spec.validate().unwrap();
    let p = params(&spec, 3);
    let x = images(5, &spec, 4);
    let (expected, _) = reference(&spec, &p, &x);
    let f32_out = load(&artifact(&spec, &p, |_| Store::F32))
        .run(x.view())
        .unwrap();
    assert!(relative_error(&f32_out, &expected) <= MAX_F32_RELATIVE_ERROR);
    // CSR: the strided convolution through im2col, the padded one directly.
    let csr = load(&artifact(&spec, &p, |_| Store::Csr));
    assert!(
        csr.execution()
            .iter()
            .all(|(_, e)| matches!(e, Execution::Csr { .. }))
    );
    let csr_out = csr.run(x.view()).unwrap();
    assert!(relative_error(&csr_out, &expected) <= MAX_F32_RELATIVE_ERROR);
    for g in [Granularity::PerChannel, Granularity::PerTensor] {
        let int8 = load(&artifact(&spec, &p, |_| Store::Int8(g)))
            .run(x.view())
            .unwrap();
        let err = relative_error(&int8, &expected);
        assert!(
            err <= MAX_INT8_RELATIVE_ERROR,
            "{g:?}: relative error {err}"
        );
    }
}

#[test]
fn flattened_and_image_inputs_give_the_same_logits() {
    let spec = mlp();
    let model = load(&artifact(&spec, &params(&spec, 5), |_| Store::F32));
    let x = images(4, &spec, 6);
    let flat = x.clone().into_shape_with_order((4, 784)).unwrap();
    let a = model.run(x.view()).unwrap();
    let b = model.run(flat.view()).unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    // Non-contiguous views work too.
    let t = flat.t().to_owned();
    let b = model.run(t.t()).unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn f16_weights_stay_close() {
    let spec = mlp();
    let p = params(&spec, 7);
    let x = images(8, &spec, 8);
    let (expected, _) = reference(&spec, &p, &x);
    let got = load(&artifact(&spec, &p, |_| Store::F16))
        .run(x.view())
        .unwrap();
    let err = relative_error(&got, &expected);
    assert!(err <= MAX_F16_RELATIVE_ERROR, "relative error {err}");
}

#[test]
fn dynamic_int8_teacher_stays_close_and_agrees_on_classes() {
    let spec = NetworkSpec::teacher_cnn().without_batch_norm();
    let p = params(&spec, 9);
    let model = load(&artifact(&spec, &p, |_| {
        Store::Int8(Granularity::PerChannel)
    }));
    assert!(
        model
            .execution()
            .iter()
            .all(|(_, e)| *e == Execution::Int8Dynamic)
    );
    let x = images(16, &spec, 10);
    let (expected, _) = reference(&spec, &p, &x);
    let got = model.run(x.view()).unwrap();
    let err = relative_error(&got, &expected);
    assert!(err <= MAX_INT8_RELATIVE_ERROR, "relative error {err}");
    assert!(argmax_agreement(&got, &expected) >= 0.85);
}

#[test]
fn mixed_schemes_run_together() {
    let spec = mlp();
    let mut p = params(&spec, 11);
    // Prune the first layer to 80 % sparsity by magnitude-free striding.
    for (i, w) in p.get_mut(&1).unwrap().weight.iter_mut().enumerate() {
        if i % 5 != 0 {
            *w = 0.0;
        }
    }
    let store = |i| match i {
        1 => Store::Csr,
        4 => Store::Int8(Granularity::PerTensor),
        _ => Store::F16,
    };
    let model = load(&artifact(&spec, &p, store));
    let exec = model.execution();
    assert_eq!(
        exec[0],
        (
            1,
            Execution::Csr {
                nnz: (784usize * 512).div_ceil(5)
            }
        )
    );
    assert_eq!(exec[1], (4, Execution::Int8Dynamic));
    assert_eq!(exec[2], (6, Execution::F32));
    let x = images(6, &spec, 12);
    let (expected, _) = reference(&spec, &p, &x);
    let err = relative_error(&model.run(x.view()).unwrap(), &expected);
    assert!(err <= MAX_INT8_RELATIVE_ERROR, "relative error {err}");
}

#[test]
fn csr_equals_dense_with_the_same_zeros() {
    let spec = NetworkSpec::teacher_cnn().without_batch_norm();
    let mut p = params(&spec, 13);
    for param in p.values_mut() {
        for (i, w) in param.weight.iter_mut().enumerate() {
            if i % 3 != 1 {
                *w = 0.0;
            }
        }
    }
    let x = images(3, &spec, 14);
    let dense = load(&artifact(&spec, &p, |_| Store::F32))
        .run(x.view())
        .unwrap();
    let sparse = load(&artifact(&spec, &p, |_| Store::Csr))
        .run(x.view())
        .unwrap();
    let (expected, _) = reference(&spec, &p, &x);
    assert!(relative_error(&dense, &expected) <= MAX_F32_RELATIVE_ERROR);
    assert!(relative_error(&sparse, &expected) <= MAX_F32_RELATIVE_ERROR);
}

#[test]
fn the_same_model_gives_the_same_bytes() {
    let spec = NetworkSpec::teacher_cnn().without_batch_norm();
    let p = params(&spec, 24);
    let first = calibrated(&spec, &p, 25).to_bytes().unwrap();
    // Builders are independent: a second one starts from fresh hash maps.
    for _ in 0..4 {
        let again = calibrated(&spec, &p, 25).to_bytes().unwrap();
        assert!(again == first, "the bytes differ between two builds");
    }
    load(&calibrated(&spec, &p, 25));
}

#[test]
fn sparse_int8_storage_runs_exactly_like_dense_int8() {
    let spec = NetworkSpec::teacher_cnn().without_batch_norm();
    let mut p = params(&spec, 21);
    for param in p.values_mut() {
        for (i, w) in param.weight.iter_mut().enumerate() {
            if i % 5 != 2 {
                *w = 0.0;
            }
        }
    }
    let x = images(4, &spec, 22);
    for g in [Granularity::PerChannel, Granularity::PerTensor] {
        let dense = artifact(&spec, &p, |_| Store::Int8(g));
        let sparse = artifact(&spec, &p, |_| Store::Int8Compact(g));
        let (dense_bytes, sparse_bytes) = (dense.to_bytes().unwrap(), sparse.to_bytes().unwrap());
        // A fifth of the codes kept: a bit per weight and a byte per kept code.
        assert!(
            (sparse_bytes.len() as f64) < 0.4 * dense_bytes.len() as f64,
            "{} vs {}",
            sparse_bytes.len(),
            dense_bytes.len()
        );
        let metadata = String::from_utf8_lossy(&sparse_bytes[..4096]).into_owned();
        assert!(metadata.contains("int8_sparse"), "{metadata}");
        let (a, b) = (load(&dense), load(&sparse));
        assert_eq!(a.execution(), b.execution());
        assert_eq!(a.run(x.view()).unwrap(), b.run(x.view()).unwrap(), "{g:?}");
    }
    // Dense weights stay in the plain int8 scheme, which is smaller for them.
    let p = params(&spec, 23);
    let compact = artifact(&spec, &p, |_| Store::Int8Compact(Granularity::PerChannel));
    let plain = artifact(&spec, &p, |_| Store::Int8(Granularity::PerChannel));
    let (compact, plain) = (compact.to_bytes().unwrap(), plain.to_bytes().unwrap());
    assert_eq!(compact, plain);
    assert!(!String::from_utf8_lossy(&compact).contains("int8_sparse"));
}

/// Calibrates every int8 layer's input on a batch (min/max including 0, like PyTorch's
/// MinMaxObserver) and marks it for full-integer execution.
fn calibrated(
    spec: &NetworkSpec,
    p: &std::collections::BTreeMap<usize, crate::common::Param>,
    seed: u64,
) -> runtime::ArtifactBuilder {
    let mut builder = artifact(spec, p, |_| Store::Int8(Granularity::PerChannel));
    let (_, inputs) = reference(spec, p, &images(32, spec, seed));
    for &i in p.keys() {
        let values: Vec<f32> = inputs[i].iter().map(|&v| v as f32).collect();
        builder.set_input_quantization(i, QParams::dynamic(&values));
    }
    builder
}

#[test]
fn static_int8_keeps_activations_u8_and_stays_close() {
    for spec in [mlp(), NetworkSpec::teacher_cnn().without_batch_norm()] {
        let p = params(&spec, 15);
        let model = load(&calibrated(&spec, &p, 16));
        let exec = model.execution();
        let last = exec.len() - 1;
        for (j, (_, e)) in exec.iter().enumerate() {
            assert_eq!(
                *e,
                Execution::Int8Static {
                    u8_output: j != last
                },
                "{}",
                spec.name
            );
        }
        let x = images(16, &spec, 17);
        let (expected, _) = reference(&spec, &p, &x);
        let got = model.run(x.view()).unwrap();
        let err = relative_error(&got, &expected);
        assert!(
            err <= MAX_INT8_RELATIVE_ERROR,
            "{}: relative error {err}",
            spec.name
        );
        assert!(argmax_agreement(&got, &expected) >= 0.85, "{}", spec.name);
    }
}

#[test]
fn static_results_do_not_depend_on_the_batch() {
    // Dynamic quantization picks its range per batch; static quantization does not, so a
    // sample gives bit-identical logits alone and in a batch.
    let spec = NetworkSpec::teacher_cnn().without_batch_norm();
    let p = params(&spec, 18);
    let model = load(&calibrated(&spec, &p, 19));
    let x = images(5, &spec, 20);
    let all = model.run(x.view()).unwrap();
    let one = model.run(x.slice(ndarray::s![2..3, .., .., ..])).unwrap();
    assert!(
        all.row(2)
            .iter()
            .zip(one.row(0))
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

#[test]
fn large_batches_agree_with_small_ones() {
    // Batch 256 takes the parallel paths of every kernel; f32 results must not change beyond
    // summation order.
    let spec = mlp();
    let model = load(&artifact(&spec, &params(&spec, 21), |_| Store::F32));
    let x = images(256, &spec, 22);
    let big = model.run(x.view()).unwrap();
    for i in [0, 100, 255] {
        let one = model
            .run(x.slice(ndarray::s![i..i + 1, .., .., ..]))
            .unwrap();
        for (a, b) in big.row(i).iter().zip(one.row(0)) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "sample {i}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn empty_batches_give_empty_outputs() {
    let spec = NetworkSpec::teacher_cnn().without_batch_norm();
    let model = load(&artifact(&spec, &params(&spec, 23), |_| {
        Store::Int8(Granularity::PerChannel)
    }));
    let out = model.run(images(0, &spec, 0).view()).unwrap();
    assert_eq!(out.shape(), &[0, 10]);
}

#[test]
fn wrong_input_shapes_are_errors() {
    let spec = NetworkSpec::teacher_cnn().without_batch_norm();
    let model = load(&artifact(&spec, &params(&spec, 24), |_| Store::F32));
    let err = model
        .run(ndarray::Array4::<f32>::zeros((2, 1, 27, 28)).view())
        .unwrap_err();
    assert!(matches!(err, runtime::Error::InputShape { .. }), "{err}");
    assert!(err.to_string().contains("[2, 1, 27, 28]"), "{err}");
    assert!(
        model
            .run(ndarray::Array2::<f32>::zeros((2, 783)).view())
            .is_err()
    );
    assert!(
        model
            .run(ndarray::Array1::<f32>::zeros(784).view())
            .is_err()
    );
}

#[test]
fn load_reads_files_and_names_them_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mlp.safetensors");
    let spec = mlp();
    let p = params(&spec, 25);
    artifact(&spec, &p, |_| Store::F32).write(&path).unwrap();
    let model = Model::load(&path).unwrap();
    assert_eq!(model.file(), path.display().to_string());
    let x = images(2, &spec, 26);
    let (expected, _) = reference(&spec, &p, &x);
    assert!(relative_error(&model.run(x.view()).unwrap(), &expected) <= MAX_F32_RELATIVE_ERROR);
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    let missing = dir.path().join("absent.safetensors");
    let err = Model::load(&missing).unwrap_err().to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let err = Model::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("mlp.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

/// The engine keeps images NHWC internally; networks that end on an image, or on a flattened
/// image with no linear layer after it, must still return PyTorch's (C, H, W) order, in f32
/// and in int8.
#[test]
fn image_outputs_come_back_in_pytorch_order() {
    let conv = |in_channels, out_channels, kernel, padding| LayerSpec::Conv2d {
        in_channels,
        out_channels,
        kernel,
        stride: 1,
        padding,
    };
    let tails: [Vec<LayerSpec>; 3] = [
        vec![],
        vec![LayerSpec::Flatten],
        vec![
            LayerSpec::MaxPool2d {
                kernel: 2,
                stride: 2,
            },
            LayerSpec::Relu,
        ],
    ];
    for tail in tails {
        let mut layers = vec![conv(3, 4, 3, 1), LayerSpec::Relu, conv(4, 5, 1, 0)];
        layers.extend(tail);
        let spec = NetworkSpec {
            name: "image_out".into(),
            input: [3, 6, 5],
            layers,
        };
        spec.validate().unwrap();
        let p = params(&spec, 11);
        let x = images(3, &spec, 12);
        let (expected, _) = reference(&spec, &p, &x);
        let got = load(&artifact(&spec, &p, |_| Store::F32))
            .run(x.view())
            .unwrap();
        assert!(relative_error(&got, &expected) <= MAX_F32_RELATIVE_ERROR);
        let csr = load(&artifact(&spec, &p, |_| Store::Csr))
            .run(x.view())
            .unwrap();
        assert!(relative_error(&csr, &expected) <= MAX_F32_RELATIVE_ERROR);
        let int8 = load(&artifact(&spec, &p, |_| {
            Store::Int8(Granularity::PerChannel)
        }))
        .run(x.view())
        .unwrap();
        let err = relative_error(&int8, &expected);
        assert!(err <= MAX_INT8_RELATIVE_ERROR, "relative error {err}");
    }
}
