//! Helpers: synthetic datasets, gzip, and forging files in a dataset folder.

use std::io::Write;
use std::path::Path;

use mnist_data::{Dataset, FILES, MANIFEST, Split};
use ndarray::{Array1, Array3};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// A split of `n` images whose first pixel is the sample index and labels cycling 0..=9.
pub fn split(n: usize, rows: usize, cols: usize) -> Split {
    Split {
        images: Array3::from_shape_fn((n, rows, cols), |(i, r, c)| {
            if r + c == 0 {
                i as u8
            } else {
                (r * 7 + c * 3 + i) as u8
            }
        }),
        labels: Array1::from_shape_fn(n, |i| (i % 10) as u8),
    }
}

/// A small synthetic dataset saved (with manifest) in a fresh temporary folder.
pub fn saved() -> (Dataset, TempDir) {
    let data = Dataset {
        train: split(30, 5, 4),
        test: split(12, 5, 4),
    };
    let dir = tempfile::tempdir().unwrap();
    data.save(dir.path()).unwrap();
    (data, dir)
}

pub fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Rewrites the manifest so that it lists the current sums of the files present in `dir`.
pub fn rewrite_manifest(dir: &Path) {
    let manifest: String = FILES
        .iter()
        .filter_map(|name| {
            std::fs::read(dir.join(name))
                .ok()
                .map(|b| format!("{}  {name}\n", sha256_hex(&b)))
        })
        .collect();
    std::fs::write(dir.join(MANIFEST), manifest).unwrap();
}

/// Replaces `name` with `gz_bytes` and updates the manifest to match, so that the failure under
/// test is the content, not the checksum.
pub fn forge(dir: &Path, name: &str, gz_bytes: &[u8]) {
    std::fs::write(dir.join(name), gz_bytes).unwrap();
    rewrite_manifest(dir);
}

/// The decompressed IDX bytes of `name` in `dir`.
pub fn raw(dir: &Path, name: &str) -> Vec<u8> {
    mnist_data::gunzip(name, &std::fs::read(dir.join(name)).unwrap()).unwrap()
}
