//! The `pipeline` stage's section: each step against the float32 teacher, and whether the
//! final artifact met its targets.

use std::fmt::Write as _;

use crate::report::Row;
use crate::report::detail::{Detail, PipelineTarget};

use super::{Reference, Section};

/// The final artifact's targets: at least this many times smaller than the float32 teacher,
/// with at least this accuracy.
pub const TARGET_SIZE_RATIO: f64 = 100.0;
pub const TARGET_ACCURACY: f64 = 0.988;
/// PCQAT's size target: a few shared values per tensor, stored as indices.
pub const PCQAT_TARGET_SIZE_RATIO: f64 = 150.0;

/// The section of the stage's rows: the student pruned to `target`, every step compared
/// with the float32 teacher.
pub fn section(rows: &[Row], teacher: Reference, target: f64) -> Section {
    let mut md = format!(
        "The student distilled from the teacher, pruned to {:.0}% of its weights, then \
         fine-tuned with fake quantization while its zeros are kept (PCQAT: and its weights \
         share a few values per tensor); every row is an artifact \
         run by the pure-Rust runtime, compared with the float32 teacher ({:.2}%, {} bytes, \
         {:.0} images/s).\n\n\
         | step | accuracy | vs teacher (pp) | bytes | smaller | gzip smaller | speed-up |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        target * 100.0,
        teacher.accuracy * 100.0,
        teacher.size_bytes,
        teacher.samples_per_second,
    );
    for row in rows {
        let Some(deployment) = row.detail.deployment() else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {} | {:.2}% | {:+.2} | {} | {:.1}x | {:.1}x | {:.2}x |",
            row.variant,
            row.test_accuracy.unwrap_or(f64::NAN) * 100.0,
            deployment.accuracy_delta_pp,
            row.size_bytes.unwrap_or(0),
            deployment.size_ratio,
            deployment.gzip_ratio,
            deployment.speedup,
        );
    }
    let targets: Vec<(&Row, &PipelineTarget)> = rows
        .iter()
        .filter_map(|row| match &row.detail {
            Detail::Pipeline(detail) => Some((row, detail.target.as_ref()?)),
            _ => None,
        })
        .collect();
    if !targets.is_empty() {
        md.push('\n');
    }
    for (row, target) in targets {
        let _ = writeln!(
            md,
            "- Target of {}: at least {:.0}x smaller than the float32 teacher with at least \
             {:.1}% accuracy: {}.",
            row.variant,
            target.size_ratio_at_least,
            target.accuracy_at_least * 100.0,
            if target.met { "met" } else { "not met" }
        );
    }
    Section {
        markdown: md,
        figures: Vec::new(),
    }
}
