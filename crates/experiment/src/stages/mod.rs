//! What each stage does: it trains or converts models and returns report rows and its own
//! section of report.md. What it reads
//! from earlier stages is declared here ([`inputs`]), and what it is configured by is its own
//! settings type (`crate::settings`), not the command line.

mod baseline;
mod clustering;
mod distillation;
mod pipeline;
mod precision;
mod pruning;
mod quantization;

use anyhow::Result;

use crate::context::Context;
use crate::report::StageReport;
use crate::settings::Settings;
use crate::stage::{Product, Stage};
use crate::teacher;

/// The files of earlier stages `stage` reads (optional ones too: quantization also
/// quantizes the distilled student when there is one, precision takes the baseline's float32
/// run when there is one). `--resume` keys follow these, and [`Context::input`] refuses a
/// file not listed.
pub fn inputs(stage: Stage) -> &'static [Product] {
    match stage {
        Stage::Baseline => &[],
        Stage::Precision => &[teacher::RUN],
        Stage::Distillation | Stage::Pruning => &[teacher::CHECKPOINT],
        Stage::Quantization => &[teacher::CHECKPOINT, distillation::STUDENT_CHECKPOINT],
        Stage::Clustering => &[
            teacher::CHECKPOINT,
            teacher::ARTIFACT,
            pruning::SPARSE_TEACHER,
        ],
        Stage::Pipeline => &[teacher::CHECKPOINT, teacher::ARTIFACT],
    }
}

/// The stages whose files `stage` reads, each once, in run order.
pub fn dependencies(stage: Stage) -> Vec<Stage> {
    Stage::all()
        .into_iter()
        .filter(|s| inputs(stage).iter().any(|p| p.stage == *s))
        .collect()
}

/// Runs `stage` with its own settings.
pub fn run(stage: Stage, ctx: &Context, settings: &Settings) -> Result<StageReport> {
    match stage {
        Stage::Baseline => baseline::run(ctx),
        Stage::Precision => precision::run(ctx, &settings.precision),
        Stage::Distillation => distillation::run(ctx, settings.distillation),
        Stage::Quantization => quantization::run(ctx, &settings.quantization),
        Stage::Pruning => pruning::run(ctx),
        Stage::Clustering => clustering::run(ctx),
        Stage::Pipeline => pipeline::run(ctx, &settings.pipeline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_reads_only_what_earlier_stages_write() {
        for stage in Stage::all() {
            for product in inputs(stage) {
                assert!(
                    (product.stage as usize) < (stage as usize),
                    "{stage} reads {} of the later {}",
                    product.file,
                    product.stage
                );
            }
        }
        assert_eq!(
            dependencies(Stage::Quantization),
            [Stage::Baseline, Stage::Distillation]
        );
        assert!(dependencies(Stage::Baseline).is_empty());
    }
}
