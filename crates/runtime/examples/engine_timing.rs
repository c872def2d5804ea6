//! Engine throughput on the toolkit's two benchmark models with seeded weights, no peers:
//! a quick loop for engine work (`cargo run --release -p runtime --example engine_timing`).
//! The peer comparison is `cargo xtask bench runtime`.

use std::time::Instant;

use model_spec::{LayerSpec, NetworkSpec};
use ndarray::Array4;
use runtime::{ArtifactBuilder, Granularity, Model, QParams, Storage};

fn mlp() -> NetworkSpec {
    let linear = |i, o| LayerSpec::Linear {
        in_features: i,
        out_features: o,
    };
    NetworkSpec {
        name: "mlp".into(),
        input: [1, 28, 28],
        layers: vec![
            LayerSpec::Flatten,
            linear(784, 512),
            LayerSpec::Relu,
            linear(512, 512),
            LayerSpec::Relu,
            linear(512, 10),
        ],
    }
}

fn values(len: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let bits = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            (bits as f32 / (1 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

/// `int8`: int8 weights; `stat`: with calibrated input quantization on every layer too
/// (full-integer execution, u8 activations between layers).
fn model(spec: &NetworkSpec, int8: bool, stat: bool) -> Model {
    let mut first = true;
    let mut builder = ArtifactBuilder::new(spec.clone());
    for (i, layer) in spec.layers.iter().enumerate() {
        let shape = match *layer {
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => vec![out_channels, in_channels, kernel, kernel],
            LayerSpec::Linear {
                in_features,
                out_features,
            } => vec![out_features, in_features],
            _ => continue,
        };
        let len: usize = shape.iter().product();
        let w = values(len, i as u32, 2.0 / (len / shape[0]) as f32);
        let name = format!("{i}.weight");
        if int8 {
            builder
                .add(&name, &w, &shape, Storage::Int8(Granularity::PerChannel))
                .unwrap();
        } else {
            builder.add(&name, &w, &shape, Storage::F32).unwrap();
        }
        if stat {
            // The first layer sees the raw input, the others post-ReLU activations.
            let params = if first {
                QParams::u8(3.25 / 255.0, 33)
            } else {
                QParams::u8(0.02, 0)
            };
            builder.set_input_quantization(i, params);
        }
        first = false;
        builder
            .add(
                &format!("{i}.bias"),
                &values(shape[0], 7, 0.1),
                &shape[..1],
                Storage::F32,
            )
            .unwrap();
    }
    Model::from_bytes(&builder.to_bytes().unwrap()).unwrap()
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    // An optional filter, e.g. `cnn-f32-256`, matched against "<model>-<precision>-<batch>".
    let filter = std::env::args().nth(2).unwrap_or_default();
    // An optional fixed number of calls per case instead of a time: for counting cycles
    // with `perf stat`, which a busy machine does not distort the way it distorts time.
    let fixed_calls: Option<usize> = std::env::args().nth(3).and_then(|s| s.parse().ok());
    for spec in [
        mlp(),
        NetworkSpec::teacher_cnn().without_batch_norm(),
        NetworkSpec::student_cnn().without_batch_norm(),
        NetworkSpec::compact_cnn().without_batch_norm(),
    ] {
        for precision in ["f32", "int8", "static"] {
            let wanted =
                |batch: usize| format!("{}-{precision}-{batch}", spec.name).contains(&filter);
            if !wanted(1) && !wanted(256) {
                continue;
            }
            let m = model(&spec, precision != "f32", precision == "static");
            for batch in [1usize, 256] {
                if !wanted(batch) {
                    continue;
                }
                let x = Array4::from_shape_vec((batch, 1, 28, 28), values(batch * 784, 3, 2.0))
                    .unwrap();
                m.run(x.view()).unwrap();
                let start = Instant::now();
                let mut calls = 0;
                while match fixed_calls {
                    Some(n) => calls < n,
                    None => calls < 3 || start.elapsed().as_secs_f64() < seconds,
                } {
                    m.run(x.view()).unwrap();
                    calls += 1;
                }
                let rate = (batch * calls) as f64 / start.elapsed().as_secs_f64();
                println!(
                    "{:>12} {precision:>6} batch {batch:>3}: {rate:>9.0} samples/s",
                    spec.name,
                );
            }
        }
    }
}
