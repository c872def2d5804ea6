//! `baseline`: the float32 teacher, trained on the full training set.

use anyhow::{Context as _, Result};
use models::{Network, NetworkSpec};
use serde::{Deserialize, Serialize};
use tch::nn;
use tensor_precision::{GradientAudit, GradientAuditor};

use super::Context;
use crate::report::Row;
use crate::train::{self, DeviceSplit, GradientSampling, TrainConfig, TrainOptions};
use crate::{deploy, fsutil};

/// The teacher as deployed: the runtime's artifact format, batch norm folded.
pub const TEACHER_ARTIFACT: &str = "teacher_float32.safetensors";
/// The teacher's trainable state (tch variables, batch norm unfolded), which later stages load.
pub const TEACHER_CHECKPOINT: &str = "teacher_checkpoint.safetensors";
/// The float32 run as the precision stage reports it (its row and the gradient-underflow
/// audit of its steps), so that stage need not train the same teacher again.
pub const TEACHER_RUN: &str = "teacher_float32_run.json";
/// Epochs of a full run: enough for 99.2% test accuracy.
const EPOCHS: usize = 5;
/// Share of each class trained on in `--quick` mode.
const QUICK_FRACTION: f64 = 0.1;

/// The teacher's training data on the device and its recipe, shared by every stage that
/// trains the teacher: the full training set (a stratified tenth for one epoch in
/// `--quick` mode), Adam with a cosine schedule from 3e-3, batch 128.
pub fn teacher_training(ctx: &Context) -> Result<(DeviceSplit, TrainConfig)> {
    let seed = ctx.args.seed;
    let subset;
    let (train_split, epochs) = if ctx.args.quick {
        subset = ctx.dataset.train.stratified_subset(QUICK_FRACTION, seed)?;
        (&subset, 1)
    } else {
        (&ctx.dataset.train, EPOCHS)
    };
    let config = TrainConfig {
        epochs,
        batch_size: 128,
        learning_rate: 3e-3,
        seed,
    };
    let data = DeviceSplit::new(train_split, ctx.normalization, ctx.device.device)?;
    Ok((data, config))
}

pub fn run(ctx: &Context) -> Result<Vec<Row>> {
    let seed = ctx.args.seed;
    let (data, config) = teacher_training(ctx)?;
    ctx.progress.info(&format!(
        "training the float32 teacher on {} images for {} epochs",
        data.len(),
        config.epochs
    ));

    tch::manual_seed(seed as i64);
    let spec = NetworkSpec::teacher_cnn();
    let vs = nn::VarStore::new(ctx.device.device);
    let net = Network::new(&vs.root(), &spec)?;
    let mut auditor = GradientAuditor::new();
    let steps = config.epochs * data.len().div_ceil(config.batch_size);
    let options = TrainOptions {
        audit: Some(GradientSampling {
            auditor: &mut auditor,
            every: (steps / super::precision::AUDIT_SAMPLES).max(1),
        }),
        ..TrainOptions::default()
    };
    let stats = train::train_with(&net, &vs, &data, &config, options, &ctx.progress, "teacher")?;
    let eval = train::evaluate(&net, &ctx.test);
    ctx.progress.info(&format!(
        "teacher: test accuracy {:.2}% after {:.1} s of training",
        eval.accuracy * 100.0,
        stats.seconds
    ));

    fsutil::create_atomic(&ctx.out.join(TEACHER_CHECKPOINT), |path| {
        vs.save(path).context("saving the teacher's variables")
    })?;
    let artifact = ctx.out.join(TEACHER_ARTIFACT);
    fsutil::create_atomic(&artifact, |path| {
        deploy::export_f32(&net, &vs, ctx.normalization, path).context("exporting the teacher")
    })?;
    let (size, gzip) = fsutil::sizes(&artifact)?;
    let run = TeacherRun {
        row: super::precision::row(&spec, &net, &stats, eval, models::Policy::Float32.name()),
        audit: auditor.finish(),
        audited_steps: stats.audited_steps,
    };
    fsutil::write_atomic(
        &ctx.out.join(TEACHER_RUN),
        serde_json::to_string_pretty(&run)?.as_bytes(),
    )?;
    Ok(vec![Row {
        stage: "baseline".into(),
        variant: "teacher_float32".into(),
        model: spec.name.clone(),
        params: Some(net.param_count()),
        nonzero_params: Some(net.nonzero_param_count()),
        test_accuracy: Some(eval.accuracy),
        size_bytes: Some(size),
        gzip_bytes: Some(gzip),
        train_seconds: Some(stats.seconds),
        train_samples_per_second: Some(stats.samples_per_second),
        infer_samples_per_second: Some(eval.samples_per_second),
        engine: Some("libtorch".into()),
        artifact: Some(TEACHER_ARTIFACT.into()),
        extra: [
            (
                "train_loss_per_epoch".to_string(),
                serde_json::json!(stats.epoch_losses),
            ),
            ("loss_curve".to_string(), stats.curve_json()),
        ]
        .into_iter()
        .collect(),
    }])
}

/// What [`TEACHER_RUN`] holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct TeacherRun {
    pub row: Row,
    pub audit: GradientAudit,
    pub audited_steps: usize,
}

impl TeacherRun {
    /// The baseline's float32 run in this output folder, if the baseline wrote one.
    pub fn read(ctx: &Context) -> Result<Option<Self>> {
        let path = ctx.out.join(TEACHER_RUN);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is damaged", path.display()))
    }
}
