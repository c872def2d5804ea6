//! The report's charts: SVG files in the run's `plots/` folder, linked from `report.md`.

use std::path::Path;

use anyhow::{Context as _, Result};
use plots::{Chart, Kind, Scale, Series};

/// Folder of the charts, inside the run's output folder.
pub const FOLDER: &str = "plots";

/// A chart to draw: its file name (without folder) and content.
pub struct Figure {
    pub file: String,
    pub chart: Chart,
}

impl Figure {
    /// A line chart with markers, linear axes.
    pub fn lines(file: &str, title: &str, x: &str, y: &str, series: Vec<Series>) -> Self {
        Self {
            file: file.into(),
            chart: Chart {
                title: title.into(),
                x_label: x.into(),
                y_label: y.into(),
                x_scale: Scale::Linear,
                y_scale: Scale::Linear,
                series,
                kind: Kind::Lines,
            },
        }
    }

    /// A scatter chart whose points carry labels.
    pub fn scatter(file: &str, title: &str, x: &str, y: &str, series: Vec<Series>) -> Self {
        let mut figure = Self::lines(file, title, x, y, series);
        figure.chart.kind = Kind::Scatter;
        figure
    }

    /// Writes the chart under `out/plots/` and returns the markdown that shows it.
    pub fn write(&self, out: &Path) -> Result<String> {
        let dir = out.join(FOLDER);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(&self.file);
        self.chart
            .write_svg(&path)
            .with_context(|| format!("drawing {}", path.display()))?;
        Ok(format!("![{}]({FOLDER}/{})\n", self.chart.title, self.file))
    }
}
