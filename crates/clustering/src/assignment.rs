//! The two tensor computations of a clustering step, on weights laid out as
//! `[groups, weights per group]` with centroids `[groups, clusters]` (one row per output
//! channel, or a single row for the whole tensor): which centroid each weight is pulled
//! from, and the gradient each centroid gets from its weights. The
//! [`Clusterer`](crate::Clusterer) runs these on every step; they are public for loops that
//! manage their own centroids.
//!
//! ```
//! use clustering::GradientAggregation;
//! use clustering::assignment::{centroid_gradients, nearest};
//! use tch::Tensor;
//!
//! let weights = Tensor::from_slice(&[0.1f32, 0.9, 1.2, -0.4]).view([1, 4]);
//! let centroids = Tensor::from_slice(&[0.0f32, 1.0]).view([1, 2]);
//! let indices = nearest(&weights, &centroids)?;
//! assert_eq!(Vec::<i64>::try_from(indices.flatten(0, -1))?, [0, 1, 1, 0]);
//!
//! let grad = Tensor::from_slice(&[1.0f32, 2.0, 4.0, 3.0]).view([1, 4]);
//! let sum = centroid_gradients(&grad, &indices, None, 2, GradientAggregation::Sum)?;
//! assert_eq!(Vec::<f32>::try_from(sum.flatten(0, -1))?, [4.0, 6.0]);
//! let avg = centroid_gradients(&grad, &indices, None, 2, GradientAggregation::Avg)?;
//! assert_eq!(Vec::<f32>::try_from(avg.flatten(0, -1))?, [2.0, 3.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use tch::{Kind, Tensor};

use crate::{Error, GradientAggregation, Result};

/// Most elements of the `[groups, weights, clusters]` distance tensor computed at once;
/// larger layers are handled a slice of weights at a time.
const DISTANCE_CHUNK_ELEMENTS: i64 = 1 << 22;

/// TF-MOT's pulling indices: for every weight of `weights` (`[groups, n]`) the index of
/// its nearest centroid in its group's row of `centroids` (`[groups, k]`), by absolute
/// difference, the first one on a tie (`argmin`). Int64, `[groups, n]`.
/// [`Error::InvalidShape`] unless both are matrices with the same number of rows and
/// at least one centroid.
pub fn nearest(weights: &Tensor, centroids: &Tensor) -> Result<Tensor> {
    let (groups, n) = matrix(weights, "weights")?;
    let (centroid_groups, clusters) = matrix(centroids, "centroids")?;
    if centroid_groups != groups || clusters == 0 {
        return Err(Error::InvalidShape(format!(
            "{groups} groups of weights need {groups} rows of at least one centroid, got \
             centroids of shape {:?}",
            centroids.size()
        )));
    }
    let centroids = centroids.f_to_kind(weights.kind())?.f_unsqueeze(1)?;
    let chunk = (DISTANCE_CHUNK_ELEMENTS / (groups * clusters).max(1)).max(1);
    let mut parts = Vec::new();
    let mut start = 0;
    while start < n {
        let length = chunk.min(n - start);
        let slice = weights.f_narrow(1, start, length)?.f_unsqueeze(-1)?;
        parts.push(slice.f_sub(&centroids)?.f_abs()?.f_argmin(-1, false)?);
        start += length;
    }
    if parts.is_empty() {
        return Ok(weights.f_zeros_like()?.f_to_kind(Kind::Int64)?);
    }
    Ok(Tensor::f_cat(&parts, 1)?)
}

/// The gradient of every centroid (`[groups, clusters]`, in `grad`'s kind) from the
/// gradients of the weights pulled from it: `grad` and `indices` are `[groups, n]`, and
/// `in_clusters`, when given, says which weights belong to a cluster at all (a boolean
/// `[groups, n]`; the others, kept zeros, give nothing). [`GradientAggregation::Sum`]
/// adds a cluster's gradients up; [`GradientAggregation::Avg`] divides that by the
/// number of weights in the cluster, an empty cluster getting 0 (TF-MOT's
/// `divide_no_nan`). [`Error::InvalidShape`] when the shapes disagree; an index outside
/// `0..clusters` is a LibTorch error.
pub fn centroid_gradients(
    grad: &Tensor,
    indices: &Tensor,
    in_clusters: Option<&Tensor>,
    clusters: i64,
    aggregation: GradientAggregation,
) -> Result<Tensor> {
    let (groups, n) = matrix(grad, "gradients")?;
    if indices.size() != [groups, n] || in_clusters.is_some_and(|m| m.size() != [groups, n]) {
        return Err(Error::InvalidShape(format!(
            "gradients of shape {:?} need indices (and a membership mask) of the same shape, \
             got {:?}",
            grad.size(),
            indices.size()
        )));
    }
    if clusters < 1 {
        return Err(Error::InvalidShape(format!(
            "at least one cluster is needed, got {clusters}"
        )));
    }
    let members = match in_clusters {
        Some(mask) => mask.f_to_kind(grad.kind())?,
        None => grad.f_ones_like()?,
    };
    let totals = Tensor::f_zeros([groups, clusters], (grad.kind(), grad.device()))?;
    let sums = totals.f_scatter_add(1, indices, &grad.f_mul(&members)?)?;
    match aggregation {
        GradientAggregation::Sum => Ok(sums),
        GradientAggregation::Avg => {
            let sizes = totals.f_scatter_add(1, indices, &members)?;
            // An empty cluster's sum is 0, so dividing by max(size, 1) gives it 0.
            Ok(sums.f_div(&sizes.f_clamp_min(1.0)?)?)
        }
    }
}

fn matrix(tensor: &Tensor, what: &str) -> Result<(i64, i64)> {
    match tensor.size().as_slice() {
        &[rows, columns] => Ok((rows, columns)),
        shape => Err(Error::InvalidShape(format!(
            "the {what} must be a [groups, n] matrix, got shape {shape:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_the_first_centroid_and_groups_use_their_own_row() {
        let weights = Tensor::from_slice(&[0.5f32, 2.0, 0.5, 2.0]).view([2, 2]);
        let centroids = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 0.0]).view([2, 2]);
        let indices = nearest(&weights, &centroids).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(indices.flatten(0, -1)).unwrap(),
            [0, 1, 1, 0]
        );
    }

    #[test]
    fn chunks_give_the_same_indices() {
        // Enough weights that the distance tensor is computed in several slices.
        let n = DISTANCE_CHUNK_ELEMENTS / 8 + 123;
        let weights = Tensor::arange(n, (Kind::Float, tch::Device::Cpu)).view([1, n]) / n as f64;
        let centroids = Tensor::from_slice(&[0.0f32, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]);
        let indices = nearest(&weights, &centroids.view([1, 8])).unwrap();
        let expected = (&weights * 4.0).round().to_kind(Kind::Int64);
        assert!(indices.equal(&expected));
    }

    #[test]
    fn shapes_are_checked() {
        let weights = Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu));
        let one_row = Tensor::zeros([1, 3], (Kind::Float, tch::Device::Cpu));
        assert!(matches!(
            nearest(&weights, &one_row),
            Err(Error::InvalidShape(_))
        ));
        assert!(matches!(
            nearest(&weights.view([6]), &one_row),
            Err(Error::InvalidShape(_))
        ));
        let indices = Tensor::zeros([2, 2], (Kind::Int64, tch::Device::Cpu));
        let err = centroid_gradients(&weights, &indices, None, 3, GradientAggregation::Sum);
        assert!(matches!(err, Err(Error::InvalidShape(_))));
        let out_of_range = Tensor::full([2, 3], 5, (Kind::Int64, tch::Device::Cpu));
        let err = centroid_gradients(&weights, &out_of_range, None, 3, GradientAggregation::Sum);
        assert!(matches!(err, Err(Error::Torch(_))));
    }
}
