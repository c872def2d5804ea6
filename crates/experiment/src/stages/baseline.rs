//! `baseline`: the float32 teacher, trained on the full training set.

use anyhow::{Context as _, Result};
use models::Policy;
use tch::nn;
use tensor_precision::GradientAuditor;

use crate::context::Context;
use crate::report::StageReport;
use crate::stage::Stage;
use crate::teacher::{self, TeacherRun};
use crate::train::{self, GradientSampling, TrainOptions};
use crate::variant;
use crate::{deploy, fsutil};

pub fn run(ctx: &Context) -> Result<StageReport> {
    let (data, config) = teacher::training(ctx)?;
    ctx.progress.info(&format!(
        "training the float32 teacher on {} images for {} epochs",
        data.len(),
        config.epochs
    ));

    tch::manual_seed(ctx.seed as i64);
    let spec = teacher::architecture(ctx);
    let vs = nn::VarStore::new(ctx.device.device);
    let net = spec.build(&vs.root(), Policy::Float32)?;
    let mut auditor = GradientAuditor::new();
    let steps = config.epochs * data.len().div_ceil(config.batch_size);
    let options = TrainOptions {
        audit: Some(GradientSampling {
            auditor: &mut auditor,
            every: (steps / teacher::AUDIT_SAMPLES).max(1),
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

    fsutil::create_atomic(&ctx.out.join(teacher::CHECKPOINT.file), |path| {
        vs.save(path).context("saving the teacher's variables")
    })?;
    let artifact = ctx.out.join(teacher::ARTIFACT.file);
    fsutil::create_atomic(&artifact, |path| {
        let params = net.deployed_parameters(&vs)?;
        deploy::export_f32(&spec, &params, ctx.normalization, path).context("exporting the teacher")
    })?;
    let (size, gzip) = fsutil::sizes(&artifact)?;
    let run = TeacherRun {
        row: teacher::run_row(
            Stage::Baseline,
            Policy::Float32.name(),
            spec.name(),
            (&net).into(),
            &stats,
            eval,
        ),
        audit: auditor.finish(),
        audited_steps: stats.audited_steps,
    };
    fsutil::write_atomic(
        &ctx.out.join(teacher::RUN.file),
        serde_json::to_string_pretty(&run)?.as_bytes(),
    )?;
    let mut row = run.row;
    row.variant = variant::TEACHER.into();
    row.size_bytes = Some(size);
    row.gzip_bytes = Some(gzip);
    row.artifact = Some(teacher::ARTIFACT.file.into());
    Ok(StageReport {
        rows: vec![row],
        section: None,
    })
}
