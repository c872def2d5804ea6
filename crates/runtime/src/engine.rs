//! The inference engine: a validated artifact compiled into a sequence of operations.

use std::path::Path;

use model_spec::{LayerSpec, NetworkSpec};
use ndarray::{Array2, ArrayView, Dimension};

use crate::artifact::{Decoded, LayerParams, Weight, decode};
use crate::error::{Error, Result};
use crate::kernels::{
    ConvGeometry, CsrMatrix, PackedI8, U8Matrix, csr_gemm_bias, im2col, int8_gemm_f32,
    int8_gemm_u8, max_pool2d, nhwc_to_nchw, padded_k, sgemm_bias,
};
use crate::quant::QParams;

/// How one conv2d or linear layer executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Execution {
    /// Dense f32 GEMM (weights stored as f32 or f16).
    F32,
    /// CSR-sparse f32 product with this many stored weights.
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

#[derive(Clone, Debug)]
enum Kernel {
    Dense(Vec<f32>),
    Csr(CsrMatrix),
    Int8 {
        packed: PackedI8,
        scales: Vec<f32>,
        stat: Option<StaticQuant>,
    },
}

/// A conv2d or linear layer.
#[derive(Clone, Debug)]
struct Compute {
    /// `None` for a linear layer.
    conv: Option<ConvGeometry>,
    out: usize,
    k: usize,
    kernel: Kernel,
    bias: Vec<f32>,
    /// A following ReLU, fused into the epilogue.
    relu: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Compute(Box<Compute>),
    Relu,
    MaxPool {
        kernel: usize,
        stride: usize,
    },
    /// Flatten, dropout and fused ReLUs: the data stays as it is.
    Identity,
}

/// Activations between layers.
#[derive(Clone, Debug)]
enum Data {
    F32(Vec<f32>),
    U8(Vec<u8>, QParams),
}

impl Data {
    fn into_f32(self) -> Vec<f32> {
        match self {
            Self::F32(v) => v,
            Self::U8(q, p) => {
                let mut out = vec![0.0; q.len()];
                p.dequantize_slice(&q, &mut out);
                out
            }
        }
    }
}

/// A loaded model, ready to run.
#[derive(Clone, Debug)]
pub struct Model {
    file: String,
    network: NetworkSpec,
    /// Per-sample input shape of every layer, then the output shape.
    shapes: Vec<Vec<usize>>,
    ops: Vec<Op>,
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
            shapes,
            params,
        } = decoded;
        // Input quantization of every static int8 layer, to find each layer's successor's.
        let static_inputs: Vec<Option<QParams>> = params
            .iter()
            .map(|p| p.as_ref().and_then(|p| p.input_quant))
            .collect();
        let mut ops: Vec<Op> = Vec::with_capacity(network.layers.len());
        for (i, (layer, params)) in network.layers.iter().zip(params).enumerate() {
            let op = match (layer, params) {
                (LayerSpec::Relu, _) => match ops.last_mut() {
                    Some(Op::Compute(c)) if !c.relu => {
                        c.relu = true;
                        Op::Identity
                    }
                    _ => Op::Relu,
                },
                (&LayerSpec::MaxPool2d { kernel, stride }, _) => Op::MaxPool { kernel, stride },
                (LayerSpec::Flatten | LayerSpec::Dropout { .. }, _) => Op::Identity,
                (_, Some(params)) => {
                    // The next conv2d or linear layer decides whether the output stays u8.
                    let next_input = static_inputs
                        .iter()
                        .zip(&network.layers)
                        .skip(i + 1)
                        .find(|(_, l)| {
                            matches!(l, LayerSpec::Conv2d { .. } | LayerSpec::Linear { .. })
                        })
                        .and_then(|(q, _)| *q);
                    Op::Compute(Box::new(compile_layer(
                        layer, &shapes[i], params, next_input,
                    )))
                }
                // The decoder gives every conv2d and linear layer its parameters.
                (_, None) => Op::Identity,
            };
            ops.push(op);
        }
        Self {
            file: file.to_owned(),
            network,
            shapes,
            ops,
        }
    }

    /// The network description.
    pub fn network(&self) -> &NetworkSpec {
        &self.network
    }

    /// Where the model came from: its path, or `<bytes>`.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The per-sample output shape.
    pub fn output_shape(&self) -> &[usize] {
        self.shapes.last().map_or(&[], Vec::as_slice)
    }

    /// How each conv2d and linear layer executes, with its index in the network.
    pub fn execution(&self) -> Vec<(usize, Execution)> {
        self.ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| match op {
                Op::Compute(c) => Some((
                    i,
                    match &c.kernel {
                        Kernel::Dense(_) => Execution::F32,
                        Kernel::Csr(m) => Execution::Csr { nnz: m.nnz() },
                        Kernel::Int8 { stat: None, .. } => Execution::Int8Dynamic,
                        Kernel::Int8 { stat: Some(s), .. } => Execution::Int8Static {
                            u8_output: s.output.is_some(),
                        },
                    },
                )),
                _ => None,
            })
            .collect()
    }

    /// Runs a batch and returns one row of outputs (logits) per sample.
    ///
    /// The input is `(batch, channels, height, width)` like the network's input, or
    /// `(batch, features)` with the input flattened in C order.
    pub fn run<D: Dimension>(&self, input: ArrayView<'_, f32, D>) -> Result<Array2<f32>> {
        let expected = self.network.input.to_vec();
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
        let mut data = Data::F32(input.as_standard_layout().iter().copied().collect());
        for (op, shape) in self.ops.iter().zip(&self.shapes) {
            data = match op {
                Op::Compute(c) => run_compute(c, data, batch),
                Op::Relu => relu(data),
                &Op::MaxPool { kernel, stride } => {
                    let &[c, h, w] = shape.as_slice() else {
                        unreachable!("the decoder checked that max pooling gets (C, H, W)")
                    };
                    max_pool(data, batch * c, h, w, kernel, stride)
                }
                Op::Identity => data,
            };
        }
        let out_len: usize = self.output_shape().iter().product();
        let out = data.into_f32();
        Ok(Array2::from_shape_vec((batch, out_len), out)
            .expect("the output has batch * out_len values"))
    }
}

/// Prepares one conv2d or linear layer: packs int8 weights, quantizes static biases.
fn compile_layer(
    layer: &LayerSpec,
    input: &[usize],
    params: LayerParams,
    next_input: Option<QParams>,
) -> Compute {
    let (conv, out, k) = match (layer, input) {
        (
            &LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            },
            &[_, height, width],
        ) => {
            let g = ConvGeometry {
                channels: in_channels,
                height,
                width,
                kernel,
                stride,
                padding,
            };
            (Some(g), out_channels, g.patch_len())
        }
        (
            &LayerSpec::Linear {
                in_features,
                out_features,
            },
            _,
        ) => (None, out_features, in_features),
        _ => unreachable!("only conv2d and linear layers have parameters"),
    };
    let LayerParams {
        weight,
        bias,
        input_quant,
    } = params;
    let kernel = match weight {
        Weight::Dense(w) => Kernel::Dense(w),
        Weight::Csr(m) => Kernel::Csr(m),
        Weight::Int8 {
            values,
            scales,
            zero_points,
        } => {
            let packed = PackedI8::new(&values, out, k, &zero_points);
            let stat = input_quant.map(|input| {
                let acc_scale: Vec<f32> = scales.iter().map(|&s| input.scale * s).collect();
                let bias = bias
                    .iter()
                    .zip(&acc_scale)
                    .map(|(&b, &s)| (b / s).round_ties_even() as i32)
                    .collect();
                let output =
                    next_input.map(|o| (o, acc_scale.iter().map(|&s| s / o.scale).collect()));
                StaticQuant {
                    input,
                    bias,
                    output,
                }
            });
            Kernel::Int8 {
                packed,
                scales,
                stat,
            }
        }
    };
    Compute {
        conv,
        out,
        k,
        kernel,
        bias,
        relu: false,
    }
}

/// Runs one conv2d or linear layer on a batch.
fn run_compute(c: &Compute, data: Data, batch: usize) -> Data {
    let rows = batch * c.conv.map_or(1, |g| g.pixels());
    let (n, k) = (c.out, c.k);
    let result = match &c.kernel {
        Kernel::Dense(_) | Kernel::Csr(_) => {
            let x = data.into_f32();
            let cols = match c.conv {
                Some(g) => {
                    let mut cols = vec![0.0; rows * k];
                    im2col(&x, batch, &g, 0.0, &mut cols, k);
                    cols
                }
                None => x,
            };
            let mut y = vec![0.0; rows * n];
            match &c.kernel {
                Kernel::Dense(w) => sgemm_bias(&cols, rows, k, w, &c.bias, c.relu, &mut y),
                Kernel::Csr(m) => csr_gemm_bias(&cols, rows, m, &c.bias, c.relu, &mut y),
                Kernel::Int8 { .. } => unreachable!(),
            }
            Data::F32(y)
        }
        Kernel::Int8 {
            packed,
            scales,
            stat,
        } => {
            let lda = padded_k(k);
            let (q, params) = match (data, stat) {
                (Data::U8(q, p), Some(s)) if p == s.input => (q, p),
                (data, stat) => {
                    let x = data.into_f32();
                    let p = stat
                        .as_ref()
                        .map_or_else(|| QParams::dynamic(&x), |s| s.input);
                    let mut q = vec![0u8; x.len()];
                    p.quantize_slice(&x, &mut q);
                    (q, p)
                }
            };
            let a = match c.conv {
                Some(g) => {
                    let mut cols = vec![0u8; rows * lda];
                    im2col(&q, batch, &g, params.zero_point as u8, &mut cols, lda);
                    cols
                }
                None if lda == k => q,
                None => {
                    let mut padded = vec![0u8; rows * lda];
                    for (dst, src) in padded.chunks_exact_mut(lda).zip(q.chunks_exact(k)) {
                        dst[..k].copy_from_slice(src);
                    }
                    padded
                }
            };
            let a = U8Matrix {
                data: &a,
                lda,
                rows,
                zero_point: params.zero_point,
            };
            match stat
                .as_ref()
                .and_then(|s| s.output.as_ref().map(|o| (s, o)))
            {
                Some((s, (out_q, multipliers))) => {
                    let mut y = vec![0u8; rows * n];
                    int8_gemm_u8(
                        &a,
                        packed,
                        &s.bias,
                        multipliers,
                        out_q.zero_point,
                        c.relu,
                        &mut y,
                    );
                    Data::U8(y, *out_q)
                }
                None => {
                    let acc_scale: Vec<f32> = scales.iter().map(|&s| params.scale * s).collect();
                    let mut y = vec![0.0; rows * n];
                    int8_gemm_f32(&a, packed, &acc_scale, &c.bias, c.relu, &mut y);
                    Data::F32(y)
                }
            }
        }
    };
    match (c.conv, result) {
        (None, result) => result,
        (Some(g), Data::F32(y)) => {
            let mut nchw = vec![0.0; y.len()];
            nhwc_to_nchw(&y, batch, g.pixels(), n, &mut nchw);
            Data::F32(nchw)
        }
        (Some(g), Data::U8(y, p)) => {
            let mut nchw = vec![0u8; y.len()];
            nhwc_to_nchw(&y, batch, g.pixels(), n, &mut nchw);
            Data::U8(nchw, p)
        }
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

fn max_pool(data: Data, planes: usize, h: usize, w: usize, kernel: usize, stride: usize) -> Data {
    let (oh, ow) = ((h - kernel) / stride + 1, (w - kernel) / stride + 1);
    match data {
        Data::F32(v) => {
            let mut out = vec![0.0; planes * oh * ow];
            max_pool2d(&v, planes, h, w, kernel, stride, &mut out);
            Data::F32(out)
        }
        Data::U8(v, p) => {
            // Quantization is monotone, so the maximum of the codes is the code of the maximum.
            let mut out = vec![0u8; planes * oh * ow];
            max_pool2d(&v, planes, h, w, kernel, stride, &mut out);
            Data::U8(out, p)
        }
    }
}
