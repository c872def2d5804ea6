//! Trains a graph preset (`resnet` or `mobilenet`) on MNIST with `GraphNetwork`: Adam with
//! a cosine schedule from 3e-3, batch 128, the teacher's recipe; prints the test accuracy,
//! the training time and the throughput.
//!
//! ```sh
//! cargo run --release -p models --example train_graph -- resnet 5 [DATA_DIR]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mnist_data::{Batcher, Dataset, Normalization};
use models::data::ToTensors;
use models::{GraphNetwork, GraphSpec};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind};

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
    Ok(())
}
