//! The bundled MNIST copy (the only slow test: about a second to decompress and parse).

use std::path::Path;

use mnist_data::{Dataset, IMAGE_SIDE, Normalization};

/// Tolerance for the train pixel mean on a 0..1 scale.
const MEAN_TOLERANCE: f64 = 1e-4;
/// Tolerance for fitted normalisation statistics against the usual MNIST constants.
const NORM_TOLERANCE: f32 = 1e-3;

const TRAIN_COUNTS: [usize; 10] = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949];
const TEST_COUNTS: [usize; 10] = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009];

#[test]
fn bundled_mnist() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../datasets/mnist"));
    let data = Dataset::load(dir).unwrap();
    assert_eq!((data.train.len(), data.test.len()), (60_000, 10_000));
    for split in [&data.train, &data.test] {
        assert_eq!((split.rows(), split.cols()), (IMAGE_SIDE, IMAGE_SIDE));
    }
    assert_eq!(data.train.class_counts(), TRAIN_COUNTS);
    assert_eq!(data.test.class_counts(), TEST_COUNTS);

    let sum: u64 = data.train.images.iter().map(|&p| u64::from(p)).sum();
    let mean = sum as f64 / (data.train.images.len() as f64 * 255.0);
    assert!(
        (mean - 0.13066).abs() < MEAN_TOLERANCE,
        "train pixel mean {mean}"
    );
    let fitted = Normalization::fit(&data.train).unwrap();
    let mnist = Normalization::default();
    assert!(
        (fitted.mean - mnist.mean).abs() < NORM_TOLERANCE
            && (fitted.std - mnist.std).abs() < NORM_TOLERANCE,
        "{fitted:?}"
    );

    let tenth = data.train.stratified_subset(0.1, 0).unwrap();
    let expected = TRAIN_COUNTS.map(|c| (c as f64 * 0.1).round() as usize);
    assert_eq!(tenth.class_counts(), expected);
}
