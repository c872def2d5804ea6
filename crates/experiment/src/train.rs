//! Data on the device, the training loop and evaluation.

use std::time::Instant;

use anyhow::{Context, Result};
use mnist_data::{Batcher, Normalization, Split};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::progress::Progress;

/// Batch size for evaluation and for the inference-speed figure of the report.
pub const INFER_BATCH: usize = 256;
/// Steps between progress updates (each one reads values back from the device).
const PROGRESS_EVERY: usize = 20;

/// Images (N, 1, H, W), normalised, and labels (N) as int64, on a device.
#[derive(Debug)]
pub struct DeviceSplit {
    pub images: Tensor,
    pub labels: Tensor,
}

impl DeviceSplit {
    pub fn new(split: &Split, norm: Normalization, device: Device) -> Result<Self> {
        let images = split.normalized(norm);
        let shape: Vec<i64> = images.shape().iter().map(|&d| d as i64).collect();
        let flat = images
            .as_slice()
            .context("normalised images are in standard layout")?;
        let images = Tensor::from_slice(flat).view(shape.as_slice()).to(device);
        let labels = Tensor::from_slice(
            split
                .labels
                .as_slice()
                .context("labels are in standard layout")?,
        )
        .to_kind(Kind::Int64)
        .to(device);
        Ok(Self { images, labels })
    }

    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }
}

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate of Adam; decays along a cosine to 1% of it by the last step.
    pub learning_rate: f64,
    pub seed: u64,
}

/// What a training run measured.
#[derive(Debug, Clone)]
pub struct TrainStats {
    pub seconds: f64,
    pub samples_per_second: f64,
    /// Mean training loss of each epoch.
    pub epoch_losses: Vec<f64>,
}

/// Trains `net` (its variables live in `vs`) with Adam and cross-entropy.
pub fn train(
    net: &impl ModuleT,
    vs: &nn::VarStore,
    data: &DeviceSplit,
    config: &TrainConfig,
    progress: &Progress,
    label: &str,
) -> Result<TrainStats> {
    let batcher = Batcher::new(data.len(), config.batch_size, config.seed)?;
    let mut optimizer = nn::Adam::default().build(vs, config.learning_rate)?;
    let total_steps = (config.epochs * batcher.batches_per_epoch()).max(1);
    let device = data.images.device();
    let mut step = 0;
    let mut samples = 0;
    let mut epoch_losses = Vec::with_capacity(config.epochs);
    let start = Instant::now();
    for epoch in 0..config.epochs {
        let batches = batcher.epoch(epoch as u64);
        let mut bar = progress.epoch(label, epoch, config.epochs, batches.len());
        let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
        let mut correct = Tensor::zeros([], (Kind::Int64, device));
        let mut seen = 0;
        for (i, batch) in batches.iter().enumerate() {
            let progress_fraction = step as f64 / total_steps as f64;
            let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress_fraction).cos());
            optimizer.set_lr(config.learning_rate * (0.01 + 0.99 * cosine));
            let index: Vec<i64> = batch.iter().map(|&i| i as i64).collect();
            let index = Tensor::from_slice(&index).to(device);
            let xs = data.images.index_select(0, &index);
            let ys = data.labels.index_select(0, &index);
            let logits = net.forward_t(&xs, true);
            let loss = logits.cross_entropy_for_logits(&ys);
            optimizer.backward_step(&loss);
            tch::no_grad(|| {
                loss_sum += loss.detach() * batch.len() as f64;
                correct += logits.argmax(-1, false).eq_tensor(&ys).sum(Kind::Int64);
            });
            seen += batch.len();
            samples += batch.len();
            step += 1;
            if (i + 1) % PROGRESS_EVERY == 0 || i + 1 == batches.len() {
                let loss = loss_sum.double_value(&[]) / seen as f64;
                let accuracy = correct.int64_value(&[]) as f64 / seen as f64;
                let rate = samples as f64 / start.elapsed().as_secs_f64();
                bar.update(i + 1, loss, accuracy, rate);
            }
        }
        let loss = loss_sum.double_value(&[]) / seen.max(1) as f64;
        let accuracy = correct.int64_value(&[]) as f64 / seen.max(1) as f64;
        bar.finish(&format!(
            "loss {loss:.4}, train accuracy {:.2}%",
            accuracy * 100.0
        ));
        epoch_losses.push(loss);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(TrainStats {
        seconds,
        samples_per_second: samples as f64 / seconds,
        epoch_losses,
    })
}

/// Accuracy on a split and the inference throughput, batch [`INFER_BATCH`], eval mode.
#[derive(Debug, Clone, Copy)]
pub struct Evaluation {
    pub accuracy: f64,
    pub samples_per_second: f64,
}

pub fn evaluate(net: &impl ModuleT, data: &DeviceSplit) -> Evaluation {
    tch::no_grad(|| {
        let n = data.len() as i64;
        let batch = INFER_BATCH as i64;
        // One warm-up batch: first calls allocate and pick kernels.
        let _ = net.forward_t(&data.images.narrow(0, 0, batch.min(n)), false);
        let mut correct = Tensor::zeros([], (Kind::Int64, data.images.device()));
        let start = Instant::now();
        let mut offset = 0;
        while offset < n {
            let len = batch.min(n - offset);
            let logits = net.forward_t(&data.images.narrow(0, offset, len), false);
            correct += logits
                .argmax(-1, false)
                .eq_tensor(&data.labels.narrow(0, offset, len))
                .sum(Kind::Int64);
            offset += len;
        }
        let correct = correct.int64_value(&[]);
        let seconds = start.elapsed().as_secs_f64();
        Evaluation {
            accuracy: correct as f64 / n.max(1) as f64,
            samples_per_second: n as f64 / seconds,
        }
    })
}
