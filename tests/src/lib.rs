//! Shared helpers for the cross-crate integration tests in `integration/`.

use std::path::PathBuf;

/// The MNIST copy that ships with the project.
pub fn bundled_mnist() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../datasets/mnist")
}
