//! Property tests of the IDX/gzip parsers: round trips, truncation, corruption, arbitrary input.

use mnist_data::{
    Dataset, Error, Split, encode_images, encode_labels, gunzip, parse_images, parse_labels,
};
use ndarray::{Array1, Array3};
use proptest::prelude::*;

use crate::common::gz;

/// A random valid split: up to 12 images of up to 6x6 pixels, labels in 0..=9.
fn any_split() -> impl Strategy<Value = Split> {
    (0..12usize, 1..7usize, 1..7usize).prop_flat_map(|(n, rows, cols)| {
        (
            prop::collection::vec(any::<u8>(), n * rows * cols),
            prop::collection::vec(0..10u8, n),
        )
            .prop_map(move |(pixels, labels)| Split {
                images: Array3::from_shape_vec((n, rows, cols), pixels).unwrap(),
                labels: Array1::from(labels),
            })
    })
}

/// Both IDX encodings of a split.
fn encoded(split: &Split) -> [Vec<u8>; 2] {
    [
        encode_images(&split.images).unwrap(),
        encode_labels(&split.labels).unwrap(),
    ]
}

/// Parses decompressed IDX bytes as images (`kind == 0`) or labels (`kind == 1`).
fn parse(kind: usize, bytes: &[u8]) -> Result<(), Error> {
    if kind == 0 {
        parse_images("f", bytes).map(drop)
    } else {
        parse_labels("f", bytes).map(drop)
    }
}

proptest! {
    #[test]
    fn gzip_idx_round_trip(split in any_split()) {
        let [images, labels] = encoded(&split);
        prop_assert_eq!(parse_images("i", &gunzip("i", &gz(&images))?)?, split.images);
        prop_assert_eq!(parse_labels("l", &gunzip("l", &gz(&labels))?)?, split.labels);
    }

    #[test]
    fn dataset_round_trip(train in any_split(), test_n in 0..5usize) {
        let test = train.select(&(0..test_n.min(train.len())).collect::<Vec<_>>());
        let data = Dataset { train, test };
        let dir = tempfile::tempdir().unwrap();
        data.save(dir.path())?;
        prop_assert_eq!(Dataset::load(dir.path())?, data);
    }

    #[test]
    fn truncation_is_an_error(split in any_split(), kind in 0..2usize, cut in any::<prop::sample::Index>()) {
        let raw = &encoded(&split)[kind];
        let short = &raw[..cut.index(raw.len())];
        prop_assert!(parse(kind, short).is_err());
        let gz = gz(raw);
        let short_gz = &gz[..cut.index(gz.len())];
        let result = gunzip("g", short_gz);
        prop_assert!(matches!(result, Err(Error::BadGzip { .. })), "{:?}", result);
    }

    #[test]
    fn corruption_never_panics(
        split in any_split(),
        kind in 0..2usize,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..4),
    ) {
        let raw = &encoded(&split)[kind];
        let corrupt = |bytes: &[u8]| {
            let mut bytes = bytes.to_vec();
            for (at, value, flip) in &edits {
                let i = at.index(bytes.len());
                bytes[i] = if *flip { bytes[i] ^ (1 << (value % 8)) } else { *value };
            }
            bytes
        };
        let _ = parse(kind, &corrupt(raw));
        if let Ok(bytes) = gunzip("g", &corrupt(&gz(raw))) {
            let _ = parse(kind, &bytes);
        }
    }

    #[test]
    fn header_corruption_is_an_error(split in any_split(), kind in 0..2usize, at in 0..16usize, flip in 1..=255u8) {
        prop_assume!(!split.is_empty());
        let mut raw = encoded(&split)[kind].clone();
        let header_len = if kind == 0 { 16 } else { 8 };
        let at = at % header_len;
        raw[at] ^= flip;
        let result = parse(kind, &raw);
        if at < 4 {
            prop_assert!(matches!(result, Err(Error::WrongMagic { .. })), "{:?}", result);
        } else {
            prop_assert!(result.is_err());
        }
    }

    #[test]
    fn out_of_range_label_is_an_error(split in any_split(), at in any::<prop::sample::Index>(), label in 10..=255u8) {
        prop_assume!(!split.is_empty());
        let mut raw = encode_labels(&split.labels).unwrap();
        let index = at.index(split.len());
        raw[8 + index] = label;
        let result = parse_labels("l", &raw);
        let expected = matches!(result, Err(Error::LabelOutOfRange { index: i, label: l, .. }) if i == index && l == label);
        prop_assert!(expected, "{:?}", result);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), header in 0..4usize) {
        // Prefixes steer the input past the first checks: gzip magic, IDX3 magic, IDX1 magic.
        let prefix: &[u8] = [&[][..], &[0x1f, 0x8b, 8], &[0, 0, 8, 3], &[0, 0, 8, 1]][header];
        let bytes = [prefix, &bytes].concat();
        let _ = gunzip("g", &bytes);
        let _ = parse_images("i", &bytes);
        let _ = parse_labels("l", &bytes);
    }
}
