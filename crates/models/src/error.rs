use thiserror::Error;

/// Errors of network descriptions and their construction.
#[derive(Debug, Error)]
pub enum Error {
    /// The network description does not hold together.
    #[error(transparent)]
    Spec(#[from] model_spec::SpecError),
    /// An error from LibTorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
