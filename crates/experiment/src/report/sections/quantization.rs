//! The `quantization` stage's section: every deployment against its model's float32
//! artifact, and accuracy against size.

use std::fmt::Write as _;

use crate::charts::Figure;
use crate::report::Row;
use crate::report::detail::Detail;

use super::{Chart, Section, accuracy_size, size_point};

/// Accuracy against size, one colour per model.
pub const ACCURACY_SIZE: Chart = Chart {
    file: "quantization_accuracy_size.svg",
    title: "Quantized models: test accuracy against artifact size",
    caption: "Each quantized variant of the teacher and the student: test accuracy against \
              artifact size (log scale), one colour per model.",
};

/// The section of the stage's rows.
pub fn section(rows: &[Row]) -> Section {
    Section {
        markdown: table(rows),
        figures: vec![size_figure(rows)],
    }
}

fn table(rows: &[Row]) -> String {
    let mut md = String::from(
        "Every row is an artifact executed by the pure-Rust runtime; drops and ratios are \
         against the same model's float32 artifact.\n\n\
         | model | variant | accuracy | drop (pp) | size ratio | gzip ratio | samples/s |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let Detail::Quantization(detail) = &row.detail else {
            continue;
        };
        let selected = detail.calibration.as_ref().is_some_and(|c| c.selected);
        let _ = writeln!(
            md,
            "| {} | {}{} | {:.2}% | {:+.2} | {:.2}x | {:.2}x | {:.0} |",
            row.model,
            row.variant,
            if selected { " (selected)" } else { "" },
            row.test_accuracy.unwrap_or(f64::NAN) * 100.0,
            detail.deployment.accuracy_delta_pp,
            detail.deployment.size_ratio,
            detail.deployment.gzip_ratio,
            row.infer_samples_per_second.unwrap_or(f64::NAN),
        );
    }
    md
}

/// Accuracy against artifact size, one series per model, each point named by its variant.
fn size_figure(rows: &[Row]) -> Figure {
    let mut models: Vec<&str> = rows.iter().map(|r| r.model.as_str()).collect();
    models.dedup();
    let series = models
        .into_iter()
        .map(|model| {
            let mine: Vec<&Row> = rows.iter().filter(|r| r.model == model).collect();
            let mut s = plots::Series::new(model, mine.iter().map(|r| size_point(r)).collect());
            s.point_labels = mine.iter().map(|r| r.variant.clone()).collect();
            s
        })
        .collect();
    accuracy_size(&ACCURACY_SIZE, series)
}
