//! Batcher, stratified subsets and normalisation.

use std::collections::BTreeSet;

use mnist_data::{Batcher, Error, Normalization, Split};
use ndarray::{Array1, Array3};
use proptest::prelude::*;

use crate::common::split;

/// Tolerance for normalised pixel values.
const PIXEL_TOLERANCE: f32 = 1e-5;

fn is_permutation(batches: &[Vec<usize>], len: usize) -> bool {
    let mut all: Vec<usize> = batches.concat();
    all.sort_unstable();
    all == (0..len).collect::<Vec<_>>()
}

#[test]
fn batcher_is_deterministic_and_epochs_differ() {
    let batcher = Batcher::new(1000, 64, 7).unwrap();
    assert_eq!(
        batcher.epoch(0),
        Batcher::new(1000, 64, 7).unwrap().epoch(0)
    );
    assert_ne!(batcher.epoch(0), batcher.epoch(1));
    assert_ne!(
        batcher.epoch(0),
        Batcher::new(1000, 64, 8).unwrap().epoch(0)
    );
    // Epoch k depends only on (seed, k).
    let fresh = Batcher::new(1000, 64, 7).unwrap().epoch(5);
    (0..5).for_each(|e| drop(batcher.epoch(e)));
    assert_eq!(batcher.epoch(5), fresh);
    assert_eq!(batcher.batches_per_epoch(), 16);
}

#[test]
fn batch_size_zero_is_an_error() {
    assert!(matches!(
        Batcher::new(10, 0, 0),
        Err(Error::InvalidBatchSize)
    ));
}

#[test]
fn invalid_fractions_are_errors() {
    let s = split(20, 2, 2);
    for fraction in [0.0, -0.5, 1.0 + 1e-9, f64::NAN, f64::INFINITY] {
        assert!(
            matches!(
                s.stratified_subset(fraction, 0),
                Err(Error::InvalidFraction { .. })
            ),
            "{fraction}"
        );
    }
}

#[test]
fn full_fraction_is_everything() {
    let s = split(37, 3, 2);
    assert_eq!(s.stratified_subset(1.0, 9).unwrap(), s);
}

#[test]
fn normalized_values() {
    let images = Array3::from_shape_fn((3, 2, 4), |(i, r, c)| (i * 90 + r * 40 + c * 5) as u8);
    let s = Split {
        images,
        labels: Array1::zeros(3),
    };
    let norm = Normalization::new(0.25, 0.5).unwrap();
    let x = s.normalized(norm);
    assert_eq!(x.shape(), &[3, 1, 2, 4]);
    for ((i, _, r, c), &v) in x.indexed_iter() {
        let expected = (f32::from(s.images[(i, r, c)]) / 255.0 - 0.25) / 0.5;
        assert!((v - expected).abs() < PIXEL_TOLERANCE, "{v} vs {expected}");
    }
}

proptest! {
    #[test]
    fn batches_partition_each_epoch(len in 0..300usize, batch_size in 1..70usize, seed: u64, epoch in 0..4u64) {
        let batcher = Batcher::new(len, batch_size, seed).unwrap();
        let batches = batcher.epoch(epoch);
        prop_assert!(is_permutation(&batches, len));
        prop_assert_eq!(batches.len(), batcher.batches_per_epoch());
        prop_assert_eq!(batches.len(), len.div_ceil(batch_size));
        if let Some((last, full)) = batches.split_last() {
            prop_assert!(full.iter().all(|b| b.len() == batch_size));
            prop_assert!((1..=batch_size).contains(&last.len()));
        }
        prop_assert_eq!(batches, batcher.epoch(epoch));
    }

    #[test]
    fn stratified_subset_counts(labels in prop::collection::vec(0..10u8, 0..200), fraction in 0.001..=1.0f64, seed: u64) {
        let n = labels.len();
        // The first pixel of each image is its index, so picked samples can be traced back.
        let s = Split { images: Array3::from_shape_fn((n, 1, 2), |(i, _, c)| if c == 0 { i as u8 } else { 0 }), labels: Array1::from(labels) };
        let sub = s.stratified_subset(fraction, seed)?;
        for (class, (&all, &got)) in s.class_counts().iter().zip(&sub.class_counts()).enumerate() {
            let want = if all == 0 { 0 } else { ((fraction * all as f64).round() as usize).max(1) };
            prop_assert_eq!(got, want, "class {}", class);
        }
        prop_assert_eq!(&sub, &s.stratified_subset(fraction, seed)?);
        let picked: Vec<u8> = sub.images.outer_iter().map(|img| img[(0, 0)]).collect();
        prop_assert!(picked.windows(2).all(|w| w[0] < w[1]), "original order kept, no repeats");
        for (k, &i) in picked.iter().enumerate() {
            prop_assert_eq!(sub.labels[k], s.labels[usize::from(i)]);
        }
        prop_assert_eq!(picked.iter().collect::<BTreeSet<_>>().len(), sub.len());
    }
}
