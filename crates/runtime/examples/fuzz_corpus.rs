//! Writes the seed corpus of the `artifact_loader` fuzz target: small valid artifacts in
//! every storage scheme, so that the fuzzer starts from files that reach every decoder.
//!
//! ```text
//! cargo run -p runtime --example fuzz_corpus -- fuzz/corpus/artifact_loader
//! ```
//!
//! (`cargo xtask fuzz artifact_loader` runs it first.) The network is a conv2d, ReLU, max
//! pooling, flatten, dropout and linear layer; every file is written as `seed-<name>.safetensors`
//! (the same bytes every time), next to whatever the fuzzer has added to the folder. Seeds:
//! each scheme of [`Storage`] with per-channel and per-tensor parameters where it has them,
//! plain and with an `input` entry; the int8 ones also with `activations` (full-integer
//! layers); `int8_sparse` with non-zero zero points; and the palette schemes in every
//! variant: `palette` with 1- to 8-bit indices, `palette_sparse` with bitmask and with
//! Rice-coded positions. Graph artifacts (format version 3) add a graph with every operation
//! (grouped convolution, batch norm kept as vectors, residual sum, concatenation, every
//! activation, padded max and average pooling, global average pooling) in f32, f16 and
//! full-integer int8.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use model_spec::{GraphSpec, INPUT, InputNormalization, LayerSpec, NetworkSpec, Node, Op};
use runtime::{
    Artifact, ArtifactBuilder, Encoded, Granularity, PositionCode, QParams, Scheme, Storage,
};

/// A small deterministic generator (xorshift64*), uniform in [0, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Conv2d 1 -> 4 (3 x 3) on 1 x 8 x 8, ReLU, 2 x 2 max pooling, flatten, dropout, linear
/// 36 -> 5.
fn network() -> NetworkSpec {
    NetworkSpec {
        name: "seed".into(),
        input: [1, 8, 8],
        layers: vec![
            LayerSpec::Conv2d {
                in_channels: 1,
                out_channels: 4,
                kernel: 3,
                stride: 1,
                padding: 0,
            },
            LayerSpec::Relu,
            LayerSpec::MaxPool2d {
                kernel: 2,
                stride: 2,
            },
            LayerSpec::Flatten,
            LayerSpec::Dropout { p: 0.25 },
            LayerSpec::Linear {
                in_features: 36,
                out_features: 5,
            },
        ],
    }
}

/// The conv2d and linear layers: index, output channels, reduction length.
const LAYERS: [(usize, usize, usize); 2] = [(0, 4, 9), (5, 5, 36)];

/// How a seed's weights are drawn.
#[derive(Clone, Copy)]
enum Values {
    /// Uniform in [-1, 1).
    Real,
    /// A fraction of them (the first) zero, the rest uniform.
    Pruned(f32),
    /// One of `levels` values per output channel (its own per channel), a fraction zero.
    Clustered { levels: usize, zeros: f32 },
}

fn weights(rng: &mut Rng, values: Values, out: usize, k: usize) -> Vec<f32> {
    (0..out * k)
        .map(|i| {
            let u = rng.next();
            match values {
                Values::Real => 2.0 * u - 1.0,
                Values::Pruned(zeros) if rng.next() < zeros => 0.0,
                Values::Pruned(_) => 2.0 * u - 1.0,
                Values::Clustered { zeros, .. } if rng.next() < zeros => 0.0,
                Values::Clustered { levels, .. } => {
                    let level = (u * levels as f32) as usize;
                    (level as f32 + 1.0) / levels as f32 + (i / k) as f32 / 64.0
                }
            }
        })
        .collect()
}

/// One seed: the builder with every layer's weight drawn by `values` and stored in `storage`.
fn seed(values: Values, storage: Storage, salt: u64) -> Result<ArtifactBuilder, runtime::Error> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ salt);
    let mut builder = ArtifactBuilder::new(network());
    for (layer, out, k) in LAYERS {
        let w = weights(&mut rng, values, out, k);
        let bias: Vec<f32> = (0..out).map(|_| rng.next() - 0.5).collect();
        builder.add_layer(layer, &w, &bias, storage)?;
    }
    Ok(builder)
}

/// A seed: its name, its builder, and the test the scheme of each of its weights must pass.
type Seed = (String, ArtifactBuilder, fn(&Scheme) -> bool);

/// Every seed.
fn seeds() -> Result<Vec<Seed>, runtime::Error> {
    let mut out: Vec<Seed> = Vec::new();
    let per = [
        ("per-channel", Granularity::PerChannel),
        ("per-tensor", Granularity::PerTensor),
    ];
    out.push(("f32".into(), seed(Values::Real, Storage::F32, 1)?, |s| {
        *s == Scheme::F32
    }));
    out.push(("f16".into(), seed(Values::Real, Storage::F16, 2)?, |s| {
        *s == Scheme::F16
    }));
    out.push((
        "csr".into(),
        seed(Values::Pruned(0.8), Storage::Csr, 3)?,
        |s| matches!(s, Scheme::Csr { .. }),
    ));
    for (i, (label, g)) in per.into_iter().enumerate() {
        let salt = 10 * i as u64;
        out.push((
            format!("int8-{label}"),
            seed(Values::Real, Storage::Int8(g), salt + 4)?,
            |s| matches!(s, Scheme::Int8 { .. }),
        ));
        out.push((
            format!("int8_sparse-{label}"),
            seed(Values::Pruned(0.7), Storage::Int8Sparse(g), salt + 5)?,
            |s| matches!(s, Scheme::Int8Sparse { .. }),
        ));
        out.push((
            format!("palette-{label}"),
            seed(
                Values::Clustered {
                    levels: 5,
                    zeros: 0.0,
                },
                Storage::Palette(g),
                salt + 6,
            )?,
            |s| matches!(s, Scheme::Palette { .. }),
        ));
        out.push((
            format!("palette_sparse-bitmask-{label}"),
            seed(
                Values::Clustered {
                    levels: 6,
                    zeros: 0.4,
                },
                Storage::Palette(g),
                salt + 7,
            )?,
            |s| {
                matches!(
                    s,
                    Scheme::PaletteSparse {
                        positions: PositionCode::Bitmask,
                        ..
                    }
                )
            },
        ));
        out.push((
            format!("palette_sparse-rice-{label}"),
            seed(
                Values::Clustered {
                    levels: 3,
                    zeros: 0.9,
                },
                Storage::Palette(g),
                salt + 8,
            )?,
            |s| {
                matches!(
                    s,
                    Scheme::PaletteSparse {
                        positions: PositionCode::Rice { .. },
                        ..
                    }
                )
            },
        ));
    }
    out.push((
        "palette-1bit-per-channel".into(),
        seed(
            Values::Clustered {
                levels: 2,
                zeros: 0.0,
            },
            Storage::Palette(Granularity::PerChannel),
            30,
        )?,
        |s| matches!(s, Scheme::Palette { bits: 1, .. }),
    ));
    out.push((
        "palette_sparse-half-codebook".into(),
        seed(
            Values::Clustered {
                levels: 4,
                zeros: 0.8,
            },
            Storage::PaletteHalf(Granularity::PerTensor),
            33,
        )?,
        |s| matches!(s, Scheme::PaletteSparse { .. }),
    ));
    // Many distinct values: 6-bit indices for the convolution's 36 weights, 8-bit for the
    // linear layer's 150.
    let mut wide = ArtifactBuilder::new(network());
    let mut rng = Rng(31);
    for (layer, out, k) in LAYERS {
        let w: Vec<f32> = (0..out * k)
            .map(|i| (i % 150) as f32 / 150.0 + 0.5)
            .collect();
        let bias: Vec<f32> = (0..out).map(|_| rng.next()).collect();
        wide.add_layer(layer, &w, &bias, Storage::Palette(Granularity::PerTensor))?;
    }
    out.push(("palette-8bit-per-tensor".into(), wide, |s| {
        matches!(s, Scheme::Palette { bits: 6..=8, .. })
    }));
    // Int8 codes with non-zero per-tensor zero points, stored sparsely.
    let mut zero_points = ArtifactBuilder::new(network());
    let mut rng = Rng(32);
    for (layer, out, k) in LAYERS {
        let codes: Vec<i8> = (0..out * k)
            .map(|i| if i % 3 == 0 { (i % 200) as i8 } else { 3 })
            .collect();
        let bias: Vec<f32> = (0..out).map(|_| rng.next()).collect();
        zero_points
            .add_encoded(
                &runtime::weight_name(layer),
                &[out, k],
                Encoded::Int8 {
                    codes: &codes,
                    scales: &[0.01],
                    zero_points: &[3],
                    granularity: Granularity::PerTensor,
                    sparse: true,
                },
            )?
            .add(&runtime::bias_name(layer), &bias, &[out], Storage::F32)?;
    }
    out.push(("int8_sparse-zero-points".into(), zero_points, |s| {
        matches!(s, Scheme::Int8Sparse { .. })
    }));
    Ok(out)
}

/// A graph with every operation on 3 x 6 x 6 input.
fn graph() -> GraphSpec {
    let conv = |inp, out, groups| Op::Conv2d {
        in_channels: inp,
        out_channels: out,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        groups,
    };
    GraphSpec {
        name: "seed-graph".into(),
        input: [3, 6, 6],
        nodes: vec![
            Node::new("stem", conv(3, 4, 1), &[INPUT]),
            Node::new(
                "dw",
                Op::Conv2d {
                    in_channels: 4,
                    out_channels: 4,
                    kernel: [3, 1],
                    stride: [1, 1],
                    padding: [1, 0],
                    groups: 4,
                },
                &["stem"],
            ),
            Node::new("act", Op::Relu6, &["dw"]),
            Node::new("sum", Op::Add, &["act", "stem"]),
            Node::new(
                "bn",
                Op::BatchNorm2d {
                    features: 4,
                    eps: 1e-5,
                },
                &["sum"],
            ),
            Node::new("sig", Op::Sigmoid, &["bn"]),
            Node::new("tanh", Op::Tanh, &["sig"]),
            Node::new("gelu", Op::Gelu, &["tanh"]),
            Node::new("silu", Op::Silu, &["gelu"]),
            Node::new("hswish", Op::HardSwish, &["silu"]),
            Node::new(
                "max",
                Op::MaxPool2d {
                    kernel: [3, 3],
                    stride: [2, 2],
                    padding: [1, 1],
                },
                &["hswish"],
            ),
            Node::new(
                "avg",
                Op::AvgPool2d {
                    kernel: [2, 2],
                    stride: [2, 2],
                },
                &["stem"],
            ),
            Node::new("cat", Op::Concat, &["max", "avg"]),
            Node::new("relu", Op::Relu, &["cat"]),
            Node::new("gap", Op::GlobalAvgPool, &["relu"]),
            Node::new("drop", Op::Dropout { p: 0.1 }, &["gap"]),
            Node::new(
                "fc",
                Op::Linear {
                    in_features: 8,
                    out_features: 5,
                },
                &["drop"],
            ),
        ],
    }
}

/// The graph seeds: f32, f16, and int8 with every product full-integer.
fn graph_seeds() -> Result<Vec<(String, ArtifactBuilder)>, runtime::Error> {
    let spec = graph();
    let mut out = Vec::new();
    for (name, storage) in [
        ("f32", Storage::F32),
        ("f16", Storage::F16),
        ("int8-activations", Storage::Int8(Granularity::PerChannel)),
    ] {
        let mut rng = Rng(0x51ED_270B_0F1E_2D3C);
        let mut builder = ArtifactBuilder::for_graph(spec.clone());
        for (index, node) in spec.nodes.iter().enumerate() {
            if let Some((shape, out)) = node.op.weight_shape() {
                let w: Vec<f32> = (0..shape.iter().product::<usize>())
                    .map(|_| rng.next() - 0.5)
                    .collect();
                let bias: Vec<f32> = (0..out).map(|_| rng.next() - 0.5).collect();
                builder.add_layer(index, &w, &bias, storage)?;
                if name.starts_with("int8") {
                    builder.set_input_quantization(index, QParams::u8(0.02, 10));
                }
            }
        }
        let gamma: Vec<f32> = (0..4).map(|_| rng.next() + 0.5).collect();
        let var: Vec<f32> = (0..4).map(|_| rng.next() + 0.1).collect();
        builder.add_batch_norm(4, &gamma, &[0.1; 4], &[-0.2; 4], &var)?;
        out.push((format!("graph-{name}"), builder));
    }
    Ok(out)
}

fn write(folder: &Path) -> Result<usize, String> {
    std::fs::create_dir_all(folder).map_err(|e| format!("creating {}: {e}", folder.display()))?;
    let normalization =
        InputNormalization::new(255.0, vec![0.1307], vec![0.3081]).map_err(|e| e.to_string())?;
    let mut written = 0;
    let seeds = seeds().map_err(|e| e.to_string())?;
    for (name, builder, expected) in seeds {
        // Int8 weights, and palettes (quantized to int8 at load), run full-integer too.
        let int8 = name.starts_with("int8") || name.starts_with("palette");
        let mut variants = vec![(name.clone(), builder.clone())];
        let mut with_input = builder.clone();
        with_input.set_input_normalization(normalization.clone());
        variants.push((format!("{name}-input"), with_input));
        if int8 {
            let mut full = builder;
            full.set_input_quantization(0, QParams::u8(1.0 / 255.0, 0))
                .set_input_quantization(5, QParams::u8(0.05, 2));
            variants.push((format!("{name}-activations"), full));
        }
        for (file, builder) in variants {
            let bytes = builder.to_bytes().map_err(|e| format!("{file}: {e}"))?;
            // Every seed must load, with the scheme it is meant to exercise.
            let artifact = Artifact::from_bytes(&bytes).map_err(|e| format!("{file}: {e}"))?;
            for (layer, _, _) in LAYERS {
                let scheme = artifact
                    .layer(layer)
                    .map(|l| l.weight_scheme.clone())
                    .ok_or_else(|| format!("{file}: layer {layer} has no parameters"))?;
                if !expected(&scheme) {
                    return Err(format!("{file}: layer {layer} is stored as {scheme}"));
                }
            }
            runtime::Model::from_bytes(&bytes).map_err(|e| format!("{file}: {e}"))?;
            let path: PathBuf = folder.join(format!("seed-{file}.safetensors"));
            std::fs::write(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            written += 1;
        }
    }
    for (file, builder) in graph_seeds().map_err(|e| e.to_string())? {
        let bytes = builder.to_bytes().map_err(|e| format!("{file}: {e}"))?;
        let model = runtime::Model::from_bytes(&bytes).map_err(|e| format!("{file}: {e}"))?;
        Artifact::from_bytes(&bytes).map_err(|e| format!("{file}: {e}"))?;
        if model.execution().len() != 3 {
            return Err(format!("{file}: {:?}", model.execution()));
        }
        let path: PathBuf = folder.join(format!("seed-{file}.safetensors"));
        std::fs::write(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        written += 1;
    }
    Ok(written)
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(folder), None) = (args.next(), args.next()) else {
        eprintln!("usage: fuzz_corpus <FOLDER>");
        return ExitCode::FAILURE;
    };
    match write(Path::new(&folder)) {
        Ok(n) => {
            println!("{n} seed artifacts in {}", Path::new(&folder).display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fuzz_corpus: {e}");
            ExitCode::FAILURE
        }
    }
}
