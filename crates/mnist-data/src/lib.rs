//! MNIST-layout IDX datasets: verified loading, normalisation, seeded shuffling and stratified
//! subsets.
//!
//! A dataset folder holds the four gzip IDX [`FILES`] and, optionally, a [`MANIFEST`] of their
//! SHA-256 sums (`sha256sum` format). [`Dataset::load`] verifies the sums when the manifest is
//! present and validates every header and label; no input bytes can make it panic or allocate
//! more than the data justifies. The bundled MNIST copy lives in `datasets/mnist/` at the
//! workspace root; folders without a manifest (e.g. Fashion-MNIST) load unverified.
//! [`data_dir`] is how the programs find their dataset folder when not told: an explicit
//! `--data-dir`, else the [`DATA_DIR_VAR`] environment variable (`TCH_MOT_MNIST_DIR`), else
//! [`DEFAULT_DATA_DIR`] under the current folder.
//!
//! ```
//! use mnist_data::{Batcher, Dataset, Normalization, Split};
//! use ndarray::{Array1, Array3};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A tiny synthetic dataset, written in the MNIST layout and read back.
//! let split = |n| Split {
//!     images: Array3::from_shape_fn((n, 28, 28), |(i, r, c)| ((i + r * c) % 256) as u8),
//!     labels: Array1::from_shape_fn(n, |i| (i % 10) as u8),
//! };
//! let dir = tempfile::tempdir()?;
//! Dataset { train: split(50), test: split(20) }.save(dir.path())?;
//! let data = Dataset::load(dir.path())?;
//! assert_eq!((data.train.len(), data.train.rows(), data.test.len()), (50, 28, 20));
//!
//! let subset = data.train.stratified_subset(0.2, 7)?;
//! assert_eq!(subset.class_counts(), [1; 10]);
//! let x = subset.normalized(Normalization::default());
//! assert_eq!(x.shape(), &[10, 1, 28, 28]);
//!
//! let batcher = Batcher::new(subset.len(), 4, 42)?;
//! let sizes: Vec<usize> = batcher.epoch(0).iter().map(|b| subset.select(b).len()).collect();
//! assert_eq!(sizes, [4, 4, 2]);
//! # Ok(())
//! # }
//! ```
//!
//! The crate needs no LibTorch; `models::data` turns a split into tch tensors for a
//! training loop.

#![warn(missing_docs)]

mod batch;
mod dataset;
mod error;
mod idx;
mod location;
mod split;

pub use batch::Batcher;
pub use dataset::{Dataset, FILES, MANIFEST};
pub use error::{Error, Result};
pub use idx::{
    IMAGES_MAGIC, LABELS_MAGIC, MAX_DECOMPRESSED_BYTES, MAX_SIDE, NUM_CLASSES, encode_images,
    encode_labels, gunzip, parse_images, parse_labels,
};
pub use location::{DATA_DIR_VAR, DEFAULT_DATA_DIR, data_dir, resolve_data_dir};
pub use split::{Normalization, Split};

/// The image side of MNIST (28x28). Parsing accepts any rows/cols from the header, but
/// [`Dataset::load`] requires both splits to agree.
pub const IMAGE_SIDE: usize = 28;
