//! Mask computation: which weights to zero, for each granularity. The [`Pruner`](crate::Pruner)
//! calls these on schedule steps; they are public for loops that manage masks themselves.
//!
//! ```
//! use pruning::Granularity;
//! use pruning::mask::{global_masks, layer_mask};
//! use tch::Tensor;
//!
//! let weight = Tensor::from_slice(&[0.1f32, -4.0, 0.3, 2.0, -0.2, 1.0, 0.05, 3.0]).view([2, 4]);
//! // Half of the weights, the smallest magnitudes, are zeroed.
//! let mask = layer_mask(&weight, 0.5, Granularity::Unstructured)?;
//! assert_eq!(Vec::<f32>::try_from(mask.flatten(0, -1))?, [0., 1., 0., 1., 0., 1., 0., 1.]);
//! // 2:4 keeps the two largest of every four consecutive inputs.
//! let mask = layer_mask(&weight, 0.0, Granularity::NOutOfM { n: 2, m: 4 })?;
//! assert_eq!(Vec::<f32>::try_from(mask.flatten(0, -1))?, [0., 1., 0., 1., 0., 1., 0., 1.]);
//! // One threshold across layers: the other layer's weights are all smaller.
//! let other = Tensor::from_slice(&[0.01f32, 0.02]).view([1, 2]);
//! let masks = global_masks(&[&weight, &other], 0.2)?;
//! assert_eq!(Vec::<f32>::try_from(masks[1].flatten(0, -1))?, [0., 0.]);
//! assert!(layer_mask(&weight, 1.0, Granularity::Unstructured).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{Error, Result, Sparsity};

/// The shape of what is pruned together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granularity {
    /// Individual weights, by magnitude.
    Unstructured,
    /// Blocks of `rows x cols` of the weight seen as `[out, in]` (a convolution's input
    /// channels and kernel flattened), by mean magnitude.
    Block {
        /// Block height (output channels).
        rows: usize,
        /// Block width (inputs).
        cols: usize,
    },
    /// At most `n` nonzeros in every `m` consecutive weights along the input dimension
    /// (2:4 keeps the two largest of every four). The sparsity is `1 - n/m` whatever the
    /// schedule says; the schedule only decides when masks are recomputed.
    NOutOfM {
        /// Weights kept per group.
        n: usize,
        /// Group size.
        m: usize,
    },
}

/// The number of elements to zero for a sparsity: `round(sparsity * len)`.
pub fn zero_count(sparsity: f64, len: usize) -> usize {
    ((sparsity * len as f64).round() as usize).min(len)
}

/// A 0/1 float mask zeroing the `round(sparsity * numel)` smallest-magnitude entries of
/// `scores` (ties broken by position, so the count is exact); [`Error::InvalidSparsity`]
/// unless `sparsity` is in [0, 1).
pub fn smallest_mask(scores: &Tensor, sparsity: f64) -> Result<Tensor> {
    Sparsity::new(sparsity)?;
    let flat = scores.f_abs()?.f_flatten(0, -1)?.f_to_kind(Kind::Float)?;
    let len = flat.size()[0] as usize;
    let zeros = zero_count(sparsity, len) as i64;
    let mut mask = flat.f_ones_like()?;
    if zeros > 0 {
        let (_, order) = flat.f_sort_stable(true, 0, false)?;
        mask = mask.f_index_fill(0, &order.f_narrow(0, 0, zeros)?, 0.0)?;
    }
    Ok(mask.f_view(scores.size().as_slice())?)
}

/// The mask of one weight tensor (`[out, ...]`) at `sparsity` for `granularity`, in the
/// weight's kind; [`Error::ScalarWeight`] for a 0-dimensional weight,
/// [`Error::InvalidSparsity`] unless `sparsity` is in [0, 1), [`Error::InvalidGranularity`]
/// when the granularity does not tile the weight.
pub fn layer_mask(weight: &Tensor, sparsity: f64, granularity: Granularity) -> Result<Tensor> {
    Sparsity::new(sparsity)?;
    let shape = weight.size();
    let out = *shape.first().ok_or(Error::ScalarWeight)?;
    let inputs = weight.numel() as i64 / out.max(1);
    let matrix = weight.f_reshape([out, inputs])?;
    let mask = match granularity {
        Granularity::Unstructured => smallest_mask(&matrix, sparsity)?,
        Granularity::Block { rows, cols } => {
            let (r, c) = (rows as i64, cols as i64);
            if r == 0 || c == 0 || out % r != 0 || inputs % c != 0 {
                return Err(Error::InvalidGranularity(format!(
                    "blocks of {rows}x{cols} do not tile a {out}x{inputs} weight"
                )));
            }
            let scores = matrix
                .f_abs()?
                .f_reshape([out / r, r, inputs / c, c])?
                .f_mean_dim([1i64, 3].as_slice(), false, Kind::Float)?;
            smallest_mask(&scores, sparsity)?
                .f_reshape([out / r, 1, inputs / c, 1])?
                .f_expand([out / r, r, inputs / c, c], false)?
                .f_reshape([out, inputs])?
        }
        Granularity::NOutOfM { n, m } => {
            let (n, m) = (n as i64, m as i64);
            if n == 0 || n >= m || inputs % m != 0 {
                return Err(Error::InvalidGranularity(format!(
                    "{n}:{m} needs 0 < n < m and m dividing the {inputs} inputs of each output"
                )));
            }
            let groups = matrix.f_abs()?.f_to_kind(Kind::Float)?.f_reshape([-1, m])?;
            let (_, keep) = groups.f_topk(n, -1, true, true)?;
            groups
                .f_zeros_like()?
                .f_scatter_value(-1, &keep, 1.0)?
                .f_reshape([out, inputs])?
        }
    };
    Ok(mask.f_reshape(shape.as_slice())?.f_to_kind(weight.kind())?)
}

/// Unstructured masks for several weights with one magnitude threshold across all of
/// them: the `round(sparsity * total)` smallest weights overall are zeroed.
/// [`Error::InvalidSparsity`] unless `sparsity` is in [0, 1).
pub fn global_masks(weights: &[&Tensor], sparsity: f64) -> Result<Vec<Tensor>> {
    Sparsity::new(sparsity)?;
    let flats = weights
        .iter()
        .map(|w| w.f_flatten(0, -1).and_then(|f| f.f_to_kind(Kind::Float)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if flats.is_empty() {
        return Ok(Vec::new());
    }
    let mask = smallest_mask(&Tensor::f_cat(&flats, 0)?, sparsity)?;
    let sizes: Vec<i64> = flats.iter().map(|f| f.size()[0]).collect();
    mask.f_split_with_sizes(sizes.as_slice(), 0)?
        .into_iter()
        .zip(weights)
        .map(|(m, w)| Ok(m.f_reshape(w.size().as_slice())?.f_to_kind(w.kind())?))
        .collect()
}
