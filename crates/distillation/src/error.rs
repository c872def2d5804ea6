use thiserror::Error;

/// Errors of distillation settings and inputs.
#[derive(Debug, Error)]
pub enum Error {
    /// A temperature that is not positive and finite.
    #[error("temperature must be positive and finite, got {0}")]
    InvalidTemperature(f64),
    /// A weight outside [0, 1].
    #[error("alpha must be in [0, 1], got {0}")]
    InvalidAlpha(f64),
    /// Student and teacher logits (or the labels) do not fit together.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// An error from LibTorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result with this crate's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;
