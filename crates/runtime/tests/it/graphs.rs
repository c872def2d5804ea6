//! Graph artifacts (format version 3): they load and run, and every malformed graph (a
//! cycle, a dangling input, mismatched shapes at a sum, an overflowing dimension, a batch norm
//! of negative variance) is an error that names the node, never a panic.

use model_spec::{GraphSpec, INPUT, Node, Op};
use ndarray::Array4;
use runtime::{ArtifactBuilder, Error, Execution, GRAPH_VERSION, Model, QParams, Storage};

use crate::common::{edit_file, edit_metadata};

fn conv(inp: usize, out: usize, groups: usize) -> Op {
    Op::Conv2d {
        in_channels: inp,
        out_channels: out,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        groups,
    }
}

/// A residual block with a depthwise convolution and a batch norm that stays.
fn spec() -> GraphSpec {
    GraphSpec {
        name: "block".into(),
        input: [2, 4, 4],
        nodes: vec![
            Node::new("dw", conv(2, 2, 2), &[INPUT]),
            Node::new("sum", Op::Add, &["dw", INPUT]),
            Node::new(
                "bn",
                Op::BatchNorm2d {
                    features: 2,
                    eps: 1e-5,
                },
                &["sum"],
            ),
            Node::new("gap", Op::GlobalAvgPool, &["bn"]),
            Node::new(
                "fc",
                Op::Linear {
                    in_features: 2,
                    out_features: 3,
                },
                &["gap"],
            ),
        ],
    }
}

/// The graph with simple parameters: the depthwise kernel is a centre tap of 1 (identity),
/// the batch norm doubles, the head sums the channels.
fn bytes(graph: GraphSpec) -> Vec<u8> {
    let mut centre = vec![0.0; 2 * 9];
    centre[4] = 1.0;
    centre[9 + 4] = 1.0;
    let mut b = ArtifactBuilder::for_graph(graph);
    b.add_layer(0, &centre, &[0.0, 0.0], Storage::F32).unwrap();
    b.add_batch_norm(2, &[2.0, 2.0], &[0.0, 0.0], &[0.0, 0.0], &[1.0, 1.0])
        .unwrap();
    b.add_layer(
        4,
        &[1.0, 1.0, 1.0, -1.0, 0.0, 0.0],
        &[0.0, 0.0, 1.0],
        Storage::F32,
    )
    .unwrap();
    b.to_bytes().unwrap()
}

fn err(bytes: &[u8]) -> String {
    Model::from_bytes(bytes).unwrap_err().to_string()
}

fn with_graph(graph: &GraphSpec) -> Vec<u8> {
    edit_metadata(&bytes(spec()), |m| {
        m.insert("graph".into(), serde_json::to_string(graph).unwrap());
    })
}

#[test]
fn a_graph_artifact_loads_and_computes_its_graph() {
    let model = Model::from_bytes(&bytes(spec())).unwrap();
    assert_eq!(model.graph(), &spec());
    assert!(model.network().is_none());
    // Channel 0 holds 1, channel 1 holds 3 everywhere: the block doubles (x + x), the batch
    // norm doubles again (scale 2 / sqrt(1 + eps)).
    let mut x = Array4::zeros((1, 2, 4, 4));
    x.slice_mut(ndarray::s![0, 0, .., ..]).fill(1.0);
    x.slice_mut(ndarray::s![0, 1, .., ..]).fill(3.0);
    let y = model.run(x.view()).unwrap();
    let s = 2.0 / (1.0f32 + 1e-5).sqrt();
    // The centre tap sees every pixel; padding does not reach it.
    let (a, b) = (2.0 * s, 6.0 * s);
    let expected = [a + b, a - b, 1.0];
    for (got, want) in y.iter().zip(expected) {
        assert!((got - want).abs() < 1e-5, "{got} against {want}");
    }
}

#[test]
fn the_version_and_the_description_must_agree() {
    let b = bytes(spec());
    let s = err(&edit_metadata(&b, |m| {
        m.insert("format_version".into(), "2".into());
    }));
    assert!(
        s.contains("version 2 artifacts have no `graph` entry"),
        "{s}"
    );
    let s = err(&edit_metadata(&b, |m| {
        m.insert("network".into(), "{}".into());
    }));
    assert!(s.contains("a network or a graph, not both"), "{s}");
    assert_eq!(GRAPH_VERSION, "3");
}

#[test]
fn malformed_graphs_are_errors_that_name_the_node() {
    // A cycle: `dw` takes `fc`, a later node.
    let mut g = spec();
    g.nodes[0].inputs = vec!["fc".into()];
    let s = err(&with_graph(&g));
    assert!(
        s.contains("`dw`") && s.contains("not an earlier node"),
        "{s}"
    );
    // A dangling input.
    let mut g = spec();
    g.nodes[1].inputs[1] = "nowhere".into();
    let s = err(&with_graph(&g));
    assert!(s.contains("`sum`") && s.contains("`nowhere`"), "{s}");
    // Mismatched shapes at a sum.
    let mut g = spec();
    g.nodes[0].op = Op::Conv2d {
        in_channels: 2,
        out_channels: 2,
        kernel: [3, 3],
        stride: [2, 2],
        padding: [1, 1],
        groups: 2,
    };
    let s = err(&with_graph(&g));
    assert!(s.contains("`sum`") && s.contains("add"), "{s}");
    // An overflowing dimension.
    let mut g = spec();
    g.input = [2, usize::MAX / 2, 4];
    let s = err(&with_graph(&g));
    assert!(s.contains("above the limit"), "{s}");
    // Groups that do not divide the channels.
    let mut g = spec();
    g.nodes[0].op = conv(2, 2, 3);
    let s = err(&with_graph(&g));
    assert!(s.contains("`dw`"), "{s}");
    // A node no later node reads.
    let mut g = spec();
    g.nodes[1].inputs = vec![INPUT.into(), INPUT.into()];
    let s = err(&with_graph(&g));
    assert!(
        s.contains("`dw`") && s.contains("feeds no later node"),
        "{s}"
    );
}

#[test]
fn batch_norm_vectors_are_validated() {
    let b = bytes(spec());
    let s = err(&edit_file(&b, |_, t| {
        let var = t.get_mut("bn.running_var").unwrap();
        var.2 = [(-1.0f32).to_le_bytes(), 1.0f32.to_le_bytes()].concat();
    }));
    assert!(
        s.contains("node `bn` (batch_norm2d)") && s.contains("channel 0"),
        "{s}"
    );
    let s = err(&edit_file(&b, |m, t| {
        t.remove("bn.running_mean");
        let tensors = m["tensors"].replace(r#""bn.running_mean":{"scheme":"f32"},"#, "");
        m.insert("tensors".into(), tensors);
    }));
    assert!(s.contains("bn.running_mean"), "{s}");
    // The builder refuses a batch norm on a node that is not one.
    let mut builder = ArtifactBuilder::for_graph(spec());
    let e = builder
        .add_batch_norm(0, &[1.0; 2], &[0.0; 2], &[0.0; 2], &[1.0; 2])
        .unwrap_err();
    assert!(matches!(e, Error::Builder { .. }) && e.to_string().contains("node 0 (conv2d)"));
}

/// `x` on the u8 grid `p`: the format's quantization rule.
fn quantize(p: QParams, x: f32) -> i64 {
    i64::from(p.quantize(x))
}

#[test]
fn full_integer_sums_are_exact() {
    // sum = x + x on grid g, requantized to the head's input grid o; the head picks each
    // value (identity weights, stored as code 127 with scale 1/127).
    let g = QParams::u8(0.1, 10);
    let o = QParams::u8(0.05, 3);
    let graph = GraphSpec {
        name: "sum".into(),
        input: [2, 1, 2],
        nodes: vec![
            Node::new("sum", Op::Add, &[INPUT, INPUT]),
            Node::new("relu", Op::Relu, &["sum"]),
            Node::new("flat", Op::Flatten, &["relu"]),
            Node::new(
                "fc",
                Op::Linear {
                    in_features: 4,
                    out_features: 4,
                },
                &["flat"],
            ),
        ],
    };
    let mut identity = vec![0.0; 16];
    for i in 0..4 {
        identity[i * 5] = 1.0;
    }
    let mut b = ArtifactBuilder::for_graph(graph);
    b.add_layer(
        3,
        &identity,
        &[0.0; 4],
        Storage::Int8(runtime::Granularity::PerChannel),
    )
    .unwrap();
    b.set_input_quantization(0, g).set_input_quantization(3, o);
    let model = Model::from_bytes(&b.to_bytes().unwrap()).unwrap();
    assert_eq!(
        model.execution(),
        [
            (0, Execution::Int8Static { u8_output: true }),
            (3, Execution::Int8Static { u8_output: false })
        ]
    );
    let xs = [-1.3f32, 0.26, 0.74, 2.0];
    let x = Array4::from_shape_vec((1, 2, 1, 2), xs.to_vec()).unwrap();
    let y = model.run(x.view()).unwrap();
    for (i, &x) in xs.iter().enumerate() {
        let q = quantize(g, x).clamp(0, 255);
        let acc = 2 * (q - i64::from(g.zero_point));
        // Requantized to o (ReLU: the clamp at o's zero point), then the head's product.
        let code =
            runtime::kernels::requantize(acc, 0, g.scale / o.scale, o.zero_point, o.zero_point);
        let head = (i64::from(code) - i64::from(o.zero_point)) * 127;
        let expected = head as f32 * (o.scale * (1.0 / 127.0)) + 0.0;
        assert_eq!(y[[0, i]], expected, "value {i}");
    }
}

#[test]
fn full_integer_concatenations_keep_one_grid() {
    let g = QParams::u8(0.02, 100);
    let graph = GraphSpec {
        name: "cat".into(),
        input: [1, 1, 2],
        nodes: vec![Node::new("cat", Op::Concat, &[INPUT, INPUT])],
    };
    let mut b = ArtifactBuilder::for_graph(graph);
    b.set_input_quantization(0, g);
    let model = Model::from_bytes(&b.to_bytes().unwrap()).unwrap();
    assert_eq!(
        model.execution(),
        [(0, Execution::Int8Static { u8_output: true })]
    );
    let xs = [0.5f32, -3.0];
    let y = model.run(
        Array4::from_shape_vec((1, 1, 1, 2), xs.to_vec())
            .unwrap()
            .view(),
    );
    let y = y.unwrap();
    let code = |x: f32| quantize(g, x).clamp(0, 255) as i32;
    let expected: Vec<f32> = [xs, xs]
        .concat()
        .iter()
        .map(|&x| g.dequantize(code(x)))
        .collect();
    assert_eq!(y.iter().copied().collect::<Vec<_>>(), expected);
}
