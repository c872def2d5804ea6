//! Serial against parallel f32 -> f16/bf16 conversion, to place
//! `tensor_precision::PARALLEL_THRESHOLD`: run `cargo bench -p tensor-precision --bench convert`
//! and read where the parallel path starts winning.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::{bf16, f16};
use std::hint::black_box;
use tensor_precision::{
    HalfFloat, f32_to_half_parallel, f32_to_half_serial, half_to_f32_parallel, half_to_f32_serial,
};

const SIZES: [usize; 8] = [
    1 << 12,
    1 << 14,
    1 << 16,
    1 << 17,
    1 << 18,
    1 << 20,
    1 << 22,
    1 << 24,
];

fn narrow<T: HalfFloat>(c: &mut Criterion, name: &str) {
    let mut group = c.benchmark_group(format!("f32_to_{name}"));
    for &n in &SIZES {
        let src: Vec<f32> = (0..n).map(|i| (i as f32 * 0.618).sin() * 1e3).collect();
        let mut dst = vec![T::default(); n];
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("serial", n), &n, |b, _| {
            b.iter(|| f32_to_half_serial(black_box(&src), black_box(&mut dst)).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("parallel", n), &n, |b, _| {
            b.iter(|| f32_to_half_parallel(black_box(&src), black_box(&mut dst)).unwrap())
        });
    }
    group.finish();
}

fn widen<T: HalfFloat>(c: &mut Criterion, name: &str) {
    let mut group = c.benchmark_group(format!("{name}_to_f32"));
    for &n in &SIZES {
        let wide: Vec<f32> = (0..n).map(|i| (i as f32 * 0.618).sin() * 1e3).collect();
        let mut src = vec![T::default(); n];
        f32_to_half_serial(&wide, &mut src).unwrap();
        let mut dst = vec![0.0f32; n];
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("serial", n), &n, |b, _| {
            b.iter(|| half_to_f32_serial(black_box(&src), black_box(&mut dst)).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("parallel", n), &n, |b, _| {
            b.iter(|| half_to_f32_parallel(black_box(&src), black_box(&mut dst)).unwrap())
        });
    }
    group.finish();
}

fn conversions(c: &mut Criterion) {
    narrow::<f16>(c, "f16");
    narrow::<bf16>(c, "bf16");
    widen::<f16>(c, "f16");
    widen::<bf16>(c, "bf16");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_millis(800));
    targets = conversions
}
criterion_main!(benches);
