//! Graph artifacts in the runtime against LibTorch: every operation of a graph, exported
//! from a `GraphNetwork` and run by `runtime::Model`, computes the network's eval-mode
//! logits; int8 graphs run every product in int8.

use model_spec::{GraphSpec, INPUT, Node, Op};
use models::export::{self, WeightFormat};
use models::{Calibrator, GraphNetwork};
use quantization::{BitWidth, Method};
use runtime::{Execution, Model};
use tch::{Device, Kind, Tensor, nn};

/// Largest difference between the runtime's f32 logits and LibTorch's, relative to the
/// largest logit: batch norm folded (one rounding per weight) and sums in another order, over
/// reductions of at most a few hundred terms.
const F32_TOLERANCE: f32 = 1e-4;

/// Largest difference between int8 and f32 logits, relative to the largest logit: weights
/// and activations each rounded to 8 bits over a few layers.
const INT8_TOLERANCE: f32 = 0.08;

/// A network of `spec` with random weights and batch-norm statistics far from the
/// identity, so that a batch norm that is folded, or kept, matters.
fn network(spec: &GraphSpec, seed: i64) -> (nn::VarStore, GraphNetwork) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = GraphNetwork::new(&vs.root(), spec).unwrap();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let fresh = if name.ends_with("running_var") {
                Tensor::rand_like(&var) + 0.5
            } else if name.ends_with("running_mean") || name.ends_with(".bias") {
                Tensor::randn_like(&var) * 0.2
            } else if var.dim() == 1 {
                Tensor::rand_like(&var) + 0.5
            } else {
                continue;
            };
            var.copy_(&fresh);
        }
    });
    (vs, net)
}

fn input(spec: &GraphSpec, batch: i64) -> Tensor {
    let [c, h, w] = spec.input.map(|d| d as i64);
    Tensor::randn([batch, c, h, w], (Kind::Float, Device::Cpu))
}

fn run(model: &Model, xs: &Tensor) -> Vec<f32> {
    let shape: Vec<usize> = xs.size().iter().map(|&d| d as usize).collect();
    let values = Vec::<f32>::try_from(xs.flatten(0, -1)).unwrap();
    let x = ndarray::ArrayD::from_shape_vec(shape, values).unwrap();
    model.run(x.view()).unwrap().iter().copied().collect()
}

fn logits(net: &GraphNetwork, xs: &Tensor) -> Vec<f32> {
    let y = tch::no_grad(|| net.f_forward_t(xs, false)).unwrap();
    Vec::<f32>::try_from(y.flatten(0, -1)).unwrap()
}

/// The largest difference relative to the largest expected value.
fn relative_error(got: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(got.len(), expected.len());
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter()
        .zip(expected)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// Exports `spec` with random parameters as f32, runs it in the runtime and compares with
/// LibTorch; returns the network, its store and the model for further checks.
fn check_f32(spec: &GraphSpec, seed: i64) -> (nn::VarStore, GraphNetwork, Model) {
    let (vs, net) = network(spec, seed);
    let bytes = export::graph_artifact(&net, &vs, WeightFormat::F32)
        .unwrap()
        .to_bytes()
        .unwrap();
    let model = Model::from_bytes(&bytes).unwrap();
    for batch in [1, 5] {
        let xs = input(spec, batch);
        let error = relative_error(&run(&model, &xs), &logits(&net, &xs));
        assert!(
            error < F32_TOLERANCE,
            "{}: relative error {error} at batch {batch}",
            spec.name
        );
    }
    (vs, net, model)
}

fn conv(inp: usize, out: usize, kernel: usize, stride: usize, padding: usize, groups: usize) -> Op {
    Op::Conv2d {
        in_channels: inp,
        out_channels: out,
        kernel: [kernel, kernel],
        stride: [stride, stride],
        padding: [padding, padding],
        groups,
    }
}

fn graph(name: &str, nodes: Vec<Node>) -> GraphSpec {
    GraphSpec {
        name: name.into(),
        input: [3, 9, 9],
        nodes,
    }
}

fn linear(inp: usize, out: usize) -> Op {
    Op::Linear {
        in_features: inp,
        out_features: out,
    }
}

#[test]
fn grouped_and_depthwise_convolutions() {
    let spec = graph(
        "grouped",
        vec![
            // Depthwise with a channel multiplier of 2, stride 2, padded.
            Node::new("dw2", conv(3, 6, 3, 2, 1, 3), &[INPUT]),
            // Depthwise proper, then ReLU (fused).
            Node::new("dw", conv(6, 6, 3, 1, 1, 6), &["dw2"]),
            Node::new("act", Op::Relu, &["dw"]),
            // Two groups of three inputs and two outputs.
            Node::new("grouped", conv(6, 4, 3, 1, 0, 2), &["act"]),
            Node::new("flat", Op::Flatten, &["grouped"]),
            Node::new("fc", linear(4 * 3 * 3, 5), &["flat"]),
        ],
    );
    let (_, _, model) = check_f32(&spec, 1);
    let executed: Vec<usize> = model.execution().iter().map(|(i, _)| *i).collect();
    assert_eq!(executed, [0, 1, 3, 5]);
}

#[test]
fn every_activation() {
    for (i, act) in [
        Op::Relu,
        Op::Relu6,
        Op::Sigmoid,
        Op::Tanh,
        Op::Gelu,
        Op::Silu,
        Op::HardSwish,
    ]
    .into_iter()
    .enumerate()
    {
        let spec = graph(
            act.name(),
            vec![
                Node::new("conv", conv(3, 4, 3, 1, 1, 1), &[INPUT]),
                Node::new("act", act, &["conv"]),
                // Read twice: not fused into the convolution.
                Node::new("sum", Op::Add, &["act", "conv"]),
                Node::new("act2", Op::Relu6, &["sum"]),
                Node::new("flat", Op::Flatten, &["act2"]),
                Node::new("fc", linear(4 * 81, 3), &["flat"]),
            ],
        );
        check_f32(&spec, 10 + i as i64);
    }
}

#[test]
fn pooling_of_every_kind() {
    let spec = graph(
        "pools",
        vec![
            Node::new("conv", conv(3, 5, 3, 1, 1, 1), &[INPUT]),
            Node::new(
                "max",
                Op::MaxPool2d {
                    kernel: [3, 3],
                    stride: [2, 2],
                    padding: [1, 1],
                },
                &["conv"],
            ),
            Node::new(
                "avg",
                Op::AvgPool2d {
                    kernel: [2, 3],
                    stride: [1, 2],
                },
                &["max"],
            ),
            Node::new(
                "square",
                Op::MaxPool2d {
                    kernel: [2, 2],
                    stride: [1, 1],
                    padding: [0, 0],
                },
                &["avg"],
            ),
            Node::new("gap", Op::GlobalAvgPool, &["square"]),
            Node::new("fc", linear(5, 4), &["gap"]),
        ],
    );
    check_f32(&spec, 2);
}

#[test]
fn residual_sums_and_batch_norm_that_stays() {
    let bn = |features| Op::BatchNorm2d {
        features,
        eps: 1e-5,
    };
    let spec = graph(
        "residual",
        vec![
            Node::new("a", conv(3, 4, 3, 1, 1, 1), &[INPUT]),
            // Folded into `a`.
            Node::new("a_bn", bn(4), &["a"]),
            Node::new("b", conv(3, 4, 1, 1, 0, 1), &[INPUT]),
            // `b` also feeds the sum: this batch norm stays a scale and shift.
            Node::new("b_bn", bn(4), &["b"]),
            Node::new("sum", Op::Add, &["a_bn", "b_bn", "b"]),
            // After a sum: stays.
            Node::new("sum_bn", bn(4), &["sum"]),
            Node::new("relu", Op::Relu, &["sum_bn"]),
            Node::new("flat", Op::Flatten, &["relu"]),
            Node::new("drop", Op::Dropout { p: 0.5 }, &["flat"]),
            Node::new("fc", linear(4 * 81, 3), &["drop"]),
        ],
    );
    let (_, _, model) = check_f32(&spec, 3);
    let deployed: Vec<&str> = model
        .graph()
        .nodes
        .iter()
        .map(|n| n.name.as_str())
        .collect();
    assert!(
        !deployed.contains(&"a_bn") && deployed.contains(&"b_bn"),
        "{deployed:?}"
    );
}

#[test]
fn concatenation_and_sums_of_mixed_layouts() {
    let spec = graph(
        "concat",
        vec![
            Node::new("a", conv(3, 2, 3, 1, 1, 1), &[INPUT]),
            Node::new("b", conv(3, 3, 1, 1, 0, 1), &[INPUT]),
            Node::new("cat", Op::Concat, &["a", "b", INPUT]),
            Node::new("c", conv(8, 4, 3, 2, 0, 1), &["cat"]),
            // Flattened NHWC features added to features in PyTorch's order.
            Node::new("flat", Op::Flatten, &["c"]),
            Node::new("gap", Op::GlobalAvgPool, &["cat"]),
            Node::new("wide", linear(8, 4 * 4 * 4), &["gap"]),
            Node::new("features", Op::Add, &["flat", "wide"]),
            Node::new("fc", linear(4 * 4 * 4, 6), &["features"]),
        ],
    );
    check_f32(&spec, 4);
}

#[test]
fn an_image_output_comes_back_in_pytorchs_order() {
    let spec = graph(
        "image",
        vec![
            Node::new("a", conv(3, 4, 3, 1, 1, 1), &[INPUT]),
            Node::new("b", conv(3, 4, 3, 1, 1, 1), &[INPUT]),
            Node::new("sum", Op::Add, &["a", "b"]),
        ],
    );
    check_f32(&spec, 5);
}

#[test]
fn the_presets_compute_libtorchs_logits() {
    let mut resnet = GraphSpec::resnet();
    let mut mobilenet = GraphSpec::mobilenet();
    for spec in [&mut resnet, &mut mobilenet] {
        let (_, _, model) = check_f32(spec, 6);
        // Every product, sum and concatenation of the deployed graph is listed.
        let listed = model
            .graph()
            .nodes
            .iter()
            .filter(|n| n.op.weight_shape().is_some() || matches!(n.op, Op::Add | Op::Concat))
            .count();
        assert_eq!(model.execution().len(), listed);
    }
}

/// Calibrates the input of every product and sum of `net` on `xs` and writes a
/// full-integer artifact of its deployed graph.
fn full_integer(spec: &GraphSpec, vs: &nn::VarStore, net: &GraphNetwork, xs: &Tensor) -> Model {
    let mut calibrator = Calibrator::new();
    net.calibrate(xs, &mut calibrator).unwrap();
    let ranges = calibrator
        .into_qparams(Method::MinMax, BitWidth::INT8)
        .unwrap();
    let deployed = spec.without_batch_norm();
    let mut builder = export::graph_artifact(net, vs, WeightFormat::Int8DynamicRange).unwrap();
    for (name, q) in ranges {
        let index = deployed.nodes.iter().position(|n| n.name == name).unwrap();
        builder.set_input_quantization(index, q);
    }
    Model::from_bytes(&builder.to_bytes().unwrap()).unwrap()
}

#[test]
fn int8_graphs_run_every_product_and_sum_in_int8() {
    for (spec, seed) in [(GraphSpec::resnet(), 7), (GraphSpec::mobilenet(), 8)] {
        let (vs, net) = network(&spec, seed);
        let xs = input(&spec, 16);
        let expected = logits(&net, &xs);
        let dynamic = export::graph_artifact(&net, &vs, WeightFormat::Int8DynamicRange)
            .unwrap()
            .to_bytes()
            .unwrap();
        let dynamic = Model::from_bytes(&dynamic).unwrap();
        let deployed = dynamic.graph().clone();
        let is_product = |i: usize| deployed.nodes[i].op.weight_shape().is_some();
        // Products run dynamic-range int8; sums, without a grid, f32.
        assert!(dynamic.execution().iter().all(|&(i, e)| if is_product(i) {
            e == Execution::Int8Dynamic
        } else {
            e == Execution::F32
        }));
        let error = relative_error(&run(&dynamic, &xs), &expected);
        assert!(error < INT8_TOLERANCE, "{} dynamic: {error}", spec.name);

        let stat = full_integer(&spec, &vs, &net, &xs);
        assert!(
            stat.execution()
                .iter()
                .all(|(_, e)| matches!(e, Execution::Int8Static { .. })),
            "{:?}",
            stat.execution()
        );
        let error = relative_error(&run(&stat, &xs), &expected);
        assert!(
            error < INT8_TOLERANCE,
            "{} full integer: {error}",
            spec.name
        );
        // One image alone gives what it gives in a batch: no per-batch ranges.
        let one = run(&stat, &xs.narrow(0, 3, 1));
        let all = run(&stat, &xs);
        let n = one.len();
        assert_eq!(one, all[3 * n..4 * n]);
    }
}

#[test]
fn rectangular_kernels_and_unequal_strides() {
    let rect = |inp, out, kernel, stride, padding, groups| Op::Conv2d {
        in_channels: inp,
        out_channels: out,
        kernel,
        stride,
        padding,
        groups,
    };
    // 3x9x9 -> 4x9x9 (1x3, padded sideways) -> 4x3x6 (3x1, strides 3 and 2, grouped)
    // -> 8x4x6 (2x3 depthwise with multiplier 2) -> 8x3x3 (2x2 dense, strides 1 and 2).
    let spec = graph(
        "rect",
        vec![
            Node::new("wide", rect(3, 4, [1, 3], [1, 1], [0, 1], 1), &[INPUT]),
            Node::new("tall", rect(4, 4, [3, 1], [3, 2], [0, 1], 2), &["wide"]),
            Node::new("act", Op::Relu, &["tall"]),
            Node::new("dw", rect(4, 8, [2, 3], [1, 1], [1, 1], 4), &["act"]),
            Node::new("mix", rect(8, 8, [2, 2], [1, 2], [0, 0], 1), &["dw"]),
            Node::new("flat", Op::Flatten, &["mix"]),
            Node::new("fc", linear(8 * 3 * 3, 5), &["flat"]),
        ],
    );
    let (vs, net, model) = check_f32(&spec, 9);
    let xs = input(&spec, 16);
    let stat = full_integer(&spec, &vs, &net, &xs);
    assert!(
        stat.execution()
            .iter()
            .all(|(_, e)| matches!(e, Execution::Int8Static { .. })),
        "{:?}",
        stat.execution()
    );
    let error = relative_error(&run(&stat, &xs), &logits(&net, &xs));
    assert!(error < INT8_TOLERANCE, "full integer: {error}");
    assert_eq!(model.graph().nodes.len(), spec.nodes.len());
}
