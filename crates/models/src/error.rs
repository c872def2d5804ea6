use thiserror::Error;

/// Errors of network descriptions and their construction.
#[derive(Debug, Error)]
pub enum Error {
    /// A layer does not fit the shape it receives, or has a nonsensical hyperparameter.
    #[error("layer {index} ({layer}) of network `{network}`: {reason}")]
    InvalidLayer {
        /// Name of the network.
        network: String,
        /// Position of the layer in the sequence.
        index: usize,
        /// The layer's operation name.
        layer: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The network description itself is unusable (no layers, empty input, ...).
    #[error("network `{network}`: {reason}")]
    InvalidNetwork {
        /// Name of the network.
        network: String,
        /// What is wrong.
        reason: String,
    },
    /// An error from LibTorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
