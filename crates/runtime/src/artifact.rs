//! The artifact format: one safetensors file holding the network description, every
//! parameter in its storage scheme, and optional activation quantization parameters.
//! `docs/FORMAT.md` is the specification; this module writes it ([`ArtifactBuilder`]) and
//! reads it back with full validation ([`decode`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use half::f16;
use model_spec::{LayerSpec, NetworkSpec};
use quantization::{BitWidth, QParams, QuantizedWeights, quantize_weights};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels::{CsrMatrix, MAX_INT8_K};

/// Whether an int8 weight has one scale and zero point per output channel (axis 0,
/// auxiliary tensors of shape `[out]`) or one in all (shape `[1]`).
pub use quantization::Granularity;

/// An `activations` entry as the format stores it: a layer input's scale and zero point on
/// the u8 grid.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct StoredActivation {
    scale: f32,
    zero_point: i32,
}

/// Value of the `format` metadata entry.
pub const FORMAT: &str = "tch-mot";
/// Value of the `format_version` metadata entry this runtime writes and reads.
pub const FORMAT_VERSION: &str = "1";

/// Largest hyperparameter (channels, features, kernel, stride, padding, input side) accepted.
pub const MAX_DIM: usize = 1 << 20;
/// Largest number of layers accepted.
pub const MAX_LAYERS: usize = 1 << 12;
/// Largest number of elements of one sample's activation (or im2col matrix) accepted: keeps
/// a hostile file from making a single-sample run allocate without bound.
pub const MAX_ACTIVATION_ELEMENTS: usize = 1 << 26;

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
        }
    }
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

/// Writes artifacts.
///
/// The builder checks that data fits the shapes it is given and that names are unique; the
/// loader ([`Model::from_bytes`](crate::Model::from_bytes)) checks everything else, so a
/// builder can also produce deliberately broken files for tests.
#[derive(Clone, Debug, Default)]
pub struct ArtifactBuilder {
    network: Option<NetworkSpec>,
    tensors: BTreeMap<String, RawTensor>,
    schemes: BTreeMap<String, Scheme>,
    activations: BTreeMap<usize, QParams>,
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

impl ArtifactBuilder {
    /// An empty artifact for `network`.
    pub fn new(network: NetworkSpec) -> Self {
        Self {
            network: Some(network),
            ..Self::default()
        }
    }

    /// Sets (or replaces) the network description.
    pub fn set_network(&mut self, network: NetworkSpec) -> &mut Self {
        self.network = Some(network);
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

    fn check_len(name: &str, what: &str, len: usize, expected: usize) -> Result<()> {
        if len == expected {
            Ok(())
        } else {
            Err(builder_error(format!(
                "`{name}`: {what} has {len} values, expected {expected}"
            )))
        }
    }

    /// Adds an f32 parameter.
    pub fn add_f32(&mut self, name: &str, data: &[f32], shape: &[usize]) -> Result<&mut Self> {
        Self::check_len(name, "data", data.len(), element_count(name, shape)?)?;
        self.describe(name, Scheme::F32)?;
        self.put(name, Dtype::F32, shape, le_bytes(data, f32::to_le_bytes))?;
        Ok(self)
    }

    /// Adds a parameter stored as f16 (rounded to nearest from `data`).
    pub fn add_f16(&mut self, name: &str, data: &[f32], shape: &[usize]) -> Result<&mut Self> {
        Self::check_len(name, "data", data.len(), element_count(name, shape)?)?;
        self.describe(name, Scheme::F16)?;
        let bytes = data
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        self.put(name, Dtype::F16, shape, bytes)?;
        Ok(self)
    }

    /// Adds an int8 parameter with one scale and zero point per output channel (axis 0):
    /// `w[c, ...] = scales[c] * (values[c, ...] - zero_points[c])`.
    pub fn add_int8_per_channel(
        &mut self,
        name: &str,
        values: &[i8],
        shape: &[usize],
        scales: &[f32],
        zero_points: &[i8],
    ) -> Result<&mut Self> {
        let channels = shape.first().copied().unwrap_or(1);
        self.add_int8(
            name,
            values,
            shape,
            scales,
            zero_points,
            Granularity::PerChannel,
            channels,
        )
    }

    /// Adds an int8 parameter with one scale and zero point for the whole tensor.
    pub fn add_int8_per_tensor(
        &mut self,
        name: &str,
        values: &[i8],
        shape: &[usize],
        scale: f32,
        zero_point: i8,
    ) -> Result<&mut Self> {
        self.add_int8(
            name,
            values,
            shape,
            &[scale],
            &[zero_point],
            Granularity::PerTensor,
            1,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn add_int8(
        &mut self,
        name: &str,
        values: &[i8],
        shape: &[usize],
        scales: &[f32],
        zero_points: &[i8],
        granularity: Granularity,
        groups: usize,
    ) -> Result<&mut Self> {
        Self::check_len(name, "data", values.len(), element_count(name, shape)?)?;
        Self::check_len(name, "scales", scales.len(), groups)?;
        Self::check_len(name, "zero points", zero_points.len(), groups)?;
        self.describe(name, Scheme::Int8 { granularity })?;
        self.put(
            name,
            Dtype::I8,
            shape,
            values.iter().map(|&v| v as u8).collect(),
        )?;
        self.put_groups(name, scales, zero_points)?;
        Ok(self)
    }

    /// The `name.scale` and `name.zero_point` tensors of an int8 weight.
    fn put_groups(&mut self, name: &str, scales: &[f32], zero_points: &[i8]) -> Result<()> {
        let aux = [scales.len()];
        self.put(
            &format!("{name}.scale"),
            Dtype::F32,
            &aux,
            le_bytes(scales, f32::to_le_bytes),
        )?;
        let zp = zero_points.iter().map(|&v| v as u8).collect();
        self.put(&format!("{name}.zero_point"), Dtype::I8, &aux, zp)
    }

    /// Adds int8 codes like [`ArtifactBuilder::add_int8_per_channel`] (per channel) or
    /// [`ArtifactBuilder::add_int8_per_tensor`] (one group), stored in the `int8_sparse`
    /// scheme: a bitmask of the codes that differ from their group's zero point and those
    /// codes only. Smaller than `int8` when fewer than seven elements in eight are kept.
    pub fn add_int8_sparse(
        &mut self,
        name: &str,
        values: &[i8],
        shape: &[usize],
        scales: &[f32],
        zero_points: &[i8],
        granularity: Granularity,
    ) -> Result<&mut Self> {
        let len = element_count(name, shape)?;
        Self::check_len(name, "data", values.len(), len)?;
        let rows = shape.first().copied().unwrap_or(1).max(1);
        let groups = match granularity {
            Granularity::PerTensor => 1,
            Granularity::PerChannel => rows,
        };
        Self::check_len(name, "scales", scales.len(), groups)?;
        Self::check_len(name, "zero points", zero_points.len(), groups)?;
        let per_group = len / groups.max(1);
        let mut mask = vec![0u8; len.div_ceil(8)];
        let mut kept = Vec::new();
        for (i, &v) in values.iter().enumerate() {
            if v != zero_points[i / per_group.max(1)] {
                mask[i / 8] |= 1 << (i % 8);
                kept.push(v as u8);
            }
        }
        self.describe(name, Scheme::Int8Sparse { granularity })?;
        self.put(&format!("{name}.mask"), Dtype::U8, &[mask.len()], mask)?;
        self.put(&format!("{name}.values"), Dtype::I8, &[kept.len()], kept)?;
        self.put_groups(name, scales, zero_points)?;
        Ok(self)
    }

    /// Quantizes f32 weights like [`ArtifactBuilder::add_int8_quantized`] and stores them in
    /// whichever of the `int8` and `int8_sparse` schemes is smaller: sparse when fewer than
    /// seven codes in eight are non-zero (pruned weights).
    pub fn add_int8_quantized_compact(
        &mut self,
        name: &str,
        data: &[f32],
        shape: &[usize],
        granularity: Granularity,
    ) -> Result<&mut Self> {
        let q = Self::quantized(name, data, shape, granularity)?;
        let nonzero = q.values.iter().filter(|&&c| c != 0).count();
        if q.values.len().div_ceil(8) + nonzero < q.values.len() {
            self.add_int8_sparse(
                name,
                &q.values,
                shape,
                &q.scales,
                &q.zero_points,
                granularity,
            )
        } else {
            let groups = q.scales.len();
            self.add_int8(
                name,
                &q.values,
                shape,
                &q.scales,
                &q.zero_points,
                granularity,
                groups,
            )
        }
    }

    /// Symmetric int8 codes, scales and zero points of `data` (shape `shape`), per group:
    /// `quantization::quantize_weights`.
    fn quantized(
        name: &str,
        data: &[f32],
        shape: &[usize],
        granularity: Granularity,
    ) -> Result<QuantizedWeights> {
        Self::check_len(name, "data", data.len(), element_count(name, shape)?)?;
        let rows = shape.first().copied().unwrap_or(1);
        if rows == 0 {
            return Err(builder_error(format!("`{name}` has no output channels")));
        }
        quantize_weights(data, rows, granularity, BitWidth::INT8)
            .map_err(|e| builder_error(format!("`{name}`: {e}")))
    }

    /// Quantizes f32 weights symmetrically with `quantization::quantize_weights` (codes in
    /// `-127..=127`, zero point 0, scale `max |w| / 127` per group) and adds them as int8.
    /// A NaN or infinite weight is an error.
    pub fn add_int8_quantized(
        &mut self,
        name: &str,
        data: &[f32],
        shape: &[usize],
        granularity: Granularity,
    ) -> Result<&mut Self> {
        let q = Self::quantized(name, data, shape, granularity)?;
        let groups = q.scales.len();
        self.add_int8(
            name,
            &q.values,
            shape,
            &q.scales,
            &q.zero_points,
            granularity,
            groups,
        )
    }

    /// Adds a CSR-sparse f32 parameter of dense shape `shape` (rows `shape[0]`, columns the
    /// product of the rest). The arrays are stored as given; the loader validates them.
    pub fn add_csr(
        &mut self,
        name: &str,
        shape: &[usize],
        row_ptr: &[i32],
        col_idx: &[i32],
        values: &[f32],
    ) -> Result<&mut Self> {
        element_count(name, shape)?;
        Self::check_len(name, "col_idx", col_idx.len(), values.len())?;
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
        let value_bytes = le_bytes(values, f32::to_le_bytes);
        self.put(
            &format!("{name}.values"),
            Dtype::F32,
            &[values.len()],
            value_bytes,
        )?;
        Ok(self)
    }

    /// Adds a dense f32 parameter in CSR form, keeping its non-zero entries.
    pub fn add_csr_from_dense(
        &mut self,
        name: &str,
        data: &[f32],
        shape: &[usize],
    ) -> Result<&mut Self> {
        Self::check_len(name, "data", data.len(), element_count(name, shape)?)?;
        let rows = shape.first().copied().unwrap_or(1);
        let cols = data.len().checked_div(rows).unwrap_or(0);
        if i32::try_from(data.len()).is_err() {
            return Err(builder_error(format!(
                "`{name}` is too large for i32 CSR indices"
            )));
        }
        let csr = CsrMatrix::from_dense(data, rows, cols);
        // Both fit i32: every index is below `data.len()`, checked above.
        let row_ptr: Vec<i32> = csr.row_ptr().iter().map(|&p| p as i32).collect();
        let col_idx: Vec<i32> = csr.col_idx().iter().map(|&c| c as i32).collect();
        self.add_csr(name, shape, &row_ptr, &col_idx, csr.values())
    }

    /// Records the quantization of the input of layer `layer` (a conv2d or linear layer with
    /// int8 weights), which makes that layer run in full-integer (static) mode. The format
    /// stores a scale and a zero point on the u8 grid: [`ArtifactBuilder::to_bytes`] refuses
    /// parameters with other levels ([`QParams::is_u8`]).
    pub fn set_input_quantization(&mut self, layer: usize, params: QParams) -> &mut Self {
        self.activations.insert(layer, params);
        self
    }

    /// The artifact as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let network = self
            .network
            .as_ref()
            .ok_or_else(|| builder_error("no network description was set"))?;
        let mut metadata = HashMap::new();
        metadata.insert("format".to_owned(), FORMAT.to_owned());
        metadata.insert("format_version".to_owned(), FORMAT_VERSION.to_owned());
        metadata.insert("network".to_owned(), to_json(network)?);
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
                    Ok((layer.to_string(), stored))
                })
                .collect::<Result<BTreeMap<String, StoredActivation>>>()?;
            metadata.insert("activations".to_owned(), to_json(&activations)?);
        }
        let bytes = safetensors::serialize(
            self.tensors.iter().map(|(k, v)| (k.as_str(), v)),
            Some(metadata),
        )
        .map_err(|e| builder_error(e.to_string()))?;
        canonical(bytes)
    }

    /// Writes the artifact to `path`, atomically: a sibling temporary file renamed into
    /// place, so the file is never seen half-written.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let io = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        std::fs::write(&tmp, &bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })
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
}

/// A validated artifact.
#[derive(Clone, Debug)]
pub(crate) struct Decoded {
    pub network: NetworkSpec,
    /// The per-sample input shape of every layer, then the network's output shape.
    pub shapes: Vec<Vec<usize>>,
    /// Parameters of every conv2d and linear layer, `None` for the others.
    pub params: Vec<Option<LayerParams>>,
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

/// Checks hyperparameter bounds and walks the shapes with checked arithmetic, so that the
/// spec's own validation (unchecked arithmetic) never overflows; returns the per-layer input
/// shapes and the output shape.
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
    if network.input.iter().product::<usize>() > MAX_ACTIVATION_ELEMENTS {
        return Err(too_big(format!(
            "the input {:?} exceeds {MAX_ACTIVATION_ELEMENTS} elements",
            network.input
        )));
    }
    // Walk the shapes; stop at the first layer that does not fit and let the spec explain.
    let mut shape = network.input.to_vec();
    let mut out = vec![shape.clone()];
    for (i, layer) in network.layers.iter().enumerate() {
        let next = match (layer, shape.as_slice()) {
            (
                &LayerSpec::Conv2d {
                    in_channels,
                    out_channels,
                    kernel,
                    stride,
                    padding,
                },
                &[c, h, w],
            ) if c == in_channels
                && kernel > 0
                && stride > 0
                && kernel <= h + 2 * padding
                && kernel <= w + 2 * padding =>
            {
                let side = |s: usize| (s + 2 * padding - kernel) / stride + 1;
                let (oh, ow) = (side(h), side(w));
                let patches = oh
                    .checked_mul(ow)
                    .and_then(|p| p.checked_mul(c * kernel * kernel));
                if patches.is_none_or(|p| p > MAX_ACTIVATION_ELEMENTS) {
                    return Err(Error::Unsupported {
                        file: file.to_owned(),
                        reason: format!(
                            "layer {i} (conv2d) needs an im2col matrix above {MAX_ACTIVATION_ELEMENTS} elements"
                        ),
                    });
                }
                vec![out_channels, oh, ow]
            }
            (
                &LayerSpec::Linear {
                    in_features,
                    out_features,
                },
                &[f],
            ) if f == in_features => vec![out_features],
            (&LayerSpec::MaxPool2d { kernel, stride }, &[c, h, w])
                if kernel > 0 && stride > 0 && kernel <= h && kernel <= w =>
            {
                vec![c, (h - kernel) / stride + 1, (w - kernel) / stride + 1]
            }
            (LayerSpec::Flatten, _) => {
                match shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) {
                    Some(n) => vec![n],
                    None => break,
                }
            }
            (LayerSpec::Relu | LayerSpec::Dropout { .. }, _) => shape.clone(),
            _ => break,
        };
        let elements = next.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if elements.is_none_or(|n| n > MAX_ACTIVATION_ELEMENTS) {
            return Err(Error::Unsupported {
                file: file.to_owned(),
                reason: format!(
                    "layer {i} ({}) outputs {next:?}, above {MAX_ACTIVATION_ELEMENTS} elements per sample",
                    layer.op()
                ),
            });
        }
        shape = next;
        out.push(shape.clone());
    }
    let output = network.validate().map_err(|source| Error::InvalidNetwork {
        file: file.to_owned(),
        source,
    })?;
    // The walk and the spec agree on every valid network.
    if out.len() != network.layers.len() + 1 || out.last() != Some(&output) {
        return Err(malformed(
            file,
            "network",
            "shape inference disagrees with the specification",
        ));
    }
    Ok(out)
}

/// The weight and bias shapes of a conv2d or linear layer.
fn param_shapes(layer: &LayerSpec) -> Option<(Vec<usize>, usize)> {
    match *layer {
        LayerSpec::Conv2d {
            in_channels,
            out_channels,
            kernel,
            ..
        } => Some((
            vec![out_channels, in_channels, kernel, kernel],
            out_channels,
        )),
        LayerSpec::Linear {
            in_features,
            out_features,
        } => Some((vec![out_features, in_features], out_features)),
        _ => None,
    }
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
    }
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

/// Parses and validates an artifact. `file` names it in errors.
pub(crate) fn decode(bytes: &[u8], file: &str) -> Result<Decoded> {
    decode_with_schemes(bytes, file).map(|(decoded, _)| decoded)
}

/// The storage schemes of one layer's weight and bias, as the artifact declares them.
#[derive(Clone, Debug)]
pub(crate) struct LayerSchemes {
    pub weight: Scheme,
    pub bias: Scheme,
}

/// [`decode`], also giving the storage schemes of every conv2d and linear layer (`None` for
/// the other layers).
pub(crate) fn decode_with_schemes(
    bytes: &[u8],
    file: &str,
) -> Result<(Decoded, Vec<Option<LayerSchemes>>)> {
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
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            file: file.to_owned(),
            found: version.to_owned(),
            supported: FORMAT_VERSION,
        });
    }
    let network: NetworkSpec = serde_json::from_str(metadata_entry(&metadata, file, "network")?)
        .map_err(|e| malformed(file, "network", e.to_string()))?;
    let shapes = shapes(&network, file)?;
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
    let mut params = Vec::with_capacity(network.layers.len());
    let mut layer_schemes = Vec::with_capacity(network.layers.len());
    for (i, layer) in network.layers.iter().enumerate() {
        let Some((weight_shape, out)) = param_shapes(layer) else {
            params.push(None);
            layer_schemes.push(None);
            continue;
        };
        let (weight_name, bias_name) = (format!("{i}.weight"), format!("{i}.bias"));
        let scheme_of = |schemes: &mut BTreeMap<String, Scheme>, name: &str| {
            schemes
                .remove(name)
                .ok_or_else(|| malformed(file, "tensors", format!("no scheme for `{name}`")))
        };
        let weight_scheme = scheme_of(&mut schemes, &weight_name)?;
        let weight = decode_weight(&mut reader, &weight_name, &weight_scheme, &weight_shape)?;
        let bias_scheme = scheme_of(&mut schemes, &bias_name)?;
        let bias = match &bias_scheme {
            Scheme::F32 => reader.f32s(&bias_name, &[out])?,
            Scheme::F16 => reader.f16s(&bias_name, &[out])?,
            other => {
                return Err(Error::Unsupported {
                    file: file.to_owned(),
                    reason: format!(
                        "bias `{bias_name}` uses scheme {}, biases must be f32 or f16",
                        other.name()
                    ),
                });
            }
        };
        let input_quant = activations.remove(&i.to_string());
        if let Some(q) = input_quant {
            if !matches!(weight, Weight::Int8 { .. }) {
                return Err(malformed(
                    file,
                    "activations",
                    format!("layer {i} has input quantization but its weight is not int8"),
                ));
            }
            if !q.is_valid() {
                return Err(malformed(
                    file,
                    "activations",
                    format!(
                        "layer {i}: scale {} / zero point {} are not a positive finite scale and a u8 code",
                        q.scale, q.zero_point
                    ),
                ));
            }
        }
        params.push(Some(LayerParams {
            weight,
            bias,
            input_quant,
        }));
        layer_schemes.push(Some(LayerSchemes {
            weight: weight_scheme,
            bias: bias_scheme,
        }));
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
            format!("entry `{layer}` is not a conv2d or linear layer of the network"),
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
    Ok((
        Decoded {
            network,
            shapes,
            params,
        },
        layer_schemes,
    ))
}
