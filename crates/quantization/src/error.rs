use thiserror::Error;

/// Errors of quantization settings and inputs.
#[derive(Debug, Error)]
pub enum Error {
    /// A bit width outside 2..=8.
    #[error("bit width must be in 2..=8, got {0}")]
    InvalidBitWidth(u32),
    /// A percentile outside (0, 100].
    #[error("percentile must be in (0, 100], got {0}")]
    InvalidPercentile(f64),
    /// An observer that may keep no values.
    #[error("an observer's capacity must be positive")]
    InvalidCapacity,
    /// Calibration saw no values.
    #[error("the calibration set is empty")]
    EmptyCalibration,
    /// A NaN or infinite value where finite numbers are required.
    #[error("{what} contains a non-finite value at index {index}")]
    NonFinite {
        /// What was being quantized.
        what: String,
        /// Position of the first offending value.
        index: usize,
    },
    /// Data whose length does not fit the stated shape.
    #[error("{0}")]
    Shape(String),
}

/// Result with this crate's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;
