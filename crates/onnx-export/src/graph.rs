//! Building the ONNX graph of a decoded artifact.

use model_spec::LayerSpec;
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

/// The `ModelProto` of `artifact`.
pub(crate) fn model_proto(artifact: &Artifact) -> Result<ModelProto> {
    let network = artifact.network().ok_or_else(|| Error::Graph {
        graph: artifact.graph().name.clone(),
    })?;
    let mut g = Graph::default();
    let mut current = INPUT.to_owned();
    // The index of the next conv2d/linear layer after each layer, to know whether a static
    // layer's output is requantized (the runtime's rule).
    let next_compute =
        |i: usize| (i + 1..network.layers.len()).find(|&j| artifact.layer(j).is_some());
    for (i, layer) in network.layers.iter().enumerate() {
        let unsupported = |reason: &str| Error::Unsupported {
            layer: i,
            op: layer.op(),
            reason: reason.to_owned(),
        };
        let output = format!("{i}.output");
        match *layer {
            LayerSpec::Conv2d {
                kernel,
                stride,
                padding,
                ..
            } => {
                let params = artifact
                    .layer(i)
                    .ok_or_else(|| unsupported("no parameters"))?;
                let requantized = next_compute(i)
                    .and_then(|j| artifact.layer(j))
                    .is_some_and(|p| p.input_quantization.is_some());
                let (x, w, b) = g.compute_inputs(i, &current, params, requantized)?;
                let (k, s, p) = (dim(kernel)?, dim(stride)?, dim(padding)?);
                g.node(
                    "Conv",
                    &[&x, &w, &b],
                    &[&output],
                    vec![
                        ints("kernel_shape", &[k, k]),
                        ints("strides", &[s, s]),
                        ints("pads", &[p, p, p, p]),
                        ints("dilations", &[1, 1]),
                        int("group", 1),
                    ],
                );
                current = output;
            }
            LayerSpec::Linear { .. } => {
                let params = artifact
                    .layer(i)
                    .ok_or_else(|| unsupported("no parameters"))?;
                let requantized = next_compute(i)
                    .and_then(|j| artifact.layer(j))
                    .is_some_and(|p| p.input_quantization.is_some());
                let (x, w, b) = g.compute_inputs(i, &current, params, requantized)?;
                g.node("Gemm", &[&x, &w, &b], &[&output], vec![int("transB", 1)]);
                current = output;
            }
            LayerSpec::Relu => {
                g.node("Relu", &[&current], &[&output], vec![]);
                current = output;
            }
            LayerSpec::MaxPool2d { kernel, stride } => {
                let (k, s) = (dim(kernel)?, dim(stride)?);
                g.node(
                    "MaxPool",
                    &[&current],
                    &[&output],
                    vec![ints("kernel_shape", &[k, k]), ints("strides", &[s, s])],
                );
                current = output;
            }
            LayerSpec::Flatten => {
                g.node("Flatten", &[&current], &[&output], vec![int("axis", 1)]);
                current = output;
            }
            LayerSpec::Dropout { .. } => {}
            LayerSpec::BatchNorm2d { .. } => {
                // The decoder refuses batch norm; kept for a network built some other way.
                return Err(unsupported(
                    "batch norm must be folded into the preceding convolution",
                ));
            }
        }
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

    let [c, h, w] = network.input;
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
        name: network.name.clone(),
        node: g.nodes,
        initializer: g.initializers,
        input: vec![input],
        output: vec![output],
        doc_string: format!(
            "{} exported from a tch-mot artifact (format version {})",
            network.name,
            runtime::FORMAT_VERSION
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
            value: network.name.clone(),
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

    /// The data, weight and bias inputs of layer `i`'s `Conv` or `Gemm`, with the nodes that
    /// quantize its input and dequantize its parameters. `requantized`: the runtime
    /// requantizes the layer's output for the next layer (static int8 only).
    fn compute_inputs(
        &mut self,
        i: usize,
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

    /// Quantizes and dequantizes an int8 layer's input: with the calibrated parameters
    /// (static) or per batch (`DynamicQuantizeLinear`, the runtime's dynamic range).
    fn quantize_input(&mut self, i: usize, x: &str, q: Option<QParams>) -> Result<String> {
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
                    layer: i,
                    op: "input quantization",
                    reason: format!("zero point {} is not a u8 code", q.zero_point),
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
