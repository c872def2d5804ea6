//! The artifact format: one safetensors file holding the network description, every
//! parameter in its storage scheme, and optional activation quantization parameters.
//! `docs/FORMAT.md` is the specification; this module reads it back with full validation
//! ([`decode`]); [`crate::ArtifactBuilder`] writes it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use half::f16;
use model_spec::{GraphSpec, InputNormalization, LayerSpec, NetworkSpec, Op};
use quantization::QParams;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels::{CsrMatrix, Grouped, MAX_INT8_K, Window};
use crate::palette;

/// Whether an int8 weight has one scale and zero point per output channel (axis 0,
/// auxiliary tensors of shape `[out]`) or one in all (shape `[1]`).
pub use quantization::Granularity;

/// An `activations` entry as the format stores it: a layer input's scale and zero point on
/// the u8 grid.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct StoredActivation {
    pub scale: f32,
    pub zero_point: i32,
}

/// Value of the `format` metadata entry.
pub const FORMAT: &str = "tch-mot";
/// Value of the `format_version` metadata entry of an artifact describing a sequential
/// network (`network` entry): such files have not changed since version 2, so readers of
/// version 2 still read them.
pub const FORMAT_VERSION: &str = "2";
/// Value of the `format_version` metadata entry of an artifact describing a graph (`graph`
/// entry): version 3 is version 2 with a graph in place of the network.
pub const GRAPH_VERSION: &str = "3";
/// Every `format_version` this runtime reads: version 1 is version 2 without the `input`
/// entry, version 3 adds graphs.
pub const READABLE_VERSIONS: [&str; 3] = ["1", "2", "3"];

/// Largest hyperparameter (channels, features, kernel, stride, padding, input side) accepted.
pub const MAX_DIM: usize = 1 << 20;
/// Largest number of layers (or graph nodes) accepted.
pub const MAX_LAYERS: usize = 1 << 12;
/// Largest number of elements of one sample's activation (or im2col matrix) accepted: keeps
/// a hostile file from making a single-sample run allocate without bound.
pub const MAX_ACTIVATION_ELEMENTS: usize = 1 << 26;
/// Largest number of elements of a `palette_sparse` or `csr` weight accepted: a position code
/// or a row pointer can describe long runs of zeros in a few bits, so the file does not bound
/// the dense size (which [`Artifact`](crate::Artifact) expands `csr` to).
pub const MAX_SPARSE_ELEMENTS: usize = 1 << 26;

/// How one parameter is stored: the `tensors` metadata entry maps every parameter name to one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "snake_case")]
pub enum Scheme {
    /// Tensor `name`, dtype F32, the parameter's shape.
    F32,
    /// Tensor `name`, dtype F16, the parameter's shape; widened to f32 at load.
    F16,
    /// Tensor `name` (I8, the parameter's shape) with `name.scale` (F32) and
    /// `name.zero_point` (I8): `w = scale * (q - zero_point)`.
    Int8 {
        /// Per tensor or per output channel.
        granularity: Granularity,
    },
    /// Int8 codes stored sparsely: `name.mask` (U8, one bit per element of the parameter,
    /// row-major, least significant bit first, padding bits zero) marks the elements whose
    /// code differs from their group's zero point; `name.values` (I8, one per set bit, in
    /// order) holds those codes; `name.scale` and `name.zero_point` as for `Int8`. The
    /// unmarked elements decode to the zero point, so to weight 0.
    Int8Sparse {
        /// Per tensor or per output channel.
        granularity: Granularity,
    },
    /// Compressed sparse rows over `[shape[0], product(shape[1..])]`: `name.row_ptr` (I32),
    /// `name.col_idx` (I32), `name.values` (F32).
    Csr {
        /// The dense shape, which must be the parameter's shape.
        shape: Vec<usize>,
    },
    /// Palettized (clustered) values: `name.codebook` (F32 or F16 `[G, k]`, `1 <= k <= 256`,
    /// finite)
    /// and `name.indices` (U8, `ceil(numel * bits / 8)` bytes): one index per element,
    /// row-major, packed at `bits` bits least significant bit first, padding bits zero;
    /// `w = codebook[g, index]`.
    Palette {
        /// One codebook per tensor or per output channel.
        granularity: Granularity,
        /// Bits per index: the smallest `b >= 1` with `2^b >= k`.
        bits: u8,
    },
    /// Palettized values of a pruned weight: exact zeros are not stored and are not a
    /// cluster. `name.positions` (U8) says which elements are stored, in the code
    /// `positions` names; `name.indices` holds one index per stored element, in order,
    /// packed as for `Palette`; `name.codebook` as for `Palette`.
    PaletteSparse {
        /// One codebook per tensor or per output channel.
        granularity: Granularity,
        /// Bits per index: the smallest `b >= 1` with `2^b >= k`.
        bits: u8,
        /// How the positions of the stored elements are coded.
        positions: PositionCode,
    },
}

/// How a `palette_sparse` weight codes the positions of its stored elements
/// (`docs/FORMAT.md` specifies both bit by bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum PositionCode {
    /// One bit per element, row-major, least significant bit first, padding bits zero:
    /// `ceil(numel / 8)` bytes.
    Bitmask,
    /// Golomb-Rice coded gaps: before each stored element the number of elements skipped
    /// since the previous one, then the number after the last one; a gap `d` is `d >> parameter`
    /// one bits, a zero bit and the low `parameter` bits of `d`, least significant first.
    Rice {
        /// The Rice parameter, `0..=31`.
        parameter: u8,
    },
}

impl std::fmt::Display for PositionCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bitmask => write!(f, "bitmask positions"),
            Self::Rice { parameter } => write!(f, "Rice-coded positions (parameter {parameter})"),
        }
    }
}

impl Scheme {
    /// The scheme's name, as serialised.
    pub fn name(&self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Int8 { .. } => "int8",
            Self::Int8Sparse { .. } => "int8_sparse",
            Self::Csr { .. } => "csr",
            Self::Palette { .. } => "palette",
            Self::PaletteSparse { .. } => "palette_sparse",
        }
    }
}

/// The scheme as a short description: its name, then what it records (granularity, index
/// width, position code).
impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let granularity = |g: &Granularity| match g {
            Granularity::PerTensor => "per tensor",
            Granularity::PerChannel => "per channel",
        };
        match self {
            Self::F32 | Self::F16 | Self::Csr { .. } => write!(f, "{}", self.name()),
            Self::Int8 { granularity: g } | Self::Int8Sparse { granularity: g } => {
                write!(f, "{} ({})", self.name(), granularity(g))
            }
            Self::Palette {
                granularity: g,
                bits,
            } => write!(f, "palette ({bits}-bit indices, {})", granularity(g)),
            Self::PaletteSparse {
                granularity: g,
                bits,
                positions,
            } => write!(
                f,
                "palette_sparse ({bits}-bit indices, {}, {positions})",
                granularity(g)
            ),
        }
    }
}

/// A decoded weight.
#[derive(Clone, Debug)]
pub(crate) enum Weight {
    /// Dense f32 (from the f32 or the f16 scheme), PyTorch layout.
    Dense(Vec<f32>),
    /// Int8 codes with per-channel parameters (a per-tensor pair repeated `out` times).
    Int8 {
        values: Vec<i8>,
        scales: Vec<f32>,
        zero_points: Vec<i32>,
    },
    /// CSR over `[out, in * k * k]`.
    Csr(CsrMatrix),
}

/// The parameters of one conv2d or linear layer.
#[derive(Clone, Debug)]
pub(crate) struct LayerParams {
    pub weight: Weight,
    pub bias: Vec<f32>,
    /// Input quantization for full-integer execution, when the artifact has one.
    pub input_quant: Option<QParams>,
    /// How the artifact stores the weight.
    pub weight_scheme: Scheme,
    /// How the artifact stores the bias.
    pub bias_scheme: Scheme,
}

/// One layer (or graph node) of a validated artifact with everything needed to run it:
/// shapes resolved, parameters decoded.
#[derive(Clone, Debug)]
pub(crate) enum Layer {
    Conv2d {
        /// Channels, sizes, kernel, stride, padding and groups (1: dense; the input
        /// channels: depthwise).
        shape: Grouped,
        params: LayerParams,
    },
    Linear {
        in_features: usize,
        out_features: usize,
        params: LayerParams,
    },
    /// A batch norm that could not be folded: `y = x * scale[c] + shift[c]`.
    BatchNorm {
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Relu,
    /// Any other elementwise activation.
    Activation(Activation),
    /// Max pooling with a square window of equal stride and no padding.
    MaxPool2d {
        channels: usize,
        height: usize,
        width: usize,
        kernel: usize,
        stride: usize,
    },
    /// Any other max pooling (`max`), and average pooling.
    Pool2d {
        max: bool,
        window: Window,
    },
    GlobalAvgPool {
        channels: usize,
        pixels: usize,
    },
    Flatten,
    /// Identity at inference.
    Dropout,
    /// A sum; with full-integer execution, the grid every input is requantized to.
    Add {
        input_quant: Option<QParams>,
    },
    /// A concatenation along the channels; with full-integer execution, the grid every input
    /// is requantized to (the output's too).
    Concat {
        input_quant: Option<QParams>,
    },
}

/// The elementwise activations besides ReLU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Activation {
    Relu6,
    Sigmoid,
    Tanh,
    Gelu,
    Silu,
    HardSwish,
}

impl Layer {
    /// The parameters of a conv2d or linear layer.
    pub fn params(&self) -> Option<&LayerParams> {
        match self {
            Self::Conv2d { params, .. } | Self::Linear { params, .. } => Some(params),
            _ => None,
        }
    }
}

/// The grid each node's input is quantized to (products with input quantization, sums and
/// concatenations with a grid), and the grid each node's output is best written on: the
/// first that a reader takes, directly or through nodes that work on `u8` codes (ReLU,
/// ReLU6, max pooling, flatten, dropout). Returns `(inputs, readers')` by node.
pub(crate) fn grids(
    layers: &[Layer],
    inputs: &[Vec<usize>],
) -> (Vec<Option<QParams>>, Vec<Option<QParams>>) {
    let n = layers.len();
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, sources) in inputs.iter().enumerate() {
        for &j in sources.iter().filter(|&&j| j != NETWORK_INPUT) {
            readers[j].push(i);
        }
    }
    let input_quant: Vec<Option<QParams>> = layers
        .iter()
        .map(|l| match l {
            Layer::Add { input_quant } | Layer::Concat { input_quant } => *input_quant,
            l => l.params().and_then(|p| p.input_quant),
        })
        .collect();
    let mut next: Vec<Option<QParams>> = vec![None; n];
    for j in (0..n).rev() {
        next[j] = readers[j].iter().find_map(|&r| match &layers[r] {
            Layer::Relu
            | Layer::Activation(Activation::Relu6)
            | Layer::MaxPool2d { .. }
            | Layer::Pool2d { max: true, .. }
            | Layer::Flatten
            | Layer::Dropout => next[r],
            _ => input_quant[r],
        });
    }
    (input_quant, next)
}

/// Where a node takes the network's input, in [`Decoded::inputs`].
pub(crate) const NETWORK_INPUT: usize = usize::MAX;

/// A validated artifact.
#[derive(Clone, Debug)]
pub(crate) struct Decoded {
    /// The sequential description, for artifacts that carry one.
    pub network: Option<NetworkSpec>,
    /// The graph: the artifact's, or the network as a chain of nodes named by layer index.
    pub graph: GraphSpec,
    /// The per-sample output shape of every node.
    pub shapes: Vec<Vec<usize>>,
    /// The nodes each node takes, by index ([`NETWORK_INPUT`] for the network's input).
    pub inputs: Vec<Vec<usize>>,
    /// Every node, decoded.
    pub layers: Vec<Layer>,
    /// How raw input becomes the network's input, when the artifact records it.
    pub normalization: Option<InputNormalization>,
}

/// Decoding context: the file name and the tensors not yet consumed.
struct Reader<'a> {
    file: &'a str,
    data: &'a [u8],
    infos: HashMap<String, &'a TensorInfo>,
    used: BTreeSet<String>,
}

fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

impl<'a> Reader<'a> {
    /// The tensor's bytes, after checking its dtype and shape.
    fn bytes(
        &mut self,
        name: &str,
        dtype: Dtype,
        expected: &'static str,
        shape: &[usize],
    ) -> Result<&'a [u8]> {
        let file = self.file.to_owned();
        let info = *self.infos.get(name).ok_or_else(|| Error::MissingTensor {
            file: file.clone(),
            tensor: name.to_owned(),
        })?;
        self.used.insert(name.to_owned());
        if info.dtype != dtype {
            return Err(Error::DtypeMismatch {
                file,
                tensor: name.to_owned(),
                expected,
                found: dtype_name(info.dtype),
            });
        }
        if info.shape != shape {
            return Err(Error::ShapeMismatch {
                file,
                tensor: name.to_owned(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        // The offsets were validated against the buffer by `precheck` and safetensors.
        self.data.get(start..end).ok_or_else(|| Error::Damaged {
            file,
            reason: format!("tensor `{name}` lies outside the data"),
        })
    }

    /// The shape of a tensor, for tensors whose shape is only known from the file.
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.infos
            .get(name)
            .map(|info| info.shape.clone())
            .ok_or_else(|| Error::MissingTensor {
                file: self.file.to_owned(),
                tensor: name.to_owned(),
            })
    }

    fn f32s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let bytes = self.bytes(name, Dtype::F32, "F32", shape)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn f16s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let bytes = self.bytes(name, Dtype::F16, "F16", shape)?;
        Ok(bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect())
    }

    /// An F32 tensor, or an F16 one widened to f32.
    fn f32_or_f16s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if self
            .infos
            .get(name)
            .is_some_and(|info| info.dtype == Dtype::F16)
        {
            return self.f16s(name, shape);
        }
        let bytes = self.bytes(name, Dtype::F32, "F32 or F16", shape)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn i8s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<i8>> {
        let bytes = self.bytes(name, Dtype::I8, "I8", shape)?;
        Ok(bytes.iter().map(|&b| b as i8).collect())
    }

    fn u8s(&mut self, name: &str, shape: &[usize]) -> Result<&'a [u8]> {
        self.bytes(name, Dtype::U8, "U8", shape)
    }

    fn i32s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<i32>> {
        let bytes = self.bytes(name, Dtype::I32, "I32", shape)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn invalid(&self, tensor: &str, reason: String) -> Error {
        Error::InvalidTensor {
            file: self.file.to_owned(),
            tensor: tensor.to_owned(),
            reason,
        }
    }
}

/// Rejects, before safetensors sees them, headers whose offsets point past the data: the
/// crate sums offsets without overflow checks.
fn precheck(bytes: &[u8], file: &str) -> Result<()> {
    let damaged = |reason: String| Error::Damaged {
        file: file.to_owned(),
        reason,
    };
    let Some((len, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(damaged(format!(
            "{} bytes is too short for a header",
            bytes.len()
        )));
    };
    let len = u64::from_le_bytes(*len);
    let header_len = usize::try_from(len)
        .ok()
        .filter(|&n| n <= rest.len())
        .ok_or_else(|| {
            damaged(format!(
                "header length {len} exceeds the file ({} bytes)",
                bytes.len()
            ))
        })?;
    let data_len = rest.len() - header_len;
    // Malformed headers are left for safetensors to describe.
    let Ok(header) =
        serde_json::from_slice::<HashMap<String, serde_json::Value>>(&rest[..header_len])
    else {
        return Ok(());
    };
    for (name, entry) in &header {
        let Some(offsets) = entry.get("data_offsets").and_then(|o| o.as_array()) else {
            continue;
        };
        if offsets
            .iter()
            .any(|o| o.as_u64().is_none_or(|v| v > data_len as u64))
        {
            return Err(damaged(format!(
                "tensor `{name}` has offsets {offsets:?} beyond the {data_len} data bytes"
            )));
        }
    }
    Ok(())
}

fn metadata_entry<'m>(
    metadata: &'m HashMap<String, String>,
    file: &str,
    key: &'static str,
) -> Result<&'m str> {
    metadata
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| Error::MissingMetadata {
            file: file.to_owned(),
            key,
        })
}

fn malformed(file: &str, key: &'static str, reason: impl Into<String>) -> Error {
    Error::MalformedMetadata {
        file: file.to_owned(),
        key,
        reason: reason.into(),
    }
}

/// Checks hyperparameter bounds, infers the shapes (the spec's checked inference) and
/// bounds every activation and im2col matrix; returns the per-layer input shapes and the
/// output shape.
fn shapes(network: &NetworkSpec, file: &str) -> Result<Vec<Vec<usize>>> {
    let too_big = |what: String| malformed(file, "network", what);
    if network.layers.len() > MAX_LAYERS {
        return Err(too_big(format!(
            "{} layers exceed the limit of {MAX_LAYERS}",
            network.layers.len()
        )));
    }
    let mut dims: Vec<(usize, usize)> = network.input.iter().map(|&d| (usize::MAX, d)).collect();
    for (i, layer) in network.layers.iter().enumerate() {
        match *layer {
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            } => {
                dims.extend([in_channels, out_channels, kernel, stride, padding].map(|d| (i, d)));
            }
            LayerSpec::Linear {
                in_features,
                out_features,
            } => dims.extend([(i, in_features), (i, out_features)]),
            LayerSpec::MaxPool2d { kernel, stride } => dims.extend([(i, kernel), (i, stride)]),
            LayerSpec::BatchNorm2d { .. } => {
                return Err(Error::Unsupported {
                    file: file.to_owned(),
                    reason: format!(
                        "layer {i} (batch_norm2d): batch norm must be folded into the preceding convolution before export"
                    ),
                });
            }
            LayerSpec::Relu | LayerSpec::Flatten | LayerSpec::Dropout { .. } => {}
        }
    }
    if let Some(&(layer, value)) = dims.iter().find(|&&(_, d)| d > MAX_DIM) {
        let place = if layer == usize::MAX {
            "the input".to_owned()
        } else {
            format!("layer {layer}")
        };
        return Err(too_big(format!(
            "{place} has a dimension of {value}, above the limit of {MAX_DIM}"
        )));
    }
    let elements = |shape: &[usize]| shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if elements(&network.input).is_none_or(|n| n > MAX_ACTIVATION_ELEMENTS) {
        return Err(too_big(format!(
            "the input {:?} exceeds {MAX_ACTIVATION_ELEMENTS} elements",
            network.input
        )));
    }
    let shapes = network.shapes().map_err(|source| Error::InvalidNetwork {
        file: file.to_owned(),
        source,
    })?;
    for (i, (layer, input)) in network.layers.iter().zip(&shapes).enumerate() {
        let output = &shapes[i + 1];
        if elements(output).is_none_or(|n| n > MAX_ACTIVATION_ELEMENTS) {
            return Err(Error::Unsupported {
                file: file.to_owned(),
                reason: format!(
                    "layer {i} ({}) outputs {output:?}, above {MAX_ACTIVATION_ELEMENTS} elements per sample",
                    layer.op()
                ),
            });
        }
        if let (LayerSpec::Conv2d { kernel, .. }, [c, _, _], [_, oh, ow]) =
            (layer, input.as_slice(), output.as_slice())
        {
            let patches = [*oh, *ow, *c, *kernel, *kernel]
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d));
            if patches.is_none_or(|p| p > MAX_ACTIVATION_ELEMENTS) {
                return Err(Error::Unsupported {
                    file: file.to_owned(),
                    reason: format!(
                        "layer {i} (conv2d) needs an im2col matrix above {MAX_ACTIVATION_ELEMENTS} elements"
                    ),
                });
            }
        }
    }
    Ok(shapes)
}

fn decode_weight(r: &mut Reader, name: &str, scheme: &Scheme, shape: &[usize]) -> Result<Weight> {
    let out = shape[0];
    let k: usize = shape[1..].iter().product();
    match scheme {
        Scheme::F32 => Ok(Weight::Dense(r.f32s(name, shape)?)),
        Scheme::F16 => Ok(Weight::Dense(r.f16s(name, shape)?)),
        Scheme::Int8 { granularity } => {
            let values = r.i8s(name, shape)?;
            let (scales, zero_points) = int8_groups(r, name, *granularity, out, k)?;
            Ok(Weight::Int8 {
                values,
                scales,
                zero_points,
            })
        }
        Scheme::Int8Sparse { granularity } => {
            let len = out * k;
            let mask_name = format!("{name}.mask");
            let values_name = format!("{name}.values");
            let mask = r.u8s(&mask_name, &[len.div_ceil(8)])?;
            let kept: usize = mask.iter().map(|b| b.count_ones() as usize).sum();
            if !len.is_multiple_of(8) && mask.last().is_some_and(|&b| b >> (len % 8) != 0) {
                return Err(r.invalid(&mask_name, format!("bits past the {len} elements are set")));
            }
            let stored = r.i8s(&values_name, &[kept])?;
            let (scales, zero_points) = int8_groups(r, name, *granularity, out, k)?;
            let mut values = Vec::with_capacity(len);
            let mut next = stored.iter();
            for i in 0..len {
                let zero = zero_points[i / k.max(1)] as i8;
                let set = mask[i / 8] >> (i % 8) & 1 == 1;
                // The mask's popcount is the number of stored codes, checked by `i8s`.
                values.push(if set {
                    *next.next().unwrap_or(&zero)
                } else {
                    zero
                });
            }
            Ok(Weight::Int8 {
                values,
                scales,
                zero_points,
            })
        }
        Scheme::Csr { shape: dense } => {
            if dense != shape {
                return Err(Error::ShapeMismatch {
                    file: r.file.to_owned(),
                    tensor: name.to_owned(),
                    expected: shape.to_vec(),
                    found: dense.clone(),
                });
            }
            let len = out * k;
            if len > MAX_SPARSE_ELEMENTS {
                return Err(Error::Unsupported {
                    file: r.file.to_owned(),
                    reason: format!(
                        "csr weight `{name}` has {len} elements, above the limit of {MAX_SPARSE_ELEMENTS}"
                    ),
                });
            }
            let (rp, ci, vs) = (
                format!("{name}.row_ptr"),
                format!("{name}.col_idx"),
                format!("{name}.values"),
            );
            let row_ptr = r.i32s(&rp, &[out + 1])?;
            let nnz = r.shape(&vs)?.first().copied().unwrap_or(0);
            let values = r.f32s(&vs, &[nnz])?;
            let col_idx = r.i32s(&ci, &[nnz])?;
            let row_ptr: Vec<usize> = row_ptr
                .iter()
                .enumerate()
                .map(|(i, &p)| {
                    usize::try_from(p)
                        .map_err(|_| r.invalid(&rp, format!("entry {i} is negative ({p})")))
                })
                .collect::<Result<_>>()?;
            let col_idx: Vec<u32> = col_idx
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    u32::try_from(c)
                        .map_err(|_| r.invalid(&ci, format!("entry {i} is negative ({c})")))
                })
                .collect::<Result<_>>()?;
            CsrMatrix::new(out, k, row_ptr, col_idx, values)
                .map(Weight::Csr)
                .map_err(|reason| r.invalid(name, reason))
        }
        Scheme::Palette { granularity, bits } => {
            let len = out * k;
            let (codebook, clusters) = palette_codebook(r, name, *granularity, *bits, out)?;
            let indices_name = format!("{name}.indices");
            let packed = r.u8s(&indices_name, &[packed_bytes(r, name, len, *bits)?])?;
            let indices = palette::unpack_indices(packed, *bits, len, clusters)
                .map_err(|reason| r.invalid(&indices_name, reason))?;
            let mut values = Vec::with_capacity(len);
            for (row, indices) in indices.chunks(k.max(1)).enumerate() {
                let group = group_of(*granularity, k)(row * k);
                let centroids = &codebook[group * clusters..][..clusters];
                values.extend(indices.iter().map(|&index| centroids[usize::from(index)]));
            }
            Ok(dense_or_csr(values, out, k))
        }
        Scheme::PaletteSparse {
            granularity,
            bits,
            positions: code,
        } => {
            let len = out * k;
            if len > MAX_SPARSE_ELEMENTS {
                return Err(Error::Unsupported {
                    file: r.file.to_owned(),
                    reason: format!(
                        "palette_sparse weight `{name}` has {len} elements, above the limit of {MAX_SPARSE_ELEMENTS}"
                    ),
                });
            }
            let (codebook, clusters) = palette_codebook(r, name, *granularity, *bits, out)?;
            let positions_name = format!("{name}.positions");
            let positions = match *code {
                PositionCode::Bitmask => {
                    let mask = r.u8s(&positions_name, &[len.div_ceil(8)])?;
                    palette::decode_bitmask(mask, len)
                }
                PositionCode::Rice { parameter } => {
                    if parameter > palette::MAX_RICE_PARAMETER {
                        return Err(malformed(
                            r.file,
                            "tensors",
                            format!(
                                "`{name}`: Rice parameter {parameter} is above {}",
                                palette::MAX_RICE_PARAMETER
                            ),
                        ));
                    }
                    let stored = r.shape(&positions_name)?;
                    let bytes = r.u8s(&positions_name, &[stored.first().copied().unwrap_or(0)])?;
                    palette::decode_rice(bytes, len, parameter)
                }
            }
            .map_err(|reason| r.invalid(&positions_name, reason))?;
            let indices_name = format!("{name}.indices");
            let packed = r.u8s(
                &indices_name,
                &[packed_bytes(r, name, positions.len(), *bits)?],
            )?;
            let indices = palette::unpack_indices(packed, *bits, positions.len(), clusters)
                .map_err(|reason| r.invalid(&indices_name, reason))?;
            // Positions ascend, so the rows fill in order.
            let group = group_of(*granularity, k);
            let mut row_ptr = vec![0usize; out + 1];
            let mut col_idx = Vec::with_capacity(positions.len());
            let mut values = Vec::with_capacity(positions.len());
            for (&p, &index) in positions.iter().zip(&indices) {
                let p = p as usize;
                row_ptr[p / k + 1] += 1;
                col_idx.push((p % k) as u32);
                values.push(codebook[group(p) * clusters + usize::from(index)]);
            }
            for i in 0..out {
                row_ptr[i + 1] += row_ptr[i];
            }
            let stored = values.len();
            let matrix = CsrMatrix::new(out, k, row_ptr, col_idx, values)
                .map_err(|reason| r.invalid(name, reason))?;
            Ok(if crate::csr_pays_off(out, k, stored) {
                Weight::Csr(matrix)
            } else {
                Weight::Dense(matrix.to_dense())
            })
        }
    }
}

/// Which codebook row element `i` of a weight with rows of `k` elements uses.
fn group_of(granularity: Granularity, k: usize) -> impl Fn(usize) -> usize {
    move |i| match granularity {
        Granularity::PerTensor => 0,
        Granularity::PerChannel => i / k,
    }
}

/// A decoded weight of `rows x cols` real values as the engine runs it: CSR where
/// [`crate::csr_pays_off`] says so for its non-zero count, else dense.
/// A decoded palette weight as per-channel symmetric int8 codes (scale `max |w| / 127` per
/// output channel, the builder's `Storage::Int8` rule): exactly the codes of weights that
/// lie on that grid, as quantization-aware training leaves them.
fn palette_codes(file: &str, name: &str, weight: Weight, out: usize) -> Result<Weight> {
    let values = match weight {
        Weight::Dense(values) => values,
        Weight::Csr(matrix) => matrix.to_dense(),
        int8 @ Weight::Int8 { .. } => return Ok(int8),
    };
    let k = values.len() / out.max(1);
    if k > MAX_INT8_K {
        return Err(Error::Unsupported {
            file: file.to_owned(),
            reason: format!(
                "int8 execution of palette weight `{name}` has k = {k}, above the kernel limit of {MAX_INT8_K}"
            ),
        });
    }
    let q = quantization::quantize_weights(
        &values,
        out,
        quantization::Granularity::PerChannel,
        quantization::BitWidth::INT8,
    )
    .map_err(|e| Error::InvalidTensor {
        file: file.to_owned(),
        tensor: name.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Weight::Int8 {
        values: q.values,
        scales: q.scales,
        zero_points: q.zero_points.into_iter().map(i32::from).collect(),
    })
}

fn dense_or_csr(values: Vec<f32>, rows: usize, cols: usize) -> Weight {
    let nonzero = values.iter().filter(|&&v| v != 0.0).count();
    if crate::csr_pays_off(rows, cols, nonzero) {
        Weight::Csr(CsrMatrix::from_dense(&values, rows, cols))
    } else {
        Weight::Dense(values)
    }
}

/// The byte length of `count` packed indices of `bits` bits of parameter `name`.
fn packed_bytes(r: &Reader, name: &str, count: usize, bits: u8) -> Result<usize> {
    palette::packed_len(count, bits).ok_or_else(|| Error::Unsupported {
        file: r.file.to_owned(),
        reason: format!("`{name}` has too many indices to address"),
    })
}

/// The codebook of a palette weight (`name.codebook`, F32 or F16 `[G, k]`), checked against the
/// scheme's `bits` and for finite values; returns it row-major with `k`.
fn palette_codebook(
    r: &mut Reader,
    name: &str,
    granularity: Granularity,
    bits: u8,
    out: usize,
) -> Result<(Vec<f32>, usize)> {
    if !(1..=8).contains(&bits) {
        return Err(malformed(
            r.file,
            "tensors",
            format!("`{name}`: bits {bits} is not in 1..=8"),
        ));
    }
    let groups = match granularity {
        Granularity::PerTensor => 1,
        Granularity::PerChannel => out,
    };
    let codebook_name = format!("{name}.codebook");
    let shape = r.shape(&codebook_name)?;
    let [_, clusters] = shape[..] else {
        return Err(r.invalid(
            &codebook_name,
            format!("has shape {shape:?}, a codebook is [groups, clusters]"),
        ));
    };
    let codebook = r.f32_or_f16s(&codebook_name, &[groups, clusters])?;
    let Some(needed) = palette::palette_index_bits(clusters) else {
        return Err(r.invalid(
            &codebook_name,
            format!(
                "has {clusters} entries per group, a codebook has 1 to {}",
                palette::MAX_PALETTE_CLUSTERS
            ),
        ));
    };
    if needed != bits {
        return Err(malformed(
            r.file,
            "tensors",
            format!(
                "`{name}` has bits {bits}, but its codebook of {clusters} entries per group needs {needed}"
            ),
        ));
    }
    if let Some((i, v)) = codebook.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(r.invalid(
            &codebook_name,
            format!(
                "entry {} of group {} is {v}, not finite",
                i % clusters,
                i / clusters
            ),
        ));
    }
    Ok((codebook, clusters))
}

/// The scales and zero points of an int8 weight (`name.scale`, `name.zero_point`), checked
/// and expanded to one per output channel.
fn int8_groups(
    r: &mut Reader,
    name: &str,
    granularity: Granularity,
    out: usize,
    k: usize,
) -> Result<(Vec<f32>, Vec<i32>)> {
    let groups = match granularity {
        Granularity::PerTensor => 1,
        Granularity::PerChannel => out,
    };
    let scale_name = format!("{name}.scale");
    let zp_name = format!("{name}.zero_point");
    let scales = r.f32s(&scale_name, &[groups])?;
    if let Some((i, s)) = scales
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s > 0.0))
    {
        return Err(r.invalid(
            &scale_name,
            format!("scale {i} is {s}, not positive and finite"),
        ));
    }
    let zero_points = r.i8s(&zp_name, &[groups])?;
    if k > MAX_INT8_K {
        return Err(Error::Unsupported {
            file: r.file.to_owned(),
            reason: format!(
                "int8 weight `{name}` has k = {k}, above the kernel limit of {MAX_INT8_K}"
            ),
        });
    }
    let scales = if scales.len() == out {
        scales
    } else {
        vec![scales[0]; out]
    };
    let zero_points: Vec<i32> = zero_points.into_iter().map(i32::from).collect();
    let zero_points = if zero_points.len() == out {
        zero_points
    } else {
        vec![zero_points[0]; out]
    };
    Ok((scales, zero_points))
}

/// The description an artifact carries: a sequential network (every version) or a graph
/// (version 3).
enum Description {
    Network(NetworkSpec),
    Graph(GraphSpec),
}

/// Parses and validates an artifact. `file` names it in errors.
pub(crate) fn decode(bytes: &[u8], file: &str) -> Result<Decoded> {
    precheck(bytes, file)?;
    let (header_len, meta): (usize, Metadata) =
        SafeTensors::read_metadata(bytes).map_err(|e| Error::Damaged {
            file: file.to_owned(),
            reason: e.to_string(),
        })?;
    let metadata = meta
        .metadata()
        .clone()
        .ok_or_else(|| Error::MissingMetadata {
            file: file.to_owned(),
            key: "format",
        })?;
    let format = metadata_entry(&metadata, file, "format")?;
    if format != FORMAT {
        return Err(Error::UnknownFormat {
            file: file.to_owned(),
            found: format.to_owned(),
        });
    }
    let version = metadata_entry(&metadata, file, "format_version")?;
    if !READABLE_VERSIONS.contains(&version) {
        return Err(Error::UnsupportedVersion {
            file: file.to_owned(),
            found: version.to_owned(),
            supported: "1, 2 and 3",
        });
    }
    let description = match (metadata.get("network"), metadata.get("graph")) {
        (Some(_), Some(_)) => {
            return Err(malformed(
                file,
                "graph",
                "an artifact describes a network or a graph, not both",
            ));
        }
        (None, Some(_)) if version != GRAPH_VERSION => {
            return Err(malformed(
                file,
                "graph",
                format!("version {version} artifacts have no `graph` entry"),
            ));
        }
        (None, Some(json)) => Description::Graph(
            serde_json::from_str(json).map_err(|e| malformed(file, "graph", e.to_string()))?,
        ),
        _ => Description::Network(
            serde_json::from_str(metadata_entry(&metadata, file, "network")?)
                .map_err(|e| malformed(file, "network", e.to_string()))?,
        ),
    };
    let (network, graph, shapes) = match description {
        Description::Network(network) => {
            // The network's checks (and its refusal of unfolded batch norm), then the same
            // network as a chain of nodes named by layer index.
            let mut shapes = shapes(&network, file)?;
            shapes.remove(0);
            let graph = GraphSpec::from(&network);
            (Some(network), graph, shapes)
        }
        Description::Graph(graph) => {
            let shapes = graph_shapes(&graph, file)?;
            (None, graph, shapes)
        }
    };
    let normalization = match metadata.get("input") {
        Some(_) if version == "1" => {
            return Err(malformed(
                file,
                "input",
                "version 1 artifacts have no `input` entry",
            ));
        }
        Some(json) => {
            let n: InputNormalization =
                serde_json::from_str(json).map_err(|e| malformed(file, "input", e.to_string()))?;
            n.check(Some(graph.input[0]))
                .map_err(|e| malformed(file, "input", e.to_string()))?;
            Some(n)
        }
        None => None,
    };
    let mut schemes: BTreeMap<String, Scheme> =
        serde_json::from_str(metadata_entry(&metadata, file, "tensors")?)
            .map_err(|e| malformed(file, "tensors", e.to_string()))?;
    let mut activations: BTreeMap<String, QParams> = match metadata.get("activations") {
        Some(json) => serde_json::from_str::<BTreeMap<String, StoredActivation>>(json)
            .map_err(|e| malformed(file, "activations", e.to_string()))?
            .into_iter()
            .map(|(layer, a)| (layer, QParams::u8(a.scale, a.zero_point)))
            .collect(),
        None => BTreeMap::new(),
    };

    let infos = meta.tensors();
    let data = &bytes[8 + header_len..];
    let mut reader = Reader {
        file,
        data,
        infos,
        used: BTreeSet::new(),
    };
    let sequential = network.is_some();
    let index: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut layers = Vec::with_capacity(graph.nodes.len());
    let mut inputs = Vec::with_capacity(graph.nodes.len());
    for (i, node) in graph.nodes.iter().enumerate() {
        // Shape inference accepted the graph: every input is the network's or an earlier
        // node's.
        let sources: Vec<usize> = node
            .inputs
            .iter()
            .map(|name| index.get(name.as_str()).copied().unwrap_or(NETWORK_INPUT))
            .collect();
        let input: &[usize] = match sources.first() {
            Some(&j) if j != NETWORK_INPUT => &shapes[j],
            _ => &graph.input,
        };
        let place = if sequential {
            format!("layer {i}")
        } else {
            format!("node `{}`", node.name)
        };
        let mut parts = NodeParts {
            reader: &mut reader,
            schemes: &mut schemes,
            activations: &mut activations,
            file,
        };
        let layer = match (&node.op, input) {
            (
                op @ &Op::Conv2d {
                    in_channels,
                    out_channels,
                    kernel,
                    stride,
                    padding,
                    groups,
                },
                &[_, height, width],
            ) => Layer::Conv2d {
                shape: Grouped {
                    channels: in_channels,
                    height,
                    width,
                    kernel,
                    stride,
                    padding,
                    out: out_channels,
                    groups,
                },
                params: parts.layer(&node.name, &place, op)?,
            },
            (
                op @ &Op::Linear {
                    in_features,
                    out_features,
                },
                _,
            ) => Layer::Linear {
                in_features,
                out_features,
                params: parts.layer(&node.name, &place, op)?,
            },
            (&Op::BatchNorm2d { features, eps }, _) => {
                parts.batch_norm(&node.name, &place, features, eps)?
            }
            (
                &Op::MaxPool2d {
                    kernel: [kh, kw],
                    stride: [sh, sw],
                    padding: [0, 0],
                },
                &[channels, height, width],
            ) if kh == kw && sh == sw => Layer::MaxPool2d {
                channels,
                height,
                width,
                kernel: kh,
                stride: sh,
            },
            (
                &Op::MaxPool2d {
                    kernel,
                    stride,
                    padding,
                },
                &[channels, height, width],
            ) => Layer::Pool2d {
                max: true,
                window: Window {
                    channels,
                    height,
                    width,
                    kernel,
                    stride,
                    padding,
                },
            },
            (&Op::AvgPool2d { kernel, stride }, &[channels, height, width]) => Layer::Pool2d {
                max: false,
                window: Window {
                    channels,
                    height,
                    width,
                    kernel,
                    stride,
                    padding: [0, 0],
                },
            },
            (&Op::GlobalAvgPool, &[channels, height, width]) => Layer::GlobalAvgPool {
                channels,
                pixels: height * width,
            },
            (Op::Relu, _) => Layer::Relu,
            (Op::Relu6, _) => Layer::Activation(Activation::Relu6),
            (Op::Sigmoid, _) => Layer::Activation(Activation::Sigmoid),
            (Op::Tanh, _) => Layer::Activation(Activation::Tanh),
            (Op::Gelu, _) => Layer::Activation(Activation::Gelu),
            (Op::Silu, _) => Layer::Activation(Activation::Silu),
            (Op::HardSwish, _) => Layer::Activation(Activation::HardSwish),
            (Op::Flatten, _) => Layer::Flatten,
            (Op::Dropout { .. }, _) => Layer::Dropout,
            (Op::Add, _) => Layer::Add {
                input_quant: parts.grid(&node.name, &place)?,
            },
            (Op::Concat, _) => Layer::Concat {
                input_quant: parts.grid(&node.name, &place)?,
            },
            // Shape inference accepted the graph, so convolutions and poolings got (C, H, W);
            // anything else is an inconsistency of the spec.
            (op, _) => {
                return Err(malformed(
                    file,
                    if sequential { "network" } else { "graph" },
                    format!("{place} ({}) does not fit its input {input:?}", op.name()),
                ));
            }
        };
        layers.push(layer);
        inputs.push(sources);
    }
    if let Some(name) = schemes.keys().next() {
        return Err(malformed(
            file,
            "tensors",
            format!("describes `{name}`, which no layer of the network has"),
        ));
    }
    if let Some(layer) = activations.keys().next() {
        return Err(malformed(
            file,
            "activations",
            format!(
                "entry `{layer}` is not a conv2d or linear layer of the network (or an add or concat node of a graph)"
            ),
        ));
    }
    let mut names: Vec<&String> = reader.infos.keys().collect();
    names.sort();
    if let Some(unused) = names.into_iter().find(|n| !reader.used.contains(*n)) {
        return Err(Error::UnexpectedTensor {
            file: file.to_owned(),
            tensor: unused.clone(),
        });
    }
    Ok(Decoded {
        network,
        graph,
        shapes,
        inputs,
        layers,
        normalization,
    })
}

/// What decoding one node's parameters reads from: the tensors, and the scheme and
/// activation entries not yet claimed by a node.
struct NodeParts<'r, 'a> {
    reader: &'r mut Reader<'a>,
    schemes: &'r mut BTreeMap<String, Scheme>,
    activations: &'r mut BTreeMap<String, QParams>,
    file: &'r str,
}

impl NodeParts<'_, '_> {
    fn scheme(&mut self, name: &str) -> Result<Scheme> {
        self.schemes
            .remove(name)
            .ok_or_else(|| malformed(self.file, "tensors", format!("no scheme for `{name}`")))
    }

    /// A bias-like vector of `len` values, stored f32 or f16.
    fn vector(&mut self, name: &str, len: usize) -> Result<(Vec<f32>, Scheme)> {
        let scheme = self.scheme(name)?;
        let values = match &scheme {
            Scheme::F32 => self.reader.f32s(name, &[len])?,
            Scheme::F16 => self.reader.f16s(name, &[len])?,
            other => {
                return Err(Error::Unsupported {
                    file: self.file.to_owned(),
                    reason: format!(
                        "`{name}` uses scheme {}: biases must be f32 or f16, as must batch-norm vectors",
                        other.name()
                    ),
                });
            }
        };
        Ok((values, scheme))
    }

    /// The grid the inputs of sum or concatenation node `name` are requantized to, when the
    /// artifact gives one.
    fn grid(&mut self, name: &str, place: &str) -> Result<Option<QParams>> {
        let Some(q) = self.activations.remove(name) else {
            return Ok(None);
        };
        if !q.is_valid() {
            return Err(malformed(
                self.file,
                "activations",
                format!(
                    "{place}: scale {} / zero point {} are not a positive finite scale and a u8 code",
                    q.scale, q.zero_point
                ),
            ));
        }
        Ok(Some(q))
    }

    /// The weight, bias and input quantization of the conv2d or linear node `prefix`.
    fn layer(&mut self, prefix: &str, place: &str, op: &Op) -> Result<LayerParams> {
        let file = self.file;
        // Only conv2d and linear nodes reach here, and both have a weight shape.
        let (weight_shape, out) = op.weight_shape().unwrap_or_default();
        let (weight_name, bias_name) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
        let weight_scheme = self.scheme(&weight_name)?;
        let weight = decode_weight(self.reader, &weight_name, &weight_scheme, &weight_shape)?;
        let (bias, bias_scheme) = self.vector(&bias_name, out)?;
        let input_quant = self.activations.remove(prefix);
        let palette = matches!(
            weight_scheme,
            Scheme::Palette { .. } | Scheme::PaletteSparse { .. }
        );
        let weight = match weight {
            // A palette layer that runs full-integer: its values on the per-channel
            // symmetric int8 grid, the `int8` scheme's rule.
            Weight::Dense(_) | Weight::Csr(_) if palette && input_quant.is_some() => {
                palette_codes(file, &weight_name, weight, out)?
            }
            other => other,
        };
        if let Some(q) = input_quant {
            if !matches!(weight, Weight::Int8 { .. }) {
                return Err(malformed(
                    file,
                    "activations",
                    format!("{place} has input quantization but its weight is not int8"),
                ));
            }
            if !q.is_valid() {
                return Err(malformed(
                    file,
                    "activations",
                    format!(
                        "{place}: scale {} / zero point {} are not a positive finite scale and a u8 code",
                        q.scale, q.zero_point
                    ),
                ));
            }
        }
        Ok(LayerParams {
            weight,
            bias,
            input_quant,
            weight_scheme,
            bias_scheme,
        })
    }

    /// A batch norm kept in a graph: its four vectors (PyTorch's names) as the scale and
    /// shift it applies at inference.
    fn batch_norm(
        &mut self,
        prefix: &str,
        place: &str,
        features: usize,
        eps: f64,
    ) -> Result<Layer> {
        let mut read = |part: &str| {
            self.vector(&format!("{prefix}.{part}"), features)
                .map(|(v, _)| v)
        };
        let (gamma, beta) = (read("weight")?, read("bias")?);
        let (mean, var) = (read("running_mean")?, read("running_var")?);
        let mut scale = Vec::with_capacity(features);
        let mut shift = Vec::with_capacity(features);
        for c in 0..features {
            let s = f64::from(gamma[c]) / (f64::from(var[c]) + eps).sqrt();
            let t = f64::from(beta[c]) - f64::from(mean[c]) * s;
            if !(s.is_finite() && t.is_finite() && var[c] >= 0.0) {
                return Err(self.reader.invalid(
                    &format!("{prefix}.running_var"),
                    format!(
                        "{place} (batch_norm2d): channel {c} gives scale {s} and shift {t} (variance {})",
                        var[c]
                    ),
                ));
            }
            scale.push(s as f32);
            shift.push(t as f32);
        }
        Ok(Layer::BatchNorm { scale, shift })
    }
}

/// The limits of a graph artifact (nodes, hyperparameters, activation and im2col sizes)
/// around the spec's checked shape inference; returns every node's output shape.
fn graph_shapes(graph: &GraphSpec, file: &str) -> Result<Vec<Vec<usize>>> {
    let too_big = |what: String| malformed(file, "graph", what);
    if graph.nodes.len() > MAX_LAYERS {
        return Err(too_big(format!(
            "{} nodes exceed the limit of {MAX_LAYERS}",
            graph.nodes.len()
        )));
    }
    if let Some(&d) = graph.input.iter().find(|&&d| d > MAX_DIM) {
        return Err(too_big(format!(
            "the input has a dimension of {d}, above the limit of {MAX_DIM}"
        )));
    }
    for node in &graph.nodes {
        let dims: Vec<usize> = match node.op {
            Op::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                groups,
            } => [in_channels, out_channels, groups]
                .into_iter()
                .chain(kernel)
                .chain(stride)
                .chain(padding)
                .collect(),
            Op::Linear {
                in_features,
                out_features,
            } => vec![in_features, out_features],
            Op::BatchNorm2d { features, .. } => vec![features],
            Op::MaxPool2d {
                kernel,
                stride,
                padding,
            } => kernel.into_iter().chain(stride).chain(padding).collect(),
            Op::AvgPool2d { kernel, stride } => kernel.into_iter().chain(stride).collect(),
            _ => Vec::new(),
        };
        if let Some(d) = dims.into_iter().find(|&d| d > MAX_DIM) {
            return Err(too_big(format!(
                "node `{}` has a dimension of {d}, above the limit of {MAX_DIM}",
                node.name
            )));
        }
    }
    let elements = |shape: &[usize]| shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if elements(&graph.input).is_none_or(|n| n > MAX_ACTIVATION_ELEMENTS) {
        return Err(too_big(format!(
            "the input {:?} exceeds {MAX_ACTIVATION_ELEMENTS} elements",
            graph.input
        )));
    }
    let shapes = graph.shapes().map_err(|source| Error::InvalidNetwork {
        file: file.to_owned(),
        source,
    })?;
    for (node, output) in graph.nodes.iter().zip(&shapes) {
        if elements(output).is_none_or(|n| n > MAX_ACTIVATION_ELEMENTS) {
            return Err(Error::Unsupported {
                file: file.to_owned(),
                reason: format!(
                    "node `{}` ({}) outputs {output:?}, above {MAX_ACTIVATION_ELEMENTS} elements per sample",
                    node.name,
                    node.op.name()
                ),
            });
        }
        if let (
            Op::Conv2d {
                in_channels,
                kernel,
                groups,
                ..
            },
            [_, oh, ow],
        ) = (&node.op, output.as_slice())
        {
            let patches = [*oh, *ow, in_channels / groups.max(&1), kernel[0], kernel[1]]
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d));
            if patches.is_none_or(|p| p > MAX_ACTIVATION_ELEMENTS) {
                return Err(Error::Unsupported {
                    file: file.to_owned(),
                    reason: format!(
                        "node `{}` (conv2d) needs an im2col matrix above {MAX_ACTIVATION_ELEMENTS} elements",
                        node.name
                    ),
                });
            }
        }
    }
    Ok(shapes)
}
