//! Writing artifacts: [`ArtifactBuilder`] and the storage a parameter is written in.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use half::f16;
use model_spec::{GraphSpec, InputNormalization, NetworkSpec, Op};
use safetensors::{Dtype, View};
use serde::Serialize;

use quantization::{BitWidth, QParams, quantize_weights};

use crate::artifact::{
    FORMAT, FORMAT_VERSION, GRAPH_VERSION, Granularity, MAX_SPARSE_ELEMENTS, PositionCode, Scheme,
    StoredActivation,
};
use crate::error::{Error, Result};
use crate::kernels::CsrMatrix;
use crate::palette;

/// How [`ArtifactBuilder::add`] stores real values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// Dense f32 (scheme `f32`).
    F32,
    /// IEEE half precision, rounded to nearest (scheme `f16`); widened to f32 at load.
    F16,
    /// Symmetric int8 codes (scheme `int8`): zero point 0, codes in `-127..=127`, scale
    /// `max |w| / 127` per group (1 for an all-zero group).
    Int8(Granularity),
    /// The same codes in the bitmask-sparse scheme `int8_sparse`.
    Int8Sparse(Granularity),
    /// The same codes in `int8` or `int8_sparse`, whichever is smaller: sparse when fewer
    /// than seven codes in eight are non-zero (pruned weights).
    Int8Smallest(Granularity),
    /// The non-zero values in compressed sparse rows (scheme `csr`) over
    /// `[shape[0], product(shape[1..])]`.
    Csr,
    /// Values that take few distinct values per group (clustered weights) as a palette,
    /// exactly: each group's distinct values, ascending, are its codebook (padded with
    /// zeros to the largest group's count), each element stored as its index. Stored in
    /// `palette`, or in `palette_sparse` (exact zeros left out of the codebook and not
    /// stored; a negative zero comes back as zero) when that is smaller, as for pruned and
    /// clustered weights. Fails when a value is not finite or a group has more than
    /// [`MAX_PALETTE_CLUSTERS`](crate::MAX_PALETTE_CLUSTERS) distinct values (256: cluster
    /// the weights first).
    Palette(Granularity),
    /// As [`Storage::Palette`], with the codebook stored in IEEE half precision, rounded to
    /// nearest: half the codebook's bytes, at [`Storage::F16`]'s rounding of the centroids.
    /// Fails as `Palette` does, and when a centroid is beyond f16's range (65504).
    ///
    /// ```
    /// use model_spec::{LayerSpec, NetworkSpec};
    /// use runtime::{Artifact, ArtifactBuilder, Granularity, Storage, WeightValues};
    ///
    /// let spec = NetworkSpec {
    ///     name: "clustered".into(),
    ///     input: [1, 1, 8],
    ///     layers: vec![LayerSpec::Flatten, LayerSpec::Linear { in_features: 8, out_features: 2 }],
    /// };
    /// // Weights clustered to three values, one of which f16 rounds.
    /// let weights = [0.1f32, -0.5, 0.1, 0.3, 0.3, 0.1, -0.5, 0.1].repeat(2);
    /// let mut builder = ArtifactBuilder::new(spec);
    /// let storage = Storage::PaletteHalf(Granularity::PerTensor);
    /// builder.add_layer(1, &weights, &[0.25, -1.0], storage)?;
    /// let artifact = Artifact::from_bytes(&builder.to_bytes()?)?;
    /// let layer = artifact.layer(1).unwrap();
    /// let WeightValues::Float(values) = &layer.weight else { panic!("palettes decode to reals") };
    /// assert_eq!(values[0], half::f16::from_f32(0.1).to_f32());
    /// assert_eq!(layer.bias_scheme.name(), "f16");
    /// # Ok::<(), runtime::Error>(())
    /// ```
    PaletteHalf(Granularity),
}

/// A weight already in its stored form, for [`ArtifactBuilder::add_encoded`]: codes that
/// were quantized elsewhere (by quantization-aware training, say), or arrays written exactly
/// as given (the loader validates them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Encoded<'a> {
    /// Int8 codes with one scale and zero point per group (`w = scale * (q - zero_point)`),
    /// stored in `int8`, or in `int8_sparse` when `sparse`.
    Int8 {
        /// One code per element, row-major.
        codes: &'a [i8],
        /// One scale per group: per output channel (axis 0) or one for the tensor.
        scales: &'a [f32],
        /// One zero point per group.
        zero_points: &'a [i8],
        /// Per tensor or per output channel.
        granularity: Granularity,
        /// Whether to store the codes that differ from their zero point only.
        sparse: bool,
    },
    /// Compressed sparse rows over `[shape[0], product(shape[1..])]`.
    Csr {
        /// `shape[0] + 1` offsets into `col_idx` and `values`.
        row_ptr: &'a [i32],
        /// The column of every stored value.
        col_idx: &'a [i32],
        /// The stored values.
        values: &'a [f32],
    },
    /// Cluster indices into a codebook computed elsewhere (by a clustering library, say),
    /// stored in `palette`, or in `palette_sparse` when `kept` is given (the positions in
    /// the smaller of a bitmask and the best Rice code). The indices are packed at the
    /// smallest width that holds `k = codebook.len() / groups` clusters, and every stored
    /// index must fit that width; whether it is below `k` is left to the loader.
    Palette {
        /// One index per element, row-major, into its group's row of `codebook` (the
        /// indices of elements that `kept` leaves out are ignored).
        indices: &'a [u8],
        /// `[groups, k]`, row-major: one row of `k` centroids (1 to 256) per group.
        codebook: &'a [f32],
        /// One codebook for the tensor, or one per output channel.
        granularity: Granularity,
        /// `None` stores every element (`palette`); `Some(kept)`, one flag per element,
        /// stores the kept ones only, the others being exact zeros (`palette_sparse`).
        kept: Option<&'a [bool]>,
        /// Store the codebook in half precision (rounded to nearest; every centroid must be
        /// within f16's range) instead of f32.
        half_codebook: bool,
    },
}

/// One tensor waiting to be written.
#[derive(Clone, Debug)]
struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], to: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| to(v)).collect()
}

/// `values` in IEEE half precision, rounded to nearest, little-endian; fails for a value
/// beyond f16's range or not finite.
fn half_bytes(name: &str, values: &[f32]) -> Result<Vec<u8>> {
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let half = f16::from_f32(v);
            if half.is_finite() {
                Ok(half.to_le_bytes())
            } else {
                Err(builder_error(format!(
                    "`{name}`: codebook entry {i} ({v}) is beyond half precision's range"
                )))
            }
        })
        .collect::<Result<Vec<[u8; 2]>>>()
        .map(|halves| halves.concat())
}

/// The name of layer `layer`'s weight in an artifact: `"<layer>.weight"`.
pub fn weight_name(layer: usize) -> String {
    format!("{layer}.weight")
}

/// The name of layer `layer`'s bias in an artifact: `"<layer>.bias"`.
pub fn bias_name(layer: usize) -> String {
    format!("{layer}.bias")
}

/// Writes artifacts.
///
/// A layer's parameters go in with [`ArtifactBuilder::add_layer`] (names and shapes from the
/// network description), any parameter with [`ArtifactBuilder::add`] (real values in a
/// chosen [`Storage`]) or [`ArtifactBuilder::add_encoded`] (codes or sparse arrays as they
/// are stored). The builder checks that data fits the shapes it is given and that names are
/// unique; the loader ([`Model::from_bytes`](crate::Model::from_bytes)) checks everything
/// else, so a builder can also produce deliberately broken files for tests.
///
/// ```
/// use model_spec::{InputNormalization, LayerSpec, NetworkSpec};
/// use runtime::{Artifact, ArtifactBuilder, Granularity, Storage};
///
/// let network = NetworkSpec {
///     name: "tiny".into(),
///     input: [1, 1, 4],
///     layers: vec![LayerSpec::Flatten, LayerSpec::Linear { in_features: 4, out_features: 2 }],
/// };
/// let weight = [0.5, -1.0, 0.0, 0.25, 0.0, 0.0, 2.0, 0.0];
/// let mut builder = ArtifactBuilder::new(network);
/// builder
///     .add_layer(1, &weight, &[0.1, -0.1], Storage::Int8(Granularity::PerChannel))?
///     .set_input_normalization(InputNormalization::new(255.0, vec![0.5], vec![0.25])?);
/// let artifact = Artifact::from_bytes(&builder.to_bytes()?)?;
/// assert_eq!(artifact.layer(1).unwrap().weight_shape, [2, 4]);
/// assert_eq!(artifact.input_normalization().unwrap().mean, [0.5]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct ArtifactBuilder {
    network: Option<NetworkSpec>,
    graph: Option<GraphSpec>,
    tensors: BTreeMap<String, RawTensor>,
    schemes: BTreeMap<String, Scheme>,
    activations: BTreeMap<usize, QParams>,
    normalization: Option<InputNormalization>,
}

fn builder_error(reason: impl Into<String>) -> Error {
    Error::Builder {
        reason: reason.into(),
    }
}

fn element_count(name: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| builder_error(format!("`{name}`: shape {shape:?} overflows")))
}

fn check_len(name: &str, what: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(builder_error(format!(
            "`{name}`: {what} has {len} values, expected {expected}"
        )))
    }
}

impl ArtifactBuilder {
    /// An empty artifact for `network`.
    pub fn new(network: NetworkSpec) -> Self {
        Self {
            network: Some(network),
            ..Self::default()
        }
    }

    /// An empty artifact for the graph `graph` (format version 3): its parameters are named
    /// after its nodes (`"<node>.weight"`), and [`ArtifactBuilder::add_layer`] and
    /// [`ArtifactBuilder::set_input_quantization`] take node indices.
    ///
    /// ```
    /// use model_spec::{GraphSpec, INPUT, Node, Op};
    /// use runtime::{Artifact, ArtifactBuilder, Model, QParams, Storage};
    ///
    /// // x + x, a batch norm that stays, the channel means, a dense head.
    /// let graph = GraphSpec {
    ///     name: "mine".into(),
    ///     input: [2, 3, 3],
    ///     nodes: vec![
    ///         Node::new("sum", Op::Add, &[INPUT, INPUT]),
    ///         Node::new("bn", Op::BatchNorm2d { features: 2, eps: 1e-5 }, &["sum"]),
    ///         Node::new("gap", Op::GlobalAvgPool, &["bn"]),
    ///         Node::new("fc", Op::Linear { in_features: 2, out_features: 1 }, &["gap"]),
    ///     ],
    /// };
    /// let mut builder = ArtifactBuilder::for_graph(graph.clone());
    /// builder
    ///     .add_batch_norm(1, &[2.0, 2.0], &[0.0, 1.0], &[0.0, 0.0], &[1.0, 1.0])?
    ///     .add_layer(3, &[1.0, -1.0], &[0.0], Storage::F32)?;
    /// let bytes = builder.to_bytes()?;
    /// let view = Artifact::from_bytes(&bytes)?;
    /// // The scale and shift the runtime applies: gamma / sqrt(var + eps), beta - mean * scale.
    /// let (scale, shift) = view.batch_norm(1).expect("node 1 is a kept batch norm");
    /// assert!((scale[0] - 2.0).abs() < 1e-4 && shift == [0.0, 1.0]);
    /// let model = Model::from_bytes(&bytes)?;
    /// assert_eq!(model.graph(), &graph);
    /// // Ones everywhere: (2 * 2 + 0) - (2 * 2 + 1) = -1.
    /// let y = model.run(ndarray::Array4::<f32>::ones((1, 2, 3, 3)).view())?;
    /// assert!((y[[0, 0]] + 1.0).abs() < 1e-4);
    ///
    /// // Full integer: the sum's inputs on one grid, by node index.
    /// builder.set_input_quantization(0, QParams::u8(0.01, 0));
    /// let view = Artifact::from_bytes(&builder.to_bytes()?)?;
    /// assert_eq!(view.input_quantization(0), Some(QParams::u8(0.01, 0)));
    /// # Ok::<(), runtime::Error>(())
    /// ```
    pub fn for_graph(graph: GraphSpec) -> Self {
        Self {
            graph: Some(graph),
            ..Self::default()
        }
    }

    /// Sets (or replaces) the network description (and drops a graph description).
    pub fn set_network(&mut self, network: NetworkSpec) -> &mut Self {
        self.network = Some(network);
        self.graph = None;
        self
    }

    /// The name prefix of node (or layer) `index`'s parameters and the operation there.
    fn node(&self, index: usize) -> Result<(String, Op)> {
        match (&self.graph, &self.network) {
            (Some(graph), _) => graph
                .nodes
                .get(index)
                .map(|n| (n.name.clone(), n.op.clone()))
                .ok_or_else(|| {
                    builder_error(format!(
                        "node {index} does not exist: the graph has {} nodes",
                        graph.nodes.len()
                    ))
                }),
            (None, Some(network)) => network
                .layers
                .get(index)
                .map(|l| (index.to_string(), Op::from(l)))
                .ok_or_else(|| {
                    builder_error(format!(
                        "layer {index} does not exist: the network has {} layers",
                        network.layers.len()
                    ))
                }),
            (None, None) => Err(builder_error("no network description was set")),
        }
    }

    /// Adds the four vectors of batch-norm node `node` of a graph, one that deployment could
    /// not fold into a convolution (`"<node>.weight"`, `.bias`, `.running_mean`,
    /// `.running_var`, PyTorch's names; stored as f32). Fails for other nodes and lengths.
    pub fn add_batch_norm(
        &mut self,
        node: usize,
        weight: &[f32],
        bias: &[f32],
        running_mean: &[f32],
        running_var: &[f32],
    ) -> Result<&mut Self> {
        let (name, op) = self.node(node)?;
        let Op::BatchNorm2d { features, .. } = op else {
            return Err(builder_error(format!(
                "node {node} ({}) is not a batch norm",
                op.name()
            )));
        };
        let parts = [
            ("weight", weight),
            ("bias", bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        ];
        for (part, values) in parts {
            self.add(&format!("{name}.{part}"), values, &[features], Storage::F32)?;
        }
        Ok(self)
    }

    /// Adds the weight and bias of layer `layer` (a conv2d or linear layer of the network):
    /// the weight in `storage`, in PyTorch's layout (`[out, in, k, k]` or `[out, in]`,
    /// row-major), the bias as f32 (as f16 when `storage` is [`Storage::F16`] or
    /// [`Storage::PaletteHalf`]). Fails when
    /// the layer has no parameters or the data does not fit its shapes.
    pub fn add_layer(
        &mut self,
        layer: usize,
        weight: &[f32],
        bias: &[f32],
        storage: Storage,
    ) -> Result<&mut Self> {
        let (name, op) = self.node(layer)?;
        let (shape, out) = op.weight_shape().ok_or_else(|| {
            let what = if self.graph.is_some() {
                "node"
            } else {
                "layer"
            };
            builder_error(format!(
                "{what} {layer} ({}) has no weight: only conv2d and linear {what}s do",
                op.name()
            ))
        })?;
        let bias_storage = match storage {
            Storage::F16 | Storage::PaletteHalf(_) => Storage::F16,
            _ => Storage::F32,
        };
        self.add(&format!("{name}.weight"), weight, &shape, storage)?;
        self.add(&format!("{name}.bias"), bias, &[out], bias_storage)
    }

    /// Adds parameter `name` of shape `shape` from its real values, stored in `storage`.
    pub fn add(
        &mut self,
        name: &str,
        values: &[f32],
        shape: &[usize],
        storage: Storage,
    ) -> Result<&mut Self> {
        check_len(name, "data", values.len(), element_count(name, shape)?)?;
        match storage {
            Storage::F32 => {
                self.describe(name, Scheme::F32)?;
                self.put(name, Dtype::F32, shape, le_bytes(values, f32::to_le_bytes))?;
            }
            Storage::F16 => {
                self.describe(name, Scheme::F16)?;
                let bytes = values
                    .iter()
                    .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                    .collect();
                self.put(name, Dtype::F16, shape, bytes)?;
            }
            Storage::Int8(granularity)
            | Storage::Int8Sparse(granularity)
            | Storage::Int8Smallest(granularity) => {
                let rows = shape.first().copied().unwrap_or(1);
                if rows == 0 {
                    return Err(builder_error(format!("`{name}` has no output channels")));
                }
                let q = quantize_weights(values, rows, granularity, BitWidth::INT8)
                    .map_err(|e| builder_error(format!("`{name}`: {e}")))?;
                let nonzero = q.values.iter().filter(|&&c| c != 0).count();
                let sparse = match storage {
                    Storage::Int8Sparse(_) => true,
                    Storage::Int8Smallest(_) => {
                        q.values.len().div_ceil(8) + nonzero < q.values.len()
                    }
                    _ => false,
                };
                self.add_encoded(
                    name,
                    shape,
                    Encoded::Int8 {
                        codes: &q.values,
                        scales: &q.scales,
                        zero_points: &q.zero_points,
                        granularity,
                        sparse,
                    },
                )?;
            }
            Storage::Palette(granularity) | Storage::PaletteHalf(granularity) => {
                let rows = shape.first().copied().unwrap_or(1);
                if rows == 0 {
                    return Err(builder_error(format!("`{name}` has no output channels")));
                }
                let palette = Palettized::choose(name, values, rows, granularity)?;
                self.add_encoded(
                    name,
                    shape,
                    Encoded::Palette {
                        indices: &palette.indices,
                        codebook: &palette.codebook,
                        granularity,
                        kept: palette.kept.as_deref(),
                        half_codebook: matches!(storage, Storage::PaletteHalf(_)),
                    },
                )?;
            }
            Storage::Csr => {
                let rows = shape.first().copied().unwrap_or(1);
                let cols = values.len().checked_div(rows).unwrap_or(0);
                if i32::try_from(values.len()).is_err() {
                    return Err(builder_error(format!(
                        "`{name}` is too large for i32 CSR indices"
                    )));
                }
                let csr = CsrMatrix::from_dense(values, rows, cols);
                // Both fit i32: every index is below `values.len()`, checked above.
                let row_ptr: Vec<i32> = csr.row_ptr().iter().map(|&p| p as i32).collect();
                let col_idx: Vec<i32> = csr.col_idx().iter().map(|&c| c as i32).collect();
                self.add_encoded(
                    name,
                    shape,
                    Encoded::Csr {
                        row_ptr: &row_ptr,
                        col_idx: &col_idx,
                        values: csr.values(),
                    },
                )?;
            }
        }
        Ok(self)
    }

    /// Adds parameter `name` of (dense) shape `shape` in its stored form.
    pub fn add_encoded(
        &mut self,
        name: &str,
        shape: &[usize],
        encoded: Encoded<'_>,
    ) -> Result<&mut Self> {
        let len = element_count(name, shape)?;
        match encoded {
            Encoded::Int8 {
                codes,
                scales,
                zero_points,
                granularity,
                sparse,
            } => {
                check_len(name, "data", codes.len(), len)?;
                let groups = match granularity {
                    Granularity::PerTensor => 1,
                    Granularity::PerChannel => shape.first().copied().unwrap_or(1),
                };
                check_len(name, "scales", scales.len(), groups)?;
                check_len(name, "zero points", zero_points.len(), groups)?;
                if sparse {
                    let per_group = len / groups.max(1);
                    let mut mask = vec![0u8; len.div_ceil(8)];
                    let mut kept = Vec::new();
                    for (i, &v) in codes.iter().enumerate() {
                        if v != zero_points[i / per_group.max(1)] {
                            mask[i / 8] |= 1 << (i % 8);
                            kept.push(v as u8);
                        }
                    }
                    self.describe(name, Scheme::Int8Sparse { granularity })?;
                    self.put(&format!("{name}.mask"), Dtype::U8, &[mask.len()], mask)?;
                    self.put(&format!("{name}.values"), Dtype::I8, &[kept.len()], kept)?;
                } else {
                    self.describe(name, Scheme::Int8 { granularity })?;
                    let bytes = codes.iter().map(|&v| v as u8).collect();
                    self.put(name, Dtype::I8, shape, bytes)?;
                }
                let aux = [scales.len()];
                self.put(
                    &format!("{name}.scale"),
                    Dtype::F32,
                    &aux,
                    le_bytes(scales, f32::to_le_bytes),
                )?;
                let zp = zero_points.iter().map(|&v| v as u8).collect();
                self.put(&format!("{name}.zero_point"), Dtype::I8, &aux, zp)?;
            }
            Encoded::Csr {
                row_ptr,
                col_idx,
                values,
            } => {
                check_len(name, "col_idx", col_idx.len(), values.len())?;
                self.describe(
                    name,
                    Scheme::Csr {
                        shape: shape.to_vec(),
                    },
                )?;
                let i32_bytes = |v: &[i32]| le_bytes(v, i32::to_le_bytes);
                self.put(
                    &format!("{name}.row_ptr"),
                    Dtype::I32,
                    &[row_ptr.len()],
                    i32_bytes(row_ptr),
                )?;
                self.put(
                    &format!("{name}.col_idx"),
                    Dtype::I32,
                    &[col_idx.len()],
                    i32_bytes(col_idx),
                )?;
                self.put(
                    &format!("{name}.values"),
                    Dtype::F32,
                    &[values.len()],
                    le_bytes(values, f32::to_le_bytes),
                )?;
            }
            Encoded::Palette {
                indices,
                codebook,
                granularity,
                kept,
                half_codebook,
            } => {
                check_len(name, "indices", indices.len(), len)?;
                let groups = match granularity {
                    Granularity::PerTensor => 1,
                    Granularity::PerChannel => shape.first().copied().unwrap_or(1),
                };
                let clusters = codebook.len().checked_div(groups).unwrap_or(0);
                let bits = palette::palette_index_bits(clusters)
                    .filter(|_| clusters * groups == codebook.len())
                    .ok_or_else(|| {
                        builder_error(format!(
                            "`{name}`: a codebook of {} values is not {groups} rows of 1 to {} \
                             clusters",
                            codebook.len(),
                            palette::MAX_PALETTE_CLUSTERS
                        ))
                    })?;
                let fits = |i: usize| {
                    let index = indices[i];
                    if u16::from(index) < 1 << bits {
                        Ok(index)
                    } else {
                        Err(builder_error(format!(
                            "`{name}`: index {index} of element {i} does not fit the {bits} bits \
                             of a {clusters}-cluster codebook"
                        )))
                    }
                };
                let (scheme, positions, stored) = match kept {
                    None => {
                        let stored = (0..len).map(fits).collect::<Result<Vec<u8>>>()?;
                        (Scheme::Palette { granularity, bits }, None, stored)
                    }
                    Some(kept) => {
                        check_len(name, "kept flags", kept.len(), len)?;
                        if len > MAX_SPARSE_ELEMENTS {
                            return Err(builder_error(format!(
                                "`{name}` has {len} elements, palette_sparse holds at most \
                                 {MAX_SPARSE_ELEMENTS}"
                            )));
                        }
                        let positions: Vec<u32> =
                            (0..len as u32).filter(|&i| kept[i as usize]).collect();
                        let stored = positions
                            .iter()
                            .map(|&p| fits(p as usize))
                            .collect::<Result<Vec<u8>>>()?;
                        let (code, bytes) = position_code(&positions, len);
                        let scheme = Scheme::PaletteSparse {
                            granularity,
                            bits,
                            positions: code,
                        };
                        (scheme, Some(bytes), stored)
                    }
                };
                self.describe(name, scheme)?;
                if let Some(bytes) = positions {
                    self.put(
                        &format!("{name}.positions"),
                        Dtype::U8,
                        &[bytes.len()],
                        bytes,
                    )?;
                }
                let packed = palette::pack_indices(stored, bits);
                self.put(
                    &format!("{name}.indices"),
                    Dtype::U8,
                    &[packed.len()],
                    packed,
                )?;
                let (dtype, bytes) = if half_codebook {
                    (Dtype::F16, half_bytes(name, codebook)?)
                } else {
                    (Dtype::F32, le_bytes(codebook, f32::to_le_bytes))
                };
                self.put(
                    &format!("{name}.codebook"),
                    dtype,
                    &[groups, clusters],
                    bytes,
                )?;
            }
        }
        Ok(self)
    }

    /// Records the quantization of the input of layer `layer` (a conv2d or linear layer with
    /// int8 weights), which makes that layer run in full-integer (static) mode. The format
    /// stores a scale and a zero point on the u8 grid: [`ArtifactBuilder::to_bytes`] refuses
    /// parameters with other levels ([`QParams::is_u8`]).
    pub fn set_input_quantization(&mut self, layer: usize, params: QParams) -> &mut Self {
        self.activations.insert(layer, params);
        self
    }

    /// Records how raw input becomes the network's input (the `input` metadata entry), so
    /// that a reader can feed the model without knowing how it was trained.
    pub fn set_input_normalization(&mut self, normalization: InputNormalization) -> &mut Self {
        self.normalization = Some(normalization);
        self
    }

    fn put(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: Vec<u8>) -> Result<()> {
        if self.tensors.contains_key(name) {
            return Err(builder_error(format!("tensor `{name}` added twice")));
        }
        self.tensors.insert(
            name.to_owned(),
            RawTensor {
                dtype,
                shape: shape.to_vec(),
                data,
            },
        );
        Ok(())
    }

    fn describe(&mut self, name: &str, scheme: Scheme) -> Result<()> {
        if self.schemes.contains_key(name) {
            return Err(builder_error(format!("parameter `{name}` added twice")));
        }
        self.schemes.insert(name.to_owned(), scheme);
        Ok(())
    }

    /// The artifact as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut metadata = HashMap::new();
        metadata.insert("format".to_owned(), FORMAT.to_owned());
        match (&self.graph, &self.network) {
            (Some(graph), _) => {
                metadata.insert("format_version".to_owned(), GRAPH_VERSION.to_owned());
                metadata.insert("graph".to_owned(), to_json(graph)?);
            }
            (None, Some(network)) => {
                metadata.insert("format_version".to_owned(), FORMAT_VERSION.to_owned());
                metadata.insert("network".to_owned(), to_json(network)?);
            }
            (None, None) => return Err(builder_error("no network description was set")),
        }
        metadata.insert("tensors".to_owned(), to_json(&self.schemes)?);
        if !self.activations.is_empty() {
            let activations = self
                .activations
                .iter()
                .map(|(layer, q)| {
                    if !q.is_u8() {
                        return Err(builder_error(format!(
                            "the input quantization of layer {layer} has levels {}..={}, \
                             the format stores the u8 grid 0..=255 only",
                            q.qmin, q.qmax
                        )));
                    }
                    let stored = StoredActivation {
                        scale: q.scale,
                        zero_point: q.zero_point,
                    };
                    let name = match &self.graph {
                        Some(_) => self.node(*layer)?.0,
                        None => layer.to_string(),
                    };
                    Ok((name, stored))
                })
                .collect::<Result<BTreeMap<String, StoredActivation>>>()?;
            metadata.insert("activations".to_owned(), to_json(&activations)?);
        }
        if let Some(normalization) = &self.normalization {
            metadata.insert("input".to_owned(), to_json(normalization)?);
        }
        let bytes = safetensors::serialize(
            self.tensors.iter().map(|(k, v)| (k.as_str(), v)),
            Some(metadata),
        )
        .map_err(|e| builder_error(e.to_string()))?;
        canonical(bytes)
    }

    /// Writes the artifact to `path` atomically ([`atomic_file::write`]): a temporary file
    /// in the same folder, flushed and renamed over `path`, so the file is never seen
    /// half-written and is left as it was when writing fails.
    ///
    /// # Errors
    /// Those of [`ArtifactBuilder::to_bytes`], and [`Error::Io`] naming `path` when the file
    /// cannot be written.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        atomic_file::write(path, &bytes).map_err(|e| Error::Io {
            path: path.to_owned(),
            source: e.into_io_error(),
        })
    }
}

/// The smaller code of the stored `positions` (ascending) among `numel` elements: the
/// bitmask, or the Rice code with the parameter that minimises its size when that is
/// strictly smaller.
fn position_code(positions: &[u32], numel: usize) -> (PositionCode, Vec<u8>) {
    let (parameter, rice_bytes) = palette::best_rice_parameter(positions, numel);
    if rice_bytes < numel.div_ceil(8) {
        let code = palette::encode_rice(positions, numel, parameter);
        (PositionCode::Rice { parameter }, code)
    } else {
        (
            PositionCode::Bitmask,
            palette::encode_bitmask(positions, numel),
        )
    }
}

/// Real values as a palette: indices, codebook and, for `palette_sparse`, the kept flags.
struct Palettized {
    indices: Vec<u8>,
    codebook: Vec<f32>,
    kept: Option<Vec<bool>>,
}

impl Palettized {
    /// The smaller of the dense and the sparse palette of `values` (`rows` output
    /// channels), the dense one on a tie.
    fn choose(name: &str, values: &[f32], rows: usize, granularity: Granularity) -> Result<Self> {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(builder_error(format!(
                "`{name}`: value {i} is {}, a palette stores finite values",
                values[i]
            )));
        }
        let groups = match granularity {
            Granularity::PerTensor => 1,
            Granularity::PerChannel => rows,
        };
        let dense = Self::build(values, groups, false);
        let sparse =
            (values.len() <= MAX_SPARSE_ELEMENTS).then(|| Self::build(values, groups, true));
        match (dense, sparse) {
            (Ok(dense), Some(Ok(sparse))) if sparse.size(groups) < dense.size(groups) => Ok(sparse),
            (Ok(dense), _) => Ok(dense),
            (Err(_), Some(Ok(sparse))) => Ok(sparse),
            (Err((group, count)), _) => Err(builder_error(format!(
                "`{name}`: group {group} has {count} distinct values, a palette holds at most {} \
                 per group (cluster the values first)",
                palette::MAX_PALETTE_CLUSTERS
            ))),
        }
    }

    /// The palette of `values` in `groups` equal groups: every distinct value (by bit
    /// pattern) of a group, ascending, in its codebook row, zeros left out when `sparse`.
    /// `Err((group, distinct values))` for a group with more than 256.
    fn build(
        values: &[f32],
        groups: usize,
        sparse: bool,
    ) -> std::result::Result<Self, (usize, usize)> {
        let per_group = values.len() / groups;
        let stored = |v: f32| !(sparse && v == 0.0);
        let mut rows = Vec::with_capacity(groups);
        for (g, group) in values.chunks(per_group.max(1)).enumerate() {
            let mut distinct: Vec<f32> = group.iter().copied().filter(|&v| stored(v)).collect();
            distinct.sort_by(f32::total_cmp);
            distinct.dedup_by(|a, b| a.to_bits() == b.to_bits());
            if distinct.len() > palette::MAX_PALETTE_CLUSTERS {
                return Err((g, distinct.len()));
            }
            rows.push(distinct);
        }
        let clusters = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut codebook = Vec::with_capacity(groups * clusters);
        for row in &rows {
            codebook.extend_from_slice(row);
            codebook.resize(codebook.len() + clusters - row.len(), 0.0);
        }
        // Rows beyond the values (an empty weight): all padding.
        codebook.resize(groups * clusters, 0.0);
        let indices = values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let row = &rows[i / per_group.max(1)];
                // Every stored value is in its row; the others get index 0, unused.
                row.binary_search_by(|c| c.total_cmp(&v)).unwrap_or(0) as u8
            })
            .collect();
        let kept = sparse.then(|| values.iter().map(|&v| stored(v)).collect());
        Ok(Self {
            indices,
            codebook,
            kept,
        })
    }

    /// The bytes this palette takes in an artifact.
    fn size(&self, groups: usize) -> usize {
        let clusters = self.codebook.len() / groups.max(1);
        let bits = palette::palette_index_bits(clusters).unwrap_or(8);
        let (stored, positions) = match &self.kept {
            None => (self.indices.len(), 0),
            Some(kept) => {
                let positions: Vec<u32> = (0..kept.len() as u32)
                    .filter(|&i| kept[i as usize])
                    .collect();
                let bytes = position_code(&positions, kept.len()).1.len();
                (positions.len(), bytes)
            }
        };
        positions
            + palette::packed_len(stored, bits).unwrap_or(usize::MAX)
            + 4 * self.codebook.len()
    }
}

/// `bytes` with the header's keys in sorted order: safetensors writes the metadata from a
/// `HashMap`, whose order changes from run to run, and the same model must give the same
/// bytes (and the same gzip size) every time. Offsets are relative to the data, which does
/// not move; the header keeps its padding to a multiple of 8 bytes.
fn canonical(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let damaged = || builder_error("safetensors wrote a header it cannot read back");
    let len = bytes
        .first_chunk::<8>()
        .map(|n| u64::from_le_bytes(*n) as usize)
        .filter(|&n| 8 + n <= bytes.len())
        .ok_or_else(damaged)?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + len]).map_err(|_| damaged())?;
    let sorted = |value: serde_json::Value| -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => {
                let map: BTreeMap<String, serde_json::Value> = map.into_iter().collect();
                serde_json::json!(map)
            }
            other => other,
        }
    };
    let header: BTreeMap<String, serde_json::Value> =
        header.into_iter().map(|(k, v)| (k, sorted(v))).collect();
    let mut text = serde_json::to_vec(&header).map_err(|e| builder_error(e.to_string()))?;
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - len);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    Ok(out)
}

fn to_json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| builder_error(e.to_string()))
}
