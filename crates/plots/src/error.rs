//! The crate's error type.

use std::fmt;
use std::path::PathBuf;

/// One of a chart's two axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// The horizontal axis.
    X,
    /// The vertical axis.
    Y,
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::X => "x",
            Self::Y => "y",
        })
    }
}

/// Everything that can go wrong while drawing or writing a chart.
///
/// Variants about data name the series by index (from 0) and label, and the point by index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// The chart has no series.
    #[error("the chart has no series")]
    NoSeries,
    /// A series has no points.
    #[error("series {series} ({label:?}) has no points")]
    NoPoints {
        /// The series' index.
        series: usize,
        /// The series' label.
        label: String,
    },
    /// A series has point labels, but not one per point.
    #[error("series {series} ({label:?}) has {labels} point labels for {points} points")]
    PointLabelCount {
        /// The series' index.
        series: usize,
        /// The series' label.
        label: String,
        /// How many points it has.
        points: usize,
        /// How many point labels it has.
        labels: usize,
    },
    /// A coordinate is NaN or infinite.
    #[error("series {series} ({label:?}) point {index} is not finite: {point:?}")]
    NonFinite {
        /// The series' index.
        series: usize,
        /// The series' label.
        label: String,
        /// The point's index in the series.
        index: usize,
        /// The point.
        point: (f64, f64),
    },
    /// A coordinate on a logarithmic axis is zero or negative.
    #[error(
        "series {series} ({label:?}) point {index} has {axis} = {value}, \
         but the {axis} axis is logarithmic"
    )]
    NonPositive {
        /// The series' index.
        series: usize,
        /// The series' label.
        label: String,
        /// The point's index in the series.
        index: usize,
        /// The logarithmic axis.
        axis: Axis,
        /// The offending coordinate.
        value: f64,
    },
    /// The drawing backend failed.
    #[error("cannot draw the chart: {0}")]
    Render(String),
    /// Writing the file failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file being written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
