use thiserror::Error;

/// Errors of network descriptions, their construction and their forward pass, and of the
/// fake quantizers and calibration.
#[derive(Debug, Error)]
pub enum Error {
    /// The network description does not hold together.
    #[error(transparent)]
    Spec(#[from] model_spec::SpecError),
    /// A precision building block refused its tensors.
    #[error(transparent)]
    Precision(#[from] tensor_precision::Error),
    /// A quantization parameter or calibration failed.
    #[error(transparent)]
    Quantization(#[from] quantization::Error),
    /// A tensor whose element type is not a floating-point one.
    #[error("expected a floating-point tensor, got {kind:?}")]
    NotFloatingPoint {
        /// The tensor's element type.
        kind: tch::Kind,
    },
    /// A tensor whose shape does not fit.
    #[error("{0}")]
    Shape(String),
    /// A moving-average weight outside (0, 1].
    #[error("the observer's averaging must lie in (0, 1], got {0}")]
    InvalidAveraging(f64),
    /// A calibration tap's input could not be observed.
    #[error("calibration tap `{tap}`: {source}")]
    Tap {
        /// The tap's name.
        tap: String,
        /// What went wrong.
        source: Box<Error>,
    },
    /// Calibration ended without a single tap.
    #[error("the forward pass tapped nothing: no layer input to calibrate")]
    NothingTapped,
    /// An error from LibTorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result with this crate's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;
