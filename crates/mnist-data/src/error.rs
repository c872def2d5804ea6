//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading, verifying or using a dataset.
///
/// Variants about files on disk carry the full `path`; variants raised by the byte-level parsers
/// carry the `file` name the caller passed in (the loader passes the full path).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The dataset folder does not exist.
    #[error("the dataset folder {} does not exist", path.display())]
    MissingFolder {
        /// The folder that was looked for.
        path: PathBuf,
    },
    /// No dataset folder was named and none was found where [`crate::data_dir`] looks; the
    /// message names every place looked at and how to name the folder.
    #[error("{}", crate::location::no_data_dir_message(variable.as_deref(), default.as_deref()))]
    NoDataDir {
        /// The folder [`crate::DATA_DIR_VAR`] names, when it is set (and is not a folder).
        variable: Option<PathBuf>,
        /// The default folder under the current folder, when it was looked for.
        default: Option<PathBuf>,
    },
    /// The dataset path exists but is not a folder.
    #[error("the dataset path {} is not a folder", path.display())]
    NotAFolder {
        /// The path given as the dataset folder.
        path: PathBuf,
    },
    /// A required file does not exist.
    #[error("missing file {}", path.display())]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
    },
    /// Reading or writing a file failed for a reason other than its absence.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file's SHA-256 differs from the one in the manifest.
    #[error("checksum mismatch for {}: expected {expected}, got {actual}", path.display())]
    ChecksumMismatch {
        /// The file whose checksum was checked.
        path: PathBuf,
        /// The lowercase hex digest listed in the manifest.
        expected: String,
        /// The lowercase hex digest of the file.
        actual: String,
    },
    /// A line of the manifest is not in `sha256sum` format.
    #[error("malformed manifest {} at line {line}: {reason}", path.display())]
    ManifestMalformed {
        /// The manifest file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },
    /// The manifest exists but does not list a required file.
    #[error("manifest {} does not list {file}", path.display())]
    NotInManifest {
        /// The manifest file.
        path: PathBuf,
        /// The file name that is missing from it.
        file: String,
    },
    /// The data is not a valid gzip stream.
    #[error("bad gzip data in {file}: {reason}")]
    BadGzip {
        /// The file being decompressed.
        file: String,
        /// What the decoder reported.
        reason: String,
    },
    /// The decompressed data exceeds the size cap (a decompression bomb or a foreign file).
    #[error("decompressed data of {file} exceeds {limit} bytes")]
    TooLarge {
        /// The file being decompressed.
        file: String,
        /// The cap in bytes.
        limit: usize,
    },
    /// The IDX magic number is not the expected one.
    #[error("wrong magic number in {file}: expected {expected:#010x}, found {found:#010x}")]
    WrongMagic {
        /// The file being parsed.
        file: String,
        /// The magic number of the expected IDX kind.
        expected: u32,
        /// The magic number in the file.
        found: u32,
    },
    /// The IDX dimensions are unusable: zero or oversized sides, an overflowing size, or sides
    /// that differ between the train and test splits.
    #[error("wrong dimensions in {file}: {reason}")]
    WrongDimensions {
        /// The file being parsed.
        file: String,
        /// What is wrong with the dimensions.
        reason: String,
    },
    /// The data is shorter than its header (or the header itself) requires.
    #[error("truncated {file}: expected {expected} bytes, got {actual}")]
    Truncated {
        /// The file being parsed.
        file: String,
        /// The length in bytes the header implies (or the header length).
        expected: usize,
        /// The actual length in bytes.
        actual: usize,
    },
    /// The data is longer than its header says: trailing garbage.
    #[error("trailing data in {file}: expected {expected} bytes, got {actual}")]
    TrailingData {
        /// The file being parsed.
        file: String,
        /// The length in bytes the header implies.
        expected: usize,
        /// The actual length in bytes.
        actual: usize,
    },
    /// An images file and its labels file hold different numbers of samples.
    #[error(
        "count mismatch: {images} has {image_count} images but {labels} has {label_count} labels"
    )]
    CountMismatch {
        /// The images file.
        images: String,
        /// The number of images.
        image_count: usize,
        /// The labels file.
        labels: String,
        /// The number of labels.
        label_count: usize,
    },
    /// A label is not a digit class `0..=9`.
    #[error("label out of range in {file}: label {label} at index {index} is not in 0..=9")]
    LabelOutOfRange {
        /// The labels file.
        file: String,
        /// The 0-based sample index.
        index: usize,
        /// The offending label.
        label: u8,
    },
    /// A subset fraction outside `(0, 1]`.
    #[error("invalid fraction {fraction}: must be in (0, 1]")]
    InvalidFraction {
        /// The rejected fraction.
        fraction: f64,
    },
    /// A batch size of zero.
    #[error("invalid batch size 0: must be at least 1")]
    InvalidBatchSize,
    /// A non-finite mean or std, or a std that is not positive.
    #[error("invalid normalization (mean {mean}, std {std}): both must be finite and std > 0")]
    InvalidNormalization {
        /// The rejected mean.
        mean: f32,
        /// The rejected standard deviation.
        std: f32,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
