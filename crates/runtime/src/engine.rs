//! The inference engine: a validated artifact compiled into a sequence of operations.

use std::cell::Cell;
use std::path::Path;
use std::sync::Mutex;

use model_spec::{GraphSpec, InputNormalization, NetworkSpec};
use ndarray::{Array2, ArrayView, Dimension};
use quantization::QParams;
use rayon::prelude::*;

use crate::artifact::{Decoded, Layer, LayerParams, Scheme, Weight, decode};

mod graph;
use crate::error::{Error, Result};
use crate::kernels::{
    self, ConvGeometry, CsrMatrix, PackedF32, PackedI8, Patches, SparseConv, U8Matrix,
    csr_gemm_bias, gemv_columns, im2col_nhwc_pooled, int8_conv_f32_pooled, int8_conv_u8_pooled,
    int8_gemm_f32_pooled, int8_gemm_u8_pooled, max_pool2d, max_pool2d_nhwc, max_rows, nhwc_to_nchw,
    padded_k, pooled_rows, sgemm_packed, sgemm_patches, sparse_conv_nhwc,
};
use crate::quant::U8Codes;
use crate::team::Team;
use graph::GraphPlan;

/// How one conv2d or linear layer executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Execution {
    /// Dense f32 GEMM (weights stored as f32 or f16, or palettized and decoded at load).
    F32,
    /// CSR-sparse f32 product with this many stored weights (weights stored as CSR, or
    /// palettized and decoded at load where [`csr_pays_off`](crate::csr_pays_off)).
    Csr {
        /// Stored (non-zero) weights.
        nnz: usize,
    },
    /// Int8 weights, activations quantized per batch at run time (asymmetric u8, per
    /// tensor); output dequantized to f32.
    Int8Dynamic,
    /// Full-integer int8 with the artifact's calibrated input quantization.
    Int8Static {
        /// Whether the output stays u8 (requantized for the next static layer) rather than
        /// being dequantized to f32.
        u8_output: bool,
    },
}

/// Static (calibrated) quantization of one int8 layer.
#[derive(Clone, Debug)]
struct StaticQuant {
    input: QParams,
    /// Bias in accumulator units: `round(bias / (s_in * s_w[j]))`.
    bias: Vec<i32>,
    /// Requantization to the next static layer's input: its parameters and the per-channel
    /// multipliers `s_in * s_w[j] / s_out`.
    output: Option<(QParams, Vec<f32>)>,
}

impl StaticQuant {
    /// The full-integer execution of a layer with input quantization `input`, weight scales
    /// `scales` and bias `bias`, whose output is requantized to `next_input` when the next
    /// layer takes u8 codes.
    fn new(input: QParams, scales: &[f32], bias: &[f32], next_input: Option<QParams>) -> Self {
        let acc_scale: Vec<f32> = scales.iter().map(|&s| input.scale * s).collect();
        let bias = bias
            .iter()
            .zip(&acc_scale)
            .map(|(&b, &s)| (b / s).round_ties_even() as i32)
            .collect();
        let output = next_input.map(|o| (o, acc_scale.iter().map(|&s| s / o.scale).collect()));
        Self {
            input,
            bias,
            output,
        }
    }
}

#[derive(Clone, Debug)]
enum Kernel {
    Dense(PackedF32),
    Csr(CsrMatrix),
    /// A CSR convolution of stride 1 (not 1x1), evaluated directly on the NHWC images.
    CsrConv(SparseConv),
    Int8 {
        packed: PackedI8,
        scales: Vec<f32>,
        stat: Option<StaticQuant>,
    },
}

/// A conv2d or linear layer.
#[derive(Clone, Debug)]
struct Compute {
    /// Its index in the network.
    layer: usize,
    /// How the artifact stores its weight.
    scheme: Scheme,
    /// `None` for a linear layer.
    conv: Option<ConvGeometry>,
    out: usize,
    k: usize,
    kernel: Kernel,
    bias: Vec<f32>,
    /// A following ReLU, fused into the epilogue.
    relu: bool,
    /// The side of a following max pooling of equal stride, fused (1: none): the product
    /// computes only the pixels of whole windows, window by window, and keeps each window's
    /// maximum.
    pool: usize,
    /// The output pixel of each im2col row of one image (convolutions; see
    /// [`kernels::patch_pixels`]).
    pixels: Vec<u32>,
    /// Where each pixel's window starts in its image ([`kernels::patch_windows`]).
    windows: Vec<u32>,
}

impl Compute {
    /// How the layer executes.
    fn execution(&self) -> Execution {
        match &self.kernel {
            Kernel::Dense(_) => Execution::F32,
            Kernel::Csr(m) => Execution::Csr { nnz: m.nnz() },
            Kernel::CsrConv(m) => Execution::Csr { nnz: m.nnz() },
            Kernel::Int8 { stat: None, .. } => Execution::Int8Dynamic,
            Kernel::Int8 { stat: Some(s), .. } => Execution::Int8Static {
                u8_output: s.output.is_some(),
            },
        }
    }
}

/// The engine's operations. Images travel NHWC (`height x width x channels` per sample), the
/// layout an im2col GEMM produces and consumes, so convolutions need no transposes; weights
/// are permuted once at load time to match (see [`Layout`]).
#[derive(Clone, Debug)]
enum Op {
    Compute(Box<Compute>),
    Relu,
    /// Max pooling of NHWC images.
    MaxPool {
        channels: usize,
        height: usize,
        width: usize,
        kernel: usize,
        stride: usize,
    },
    /// Max pooling of NCHW images (before any convolution has made them NHWC).
    MaxPoolPlanar {
        channels: usize,
        height: usize,
        width: usize,
        kernel: usize,
        stride: usize,
    },
    /// Transposes every sample from `rows x cols` to `cols x rows`: NCHW input to NHWC before
    /// the first convolution, and NHWC back to PyTorch's order at the end.
    Transpose {
        rows: usize,
        cols: usize,
    },
}

/// The layout of the activations between two operations, tracked while compiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// PyTorch's order: an NCHW image, or features in C order.
    Torch,
    /// An NHWC image of this many channels and pixels.
    Hwc { channels: usize, pixels: usize },
    /// Flattened from an NHWC image: the next linear layer permutes its weight columns.
    FlatHwc { channels: usize, pixels: usize },
}

impl Layout {
    /// The layout of an image of `channels x pixels`: NHWC, unless one side is 1, where both
    /// orders are the same.
    fn image(channels: usize, pixels: usize) -> Self {
        if channels == 1 || pixels == 1 {
            Self::Torch
        } else {
            Self::Hwc { channels, pixels }
        }
    }
}

/// Activations between layers.
#[derive(Clone, Debug)]
enum Data {
    F32(Vec<f32>),
    U8(Vec<u8>, QParams),
}

/// Buffers reused from one layer and one call to the next (per calling thread), so that a
/// forward pass does not allocate (and page-fault, or clear) its activations afresh every
/// time. Buffers are handed out with stale contents: every kernel writes all of its output.
///
/// Invariant: every vector in the pool has its whole capacity initialized (the pool fills
/// what it allocates, and vectors only enter it from [`pick`]), so a buffer can be handed out
/// at any length up to its capacity without clearing it first.
#[derive(Debug, Default)]
struct Pool {
    f32s: Vec<Vec<f32>>,
    u8s: Vec<Vec<u8>>,
}

/// A buffer of `len` elements: the smallest pooled one that holds them, else the largest,
/// grown (and filled with `fill` up to its new capacity).
fn pick<T: Copy>(buffers: &mut Vec<Vec<T>>, len: usize, fill: T) -> Vec<T> {
    let fits = buffers
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= len)
        .min_by_key(|(_, b)| b.capacity())
        .map(|(i, _)| i);
    let largest = || {
        buffers
            .iter()
            .enumerate()
            .max_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)
    };
    let mut v = fits
        .or_else(largest)
        .map_or_else(Vec::new, |i| buffers.swap_remove(i));
    if v.capacity() < len {
        v.clear();
        v.reserve_exact(len);
        v.resize(v.capacity(), fill);
    }
    // SAFETY: `len <= capacity`, and the whole capacity is initialized: a vector grown just
    // above was filled up to its capacity, and every other one came from the pool (see
    // `Pool`); `truncate` and `set_len` do not de-initialize `Copy` values.
    unsafe { v.set_len(len) };
    v
}

impl Pool {
    fn f32(&mut self, len: usize) -> Vec<f32> {
        pick(&mut self.f32s, len, 0.0)
    }

    fn u8(&mut self, len: usize) -> Vec<u8> {
        pick(&mut self.u8s, len, 0)
    }

    fn give_f32(&mut self, v: Vec<f32>) {
        if v.capacity() > 0 {
            self.f32s.push(v);
        }
    }

    fn give_u8(&mut self, v: Vec<u8>) {
        if v.capacity() > 0 {
            self.u8s.push(v);
        }
    }

    /// The activations as f32 (dequantized into a pooled buffer if they are u8).
    fn take_f32(&mut self, data: Data) -> Vec<f32> {
        match data {
            Data::F32(v) => v,
            Data::U8(q, p) => {
                let mut out = self.f32(q.len());
                p.dequantize_slice(&q, &mut out);
                self.give_u8(q);
                out
            }
        }
    }
}

thread_local! {
    /// The calling thread's buffers, taken out for the length of one `Model::run`.
    static POOL: Cell<Pool> = Cell::new(Pool::default());
}

/// A loaded model, ready to run.
#[derive(Clone, Debug)]
pub struct Model {
    file: String,
    /// The sequential description, for artifacts that carry one.
    network: Option<NetworkSpec>,
    /// The graph (a sequential network as a chain of nodes named by layer index).
    graph: GraphSpec,
    /// Per-sample output shape of every node.
    shapes: Vec<Vec<usize>>,
    plan: Plan,
    /// How raw input becomes the network's input, when the artifact records it.
    normalization: Option<InputNormalization>,
}

/// How a model runs: a sequential network as one list of operations (with its fusions and
/// its convolutional front run a few images at a time), anything else node by node.
#[derive(Clone, Debug)]
enum Plan {
    Chain {
        ops: Vec<Op>,
        /// How the convolutional front of the network runs image by image (see [`Front`]).
        front: Front,
    },
    Graph(GraphPlan),
}

/// The convolutional front of a network: the operations before its first linear layer
/// (when there is a convolution among them). A large batch runs through them a few images
/// at a time, each group through every front operation while its activations are still in
/// the core's cache, the groups spread over the threads; the linear layers after it then
/// run on the whole batch, where their weights are shared by every row.
#[derive(Clone, Copy, Debug)]
struct Front {
    /// The number of front operations (0: no front).
    ops: usize,
    /// Images per group: as many as keep the largest per-image buffer of the front within
    /// [`FRONT_BYTES`], at least 1.
    images: usize,
    /// Values per image at its input and at its output.
    in_len: usize,
    out_len: usize,
    /// The output's quantization when the front ends in `u8` codes (full-integer layers),
    /// else `None` (f32).
    out_quant: Option<QParams>,
}

/// The per-group working set the front aims at: within the L2 cache of the CPUs the
/// runtime meets (512 KiB and up per core), with room for the weights.
const FRONT_BYTES: usize = 256 << 10;

impl Front {
    fn plan(ops: &[Op], input: &[usize]) -> Self {
        let in_len: usize = input.iter().product();
        let none = Self {
            ops: 0,
            images: 1,
            in_len,
            out_len: in_len,
            out_quant: None,
        };
        let end = ops
            .iter()
            .position(|op| matches!(op, Op::Compute(c) if c.conv.is_none()))
            .unwrap_or(ops.len());
        let front = &ops[..end];
        // Dynamic-range layers quantize their input over the whole batch: run group by group
        // they would see other ranges (and the results would depend on the grouping).
        let dynamic = |op: &Op| matches!(op, Op::Compute(c) if matches!(c.kernel, Kernel::Int8 { stat: None, .. }));
        if !front
            .iter()
            .any(|op| matches!(op, Op::Compute(c) if c.conv.is_some()))
            || front.iter().any(dynamic)
        {
            return none;
        }
        let (mut len, mut quant, mut largest) = (in_len, None, in_len);
        for op in front {
            match op {
                Op::Compute(c) => {
                    let rows = c.conv.map_or(1, |g| pooled_rows(&g, c.pool));
                    // The im2col matrix, at its f32 size (an upper bound of the u8 one).
                    largest = largest.max(rows * padded_k(c.k));
                    len = rows / (c.pool * c.pool) * c.out;
                    quant = match &c.kernel {
                        Kernel::Int8 {
                            stat:
                                Some(StaticQuant {
                                    output: Some((q, _)),
                                    ..
                                }),
                            ..
                        } => Some(*q),
                        _ => None,
                    };
                }
                &Op::MaxPool {
                    channels,
                    height,
                    width,
                    kernel,
                    stride,
                }
                | &Op::MaxPoolPlanar {
                    channels,
                    height,
                    width,
                    kernel,
                    stride,
                } => {
                    len = channels
                        * ((height - kernel) / stride + 1)
                        * ((width - kernel) / stride + 1);
                }
                Op::Relu | Op::Transpose { .. } => {}
            }
            largest = largest.max(len);
        }
        Self {
            ops: end,
            images: (FRONT_BYTES / (4 * largest).max(1)).max(1),
            in_len,
            out_len: len,
            out_quant: quant,
        }
    }
}

impl Model {
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
        let decoded = decode(bytes, file)?;
        Ok(Self::compile(decoded, file))
    }

    fn compile(decoded: Decoded, file: &str) -> Self {
        let Decoded {
            network,
            graph,
            shapes,
            inputs,
            layers,
            normalization,
        } = decoded;
        let plan = if network.is_some() && layers.iter().all(chain_layer) {
            let (ops, front) = compile_chain(layers, &shapes, graph.input);
            Plan::Chain { ops, front }
        } else {
            Plan::Graph(GraphPlan::compile(&graph, &shapes, &inputs, layers))
        };
        Self {
            file: file.to_owned(),
            network,
            graph,
            shapes,
            plan,
            normalization,
        }
    }
    /// The sequential network description, for an artifact that carries one (`None` for a
    /// graph artifact).
    pub fn network(&self) -> Option<&NetworkSpec> {
        self.network.as_ref()
    }

    /// The graph: the artifact's, or its network as a chain of nodes named by layer index.
    pub fn graph(&self) -> &GraphSpec {
        &self.graph
    }

    /// The per-sample input shape `(channels, height, width)`.
    pub fn input_shape(&self) -> [usize; 3] {
        self.graph.input
    }

    /// How raw input becomes this network's input, when the artifact records it (format
    /// version 2 and later): what [`Model::run_raw`] applies.
    pub fn input_normalization(&self) -> Option<&InputNormalization> {
        self.normalization.as_ref()
    }

    /// Where the model came from: its path, or `<bytes>`.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The per-sample output shape.
    pub fn output_shape(&self) -> &[usize] {
        self.shapes.last().map_or(&[], Vec::as_slice)
    }

    /// How each conv2d and linear layer executes, with its index in the network; for a graph,
    /// each conv2d, linear, add and concat node, with its index (a sum or concatenation runs
    /// [`Execution::F32`], or [`Execution::Int8Static`] on inputs requantized to the grid
    /// the artifact gives it).
    pub fn execution(&self) -> Vec<(usize, Execution)> {
        match &self.plan {
            Plan::Chain { ops, .. } => ops
                .iter()
                .filter_map(|op| match op {
                    Op::Compute(c) => Some((c.layer, c.execution())),
                    _ => None,
                })
                .collect(),
            Plan::Graph(plan) => plan.execution(),
        }
    }

    /// How the artifact stores the weight of layer (node) `layer`, a conv2d or linear layer
    /// (`None` for other layers and past the end). Storage and execution are separate: the
    /// schemes that are decoded at load run as [`Execution::F32`] or [`Execution::Csr`]
    /// (`f16`, `csr`, `palette`, `palette_sparse`) or as int8 (`int8_sparse`).
    pub fn weight_scheme(&self, layer: usize) -> Option<&Scheme> {
        match &self.plan {
            Plan::Chain { ops, .. } => ops.iter().find_map(|op| match op {
                Op::Compute(c) if c.layer == layer => Some(&c.scheme),
                _ => None,
            }),
            Plan::Graph(plan) => plan.weight_scheme(layer),
        }
    }

    /// Runs a batch of raw input (8-bit pixels, `(batch, channels, height, width)` or
    /// `(batch, features)` in C order) through the artifact's recorded input normalization
    /// ([`Model::input_normalization`]), then like [`Model::run`]. Fails with
    /// [`Error::NoNormalization`] when the artifact records none.
    pub fn run_raw<D: Dimension>(&self, raw: ArrayView<'_, u8, D>) -> Result<Array2<f32>> {
        let normalization = self
            .normalization
            .as_ref()
            .ok_or_else(|| Error::NoNormalization {
                file: self.file.clone(),
            })?;
        let [channels, height, width] = self.graph.input;
        let values: Vec<u8> = raw.iter().copied().collect();
        let x = normalization.normalize_planes(&values, channels, height * width);
        let x = ArrayView::from_shape(raw.raw_dim(), &x)
            .expect("the normalised values have the raw input's shape");
        self.run(x)
    }

    /// Runs a batch and returns one row of outputs (logits) per sample.
    ///
    /// The input is `(batch, channels, height, width)` like the network's input, or
    /// `(batch, features)` with the input flattened in C order.
    ///
    /// Intermediate buffers are kept by the calling thread and reused by its next call (they
    /// grow to the largest batch it has run).
    pub fn run<D: Dimension>(&self, input: ArrayView<'_, f32, D>) -> Result<Array2<f32>> {
        let expected = self.graph.input.to_vec();
        let shape = input.shape();
        let per_sample: usize = expected.iter().product();
        let fits = match shape {
            [_, rest @ ..] if rest == expected.as_slice() => true,
            [_, features] => *features == per_sample,
            _ => false,
        };
        if !fits {
            return Err(Error::InputShape {
                expected,
                found: shape.to_vec(),
            });
        }
        let batch = shape[0];
        let mut pool = POOL.with(Cell::take);
        // A contiguous input is read in place; any other is copied once.
        let copied = input.as_slice().is_none().then(|| {
            let mut x = pool.f32(input.len());
            x.iter_mut().zip(input.iter()).for_each(|(d, &v)| *d = v);
            x
        });
        let x = copied.as_deref().or(input.as_slice()).unwrap_or_default();
        let data = match &self.plan {
            Plan::Chain { ops, front } => {
                let (front_ops, rest) = ops.split_at(front.ops);
                let data = if front_ops.is_empty() {
                    let mut owned = pool.f32(x.len());
                    owned.copy_from_slice(x);
                    Data::F32(owned)
                } else {
                    run_grouped(front, x, batch, &mut pool, &|data, images, pool| {
                        run_ops(front_ops, data, images, pool)
                    })
                };
                run_ops(rest, data, batch, &mut pool)
            }
            Plan::Graph(plan) => plan.run(x, batch, &mut pool),
        };
        if let Some(x) = copied {
            pool.give_f32(x);
        }
        let out_len: usize = self.output_shape().iter().product();
        let out = pool.take_f32(data);
        let logits = Array2::from_shape_vec((batch, out_len), out[..batch * out_len].to_vec())
            .expect("the output has batch * out_len values");
        pool.give_f32(out);
        POOL.with(|p| p.set(pool));
        Ok(logits)
    }
}

/// What runs on one group of images: their activations in, the group's size.
type GroupRun<'a> = dyn Fn(Data, usize, &mut Pool) -> Data + Sync + 'a;

/// Runs `run` (the front operations) on a batch: group by group (spread over the threads
/// when there are enough images for every thread to get two groups), or on the whole batch
/// at once when it is no larger than a group, where the kernels split their own work.
fn run_grouped(front: &Front, x: &[f32], batch: usize, pool: &mut Pool, run: &GroupRun) -> Data {
    let threads = if kernels::may_split() {
        rayon::current_num_threads()
    } else {
        1
    };
    let parallel = threads > 1 && batch >= 2 * threads;
    if !parallel && batch <= front.images {
        let mut owned = pool.f32(x.len());
        owned.copy_from_slice(x);
        return run(Data::F32(owned), batch, pool);
    }
    // Two groups per thread at least, so that a thread slowed by other work is caught up.
    let images = if parallel {
        front.images.min(batch.div_ceil(2 * threads))
    } else {
        front.images
    };
    let (in_len, out_len) = (front.in_len, front.out_len);
    // One group: its images through the front, the result copied to its place.
    fn group<T: Copy>(
        run: &GroupRun,
        xs: &[f32],
        ys: &mut [T],
        in_len: usize,
        pool: &mut Pool,
        store: impl Fn(Data, &mut [T], &mut Pool),
    ) {
        let mut x = pool.f32(xs.len());
        x.copy_from_slice(xs);
        let data = run(Data::F32(x), xs.len() / in_len, pool);
        store(data, ys, pool);
    }
    fn spread<T: Copy + Send>(
        parallel: bool,
        xs: &[f32],
        ys: &mut [T],
        (in_len, out_len, images): (usize, usize, usize),
        pool: &mut Pool,
        each: impl Fn(&[f32], &mut [T], &mut Pool) + Sync,
    ) {
        let inputs = xs.chunks(images * in_len);
        let outputs = ys.chunks_mut(images * out_len);
        if parallel {
            inputs
                .collect::<Vec<_>>()
                .into_par_iter()
                .zip(outputs.collect::<Vec<_>>())
                .for_each(|(xs, ys)| {
                    let mut pool = POOL.with(Cell::take);
                    each(xs, ys, &mut pool);
                    POOL.with(|p| p.set(pool));
                });
        } else {
            for (xs, ys) in inputs.zip(outputs) {
                each(xs, ys, pool);
            }
        }
    }
    let shape = (in_len, out_len, images);
    match front.out_quant {
        None => {
            let mut y = pool.f32(batch * out_len);
            spread(parallel, x, &mut y, shape, pool, |xs, ys, pool| {
                group(run, xs, ys, in_len, pool, |data, ys, pool| {
                    let v = pool.take_f32(data);
                    ys.copy_from_slice(&v[..ys.len()]);
                    pool.give_f32(v);
                })
            });
            Data::F32(y)
        }
        Some(q) => {
            let mut y = pool.u8(batch * out_len);
            spread(parallel, x, &mut y, shape, pool, |xs, ys, pool| {
                group(run, xs, ys, in_len, pool, |data, ys, pool| match data {
                    Data::U8(v, p) if p == q => {
                        ys.copy_from_slice(&v[..ys.len()]);
                        pool.give_u8(v);
                    }
                    // The plan says the front ends in these codes; were it otherwise,
                    // quantizing is what the next full-integer layer would do anyway.
                    other => {
                        let v = pool.take_f32(other);
                        q.quantize_slice(&v[..ys.len()], ys);
                        pool.give_f32(v);
                    }
                })
            });
            Data::U8(y, q)
        }
    }
}

/// Whether the chain plan runs a layer: the layer kinds of a sequential network.
fn chain_layer(layer: &Layer) -> bool {
    match layer {
        Layer::Conv2d { shape, .. } => shape.groups == 1 && shape.geometry().is_some(),
        Layer::Linear { .. }
        | Layer::Relu
        | Layer::MaxPool2d { .. }
        | Layer::Flatten
        | Layer::Dropout => true,
        _ => false,
    }
}

/// The operations of a sequential network (every layer one that [`chain_layer`] accepts;
/// `shapes`: every layer's output shape), and its front.
fn compile_chain(layers: Vec<Layer>, shapes: &[Vec<usize>], input: [usize; 3]) -> (Vec<Op>, Front) {
    // The input quantization of every conv2d and linear layer (`Some(None)` when it has
    // none), to find each layer's successor's.
    let static_inputs: Vec<Option<Option<QParams>>> = layers
        .iter()
        .map(|l| l.params().map(|p| p.input_quant))
        .collect();
    let image_layout = |shape: &[usize]| match *shape {
        [c, h, w] => Layout::image(c, h * w),
        _ => Layout::Torch,
    };
    let mut layout = Layout::Torch;
    let mut ops: Vec<Op> = Vec::with_capacity(layers.len() + 2);
    for (i, layer) in layers.into_iter().enumerate() {
        match layer {
            Layer::Relu => match ops.last_mut() {
                Some(Op::Compute(c)) if !c.relu => c.relu = true,
                _ => ops.push(Op::Relu),
            },
            Layer::MaxPool2d {
                channels,
                height,
                width,
                kernel,
                stride,
            } => {
                // A pooling of equal stride right after a convolution with a dense or
                // int8 product is fused into it.
                if let Some(Op::Compute(c)) = ops.last_mut()
                    && c.conv.is_some()
                    && c.pool == 1
                    && kernel == stride
                    && kernel > 1
                    && matches!(c.kernel, Kernel::Dense(_) | Kernel::Int8 { .. })
                {
                    c.pool = kernel;
                    layout = image_layout(&shapes[i]);
                    continue;
                }
                let planar = layout == Layout::Torch;
                ops.push(if planar {
                    Op::MaxPoolPlanar {
                        channels,
                        height,
                        width,
                        kernel,
                        stride,
                    }
                } else {
                    Op::MaxPool {
                        channels,
                        height,
                        width,
                        kernel,
                        stride,
                    }
                });
                if !planar {
                    layout = image_layout(&shapes[i]);
                }
            }
            Layer::Flatten => {
                if let Layout::Hwc { channels, pixels } = layout {
                    layout = Layout::FlatHwc { channels, pixels };
                }
            }
            Layer::Dropout => {}
            Layer::Conv2d { shape, params } => {
                // The chain plan holds only layers `chain_layer` accepts.
                let geometry = shape.geometry().expect("a chain convolution is square");
                let out_channels = shape.out;
                if layout == Layout::Torch
                    && Layout::image(geometry.channels, geometry.height * geometry.width)
                        != Layout::Torch
                {
                    ops.push(Op::Transpose {
                        rows: geometry.channels,
                        cols: geometry.height * geometry.width,
                    });
                }
                let next_input = next_static_input(&static_inputs, i);
                let shape = (Some(geometry), out_channels, geometry.patch_len());
                let compute = compile_layer(i, shape, params, next_input, None);
                ops.push(Op::Compute(Box::new(compute)));
                layout = image_layout(&shapes[i]);
            }
            Layer::Linear {
                in_features,
                out_features,
                params,
            } => {
                let flat_from = match layout {
                    Layout::FlatHwc { channels, pixels } => Some((channels, pixels)),
                    _ => None,
                };
                let next_input = next_static_input(&static_inputs, i);
                let shape = (None, out_features, in_features);
                let compute = compile_layer(i, shape, params, next_input, flat_from);
                ops.push(Op::Compute(Box::new(compute)));
                layout = Layout::Torch;
            }
            Layer::BatchNorm { .. }
            | Layer::Activation(_)
            | Layer::Pool2d { .. }
            | Layer::GlobalAvgPool { .. }
            | Layer::Add { .. }
            | Layer::Concat { .. } => {
                unreachable!("the chain plan takes the layers `chain_layer` accepts")
            }
        }
    }
    // The output goes back to PyTorch's order.
    if let Layout::Hwc { channels, pixels } | Layout::FlatHwc { channels, pixels } = layout {
        ops.push(Op::Transpose {
            rows: pixels,
            cols: channels,
        });
    }
    for op in &mut ops {
        if let Op::Compute(c) = op
            && let Some(g) = c.conv
        {
            c.pixels = kernels::patch_pixels(&g, c.pool);
            c.windows = kernels::patch_windows(&g, &c.pixels);
        }
    }
    let front = Front::plan(&ops, &input);
    (ops, front)
}

/// Runs `ops` in order on a batch.
fn run_ops(ops: &[Op], mut data: Data, batch: usize, pool: &mut Pool) -> Data {
    for op in ops {
        data = match op {
            Op::Compute(c) => run_compute(c, data, batch, pool),
            Op::Relu => relu(data),
            Op::MaxPool { .. } | Op::MaxPoolPlanar { .. } => max_pool(data, op, batch, pool),
            &Op::Transpose { rows, cols } => transpose(data, batch, rows, cols, pool),
        };
    }
    data
}

/// Where column `column` of a weight goes in the engine's layout: convolution weights are
/// read `(ky, kx, channel)` by the NHWC im2col, a linear layer after a flattened NHWC image
/// reads `(pixel, channel)`.
fn permutation(
    conv: Option<&ConvGeometry>,
    flat_from: Option<(usize, usize)>,
    k: usize,
) -> Option<Vec<usize>> {
    match (conv, flat_from) {
        (Some(g), _) if g.channels > 1 && g.kernel > 1 => {
            Some((0..k).map(|col| g.nhwc_column(col)).collect())
        }
        (None, Some((channels, pixels))) => Some(
            (0..k)
                .map(|col| (col % pixels) * channels + col / pixels)
                .collect(),
        ),
        _ => None,
    }
}

/// Moves the columns of a row-major `rows x k` matrix.
fn permute_rows<T: Copy + Default>(values: &[T], k: usize, perm: &[usize]) -> Vec<T> {
    let mut out = vec![T::default(); values.len()];
    for (src, dst) in values.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for (&v, &p) in src.iter().zip(perm) {
            dst[p] = v;
        }
    }
    out
}

/// The input quantization of the conv2d or linear layer after layer `index`: it decides
/// whether layer `index`'s output stays u8.
fn next_static_input(static_inputs: &[Option<Option<QParams>>], index: usize) -> Option<QParams> {
    static_inputs
        .iter()
        .skip(index + 1)
        .flatten()
        .next()
        .copied()
        .flatten()
}

/// Prepares one conv2d or linear layer (`shape`: its convolution geometry, if a convolution,
/// output channels and product depth): packs int8 weights, quantizes static biases.
fn compile_layer(
    index: usize,
    (conv, out, k): (Option<ConvGeometry>, usize, usize),
    params: LayerParams,
    next_input: Option<QParams>,
    flat_from: Option<(usize, usize)>,
) -> Compute {
    let LayerParams {
        weight,
        bias,
        input_quant,
        weight_scheme,
        ..
    } = params;
    let perm = permutation(conv.as_ref(), flat_from, k);
    let kernel = match weight {
        Weight::Dense(w) => {
            let w = match &perm {
                Some(p) => permute_rows(&w, k, p),
                None => w,
            };
            Kernel::Dense(PackedF32::new(&w, out, k))
        }
        Weight::Csr(m) => {
            let m = match &perm {
                Some(p) => m.permute_columns(p),
                None => m,
            };
            // Convolutions of stride 1 run directly on the NHWC images, except 1x1 ones
            // without padding, whose im2col is the image itself.
            match conv.filter(|g| !pointwise(g)) {
                Some(g) => SparseConv::new(&m, g).map_or(Kernel::Csr(m), Kernel::CsrConv),
                None => Kernel::Csr(m),
            }
        }
        Weight::Int8 {
            values,
            scales,
            zero_points,
        } => {
            let values = match &perm {
                Some(p) => permute_rows(&values, k, p),
                None => values,
            };
            let packed = PackedI8::new(&values, out, k, &zero_points);
            let stat = input_quant.map(|input| StaticQuant::new(input, &scales, &bias, next_input));
            Kernel::Int8 {
                packed,
                scales,
                stat,
            }
        }
    };
    Compute {
        layer: index,
        scheme: weight_scheme,
        conv,
        out,
        k,
        kernel,
        bias,
        relu: false,
        pool: 1,
        pixels: Vec::new(),
        windows: Vec::new(),
    }
}

/// Whether a convolution is 1x1 with stride 1 and no padding: its im2col matrix is the NHWC
/// image as it is.
fn pointwise(g: &ConvGeometry) -> bool {
    g.kernel == 1 && g.stride == 1 && g.padding == 0
}

/// Runs one conv2d or linear layer on a batch (NHWC images in, NHWC images out), with its
/// fused pooling if it has one.
fn run_compute(c: &Compute, data: Data, batch: usize, pool: &mut Pool) -> Data {
    let group = c.pool * c.pool;
    let rows = batch * c.conv.map_or(1, |g| pooled_rows(&g, c.pool));
    let (n, k) = (c.out, c.k);
    // The im2col matrix is needed unless the convolution is 1x1 and unpooled.
    let lowered = |g: &ConvGeometry| !(pointwise(g) && c.pool == 1);
    match &c.kernel {
        Kernel::CsrConv(conv) => {
            let x = pool.take_f32(data);
            let mut y = pool.f32(rows * n);
            sparse_conv_nhwc(&x, batch, conv, &c.bias, c.relu, &mut y);
            pool.give_f32(x);
            Data::F32(y)
        }
        Kernel::Dense(w) if c.conv.is_some_and(|g| lowered(&g)) => {
            // The im2col rows are taken from the images as the kernel needs them.
            let x = pool.take_f32(data);
            let g = c.conv.unwrap_or_else(|| unreachable!("checked just above"));
            let patches = Patches::new(&x, g, &c.pixels, 0.0).with_windows(&c.windows);
            let mut y = pool.f32(rows / group * n);
            share(rows, group, n, &mut y, rows * n * k, |r0, r1, y| {
                sgemm_patches(&patches.rows_range(r0..r1), w, &c.bias, c.relu, group, y)
            });
            pool.give_f32(x);
            Data::F32(y)
        }
        Kernel::Dense(_) | Kernel::Csr(_) => {
            let x = pool.take_f32(data);
            let cols = match c.conv {
                Some(g) if lowered(&g) => {
                    let mut cols = pool.f32(rows * k);
                    im2col_nhwc_pooled(&x, batch, &g, c.pool, 0.0, &mut cols, k);
                    pool.give_f32(x);
                    cols
                }
                _ => x,
            };
            let mut y = pool.f32(rows * n);
            let a = &cols[..rows * k];
            match &c.kernel {
                // One row: the outputs are shared out.
                Kernel::Dense(w) if rows == 1 => share(n, 1, 1, &mut y, n * k, |first, last, y| {
                    gemv_columns(a, w, &c.bias, c.relu, first, &mut y[..last - first]);
                }),
                // Pooled after the product: the rows are shared out one by one.
                Kernel::Dense(w) => share(rows, 1, n, &mut y, rows * n * k, |r0, r1, y| {
                    sgemm_packed(&a[r0 * k..r1 * k], r1 - r0, w, &c.bias, c.relu, y)
                }),
                Kernel::Csr(m) => csr_gemm_bias(a, rows, m, &c.bias, c.relu, &mut y),
                Kernel::Int8 { .. } | Kernel::CsrConv(_) => unreachable!(),
            }
            pool.give_f32(cols);
            if group > 1 {
                // Bias and ReLU are non-decreasing and the same for every row of a column:
                // pooling after them gives the same maxima.
                let mut pooled = pool.f32(rows / group * n);
                max_rows(&y, group, n, &mut pooled);
                pool.give_f32(y);
                y = pooled;
            }
            Data::F32(y)
        }
        Kernel::Int8 {
            packed,
            scales,
            stat,
        } => {
            let lda = padded_k(k);
            let (q, params) = int8_input(data, stat.as_ref(), pool);
            // A convolution's im2col rows are taken from the images as the kernel needs them;
            // a linear layer's rows are the activations, padded to the row stride if need be.
            let zero = params.zero_point;
            let (a, source) = match c.conv {
                Some(g) if lowered(&g) || lda != k => (q, Some(g)),
                _ if lda == k => (q, None),
                _ => {
                    let mut padded = pool.u8(rows * lda);
                    for (dst, src) in padded.chunks_exact_mut(lda).zip(q.chunks_exact(k)) {
                        dst[..k].copy_from_slice(src);
                    }
                    pool.give_u8(q);
                    (padded, None)
                }
            };
            let source = match source {
                Some(g) => {
                    let patches = Patches::new(&a, g, &c.pixels, zero as u8);
                    Int8Rows::Patches(patches.with_windows(&c.windows), zero)
                }
                None => Int8Rows::Matrix(U8Matrix {
                    data: &a,
                    lda,
                    rows,
                    zero_point: zero,
                }),
            };
            let result = match stat
                .as_ref()
                .and_then(|s| s.output.as_ref().map(|o| (s, o)))
            {
                Some((s, (out_q, multipliers))) => {
                    let mut y = pool.u8(rows / group * n);
                    share(rows, group, n, &mut y, rows * n * k, |r0, r1, y| {
                        let requantize = (packed, &s.bias[..], &multipliers[..], out_q.zero_point);
                        source.requantized(r0..r1, requantize, c.relu, group, y)
                    });
                    Data::U8(y, *out_q)
                }
                None => {
                    let acc_scale: Vec<f32> = scales.iter().map(|&s| params.scale * s).collect();
                    let mut y = pool.f32(rows / group * n);
                    share(rows, group, n, &mut y, rows * n * k, |r0, r1, y| {
                        let dequantize = (packed, &acc_scale[..], &c.bias[..]);
                        source.dequantized(r0..r1, dequantize, c.relu, group, y)
                    });
                    Data::F32(y)
                }
            };
            pool.give_u8(a);
            result
        }
    }
}

/// An int8 layer's input as `u8` codes and their grid: as it arrives when it already holds
/// codes on the layer's calibrated grid, else quantized to that grid (full integer) or to
/// the batch's own range (dynamic range).
fn int8_input(data: Data, stat: Option<&StaticQuant>, pool: &mut Pool) -> (Vec<u8>, QParams) {
    match (data, stat) {
        (Data::U8(q, p), Some(s)) if p == s.input => (q, p),
        (data, stat) => {
            let x = pool.take_f32(data);
            let p = stat.map_or_else(|| crate::quant::dynamic(&x), |s| s.input);
            let mut q = pool.u8(x.len());
            p.quantize_slice(&x, &mut q);
            pool.give_f32(x);
            (q, p)
        }
    }
}

/// The activation rows of an int8 product: a convolution's patches (and their zero point),
/// or a matrix.
enum Int8Rows<'a> {
    Patches(Patches<'a, u8>, i32),
    Matrix(U8Matrix<'a>),
}

impl Int8Rows<'_> {
    /// Rows `range` through the product, requantized (`packed` weights, `i32` bias,
    /// multipliers, output zero point) and pooled over groups of `group` rows.
    fn requantized(
        &self,
        range: std::ops::Range<usize>,
        (packed, bias, multipliers, out_zero): (&PackedI8, &[i32], &[f32], i32),
        relu: bool,
        group: usize,
        y: &mut [u8],
    ) {
        match self {
            Self::Patches(p, zero) => int8_conv_u8_pooled(
                &p.rows_range(range),
                *zero,
                packed,
                bias,
                multipliers,
                out_zero,
                relu,
                group,
                y,
            ),
            Self::Matrix(m) => int8_gemm_u8_pooled(
                &m.rows_range(range),
                packed,
                bias,
                multipliers,
                out_zero,
                relu,
                group,
                y,
            ),
        }
    }

    /// Rows `range` through the product, dequantized (`packed` weights, accumulator scales,
    /// f32 bias) and pooled over groups of `group` rows.
    fn dequantized(
        &self,
        range: std::ops::Range<usize>,
        (packed, scales, bias): (&PackedI8, &[f32], &[f32]),
        relu: bool,
        group: usize,
        y: &mut [f32],
    ) {
        match self {
            Self::Patches(p, zero) => int8_conv_f32_pooled(
                &p.rows_range(range),
                *zero,
                packed,
                scales,
                bias,
                relu,
                group,
                y,
            ),
            Self::Matrix(m) => {
                int8_gemm_f32_pooled(&m.rows_range(range), packed, scales, bias, relu, group, y)
            }
        }
    }
}

/// Multiply-adds from which a product is shared out between the team's threads when the
/// kernels may split their work: below it, the hand-off costs more than it saves.
const TEAM_MIN_MACS: usize = 1 << 16;

/// Calls `f(r0, r1, out_rows)` for row ranges that together cover `0..rows`, in whole groups
/// of `group` rows, each with its own `(r1 - r0) / group * n` values of `out`: one range on
/// the calling thread, or one per thread of the small-batch team when the product is large
/// enough (`macs`) and the kernels may split.
fn share<T: Send>(
    rows: usize,
    group: usize,
    n: usize,
    out: &mut [T],
    macs: usize,
    f: impl Fn(usize, usize, &mut [T]) + Sync,
) {
    let windows = rows / group;
    let team = (macs >= TEAM_MIN_MACS && kernels::may_split())
        .then(Team::get)
        .flatten();
    let shares = team.map_or(1, |t| {
        t.size().min(rayon::current_num_threads()).min(windows)
    });
    let (Some(team), true) = (team, shares > 1) else {
        f(0, rows, &mut out[..windows * n]);
        return;
    };
    let bounds: Vec<usize> = (0..=shares).map(|s| windows * s / shares * group).collect();
    let mut parts = Vec::with_capacity(shares);
    let mut rest = &mut out[..windows * n];
    for s in 0..shares {
        let (part, tail) = rest.split_at_mut((bounds[s + 1] - bounds[s]) / group * n);
        parts.push(Mutex::new(Some(part)));
        rest = tail;
    }
    let run = |s: usize| {
        let part = parts[s].lock().ok().and_then(|mut p| p.take());
        if let Some(part) = part {
            f(bounds[s], bounds[s + 1], part);
        }
    };
    // A team busy with another caller's work leaves every share to this thread.
    if !team.run(shares, &run) {
        (0..shares).for_each(run);
    }
}

fn relu(data: Data) -> Data {
    match data {
        Data::F32(mut v) => {
            v.iter_mut().for_each(|x| *x = x.max(0.0));
            Data::F32(v)
        }
        Data::U8(mut v, p) => {
            // The code of 0.0 is the zero point; codes below it are negative values.
            let zero = p.zero_point as u8;
            v.iter_mut().for_each(|x| *x = (*x).max(zero));
            Data::U8(v, p)
        }
    }
}

/// Max pooling of f32 or u8 activations (quantization is monotone, so the maximum of the codes
/// is the code of the maximum). `op` is one of the two pooling operations.
fn max_pool(data: Data, op: &Op, batch: usize, pool: &mut Pool) -> Data {
    let (&Op::MaxPool {
        channels,
        height,
        width,
        kernel,
        stride,
    }
    | &Op::MaxPoolPlanar {
        channels,
        height,
        width,
        kernel,
        stride,
    }) = op
    else {
        unreachable!("called for pooling operations only")
    };
    let planar = matches!(op, Op::MaxPoolPlanar { .. });
    let out_len =
        batch * channels * ((height - kernel) / stride + 1) * ((width - kernel) / stride + 1);
    fn kernel_of<T: Copy + PartialOrd + Send + Sync>(
        planar: bool,
        x: &[T],
        out: &mut [T],
        (batch, channels, height, width, kernel, stride): (
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
        ),
    ) {
        if planar {
            max_pool2d(x, batch * channels, height, width, kernel, stride, out);
        } else {
            max_pool2d_nhwc(x, batch, channels, height, width, kernel, stride, out);
        }
    }
    let shape = (batch, channels, height, width, kernel, stride);
    match data {
        Data::F32(v) => {
            let mut out = pool.f32(out_len);
            kernel_of(planar, &v, &mut out, shape);
            pool.give_f32(v);
            Data::F32(out)
        }
        Data::U8(v, p) => {
            let mut out = pool.u8(out_len);
            kernel_of(planar, &v, &mut out, shape);
            pool.give_u8(v);
            Data::U8(out, p)
        }
    }
}

/// Transposes every sample from `rows x cols` to `cols x rows`.
fn transpose(data: Data, batch: usize, rows: usize, cols: usize, pool: &mut Pool) -> Data {
    match data {
        Data::F32(v) => {
            let mut out = pool.f32(v.len());
            nhwc_to_nchw(&v, batch, rows, cols, &mut out);
            pool.give_f32(v);
            Data::F32(out)
        }
        Data::U8(v, p) => {
            let mut out = pool.u8(v.len());
            nhwc_to_nchw(&v, batch, rows, cols, &mut out);
            pool.give_u8(v);
            Data::U8(out, p)
        }
    }
}
