//! Every storage scheme, exported to ONNX, checked by `onnx.checker` (full check) and run by
//! ONNX Runtime on real MNIST test images: its logits must match the pure-Rust runtime's.
//!
//! The Python side (`tests/run_onnx.py`) runs with the interpreter `TCH_MOT_PYTHON` names,
//! which `cargo xtask test` sets (the LibTorch environment, where the xtask installs the
//! pinned `onnx` and `onnxruntime`).

use std::path::{Path, PathBuf};
use std::process::Command;

use mnist_data::{Dataset, Normalization};
use model_spec::{GraphSpec, INPUT, LayerSpec, NetworkSpec, Node, Op};
use ndarray::{Array2, Array4, s};
use runtime::{Artifact, ArtifactBuilder, Granularity, Model, QParams, Scheme, Storage};

/// Test images compared (the first ones of the test split).
const IMAGES: usize = 256;
/// Images used to calibrate the static scheme (the ones after those compared).
const CALIBRATION_IMAGES: usize = 256;

/// Largest difference between ONNX Runtime's logits and ours, relative to the largest
/// logit, for float weights (f32, f16 widened to f32, CSR densified): both compute in f32
/// on the same values and differ only in summation order (measured: below 3e-7).
const MAX_FLOAT_RELATIVE_ERROR: f32 = 1e-4;
/// The same for int8 with the graph's quantization nodes executed as written (ONNX
/// Runtime's basic optimisations). `QuantizeLinear` with the calibrated parameters and
/// `DynamicQuantizeLinear` pick the runtime's codes, and the products of codes are exact in
/// both, so the logits agree to f32 rounding (measured: below 1e-7), except where an
/// activation lies within rounding of halfway between two codes and lands on the other
/// one: one code of one input moves a logit by a fraction of a step (measured: 8.2e-4, in
/// one image of 256, for the per-channel dynamic-range artifact).
const MAX_INT8_RELATIVE_ERROR: f32 = 2e-3;
/// The same for full-integer int8 as ONNX Runtime serves it by default: its optimiser fuses
/// the QDQ groups into `QLinearConv` and `QGemm`, whose AVX2 kernels (on CPUs without VNNI)
/// add pairs of `u8 x s8` products in saturating 16-bit arithmetic (`vpmaddubsw`), which
/// full 8-bit weight codes overflow. Measured: 0.14 of the largest logit on such a CPU,
/// 0 when the weights use only 7 bits (VNNI kernels accumulate in 32 bits instead). Predicted classes
/// must still agree.
const MAX_FUSED_STATIC_INT8_RELATIVE_ERROR: f32 = 0.25;

/// How every conv2d and linear layer of one artifact is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Case {
    F32,
    F16,
    Int8PerChannel,
    Int8PerTensor,
    /// Per-channel int8 with calibrated input quantization on every layer.
    Int8Static,
    /// Pruned weights in the `int8_sparse` scheme.
    Int8Sparse,
    /// Pruned weights in the `csr` scheme.
    Csr,
}

impl Case {
    /// The tolerance with the QDQ nodes executed as written (`fused: false`) and as ONNX
    /// Runtime runs them after all its optimisations (`fused: true`).
    fn tolerance(self, fused: bool) -> f32 {
        match self {
            Self::F32 | Self::F16 | Self::Csr => MAX_FLOAT_RELATIVE_ERROR,
            Self::Int8Static if fused => MAX_FUSED_STATIC_INT8_RELATIVE_ERROR,
            _ => MAX_INT8_RELATIVE_ERROR,
        }
    }
}

/// The teacher's layer sequence, narrower: conv (padded) + relu + pool, conv + relu + pool,
/// flatten, linear + relu, dropout, linear.
fn network() -> NetworkSpec {
    NetworkSpec {
        name: "small_cnn".into(),
        input: [1, 28, 28],
        layers: vec![
            LayerSpec::Conv2d {
                in_channels: 1,
                out_channels: 8,
                kernel: 3,
                stride: 1,
                padding: 1,
            },
            LayerSpec::Relu,
            LayerSpec::MaxPool2d {
                kernel: 2,
                stride: 2,
            },
            LayerSpec::Conv2d {
                in_channels: 8,
                out_channels: 16,
                kernel: 3,
                stride: 1,
                padding: 0,
            },
            LayerSpec::Relu,
            LayerSpec::MaxPool2d {
                kernel: 2,
                stride: 2,
            },
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 16 * 6 * 6,
                out_features: 32,
            },
            LayerSpec::Relu,
            LayerSpec::Dropout { p: 0.25 },
            LayerSpec::Linear {
                in_features: 32,
                out_features: 10,
            },
        ],
    }
}

/// A small deterministic generator (xorshift64*), uniform in [-1, 1).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// One layer's parameters: its index, the weight's shape, the weight and the bias.
type Param = (usize, Vec<usize>, Vec<f32>, Vec<f32>);

/// Seeded weights (PyTorch's default uniform range, `1 / sqrt(fan_in)`) and biases of
/// every conv2d and linear layer: `(index, shape, weight, bias)`.
fn parameters(spec: &NetworkSpec) -> Vec<Param> {
    let mut rng = Rng(0x5EED_0F0E_77A1_2345);
    let mut out = Vec::new();
    for (i, layer) in spec.layers.iter().enumerate() {
        let shape = match *layer {
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => vec![out_channels, in_channels, kernel, kernel],
            LayerSpec::Linear {
                in_features,
                out_features,
            } => vec![out_features, in_features],
            _ => continue,
        };
        let fan_in: usize = shape[1..].iter().product();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let weight = (0..shape.iter().product::<usize>())
            .map(|_| rng.uniform() * bound)
            .collect();
        let bias = (0..shape[0]).map(|_| rng.uniform() * bound).collect();
        out.push((i, shape, weight, bias));
    }
    out
}

/// Three weights in four set to zero, as magnitude pruning would leave them.
fn pruned(weight: &[f32]) -> Vec<f32> {
    weight
        .iter()
        .enumerate()
        .map(|(i, &w)| if i % 4 == 0 { w } else { 0.0 })
        .collect()
}

/// The bundled MNIST test split, normalised: the images compared and the calibration ones.
fn mnist() -> (Array4<f32>, Array4<f32>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist");
    let test = Dataset::load_test(&dir).expect("the bundled MNIST test split loads");
    let images = test.normalized(Normalization::default());
    let compared = images.slice(s![..IMAGES, .., .., ..]).to_owned();
    let calibration = images
        .slice(s![IMAGES..IMAGES + CALIBRATION_IMAGES, .., .., ..])
        .to_owned();
    (compared, calibration)
}

/// The calibrated input quantization of layer `layer`: min-max over what the f32 layers
/// before it give on the calibration images.
fn calibrate(spec: &NetworkSpec, params: &[Param], layer: usize, images: &Array4<f32>) -> QParams {
    if layer == 0 {
        return QParams::dynamic(images.as_slice().unwrap());
    }
    let prefix = NetworkSpec {
        name: "prefix".into(),
        input: spec.input,
        layers: spec.layers[..layer].to_vec(),
    };
    let mut b = ArtifactBuilder::new(prefix);
    for (i, shape, weight, bias) in params.iter().filter(|p| p.0 < layer) {
        b.add(&format!("{i}.weight"), weight, shape, Storage::F32)
            .unwrap();
        b.add(&format!("{i}.bias"), bias, &shape[..1], Storage::F32)
            .unwrap();
    }
    let model = Model::from_bytes(&b.to_bytes().unwrap()).unwrap();
    let activations = model.run(images.view()).unwrap();
    QParams::dynamic(activations.as_slice().unwrap())
}

fn artifact(case: Case, calibration: &Array4<f32>) -> Vec<u8> {
    let spec = network();
    let params = parameters(&spec);
    let mut b = ArtifactBuilder::new(spec.clone());
    for (i, shape, weight, bias) in &params {
        let name = format!("{i}.weight");
        match case {
            Case::F32 | Case::F16 => {
                let storage = if case == Case::F32 {
                    Storage::F32
                } else {
                    Storage::F16
                };
                b.add_layer(*i, weight, bias, storage).unwrap();
                continue;
            }
            Case::Int8PerChannel | Case::Int8Static => {
                b.add(&name, weight, shape, Storage::Int8(Granularity::PerChannel))
            }
            Case::Int8PerTensor => {
                b.add(&name, weight, shape, Storage::Int8(Granularity::PerTensor))
            }
            Case::Int8Sparse => b.add(
                &name,
                &pruned(weight),
                shape,
                Storage::Int8Smallest(Granularity::PerChannel),
            ),
            Case::Csr => b.add(&name, &pruned(weight), shape, Storage::Csr),
        }
        .unwrap();
        b.add(&format!("{i}.bias"), bias, &shape[..1], Storage::F32)
            .unwrap();
        if case == Case::Int8Static {
            b.set_input_quantization(*i, calibrate(&spec, &params, *i, calibration));
        }
    }
    b.to_bytes().unwrap()
}

/// What ONNX Runtime computes for `images` with one model.
struct OrtRun {
    /// With basic optimisations only: every QDQ node as written.
    basic: Array2<f32>,
    /// With every optimisation (the default).
    fused: Array2<f32>,
    /// Versions and the operators of the fully optimised graph, as JSON.
    ops: String,
}

/// Runs the ONNX model `onnx` on `images` with ONNX Runtime, after `onnx.checker`.
fn onnxruntime(onnx: &[u8], images: &Array4<f32>, dir: &Path) -> OrtRun {
    let Some(python) = std::env::var_os("TCH_MOT_PYTHON") else {
        panic!(
            "TCH_MOT_PYTHON is not set: it names the Python with onnx and onnxruntime that \
             this test runs. Run the tests with `cargo xtask test`, or \
             `eval \"$(cargo xtask env)\"` before `cargo test -p onnx-export`"
        );
    };
    let model = dir.join("model.onnx");
    let input = dir.join("input.f32");
    std::fs::write(&model, onnx).unwrap();
    let bytes: Vec<u8> = images.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&input, bytes).unwrap();
    let script: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/run_onnx.py");
    let result = Command::new(&python)
        .arg(&script)
        .args([&model, &input])
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.to_string_lossy()));
    assert!(
        result.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    let rows = images.shape()[0];
    let read = |name: &str| {
        let logits: Vec<f32> = std::fs::read(dir.join(name))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Array2::from_shape_vec((rows, logits.len() / rows), logits)
            .expect("one row of logits per image")
    };
    OrtRun {
        basic: read("basic.f32"),
        fused: read("all.f32"),
        ops: String::from_utf8_lossy(&result.stdout).trim().to_owned(),
    }
}

fn argmax(row: ndarray::ArrayView1<'_, f32>) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

fn check(case: Case) {
    let (images, calibration) = mnist();
    let bytes = artifact(case, &calibration);
    let view = Artifact::from_bytes(&bytes).unwrap();
    let expected_scheme = match case {
        Case::F32 => "f32",
        Case::F16 => "f16",
        Case::Int8PerChannel | Case::Int8PerTensor | Case::Int8Static => "int8",
        Case::Int8Sparse => "int8_sparse",
        Case::Csr => "csr",
    };
    // The first convolution's 72 weights are too few for int8_sparse to pay off.
    let scheme: &Scheme = &view.layer(3).unwrap().weight_scheme;
    assert_eq!(scheme.name(), expected_scheme, "{case:?}");
    compare(case, &bytes, &images);
}

/// A graph with every operation on MNIST's input: strided stem, depthwise-separable block
/// (a rectangular kernel, unequal paddings) with a residual sum, a batch norm that stays,
/// every activation, padded max pooling, a depthwise convolution with unequal strides, a
/// rectangular average pooling, a concatenation, a grouped convolution, global average
/// pooling, and a sum of features from two paths.
fn graph() -> GraphSpec {
    let conv = |inp, out, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2], groups| {
        Op::Conv2d {
            in_channels: inp,
            out_channels: out,
            kernel,
            stride,
            padding,
            groups,
        }
    };
    let linear = |inp, out| Op::Linear {
        in_features: inp,
        out_features: out,
    };
    GraphSpec {
        name: "every_op".into(),
        input: [1, 28, 28],
        nodes: vec![
            Node::new("stem", conv(1, 8, [3, 3], [2, 2], [1, 1], 1), &[INPUT]),
            Node::new("dw", conv(8, 8, [3, 5], [1, 1], [1, 2], 8), &["stem"]),
            Node::new("act", Op::Relu6, &["dw"]),
            Node::new("pw", conv(8, 8, [1, 1], [1, 1], [0, 0], 1), &["act"]),
            Node::new("sum", Op::Add, &["pw", "stem"]),
            Node::new(
                "bn",
                Op::BatchNorm2d {
                    features: 8,
                    eps: 1e-5,
                },
                &["sum"],
            ),
            Node::new("silu", Op::Silu, &["bn"]),
            Node::new("gelu", Op::Gelu, &["silu"]),
            Node::new("hswish", Op::HardSwish, &["gelu"]),
            Node::new(
                "max",
                Op::MaxPool2d {
                    kernel: [3, 3],
                    stride: [2, 2],
                    padding: [1, 1],
                },
                &["hswish"],
            ),
            Node::new("tanh", Op::Tanh, &["stem"]),
            Node::new("squeeze", conv(8, 8, [1, 2], [1, 2], [0, 0], 8), &["tanh"]),
            Node::new(
                "avg",
                Op::AvgPool2d {
                    kernel: [2, 1],
                    stride: [2, 1],
                },
                &["squeeze"],
            ),
            Node::new("sigmoid", Op::Sigmoid, &["avg"]),
            Node::new("cat", Op::Concat, &["max", "sigmoid"]),
            Node::new("grouped", conv(16, 16, [3, 3], [1, 1], [0, 0], 2), &["cat"]),
            Node::new("relu", Op::Relu, &["grouped"]),
            Node::new("gap", Op::GlobalAvgPool, &["relu"]),
            Node::new("flat", Op::Flatten, &["relu"]),
            Node::new("wide", linear(16 * 5 * 5, 16), &["flat"]),
            Node::new("features", Op::Add, &["gap", "wide"]),
            Node::new("drop", Op::Dropout { p: 0.2 }, &["features"]),
            Node::new("fc", linear(16, 10), &["drop"]),
        ],
    }
}

/// The graph with seeded parameters, in `case`'s scheme; full integer with the input of
/// every product, sum and concatenation on a grid over [-4, 4] (the stem's over the images).
fn graph_artifact(case: Case, calibration: &Array4<f32>) -> Vec<u8> {
    let spec = graph();
    let mut rng = Rng(0x6A09_E667_F3BC_C908);
    let mut b = ArtifactBuilder::for_graph(spec.clone());
    let grid = QParams::u8(8.0 / 255.0, 128);
    for (i, node) in spec.nodes.iter().enumerate() {
        if let Some((shape, out)) = node.op.weight_shape() {
            let fan_in: usize = shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            let weight: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| rng.uniform() * bound)
                .collect();
            let bias: Vec<f32> = (0..out).map(|_| rng.uniform() * bound).collect();
            let storage = match case {
                Case::F16 => Storage::F16,
                Case::Int8PerChannel | Case::Int8Static => Storage::Int8(Granularity::PerChannel),
                _ => Storage::F32,
            };
            b.add_layer(i, &weight, &bias, storage).unwrap();
        }
        if let Op::BatchNorm2d { features, .. } = node.op {
            let mut draw = |offset: f32| -> Vec<f32> {
                (0..features)
                    .map(|_| rng.uniform() * 0.5 + offset)
                    .collect()
            };
            let (gamma, beta, mean, var) = (draw(1.0), draw(0.0), draw(0.0), draw(1.0));
            b.add_batch_norm(i, &gamma, &beta, &mean, &var).unwrap();
        }
        let quantized = node.op.weight_shape().is_some() || matches!(node.op, Op::Add | Op::Concat);
        if case == Case::Int8Static && quantized {
            let q = if i == 0 {
                QParams::dynamic(calibration.as_slice().unwrap())
            } else {
                grid
            };
            b.set_input_quantization(i, q);
        }
    }
    b.to_bytes().unwrap()
}

fn check_graph(case: Case) {
    let (images, calibration) = mnist();
    let bytes = graph_artifact(case, &calibration);
    let model = Model::from_bytes(&bytes).unwrap();
    if case == Case::Int8Static {
        assert!(
            model
                .execution()
                .iter()
                .all(|(_, e)| matches!(e, runtime::Execution::Int8Static { .. })),
            "{:?}",
            model.execution()
        );
    }
    compare(case, &bytes, &images);
}

/// Runs the artifact `bytes` in the runtime and, exported, in ONNX Runtime on `images`:
/// the logits must agree within `case`'s tolerance, and the predicted classes exactly.
fn compare(case: Case, bytes: &[u8], images: &Array4<f32>) {
    let model = Model::from_bytes(bytes).unwrap();
    let ours = model.run(images.view()).unwrap();
    let onnx = onnx_export::export(bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ort = onnxruntime(&onnx, images, dir.path());
    eprintln!("{case:?}: {}", ort.ops);
    for (theirs, fused) in [(&ort.basic, false), (&ort.fused, true)] {
        let what = if fused { "fused" } else { "as written" };
        assert_eq!(theirs.shape(), ours.shape(), "{case:?}");
        let largest = ours.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = ours
            .iter()
            .zip(theirs)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let relative = worst / largest;
        let disagreements = ours
            .outer_iter()
            .zip(theirs.outer_iter())
            .filter(|(a, b)| argmax(a.view()) != argmax(b.view()))
            .count();
        let tolerance = case.tolerance(fused);
        eprintln!(
            "{case:?} ({what}): max |diff| {worst:.3e}, relative {relative:.3e} \
             (tolerance {tolerance:e}), argmax disagreements {disagreements} of {IMAGES}"
        );
        assert!(
            relative <= tolerance,
            "{case:?} ({what}): logits differ by {worst} ({relative} of the largest, \
             {largest}), above {tolerance}"
        );
        assert_eq!(
            disagreements, 0,
            "{case:?} ({what}): predicted classes differ"
        );
    }
}

#[test]
fn f32_weights_match() {
    check(Case::F32);
}

#[test]
fn f16_weights_match() {
    check(Case::F16);
}

#[test]
fn int8_per_channel_dynamic_range_matches() {
    check(Case::Int8PerChannel);
}

#[test]
fn int8_per_tensor_dynamic_range_matches() {
    check(Case::Int8PerTensor);
}

#[test]
fn int8_full_integer_matches() {
    check(Case::Int8Static);
}

#[test]
fn int8_sparse_weights_match() {
    check(Case::Int8Sparse);
}

#[test]
fn csr_weights_match() {
    check(Case::Csr);
}

#[test]
fn a_graph_of_every_operation_matches_in_f32() {
    check_graph(Case::F32);
}

#[test]
fn a_graph_of_every_operation_matches_in_f16() {
    check_graph(Case::F16);
}

#[test]
fn a_graph_of_every_operation_matches_in_dynamic_range_int8() {
    check_graph(Case::Int8PerChannel);
}

#[test]
fn a_graph_of_every_operation_matches_in_full_integer_int8() {
    check_graph(Case::Int8Static);
}
