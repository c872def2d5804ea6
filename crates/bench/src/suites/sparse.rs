//! The `sparse` suite: our CSR-sparse product against our dense f32 GEMM, on the layers of
//! the project's models (the deployed teacher CNN, its convolutions as im2col GEMMs, and the
//! MLP 784-512-512-10), at 50, 75, 90 and 95% unstructured sparsity, batch 1 and 256.
//!
//! Both sides are the runtime's public kernels, run the way the engine runs them, bias and
//! ReLU fused, on the same seeded activations and weights; the weights are pruned by
//! magnitude to the sparsity. A linear layer is `sgemm_packed` against `csr_gemm_bias`. A
//! convolution starts on both sides from the NHWC activations the engine holds: the dense
//! side is `im2col_nhwc` then `sgemm_packed`, the sparse side the direct sparse convolution
//! `sparse_conv_nhwc` (stride 1; `im2col_nhwc` then `csr_gemm_bias` otherwise), so im2col is
//! inside the dense side's time. Each repeat measures the dense product of a layer and batch,
//! then its sparse products, alternating; the report gives medians. The "peer" of each case
//! is the dense product, so the ratio is the speed-up CSR brings. The suite also prints, per
//! case, what `runtime::csr_pays_off` decides.

use std::hint::black_box;
use std::time::Instant;

use anyhow::Result;
use model_spec::{LayerSpec, NetworkSpec};
use runtime::kernels::{
    ConvGeometry, CsrMatrix, PackedF32, SparseConv, csr_gemm_bias, im2col_nhwc, sgemm_packed,
    sparse_conv_nhwc,
};

use crate::peer;
use crate::report::{BenchReport, CaseResult, Measurement, median};

const BATCHES: [usize; 2] = [1, 256];

/// The MLP 784-512-512-10 whose layers the suite measures next to the teacher's.
fn mlp() -> NetworkSpec {
    NetworkSpec {
        name: "mlp_784_512_512_10".into(),
        input: [1, 28, 28],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 784,
                out_features: 512,
            },
            LayerSpec::Relu,
            LayerSpec::Linear {
                in_features: 512,
                out_features: 512,
            },
            LayerSpec::Relu,
            LayerSpec::Linear {
                in_features: 512,
                out_features: 10,
            },
        ],
    }
}

const SPARSITIES: [f64; 4] = [0.5, 0.75, 0.9, 0.95];
const OURS: &str = "tch-mot runtime csr";
const PEER: &str = "tch-mot runtime dense f32";

/// One GEMM of a network: `pixels` rows per sample (1 for a linear layer), `n` outputs,
/// reduction length `k`; a convolution's geometry.
#[derive(Debug, Clone)]
struct Layer {
    name: String,
    pixels: usize,
    n: usize,
    k: usize,
    conv: Option<ConvGeometry>,
}

/// The conv2d and linear layers of `spec` as GEMM shapes.
fn layers(spec: &NetworkSpec) -> Vec<Layer> {
    let [_, mut h, mut w] = spec.input;
    let mut out = Vec::new();
    for (i, layer) in spec.layers.iter().enumerate() {
        match *layer {
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            } => {
                let g = ConvGeometry {
                    channels: in_channels,
                    height: h,
                    width: w,
                    kernel,
                    stride,
                    padding,
                };
                (h, w) = (g.out_height(), g.out_width());
                out.push(Layer {
                    name: format!("{} layer {i} conv", spec.name),
                    pixels: h * w,
                    n: out_channels,
                    k: g.patch_len(),
                    conv: Some(g),
                });
            }
            LayerSpec::MaxPool2d { kernel, stride } => {
                h = (h - kernel) / stride + 1;
                w = (w - kernel) / stride + 1;
            }
            LayerSpec::Flatten => (h, w) = (1, 1),
            LayerSpec::Linear {
                in_features,
                out_features,
            } => {
                out.push(Layer {
                    name: format!("{} layer {i} linear", spec.name),
                    pixels: 1,
                    n: out_features,
                    k: in_features,
                    conv: None,
                });
            }
            _ => {}
        }
    }
    out
}

/// Seeded values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// `w` with the `sparsity` fraction of smallest magnitudes set to zero.
fn prune(w: &[f32], sparsity: f64) -> Vec<f32> {
    let mut magnitudes: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    magnitudes.sort_by(f32::total_cmp);
    let cut = ((w.len() as f64 * sparsity).round() as usize).min(w.len());
    let mut zeroed = 0;
    let threshold = if cut == 0 { -1.0 } else { magnitudes[cut - 1] };
    w.iter()
        .map(|&v| {
            if v.abs() <= threshold && zeroed < cut {
                zeroed += 1;
                0.0
            } else {
                v
            }
        })
        .collect()
}

/// A pruned layer: its CSR weight, and for a stride-1 convolution the direct form.
struct Sparse {
    csr: CsrMatrix,
    conv: Option<SparseConv>,
}

/// The GEMM input of a layer: a convolution's im2col rows (written into `cols`), else `x`.
fn lower<'a>(
    x: &'a [f32],
    batch: usize,
    conv: Option<&ConvGeometry>,
    cols: &'a mut [f32],
) -> &'a [f32] {
    match conv {
        Some(g) => {
            im2col_nhwc(x, batch, g, 0.0, cols, g.patch_len());
            cols
        }
        None => x,
    }
}

/// Samples per second of `f` (which processes `batch` samples), after a warm-up call, over
/// at least `min_seconds` and three calls.
fn throughput(batch: usize, min_seconds: f64, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut calls = 0usize;
    while calls < 3 || start.elapsed().as_secs_f64() < min_seconds {
        f();
        calls += 1;
    }
    (batch * calls) as f64 / start.elapsed().as_secs_f64()
}

pub fn run(quick: bool, threads: Option<usize>) -> Result<BenchReport> {
    let (repeats, min_seconds) = if quick { (2, 0.05) } else { (5, 0.3) };
    let mlp = mlp();
    let teacher = NetworkSpec::teacher_cnn().without_batch_norm();
    let mut results = Vec::new();
    for (index, layer) in layers(&teacher).into_iter().chain(layers(&mlp)).enumerate() {
        let (n, k) = (layer.n, layer.k);
        let w = values(n * k, 2 * index as u64 + 1);
        let bias = values(n, 7);
        let dense = PackedF32::new(&w, n, k);
        let sparse: Vec<(f64, Sparse)> = SPARSITIES
            .iter()
            .map(|&s| {
                let csr = CsrMatrix::from_dense(&prune(&w, s), n, k);
                let conv = layer.conv.and_then(|g| SparseConv::new(&csr, g));
                (s, Sparse { csr, conv })
            })
            .collect();
        for batch in BATCHES {
            let m = batch * layer.pixels;
            // A convolution's input is the NHWC images; a linear layer's, its rows.
            let input_len = layer.conv.map_or(m * k, |g| batch * g.image_len());
            let x = values(input_len, 2 * index as u64 + 2);
            let mut cols = vec![0.0f32; if layer.conv.is_some() { m * k } else { 0 }];
            let mut out = vec![0.0f32; m * n];
            let mut dense_runs = Vec::new();
            let mut sparse_runs = vec![Vec::new(); sparse.len()];
            for _ in 0..repeats {
                dense_runs.push(throughput(batch, min_seconds, || {
                    let a = lower(black_box(&x), batch, layer.conv.as_ref(), &mut cols);
                    sgemm_packed(a, m, &dense, &bias, true, &mut out);
                }));
                for ((_, sparse), runs) in sparse.iter().zip(&mut sparse_runs) {
                    runs.push(throughput(batch, min_seconds, || {
                        if let Some(conv) = &sparse.conv {
                            sparse_conv_nhwc(black_box(&x), batch, conv, &bias, true, &mut out);
                        } else {
                            let a = lower(black_box(&x), batch, layer.conv.as_ref(), &mut cols);
                            csr_gemm_bias(a, m, &sparse.csr, &bias, true, &mut out);
                        }
                    }));
                }
            }
            let peer = Measurement {
                engine: PEER.into(),
                samples_per_second: median(&mut dense_runs),
            };
            for ((sparsity, Sparse { csr, .. }), mut runs) in sparse.iter().zip(sparse_runs) {
                let case = format!(
                    "{} {m}x{n}x{k} batch {batch} sparsity {:.0}%",
                    layer.name,
                    sparsity * 100.0
                );
                let ours = Measurement {
                    engine: OURS.into(),
                    samples_per_second: median(&mut runs),
                };
                let result = CaseResult::new(case, ours, peer.clone());
                eprintln!(
                    "{}: {:.2}x, csr_pays_off = {}",
                    result.case,
                    result.ratio,
                    runtime::csr_pays_off(n, k, csr.nnz())
                );
                results.push(result);
            }
        }
    }
    let machine = match threads {
        Some(t) => format!("{}, {t} threads", peer::machine()),
        None => peer::machine(),
    };
    Ok(BenchReport::new("sparse", machine, results))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_the_deployed_gemm_shapes() {
        let shapes: Vec<(usize, usize, usize)> =
            layers(&NetworkSpec::teacher_cnn().without_batch_norm())
                .iter()
                .map(|l| (l.pixels, l.n, l.k))
                .collect();
        assert_eq!(
            shapes,
            [(676, 32, 9), (121, 64, 288), (1, 128, 1600), (1, 10, 128)]
        );
        let mlp: Vec<(usize, usize)> = layers(&super::mlp()).iter().map(|l| (l.n, l.k)).collect();
        assert_eq!(mlp, [(512, 784), (512, 512), (10, 512)]);
    }

    #[test]
    fn pruning_zeroes_the_requested_fraction() {
        let w = values(1000, 3);
        for s in SPARSITIES {
            let zeros = prune(&w, s).iter().filter(|&&v| v == 0.0).count();
            assert_eq!(zeros, (1000.0 * s) as usize);
        }
    }
}
