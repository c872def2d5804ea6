//! One split of a dataset, its normalisation and stratified subsets.

use ndarray::{Array1, Array3, Array4, Axis};
use rand::seq::SliceRandom;

use crate::batch::seeded_rng;
use crate::idx::NUM_CLASSES;
use crate::{Error, Result};

/// RNG stream of [`Split::stratified_subset`], distinct from the batcher's.
const SUBSET_STREAM: u64 = 1;

/// Images and their labels; `images.len_of(Axis(0)) == labels.len()` for splits produced by this
/// crate.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// Pixels, shape `(n, rows, cols)`, 0 (background) to 255.
    pub images: Array3<u8>,
    /// Class labels, shape `(n,)`, in `0..=9`.
    pub labels: Array1<u8>,
}

/// Per-pixel normalisation `(pixel / 255 - mean) / std`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalization {
    /// Mean pixel value on a 0..1 scale.
    pub mean: f32,
    /// Standard deviation of pixel values on a 0..1 scale.
    pub std: f32,
}

impl Normalization {
    /// The usual statistics of the MNIST training set.
    pub const MNIST: Self = Self {
        mean: 0.1307,
        std: 0.3081,
    };

    /// Checks that both values are finite and `std > 0`.
    pub fn new(mean: f32, std: f32) -> Result<Self> {
        if mean.is_finite() && std.is_finite() && std > 0.0 {
            Ok(Self { mean, std })
        } else {
            Err(Error::InvalidNormalization { mean, std })
        }
    }

    /// The pixel mean and standard deviation of a split (for other datasets such as
    /// Fashion-MNIST); fails if the split has no pixels or all pixels are equal.
    pub fn fit(split: &Split) -> Result<Self> {
        let mut histogram = [0u64; 256];
        split
            .images
            .iter()
            .for_each(|&p| histogram[usize::from(p)] += 1);
        let n: u64 = histogram.iter().sum();
        let moment = |k: i32| {
            let sum: f64 = histogram
                .iter()
                .zip(0u32..)
                .map(|(&c, p)| c as f64 * (f64::from(p) / 255.0).powi(k))
                .sum();
            sum / n as f64
        };
        let (mean, square) = (moment(1), moment(2));
        Self::new(mean as f32, (square - mean * mean).max(0.0).sqrt() as f32)
    }
}

impl Default for Normalization {
    /// [`Normalization::MNIST`].
    fn default() -> Self {
        Self::MNIST
    }
}

impl Split {
    /// The number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the split has no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image height.
    pub fn rows(&self) -> usize {
        self.images.len_of(Axis(1))
    }

    /// Image width.
    pub fn cols(&self) -> usize {
        self.images.len_of(Axis(2))
    }

    /// The images as `(n, 1, rows, cols)` floats `(pixel / 255 - mean) / std`.
    pub fn normalized(&self, norm: Normalization) -> Array4<f32> {
        let table: Vec<f32> = (0..=255u8)
            .map(|p| (f32::from(p) / 255.0 - norm.mean) / norm.std)
            .collect();
        self.images
            .mapv(|p| table[usize::from(p)])
            .insert_axis(Axis(1))
    }

    /// The number of samples of each class; labels outside `0..=9` are not counted.
    pub fn class_counts(&self) -> [usize; NUM_CLASSES] {
        let mut counts = [0; NUM_CLASSES];
        for &label in &self.labels {
            if let Some(c) = counts.get_mut(usize::from(label)) {
                *c += 1;
            }
        }
        counts
    }

    /// The samples at `indices`, in that order (indices may repeat).
    ///
    /// # Panics
    /// If an index is out of bounds.
    pub fn select(&self, indices: &[usize]) -> Split {
        Split {
            images: self.images.select(Axis(0), indices),
            labels: self.labels.select(Axis(0), indices),
        }
    }

    /// A stratified subset: of each class present, `round(fraction * count)` samples (at least
    /// one), picked by a shuffle seeded with `seed`. The picked samples keep their original
    /// relative order, so the result is deterministic for a seed, and `fraction == 1.0` returns
    /// the whole split. Samples with labels outside `0..=9` are never picked.
    ///
    /// Fails with [`Error::InvalidFraction`] unless `0 < fraction <= 1`.
    pub fn stratified_subset(&self, fraction: f64, seed: u64) -> Result<Split> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::InvalidFraction { fraction });
        }
        let mut by_class: [Vec<usize>; NUM_CLASSES] = Default::default();
        for (i, &label) in self.labels.iter().enumerate() {
            if let Some(class) = by_class.get_mut(usize::from(label)) {
                class.push(i);
            }
        }
        let mut rng = seeded_rng(seed, 0, SUBSET_STREAM);
        let mut picked: Vec<usize> = by_class
            .iter_mut()
            .filter(|class| !class.is_empty())
            .flat_map(|class| {
                let keep = ((fraction * class.len() as f64).round() as usize).clamp(1, class.len());
                class.shuffle(&mut rng);
                class.drain(..keep)
            })
            .collect();
        picked.sort_unstable();
        Ok(self.select(&picked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tolerance for comparing normalised pixel values.
    const PIXEL_TOLERANCE: f32 = 1e-6;

    #[test]
    fn normalization_validation() {
        assert_eq!(
            Normalization::default(),
            Normalization::new(0.1307, 0.3081).unwrap()
        );
        for (mean, std) in [
            (f32::NAN, 1.0),
            (0.0, f32::INFINITY),
            (0.0, 0.0),
            (0.0, -1.0),
            (f32::NEG_INFINITY, 1.0),
        ] {
            let err = Normalization::new(mean, std).unwrap_err();
            assert!(matches!(err, Error::InvalidNormalization { .. }), "{err}");
        }
    }

    #[test]
    fn fit_matches_direct_statistics() {
        let split = Split {
            images: Array3::from_shape_vec((1, 1, 4), vec![0, 255, 0, 255]).unwrap(),
            labels: Array1::from(vec![0]),
        };
        let norm = Normalization::fit(&split).unwrap();
        assert!(
            (norm.mean - 0.5).abs() < PIXEL_TOLERANCE && (norm.std - 0.5).abs() < PIXEL_TOLERANCE,
            "{norm:?}"
        );
        let flat = Split {
            images: Array3::zeros((2, 2, 2)),
            labels: Array1::zeros(2),
        };
        assert!(matches!(
            Normalization::fit(&flat),
            Err(Error::InvalidNormalization { .. })
        ));
        let empty = Split {
            images: Array3::zeros((0, 2, 2)),
            labels: Array1::zeros(0),
        };
        assert!(Normalization::fit(&empty).is_err());
    }
}
