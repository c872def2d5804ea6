use thiserror::Error;

use crate::Policy;

/// Errors of precision policies, conversions and audits.
#[derive(Debug, Error)]
pub enum Error {
    /// A policy name that is not one of Keras's.
    #[error("unknown precision policy `{name}`: expected one of {}", Policy::NAMES.join(", "))]
    UnknownPolicy {
        /// The name that was given.
        name: String,
    },
    /// Source and destination of a conversion differ in length.
    #[error("conversion of {source_len} values into a buffer of {destination_len}")]
    LengthMismatch {
        /// Number of values to convert.
        source_len: usize,
        /// Room in the destination.
        destination_len: usize,
    },
    /// A tensor whose element type is not a floating-point one (float16, bfloat16, float32,
    /// float64).
    #[error("expected a floating-point tensor, got {kind:?}")]
    NotFloatingPoint {
        /// The tensor's element type.
        kind: tch::Kind,
    },
    /// A tensor whose shape does not fit the operation.
    #[error("{op}: {detail}")]
    Shape {
        /// The operation (`"linear"`, `"conv2d"`).
        op: &'static str,
        /// What does not fit.
        detail: String,
    },
    /// An error from LibTorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result with this crate's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;
