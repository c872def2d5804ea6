//! Trains a graph preset (`resnet` or `mobilenet`) on MNIST with `GraphNetwork`: Adam with
//! a cosine schedule from 3e-3, batch 128, the teacher's recipe; prints the test accuracy,
//! the training time and the throughput. Then deploys it: f32, dynamic-range int8 and
//! full-integer int8 artifacts (calibrated on training images), each scored on the test set
//! by the pure-Rust runtime and timed against LibTorch running the trained network, batch 1
//! and 256, alternated over five rounds (medians).
//!
//! ```sh
//! cargo run --release -p models --example train_graph -- resnet 5 [DATA_DIR]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mnist_data::{Batcher, Dataset, Normalization};
use models::data::{SplitTensors, ToTensors};
use models::export::{self, WeightFormat};
use models::{Calibrator, GraphNetwork, GraphSpec};
use quantization::{BitWidth, Method};
use runtime::Model;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const BATCH: usize = 128;
const LEARNING_RATE: f64 = 3e-3;
const SEED: u64 = 42;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    const USAGE: &str = "usage: train_graph resnet|mobilenet EPOCHS [DATA_DIR]";
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("Trains a graph preset on MNIST and prints its test accuracy.\n{USAGE}");
        return Ok(());
    }
    let (spec, epochs, data_dir) = match args.as_slice() {
        [preset, epochs, rest @ ..] if rest.len() <= 1 => {
            let spec = match preset.as_str() {
                "resnet" => GraphSpec::resnet(),
                "mobilenet" => GraphSpec::mobilenet(),
                other => bail!("unknown preset `{other}`: resnet or mobilenet"),
            };
            let epochs: usize = epochs
                .parse()
                .with_context(|| format!("epochs `{epochs}` is not a number"))?;
            let dir = rest.first().map_or("datasets/mnist", String::as_str);
            (spec, epochs, PathBuf::from(dir))
        }
        _ => bail!("{USAGE}"),
    };
    let dataset = Dataset::load(&data_dir)
        .with_context(|| format!("loading MNIST from {}", data_dir.display()))?;
    let norm = Normalization::default();
    let train = dataset.train.to_tensors(norm, Device::Cpu)?;
    let test = dataset.test.to_tensors(norm, Device::Cpu)?;

    tch::manual_seed(SEED as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = GraphNetwork::new(&vs.root(), &spec)?;
    println!(
        "{}: {} parameters, {} multiply-adds per image",
        spec.name,
        net.param_count(),
        spec.multiply_adds().unwrap_or(0)
    );
    let mut opt = nn::Adam::default().build(&vs, LEARNING_RATE)?;
    let batcher = Batcher::new(train.len(), BATCH, SEED)?;
    let steps = epochs * train.len().div_ceil(BATCH);
    let started = Instant::now();
    let mut step = 0;
    for epoch in 0..epochs {
        for indices in batcher.epoch(epoch as u64) {
            let cosine = 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / steps as f64).cos());
            opt.set_lr(LEARNING_RATE * cosine);
            let batch = train.batch(&indices)?;
            let loss = net
                .f_forward_t(&batch.images, true)?
                .cross_entropy_for_logits(&batch.labels);
            opt.backward_step(&loss);
            step += 1;
        }
        println!(
            "epoch {}/{epochs}: {:.0} s",
            epoch + 1,
            started.elapsed().as_secs_f64()
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    let correct = tch::no_grad(|| -> Result<i64> {
        let mut correct = 0;
        for start in (0..test.len()).step_by(1000) {
            let end = (start + 1000).min(test.len());
            let indices: Vec<usize> = (start..end).collect();
            let batch = test.batch(&indices)?;
            let predicted = net.f_forward_t(&batch.images, false)?.argmax(-1, false);
            correct += predicted
                .eq_tensor(&batch.labels)
                .sum(Kind::Int64)
                .int64_value(&[]);
        }
        Ok(correct)
    })?;
    println!(
        "test accuracy {:.2}%, {seconds:.0} s of training, {:.0} images/s",
        correct as f64 / test.len() as f64 * 100.0,
        (steps * BATCH).min(epochs * train.len()) as f64 / seconds
    );
    deploy(&spec, &vs, &net, &train, &test)
}

/// Training images the full-integer artifact's activation ranges are calibrated on.
const CALIBRATION_IMAGES: usize = 2048;
/// Rounds of the speed comparison, each engine in turn.
const ROUNDS: usize = 5;

/// The trained network deployed three ways, each scored and timed against LibTorch.
fn deploy(
    spec: &GraphSpec,
    vs: &nn::VarStore,
    net: &GraphNetwork,
    train: &SplitTensors,
    test: &SplitTensors,
) -> Result<()> {
    let mut calibrator = Calibrator::new();
    for start in (0..CALIBRATION_IMAGES).step_by(256) {
        let indices: Vec<usize> = (start..start + 256).collect();
        net.calibrate(&train.batch(&indices)?.images, &mut calibrator)?;
    }
    let ranges = calibrator.into_qparams(Method::default(), BitWidth::INT8)?;
    let deployed = spec.without_batch_norm();
    let mut full = export::graph_artifact(net, vs, WeightFormat::Int8DynamicRange)?;
    for (name, q) in ranges {
        let index = deployed
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("calibrated node `{name}` is not deployed"))?;
        full.set_input_quantization(index, q);
    }
    let artifacts = [
        ("f32", export::graph_artifact(net, vs, WeightFormat::F32)?),
        (
            "int8 dynamic range",
            export::graph_artifact(net, vs, WeightFormat::Int8DynamicRange)?,
        ),
        ("int8 full integer", full),
    ];

    // The test set as the runtime takes it, in batches of 256.
    let images = Vec::<f32>::try_from(test.images.flatten(0, -1))?;
    let labels: Vec<u8> = Vec::<i64>::try_from(&test.labels)?
        .into_iter()
        .map(|l| l as u8)
        .collect();
    let per_image = images.len() / labels.len();
    let [c, h, w] = spec.input;
    let batches: Vec<(ndarray::Array4<f32>, &[u8])> = labels
        .chunks(256)
        .enumerate()
        .map(|(i, l)| {
            let x = &images[i * 256 * per_image..][..l.len() * per_image];
            let x = ndarray::Array4::from_shape_vec((l.len(), c, h, w), x.to_vec())
                .expect("the test images have the network's input shape");
            (x, l)
        })
        .collect();
    let one = batches[0].0.slice(ndarray::s![0..1, .., .., ..]).to_owned();
    let full_batch = batches[0].0.clone();
    let (torch_one, torch_batch) = (test.images.narrow(0, 0, 1), test.images.narrow(0, 0, 256));

    println!(
        "\n| artifact | runtime accuracy | bytes | batch 1, runtime / LibTorch | batch 256, runtime / LibTorch |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (name, builder) in artifacts {
        let bytes = builder.to_bytes()?;
        let model = Model::from_bytes(&bytes)?;
        let score = model.score(batches.iter().map(|(x, l)| (x.view(), *l)))?;
        let mut ours = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        for _ in 0..ROUNDS {
            ours.0[0].push(seconds_per_call(200, || {
                model.run(one.view()).map(drop).map_err(Into::into)
            })?);
            ours.1[0].push(seconds_per_call(200, || forward(net, &torch_one))?);
            ours.0[1].push(seconds_per_call(10, || {
                model.run(full_batch.view()).map(drop).map_err(Into::into)
            })?);
            ours.1[1].push(seconds_per_call(10, || forward(net, &torch_batch))?);
        }
        let [ours_one, ours_batch] = ours.0.map(median);
        let [torch_one_s, torch_batch_s] = ours.1.map(median);
        println!(
            "| {name} | {:.2}% | {} | {:.0} / {:.0} us ({:.2}x) | {:.0} / {:.0} img/s ({:.2}x) |",
            score.accuracy() * 100.0,
            bytes.len(),
            ours_one * 1e6,
            torch_one_s * 1e6,
            torch_one_s / ours_one,
            256.0 / ours_batch,
            256.0 / torch_batch_s,
            torch_batch_s / ours_batch,
        );
        if name == "int8 full integer" {
            println!("execution: {:?}", model.execution());
        }
    }
    Ok(())
}

fn forward(net: &GraphNetwork, xs: &Tensor) -> Result<()> {
    tch::no_grad(|| net.f_forward_t(xs, false)).map(drop)?;
    Ok(())
}

/// Mean seconds per call over `calls` calls, after one untimed call.
fn seconds_per_call(calls: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let start = Instant::now();
    for _ in 0..calls {
        f()?;
    }
    Ok(start.elapsed().as_secs_f64() / calls as f64)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
