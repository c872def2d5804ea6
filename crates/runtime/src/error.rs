//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while writing, loading or running an artifact.
///
/// Variants raised while decoding carry the `file` they came from: the path for
/// [`Model::load`](crate::Model::load), `<bytes>` for [`Model::from_bytes`](crate::Model::from_bytes).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a well-formed safetensors file (truncated, bad header, bad offsets).
    #[error("{file} is not a valid safetensors file: {reason}")]
    Damaged {
        /// The artifact.
        file: String,
        /// What the parser reported.
        reason: String,
    },
    /// The `format` metadata entry is not `tch-mot`.
    #[error("{file} is not a tch-mot artifact: its format is `{found}`")]
    UnknownFormat {
        /// The artifact.
        file: String,
        /// The format it declares.
        found: String,
    },
    /// The artifact's `format_version` is not one this runtime reads.
    #[error("{file} has format version `{found}`, this runtime reads versions {supported}")]
    UnsupportedVersion {
        /// The artifact.
        file: String,
        /// The version it declares.
        found: String,
        /// The versions this runtime reads.
        supported: &'static str,
    },
    /// A required `__metadata__` entry is absent.
    #[error("{file} lacks the metadata entry `{key}`")]
    MissingMetadata {
        /// The artifact.
        file: String,
        /// The missing key.
        key: &'static str,
    },
    /// A `__metadata__` entry is not the JSON it should be, or its content is inconsistent.
    #[error("{file} has malformed metadata `{key}`: {reason}")]
    MalformedMetadata {
        /// The artifact.
        file: String,
        /// The metadata key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The network description does not hold together.
    #[error("{file} describes an invalid network: {source}")]
    InvalidNetwork {
        /// The artifact.
        file: String,
        /// What the spec validation reported.
        #[source]
        source: model_spec::SpecError,
    },
    /// A tensor that the network and the schemes require is absent.
    #[error("{file} lacks the tensor `{tensor}`")]
    MissingTensor {
        /// The artifact.
        file: String,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor is present in the file but neither the network nor the schemes use it.
    #[error("{file} holds the tensor `{tensor}`, which the network does not use")]
    UnexpectedTensor {
        /// The artifact.
        file: String,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor's shape disagrees with the network or its scheme.
    #[error("{file}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The artifact.
        file: String,
        /// The tensor name.
        tensor: String,
        /// The shape the network and scheme call for.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor's element type disagrees with its scheme.
    #[error("{file}: tensor `{tensor}` has dtype {found}, its scheme needs {expected}")]
    DtypeMismatch {
        /// The artifact.
        file: String,
        /// The tensor name.
        tensor: String,
        /// The dtype the scheme calls for.
        expected: &'static str,
        /// The dtype in the file.
        found: String,
    },
    /// A tensor holds values its scheme forbids (a scale that is not positive and finite,
    /// CSR indices out of range, a non-monotone row pointer, ...).
    #[error("{file}: tensor `{tensor}` is invalid: {reason}")]
    InvalidTensor {
        /// The artifact.
        file: String,
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The artifact is valid but asks for something this runtime does not do.
    #[error("{file}: unsupported: {reason}")]
    Unsupported {
        /// The artifact.
        file: String,
        /// What is not supported.
        reason: String,
    },
    /// Data handed to the [`ArtifactBuilder`](crate::ArtifactBuilder) does not fit together.
    #[error("cannot build the artifact: {reason}")]
    Builder {
        /// What is wrong.
        reason: String,
    },
    /// [`Model::run_raw`](crate::Model::run_raw) on an artifact that records no input
    /// normalization (format version 1, or written without one).
    #[error("{file} records no input normalization: normalise the input and call `run`")]
    NoNormalization {
        /// The artifact.
        file: String,
    },
    /// The input handed to [`Model::run`](crate::Model::run) does not fit the network.
    #[error(
        "input of shape {found:?} does not fit the network, which expects (batch, {expected:?})"
    )]
    InputShape {
        /// The per-sample shape the network expects.
        expected: Vec<usize>,
        /// The shape that was passed.
        found: Vec<usize>,
    },
    /// A batch handed to [`Model::score`](crate::Model::score) has another number of labels
    /// than of images.
    #[error("a batch of {images} images comes with {labels} labels")]
    Labels {
        /// Images in the batch.
        images: usize,
        /// Labels that came with it.
        labels: usize,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
