//! The experiment's stages. Each one trains or converts models and returns report rows.

mod baseline;
mod distillation;
mod pipeline;
mod precision;
mod pruning;
mod quantization;

use std::fmt;
use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;
use mnist_data::{Dataset, Normalization};

use crate::cli::Args;
use crate::device::RunDevice;
use crate::progress::Progress;
use crate::report::Row;
use crate::train::DeviceSplit;

/// A stage of the experiment, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Stage {
    /// Train the float32 teacher on the full training set.
    Baseline,
    /// Train the teacher under float32 and under the device's mixed-precision policy.
    Precision,
    /// Train a small student from scratch and from the teacher's softened logits.
    Distillation,
    /// Deploy the teacher (and the student) as float16, dynamic, static and QAT int8.
    Quantization,
    /// Fine-tune the teacher while pruning it to 50, 75, 90% and 2:4 sparsity.
    Pruning,
    /// Distil a student, prune it to `--sparsity`, fine-tune it quantization-aware with its
    /// zeros kept, and ship it as a sparse int8 artifact.
    Pipeline,
}

impl Stage {
    pub fn all() -> Vec<Self> {
        Self::value_variants().to_vec()
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Precision => "precision",
            Self::Distillation => "distillation",
            Self::Quantization => "quantization",
            Self::Pruning => "pruning",
            Self::Pipeline => "pipeline",
        }
    }

    /// The stages whose output files this one loads (when they are there, for optional
    /// ones: quantization also quantizes the distilled student if there is one, precision
    /// takes the baseline's float32 run if there is one).
    pub fn inputs(self) -> &'static [Stage] {
        match self {
            Self::Baseline => &[],
            Self::Precision | Self::Distillation | Self::Pruning | Self::Pipeline => {
                &[Self::Baseline]
            }
            Self::Quantization => &[Self::Baseline, Self::Distillation],
        }
    }

    /// The options this stage's results depend on, besides the seed, `--quick`, the device,
    /// the threads and the data (which every stage depends on).
    pub fn settings(self, args: &Args) -> serde_json::Value {
        match self {
            Self::Baseline | Self::Pruning => serde_json::json!({}),
            Self::Precision => serde_json::json!({"initial_loss_scale": args.initial_loss_scale}),
            Self::Distillation => serde_json::json!({
                "temperature": args.temperature.get(),
                "alpha": args.alpha.get(),
            }),
            Self::Quantization => serde_json::json!({
                "calibrator": args.calibrator.name(),
                "percentile": args.percentile,
            }),
            Self::Pipeline => serde_json::json!({
                "sparsity": args.sparsity,
                "temperature": args.temperature.get(),
                "alpha": args.alpha.get(),
            }),
        }
    }

    pub fn run(self, ctx: &Context) -> Result<Vec<Row>> {
        match self {
            Self::Baseline => baseline::run(ctx),
            Self::Precision => precision::run(ctx),
            Self::Distillation => distillation::run(ctx),
            Self::Quantization => quantization::run(ctx),
            Self::Pruning => pruning::run(ctx),
            Self::Pipeline => pipeline::run(ctx),
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What every stage gets: the options, the device, the data and where to write.
#[derive(Debug)]
pub struct Context<'a> {
    pub args: &'a Args,
    pub device: RunDevice,
    pub progress: Progress,
    pub out: PathBuf,
    pub dataset: Dataset,
    pub normalization: Normalization,
    /// The full test set on the device: every accuracy in the report is measured on it.
    pub test: DeviceSplit,
}
