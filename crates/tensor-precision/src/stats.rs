//! How much a cast from f32 to a 16-bit format changes the data.

use half::{bf16, f16};
use rayon::prelude::*;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::{Error, HalfFloat, HalfFormat, PARALLEL_THRESHOLD, Result};

/// Values per block of the statistics: converted in bulk into a buffer of this size.
const BLOCK: usize = 1 << 14;

/// What casting a set of f32 values to a 16-bit format does to them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PrecisionStats {
    /// The format cast to.
    pub format: HalfFormat,
    /// Number of values.
    pub values: usize,
    /// Values that were already infinite or NaN (left out of everything below).
    pub non_finite_inputs: usize,
    /// Largest `|x - cast(x)|` over the values whose cast stays finite.
    pub max_abs_error: f64,
    /// Largest `|x - cast(x)| / |x|` over the values in the normal range of the format
    /// (from its smallest normal value to its largest finite one, after rounding).
    pub max_rel_error: f64,
    /// Finite values that become infinite.
    pub overflow_to_inf: usize,
    /// Nonzero values that become zero.
    pub underflow_to_zero: usize,
    /// Values that become subnormal (nonzero, below the smallest normal value).
    pub subnormal: usize,
}

impl PrecisionStats {
    fn empty(format: HalfFormat) -> Self {
        Self {
            format,
            values: 0,
            non_finite_inputs: 0,
            max_abs_error: 0.0,
            max_rel_error: 0.0,
            overflow_to_inf: 0,
            underflow_to_zero: 0,
            subnormal: 0,
        }
    }

    fn merge(self, other: Self) -> Self {
        Self {
            format: self.format,
            values: self.values + other.values,
            non_finite_inputs: self.non_finite_inputs + other.non_finite_inputs,
            max_abs_error: self.max_abs_error.max(other.max_abs_error),
            max_rel_error: self.max_rel_error.max(other.max_rel_error),
            overflow_to_inf: self.overflow_to_inf + other.overflow_to_inf,
            underflow_to_zero: self.underflow_to_zero + other.underflow_to_zero,
            subnormal: self.subnormal + other.subnormal,
        }
    }

    /// Statistics of casting `values` to `format`; in parallel for large inputs.
    ///
    /// ```
    /// use tensor_precision::{HalfFormat, PrecisionStats};
    ///
    /// let stats = PrecisionStats::of_slice(&[1.0, 1e-9, 1e-6, 1e5], HalfFormat::F16);
    /// assert_eq!((stats.underflow_to_zero, stats.subnormal, stats.overflow_to_inf), (1, 1, 1));
    /// ```
    pub fn of_slice(values: &[f32], format: HalfFormat) -> Self {
        match format {
            HalfFormat::F16 => stats_of::<f16>(values),
            HalfFormat::Bf16 => stats_of::<bf16>(values),
        }
    }

    /// Statistics of casting a floating-point tensor (any shape and device; read as f32
    /// first) to `format`.
    pub fn of_tensor(tensor: &Tensor, format: HalfFormat) -> Result<Self> {
        Ok(Self::of_slice(&tensor_to_f32_vec(tensor)?, format))
    }
}

/// The elements of a floating-point tensor as f32, in row-major order, on the CPU.
pub(crate) fn tensor_to_f32_vec(tensor: &Tensor) -> Result<Vec<f32>> {
    let kind = tensor.f_kind()?;
    if !matches!(
        kind,
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
    ) {
        return Err(Error::NotFloatingPoint { kind });
    }
    let flat = tensor
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?
        .f_view([-1])?;
    Ok(Vec::<f32>::try_from(&flat)?)
}

fn stats_of<T: HalfFloat>(values: &[f32]) -> PrecisionStats {
    let empty = PrecisionStats::empty(T::FORMAT);
    if values.len() >= PARALLEL_THRESHOLD {
        values
            .par_chunks(BLOCK)
            .map(block_stats::<T>)
            .reduce(|| empty, PrecisionStats::merge)
    } else {
        values
            .chunks(BLOCK)
            .map(block_stats::<T>)
            .fold(empty, PrecisionStats::merge)
    }
}

fn block_stats<T: HalfFloat>(block: &[f32]) -> PrecisionStats {
    let format = T::FORMAT;
    let mut narrow = vec![T::default(); block.len()];
    T::slice_from_f32(&mut narrow, block);
    let mut cast = vec![0.0f32; block.len()];
    T::slice_to_f32(&narrow, &mut cast);
    let min_normal = format.min_positive_normal();
    let mut stats = PrecisionStats::empty(format);
    stats.values = block.len();
    for (&x, &y) in block.iter().zip(&cast) {
        if !x.is_finite() {
            stats.non_finite_inputs += 1;
            continue;
        }
        if y.is_infinite() {
            stats.overflow_to_inf += 1;
            continue;
        }
        if y == 0.0 && x != 0.0 {
            stats.underflow_to_zero += 1;
        } else if y != 0.0 && y.abs() < min_normal {
            stats.subnormal += 1;
        }
        let abs_error = (f64::from(x) - f64::from(y)).abs();
        stats.max_abs_error = stats.max_abs_error.max(abs_error);
        if x.abs() >= min_normal {
            stats.max_rel_error = stats.max_rel_error.max(abs_error / f64::from(x.abs()));
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_kind_of_damage() {
        let values = [
            0.0,
            -0.0,
            1.0,
            f32::NAN,
            f32::INFINITY,
            70_000.0,  // overflows f16
            65_519.0,  // rounds down to 65504
            -1e-8,     // below half the smallest f16 subnormal: zero
            3e-8,      // just above half of it: the smallest subnormal
            1e-5,      // subnormal in f16
            1.0 / 3.0, // relative error below 2^-11
        ];
        let s = PrecisionStats::of_slice(&values, HalfFormat::F16);
        assert_eq!(s.values, values.len());
        assert_eq!(s.non_finite_inputs, 2);
        assert_eq!(s.overflow_to_inf, 1);
        assert_eq!(s.underflow_to_zero, 1);
        assert_eq!(s.subnormal, 2);
        assert!(s.max_abs_error >= 15.0 && s.max_abs_error <= 16.0);
        assert!(s.max_rel_error <= f64::from(HalfFormat::F16.unit_roundoff()));
        assert!(s.max_rel_error > 0.0);

        let b = PrecisionStats::of_slice(&values, HalfFormat::Bf16);
        assert_eq!(
            (b.overflow_to_inf, b.underflow_to_zero, b.subnormal),
            (0, 0, 0)
        );
    }

    #[test]
    fn tensors_are_read_on_any_shape_and_rejected_when_not_floating() {
        let t = Tensor::from_slice(&[1.0f32, 1e-9, 2.0, 1e6]).view([2, 2]);
        let s = PrecisionStats::of_tensor(&t, HalfFormat::F16).unwrap();
        assert_eq!(
            (s.values, s.underflow_to_zero, s.overflow_to_inf),
            (4, 1, 1)
        );
        let ints = Tensor::from_slice(&[1i64, 2]);
        assert!(matches!(
            PrecisionStats::of_tensor(&ints, HalfFormat::F16),
            Err(Error::NotFloatingPoint { kind: Kind::Int64 })
        ));
    }

    #[test]
    fn parallel_and_serial_statistics_agree() {
        let values: Vec<f32> = (0..PARALLEL_THRESHOLD + 1000)
            .map(|i| (i as f32 * 0.37).cos() * 10f32.powi((i % 20) as i32 - 12))
            .collect();
        let parallel = PrecisionStats::of_slice(&values, HalfFormat::F16);
        let serial = values.chunks(BLOCK).map(block_stats::<f16>).fold(
            PrecisionStats::empty(HalfFormat::F16),
            PrecisionStats::merge,
        );
        assert_eq!(parallel, serial);
    }
}
