//! One test per error variant, on a forged dataset folder.

use std::path::Path;

use mnist_data::{Dataset, Error, FILES, MANIFEST};

use crate::common::{forge, gz, raw, saved};

const TRAIN_IMAGES: &str = FILES[0];
const TRAIN_LABELS: &str = FILES[1];
const TEST_IMAGES: &str = FILES[2];
const TEST_LABELS: &str = FILES[3];

/// Loads `dir`, expecting an error whose message names `dir/name`.
fn load_err(dir: &Path, name: &str) -> Error {
    let err = Dataset::load(dir).expect_err("load should fail");
    let path = dir.join(name).display().to_string();
    assert!(
        err.to_string().contains(&path),
        "message {err:?} does not name {path}"
    );
    err
}

#[test]
fn saved_dataset_loads_back() {
    let (data, dir) = saved();
    assert_eq!(Dataset::load(dir.path()).unwrap(), data);
}

#[test]
fn missing_file() {
    let (_, dir) = saved();
    std::fs::remove_file(dir.path().join(TRAIN_LABELS)).unwrap();
    assert!(matches!(
        load_err(dir.path(), TRAIN_LABELS),
        Error::MissingFile { .. }
    ));
}

#[test]
fn unreadable_file_is_io() {
    let (_, dir) = saved();
    std::fs::remove_file(dir.path().join(TEST_IMAGES)).unwrap();
    std::fs::create_dir(dir.path().join(TEST_IMAGES)).unwrap();
    assert!(matches!(
        load_err(dir.path(), TEST_IMAGES),
        Error::Io { .. }
    ));
}

#[test]
fn checksum_mismatch() {
    let (_, dir) = saved();
    let path = dir.path().join(TEST_LABELS);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.push(0);
    std::fs::write(&path, bytes).unwrap();
    let err = load_err(dir.path(), TEST_LABELS);
    assert!(
        matches!(&err, Error::ChecksumMismatch { expected, actual, .. } if expected != actual),
        "{err}"
    );
    assert!(
        err.to_string().starts_with("checksum mismatch for "),
        "{err}"
    );
}

#[test]
fn bad_gzip() {
    let (_, dir) = saved();
    forge(dir.path(), TEST_IMAGES, b"this is not gzip");
    assert!(matches!(
        load_err(dir.path(), TEST_IMAGES),
        Error::BadGzip { .. }
    ));
    let mut corrupt = gz(&raw(dir.path(), TRAIN_IMAGES));
    let last = corrupt.len() - 6; // inside the CRC-32 trailer
    corrupt[last] ^= 0xff;
    forge(dir.path(), TRAIN_IMAGES, &corrupt);
    assert!(matches!(
        load_err(dir.path(), TRAIN_IMAGES),
        Error::BadGzip { .. }
    ));
}

#[test]
fn wrong_magic() {
    let (_, dir) = saved();
    forge(
        dir.path(),
        TRAIN_LABELS,
        &std::fs::read(dir.path().join(TRAIN_IMAGES)).unwrap(),
    );
    let err = load_err(dir.path(), TRAIN_LABELS);
    assert!(
        matches!(
            err,
            Error::WrongMagic {
                expected: 0x801,
                found: 0x803,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn wrong_dimensions_zero_rows() {
    let (_, dir) = saved();
    let mut bytes = raw(dir.path(), TRAIN_IMAGES);
    bytes[8..12].copy_from_slice(&0u32.to_be_bytes());
    forge(dir.path(), TRAIN_IMAGES, &gz(&bytes));
    assert!(matches!(
        load_err(dir.path(), TRAIN_IMAGES),
        Error::WrongDimensions { .. }
    ));
}

#[test]
fn wrong_dimensions_between_splits() {
    let (mut data, dir) = saved();
    data.test = crate::common::split(12, 4, 5);
    data.save(dir.path()).unwrap();
    let err = load_err(dir.path(), TEST_IMAGES);
    assert!(matches!(err, Error::WrongDimensions { .. }), "{err}");
    assert!(err.to_string().contains(TRAIN_IMAGES), "{err}");
}

#[test]
fn truncated() {
    let (_, dir) = saved();
    let bytes = raw(dir.path(), TEST_IMAGES);
    forge(dir.path(), TEST_IMAGES, &gz(&bytes[..bytes.len() - 3]));
    let err = load_err(dir.path(), TEST_IMAGES);
    assert!(
        matches!(err, Error::Truncated { expected, actual, .. } if expected == actual + 3),
        "{err}"
    );
}

#[test]
fn trailing_data() {
    let (_, dir) = saved();
    let mut bytes = raw(dir.path(), TRAIN_LABELS);
    bytes.extend([1, 2]);
    forge(dir.path(), TRAIN_LABELS, &gz(&bytes));
    let err = load_err(dir.path(), TRAIN_LABELS);
    assert!(
        matches!(err, Error::TrailingData { expected, actual, .. } if expected + 2 == actual),
        "{err}"
    );
}

#[test]
fn count_mismatch() {
    let (mut data, dir) = saved();
    data.test.labels = data.test.labels.slice_move(ndarray::s![..11]);
    data.save(dir.path()).unwrap();
    let err = load_err(dir.path(), TEST_LABELS);
    assert!(
        matches!(
            err,
            Error::CountMismatch {
                image_count: 12,
                label_count: 11,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(TEST_IMAGES), "{err}");
}

#[test]
fn label_out_of_range() {
    let (_, dir) = saved();
    let mut bytes = raw(dir.path(), TRAIN_LABELS);
    bytes[8 + 17] = 10;
    forge(dir.path(), TRAIN_LABELS, &gz(&bytes));
    let err = load_err(dir.path(), TRAIN_LABELS);
    assert!(
        matches!(
            err,
            Error::LabelOutOfRange {
                index: 17,
                label: 10,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn malformed_manifest() {
    let (_, dir) = saved();
    let path = dir.path().join(MANIFEST);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("deadbeef  extra.gz\n");
    std::fs::write(&path, text).unwrap();
    let err = load_err(dir.path(), MANIFEST);
    assert!(
        matches!(err, Error::ManifestMalformed { line: 5, .. }),
        "{err}"
    );
}

#[test]
fn not_in_manifest() {
    let (_, dir) = saved();
    let path = dir.path().join(MANIFEST);
    let text = std::fs::read_to_string(&path).unwrap();
    let kept: String = text
        .lines()
        .filter(|l| !l.ends_with(TEST_LABELS))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, kept).unwrap();
    let err = load_err(dir.path(), MANIFEST);
    assert!(
        matches!(&err, Error::NotInManifest { file, .. } if file == TEST_LABELS),
        "{err}"
    );
    assert!(err.to_string().contains(TEST_LABELS), "{err}");
}

#[test]
fn without_manifest_files_load_unverified() {
    let (data, dir) = saved();
    std::fs::remove_file(dir.path().join(MANIFEST)).unwrap();
    // Re-compressing changes the .gz bytes; without a manifest that is fine.
    forge(
        dir.path(),
        TRAIN_IMAGES,
        &gz(&raw(dir.path(), TRAIN_IMAGES)),
    );
    std::fs::remove_file(dir.path().join(MANIFEST)).unwrap();
    assert_eq!(Dataset::load(dir.path()).unwrap(), data);
}

#[test]
fn a_missing_or_non_folder_path_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let err = Dataset::load(&missing).unwrap_err();
    assert!(matches!(err, Error::MissingFolder { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!("the dataset folder {} does not exist", missing.display())
    );
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a folder").unwrap();
    let err = Dataset::load_test(&file).unwrap_err();
    assert!(matches!(err, Error::NotAFolder { .. }), "{err}");
    assert!(err.to_string().contains("is not a folder"), "{err}");
}

#[test]
fn load_test_reads_and_verifies_the_test_split_only() {
    let (data, dir) = saved();
    // The training files play no part: without them the test split still loads.
    std::fs::remove_file(dir.path().join(TRAIN_IMAGES)).unwrap();
    assert_eq!(Dataset::load_test(dir.path()).unwrap(), data.test);
    let path = dir.path().join(TEST_LABELS);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.push(0);
    std::fs::write(&path, bytes).unwrap();
    let err = Dataset::load_test(dir.path()).unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
}

#[test]
fn a_truncated_gzip_stream_says_so() {
    let (_, dir) = saved();
    let mut bytes = std::fs::read(dir.path().join(TEST_IMAGES)).unwrap();
    bytes.truncate(bytes.len() / 2);
    forge(dir.path(), TEST_IMAGES, &bytes);
    let err = load_err(dir.path(), TEST_IMAGES);
    assert!(matches!(err, Error::BadGzip { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
}
