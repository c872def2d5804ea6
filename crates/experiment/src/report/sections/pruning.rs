//! The `pruning` stage's section: every pruned teacher against the dense one, accuracy
//! against sparsity, and the schedules.

use std::fmt::Write as _;

use plots::Series;

use crate::charts::Figure;
use crate::report::Row;
use crate::report::detail::{Detail, PruningDetail};
use crate::variant::PrunedWeights;

use super::{Chart, Section};

/// Accuracy against sparsity.
pub const ACCURACY: Chart = Chart {
    file: "pruning_accuracy.svg",
    title: "Pruned teacher: test accuracy against weight sparsity",
    caption: "The pruned teacher: test accuracy against the share of weights that are zero, \
              with f32 and with int8 weights, and 2:4 sparsity.",
};
/// The schedules.
pub const SCHEDULE: Chart = Chart {
    file: "pruning_schedule.svg",
    title: "Sparsity schedule",
    caption: "The pruning schedules: the target sparsity at each fine-tuning step (masks are \
              updated every few steps).",
};

/// The section of the stage's rows.
pub fn section(rows: &[Row]) -> Section {
    Section {
        markdown: table(rows),
        figures: figures(rows),
    }
}

fn table(rows: &[Row]) -> String {
    let mut md = String::from(
        "The teacher with batch norm folded, fine-tuned while pruning; every row is an \
         artifact executed by the pure-Rust runtime. Ratios are against the dense float32 \
         artifact.\n\n\
         | variant | weight sparsity | non-zero params | accuracy | drop (pp) | gzip | gzip ratio | speed-up |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let Detail::Pruning(detail) = &row.detail else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {} | {:.1}% | {} | {:.2}% | {:+.2} | {:.1} KiB | {:.1}x | {:.2}x |",
            row.variant,
            detail.weight_sparsity * 100.0,
            row.nonzero_params.unwrap_or(0),
            row.test_accuracy.unwrap_or(f64::NAN) * 100.0,
            detail.deployment.accuracy_delta_pp,
            row.gzip_bytes.unwrap_or(0) as f64 / 1024.0,
            detail.deployment.gzip_ratio,
            detail.deployment.speedup,
        );
    }
    md
}

fn figures(rows: &[Row]) -> Vec<Figure> {
    let pruned: Vec<(&Row, &PruningDetail)> = rows
        .iter()
        .filter_map(|r| match &r.detail {
            Detail::Pruning(detail) => Some((r, detail)),
            _ => None,
        })
        .collect();
    let point = |&(row, detail): &(&Row, &PruningDetail)| {
        (
            detail.weight_sparsity * 100.0,
            row.test_accuracy.unwrap_or(0.0) * 100.0,
        )
    };
    // Dense, or pruned without structure; 2:4 apart.
    let unstructured = |d: &PruningDetail| {
        d.target
            .as_ref()
            .is_none_or(|t| t.granularity == format!("{:?}", pruning::Granularity::Unstructured))
    };
    let of = |weights: PrunedWeights,
              keep: &dyn Fn(&PruningDetail) -> bool|
     -> Vec<(&Row, &PruningDetail)> {
        pruned
            .iter()
            .filter(|(_, d)| d.weights == weights && keep(d))
            .copied()
            .collect()
    };
    let float = of(PrunedWeights::F32, &unstructured);
    let int8 = of(PrunedWeights::Int8, &|d| {
        d.target.is_some() && unstructured(d)
    });
    let n2m4 = of(PrunedWeights::F32, &|d| !unstructured(d));
    let mut accuracy = vec![Series::new(
        "unstructured, f32",
        float.iter().map(point).collect(),
    )];
    if !int8.is_empty() {
        accuracy.push(Series::new(
            "unstructured, int8 weights",
            int8.iter().map(point).collect(),
        ));
    }
    if !n2m4.is_empty() {
        accuracy.push(Series::new("2:4", n2m4.iter().map(point).collect()));
    }
    // Each pruned target's schedule over the steps it fine-tuned (its f32 row).
    let schedule_series = of(PrunedWeights::F32, &|_| true)
        .into_iter()
        .filter_map(|(row, detail)| Some((&row.variant, detail.target.as_ref()?)))
        .map(|(name, target)| {
            let (schedule, steps) = (target.schedule, target.fine_tune_steps as u64);
            let mut points = Vec::new();
            let mut current = 0.0;
            for step in 0..steps {
                if schedule.should_prune(step) {
                    current = schedule.sparsity(step);
                }
                points.push((step as f64, current * 100.0));
            }
            Series::new(name.as_str(), points)
        })
        .collect();
    vec![
        Figure::lines(
            ACCURACY.file,
            ACCURACY.title,
            "weights that are zero (%)",
            "test accuracy (%)",
            accuracy,
        ),
        Figure::lines(
            SCHEDULE.file,
            SCHEDULE.title,
            "fine-tuning step",
            "target sparsity (%)",
            schedule_series,
        ),
    ]
}
