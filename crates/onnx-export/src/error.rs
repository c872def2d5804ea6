//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while converting an artifact.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The artifact is not a valid tch-mot artifact (the runtime's loader says why).
    #[error(transparent)]
    Artifact(#[from] runtime::Error),
    /// Reading the artifact or writing the ONNX file failed.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The network holds something the exporter does not convert.
    #[error("cannot export layer {layer} ({op}): {reason}")]
    Unsupported {
        /// The layer's index in the network.
        layer: usize,
        /// The layer's kind, as the network description names it.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// Serialising the protobuf message failed.
    #[error("cannot serialise the ONNX model: {0}")]
    Serialize(#[from] protobuf::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
