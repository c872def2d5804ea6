//! Bulk conversion of f32 data to and from the 16-bit formats.

use ndarray::{Array, ArrayBase, Data, Dimension};
use rayon::prelude::*;

use crate::{Error, HalfFloat, Result};

/// Number of elements from which the automatic conversions ([`f32_to_half`],
/// [`half_to_f32`], [`to_half`], [`to_f32`]) and the statistics split the work across
/// rayon's thread pool.
///
/// Measured with `cargo bench -p tensor-precision --bench convert` (criterion, bench
/// profile, medians) on the development machine: 2 cores of an Intel Xeon with AVX-512
/// and F16C, shared with other jobs (load average about 4 during the run). Serial f32 ->
/// f16 runs at about 2.3 G elements/s (`half` uses F16C), f32 -> bf16 at about 1.2 G/s.
/// The parallel path was slower or level up to 4 Mi elements (speedups 0.5-1.1 for f16,
/// 0.5-1.3 for bf16, noisy) and first won at 16 Mi elements (1.5x for f16, 1.15x for
/// bf16), hence 2^24. The conversion is memory-bound and these two cores were busy, so a
/// quiet machine with more cores will likely cross over much earlier: re-measure there
/// before lowering it.
pub const PARALLEL_THRESHOLD: usize = 1 << 24;

/// Elements per rayon task: large enough that scheduling costs vanish, small enough to
/// stay in L2 and to spread a just-over-threshold input over a few threads.
const CHUNK: usize = 1 << 14;

fn check_lengths(source_len: usize, destination_len: usize) -> Result<()> {
    if source_len == destination_len {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            source_len,
            destination_len,
        })
    }
}

/// Converts `src` into `dst` on the calling thread.
pub fn f32_to_half_serial<T: HalfFloat>(src: &[f32], dst: &mut [T]) -> Result<()> {
    check_lengths(src.len(), dst.len())?;
    T::slice_from_f32(dst, src);
    Ok(())
}

/// Converts `src` into `dst` in chunks on rayon's thread pool; bit-identical to
/// [`f32_to_half_serial`].
pub fn f32_to_half_parallel<T: HalfFloat>(src: &[f32], dst: &mut [T]) -> Result<()> {
    check_lengths(src.len(), dst.len())?;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(dst, src)| T::slice_from_f32(dst, src));
    Ok(())
}

/// Converts `src` into `dst`, in parallel from [`PARALLEL_THRESHOLD`] elements on.
pub fn f32_to_half<T: HalfFloat>(src: &[f32], dst: &mut [T]) -> Result<()> {
    if src.len() >= PARALLEL_THRESHOLD {
        f32_to_half_parallel(src, dst)
    } else {
        f32_to_half_serial(src, dst)
    }
}

/// Widens `src` into `dst` on the calling thread.
pub fn half_to_f32_serial<T: HalfFloat>(src: &[T], dst: &mut [f32]) -> Result<()> {
    check_lengths(src.len(), dst.len())?;
    T::slice_to_f32(src, dst);
    Ok(())
}

/// Widens `src` into `dst` in chunks on rayon's thread pool.
pub fn half_to_f32_parallel<T: HalfFloat>(src: &[T], dst: &mut [f32]) -> Result<()> {
    check_lengths(src.len(), dst.len())?;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(dst, src)| T::slice_to_f32(src, dst));
    Ok(())
}

/// Widens `src` into `dst`, in parallel from [`PARALLEL_THRESHOLD`] elements on.
pub fn half_to_f32<T: HalfFloat>(src: &[T], dst: &mut [f32]) -> Result<()> {
    if src.len() >= PARALLEL_THRESHOLD {
        half_to_f32_parallel(src, dst)
    } else {
        half_to_f32_serial(src, dst)
    }
}

/// Converts an f32 array of any shape and layout to a 16-bit array of the same shape
/// (standard layout), rounding to nearest, ties to even.
///
/// ```
/// use half::f16;
/// use ndarray::array;
///
/// let a = array![[1.0f32, 1.0 + 1.0 / 2048.0], [7.0e4, -0.0]];
/// let b = tensor_precision::to_half::<f16, _, _>(&a);
/// assert_eq!(b[[0, 1]], f16::ONE); // a tie, rounded to the even neighbour
/// assert_eq!(tensor_precision::to_f32(&b)[[1, 0]], f32::INFINITY);
/// ```
pub fn to_half<T, S, D>(src: &ArrayBase<S, D>) -> Array<T, D>
where
    T: HalfFloat,
    S: Data<Elem = f32>,
    D: Dimension,
{
    let dim = src.raw_dim();
    let src = src.as_standard_layout();
    let src = src
        .as_slice()
        .expect("an array in standard layout is contiguous");
    let mut dst = vec![T::default(); src.len()];
    f32_to_half(src, &mut dst).expect("buffer sized to match");
    Array::from_shape_vec(dim, dst).expect("shape of the source")
}

/// Widens a 16-bit array of any shape and layout to f32 (exact), same shape, standard
/// layout.
pub fn to_f32<T, S, D>(src: &ArrayBase<S, D>) -> Array<f32, D>
where
    T: HalfFloat,
    S: Data<Elem = T>,
    D: Dimension,
{
    let dim = src.raw_dim();
    let src = src.as_standard_layout();
    let src = src
        .as_slice()
        .expect("an array in standard layout is contiguous");
    let mut dst = vec![0.0; src.len()];
    half_to_f32(src, &mut dst).expect("buffer sized to match");
    Array::from_shape_vec(dim, dst).expect("shape of the source")
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};
    use ndarray::{Array2, ShapeBuilder};

    use super::*;

    #[test]
    fn mismatched_lengths_are_an_error() {
        let mut dst = [f16::ZERO; 2];
        let err = f32_to_half_serial(&[1.0, 2.0, 3.0], &mut dst).unwrap_err();
        assert!(matches!(
            err,
            Error::LengthMismatch {
                source_len: 3,
                destination_len: 2
            }
        ));
        let mut wide = [0.0f32; 4];
        assert!(half_to_f32_parallel(&[bf16::ONE], &mut wide).is_err());
    }

    #[test]
    fn arrays_keep_shape_and_element_order_whatever_the_layout() {
        // Column-major source: the result must still be indexed like the source.
        let a = Array2::from_shape_vec((2, 3).f(), vec![1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0]).unwrap();
        let h = to_half::<f16, _, _>(&a);
        assert_eq!(h.shape(), [2, 3]);
        assert_eq!(to_f32(&h), a);
        let t = to_half::<bf16, _, _>(&a.t());
        assert_eq!(to_f32(&t), a.t());
    }

    #[test]
    fn auto_conversion_above_the_threshold_matches_serial() {
        let src: Vec<f32> = (0..PARALLEL_THRESHOLD + 12_345)
            .map(|i| (i as f32 * 0.731).sin() * 70_000.0)
            .collect();
        let mut serial = vec![f16::ZERO; src.len()];
        let mut auto = vec![f16::ZERO; src.len()];
        f32_to_half_serial(&src, &mut serial).unwrap();
        f32_to_half(&src, &mut auto).unwrap();
        assert!(
            serial
                .iter()
                .zip(&auto)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }
}
