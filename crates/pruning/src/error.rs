use thiserror::Error;

/// Errors of pruning settings.
#[derive(Debug, Error)]
pub enum Error {
    /// A sparsity outside [0, 1).
    #[error("sparsity must be in [0, 1), got {0}")]
    InvalidSparsity(f64),
    /// A schedule whose steps do not make sense.
    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),
    /// A granularity that does not fit a layer, or is nonsensical.
    #[error("invalid granularity: {0}")]
    InvalidGranularity(String),
    /// An error from LibTorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result with this crate's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;
