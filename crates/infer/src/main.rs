//! `infer`: scores an exported artifact on the MNIST test split with the pure-Rust runtime,
//! without LibTorch. `cargo run -p infer -- --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use mnist_data::{Dataset, NUM_CLASSES, Normalization, Split};
use model_spec::{InputLayout, InputNormalization};
use ndarray::Array4;
use runtime::{Execution, Model, Score};
use serde_json::json;

/// Runs an exported artifact (`.safetensors`, docs/FORMAT.md) on the MNIST test split with
/// the pure-Rust runtime, and prints its accuracy, its speed, its size and how each layer
/// executes.
#[derive(Debug, Parser)]
#[command(version, long_about = None)]
struct Args {
    /// The artifact to run.
    artifact: PathBuf,

    /// Folder with the MNIST-layout IDX files (gzip), checked against its SHA256SUMS when
    /// present; only the test split (`t10k-*`) is read [default: $TCH_MOT_MNIST_DIR, else
    /// datasets/mnist under the current folder].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Score only the first N test images (at least 1).
    #[arg(long, value_name = "N", value_parser = parse_at_least_one, allow_negative_numbers = true)]
    limit: Option<usize>,

    /// Images per call to the runtime (at least 1).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 256,
        value_parser = parse_at_least_one,
        allow_negative_numbers = true,
    )]
    batch: usize,

    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,

    /// Write the artifact as an ONNX model (QDQ for int8 layers) to this file, atomically,
    /// and exit without scoring.
    #[arg(long, value_name = "OUT.onnx")]
    export_onnx: Option<PathBuf>,
}

fn parse_at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{value}` is not a whole number of at least 1")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if let Some(out) = &args.export_onnx {
        onnx_export::export_file(&args.artifact, out).with_context(|| {
            format!(
                "exporting {} to ONNX at {}",
                args.artifact.display(),
                out.display()
            )
        })?;
        println!("wrote {}", out.display());
        return Ok(());
    }
    let size_bytes = std::fs::metadata(&args.artifact)
        .with_context(|| format!("cannot access the artifact {}", args.artifact.display()))?
        .len();
    let model = Model::load(&args.artifact).context("loading the artifact")?;
    let data_dir = mnist_data::data_dir(args.data_dir.as_deref())?;
    let mut test = Dataset::load_test(&data_dir)
        .with_context(|| format!("loading the test split from {}", data_dir.display()))?;
    if let Some(limit) = args.limit {
        let n = limit.min(test.len());
        test = test.select(&(0..n).collect::<Vec<_>>());
    }
    check_fit(&model, &test)?;
    let score = score(&model, &test, args.batch)?;

    // Index, kind, how the weight is stored, how the layer runs.
    let layers: Vec<(usize, String, String, String)> = model
        .execution()
        .iter()
        .map(|&(index, execution)| {
            let kind = layer_kind(&model, index);
            let stored = model
                .weight_scheme(index)
                .map_or_else(String::new, ToString::to_string);
            (index, kind, stored, describe(execution))
        })
        .collect();
    let accuracy = score.accuracy();
    let images_per_second = score.images_per_second();
    let (norm, source) = input_normalization(&model);
    if args.json {
        let layers: Vec<_> = layers
            .iter()
            .map(|(index, kind, stored, execution)| {
                json!({ "index": index, "layer": kind, "stored": stored, "execution": execution })
            })
            .collect();
        let report = json!({
            "artifact": args.artifact.display().to_string(),
            "network": model.graph().name,
            "size_bytes": size_bytes,
            "images": score.images,
            "correct": score.correct,
            "accuracy": accuracy,
            "batch": args.batch,
            "seconds": score.seconds,
            "images_per_second": images_per_second,
            "layers": layers,
            "input_normalization": {
                "raw_max": norm.raw_max,
                "mean": norm.mean,
                "std": norm.std,
                "source": source,
            },
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("artifact: {}", args.artifact.display());
        println!(
            "network:  {} ({} bytes, {:.1} KiB)",
            model.graph().name,
            size_bytes,
            size_bytes as f64 / 1024.0
        );
        println!(
            "input:    (pixel / {} - {:?}) / {:?}, {source}",
            norm.raw_max, norm.mean, norm.std
        );
        println!("layers:");
        for (index, kind, stored, execution) in &layers {
            if stored.is_empty() {
                // A sum or a concatenation: nothing stored.
                println!("  {index:>3}  {kind:<8} {execution}");
            } else {
                println!("  {index:>3}  {kind:<8} {execution}, stored as {stored}");
            }
        }
        println!(
            "accuracy: {:.2}% ({} of {} test images)",
            accuracy * 100.0,
            score.correct,
            score.images
        );
        println!(
            "speed:    {images_per_second:.0} images/s (batch {}, {:.3} s)",
            args.batch, score.seconds
        );
    }
    Ok(())
}

/// Fails unless the model takes the dataset's images and gives one score per digit class.
fn check_fit(model: &Model, test: &Split) -> Result<()> {
    let image = [1, test.rows(), test.cols()];
    if model.input_shape() != image {
        bail!(
            "{} takes inputs of shape {:?}, but the dataset's images are {:?}",
            model.file(),
            model.input_shape(),
            image
        );
    }
    if model.output_shape() != [NUM_CLASSES] {
        bail!(
            "{} gives outputs of shape {:?}, but scoring needs one score per class ([{}])",
            model.file(),
            model.output_shape(),
            NUM_CLASSES
        );
    }
    if test.is_empty() {
        bail!("the test split holds no images");
    }
    Ok(())
}

/// Accuracy and the time spent in the runtime, by the runtime's one rule ([`Model::score`]:
/// preparing the input is not timed, one batch runs first, untimed, to warm the buffers up).
fn score(model: &Model, test: &Split, batch: usize) -> Result<Score> {
    let norm = input_normalization(model).0;
    let indices: Vec<usize> = (0..test.len()).collect();
    let batches: Vec<Split> = indices.chunks(batch).map(|c| test.select(c)).collect();
    let plane = test.rows() * test.cols();
    let inputs = batches
        .iter()
        .map(|b| {
            let raw: Vec<u8> = b.images.iter().copied().collect();
            let x = norm.normalize_planes(&raw, 1, plane);
            Array4::from_shape_vec((b.len(), 1, test.rows(), test.cols()), x)
                .context("normalising the images")
        })
        .collect::<Result<Vec<_>>>()?;
    let labels: Vec<Vec<u8>> = batches.iter().map(|b| b.labels.to_vec()).collect();
    model
        .score(
            inputs
                .iter()
                .zip(&labels)
                .map(|(input, labels)| (input.view(), &labels[..])),
        )
        .context("running the model")
}

/// The normalisation the artifact records, or MNIST's for an artifact that records none
/// (format version 1), and where it came from.
fn input_normalization(model: &Model) -> (InputNormalization, &'static str) {
    match model.input_normalization() {
        Some(n) => (n.clone(), "recorded in the artifact"),
        None => {
            let mnist = Normalization::default();
            let n = InputNormalization {
                layout: InputLayout::Nchw,
                raw_max: 255.0,
                mean: vec![mnist.mean],
                std: vec![mnist.std],
            };
            (n, "MNIST's: the artifact records none")
        }
    }
}

/// The layer's kind as the network description names it (`conv2d`, `linear`), with the
/// node's name for a graph.
fn layer_kind(model: &Model, index: usize) -> String {
    let node = model.graph().nodes.get(index);
    let op = node.map_or("layer", |n| n.op.name());
    match (model.network(), node) {
        (None, Some(n)) => format!("{op} `{}`", n.name),
        _ => op.to_owned(),
    }
}

fn describe(execution: Execution) -> String {
    match execution {
        Execution::F32 => "f32 (dense)".into(),
        Execution::Csr { nnz } => format!("csr ({nnz} stored weights)"),
        Execution::Int8Dynamic => "int8, dynamic-range activations".into(),
        Execution::Int8Static { u8_output: true } => "int8, full integer (u8 output)".into(),
        Execution::Int8Static { u8_output: false } => "int8, full integer (f32 output)".into(),
    }
}
