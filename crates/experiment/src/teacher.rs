//! The teacher: the network every technique starts from (`--teacher`: the CNN by default, or
//! a graph preset). The baseline stage trains it and writes its files; the precision stage
//! retrains it under other policies with the same recipe; the other stages load it.

use anyhow::{Context as _, Result};
use models::Policy;
use serde::{Deserialize, Serialize};
use tch::nn;
use tensor_precision::GradientAudit;

use crate::architecture::{Architecture, Net};
use crate::context::{Context, RunFile};
use crate::deploy::{self, Deployed, RuntimeTest};
use crate::report::Row;
use crate::report::detail::{Detail, TrainingDetail};
use crate::stage::{Product, Stage};
use crate::train::{DeviceSplit, Evaluation, TrainConfig, TrainStats};

/// The teacher's trainable state (tch variables, batch norm unfolded).
pub const CHECKPOINT: Product = Product {
    stage: Stage::Baseline,
    file: "teacher_checkpoint.safetensors",
};
/// The teacher as deployed: the runtime's artifact format, batch norm folded.
pub const ARTIFACT: Product = Product {
    stage: Stage::Baseline,
    file: "teacher_float32.safetensors",
};
/// The float32 run (its row and the gradient-underflow audit of its steps), so that the
/// precision stage need not train the same teacher again.
pub const RUN: Product = Product {
    stage: Stage::Baseline,
    file: "teacher_float32_run.json",
};
/// Training steps whose float32 gradients the underflow audit reads, spread evenly over the
/// float32 run (the first step included).
pub const AUDIT_SAMPLES: usize = 8;
/// Epochs of a full run: enough for 99.2% test accuracy.
const EPOCHS: usize = 5;
/// Share of each class trained on in `--quick` mode.
const QUICK_FRACTION: f64 = 0.1;

/// The teacher's architecture, as the run chose it.
pub fn architecture(ctx: &Context) -> Architecture {
    ctx.teacher.architecture()
}

/// The teacher's training data on the device and its recipe, shared by every stage that
/// trains or fine-tunes the teacher: the full training set (a stratified tenth for one epoch
/// in `--quick` mode), Adam with a cosine schedule from 3e-3, batch 128.
pub fn training(ctx: &Context) -> Result<(DeviceSplit, TrainConfig)> {
    let subset;
    let (train_split, epochs) = if ctx.quick {
        subset = ctx
            .dataset
            .train
            .stratified_subset(QUICK_FRACTION, ctx.seed)?;
        (&subset, 1)
    } else {
        (&ctx.dataset.train, EPOCHS)
    };
    let config = TrainConfig {
        epochs,
        batch_size: 128,
        learning_rate: 3e-3,
        seed: ctx.seed,
    };
    let data = DeviceSplit::new(train_split, ctx.normalization, ctx.device.device)?;
    Ok((data, config))
}

/// The trained teacher, from the baseline's checkpoint (which the running stage must declare
/// among its inputs).
pub fn load(ctx: &Context) -> Result<(nn::VarStore, Net)> {
    let path = ctx.input(CHECKPOINT)?;
    let mut vs = nn::VarStore::new(ctx.device.device);
    let net = architecture(ctx).build(&vs.root(), Policy::Float32)?;
    vs.load(&path)
        .with_context(|| format!("loading the teacher from {}", path.display()))?;
    Ok((vs, net))
}

/// The parameters of a trained network and those that are not zero.
pub struct Counts {
    pub params: usize,
    pub nonzero: usize,
}

impl From<&Net> for Counts {
    fn from(net: &Net) -> Self {
        Self {
            params: net.param_count(),
            nonzero: net.nonzero_param_count(),
        }
    }
}

impl From<&models::Network> for Counts {
    fn from(net: &models::Network) -> Self {
        Self {
            params: net.param_count(),
            nonzero: net.nonzero_param_count(),
        }
    }
}

/// The row of one training run of model `model` evaluated by LibTorch: sizes of the trained
/// network, accuracy and speeds, the policy and the training curve.
pub fn run_row(
    stage: Stage,
    variant: impl std::fmt::Display,
    model: &str,
    counts: Counts,
    stats: &TrainStats,
    eval: Evaluation,
) -> Row {
    Row {
        stage: stage.name().into(),
        variant: variant.to_string(),
        model: model.to_owned(),
        params: Some(counts.params),
        nonzero_params: Some(counts.nonzero),
        test_accuracy: Some(eval.accuracy),
        train_seconds: Some(stats.seconds),
        train_samples_per_second: Some(stats.samples_per_second),
        infer_samples_per_second: Some(eval.samples_per_second),
        engine: Some("libtorch".into()),
        loss_curve: stats.loss_curve.clone(),
        detail: Detail::Training(TrainingDetail {
            policy: stats.policy.name().into(),
            train_steps: stats.steps,
            train_loss_per_epoch: stats.epoch_losses.clone(),
            ..TrainingDetail::default()
        }),
        ..Row::default()
    }
}

/// What [`RUN`] holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct TeacherRun {
    /// The float32 run's row, stamped with the stage that trained it.
    pub row: Row,
    pub audit: GradientAudit,
    pub audited_steps: usize,
}

impl TeacherRun {
    /// The baseline's float32 run in this run folder, if the baseline wrote one.
    pub fn read(ctx: &Context) -> Result<Option<Self>> {
        let Some(path) = ctx.optional_input(RUN)? else {
            return Ok(None);
        };
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is damaged", path.display()))
    }
}

/// The float32 teacher artifact as the runtime runs it: the reference of the stages that
/// compare their artifacts with the teacher's (which must declare [`ARTIFACT`]).
pub fn deployed(ctx: &Context, test: &RuntimeTest) -> Result<Deployed> {
    let path = ctx.input(ARTIFACT)?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let file = RunFile {
        path,
        relative: ARTIFACT.file.into(),
    };
    deploy::measure(&bytes, &file, test)
}
