//! Each stage's part of report.md, rendered from the stage's typed rows: one home for how a
//! stage's measurements read, apart from the code that makes them.

pub mod clustering;
pub mod distillation;
pub mod pipeline;
pub mod precision;
pub mod pruning;
pub mod quantization;

use std::path::Path;

use anyhow::Result;

use crate::charts::Figure;

/// A stage's section: its Markdown, and the charts it shows after it.
pub struct Section {
    pub markdown: String,
    pub figures: Vec<Figure>,
}

impl Section {
    /// Writes the charts into the run folder `out` and returns the Markdown that shows them
    /// after the section's text.
    pub fn write(self, out: &Path) -> Result<String> {
        let mut markdown = self.markdown;
        for figure in self.figures {
            markdown.push('\n');
            markdown.push_str(&figure.write(out)?);
        }
        Ok(markdown)
    }
}

/// A chart a stage draws: its file in the run's `plots/`, its title, and the caption the
/// report's "Plots" section shows it with.
pub struct Chart {
    pub file: &'static str,
    pub title: &'static str,
    pub caption: &'static str,
}

/// Every chart the stages draw, in the order the "Plots" section lists them.
pub const CHARTS: [&Chart; 5] = [
    &quantization::ACCURACY_SIZE,
    &pruning::ACCURACY,
    &pruning::SCHEDULE,
    &distillation::TEMPERATURE,
    &clustering::ACCURACY_SIZE,
];

/// A scatter chart of test accuracy (%) against artifact size (KiB, log scale).
fn accuracy_size(chart: &Chart, series: Vec<plots::Series>) -> Figure {
    let mut figure = Figure::scatter(
        chart.file,
        chart.title,
        "artifact size (KiB)",
        "test accuracy (%)",
        series,
    );
    figure.chart.x_scale = plots::Scale::Log10;
    figure
}

/// A row's point on [`accuracy_size`]: its artifact's size in KiB and its accuracy in %.
fn size_point(row: &crate::report::Row) -> (f64, f64) {
    (
        row.size_bytes.unwrap_or(0) as f64 / 1024.0,
        row.test_accuracy.unwrap_or(0.0) * 100.0,
    )
}

/// The artifact a stage's rows are compared with, as the runtime measured it.
#[derive(Debug, Clone, Copy)]
pub struct Reference {
    pub accuracy: f64,
    pub size_bytes: u64,
    pub samples_per_second: f64,
}

/// A share as a percentage with two decimals, `-` when unknown.
fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{:.2}%", v * 100.0))
}
