//! The graph plan: a network of named nodes (residual sums, concatenations, grouped
//! convolutions, any activation) run node by node. Every node's output lives in a slot until
//! its last reader has run, then its buffer goes back to the pool; flatten and dropout read
//! their input's slot, and a ReLU that is a product's only reader is fused into it. Images
//! stay NHWC throughout, as in the chain plan.

use model_spec::GraphSpec;
use quantization::QParams;

use super::{
    Compute, Data, Execution, FRONT_BYTES, Front, Kernel, Op, Pool, StaticQuant, compile_layer,
    int8_input, max_pool, relu, run_compute, run_grouped, transpose,
};
use crate::artifact::{Activation, Layer, LayerParams, NETWORK_INPUT, Scheme, Weight, grids};
use crate::kernels::{
    self, Grouped, GroupedEpilogue, Window, activation, avg_pool_nhwc, concat_channels,
    global_avg_pool_nhwc, grouped_conv_f32, grouped_conv_int8, max_pool_nhwc, scale_shift_nhwc,
};
use crate::quant::U8Codes;

/// A compiled graph.
#[derive(Clone, Debug)]
pub(crate) struct GraphPlan {
    steps: Vec<Step>,
    /// How many step inputs read each slot (plus one for the output slot, which is never
    /// given back).
    uses: Vec<usize>,
    /// The slot of the network's input and of its output.
    input: usize,
    output: usize,
    /// `(channels, pixels)` of an input image that travels NHWC (transposed on entry).
    to_nhwc: Option<(usize, usize)>,
    /// `(pixels, channels)` of an NHWC output that goes back to PyTorch's order.
    to_torch: Option<(usize, usize)>,
    /// How a large batch is split into groups of images; `None` when a dynamic-range layer
    /// needs the whole batch at once.
    front: Option<Front>,
}

/// One node's work: its operation, the slots it reads and the slot it writes.
#[derive(Clone, Debug)]
struct Step {
    op: NodeOp,
    inputs: Vec<usize>,
    output: usize,
}

#[derive(Clone, Debug)]
enum NodeOp {
    /// A conv2d of one group or a linear layer: the chain plan's products.
    Compute(Box<Compute>),
    /// A grouped (or depthwise) convolution.
    Grouped(Box<GroupedConv>),
    /// A batch norm kept as a scale and shift.
    ScaleShift {
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Relu,
    Activation(Activation),
    /// A square max pooling without padding (the chain plan's operation).
    MaxPool(Op),
    /// Any other pooling.
    Pool {
        max: bool,
        window: Window,
    },
    GlobalAvgPool {
        channels: usize,
        pixels: usize,
    },
    /// A sum: in f32, or (`grid`) on every input's codes requantized to one grid, the result
    /// requantized to `output` (dequantized when `None`).
    Add {
        grid: Option<QParams>,
        output: Option<QParams>,
    },
    /// A concatenation: of f32 values (u8 codes of one grid stay codes), or (`grid`) of every
    /// input's codes requantized to one grid.
    Concat {
        channels: Vec<usize>,
        pixels: usize,
        grid: Option<QParams>,
    },
    /// Every sample from `rows x cols` to `cols x rows` (NHWC features to PyTorch's order).
    Transpose {
        rows: usize,
        cols: usize,
    },
}

/// A grouped convolution with its weights packed for [`grouped_conv_f32`] or
/// [`grouped_conv_int8`].
#[derive(Clone, Debug)]
struct GroupedConv {
    node: usize,
    scheme: Scheme,
    shape: Grouped,
    /// The shape's [`Grouped::taps`].
    taps: Vec<[u32; 3]>,
    bias: Vec<f32>,
    relu: bool,
    kernel: GroupedKernel,
}

#[derive(Clone, Debug)]
enum GroupedKernel {
    F32(Vec<f32>),
    Int8 {
        weight: Vec<i8>,
        zero_points: Vec<i32>,
        scales: Vec<f32>,
        stat: Option<StaticQuant>,
    },
}

impl GroupedConv {
    fn execution(&self) -> Execution {
        match &self.kernel {
            GroupedKernel::F32(_) => Execution::F32,
            GroupedKernel::Int8 { stat: None, .. } => Execution::Int8Dynamic,
            GroupedKernel::Int8 { stat: Some(s), .. } => Execution::Int8Static {
                u8_output: s.output.is_some(),
            },
        }
    }
}

/// How a node's output is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// An NHWC image, or features in PyTorch's order.
    Native,
    /// Features flattened from an NHWC image of `channels x pixels`: a linear layer permutes
    /// its weight columns to read them.
    FlatHwc { channels: usize, pixels: usize },
}

impl GraphPlan {
    /// Compiles the decoded nodes of `graph` (`shapes`: every node's output shape; `inputs`:
    /// the nodes each one takes).
    pub(crate) fn compile(
        graph: &GraphSpec,
        shapes: &[Vec<usize>],
        inputs: &[Vec<usize>],
        layers: Vec<Layer>,
    ) -> Self {
        let n = layers.len();
        let input_slot = n;
        let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, sources) in inputs.iter().enumerate() {
            for &j in sources.iter().filter(|&&j| j != NETWORK_INPUT) {
                readers[j].push(i);
            }
        }
        let (_, next) = grids(&layers, inputs);

        let [c0, h0, w0] = graph.input;
        let to_nhwc = (c0 > 1 && h0 * w0 > 1).then_some((c0, h0 * w0));
        let mut slot_of: Vec<usize> = vec![0; n];
        let mut layout: Vec<Layout> = vec![Layout::Native; n];
        let mut steps: Vec<Step> = Vec::with_capacity(n);
        // The step that writes each node's slot, for fusing a ReLU into it.
        let mut step_of: Vec<Option<usize>> = vec![None; n];
        let mut extra_slots = 0;
        for (i, layer) in layers.into_iter().enumerate() {
            let source = |k: usize| inputs[i].get(k).copied().unwrap_or(NETWORK_INPUT);
            let slot = |j: usize| {
                if j == NETWORK_INPUT {
                    input_slot
                } else {
                    slot_of[j]
                }
            };
            let layout_of = |j: usize| {
                if j == NETWORK_INPUT {
                    Layout::Native
                } else {
                    layout[j]
                }
            };
            let in_shape: &[usize] = match source(0) {
                NETWORK_INPUT => &graph.input,
                j => &shapes[j],
            };
            let push = |op: NodeOp, reads: Vec<usize>, steps: &mut Vec<Step>| {
                steps.push(Step {
                    op,
                    inputs: reads,
                    output: i,
                });
                i
            };
            let first = slot(source(0));
            let is_concat = matches!(layer, Layer::Concat { .. });
            let (out_slot, out_layout) = match layer {
                Layer::Conv2d { shape, params } => match shape.geometry() {
                    // One group, square, more than one input channel: the GEMM kernels of
                    // the chain plan. (Over one input channel the reduction is only the
                    // kernel's taps, too short for a GEMM: the direct kernels are faster.)
                    Some(geometry) if shape.groups == 1 && shape.channels > 1 => {
                        let dims = (Some(geometry), shape.out, geometry.patch_len());
                        let mut c = compile_layer(i, dims, params, next[i], None);
                        c.pixels = kernels::patch_pixels(&geometry, 1);
                        c.windows = kernels::patch_windows(&geometry, &c.pixels);
                        let op = NodeOp::Compute(Box::new(c));
                        (push(op, vec![first], &mut steps), Layout::Native)
                    }
                    // Grouped, depthwise, rectangular or over one channel: the direct
                    // kernels.
                    _ => {
                        let conv = grouped(i, shape, params, next[i]);
                        let op = NodeOp::Grouped(Box::new(conv));
                        (push(op, vec![first], &mut steps), Layout::Native)
                    }
                },
                Layer::Linear {
                    in_features,
                    out_features,
                    params,
                } => {
                    let flat_from = match layout_of(source(0)) {
                        Layout::FlatHwc { channels, pixels } => Some((channels, pixels)),
                        Layout::Native => None,
                    };
                    let shape = (None, out_features, in_features);
                    let c = compile_layer(i, shape, params, next[i], flat_from);
                    let op = NodeOp::Compute(Box::new(c));
                    (push(op, vec![first], &mut steps), Layout::Native)
                }
                Layer::BatchNorm { scale, shift } => {
                    let op = NodeOp::ScaleShift { scale, shift };
                    (push(op, vec![first], &mut steps), Layout::Native)
                }
                Layer::Relu => {
                    let j = source(0);
                    let fusable = j != NETWORK_INPUT && readers[j].len() == 1;
                    let fused = fusable
                        && step_of[j].is_some_and(|s| match &mut steps[s].op {
                            NodeOp::Compute(c) if !c.relu => {
                                c.relu = true;
                                true
                            }
                            NodeOp::Grouped(g) if !g.relu => {
                                g.relu = true;
                                true
                            }
                            _ => false,
                        });
                    if fused {
                        (first, layout_of(j))
                    } else {
                        let l = layout_of(j);
                        (push(NodeOp::Relu, vec![first], &mut steps), l)
                    }
                }
                Layer::Activation(a) => {
                    let l = layout_of(source(0));
                    (push(NodeOp::Activation(a), vec![first], &mut steps), l)
                }
                Layer::MaxPool2d {
                    channels,
                    height,
                    width,
                    kernel,
                    stride,
                } => {
                    let op = NodeOp::MaxPool(Op::MaxPool {
                        channels,
                        height,
                        width,
                        kernel,
                        stride,
                    });
                    (push(op, vec![first], &mut steps), Layout::Native)
                }
                Layer::Pool2d { max, window } => {
                    let op = NodeOp::Pool { max, window };
                    (push(op, vec![first], &mut steps), Layout::Native)
                }
                Layer::GlobalAvgPool { channels, pixels } => {
                    let op = NodeOp::GlobalAvgPool { channels, pixels };
                    (push(op, vec![first], &mut steps), Layout::Native)
                }
                Layer::Flatten => match (layout_of(source(0)), in_shape) {
                    (Layout::Native, &[c, h, w]) if c > 1 && h * w > 1 => (
                        first,
                        Layout::FlatHwc {
                            channels: c,
                            pixels: h * w,
                        },
                    ),
                    (l, _) => (first, l),
                },
                Layer::Dropout => (first, layout_of(source(0))),
                Layer::Add { input_quant } | Layer::Concat { input_quant } => {
                    // Flattened NHWC features meet others in PyTorch's order, unless every
                    // input has the same layout (a concatenation takes images only).
                    let layouts: Vec<Layout> = inputs[i].iter().map(|&j| layout_of(j)).collect();
                    let same = layouts.windows(2).all(|w| w[0] == w[1]);
                    let mut reads = Vec::with_capacity(inputs[i].len());
                    for (&j, &l) in inputs[i].iter().zip(&layouts) {
                        match l {
                            Layout::FlatHwc { channels, pixels } if !same => {
                                let extra = n + 1 + extra_slots;
                                extra_slots += 1;
                                steps.push(Step {
                                    op: NodeOp::Transpose {
                                        rows: pixels,
                                        cols: channels,
                                    },
                                    inputs: vec![slot(j)],
                                    output: extra,
                                });
                                reads.push(extra);
                            }
                            _ => reads.push(slot(j)),
                        }
                    }
                    let out_layout = match layouts.first() {
                        Some(&l) if same => l,
                        _ => Layout::Native,
                    };
                    let op = if is_concat {
                        NodeOp::Concat {
                            channels: inputs[i]
                                .iter()
                                .map(|&j| match j {
                                    NETWORK_INPUT => graph.input[0],
                                    j => shapes[j][0],
                                })
                                .collect(),
                            pixels: in_shape[1..].iter().product(),
                            grid: input_quant,
                        }
                    } else {
                        NodeOp::Add {
                            grid: input_quant,
                            output: input_quant.and(next[i]),
                        }
                    };
                    (push(op, reads, &mut steps), out_layout)
                }
            };
            if out_slot == i {
                step_of[i] = Some(steps.len() - 1);
            }
            slot_of[i] = out_slot;
            layout[i] = out_layout;
        }
        let last = n.saturating_sub(1);
        let output = if n == 0 { input_slot } else { slot_of[last] };
        let to_torch = match (layout.get(last), shapes.get(last).map(Vec::as_slice)) {
            (Some(&Layout::FlatHwc { channels, pixels }), _) => Some((pixels, channels)),
            (Some(Layout::Native), Some(&[c, h, w])) if c > 1 && h * w > 1 => Some((h * w, c)),
            _ => None,
        };
        let slots = n + 1 + extra_slots;
        let mut uses = vec![0; slots];
        for step in &steps {
            for &s in &step.inputs {
                uses[s] += 1;
            }
        }
        uses[output] += 1;
        let dynamic = steps.iter().any(|s| match &s.op {
            NodeOp::Compute(c) => matches!(c.kernel, Kernel::Int8 { stat: None, .. }),
            NodeOp::Grouped(g) => matches!(g.kernel, GroupedKernel::Int8 { stat: None, .. }),
            _ => false,
        });
        let in_len: usize = graph.input.iter().product();
        let out_len: usize = shapes.get(last).map_or(in_len, |s| s.iter().product());
        // Every live activation of an image is bounded by the largest node output and
        // im2col rows; a few are live at once.
        let largest = shapes
            .iter()
            .map(|s| s.iter().product::<usize>())
            .chain(steps.iter().filter_map(|s| match &s.op {
                NodeOp::Compute(c) => c.conv.map(|g| g.pixels() * kernels::padded_k(c.k)),
                _ => None,
            }))
            .max()
            .unwrap_or(in_len)
            .max(in_len);
        let front = (!dynamic).then(|| Front {
            ops: steps.len(),
            images: (FRONT_BYTES / (4 * 3 * largest).max(1)).max(1),
            in_len,
            out_len,
            out_quant: None,
        });
        Self {
            steps,
            uses,
            input: input_slot,
            output,
            to_nhwc,
            to_torch,
            front,
        }
    }

    /// How each conv2d and linear node executes, with its index.
    pub(crate) fn execution(&self) -> Vec<(usize, Execution)> {
        self.steps
            .iter()
            .filter_map(|s| match &s.op {
                NodeOp::Compute(c) => Some((c.layer, c.execution())),
                NodeOp::Grouped(g) => Some((g.node, g.execution())),
                NodeOp::Add { grid, output } => Some((
                    s.output,
                    match grid {
                        Some(_) => Execution::Int8Static {
                            u8_output: output.is_some(),
                        },
                        None => Execution::F32,
                    },
                )),
                NodeOp::Concat { grid, .. } => Some((
                    s.output,
                    match grid {
                        Some(_) => Execution::Int8Static { u8_output: true },
                        None => Execution::F32,
                    },
                )),
                _ => None,
            })
            .collect()
    }

    /// How the artifact stores the weight of node `node`.
    pub(crate) fn weight_scheme(&self, node: usize) -> Option<&Scheme> {
        self.steps.iter().find_map(|s| match &s.op {
            NodeOp::Compute(c) if c.layer == node => Some(&c.scheme),
            NodeOp::Grouped(g) if g.node == node => Some(&g.scheme),
            _ => None,
        })
    }

    /// Runs a batch of NCHW inputs (`x`) through the graph: a few images at a time when no
    /// layer needs the whole batch.
    pub(crate) fn run(&self, x: &[f32], batch: usize, pool: &mut Pool) -> Data {
        match &self.front {
            Some(front) => run_grouped(front, x, batch, pool, &|data, images, pool| {
                self.run_nodes(data, images, pool)
            }),
            None => {
                let mut owned = pool.f32(x.len());
                owned.copy_from_slice(x);
                self.run_nodes(Data::F32(owned), batch, pool)
            }
        }
    }

    /// Runs every node on `batch` NCHW inputs; returns the output in PyTorch's order.
    fn run_nodes(&self, x: Data, batch: usize, pool: &mut Pool) -> Data {
        let x = match self.to_nhwc {
            Some((channels, pixels)) => transpose(x, batch, channels, pixels, pool),
            None => x,
        };
        let mut slots: Vec<Option<Data>> = (0..self.uses.len()).map(|_| None).collect();
        let mut left = self.uses.clone();
        slots[self.input] = Some(x);
        for step in &self.steps {
            let out = match &step.op {
                NodeOp::Add { grid, output } => {
                    let out = add(&gather(&slots, &step.inputs), *grid, *output, pool);
                    release(&mut slots, &mut left, &step.inputs, pool);
                    out
                }
                NodeOp::Concat {
                    channels,
                    pixels,
                    grid,
                } => {
                    let parts = gather(&slots, &step.inputs);
                    let out = concat(&parts, channels, batch * pixels, *grid, pool);
                    release(&mut slots, &mut left, &step.inputs, pool);
                    out
                }
                op => {
                    let x = take(&mut slots, &mut left, step.inputs[0], pool);
                    run_unary(op, x, batch, pool)
                }
            };
            slots[step.output] = Some(out);
        }
        let out = slots[self.output]
            .take()
            .unwrap_or_else(|| Data::F32(Vec::new()));
        for data in slots.into_iter().flatten() {
            give(data, pool);
        }
        match self.to_torch {
            Some((pixels, channels)) => transpose(out, batch, pixels, channels, pool),
            None => out,
        }
    }
}

/// Prepares a grouped convolution: packs its weight, quantizes a static bias.
fn grouped(node: usize, shape: Grouped, params: LayerParams, next: Option<QParams>) -> GroupedConv {
    let LayerParams {
        weight,
        bias,
        input_quant,
        weight_scheme,
        ..
    } = params;
    let kernel = match weight {
        Weight::Dense(w) => GroupedKernel::F32(shape.pack(&w)),
        Weight::Csr(m) => GroupedKernel::F32(shape.pack(&m.to_dense())),
        Weight::Int8 {
            values,
            scales,
            zero_points,
        } => {
            let stat = input_quant.map(|q| StaticQuant::new(q, &scales, &bias, next));
            GroupedKernel::Int8 {
                weight: shape.pack(&values),
                zero_points,
                scales,
                stat,
            }
        }
    };
    GroupedConv {
        node,
        scheme: weight_scheme,
        taps: shape.taps(),
        shape,
        bias,
        relu: false,
        kernel,
    }
}

/// The data of slot `s` for a reader that consumes it: the slot's own buffer after its last
/// reader, else a copy.
fn take(slots: &mut [Option<Data>], left: &mut [usize], s: usize, pool: &mut Pool) -> Data {
    left[s] -= 1;
    if left[s] == 0
        && let Some(data) = slots[s].take()
    {
        return data;
    }
    match &slots[s] {
        Some(Data::F32(v)) => {
            let mut copy = pool.f32(v.len());
            copy.copy_from_slice(v);
            Data::F32(copy)
        }
        Some(Data::U8(v, p)) => {
            let mut copy = pool.u8(v.len());
            copy.copy_from_slice(v);
            Data::U8(copy, *p)
        }
        None => Data::F32(Vec::new()),
    }
}

/// The data of the slots `inputs`, borrowed.
fn gather<'s>(slots: &'s [Option<Data>], inputs: &[usize]) -> Vec<&'s Data> {
    inputs.iter().filter_map(|&s| slots[s].as_ref()).collect()
}

/// Counts one read of each slot of `inputs`, giving a slot's buffer back after its last.
fn release(slots: &mut [Option<Data>], left: &mut [usize], inputs: &[usize], pool: &mut Pool) {
    for &s in inputs {
        left[s] -= 1;
        if left[s] == 0
            && let Some(data) = slots[s].take()
        {
            give(data, pool);
        }
    }
}

/// Gives a slot's buffer back to the pool.
fn give(data: Data, pool: &mut Pool) {
    match data {
        Data::F32(v) => pool.give_f32(v),
        Data::U8(v, _) => pool.give_u8(v),
    }
}

/// Runs an operation of one input.
fn run_unary(op: &NodeOp, x: Data, batch: usize, pool: &mut Pool) -> Data {
    match op {
        NodeOp::Compute(c) => run_compute(c, x, batch, pool),
        NodeOp::Grouped(g) => run_grouped_conv(g, x, batch, pool),
        NodeOp::ScaleShift { scale, shift } => {
            let mut v = pool.take_f32(x);
            scale_shift_nhwc(&mut v, scale, shift);
            Data::F32(v)
        }
        NodeOp::Relu => relu(x),
        &NodeOp::Activation(a) => activate(a, x, pool),
        NodeOp::MaxPool(op) => max_pool(x, op, batch, pool),
        &NodeOp::Pool { max: true, window } => match x {
            Data::F32(v) => {
                let mut y = pool.f32(batch * window.out_len());
                max_pool_nhwc(&window, &v, batch, &mut y);
                pool.give_f32(v);
                Data::F32(y)
            }
            // Quantization is monotone: the maximum of the codes is the code of the maximum.
            Data::U8(v, p) => {
                let mut y = pool.u8(batch * window.out_len());
                max_pool_nhwc(&window, &v, batch, &mut y);
                pool.give_u8(v);
                Data::U8(y, p)
            }
        },
        &NodeOp::Pool { max: false, window } => {
            let v = pool.take_f32(x);
            let mut y = pool.f32(batch * window.out_len());
            avg_pool_nhwc(&window, &v, batch, &mut y);
            pool.give_f32(v);
            Data::F32(y)
        }
        &NodeOp::GlobalAvgPool { channels, pixels } => {
            let v = pool.take_f32(x);
            let mut y = pool.f32(batch * channels);
            global_avg_pool_nhwc(&v, batch, pixels, channels, &mut y);
            pool.give_f32(v);
            Data::F32(y)
        }
        &NodeOp::Transpose { rows, cols } => transpose(x, batch, rows, cols, pool),
        // Operations of several inputs are run by the caller.
        NodeOp::Add { .. } | NodeOp::Concat { .. } => x,
    }
}

/// An activation in place on f32 values; on u8 codes, by a table of the 256 results, except
/// ReLU6, which clamps the codes to those of 0 and 6 (TFLite's quantized ReLU6).
fn activate(a: Activation, x: Data, pool: &mut Pool) -> Data {
    let x = match (a, x) {
        (Activation::Relu6, Data::U8(mut q, p)) => {
            let (lo, hi) = (p.zero_point as u8, p.quantize(6.0) as u8);
            q.iter_mut().for_each(|c| *c = (*c).clamp(lo, hi.max(lo)));
            return Data::U8(q, p);
        }
        (_, x) => x,
    };
    // Generic over the function, so that each activation gets its own loop with the
    // function inlined (and vectorized where it can be).
    fn apply(x: Data, f: impl Fn(f32) -> f32, pool: &mut Pool) -> Data {
        match x {
            Data::F32(mut v) => {
                v.iter_mut().for_each(|x| *x = f(*x));
                Data::F32(v)
            }
            Data::U8(q, p) => {
                let table: Vec<f32> = (0..=255).map(|c| f(p.dequantize(c))).collect();
                let mut y = pool.f32(q.len());
                for (y, &c) in y.iter_mut().zip(&q) {
                    *y = table[usize::from(c)];
                }
                pool.give_u8(q);
                Data::F32(y)
            }
        }
    }
    match a {
        Activation::Relu6 => apply(x, activation::relu6, pool),
        Activation::Sigmoid => apply(x, activation::sigmoid, pool),
        Activation::Tanh => apply(x, activation::tanh, pool),
        Activation::Gelu => apply(x, activation::gelu, pool),
        Activation::Silu => apply(x, activation::silu, pool),
        Activation::HardSwish => apply(x, activation::hard_swish, pool),
    }
}

/// An input's `u8` codes on a grid: its own when it holds codes of that grid, else
/// quantized (after dequantizing codes of another grid) into a pooled buffer.
enum Codes<'d> {
    Borrowed(&'d [u8]),
    Owned(Vec<u8>),
}

impl Codes<'_> {
    fn on<'d>(data: &'d Data, grid: QParams, pool: &mut Pool) -> Codes<'d> {
        match data {
            Data::U8(v, p) if *p == grid => Codes::Borrowed(v),
            Data::U8(v, p) => {
                let mut f = pool.f32(v.len());
                p.dequantize_slice(v, &mut f);
                let mut q = pool.u8(v.len());
                grid.quantize_slice(&f, &mut q);
                pool.give_f32(f);
                Codes::Owned(q)
            }
            Data::F32(v) => {
                let mut q = pool.u8(v.len());
                grid.quantize_slice(v, &mut q);
                Codes::Owned(q)
            }
        }
    }

    fn codes(&self) -> &[u8] {
        match self {
            Codes::Borrowed(v) => v,
            Codes::Owned(v) => v,
        }
    }

    fn give(self, pool: &mut Pool) {
        if let Codes::Owned(v) = self {
            pool.give_u8(v);
        }
    }
}

/// The elementwise sum of the inputs: in f32 (u8 inputs dequantized) without a grid; with
/// one, in integers over every input's codes on it,
/// `acc = sum_k (q_k - zero_point)`, then requantized to `output`
/// ([`requantize`](kernels::requantize) with multiplier `grid.scale / output.scale`), or
/// dequantized (`acc * grid.scale`).
fn add(parts: &[&Data], grid: Option<QParams>, output: Option<QParams>, pool: &mut Pool) -> Data {
    let len = parts.first().map_or(0, |d| match d {
        Data::F32(v) => v.len(),
        Data::U8(v, _) => v.len(),
    });
    let Some(g) = grid else {
        let mut y = pool.f32(len);
        for (k, part) in parts.iter().enumerate() {
            match (k, part) {
                (0, Data::F32(v)) => y.copy_from_slice(&v[..len]),
                (0, Data::U8(v, p)) => p.dequantize_slice(&v[..len], &mut y),
                (_, Data::F32(v)) => y.iter_mut().zip(v.iter()).for_each(|(y, &v)| *y += v),
                (_, Data::U8(v, p)) => y
                    .iter_mut()
                    .zip(v.iter())
                    .for_each(|(y, &c)| *y += p.dequantize(i32::from(c))),
            }
        }
        return Data::F32(y);
    };
    let codes: Vec<Codes> = parts.iter().map(|d| Codes::on(d, g, pool)).collect();
    let offset = codes.len() as i64 * i64::from(g.zero_point);
    let acc = |i: usize| codes.iter().map(|c| i64::from(c.codes()[i])).sum::<i64>() - offset;
    let out = match output {
        Some(o) => {
            let multiplier = g.scale / o.scale;
            let mut y = pool.u8(len);
            for (i, y) in y.iter_mut().enumerate() {
                *y = kernels::requantize(acc(i), 0, multiplier, o.zero_point, 0);
            }
            Data::U8(y, o)
        }
        None => {
            let mut y = pool.f32(len);
            for (i, y) in y.iter_mut().enumerate() {
                *y = acc(i) as f32 * g.scale;
            }
            Data::F32(y)
        }
    };
    for c in codes {
        c.give(pool);
    }
    out
}

/// The inputs stacked along the channels of every pixel (`pixels`: over the whole batch):
/// with a grid, every input's codes on it; without, u8 when every input holds codes of one
/// grid, else f32.
fn concat(
    parts: &[&Data],
    channels: &[usize],
    pixels: usize,
    grid: Option<QParams>,
    pool: &mut Pool,
) -> Data {
    let total: usize = channels.iter().sum::<usize>() * pixels;
    let grid = grid.or(match parts.first() {
        Some(Data::U8(_, p)) if parts.iter().all(|d| matches!(d, Data::U8(_, q) if q == p)) => {
            Some(*p)
        }
        _ => None,
    });
    if let Some(g) = grid {
        let codes: Vec<Codes> = parts.iter().map(|d| Codes::on(d, g, pool)).collect();
        let slices: Vec<&[u8]> = codes.iter().map(Codes::codes).collect();
        let mut y = pool.u8(total);
        concat_channels(&slices, channels, pixels, &mut y);
        for c in codes {
            c.give(pool);
        }
        return Data::U8(y, g);
    }
    let mut owned: Vec<Vec<f32>> = Vec::new();
    for d in parts {
        if let Data::U8(v, p) = d {
            let mut f = pool.f32(v.len());
            p.dequantize_slice(v, &mut f);
            owned.push(f);
        }
    }
    let mut dequantized = owned.iter();
    let values: Vec<&[f32]> = parts
        .iter()
        .map(|d| match d {
            Data::F32(v) => v.as_slice(),
            Data::U8(..) => dequantized.next().map_or(&[][..], Vec::as_slice),
        })
        .collect();
    let mut y = pool.f32(total);
    concat_channels(&values, channels, pixels, &mut y);
    for f in owned {
        pool.give_f32(f);
    }
    Data::F32(y)
}

/// Runs a grouped convolution on a batch of NHWC images.
fn run_grouped_conv(g: &GroupedConv, x: Data, batch: usize, pool: &mut Pool) -> Data {
    let out_len = batch * g.shape.out_len();
    match &g.kernel {
        GroupedKernel::F32(w) => {
            let x = pool.take_f32(x);
            let mut y = pool.f32(out_len);
            grouped_conv_f32(&g.shape, &g.taps, &x, batch, (w, &g.bias), g.relu, &mut y);
            pool.give_f32(x);
            Data::F32(y)
        }
        GroupedKernel::Int8 {
            weight,
            zero_points,
            scales,
            stat,
        } => {
            let (q, params) = int8_input(x, stat.as_ref(), pool);
            let w = (&weight[..], &zero_points[..]);
            let result = match stat
                .as_ref()
                .and_then(|s| s.output.as_ref().map(|o| (s, o)))
            {
                Some((s, (out_q, multipliers))) => {
                    let mut y = pool.u8(out_len);
                    let epilogue = GroupedEpilogue::Requantize {
                        bias: &s.bias,
                        multipliers,
                        zero_point: out_q.zero_point,
                    };
                    grouped_conv_int8(
                        &g.shape,
                        &g.taps,
                        &q,
                        params.zero_point,
                        batch,
                        w,
                        epilogue,
                        g.relu,
                        &mut [],
                        &mut y,
                    );
                    Data::U8(y, *out_q)
                }
                None => {
                    let acc_scale: Vec<f32> = scales.iter().map(|&s| params.scale * s).collect();
                    let mut y = pool.f32(out_len);
                    let epilogue = GroupedEpilogue::Dequantize {
                        scales: &acc_scale,
                        bias: &g.bias,
                    };
                    grouped_conv_int8(
                        &g.shape,
                        &g.taps,
                        &q,
                        params.zero_point,
                        batch,
                        w,
                        epilogue,
                        g.relu,
                        &mut y,
                        &mut [],
                    );
                    Data::F32(y)
                }
            };
            pool.give_u8(q);
            result
        }
    }
}
