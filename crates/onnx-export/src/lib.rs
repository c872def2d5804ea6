//! Converts a tch-mot artifact (`docs/FORMAT.md`) into an [ONNX](https://onnx.ai) model
//! that computes what the pure-Rust runtime computes, storage scheme by storage scheme, so
//! that ONNX Runtime, TensorRT or any other ONNX consumer can serve the toolkit's models.
//!
//! The artifact is read with [`runtime::Artifact`] (the runtime's own validating decoder);
//! the ONNX messages are those of the `onnx-protobuf` crate, generated from `onnx.proto` by
//! rust-protobuf and shipped as Rust source, so nothing here needs `protoc`, a build script
//! or C++ (the lightest of the maintained options: `tract-onnx` would bring a whole inference
//! engine along for its `pb` module, and prost-based crates generate their types at build
//! time). Its generated code requires exactly `protobuf` 3.4.0, pinned in the workspace;
//! it is licensed MPL-2.0 (file-level copyleft, used unmodified as a dependency).
//!
//! ```
//! use model_spec::{LayerSpec, NetworkSpec};
//! use runtime::{ArtifactBuilder, Granularity, Storage};
//!
//! let network = NetworkSpec {
//!     name: "tiny".into(),
//!     input: [1, 2, 2],
//!     layers: vec![LayerSpec::Flatten, LayerSpec::Linear { in_features: 4, out_features: 3 }],
//! };
//! let mut artifact = ArtifactBuilder::new(network);
//! artifact.add_layer(1, &[0.5; 12], &[0.0, 0.1, 0.2], Storage::Int8(Granularity::PerChannel))?;
//! let onnx = onnx_export::export(&artifact.to_bytes()?)?;
//!
//! // A serialised ONNX ModelProto: field 1 (ir_version) comes first, as a varint.
//! assert_eq!(onnx[0], 0x08);
//! assert_eq!(onnx[1], onnx_export::IR_VERSION as u8);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The graph
//!
//! One input, `input`: f32 `[batch, C, H, W]` with a symbolic batch dimension `batch`; one
//! output, `logits`: f32 `[batch, outputs]` (a network whose last layer is not flat gets a
//! final `Flatten`, as the runtime returns one row per sample). Default domain, opset
//! [`OPSET`], IR version [`IR_VERSION`]. Layer by layer:
//!
//! A network is exported as its chain of nodes; a graph artifact (format version 3) node by
//! node, each output named `<node>.output`:
//!
//! | layer or node | ONNX |
//! |---|---|
//! | `conv2d` | `Conv` (NCHW, `pads` from `padding`, `strides`, `group`) |
//! | `linear` | `Gemm` with `transB = 1` (weights stay `[out, in]` as in PyTorch) |
//! | `batch_norm2d` (kept in a graph) | `Mul` and `Add` with the runtime's scale and shift |
//! | `relu`, `relu6` | `Relu`, `Clip(0, 6)` |
//! | `sigmoid`, `tanh`, `hard_swish` | `Sigmoid`, `Tanh`, `HardSwish` |
//! | `gelu` | `x / 2 * (1 + Erf(x / sqrt 2))` (no `Gelu` before opset 20) |
//! | `silu` | `Mul(x, Sigmoid(x))` |
//! | `max_pool2d`, `avg_pool2d` | `MaxPool` (with `pads`), `AveragePool` |
//! | `global_avg_pool` | `GlobalAveragePool`, `Flatten` |
//! | `add`, `concat` | `Sum`, `Concat` (`axis = 1`) |
//! | `flatten` | `Flatten` (`axis = 1`) |
//! | `dropout` | `Identity` |
//!
//! Initializers are named after the artifact's parameters: `<layer>.weight` and
//! `<layer>.bias` hold what the `Conv`/`Gemm` consumes, with suffixes (`_f16`,
//! `_quantized`, `_scale`, `_zero_point`) for what they are computed from.
//!
//! # Storage schemes
//!
//! | scheme | ONNX |
//! |---|---|
//! | `f32` | f32 initializer |
//! | `f16` | float16 initializer, `Cast` to f32: the model computes in f32 on the half-precision values, as the runtime does |
//! | `csr` | dense f32 initializer (ONNX has no sparse `Conv`/`Gemm` weights that runtimes execute) |
//! | `int8` | int8 initializer, scale (f32) and zero point (int8) per output channel (`axis = 0`) or per tensor (scalars), `DequantizeLinear` |
//! | `int8_sparse` | as `int8`, with the codes that are not stored filled in with their zero point |
//!
//! Biases are f32 initializers (`f16` ones as float16 and a `Cast`). The activations of
//! int8 layers are quantized the way the runtime quantizes them:
//!
//! - **Full-integer (static)** layers, those with an `activations` entry:
//!   `QuantizeLinear` then `DequantizeLinear` on the layer's input with the calibrated u8
//!   scale and zero point (uint8, per tensor). When the next conv2d/linear layer is static
//!   too, the runtime adds the bias in accumulator units, `round(bias / (s_in * s_w[c]))` as
//!   an `i32`; the graph does the same: an int32 initializer (`<layer>.bias_quantized`) with
//!   scale `s_in * s_w[c]` through `DequantizeLinear`. The runtime's requantization to the
//!   next layer's grid is that layer's `QuantizeLinear` (after any ReLU, pooling and flatten,
//!   which commute with it); where a graph's reader takes the codes without quantizing to
//!   their grid itself, the output gets a `QuantizeLinear` and `DequantizeLinear` of its own.
//!   This is the QDQ form that ONNX Runtime fuses into `QLinearConv`/`QLinearMatMul` (u8
//!   activations, s8 weights). A graph's full-integer `add` and `concat` nodes quantize and
//!   dequantize every input on their grid before `Sum` or `Concat`.
//! - **Dynamic-range** layers (int8 weights without an entry): `DynamicQuantizeLinear` then
//!   `DequantizeLinear` on the input. `DynamicQuantizeLinear` is exactly the runtime's rule
//!   (per tensor, over the whole batch, asymmetric u8 over `[min(x, 0), max(x, 0)]`, zero
//!   point rounded half to even), so the ONNX model gives the runtime's results, including
//!   their slight dependence on the other samples of the batch. A graph with weight-only
//!   QDQ would compute in f32 on the dequantized weights instead: ONNX Runtime does not add
//!   activation quantization to such a graph by itself (it folds or runs the weight
//!   `DequantizeLinear` and computes in f32).
//!
//! Edge case: an all-zero input of a dynamic layer gets scale 1 from the runtime and
//! scale 0 from `DynamicQuantizeLinear`; both dequantize it to exact zeros.
#![warn(missing_docs)]

mod error;
mod graph;

use std::path::Path;

pub use error::{Error, Result};
use graph::model_proto;

/// The ONNX operator set the exported graphs import (default domain).
pub const OPSET: i64 = 17;

/// The ONNX IR version of the exported models (the one that goes with opset 17).
pub const IR_VERSION: i64 = 8;

/// Converts an artifact held in memory into a serialised ONNX `ModelProto`.
///
/// Fails when the artifact does not load ([`Error::Artifact`], exactly when
/// [`runtime::Model::from_bytes`] would fail).
pub fn export(artifact_bytes: &[u8]) -> Result<Vec<u8>> {
    let artifact = runtime::Artifact::from_bytes(artifact_bytes)?;
    serialize(&artifact)
}

/// Converts the artifact at `src` into an ONNX file at `dst`, written atomically
/// ([`atomic_file::write`]: a temporary file in the same folder, flushed and renamed, so
/// `dst` is never seen half-written, and an existing `dst` is left as it was when anything
/// fails).
pub fn export_file(src: &Path, dst: &Path) -> Result<()> {
    let artifact = runtime::Artifact::load(src)?;
    let bytes = serialize(&artifact)?;
    atomic_file::write(dst, bytes).map_err(|e| Error::Io {
        path: dst.to_owned(),
        source: e.into_io_error(),
    })
}

fn serialize(artifact: &runtime::Artifact) -> Result<Vec<u8>> {
    use protobuf::Message as _;
    Ok(model_proto(artifact)?.write_to_bytes()?)
}
