//! `precision`: the teacher trained under float32 and under the device's mixed policy
//! (Keras's `mixed_bfloat16` on the CPU; `mixed_float16` with dynamic loss scaling and
//! `mixed_bfloat16` on CUDA), same seed, data order and recipe as `baseline`; a
//! gradient-underflow audit of the float32 run; and on the CPU, where float16 arithmetic
//! is emulated and slow, a short float16 run of a small network that shows the loss
//! scaler at work.

use anyhow::{Context as _, Result};
use loss_scaling::{DynamicConfig, LossScaler};
use models::{LayerSpec, Network, NetworkSpec, Policy};
use tch::{Device, nn};
use tensor_precision::GradientAuditor;

use crate::context::Context;
use crate::report::detail::{AgainstFloat32, Audit, Scaling};
use crate::report::{Row, StageReport, sections};
use crate::settings::PrecisionSettings;
use crate::stage::Stage;
use crate::teacher::{self, TeacherRun};
use crate::train::{self, DeviceSplit, GradientSampling, TrainConfig, TrainOptions, TrainStats};
use crate::variant::PrecisionRun;

/// Steps of the float16 loss-scaling demonstration on the CPU.
const DEMO_STEPS: usize = 200;
const DEMO_STEPS_QUICK: usize = 100;
/// The demonstration starts far too high (2^24: the first gradients overflow float16)
/// and grows every 50 finite steps, so that a short run shows both back-off and growth;
/// the Keras preset (2^15, growth every 2000 steps) would show a flat line.
const DEMO_INITIAL_SCALE: f32 = 16_777_216.0;
const DEMO_GROWTH_INTERVAL: u32 = 50;
const DEMO_NOTE: &str = "correctness demonstration of loss scaling on CPU, not a speed result";
/// The reference run every policy is compared with.
const FLOAT32: PrecisionRun = PrecisionRun::Teacher(Policy::Float32);

/// The small network of the CPU float16 demonstration: 784-64-10.
pub fn small_mlp() -> NetworkSpec {
    NetworkSpec {
        name: "mlp_784_64_10".into(),
        input: [1, 28, 28],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 784,
                out_features: 64,
            },
            LayerSpec::Relu,
            LayerSpec::Linear {
                in_features: 64,
                out_features: 10,
            },
        ],
    }
}

/// The teacher runs of a device: policy and whether it trains with dynamic loss scaling
/// (Keras's rules, starting at `--initial-loss-scale`).
fn teacher_policies(device: Device) -> Vec<(Policy, bool)> {
    match device {
        Device::Cpu => vec![(Policy::Float32, false), (Policy::MixedBfloat16, false)],
        _ => vec![
            (Policy::Float32, false),
            (Policy::MixedFloat16, true),
            (Policy::MixedBfloat16, false),
        ],
    }
}

pub fn run(ctx: &Context, settings: &PrecisionSettings) -> Result<StageReport> {
    let seed = ctx.seed;
    // The baseline's recipe, so the float32 row reproduces the baseline teacher.
    let (data, config) = teacher::training(ctx)?;
    let steps_per_epoch = data.len().div_ceil(config.batch_size);

    let mut rows = Vec::new();
    let mut auditor = GradientAuditor::new();
    let mut audited_steps = 0;
    // The baseline trained the float32 teacher with this very recipe and seed (and audited
    // its gradients): its run is this stage's float32 row.
    let baseline_run = TeacherRun::read(ctx)?;
    let mut baseline_audit = None;
    for (policy, scaled) in teacher_policies(ctx.device.device) {
        if policy == Policy::Float32
            && let Some(run) = &baseline_run
        {
            ctx.progress.info(
                "float32: the baseline stage's run (same recipe and seed), not trained again",
            );
            let mut row = run.row.clone();
            row.stage = Stage::Precision.name().into();
            if let Some(training) = row.detail.training_mut() {
                training.trained_by = Some(Stage::Baseline.name().into());
            }
            rows.push(row);
            audited_steps += run.audited_steps;
            baseline_audit = Some(run.audit.clone());
            continue;
        }
        ctx.progress.info(&format!(
            "training the teacher under {policy} on {} images for {} epochs{}",
            data.len(),
            config.epochs,
            if scaled { ", dynamic loss scaling" } else { "" }
        ));
        tch::manual_seed(seed as i64);
        let spec = teacher::architecture(ctx);
        let vs = nn::VarStore::new(ctx.device.device);
        let net = spec.build(&vs.root(), policy)?;
        let mut scaler = scaled
            .then(|| {
                LossScaler::dynamic(DynamicConfig {
                    initial_scale: settings.initial_loss_scale,
                    ..DynamicConfig::keras()
                })
            })
            .transpose()?;
        let audit = (policy == Policy::Float32).then(|| GradientSampling {
            auditor: &mut auditor,
            every: (config.epochs * steps_per_epoch / teacher::AUDIT_SAMPLES).max(1),
        });
        let options = TrainOptions {
            scaler: scaler.as_mut(),
            max_steps: None,
            audit,
            distill: None,
            pruner: None,
            clusterer: None,
        };
        let label = format!("teacher {policy}");
        let stats = train::train_with(&net, &vs, &data, &config, options, &ctx.progress, &label)
            .with_context(|| format!("training the teacher under {policy}"))?;
        audited_steps += stats.audited_steps;
        let eval = train::evaluate(&net, &ctx.test);
        ctx.progress.info(&format!(
            "{label}: test accuracy {:.2}% after {:.1} s of training",
            eval.accuracy * 100.0,
            stats.seconds
        ));
        let mut row = teacher::run_row(
            Stage::Precision,
            PrecisionRun::Teacher(policy),
            spec.name(),
            (&net).into(),
            &stats,
            eval,
        );
        if let Some(scaler) = &scaler {
            add_scaling(&mut row, scaler, &stats);
        }
        rows.push(row);
    }
    let audit = baseline_audit.unwrap_or_else(|| auditor.finish());
    compare_with_float32(&mut rows);

    if ctx.device.device == Device::Cpu {
        let steps = if ctx.quick {
            DEMO_STEPS_QUICK
        } else {
            DEMO_STEPS
        };
        let demo = float16_demo(ctx, &data, steps)?;
        rows.push(demo);
    }

    if let Some(training) = rows.first_mut().and_then(|r| r.detail.training_mut()) {
        training.gradient_audit = Some(Audit {
            audit,
            steps: audited_steps,
        });
    }
    let section = sections::precision::section(&rows, ctx.device.kind, ctx.quick);
    Ok(StageReport {
        rows,
        section: Some(section),
    })
}

fn add_scaling(row: &mut Row, scaler: &LossScaler, stats: &TrainStats) {
    if let Some(training) = row.detail.training_mut() {
        training.scaling = Some(Scaling {
            config: *scaler.config(),
            skipped_steps: stats.skipped_steps,
            final_loss_scale: stats.final_loss_scale,
            history: stats.scale_history.clone(),
        });
    }
}

/// Adds each mixed row's speed-up over the float32 row and its accuracy difference.
fn compare_with_float32(rows: &mut [Row]) {
    let Some(reference) = rows.iter().find(|r| r.is(Stage::Precision, FLOAT32)) else {
        return;
    };
    let (train_rate, infer_rate, accuracy) = (
        reference.train_samples_per_second,
        reference.infer_samples_per_second,
        reference.test_accuracy,
    );
    for row in rows.iter_mut().filter(|r| !r.is(Stage::Precision, FLOAT32)) {
        let ratio = |ours: Option<f64>, base: Option<f64>| Some(ours? / base?);
        let against = AgainstFloat32 {
            train_speedup: ratio(row.train_samples_per_second, train_rate),
            infer_speedup: ratio(row.infer_samples_per_second, infer_rate),
            accuracy_difference_pp: row
                .test_accuracy
                .zip(accuracy)
                .map(|(ours, base)| (ours - base) * 100.0),
        };
        if let Some(training) = row.detail.training_mut() {
            training.against_float32 = Some(against);
        }
    }
}

/// float16 with dynamic loss scaling on [`small_mlp`] for `steps` steps: shows the
/// scaler backing off and growing. On the CPU float16 arithmetic is emulated, so its
/// timings say nothing about float16 speed.
fn float16_demo(ctx: &Context, data: &DeviceSplit, steps: usize) -> Result<Row> {
    let seed = ctx.seed;
    let (batch_size, learning_rate) = (128, 3e-3);
    let config = TrainConfig {
        epochs: steps.div_ceil(data.len().div_ceil(batch_size)),
        batch_size,
        learning_rate,
        seed,
    };
    ctx.progress.info(&format!(
        "float16 loss-scaling demonstration: {} for {steps} steps ({DEMO_NOTE})",
        small_mlp().name
    ));
    tch::manual_seed(seed as i64);
    let spec = small_mlp();
    let vs = nn::VarStore::new(ctx.device.device);
    let net = Network::with_policy(&vs.root(), &spec, Policy::MixedFloat16)?;
    let mut scaler = LossScaler::dynamic(DynamicConfig {
        initial_scale: DEMO_INITIAL_SCALE,
        growth_interval: DEMO_GROWTH_INTERVAL,
        ..DynamicConfig::keras()
    })?;
    let stats = train::train_with(
        &net,
        &vs,
        data,
        &config,
        TrainOptions {
            scaler: Some(&mut scaler),
            max_steps: Some(steps),
            audit: None,
            distill: None,
            pruner: None,
            clusterer: None,
        },
        &ctx.progress,
        "mlp mixed_float16 demo",
    )
    .context("training the float16 demonstration")?;
    let eval = train::evaluate(&net, &ctx.test);
    ctx.progress.info(&format!(
        "float16 demonstration: {} of {} steps skipped, final scale {}, test accuracy {:.2}%",
        stats.skipped_steps,
        stats.steps,
        scaler.current_scale(),
        eval.accuracy * 100.0
    ));
    let mut row = teacher::run_row(
        Stage::Precision,
        PrecisionRun::Float16Demo,
        &spec.name,
        (&net).into(),
        &stats,
        eval,
    );
    add_scaling(&mut row, &scaler, &stats);
    if let Some(training) = row.detail.training_mut() {
        training.note = Some(DEMO_NOTE.into());
    }
    Ok(row)
}
