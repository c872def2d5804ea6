//! Splits as tch tensors against the ndarray data they come from.

use mnist_data::{Normalization, Split};
use models::data::{DataError, ToTensors};
use ndarray::{Array1, Array3};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

/// A synthetic split of `n` images of `rows x cols`, labels cycling through the classes.
fn split(n: usize, rows: usize, cols: usize) -> Split {
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

/// The tensor's values, in order.
fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

fn labels(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn tensors_are_the_normalised_arrays(
        n in 0usize..20, rows in 1usize..9, cols in 1usize..9,
        mean in 0.0f32..1.0, std in 0.05f32..1.0,
    ) {
        let data = split(n, rows, cols);
        let norm = Normalization::new(mean, std).unwrap();
        let tensors = data.to_tensors(norm, Device::Cpu).unwrap();
        prop_assert_eq!(tensors.images.size(), [n as i64, 1, rows as i64, cols as i64]);
        prop_assert_eq!(tensors.images.kind(), Kind::Float);
        prop_assert_eq!(tensors.labels.kind(), Kind::Int64);
        prop_assert_eq!(tensors.len(), n);
        // The same f32 arithmetic, so the same bits.
        let expected: Vec<f32> = data.normalized(norm).iter().copied().collect();
        prop_assert_eq!(values(&tensors.images), expected);
        let expected: Vec<i64> = data.labels.iter().map(|&l| i64::from(l)).collect();
        prop_assert_eq!(labels(&tensors.labels), expected);
    }

    #[test]
    fn a_batch_is_the_selected_samples(
        (n, indices) in (1usize..30).prop_flat_map(|n| (Just(n), prop::collection::vec(0..n, 0..40))),
    ) {
        let data = split(n, 4, 3);
        let norm = Normalization::default();
        let tensors = data.to_tensors(norm, Device::Cpu).unwrap();
        let batch = tensors.batch(&indices).unwrap();
        let selected = data.select(&indices).to_tensors(norm, Device::Cpu).unwrap();
        prop_assert!(batch.images.equal(&selected.images));
        prop_assert!(batch.labels.equal(&selected.labels));
        let direct = data.batch_tensors(&indices, norm, Device::Cpu).unwrap();
        prop_assert!(direct.images.equal(&selected.images));
        prop_assert!(direct.labels.equal(&selected.labels));
    }
}

#[test]
fn indices_outside_the_split_and_inconsistent_splits_are_errors() {
    let data = split(5, 2, 2);
    let norm = Normalization::default();
    let tensors = data.to_tensors(norm, Device::Cpu).unwrap();
    for err in [
        tensors.batch(&[0, 5]).unwrap_err(),
        data.batch_tensors(&[4, 5, 0], norm, Device::Cpu)
            .unwrap_err(),
    ] {
        assert!(
            matches!(err, DataError::IndexOutOfRange { index: 5, len: 5 }),
            "{err}"
        );
    }
    let inconsistent = Split {
        images: Array3::zeros((3, 2, 2)),
        labels: Array1::zeros(2),
    };
    assert!(matches!(
        inconsistent.to_tensors(norm, Device::Cpu),
        Err(DataError::InconsistentSplit {
            images: 3,
            labels: 2
        })
    ));
    assert!(matches!(
        inconsistent.batch_tensors(&[2], norm, Device::Cpu),
        Err(DataError::IndexOutOfRange { index: 2, len: 2 })
    ));
}

#[test]
fn images_in_any_memory_order_convert_alike() {
    let data = split(4, 3, 5);
    let mut transposed = Array3::zeros((4, 5, 3));
    transposed.assign(&data.images.clone().permuted_axes([0, 2, 1]));
    // The same pixels, stored column-major within each image.
    let fortran = Split {
        images: transposed.permuted_axes([0, 2, 1]),
        labels: data.labels.clone(),
    };
    assert!(!fortran.images.is_standard_layout());
    let norm = Normalization::default();
    let a = data.to_tensors(norm, Device::Cpu).unwrap();
    let b = fortran.to_tensors(norm, Device::Cpu).unwrap();
    assert!(a.images.equal(&b.images));
}
