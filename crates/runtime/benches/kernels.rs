//! Kernel throughput on the shapes of the toolkit's models: the MLP 784-512-512-10 and the
//! teacher CNN (its convolutions as im2col GEMMs), at batch 1 and 256, and the direct
//! convolutions of the `mobilenet` preset. Criterion reports
//! `elements/s` with `2 * m * n * k` elements per iteration, i.e. FLOP/s (OP/s for int8).
//!
//! `cargo bench -p runtime --bench kernels -- int8/avx512` runs one group; the settings are
//! short (10 samples, 1 s) so that the whole file takes a few minutes.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use model_spec::NetworkSpec;
use runtime::kernels::{
    CsrMatrix, Grouped, GroupedEpilogue, Isa, PackedF32, PackedI8, U8Matrix, csr_gemm_bias,
    grouped_conv_f32, grouped_conv_int8, int8_gemm_f32, padded_k, sgemm_packed,
};
use runtime::{ArtifactBuilder, Granularity, Model, QParams, Storage};

/// `(name, m per sample, n, k)`: GEMM shapes per sample of the batch.
const SHAPES: [(&str, usize, usize, usize); 7] = [
    ("mlp_fc1", 1, 512, 784),
    ("mlp_fc2", 1, 512, 512),
    ("mlp_fc3", 1, 10, 512),
    ("cnn_conv1", 26 * 26, 32, 9),
    ("cnn_conv2", 11 * 11, 64, 288),
    ("cnn_fc1", 1, 128, 1600),
    ("cnn_fc2", 1, 10, 128),
];
const BATCHES: [usize; 2] = [1, 256];

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                / (1 << 24) as f32
                - 0.5
        })
        .collect()
}

fn kernels(c: &mut Criterion) {
    for (name, per_sample, n, k) in SHAPES {
        for batch in BATCHES {
            let m = per_sample * batch;
            let id = format!("{name}/b{batch}");
            let flops = 2 * (m * n * k) as u64;
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let bias = values(n, 3);
            let mut out = vec![0.0f32; m * n];

            let mut group = c.benchmark_group("f32");
            group.throughput(Throughput::Elements(flops));
            // Weights packed once, as the engine does at load time.
            let packed = PackedF32::new(&w, n, k);
            group.bench_function(BenchmarkId::new("sgemm", &id), |b| {
                b.iter(|| sgemm_packed(black_box(&x), m, &packed, &bias, true, &mut out))
            });
            group.finish();

            // 90 % of the weights pruned.
            let pruned: Vec<f32> = w
                .iter()
                .enumerate()
                .map(|(i, &v)| if i % 10 == 0 { v } else { 0.0 })
                .collect();
            let csr = CsrMatrix::from_dense(&pruned, n, k);
            let mut group = c.benchmark_group("csr90");
            // Dense-equivalent FLOP/s, so that the speed-up over sgemm reads directly.
            group.throughput(Throughput::Elements(flops));
            group.bench_function(BenchmarkId::new("csr", &id), |b| {
                b.iter(|| csr_gemm_bias(black_box(&x), m, &csr, &bias, true, &mut out))
            });
            group.finish();

            let lda = padded_k(k);
            let a: Vec<u8> = (0..m * lda).map(|i| (i * 37 % 251) as u8).collect();
            let wq: Vec<i8> = (0..n * k).map(|i| (i * 91 % 255) as i32 as i8).collect();
            let scales = vec![1e-3f32; n];
            let mut group = c.benchmark_group("int8");
            group.throughput(Throughput::Elements(flops));
            for isa in Isa::available() {
                let packed = PackedI8::new_for(isa, &wq, n, k, &[]).expect("available");
                let input = U8Matrix {
                    data: &a,
                    lda,
                    rows: m,
                    zero_point: 7,
                };
                group.bench_function(BenchmarkId::new(isa.name(), &id), |b| {
                    b.iter(|| {
                        int8_gemm_f32(black_box(&input), &packed, &scales, &bias, true, &mut out)
                    })
                });
            }
            group.finish();
        }
    }
}

/// The direct convolutions of the `mobilenet` preset, `(name, (in, out channels), side,
/// stride)`: its stem (one input channel, a reduction too short for the GEMM) and its
/// depthwise 3x3 convolutions, in f32 and full-integer int8, on 64 images.
fn direct(c: &mut Criterion) {
    const BATCH: usize = 64;
    for (name, (channels, out), side, stride) in [
        ("mobilenet_stem", (1, 16), 28, 1),
        ("mobilenet_dw0", (16, 16), 28, 2),
        ("mobilenet_dw1", (32, 32), 14, 1),
        ("mobilenet_dw3", (64, 64), 7, 1),
    ] {
        let shape = Grouped {
            channels,
            height: side,
            width: side,
            kernel: [3, 3],
            stride: [stride; 2],
            padding: [1, 1],
            out,
            groups: channels,
        };
        let taps = shape.taps();
        let ops = 2 * (BATCH * shape.out_len() * 9) as u64;
        let mut group = c.benchmark_group("direct");
        group.throughput(Throughput::Elements(ops));
        let x = values(BATCH * shape.image_len(), 1);
        let w = shape.pack(&values(out * 9, 2));
        let bias = values(out, 3);
        let mut y = vec![0.0f32; BATCH * shape.out_len()];
        group.bench_function(BenchmarkId::new("f32", name), |b| {
            b.iter(|| grouped_conv_f32(&shape, &taps, &x, BATCH, (&w, &bias), true, &mut y))
        });
        let xq: Vec<u8> = x.iter().map(|v| ((v + 0.5) * 255.0) as u8).collect();
        let wq: Vec<i8> = w.iter().map(|v| (v * 254.0) as i8).collect();
        let zeros = vec![0i32; out];
        let bias_q = vec![100i32; out];
        let multipliers = vec![1e-3f32; out];
        let mut yq = vec![0u8; BATCH * shape.out_len()];
        group.bench_function(BenchmarkId::new("int8", name), |b| {
            b.iter(|| {
                let epilogue = GroupedEpilogue::Requantize {
                    bias: &bias_q,
                    multipliers: &multipliers,
                    zero_point: 3,
                };
                grouped_conv_int8(
                    &shape,
                    &taps,
                    &xq,
                    128,
                    BATCH,
                    (&wq, &zeros),
                    epilogue,
                    true,
                    &mut [],
                    &mut yq,
                )
            })
        });
        group.finish();
    }
}

/// End to end: the teacher CNN in f32, dynamic int8 and static int8.
fn models(c: &mut Criterion) {
    let spec = NetworkSpec::teacher_cnn().without_batch_norm();
    let mut f32_artifact = ArtifactBuilder::new(spec.clone());
    let mut int8_artifact = ArtifactBuilder::new(spec.clone());
    let mut seed = 10;
    for (i, layer) in spec.layers.iter().enumerate() {
        let shape = match *layer {
            model_spec::LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => {
                vec![out_channels, in_channels, kernel, kernel]
            }
            model_spec::LayerSpec::Linear {
                in_features,
                out_features,
            } => vec![out_features, in_features],
            _ => continue,
        };
        seed += 1;
        let w: Vec<f32> = values(shape.iter().product(), seed)
            .iter()
            .map(|v| v * 0.2)
            .collect();
        let bias = values(shape[0], seed + 100);
        let (wn, bn) = (format!("{i}.weight"), format!("{i}.bias"));
        f32_artifact
            .add(&wn, &w, &shape, Storage::F32)
            .unwrap()
            .add(&bn, &bias, &shape[..1], Storage::F32)
            .unwrap();
        int8_artifact
            .add(&wn, &w, &shape, Storage::Int8(Granularity::PerChannel))
            .unwrap()
            .add(&bn, &bias, &shape[..1], Storage::F32)
            .unwrap();
    }
    let mut static_artifact = int8_artifact.clone();
    for layer in [0, 3, 8, 11] {
        // Rough ranges; the benchmark measures speed, not accuracy.
        static_artifact.set_input_quantization(layer, QParams::u8(4.0 / 255.0, 64));
    }
    let variants = [
        ("f32", f32_artifact),
        ("int8_dynamic", int8_artifact),
        ("int8_static", static_artifact),
    ];
    let mut group = c.benchmark_group("teacher_cnn");
    for (name, artifact) in &variants {
        let model = Model::from_bytes(&artifact.to_bytes().unwrap()).unwrap();
        for batch in BATCHES {
            let x = ndarray::Array4::from_shape_vec(
                (batch, 1, 28, 28),
                values(batch * 784, 5).iter().map(|v| v + 0.5).collect(),
            )
            .unwrap();
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(BenchmarkId::new(*name, format!("b{batch}")), |b| {
                b.iter(|| model.run(black_box(x.view())).unwrap())
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = kernels, direct, models
}
criterion_main!(benches);
