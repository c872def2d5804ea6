//! A pure-Rust inference runtime for models exported by the toolkit: no LibTorch, no C++.
//!
//! An artifact is one safetensors file (specified in `docs/FORMAT.md`) holding the network
//! description (a sequential [`model_spec::NetworkSpec`], or a [`model_spec::GraphSpec`] of
//! named nodes: residual sums, concatenations, grouped and depthwise convolutions, pooling of
//! every kind, any activation) and every parameter in its storage scheme: f32,
//! f16, int8 (per-channel or per-tensor scales and zero points), CSR-sparse, or palettized
//! (clustered weights as a codebook and bit-packed indices, pruned ones without their zeros;
//! decoded to f32 at load). [`Model`]
//! loads and validates one and runs batches of inputs ([`Artifact`] gives the same file's
//! decoded parameters to tools that convert rather than run it):
//!
//! - f32 and f16 weights run through a register-blocked f32 GEMM over weights packed at
//!   load time (AVX-512, or AVX2 + FMA; `matrixmultiply` on other CPUs);
//! - int8 weights run through an exact `u8 x i8 -> i32` GEMM (AMX tiles, AVX-512 VNNI, AVX2
//!   or scalar, chosen at run time), with activations quantized per batch (dynamic range) or, when the
//!   artifact carries calibrated input scales, in full-integer (static) mode where activations
//!   stay `u8` between layers;
//! - CSR weights (pruned layers) run through a sparse-times-dense product, and stride-1
//!   convolutions through a direct sparse convolution on the NHWC images; [`csr_pays_off`]
//!   tells an exporter when a pruned layer is worth storing that way.
//!
//! A sequential network runs as one list of operations with the fusions below; a graph runs
//! node by node, every output kept until its last reader has run, sums and concatenations
//! in int8 on one grid when the artifact calibrates them.
//!
//! Activations stay NHWC from the first convolution to the output (weights are permuted once
//! at load time, and the output comes back in PyTorch's order). Convolutions are im2col
//! products whose rows the AVX2 kernels take from the images a tile at a time (no im2col
//! matrix is written); a max pooling of equal stride after a convolution is fused into it.
//! A large batch runs its convolutional front a few images at a time (each group through
//! every convolution while its activations are in cache), the groups spread over the cores
//! with rayon; a small batch shares each large product out between a team of spinning helper
//! threads, whose hand-off costs well under a microsecond. Every thread reuses its
//! activation buffers from one call to the next.
//!
//! ```
//! use model_spec::{LayerSpec, NetworkSpec};
//! use ndarray::Array4;
//! use runtime::{ArtifactBuilder, Granularity, Model, Storage};
//!
//! // A 2x2 image, flattened, through a linear layer with 3 outputs.
//! let network = NetworkSpec {
//!     name: "tiny".into(),
//!     input: [1, 2, 2],
//!     layers: vec![
//!         LayerSpec::Flatten,
//!         LayerSpec::Linear { in_features: 4, out_features: 3 },
//!     ],
//! };
//! let weight = [1.0, 0.0, 0.0, 0.0, /**/ 0.0, 1.0, 1.0, 0.0, /**/ -1.0, 0.0, 0.0, 1.0];
//! let mut artifact = ArtifactBuilder::new(network.clone());
//! artifact.add_layer(1, &weight, &[0.5, 0.0, 0.0], Storage::F32)?;
//! let model = Model::from_bytes(&artifact.to_bytes()?)?;
//!
//! let x = Array4::from_shape_vec((1, 1, 2, 2), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
//! let logits = model.run(x.view())?;
//! assert_eq!(logits.shape(), &[1, 3]);
//! assert!((logits[[0, 0]] - 1.5).abs() < 1e-6);
//! assert!((logits[[0, 1]] - 5.0).abs() < 1e-6);
//! assert!((logits[[0, 2]] - 3.0).abs() < 1e-6);
//!
//! // The same layer with int8 weights: close, not equal.
//! let mut artifact = ArtifactBuilder::new(network);
//! artifact.add_layer(1, &weight, &[0.5, 0.0, 0.0], Storage::Int8(Granularity::PerChannel))?;
//! let int8 = Model::from_bytes(&artifact.to_bytes()?)?;
//! let approx = int8.run(x.view())?;
//! assert!((approx[[0, 1]] - 5.0).abs() < 0.1);
//! # Ok::<(), runtime::Error>(())
//! ```
#![warn(missing_docs)]

mod artifact;
mod builder;
mod engine;
mod error;
pub mod kernels;
mod palette;
mod parameters;
mod quant;
mod score;
mod team;

pub use artifact::{
    FORMAT, FORMAT_VERSION, GRAPH_VERSION, Granularity, MAX_ACTIVATION_ELEMENTS, MAX_DIM,
    MAX_LAYERS, MAX_SPARSE_ELEMENTS, PositionCode, READABLE_VERSIONS, Scheme,
};
pub use builder::{ArtifactBuilder, Encoded, Storage, bias_name, weight_name};
pub use engine::{Execution, Model};
pub use error::{Error, Result};
pub use palette::{MAX_PALETTE_CLUSTERS, MAX_RICE_PARAMETER, palette_index_bits};
pub use parameters::{Artifact, LayerParameters, WeightValues};
/// The quantization parameter type, shared with the `quantization` crate: an activation
/// layer's input quantization is one on the u8 grid ([`QParams::u8`]).
pub use quantization::QParams;
pub use score::Score;

/// Whether a pruned weight matrix of `rows x cols` with `nnz` nonzero entries should be
/// stored (and run) as CSR rather than dense: true when the CSR product is faster than the
/// dense f32 GEMM on this runtime *and* the CSR arrays are smaller than the dense matrix
/// (8 bytes per nonzero, a column index and a value, plus 4 per row pointer, against 4 per
/// entry).
///
/// The speed rule comes from `cargo xtask bench sparse` on the project's layer shapes
/// (`docs/results/sparse-2026-11-28.md`): CSR wins once at most [`CSR_MAX_DENSITY`] of the
/// weights are nonzero, except for very short rows (`cols` below [`CSR_MIN_COLS`], such as
/// a first convolution over one channel, 3 x 3) and very few of them (`rows` below
/// [`CSR_MIN_ROWS`], such as a 10-class output layer), where moving activations costs more
/// than the multiply-adds CSR saves. A convolution has `rows = out_channels` and
/// `cols = in_channels * kernel^2`. The density rule is the crossover of the dense layers
/// (between 75 and 90% sparse); stride-1 convolutions, which run as a direct sparse
/// convolution, already win from about 75%, so for them the rule is conservative, as it is
/// for the short rows of a first convolution, which that method also runs faster than
/// dense: such a layer is kept dense anyway (its few weights are not pruned).
///
/// ```
/// assert!(runtime::csr_pays_off(512, 784, 512 * 784 / 10)); // 90% sparse
/// assert!(!runtime::csr_pays_off(512, 784, 512 * 784 / 2)); // 50% sparse
/// assert!(!runtime::csr_pays_off(32, 9, 29)); // 90% sparse, but rows of 9
/// assert!(!runtime::csr_pays_off(10, 512, 512)); // 90% sparse, but 10 outputs
/// assert!(!runtime::csr_pays_off(0, 10, 0));
/// ```
pub fn csr_pays_off(rows: usize, cols: usize, nnz: usize) -> bool {
    let dense = rows.saturating_mul(cols);
    if dense == 0 || nnz > dense || cols < CSR_MIN_COLS || rows < CSR_MIN_ROWS {
        return false;
    }
    let csr_bytes = nnz
        .saturating_mul(8)
        .saturating_add(rows.saturating_add(1).saturating_mul(4));
    let smaller = csr_bytes < dense.saturating_mul(4);
    let faster = (nnz as f64) <= CSR_MAX_DENSITY * dense as f64;
    smaller && faster
}

/// The largest fraction of nonzero weights at which [`csr_pays_off`] chooses CSR (80%
/// sparsity: at 75% the measured speed-ups of the dense layers are 0.9-2.1x, about 1x at
/// batch 1, at 90% 2.1-3.5x).
pub const CSR_MAX_DENSITY: f64 = 0.2;

/// The shortest rows (reduction length) for which [`csr_pays_off`] chooses CSR.
pub const CSR_MIN_COLS: usize = 16;

/// The fewest rows (outputs) for which [`csr_pays_off`] chooses CSR.
pub const CSR_MIN_ROWS: usize = 16;
