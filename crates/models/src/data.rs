//! MNIST-layout splits as tch tensors: what every training loop otherwise writes by hand.
//!
//! `mnist-data` stays free of tch (the runtime's `infer` binary uses it); the conversion lives
//! here, as the [`ToTensors`] extension of [`Split`].

use mnist_data::{Normalization, Split};
use ndarray::Axis;
use tch::{Device, Tensor};

/// Why a split could not become tensors.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A sample index outside the split.
    #[error("sample index {index} is out of range for a split of {len} samples")]
    IndexOutOfRange {
        /// The index asked for.
        index: usize,
        /// The number of samples.
        len: usize,
    },
    /// A split built by hand with a different number of images and labels.
    #[error("the split has {images} images but {labels} labels")]
    InconsistentSplit {
        /// The number of images.
        images: usize,
        /// The number of labels.
        labels: usize,
    },
    /// LibTorch failed (a device it cannot reach, say).
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

type Result<T> = std::result::Result<T, DataError>;

/// A split (or a batch of one) as tch tensors on one device: `images` `[n, 1, rows, cols]`
/// f32, normalised as `Split::normalized` does, and `labels` `[n]` int64.
///
/// ```
/// use mnist_data::{Batcher, Normalization, Split};
/// use models::data::ToTensors;
/// use ndarray::{Array1, Array3};
/// use tch::{Device, Kind};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let split = Split {
///     images: Array3::from_shape_fn((10, 28, 28), |(i, r, c)| ((i + r + c) % 256) as u8),
///     labels: Array1::from_shape_fn(10, |i| (i % 10) as u8),
/// };
/// let norm = Normalization::default();
/// let data = split.to_tensors(norm, Device::Cpu)?;
/// assert_eq!(data.images.size(), [10, 1, 28, 28]);
/// assert_eq!((data.images.kind(), data.labels.kind()), (Kind::Float, Kind::Int64));
/// // Pixel 0 of image 0 is 0: (0 / 255 - mean) / std.
/// let first = data.images.double_value(&[0, 0, 0, 0]);
/// assert!((first - f64::from(-norm.mean / norm.std)).abs() < 1e-6);
///
/// // A training loop's batches, selected on the device by the batcher's positions.
/// let batcher = Batcher::new(split.len(), 4, 7)?;
/// for indices in batcher.epoch(0) {
///     let batch = data.batch(&indices)?;
///     assert_eq!(batch.len(), indices.len());
///     assert_eq!(batch.labels.int64_value(&[0]), indices[0] as i64 % 10);
/// }
/// // Or only the batch converted, leaving the split on the host.
/// let batch = split.batch_tensors(&[9, 2], norm, Device::Cpu)?;
/// assert!(batch.images.equal(&data.batch(&[9, 2])?.images));
/// assert!(data.batch(&[10]).is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SplitTensors {
    /// Normalised images, `[n, 1, rows, cols]`, f32.
    pub images: Tensor,
    /// Class labels, `[n]`, int64.
    pub labels: Tensor,
}

impl SplitTensors {
    /// The number of samples.
    pub fn len(&self) -> usize {
        self.labels.size().first().map_or(0, |&n| n as usize)
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device the tensors are on.
    pub fn device(&self) -> Device {
        self.labels.device()
    }

    /// The samples at `indices`, in that order (repeats allowed), selected on the device;
    /// [`DataError::IndexOutOfRange`] for the first index outside the split.
    pub fn batch(&self, indices: &[usize]) -> Result<SplitTensors> {
        let positions = positions(indices, self.len())?;
        let index = Tensor::f_from_slice(&positions)?.f_to(self.device())?;
        Ok(SplitTensors {
            images: self.images.f_index_select(0, &index)?,
            labels: self.labels.f_index_select(0, &index)?,
        })
    }
}

/// A split as tch tensors.
pub trait ToTensors {
    /// The whole split as tensors on `device` (see [`SplitTensors`]);
    /// [`DataError::InconsistentSplit`] when the split has not one label per image, a
    /// [`DataError::Torch`] error when LibTorch cannot reach the device.
    fn to_tensors(&self, norm: Normalization, device: Device) -> Result<SplitTensors>;

    /// Only the samples at `indices` (in that order, repeats allowed) as tensors on
    /// `device`, for loops that keep the split on the host;
    /// [`DataError::IndexOutOfRange`] for the first index outside the split.
    fn batch_tensors(
        &self,
        indices: &[usize],
        norm: Normalization,
        device: Device,
    ) -> Result<SplitTensors>;
}

impl ToTensors for Split {
    /// [`DataError::InconsistentSplit`] when the split has not one label per image, a
    /// [`DataError::Torch`] error when LibTorch cannot reach the device.
    fn to_tensors(&self, norm: Normalization, device: Device) -> Result<SplitTensors> {
        let (images, labels) = (self.images.len_of(Axis(0)), self.labels.len());
        if images != labels {
            return Err(DataError::InconsistentSplit { images, labels });
        }
        let normalized = self.normalized(norm);
        let shape: Vec<i64> = normalized.shape().iter().map(|&d| d as i64).collect();
        let normalized = normalized.as_standard_layout();
        let pixels = normalized
            .as_slice()
            .expect("an array in standard layout is one slice");
        let labels: Vec<i64> = self.labels.iter().map(|&l| i64::from(l)).collect();
        Ok(SplitTensors {
            images: Tensor::f_from_slice(pixels)?
                .f_view(shape.as_slice())?
                .f_to(device)?,
            labels: Tensor::f_from_slice(&labels)?.f_to(device)?,
        })
    }

    fn batch_tensors(
        &self,
        indices: &[usize],
        norm: Normalization,
        device: Device,
    ) -> Result<SplitTensors> {
        let len = self.len().min(self.images.len_of(Axis(0)));
        positions(indices, len)?;
        self.select(indices).to_tensors(norm, device)
    }
}

/// `indices` as int64 positions, each checked to be below `len`.
fn positions(indices: &[usize], len: usize) -> Result<Vec<i64>> {
    indices
        .iter()
        .map(|&index| {
            if index < len {
                Ok(index as i64)
            } else {
                Err(DataError::IndexOutOfRange { index, len })
            }
        })
        .collect()
}
