//! Building the ONNX graph of a decoded artifact.

use model_spec::Op;
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::{Dimension, dimension};
use onnx_protobuf::type_proto::{Tensor, Value};
use onnx_protobuf::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use protobuf::MessageField;
use runtime::{Artifact, Granularity, LayerParameters, QParams, Scheme, WeightValues};

use crate::error::{Error, Result};
use crate::{IR_VERSION, OPSET};

/// The graph's input and output names, and the symbolic batch dimension.
pub(crate) const INPUT: &str = "input";
pub(crate) const OUTPUT: &str = "logits";
const BATCH: &str = "batch";

/// The name of the tensor node `name` computes.
fn tensor(name: &str) -> String {
    format!("{name}.output")
}

/// Whether some reader of node `i`, whose output the runtime writes on grid `q`, would see
/// other values than those codes here: a reader that neither quantizes its input to `q`
/// itself nor passes it (ReLU, ReLU6, max pooling, flatten, dropout: they commute with
/// quantization) only to such readers.
fn quantized_for_some_reader(
    artifact: &Artifact,
    readers: &[Vec<usize>],
    i: usize,
    q: QParams,
) -> bool {
    readers[i].iter().any(|&r| {
        let passes = matches!(
            artifact.graph().nodes[r].op,
            Op::Relu | Op::Relu6 | Op::MaxPool2d { .. } | Op::Flatten | Op::Dropout { .. }
        );
        if passes {
            quantized_for_some_reader(artifact, readers, r, q)
        } else {
            artifact.input_quantization(r) != Some(q)
        }
    })
}

/// The `ModelProto` of `artifact`: one or a few ONNX nodes per node of its graph (a network
/// is the chain of nodes named by layer index).
pub(crate) fn model_proto(artifact: &Artifact) -> Result<ModelProto> {
    let spec = artifact.graph();
    let mut g = Graph::default();
    let mut current = INPUT.to_owned();
    let index: std::collections::HashMap<&str, usize> = spec
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); spec.nodes.len()];
    for (i, node) in spec.nodes.iter().enumerate() {
        for input in &node.inputs {
            if let Some(&j) = index.get(input.as_str()) {
                readers[j].push(i);
            }
        }
    }
    // The tensor each node's readers take (its output, or that quantized and dequantized).
    let mut outputs: Vec<String> = Vec::with_capacity(spec.nodes.len());
    for (i, node) in spec.nodes.iter().enumerate() {
        let unsupported = |reason: &str| Error::Unsupported {
            layer: i,
            op: node.op.name(),
            reason: reason.to_owned(),
        };
        let inputs: Vec<String> = node
            .inputs
            .iter()
            .map(|n| match index.get(n.as_str()) {
                Some(&j) => outputs[j].clone(),
                None => INPUT.to_owned(),
            })
            .collect();
        let x = inputs.first().cloned().unwrap_or_else(|| INPUT.to_owned());
        let output = tensor(&node.name);
        // The runtime requantizes a full-integer product's output when a reader takes it on
        // a grid; the reader's `QuantizeLinear` does the same here.
        let requantized = artifact.output_quantization(i).is_some();
        match node.op {
            Op::Conv2d {
                kernel,
                stride,
                padding,
                groups,
                ..
            } => {
                let params = artifact
                    .layer(i)
                    .ok_or_else(|| unsupported("no parameters"))?;
                let (x, w, b) = g.compute_inputs(&node.name, &x, params, requantized)?;
                let (p0, p1) = (dim(padding[0])?, dim(padding[1])?);
                g.node(
                    "Conv",
                    &[&x, &w, &b],
                    &[&output],
                    vec![
                        ints("kernel_shape", &[dim(kernel[0])?, dim(kernel[1])?]),
                        ints("strides", &[dim(stride[0])?, dim(stride[1])?]),
                        ints("pads", &[p0, p1, p0, p1]),
                        ints("dilations", &[1, 1]),
                        int("group", dim(groups)?),
                    ],
                );
            }
            Op::Linear { .. } => {
                let params = artifact
                    .layer(i)
                    .ok_or_else(|| unsupported("no parameters"))?;
                let (x, w, b) = g.compute_inputs(&node.name, &x, params, requantized)?;
                g.node("Gemm", &[&x, &w, &b], &[&output], vec![int("transB", 1)]);
            }
            Op::BatchNorm2d { features, .. } => {
                // The scale and shift the runtime computes, per channel of NCHW input.
                let (scale, shift) = artifact
                    .batch_norm(i)
                    .ok_or_else(|| unsupported("no scale and shift"))?;
                let (sn, tn) = (
                    format!("{}.scale", node.name),
                    format!("{}.shift", node.name),
                );
                g.f32_initializer(&sn, &[features, 1, 1], scale)?;
                g.f32_initializer(&tn, &[features, 1, 1], shift)?;
                let scaled = format!("{}.scaled", node.name);
                g.node("Mul", &[&x, &sn], &[&scaled], vec![]);
                g.node("Add", &[&scaled, &tn], &[&output], vec![]);
            }
            Op::Relu => g.node("Relu", &[&x], &[&output], vec![]),
            Op::Relu6 => {
                let (lo, hi) = (format!("{}.min", node.name), format!("{}.max", node.name));
                g.f32_initializer(&lo, &[], &[0.0])?;
                g.f32_initializer(&hi, &[], &[6.0])?;
                g.node("Clip", &[&x, &lo, &hi], &[&output], vec![]);
            }
            Op::Sigmoid => g.node("Sigmoid", &[&x], &[&output], vec![]),
            Op::Tanh => g.node("Tanh", &[&x], &[&output], vec![]),
            Op::Gelu => {
                // `x / 2 * (1 + erf(x / sqrt 2))`: ONNX has no `Gelu` before opset 20.
                let name = &node.name;
                let (c, h, one) = (
                    format!("{name}.inv_sqrt2"),
                    format!("{name}.half"),
                    format!("{name}.one"),
                );
                g.f32_initializer(&c, &[], &[std::f32::consts::FRAC_1_SQRT_2])?;
                g.f32_initializer(&h, &[], &[0.5])?;
                g.f32_initializer(&one, &[], &[1.0])?;
                let (scaled, erf, plus, halved) = (
                    format!("{name}.scaled"),
                    format!("{name}.erf"),
                    format!("{name}.plus"),
                    format!("{name}.halved"),
                );
                g.node("Mul", &[&x, &c], &[&scaled], vec![]);
                g.node("Erf", &[&scaled], &[&erf], vec![]);
                g.node("Add", &[&erf, &one], &[&plus], vec![]);
                g.node("Mul", &[&x, &h], &[&halved], vec![]);
                g.node("Mul", &[&halved, &plus], &[&output], vec![]);
            }
            Op::Silu => {
                let sigmoid = format!("{}.sigmoid", node.name);
                g.node("Sigmoid", &[&x], &[&sigmoid], vec![]);
                g.node("Mul", &[&x, &sigmoid], &[&output], vec![]);
            }
            Op::HardSwish => g.node("HardSwish", &[&x], &[&output], vec![]),
            Op::MaxPool2d {
                kernel,
                stride,
                padding,
            } => {
                let (p0, p1) = (dim(padding[0])?, dim(padding[1])?);
                g.node(
                    "MaxPool",
                    &[&x],
                    &[&output],
                    vec![
                        ints("kernel_shape", &[dim(kernel[0])?, dim(kernel[1])?]),
                        ints("strides", &[dim(stride[0])?, dim(stride[1])?]),
                        ints("pads", &[p0, p1, p0, p1]),
                    ],
                );
            }
            Op::AvgPool2d { kernel, stride } => g.node(
                "AveragePool",
                &[&x],
                &[&output],
                vec![
                    ints("kernel_shape", &[dim(kernel[0])?, dim(kernel[1])?]),
                    ints("strides", &[dim(stride[0])?, dim(stride[1])?]),
                ],
            ),
            Op::GlobalAvgPool => {
                let pooled = format!("{}.pooled", node.name);
                g.node("GlobalAveragePool", &[&x], &[&pooled], vec![]);
                g.node("Flatten", &[&pooled], &[&output], vec![int("axis", 1)]);
            }
            Op::Flatten => g.node("Flatten", &[&x], &[&output], vec![int("axis", 1)]),
            Op::Dropout { .. } => g.node("Identity", &[&x], &[&output], vec![]),
            Op::Add | Op::Concat => {
                // Full integer: every input brought to the node's one grid.
                let mut operands = Vec::with_capacity(inputs.len());
                for (k, input) in inputs.iter().enumerate() {
                    operands.push(match artifact.input_quantization(i) {
                        Some(q) => {
                            g.quantize_input(&format!("{}.{k}", node.name), input, Some(q))?
                        }
                        None => input.clone(),
                    });
                }
                let operands: Vec<&str> = operands.iter().map(String::as_str).collect();
                if node.op == Op::Add {
                    g.node("Sum", &operands, &[&output], vec![]);
                } else {
                    g.node("Concat", &operands, &[&output], vec![int("axis", 1)]);
                }
            }
        }
        // A node whose output the runtime writes as codes passes quantized values to every
        // reader: where a reader would see something else here (it does not quantize to
        // that grid itself, directly or after nodes that commute with quantization), the
        // output is quantized and dequantized once for all of them.
        let output = match artifact.output_quantization(i) {
            Some(q) if quantized_for_some_reader(artifact, &readers, i, q) => {
                g.quantize_input(&output, &output, Some(q))?
            }
            _ => output,
        };
        outputs.push(output.clone());
        current = output;
    }
    let shapes = artifact.shapes();
    let out_shape = shapes.last().map_or(&[][..], Vec::as_slice);
    let outputs: usize = out_shape.iter().product();
    // The runtime returns one flat row per sample.
    let op = if out_shape.len() == 1 {
        "Identity"
    } else {
        "Flatten"
    };
    let attributes = if op == "Flatten" {
        vec![int("axis", 1)]
    } else {
        Vec::new()
    };
    match g.nodes.last_mut() {
        Some(last) if op == "Identity" && last.output.len() == 1 && last.output[0] == current => {
            last.output[0] = OUTPUT.to_owned();
        }
        _ => g.node(op, &[&current], &[OUTPUT], attributes),
    }

    let [c, h, w] = spec.input;
    let input = value_info(
        INPUT,
        &[
            Dim::Batch,
            Dim::Fixed(dim(c)?),
            Dim::Fixed(dim(h)?),
            Dim::Fixed(dim(w)?),
        ],
    );
    let output = value_info(OUTPUT, &[Dim::Batch, Dim::Fixed(dim(outputs)?)]);
    let graph = GraphProto {
        name: spec.name.clone(),
        node: g.nodes,
        initializer: g.initializers,
        input: vec![input],
        output: vec![output],
        doc_string: format!(
            "{} exported from a tch-mot artifact (format version {})",
            spec.name,
            if artifact.network().is_some() {
                runtime::FORMAT_VERSION
            } else {
                runtime::GRAPH_VERSION
            }
        ),
        ..GraphProto::default()
    };
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
            ..OperatorSetIdProto::default()
        }],
        producer_name: "tch-mot".to_owned(),
        producer_version: env!("CARGO_PKG_VERSION").to_owned(),
        graph: MessageField::some(graph),
        metadata_props: vec![StringStringEntryProto {
            key: "tch-mot.network".to_owned(),
            value: spec.name.clone(),
            ..StringStringEntryProto::default()
        }],
        ..ModelProto::default()
    })
}

/// Nodes and initializers, in the order they are added (a topological order: every node
/// comes after the nodes that make its inputs).
#[derive(Default)]
struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

impl Graph {
    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) {
        let name = format!("{}_{}", op, self.nodes.len());
        self.nodes.push(NodeProto {
            name,
            op_type: op.to_owned(),
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: outputs.iter().map(|s| (*s).to_owned()).collect(),
            attribute: attributes,
            ..NodeProto::default()
        });
    }

    fn initializer(
        &mut self,
        name: &str,
        data_type: DataType,
        dims: &[usize],
        raw: Vec<u8>,
    ) -> Result<()> {
        self.initializers.push(TensorProto {
            name: name.to_owned(),
            data_type: data_type as i32,
            dims: dims.iter().map(|&d| dim(d)).collect::<Result<_>>()?,
            raw_data: raw,
            ..TensorProto::default()
        });
        Ok(())
    }

    fn f32_initializer(&mut self, name: &str, dims: &[usize], values: &[f32]) -> Result<()> {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, DataType::FLOAT, dims, raw)
    }

    /// A real tensor stored as the artifact stores it: f32 as it is, f16 as float16 with a
    /// `Cast` to f32 (named `name` either way).
    fn real(&mut self, name: &str, scheme: &Scheme, dims: &[usize], values: &[f32]) -> Result<()> {
        if *scheme == Scheme::F16 {
            let stored = format!("{name}_f16");
            // The values were widened from half precision: narrowing them back is exact.
            let raw = values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            self.initializer(&stored, DataType::FLOAT16, dims, raw)?;
            self.node(
                "Cast",
                &[&stored],
                &[name],
                vec![int("to", DataType::FLOAT as i64)],
            );
            Ok(())
        } else {
            self.f32_initializer(name, dims, values)
        }
    }

    /// The data, weight and bias inputs of node `i`'s `Conv` or `Gemm`, with the nodes that
    /// quantize its input and dequantize its parameters. `requantized`: the runtime
    /// requantizes the layer's output for the next layer (static int8 only).
    fn compute_inputs(
        &mut self,
        i: &str,
        x: &str,
        params: &LayerParameters,
        requantized: bool,
    ) -> Result<(String, String, String)> {
        let (weight, bias) = (format!("{i}.weight"), format!("{i}.bias"));
        let shape = &params.weight_shape;
        let out = shape.first().copied().unwrap_or(0);
        match &params.weight {
            WeightValues::Float(values) => {
                self.real(&weight, &params.weight_scheme, shape, values)?;
                self.real(&bias, &params.bias_scheme, &[out], &params.bias)?;
                Ok((x.to_owned(), weight, bias))
            }
            WeightValues::Int8 {
                codes,
                scales,
                zero_points,
                granularity,
            } => {
                let (quantized, scale, zero_point) = (
                    format!("{weight}_quantized"),
                    format!("{weight}_scale"),
                    format!("{weight}_zero_point"),
                );
                self.initializer(
                    &quantized,
                    DataType::INT8,
                    shape,
                    codes.iter().map(|&q| q as u8).collect(),
                )?;
                let per_channel = *granularity == Granularity::PerChannel;
                let (group_dims, groups): (&[usize], usize) =
                    if per_channel { (&[out], out) } else { (&[], 1) };
                let scales = &scales[..groups.min(scales.len())];
                self.f32_initializer(&scale, group_dims, scales)?;
                let zps = zero_points[..groups.min(zero_points.len())]
                    .iter()
                    .map(|&z| z as u8)
                    .collect();
                self.initializer(&zero_point, DataType::INT8, group_dims, zps)?;
                let axis = if per_channel {
                    vec![int("axis", 0)]
                } else {
                    vec![]
                };
                self.node(
                    "DequantizeLinear",
                    &[&quantized, &scale, &zero_point],
                    &[&weight],
                    axis,
                );

                let input = self.quantize_input(i, x, params.input_quantization)?;
                match params.input_quantization {
                    Some(q) if requantized => {
                        // The runtime's integer bias, `round(bias / (s_in * s_w[c]))`.
                        let acc_scales: Vec<f32> = (0..out)
                            .map(|c| q.scale * params_scale(params, c))
                            .collect();
                        let codes: Vec<i32> = params
                            .bias
                            .iter()
                            .zip(&acc_scales)
                            .map(|(&b, &s)| (b / s).round_ties_even() as i32)
                            .collect();
                        let (bq, bs) = (format!("{bias}_quantized"), format!("{bias}_scale"));
                        let raw = codes.iter().flat_map(|v| v.to_le_bytes()).collect();
                        self.initializer(&bq, DataType::INT32, &[out], raw)?;
                        self.f32_initializer(&bs, &[out], &acc_scales)?;
                        self.node(
                            "DequantizeLinear",
                            &[&bq, &bs],
                            &[&bias],
                            vec![int("axis", 0)],
                        );
                    }
                    _ => self.real(&bias, &params.bias_scheme, &[out], &params.bias)?,
                }
                Ok((input, weight, bias))
            }
        }
    }

    /// Quantizes and dequantizes the input `x` of node (or node input) `i`: with the calibrated parameters
    /// (static) or per batch (`DynamicQuantizeLinear`, the runtime's dynamic range).
    fn quantize_input(&mut self, i: &str, x: &str, q: Option<QParams>) -> Result<String> {
        let (quantized, scale, zero_point, dequantized) = (
            format!("{i}.input_quantized"),
            format!("{i}.input_scale"),
            format!("{i}.input_zero_point"),
            format!("{i}.input_dequantized"),
        );
        match q {
            Some(q) => {
                self.f32_initializer(&scale, &[], &[q.scale])?;
                // A decoded artifact's zero points are u8 codes.
                let zp = u8::try_from(q.zero_point).map_err(|_| Error::Unsupported {
                    layer: 0,
                    op: "input quantization",
                    reason: format!("`{i}`: zero point {} is not a u8 code", q.zero_point),
                })?;
                self.initializer(&zero_point, DataType::UINT8, &[], vec![zp])?;
                self.node(
                    "QuantizeLinear",
                    &[x, &scale, &zero_point],
                    &[&quantized],
                    vec![],
                );
            }
            None => self.node(
                "DynamicQuantizeLinear",
                &[x],
                &[&quantized, &scale, &zero_point],
                vec![],
            ),
        }
        self.node(
            "DequantizeLinear",
            &[&quantized, &scale, &zero_point],
            &[&dequantized],
            vec![],
        );
        Ok(dequantized)
    }
}

/// The weight scale of output channel `c` (the view repeats a per-tensor scale).
fn params_scale(params: &LayerParameters, c: usize) -> f32 {
    match &params.weight {
        WeightValues::Int8 { scales, .. } => {
            scales.get(c).or(scales.first()).copied().unwrap_or(1.0)
        }
        WeightValues::Float(_) => 1.0,
    }
}

/// A dimension or hyperparameter as ONNX's `int64`.
fn dim(d: usize) -> Result<i64> {
    // The decoder bounds every dimension far below `i64::MAX`.
    i64::try_from(d).map_err(|_| Error::Unsupported {
        layer: 0,
        op: "network",
        reason: format!("dimension {d} does not fit an int64"),
    })
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        type_: AttributeType::INT.into(),
        i: value,
        ..AttributeProto::default()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        type_: AttributeType::INTS.into(),
        ints: values.to_vec(),
        ..AttributeProto::default()
    }
}

enum Dim {
    Batch,
    Fixed(i64),
}

/// An f32 tensor value of the given shape.
fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Batch => dimension::Value::DimParam(BATCH.to_owned()),
                Dim::Fixed(n) => dimension::Value::DimValue(*n),
            }),
            ..Dimension::default()
        })
        .collect();
    let tensor = Tensor {
        elem_type: DataType::FLOAT as i32,
        shape: MessageField::some(TensorShapeProto {
            dim,
            ..TensorShapeProto::default()
        }),
        ..Tensor::default()
    };
    ValueInfoProto {
        name: name.to_owned(),
        type_: MessageField::some(TypeProto {
            value: Some(Value::TensorType(tensor)),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}
