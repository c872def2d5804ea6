//! Loading (and writing) a folder of four gzip IDX files with an optional `SHA256SUMS` manifest.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::idx::{encode_images, encode_labels, gunzip, gzip, parse_images, parse_labels};
use crate::{Error, Result, Split};

/// The four files of a dataset folder: train images, train labels, test images, test labels.
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];

/// The optional checksum manifest of a dataset folder, in `sha256sum` format.
pub const MANIFEST: &str = "SHA256SUMS";

/// A training and a test split with the same image size.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// The training split (`train-*` files).
    pub train: Split,
    /// The test split (`t10k-*` files).
    pub test: Split,
}

impl Dataset {
    /// Loads the four [`FILES`] of `dir`.
    ///
    /// If `dir` contains a [`MANIFEST`], it must list every file with its SHA-256 (of the `.gz`
    /// bytes) and every file must match; without a manifest the files load unverified. Both
    /// splits must have the same image size.
    pub fn load(dir: &Path) -> Result<Dataset> {
        check_folder(dir)?;
        let manifest = read_manifest(&dir.join(MANIFEST))?;
        let [train_images, train_labels, test_images, test_labels] =
            FILES.map(|name| dir.join(name));
        let train = load_split(&train_images, &train_labels, manifest.as_ref())?;
        let test = load_split(&test_images, &test_labels, manifest.as_ref())?;
        if (train.rows(), train.cols()) != (test.rows(), test.cols()) {
            return Err(Error::WrongDimensions {
                file: test_images.display().to_string(),
                reason: format!(
                    "images are {}x{} but {} has {}x{}",
                    test.rows(),
                    test.cols(),
                    train_images.display(),
                    train.rows(),
                    train.cols()
                ),
            });
        }
        Ok(Dataset { train, test })
    }

    /// Loads only the test split (the `t10k-*` [`FILES`]) of `dir`, verified against the
    /// folder's [`MANIFEST`] like [`Dataset::load`] does; for callers that only evaluate.
    pub fn load_test(dir: &Path) -> Result<Split> {
        check_folder(dir)?;
        let manifest = read_manifest(&dir.join(MANIFEST))?;
        load_split(&dir.join(FILES[2]), &dir.join(FILES[3]), manifest.as_ref())
    }

    /// Writes the dataset to `dir` (created if needed) as the four gzip [`FILES`] plus a
    /// [`MANIFEST`], in the layout [`Dataset::load`] reads.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let raw = [
            encode_images(&self.train.images)?,
            encode_labels(&self.train.labels)?,
            encode_images(&self.test.images)?,
            encode_labels(&self.test.labels)?,
        ];
        let mut manifest = String::new();
        for (name, raw) in FILES.iter().zip(raw) {
            let path = dir.join(name);
            let gz = gzip(&raw).map_err(io(&path))?;
            std::fs::write(&path, &gz).map_err(io(&path))?;
            let _ = writeln!(manifest, "{}  {name}", sha256_hex(&gz));
        }
        let path = dir.join(MANIFEST);
        std::fs::write(&path, manifest).map_err(io(&path))
    }
}

/// Fails unless `dir` is an existing folder, so that a wrong path is named as such rather
/// than as a missing file inside it.
fn check_folder(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Error::NotAFolder {
            path: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::MissingFolder {
            path: dir.to_path_buf(),
        }),
        Err(source) => Err(Error::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Reads, verifies and parses one images file and one labels file.
fn load_split(images: &Path, labels: &Path, manifest: Option<&Manifest>) -> Result<Split> {
    let images_name = images.display().to_string();
    let labels_name = labels.display().to_string();
    let images = parse_images(
        &images_name,
        &gunzip(&images_name, &read_verified(images, manifest)?)?,
    )?;
    let labels = parse_labels(
        &labels_name,
        &gunzip(&labels_name, &read_verified(labels, manifest)?)?,
    )?;
    if images.len_of(ndarray::Axis(0)) != labels.len() {
        return Err(Error::CountMismatch {
            images: images_name,
            image_count: images.len_of(ndarray::Axis(0)),
            labels: labels_name,
            label_count: labels.len(),
        });
    }
    Ok(Split { images, labels })
}

/// A parsed manifest: its path and the lowercase hex digest of each listed file name.
struct Manifest {
    path: PathBuf,
    sums: HashMap<String, String>,
}

/// Reads the manifest at `path`, or `None` if there is none.
fn read_manifest(path: &Path) -> Result<Option<Manifest>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut sums = HashMap::new();
    for (line_no, line) in (1..).zip(bytes.split(|&b| b == b'\n')) {
        let malformed = |reason: &str| Error::ManifestMalformed {
            path: path.to_path_buf(),
            line: line_no,
            reason: reason.into(),
        };
        let line = std::str::from_utf8(line).map_err(|_| malformed("not valid UTF-8"))?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let (digest, rest) = line
            .split_at_checked(64)
            .ok_or_else(|| malformed("expected a 64-digit hex SHA-256"))?;
        if !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed("expected a 64-digit hex SHA-256"));
        }
        let name = rest
            .strip_prefix("  ")
            .or_else(|| rest.strip_prefix(" *"))
            .filter(|name| !name.is_empty())
            .ok_or_else(|| {
                malformed(
                    "expected two spaces (or a space and '*') and a file name after the digest",
                )
            })?;
        if sums
            .insert(name.to_owned(), digest.to_ascii_lowercase())
            .is_some()
        {
            return Err(malformed(&format!("duplicate entry for {name}")));
        }
    }
    Ok(Some(Manifest {
        path: path.to_path_buf(),
        sums,
    }))
}

/// Reads a file and checks it against the manifest, if any.
fn read_verified(path: &Path, manifest: Option<&Manifest>) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => Error::MissingFile {
            path: path.to_path_buf(),
        },
        _ => Error::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    if let Some(manifest) = manifest {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let expected = manifest
            .sums
            .get(&name)
            .ok_or_else(|| Error::NotInManifest {
                path: manifest.path.clone(),
                file: name,
            })?;
        let actual = sha256_hex(&bytes);
        if *expected != actual {
            return Err(Error::ChecksumMismatch {
                path: path.to_path_buf(),
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok(bytes)
}

/// Wraps an I/O error on `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(text: &str) -> Result<Option<Manifest>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST);
        std::fs::write(&path, text).unwrap();
        read_manifest(&path)
    }

    #[test]
    fn manifest_formats() {
        let hex = "AB".repeat(32);
        let sums = manifest(&format!("{hex}  a b.gz\r\n\n{hex} *c.gz\n"))
            .unwrap()
            .unwrap()
            .sums;
        assert_eq!(sums.len(), 2);
        assert_eq!(sums["a b.gz"], "ab".repeat(32));
        assert!(sums.contains_key("c.gz"));
        assert!(manifest("").unwrap().unwrap().sums.is_empty());
        assert!(
            read_manifest(Path::new("/nonexistent/SHA256SUMS"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn malformed_manifest_lines() {
        let hex = "0".repeat(64);
        for (text, line) in [
            (format!("{hex}  a\n{}  b", "0".repeat(63)), 2),
            (format!("{}  a", "g".repeat(64)), 1),
            (format!("{hex} a"), 1),
            (format!("{hex}  "), 1),
            (format!("\n\n{hex}"), 3),
            (format!("{hex}  a\n{hex}  a"), 2),
            ("é".repeat(40), 1),
        ] {
            let err = manifest(&text).err().unwrap();
            assert!(
                matches!(err, Error::ManifestMalformed { line: l, .. } if l == line),
                "{text:?}: {err}"
            );
            assert!(err.to_string().contains(MANIFEST), "{err}");
        }
    }

    #[test]
    fn sha256_of_empty_input() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
