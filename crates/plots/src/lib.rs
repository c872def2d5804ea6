//! The experiment's charts as SVG files: line charts and annotated scatter charts, each axis
//! linear or logarithmic.
//!
//! A [`Chart`] is plain data: a title, axis labels and [`Series`] of `(x, y)` points. It is
//! validated when drawn and rendered by `plotters`' SVG backend at 800x500 pixels; text is
//! written as SVG `<text>` elements, so no system font is needed. Axis ranges follow the data
//! with a small margin; a logarithmic axis labels every power of ten in its range (and the 2x
//! and 5x steps between them when it spans only a few decades); a legend appears when there
//! is more than one series, and each series may override the chart's [`Kind`]. [`Chart::write_svg`]
//! replaces its file atomically. No input makes drawing panic: invalid data is a [`PlotError`].
//!
//! What the charts do so that they read at a glance:
//!
//! - **Tick labels** carry no digit that does not matter: no trailing `.0` (`500`, `97.5`);
//!   a linear axis gives them the digits its span needs, a logarithmic one three significant
//!   digits. Magnitudes from 0.001 to below 10 000 are plain numbers (`0.05`, `2000`); from
//!   10 000 to below 10^15, thousands, millions, billions and trillions with a suffix
//!   (`10k`, `12.5k`, `200k`, `1M`, `2.5G`); the rest, scientific notation (`2.5e-7`).
//! - **Coincident markers** stay visible: where a marker would cover one of an earlier
//!   series (within 3 pixels) and either is a scatter marker, it is drawn as a ring around
//!   the widest marker there, 3 pixels wider (a dot, a ring around it, a wider ring...). Two
//!   line charts' markers on one spot stay dots: the curves then run together anyway.
//! - **Point labels** do not overlap: after every marker is drawn they are placed in series
//!   and point order, each in the first free place nearest its marker (just above and to the
//!   right of it, or to the left near the right edge; just below; the other side; then one
//!   line further up or down each time), inside the plot and clear of every label placed
//!   before it, and of other markers where there is room. Text size is estimated (about 6
//!   pixels a character), since no font is measured.
//!
//! ```
//! use plots::{Chart, Kind, Scale, Series};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let chart = Chart {
//!     title: "Accuracy against size".into(),
//!     x_label: "artifact size (bytes)".into(),
//!     y_label: "test accuracy".into(),
//!     x_scale: Scale::Log10,
//!     y_scale: Scale::Linear,
//!     kind: Kind::Scatter,
//!     series: vec![Series {
//!         label: "models".into(),
//!         points: vec![(1.2e6, 0.991), (3.1e5, 0.987), (8.0e4, 0.975)],
//!         point_labels: vec!["float32".into(), "int8".into(), "pruned int8".into()],
//!         kind: None,
//!     }],
//! };
//! let svg = chart.to_svg_string()?;
//! assert!(svg.contains("Accuracy against size") && svg.contains("pruned int8"));
//!
//! // One series may be drawn differently from the chart's kind: a line through the best
//! // points over the scatter, say.
//! let mut front = chart.clone();
//! front.series.push(Series::new("best", vec![(8.0e4, 0.975), (1.2e6, 0.991)]).with_kind(Kind::Lines));
//! assert!(front.to_svg_string()?.contains("best"));
//!
//! let dir = tempfile::tempdir()?;
//! chart.write_svg(&dir.path().join("accuracy.svg"))?;
//!
//! // Invalid data is an error, never a panic.
//! let empty = Chart { series: vec![], ..chart };
//! assert!(empty.to_svg_string().is_err());
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod error;
mod labels;
mod range;
mod render;

use std::path::Path;

pub use error::{Axis, PlotError};

/// Width of every chart, in pixels.
pub const WIDTH: u32 = 800;
/// Height of every chart, in pixels.
pub const HEIGHT: u32 = 500;

/// One named set of points, drawn in its own colour.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// The name shown in the legend.
    pub label: String,
    /// The `(x, y)` points, in drawing order (a line chart joins them in this order).
    pub points: Vec<(f64, f64)>,
    /// Optional text written next to each point: either empty (no annotations) or one
    /// label per point.
    pub point_labels: Vec<String>,
    /// How this series is drawn; `None` follows [`Chart::kind`]. Lets one chart mix markers
    /// only (a scatter of models) with a line (the front through the best of them).
    pub kind: Option<Kind>,
}

impl Series {
    /// A series without point annotations.
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
            point_labels: Vec::new(),
            kind: None,
        }
    }

    /// The series drawn as `kind`, whatever the chart's [`Chart::kind`].
    #[must_use]
    pub fn with_kind(mut self, kind: Kind) -> Self {
        self.kind = Some(kind);
        self
    }

    /// How the series is drawn in a chart of kind `chart`.
    pub fn kind_in(&self, chart: Kind) -> Kind {
        self.kind.unwrap_or(chart)
    }
}

/// How values map to positions along an axis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scale {
    /// Evenly spaced values.
    #[default]
    Linear,
    /// Evenly spaced powers of ten; every value on such an axis must be positive. Ticks are
    /// labelled at every power of ten in range, and at the 2x and 5x steps too when the axis
    /// spans less than about two and a half decades.
    Log10,
}

/// What is drawn for each series.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kind {
    /// Points joined by lines in their order, each with a marker.
    #[default]
    Lines,
    /// Markers only, for points with no order (one model per point, say).
    Scatter,
}

/// A chart: what to draw and how to label it.
///
/// Point labels, when a series has them, are written next to their markers for either
/// [`Kind`]; they are what a scatter chart is usually for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chart {
    /// The caption above the plot.
    pub title: String,
    /// The horizontal axis' description.
    pub x_label: String,
    /// The vertical axis' description.
    pub y_label: String,
    /// The horizontal axis' scale.
    pub x_scale: Scale,
    /// The vertical axis' scale.
    pub y_scale: Scale,
    /// The data; at least one series, each with at least one point.
    pub series: Vec<Series>,
    /// Lines with markers, or markers only, for every series whose own [`Series::kind`] is
    /// `None`.
    pub kind: Kind,
}

impl Chart {
    /// Renders the chart as a complete SVG document.
    ///
    /// # Errors
    /// [`PlotError::NoSeries`], [`PlotError::NoPoints`], [`PlotError::PointLabelCount`],
    /// [`PlotError::NonFinite`] and [`PlotError::NonPositive`] for invalid data;
    /// [`PlotError::Render`] if the backend fails.
    pub fn to_svg_string(&self) -> Result<String, PlotError> {
        self.validate()?;
        render::svg(self)
    }

    /// Renders the chart and writes it to `path` atomically ([`atomic_file::write`]: a
    /// temporary file in the same folder, flushed and renamed): the file at `path` is either
    /// left as it was or replaced by the complete new chart. Nothing is written when the
    /// chart is invalid.
    ///
    /// # Errors
    /// Those of [`Chart::to_svg_string`], and [`PlotError::Io`] naming `path` when the file
    /// cannot be written (a missing folder, say).
    pub fn write_svg(&self, path: &Path) -> Result<(), PlotError> {
        let svg = self.to_svg_string()?;
        atomic_file::write(path, svg).map_err(|e| PlotError::Io {
            path: path.to_path_buf(),
            source: e.into_io_error(),
        })
    }

    fn validate(&self) -> Result<(), PlotError> {
        if self.series.is_empty() {
            return Err(PlotError::NoSeries);
        }
        for (s, series) in self.series.iter().enumerate() {
            let name = || series.label.clone();
            if series.points.is_empty() {
                return Err(PlotError::NoPoints {
                    series: s,
                    label: name(),
                });
            }
            if !series.point_labels.is_empty() && series.point_labels.len() != series.points.len() {
                return Err(PlotError::PointLabelCount {
                    series: s,
                    label: name(),
                    points: series.points.len(),
                    labels: series.point_labels.len(),
                });
            }
            for (index, &(x, y)) in series.points.iter().enumerate() {
                if !x.is_finite() || !y.is_finite() {
                    return Err(PlotError::NonFinite {
                        series: s,
                        label: name(),
                        index,
                        point: (x, y),
                    });
                }
                for (axis, scale, value) in [(Axis::X, self.x_scale, x), (Axis::Y, self.y_scale, y)]
                {
                    if scale == Scale::Log10 && value <= 0.0 {
                        return Err(PlotError::NonPositive {
                            series: s,
                            label: name(),
                            index,
                            axis,
                            value,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}
