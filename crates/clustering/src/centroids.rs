//! Initial centroids of one group of weights, as TF-MOT computes them
//! (`clustering_centroids.py`). The [`Clusterer`](crate::Clusterer) calls
//! [`initial_centroids`] for every group; it is public so that its results can be checked
//! against TF-MOT's and used by loops that cluster on their own.
//!
//! ```
//! use clustering::CentroidInit;
//! use clustering::centroids::initial_centroids;
//!
//! let weights = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
//! let linear = initial_centroids(&weights, 5, CentroidInit::Linear, false, 0);
//! assert_eq!(linear, [0.0, 2.5, 5.0, 7.5, 10.0]);
//! // k-means++ picks weights; the same seed picks the same ones.
//! let picked = initial_centroids(&weights, 3, CentroidInit::KMeansPlusPlus, false, 7);
//! assert!(picked.iter().all(|c| weights.contains(c)));
//! assert_eq!(picked, initial_centroids(&weights, 3, CentroidInit::KMeansPlusPlus, false, 7));
//! ```

use crate::CentroidInit;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Points of the grid on which [`CentroidInit::DensityBased`] evaluates the cumulative
/// distribution (TF-MOT's 30).
const DENSITY_GRID_POINTS: usize = 30;

/// The widest gap added on each side of the weights' range before the density grid is
/// laid out, so that the distribution is 0 at its first point and 1 at its last.
const DENSITY_GAP: f32 = 0.01;

/// The `clusters` initial centroids of one group of weights, in TF-MOT's order.
///
/// With `preserve_sparsity`, zeros are left out and the clusters are shared between
/// the negative and the positive weights in proportion to their counts (rounded half to
/// even, as TF-MOT's `_zero_centroid_initialization`); each side is initialised on its
/// own, negative centroids first, so no cluster straddles zero. TF-MOT also adds a
/// centroid at zero, one of its `clusters`; here the zeros are kept outside the
/// clusters and all `clusters` centroids go to the non-zero weights. A group with no
/// weight to cluster gets centroids of 0.
///
/// `seed` drives [`CentroidInit::Random`] and [`CentroidInit::KMeansPlusPlus`] (TF-MOT
/// draws with TensorFlow's generators, so the values differ from TF-MOT's while the
/// distribution is the same); the other two are deterministic.
pub fn initial_centroids(
    weights: &[f32],
    clusters: usize,
    init: CentroidInit,
    preserve_sparsity: bool,
    seed: u64,
) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    if !preserve_sparsity {
        return interval(weights, clusters, init, false, &mut rng);
    }
    let negative: Vec<f32> = weights.iter().copied().filter(|&w| w < 0.0).collect();
    let positive: Vec<f32> = weights.iter().copied().filter(|&w| w > 0.0).collect();
    let nonzero = negative.len() + positive.len();
    if nonzero == 0 {
        return vec![0.0; clusters];
    }
    let negative_ratio = negative.len() as f64 / nonzero as f64;
    let negative_clusters =
        ((clusters as f64 * negative_ratio).round_ties_even() as usize).min(clusters);
    let mut centroids = interval(&negative, negative_clusters, init, true, &mut rng);
    centroids.extend(interval(
        &positive,
        clusters - negative_clusters,
        init,
        true,
        &mut rng,
    ));
    centroids
}

/// `clusters` centroids for the weights of one interval (all weights, or one sign).
fn interval(
    weights: &[f32],
    clusters: usize,
    init: CentroidInit,
    preserve_sparsity: bool,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    if clusters == 0 {
        return Vec::new();
    }
    let Some((min, max)) = range(weights) else {
        return vec![0.0; clusters];
    };
    match init {
        CentroidInit::Linear => linspace(min, max, clusters),
        CentroidInit::Random => (0..clusters)
            .map(|_| {
                (f64::from(min) + rng.random::<f64>() * (f64::from(max) - f64::from(min))) as f32
            })
            .collect(),
        CentroidInit::DensityBased => density_based(weights, min, max, clusters, preserve_sparsity),
        CentroidInit::KMeansPlusPlus => kmeans_plus_plus(weights, clusters, rng),
    }
}

fn range(weights: &[f32]) -> Option<(f32, f32)> {
    let first = *weights.first()?;
    Some(
        weights
            .iter()
            .fold((first, first), |(lo, hi), &w| (lo.min(w), hi.max(w))),
    )
}

/// `count` values from `start` to `stop`, both included, as `tf.linspace` computes
/// them in float32: `start + i * ((stop - start) / (count - 1))`, the last one `stop`.
fn linspace(start: f32, stop: f32, count: usize) -> Vec<f32> {
    let delta = (stop - start) / (count.max(2) - 1) as f32;
    (0..count)
        .map(|i| {
            if i + 1 == count && count > 1 {
                stop
            } else {
                start + i as f32 * delta
            }
        })
        .collect()
}

/// TF-MOT's `DensityBasedCentroidsInitialisation`: the cumulative distribution of the
/// weights on a grid of 30 points over [min - gap, max + gap], and for each of
/// `clusters` probabilities evenly spaced in [0.01, 1] the grid point at the index
/// `searchsorted(cdf, p, side='right')` (clipped to the last point).
///
/// TF-MOT then "interpolates" between that point and the one before by solving the line
/// through them for the distribution's value at the point itself, which gives the point
/// back (up to rounding): the centroid is the grid point, which is what is returned here.
fn density_based(
    weights: &[f32],
    min: f32,
    max: f32,
    clusters: usize,
    preserve_sparsity: bool,
) -> Vec<f32> {
    // With sparsity preserved, the gap must not carry the grid across zero.
    let gap = if preserve_sparsity {
        DENSITY_GAP.min(min.abs().min(max.abs()) / 2.0)
    } else {
        DENSITY_GAP
    };
    let grid = linspace(min - gap, max + gap, DENSITY_GRID_POINTS);
    let count = weights.len() as f32;
    let cdf: Vec<f32> = grid
        .iter()
        .map(|&x| weights.iter().filter(|&&w| w <= x).count() as f32 / count)
        .collect();
    linspace(0.01, 1.0, clusters)
        .into_iter()
        .map(|p| {
            // `cdf` is non-decreasing: the number of values <= p is the right insertion point.
            let index = cdf.partition_point(|&c| c <= p);
            grid[index.min(DENSITY_GRID_POINTS - 1)]
        })
        .collect()
}

/// TensorFlow's `KmeansPlusPlusInitializationOp` with `num_retries_per_sample = -1`
/// (TF-MOT's call) on one-dimensional points: the first centroid is the best of
/// `1 + retries` weights drawn uniformly, each next one the best of `1 + retries` weights
/// drawn with probability proportional to the squared distance to the nearest centroid
/// so far, "best" meaning the smallest sum of those distances once it is added;
/// `retries = 2 + floor(ln(clusters))`. When every distinct weight is already a
/// centroid, the remaining centroids repeat the first (their clusters stay empty).
fn kmeans_plus_plus(points: &[f32], clusters: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = points.len();
    let retries = 2 + (clusters as f64).ln().floor() as usize;
    let mut min_distances = vec![f64::INFINITY; n];
    let mut cumulative = vec![0.0f64; n];
    let mut sampled = vec![false; n];
    let mut centroids = Vec::with_capacity(clusters);
    for i in 0..clusters {
        if i > 0 {
            let mut sum = 0.0;
            for (c, d) in cumulative.iter_mut().zip(&min_distances) {
                sum += d;
                *c = sum;
            }
            if sum == 0.0 {
                // Every weight sits on a centroid: nothing left to pick.
                centroids.push(centroids[0]);
                continue;
            }
        }
        let mut best: Option<(f64, usize, Vec<f64>)> = None;
        for _ in 0..=retries {
            let index = draw(i == 0, &cumulative, &sampled, rng);
            let point = f64::from(points[index]);
            let distances: Vec<f64> = points
                .iter()
                .zip(&min_distances)
                .map(|(&p, &d)| d.min(half_squared(f64::from(p) - point)))
                .collect();
            let potential: f64 = distances.iter().sum();
            if best.as_ref().is_none_or(|(b, _, _)| potential < *b) {
                best = Some((potential, index, distances));
            }
        }
        let (_, index, distances) = best.expect("at least one candidate is drawn");
        min_distances = distances;
        sampled[index] = true;
        centroids.push(points[index]);
    }
    centroids
}

fn half_squared(d: f64) -> f64 {
    0.5 * d * d
}

/// One candidate index: uniform for the first centroid, else with probability
/// proportional to the distance whose running sums are `cumulative`, never an index
/// already picked (those have distance 0).
fn draw(first: bool, cumulative: &[f64], sampled: &[bool], rng: &mut ChaCha8Rng) -> usize {
    let n = sampled.len();
    if first {
        return rng.random_range(0..n);
    }
    let total = cumulative[n - 1];
    // Rounding can land a draw on the total or on a zero-length segment; redraw then,
    // and after many misses fall back to a uniform pick among the weights not picked.
    for _ in 0..64 {
        let v = rng.random::<f64>() * total;
        let index = cumulative.partition_point(|&c| c <= v);
        if index < n && !sampled[index] {
            return index;
        }
    }
    let free: Vec<usize> = (0..n).filter(|&i| !sampled[i]).collect();
    free[rng.random_range(0..free.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TF-MOT's tests compare to 4 decimal places.
    const TF_MOT_TOLERANCE: f32 = 5e-5;

    fn assert_close(actual: &[f32], expected: &[f32]) {
        assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
        for (a, e) in actual.iter().zip(expected) {
            assert!(
                (a - e).abs() < TF_MOT_TOLERANCE,
                "{actual:?} vs {expected:?}"
            );
        }
    }

    // The expected values below are those of TF-MOT's `clustering_centroids_test.py`.

    #[test]
    fn linear_matches_tf_mot() {
        let cases: [(&[f32], usize, &[f32]); 3] = [
            (
                &[0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10.],
                5,
                &[0., 2.5, 5., 7.5, 10.],
            ),
            (
                &[0., 1., 2., 3., 3.1, 3.2, 3.3, 3.4, 3.5],
                3,
                &[0., 1.75, 3.5],
            ),
            (
                &[
                    -3., -2., -1., 0., 1.1, 2.2, 3.3, 4.4, 5.5, 6.6, 7.7, 8.8, 9.,
                ],
                6,
                &[-3., -0.6, 1.8, 4.2, 6.6, 9.],
            ),
        ];
        for (weights, k, expected) in cases {
            assert_close(
                &initial_centroids(weights, k, CentroidInit::Linear, false, 0),
                expected,
            );
        }
    }

    #[test]
    fn sparsity_aware_linear_matches_tf_mot_without_its_zero_centroid() {
        // TF-MOT's k includes its zero centroid; here the zeros are outside the k.
        let cases: [(&[f32], usize, &[f32]); 3] = [
            (
                &[0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10.],
                4,
                &[1., 4., 7., 10.],
            ),
            (&[0., 1., 2., 3., 3.1, 3.2, 3.3, 3.4, 3.5], 2, &[1., 3.5]),
            (
                &[
                    -3., -2., -1., 0., 1.1, 2.2, 3.3, 4.4, 5.5, 6.6, 7.7, 8.8, 9.,
                ],
                5,
                &[-3., 1.1, 3.7333333, 6.366666, 9.],
            ),
        ];
        for (weights, k, expected) in cases {
            assert_close(
                &initial_centroids(weights, k, CentroidInit::Linear, true, 0),
                expected,
            );
        }
    }

    #[test]
    fn density_based_matches_tf_mot() {
        let cases: [(&[f32], usize, &[f32]); 3] = [
            (
                &[0., 1., 2., 3., 3.1, 3.2, 3.3, 3.4, 3.5],
                5,
                &[0.11137931, 2.0534482, 3.145862, 3.3886206, 3.51],
            ),
            (
                &[0., 1., 2., 3., 3.1, 3.2, 3.3, 3.4, 3.5],
                3,
                &[0.11137931, 3.145862, 3.51],
            ),
            (
                &[0., 1., 2., 3., 4., 5., 6., 7., 8., 9.],
                3,
                &[0.3010345, 5.2775865, 9.01],
            ),
        ];
        for (weights, k, expected) in cases {
            let centroids = initial_centroids(weights, k, CentroidInit::DensityBased, false, 0);
            assert_close(&centroids, expected);
        }
    }

    #[test]
    fn sparsity_aware_density_based_matches_tf_mot_without_its_zero_centroid() {
        let cases: [(&[f32], usize, &[f32]); 4] = [
            (
                &[0., -1., -2., -3., -4., -5., -6.],
                3,
                &[-5.836897, -2.8941379, -0.98999995],
            ),
            (
                &[0., 0., 1., 2., 3., 4., 5., 6., 7., 8., 9.],
                4,
                &[1.2665517, 4.032069, 7.0741386, 9.01],
            ),
            (
                &[-4., -3., -2., -1., 0., 0., 0., 1., 2., 3., 4., 5., 6., 7.],
                5,
                &[-3.9058623, -0.99, 1.1975863, 4.103793, 7.01],
            ),
            (
                &[0., 1., 2., 3., -3.1, -3.2, -3.3, -0.005, 3.5],
                2,
                &[-3.1887069, 1.0768965],
            ),
        ];
        for (weights, k, expected) in cases {
            let centroids = initial_centroids(weights, k, CentroidInit::DensityBased, true, 0);
            assert_close(&centroids, expected);
        }
        // No non-zero weight: nothing to place.
        let zeros = initial_centroids(&[0.0; 4], 2, CentroidInit::DensityBased, true, 0);
        assert_eq!(zeros, [0.0, 0.0]);
    }

    #[test]
    fn kmeans_plus_plus_picks_distinct_weights_reproducibly() {
        let weights = [0., 1., 2., 3., 3.1, 3.2, 3.3, 3.4, 3.5];
        for seed in 0..20 {
            let centroids =
                initial_centroids(&weights, 5, CentroidInit::KMeansPlusPlus, false, seed);
            let again = initial_centroids(&weights, 5, CentroidInit::KMeansPlusPlus, false, seed);
            assert_eq!(centroids, again);
            let mut sorted = centroids.clone();
            sorted.sort_by(f32::total_cmp);
            sorted.dedup();
            assert_eq!(sorted.len(), 5, "{centroids:?}");
            assert!(centroids.iter().all(|c| weights.contains(c)));
        }
    }

    #[test]
    fn kmeans_plus_plus_spreads_over_separated_groups() {
        // Three tight groups far apart: squared-distance sampling puts one centroid in each.
        let weights = [-10.0, -10.1, -9.9, 0.0, 0.1, -0.1, 10.0, 10.1, 9.9];
        for seed in 0..20 {
            let centroids =
                initial_centroids(&weights, 3, CentroidInit::KMeansPlusPlus, false, seed);
            let mut groups: Vec<i32> = centroids
                .iter()
                .map(|c| (c / 10.0).round() as i32)
                .collect();
            groups.sort();
            assert_eq!(groups, [-1, 0, 1], "{centroids:?}");
        }
    }

    #[test]
    fn kmeans_plus_plus_repeats_a_centroid_when_the_weights_run_out() {
        let centroids =
            initial_centroids(&[1.0, 1.0, 2.0], 3, CentroidInit::KMeansPlusPlus, false, 1);
        let mut sorted = centroids.clone();
        sorted.sort_by(f32::total_cmp);
        sorted.dedup();
        assert_eq!(sorted, [1.0, 2.0]);
        assert_eq!(centroids.len(), 3);
    }

    #[test]
    fn random_stays_in_the_range_and_splits_by_sign() {
        let weights = [-2.0, -1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0];
        let centroids = initial_centroids(&weights, 6, CentroidInit::Random, false, 3);
        assert!(
            centroids.iter().all(|&c| (-2.0..=4.0).contains(&c)),
            "{centroids:?}"
        );
        // Two negative and four positive non-zero weights: 2 and 4 of 6 clusters.
        let split = initial_centroids(&weights, 6, CentroidInit::Random, true, 3);
        assert!(
            split[..2].iter().all(|&c| (-2.0..=-1.0).contains(&c)),
            "{split:?}"
        );
        assert!(
            split[2..].iter().all(|&c| (1.0..=4.0).contains(&c)),
            "{split:?}"
        );
    }

    #[test]
    fn the_sign_split_rounds_half_to_even() {
        // 1 negative of 4 non-zero weights, 2 clusters: 0.5 rounds to 0 negative clusters.
        let centroids = initial_centroids(&[-1.0, 1.0, 2.0, 3.0], 2, CentroidInit::Linear, true, 0);
        assert_eq!(centroids, [1.0, 3.0]);
        // 3 of 4 negative, 2 clusters: 1.5 rounds to 2.
        let centroids =
            initial_centroids(&[-1.0, -2.0, -3.0, 3.0], 2, CentroidInit::Linear, true, 0);
        assert_eq!(centroids, [-3.0, -1.0]);
    }
}
