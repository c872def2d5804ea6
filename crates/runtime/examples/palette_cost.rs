//! What the palette schemes cost and save on one clustered linear layer: stored bytes, load
//! time (`Model::from_bytes`, median of several loads) and how the layer runs, against the
//! same weights stored as f32 (dense) or CSR (pruned):
//!
//! ```text
//! cargo run --release -p runtime --example palette_cost -- [OUT IN] [--loads N]
//! ```
//!
//! The layer is `OUT x IN` (default 400 x 512: 204,800 weights) with 16 clusters per tensor,
//! dense and pruned to 90 % at random (seeded).

use std::process::ExitCode;
use std::time::Instant;

use model_spec::{LayerSpec, NetworkSpec};
use runtime::{ArtifactBuilder, Granularity, Model, Storage};

/// A small deterministic generator (xorshift64*), uniform in [0, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn network(out: usize, inputs: usize) -> NetworkSpec {
    NetworkSpec {
        name: "palette_cost".into(),
        input: [1, 1, inputs],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: inputs,
                out_features: out,
            },
        ],
    }
}

/// The artifact's bytes and the median time of `loads` loads, in milliseconds.
fn measure(
    spec: &NetworkSpec,
    weights: &[f32],
    storage: Storage,
    loads: usize,
) -> Result<(Vec<u8>, f64, Model), runtime::Error> {
    let out = spec.layers[1].weight_shape().map_or(0, |(_, out)| out);
    let mut builder = ArtifactBuilder::new(spec.clone());
    builder.add_layer(1, weights, &vec![0.0; out], storage)?;
    let bytes = builder.to_bytes()?;
    let mut times = Vec::with_capacity(loads);
    let mut model = Model::from_bytes(&bytes)?;
    for _ in 0..loads {
        let start = Instant::now();
        model = Model::from_bytes(&bytes)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((bytes, times[times.len() / 2], model))
}

/// The bytes of the weight's tensors (`1.weight` and `1.weight.*`): their total, then each.
fn weight_tensors(bytes: &[u8]) -> String {
    let Ok((_, metadata)) = safetensors::SafeTensors::read_metadata(bytes) else {
        return "?".into();
    };
    let mut parts: Vec<(String, usize)> = metadata
        .tensors()
        .into_iter()
        .filter(|(name, _)| name.starts_with("1.weight"))
        .map(|(name, info)| (name, info.data_offsets.1 - info.data_offsets.0))
        .collect();
    parts.sort();
    let total: usize = parts.iter().map(|(_, n)| n).sum();
    if parts.len() == 1 {
        return total.to_string();
    }
    let each: Vec<String> = parts
        .iter()
        .map(|(name, n)| format!("{} {n}", name.trim_start_matches("1.weight.")))
        .collect();
    format!("{total} ({})", each.join(", "))
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut dims = Vec::new();
    let mut loads = 21;
    while let Some(arg) = args.next() {
        if arg == "--loads" {
            match args.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => loads = n,
                _ => {
                    eprintln!("--loads needs a positive number");
                    return ExitCode::FAILURE;
                }
            }
        } else if let Ok(d) = arg.parse::<usize>() {
            dims.push(d);
        } else {
            eprintln!("usage: palette_cost [OUT IN] [--loads N]");
            return ExitCode::FAILURE;
        }
    }
    let (out, inputs) = match dims[..] {
        [] => (400, 512),
        [out, inputs] if out > 0 && inputs > 0 => (out, inputs),
        _ => {
            eprintln!("usage: palette_cost [OUT IN] [--loads N]");
            return ExitCode::FAILURE;
        }
    };
    let spec = network(out, inputs);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let centroids: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 64.0).collect();
    let dense: Vec<f32> = (0..out * inputs)
        .map(|_| centroids[(rng.next() * 16.0) as usize])
        .collect();
    let pruned: Vec<f32> = dense
        .iter()
        .map(|&w| if rng.next() < 0.1 { w } else { 0.0 })
        .collect();
    println!(
        "linear {out} x {inputs} ({} weights), 16 clusters per tensor; median of {loads} loads",
        out * inputs
    );
    println!("| weights | scheme | weight tensors (bytes) | file bytes | load ms | runs as |");
    println!("|---|---|---|---:|---:|---|");
    let cases = [
        ("dense", &dense, Storage::F32),
        ("dense", &dense, Storage::Palette(Granularity::PerTensor)),
        ("90% pruned", &pruned, Storage::Csr),
        (
            "90% pruned",
            &pruned,
            Storage::Palette(Granularity::PerTensor),
        ),
    ];
    for (what, weights, storage) in cases {
        match measure(&spec, weights, storage, loads) {
            Ok((bytes, ms, model)) => {
                let scheme = model
                    .weight_scheme(1)
                    .map_or_else(String::new, ToString::to_string);
                println!(
                    "| {what} | {scheme} | {} | {} | {ms:.2} | {:?} |",
                    weight_tensors(&bytes),
                    bytes.len(),
                    model.execution()[0].1
                );
            }
            Err(e) => {
                eprintln!("{what}, {storage:?}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
