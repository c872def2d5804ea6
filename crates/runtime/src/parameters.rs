//! A typed, read-only view of a decoded artifact, for tools that convert or inspect models
//! rather than run them (an exporter to another format, a report of what a file holds).

use std::path::Path;

use model_spec::{GraphSpec, NetworkSpec};
use quantization::QParams;

use model_spec::InputNormalization;

use crate::artifact::{Decoded, Granularity, Layer, Scheme, Weight, decode, grids};
use crate::error::{Error, Result};

/// The values of a conv2d or linear weight, as stored.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightValues {
    /// Real values in PyTorch's layout (`[out, in, k, k]` or `[out, in]`, row-major): the
    /// `f32` scheme as stored, the `f16` scheme widened (every value is exactly a half), the
    /// `csr` scheme as its dense equivalent, the `palette` and `palette_sparse` schemes
    /// decoded (every value is exactly a codebook entry, or zero where `palette_sparse`
    /// stores nothing).
    Float(Vec<f32>),
    /// Int8 codes (the `int8` scheme, or `int8_sparse` with the codes that are not stored
    /// filled in with their zero point), dequantized as
    /// `w[c, ...] = scales[c] * (codes[c, ...] - zero_points[c])`.
    Int8 {
        /// One code per element, PyTorch's layout.
        codes: Vec<i8>,
        /// One scale per output channel (a per-tensor scale repeated).
        scales: Vec<f32>,
        /// One zero point per output channel (a per-tensor zero point repeated).
        zero_points: Vec<i8>,
        /// How the artifact stores the scales and zero points: per tensor (all equal) or per
        /// output channel.
        granularity: Granularity,
    },
}

/// The parameters of one conv2d or linear layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerParameters {
    /// The weight's logical shape: `[out, in, kernel, kernel]` or `[out_features, in_features]`.
    pub weight_shape: Vec<usize>,
    /// How the artifact stores the weight.
    pub weight_scheme: Scheme,
    /// The weight's values.
    pub weight: WeightValues,
    /// How the artifact stores the bias (`f32` or `f16`).
    pub bias_scheme: Scheme,
    /// The bias, one per output channel (widened to f32 when stored as f16).
    pub bias: Vec<f32>,
    /// The calibrated quantization of the layer's input when the layer runs in full-integer
    /// (static) mode; `None` for dynamic-range int8 and for float layers.
    pub input_quantization: Option<QParams>,
}

/// A validated artifact, decoded into its network description and every layer's parameters
/// in their storage scheme. [`Artifact::from_bytes`] accepts exactly what
/// [`Model::from_bytes`](crate::Model::from_bytes) accepts (the same decoder), so whatever
/// is read here also runs.
///
/// ```
/// use model_spec::{LayerSpec, NetworkSpec};
/// use runtime::{Artifact, ArtifactBuilder, Granularity, Storage, WeightValues};
///
/// let network = NetworkSpec {
///     name: "tiny".into(),
///     input: [1, 1, 2],
///     layers: vec![LayerSpec::Flatten, LayerSpec::Linear { in_features: 2, out_features: 1 }],
/// };
/// let mut builder = ArtifactBuilder::new(network);
/// builder.add_layer(1, &[0.5, -1.0], &[0.25], Storage::Int8(Granularity::PerChannel))?;
/// let artifact = Artifact::from_bytes(&builder.to_bytes()?)?;
/// let linear = artifact.layer(1).expect("layer 1 has parameters");
/// let WeightValues::Int8 { codes, scales, .. } = &linear.weight else { unreachable!() };
/// assert_eq!(codes, &[64, -127]);
/// assert!((scales[0] - 1.0 / 127.0).abs() < 1e-9);
/// assert_eq!(linear.bias, [0.25]);
/// assert!(artifact.layer(0).is_none()); // flatten has no parameters
/// # Ok::<(), runtime::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Artifact {
    network: Option<NetworkSpec>,
    graph: GraphSpec,
    /// Every node's input grid, and the grid its output is written on.
    input_grids: Vec<Option<QParams>>,
    output_grids: Vec<Option<QParams>>,
    /// The scale and shift of every batch norm kept in a graph.
    batch_norms: Vec<Option<(Vec<f32>, Vec<f32>)>>,
    shapes: Vec<Vec<usize>>,
    layers: Vec<Option<LayerParameters>>,
    normalization: Option<InputNormalization>,
}

impl Artifact {
    /// Reads and validates the artifact at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes_named(&bytes, &path.display().to_string())
    }

    /// Validates an artifact held in memory. Never panics, whatever the bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_bytes_named(bytes, "<bytes>")
    }

    fn from_bytes_named(bytes: &[u8], file: &str) -> Result<Self> {
        let Decoded {
            network,
            graph,
            shapes: outputs,
            inputs,
            layers,
            normalization,
        } = decode(bytes, file)?;
        let (input_grids, readers_grids) = grids(&layers, &inputs);
        // A product or sum with input quantization writes its output on its readers' grid;
        // a concatenation with a grid, on that grid; anything else in f32.
        let output_grids = layers
            .iter()
            .zip(&input_grids)
            .zip(&readers_grids)
            .map(|((layer, input), readers)| match layer {
                Layer::Concat { input_quant } => *input_quant,
                Layer::Conv2d { .. } | Layer::Linear { .. } | Layer::Add { .. } => {
                    input.and(*readers)
                }
                _ => None,
            })
            .collect();
        let batch_norms = layers
            .iter()
            .map(|l| match l {
                Layer::BatchNorm { scale, shift } => Some((scale.clone(), shift.clone())),
                _ => None,
            })
            .collect();
        let layers = layers
            .into_iter()
            .zip(&graph.nodes)
            .map(|(layer, node)| {
                let (Layer::Conv2d { params, .. } | Layer::Linear { params, .. }) = layer else {
                    return None;
                };
                Some(LayerParameters {
                    weight_shape: node.op.weight_shape()?.0,
                    weight: weight_values(params.weight, &params.weight_scheme),
                    weight_scheme: params.weight_scheme,
                    bias_scheme: params.bias_scheme,
                    bias: params.bias,
                    input_quantization: params.input_quant,
                })
            })
            .collect();
        let shapes = std::iter::once(graph.input.to_vec())
            .chain(outputs)
            .collect();
        Ok(Self {
            network,
            graph,
            input_grids,
            output_grids,
            batch_norms,
            shapes,
            layers,
            normalization,
        })
    }

    /// How raw input becomes the network's input, when the artifact records it.
    pub fn input_normalization(&self) -> Option<&InputNormalization> {
        self.normalization.as_ref()
    }

    /// The sequential network description, for an artifact that carries one (`None` for a
    /// graph artifact).
    pub fn network(&self) -> Option<&NetworkSpec> {
        self.network.as_ref()
    }

    /// The graph: the artifact's, or its network as a chain of nodes named by layer index
    /// (node `i` is layer `i`).
    pub fn graph(&self) -> &GraphSpec {
        &self.graph
    }

    /// The per-sample input shape (without the batch dimension), then the output shape of
    /// every node: `shapes()[i + 1]` is what node `i` outputs, so for a sequential network
    /// `shapes()[i]` is what layer `i` receives and the last is the network's output.
    pub fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }

    /// The quantization of node `index`'s input: a conv2d or linear layer's calibrated input
    /// quantization (its [`LayerParameters::input_quantization`]), or the one grid every
    /// input of an `add` or `concat` node is requantized to; `None` otherwise.
    pub fn input_quantization(&self, index: usize) -> Option<QParams> {
        self.input_grids.get(index).copied().flatten()
    }

    /// The grid the runtime writes node `index`'s output on, as `u8` codes: a full-integer
    /// product or sum whose output a reader takes on a grid (directly or through ReLU,
    /// ReLU6, max pooling, flatten or dropout nodes), or a concatenation with a grid; `None`
    /// for an output in f32.
    pub fn output_quantization(&self, index: usize) -> Option<QParams> {
        self.output_grids.get(index).copied().flatten()
    }

    /// The `(scale, shift)` per channel of node `index` when it is a batch norm kept in a
    /// graph: `y = x * scale[c] + shift[c]`, as the runtime computes it.
    pub fn batch_norm(&self, index: usize) -> Option<(&[f32], &[f32])> {
        self.batch_norms
            .get(index)
            .and_then(Option::as_ref)
            .map(|(scale, shift)| (scale.as_slice(), shift.as_slice()))
    }

    /// The parameters of layer (node) `index`: `Some` for every conv2d and linear layer,
    /// `None` for the other layers and past the end.
    pub fn layer(&self, index: usize) -> Option<&LayerParameters> {
        self.layers.get(index).and_then(Option::as_ref)
    }
}

/// A decoded weight as the public type says it.
fn weight_values(weight: Weight, scheme: &Scheme) -> WeightValues {
    match weight {
        Weight::Dense(values) => WeightValues::Float(values),
        Weight::Csr(matrix) => WeightValues::Float(matrix.to_dense()),
        Weight::Int8 {
            values,
            scales,
            zero_points,
        } => WeightValues::Int8 {
            codes: values,
            scales,
            // The decoder read them as i8 codes and widened them.
            zero_points: zero_points.iter().map(|&z| z as i8).collect(),
            granularity: match scheme {
                Scheme::Int8 { granularity } | Scheme::Int8Sparse { granularity } => *granularity,
                _ => Granularity::PerChannel,
            },
        },
    }
}
