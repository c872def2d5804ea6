use thiserror::Error;

/// Errors of loss-scaling configurations and of scaled optimizer steps.
#[derive(Debug, Error)]
pub enum Error {
    /// A loss scale (initial, fixed, minimum or maximum) that is zero, negative, infinite
    /// or NaN.
    #[error("{what} {value} must be positive and finite")]
    InvalidScale {
        /// Which scale.
        what: &'static str,
        /// The value given.
        value: f32,
    },
    /// A growth factor that would not grow the scale.
    #[error("growth factor {0} must be finite and greater than 1")]
    InvalidGrowthFactor(f64),
    /// A backoff factor that would not shrink the scale.
    #[error("backoff factor {0} must lie in (0, 1)")]
    InvalidBackoffFactor(f64),
    /// A growth interval of zero steps.
    #[error("growth interval must be at least one step")]
    ZeroGrowthInterval,
    /// Bounds that leave no room for the scale.
    #[error("minimum scale {min} exceeds maximum scale {max}")]
    MinAboveMax {
        /// The minimum scale.
        min: f32,
        /// The maximum scale.
        max: f32,
    },
    /// A scale outside the configured bounds (initial scale, or a resumed state).
    #[error("scale {scale} lies outside [{min}, {max}]")]
    ScaleOutOfBounds {
        /// The scale.
        scale: f32,
        /// The minimum scale.
        min: f32,
        /// The maximum scale.
        max: f32,
    },
    /// A resumed state whose growth counter has already reached the interval.
    #[error("growth counter {tracker} must be below the growth interval {interval}")]
    TrackerBeyondInterval {
        /// The counter.
        tracker: u32,
        /// The interval.
        interval: u32,
    },
    /// A gradient-clipping norm that is zero, negative, infinite or NaN.
    #[error("gradient clipping norm {0} must be positive and finite")]
    InvalidClipNorm(f64),
    /// A gradient in a type the fused unscaling kernel does not take.
    #[error("cannot unscale a gradient of kind {kind:?}: keep the variables in float32")]
    UnsupportedGradient {
        /// The gradient's element type.
        kind: tch::Kind,
    },
    /// A loss that is not a floating-point tensor.
    #[error("cannot scale a loss of kind {kind:?}: expected a floating-point tensor")]
    UnsupportedLoss {
        /// The loss's element type.
        kind: tch::Kind,
    },
    /// An error from LibTorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// A scaler state that is not valid JSON of the expected shape.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Result with this crate's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;
