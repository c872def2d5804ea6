use thiserror::Error;

/// Errors of distillation settings and inputs.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A temperature that is not positive and finite.
    #[error("temperature must be positive and finite, got {0}")]
    InvalidTemperature(f64),
    /// A weight outside [0, 1].
    #[error("alpha must be in [0, 1], got {0}")]
    InvalidAlpha(f64),
    /// Student and teacher logits (or the labels, inputs, indices) do not fit together.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// A tensor of a kind the computation cannot take (integer logits, float labels).
    #[error("{what} must be {expected}, got {actual:?}")]
    WrongKind {
        /// Which tensor.
        what: &'static str,
        /// The kinds it may have.
        expected: &'static str,
        /// Its kind.
        actual: tch::Kind,
    },
    /// Tensors that must be on one device are not.
    #[error("{what} are on {actual:?}, the student logits on {expected:?}")]
    DeviceMismatch {
        /// Which tensor.
        what: &'static str,
        /// The student logits' device.
        expected: tch::Device,
        /// The tensor's device.
        actual: tch::Device,
    },
    /// A batch of no samples (its mean loss is undefined).
    #[error("the batch is empty")]
    EmptyBatch,
    /// A batch size of zero.
    #[error("the batch size must be positive")]
    InvalidBatchSize,
    /// A sample position outside a teacher cache.
    #[error("sample index {index} is out of range for a teacher cache of {len} samples")]
    IndexOutOfRange {
        /// The position asked for.
        index: usize,
        /// The number of cached samples.
        len: usize,
    },
    /// A batch without sample positions for a cached teacher.
    #[error(
        "a cached teacher needs the positions of the batch's samples in the training set \
         (Batch::with_indices)"
    )]
    MissingIndices,
    /// An error from LibTorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result with this crate's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;
