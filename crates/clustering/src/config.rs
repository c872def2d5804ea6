//! What to cluster and how: the settings a [`Clusterer`](crate::Clusterer) starts from.

use std::fmt;

use crate::{Error, Result};

/// How the centroids of a group start, TF-MOT's `CentroidInitialization` with its
/// definitions (`clustering_centroids.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CentroidInit {
    /// Evenly spaced from the smallest to the largest weight, both included.
    Linear,
    /// Drawn uniformly from [smallest weight, largest weight), from the seed.
    Random,
    /// From the weights' cumulative distribution: it is evaluated on 30 points spanning
    /// the weights (widened by a small gap on each side) and each centroid is the first
    /// of those points where it exceeds one of `clusters` probabilities evenly spaced in
    /// [0.01, 1]. Dense regions of the weights get more centroids.
    DensityBased,
    /// k-means++ as TensorFlow's `kmeans_plus_plus_initialization` computes it: each
    /// centroid is the best, by the sum of squared distances to the nearest centroid,
    /// of `2 + ln(clusters)` weights drawn with probability proportional to that squared
    /// distance (the first of them uniformly). TF-MOT's default; reproducible for a seed.
    #[default]
    KMeansPlusPlus,
}

impl fmt::Display for CentroidInit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Linear => "linear",
            Self::Random => "random",
            Self::DensityBased => "density-based",
            Self::KMeansPlusPlus => "k-means++",
        })
    }
}

/// Which weights share one set of centroids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Granularity {
    /// One set of centroids for the whole tensor.
    #[default]
    PerTensor,
    /// One set per output channel: per slice along axis 0, the output dimension of tch's
    /// convolution (`[out, in, h, w]`) and linear (`[out, in]`) weights. What per-channel
    /// int8 quantization after clustering wants (TF-MOT's `cluster_per_channel`, which
    /// applies to convolution kernels only; here it applies to any clustered variable).
    PerChannel,
}

impl Granularity {
    /// What one group is, for messages.
    pub(crate) fn group(self) -> &'static str {
        match self {
            Self::PerTensor => "the tensor",
            Self::PerChannel => "each output channel",
        }
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PerTensor => "per tensor",
            Self::PerChannel => "per channel",
        })
    }
}

/// How the gradients of a cluster's weights become its centroid's gradient (TF-MOT's
/// `GradientAggregation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GradientAggregation {
    /// The sum of the gradients of the weights in the cluster (TF-MOT's default: the
    /// gradient of the gather that builds the clustered weight).
    #[default]
    Sum,
    /// Their mean: the sum divided by the number of weights in the cluster (an empty
    /// cluster gets 0).
    Avg,
}

impl fmt::Display for GradientAggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sum => "sum",
            Self::Avg => "average",
        })
    }
}

/// The optimizer that trains the centroids, one tch optimizer over all of them.
///
/// TF-MOT trains the centroids with the model's own optimizer, as trainable variables of
/// the clustering wrapper. Here the centroids are not variables of the model's store, so
/// the [`Clusterer`](crate::Clusterer) owns an optimizer for them; pick the one the model
/// trains with, at the same learning rate, to get TF-MOT's behaviour. Adam is
/// scale-free, so it suits [`GradientAggregation::Sum`], whose gradients grow with the
/// size of a cluster; plain SGD with `Sum` needs a learning rate small enough for the
/// largest cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CentroidOptimizer {
    /// Stochastic gradient descent with momentum (tch's `nn::Sgd`).
    Sgd {
        /// Step size, finite and > 0.
        learning_rate: f64,
        /// Momentum in [0, 1).
        momentum: f64,
    },
    /// Adam (tch's `nn::Adam`: betas 0.9 and 0.999, epsilon 1e-8).
    Adam {
        /// Step size, finite and > 0.
        learning_rate: f64,
    },
}

impl CentroidOptimizer {
    /// The step size.
    pub fn learning_rate(&self) -> f64 {
        match *self {
            Self::Sgd { learning_rate, .. } | Self::Adam { learning_rate } => learning_rate,
        }
    }

    /// [`Error::InvalidOptimizer`] unless the learning rate is finite and > 0 and the
    /// momentum in [0, 1).
    pub fn validate(&self) -> Result<()> {
        let learning_rate = self.learning_rate();
        if !(learning_rate.is_finite() && learning_rate > 0.0) {
            return Err(Error::InvalidOptimizer(format!(
                "the learning rate must be finite and > 0, got {learning_rate}"
            )));
        }
        if let Self::Sgd { momentum, .. } = *self
            && !(0.0..1.0).contains(&momentum)
        {
            return Err(Error::InvalidOptimizer(format!(
                "the momentum must be in [0, 1), got {momentum}"
            )));
        }
        Ok(())
    }
}

impl Default for CentroidOptimizer {
    /// Adam at 1e-3, the usual rate for fine-tuning with Adam.
    fn default() -> Self {
        Self::Adam {
            learning_rate: 1e-3,
        }
    }
}

/// Which variables of the store are clustered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Variables {
    /// Every variable named `weight` or `*.weight` with at least two dimensions:
    /// convolution and dense weights, never biases or batch-norm scales (the same rule
    /// as the pruning crate's).
    #[default]
    Weights,
    /// Exactly these variables, in this order; each must exist, be named once and have
    /// at least one dimension.
    Named(Vec<String>),
}

/// Everything a [`Clusterer`](crate::Clusterer) needs; [`ClusteringConfig::new`] gives
/// TF-MOT's defaults for a number of clusters.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusteringConfig {
    /// Clusters per group: at least 2, and fewer than the weights of every group (all
    /// of them, zeros included, also when zeros are preserved; a group with fewer
    /// non-zero weights than clusters then leaves some clusters empty).
    pub clusters: usize,
    /// How the centroids start.
    pub init: CentroidInit,
    /// Which weights share centroids.
    pub granularity: Granularity,
    /// How a centroid's gradient is formed from its weights' gradients.
    pub aggregation: GradientAggregation,
    /// Keep the weights that are exactly zero when clustering starts at exactly zero,
    /// outside the clusters: the `clusters` centroids are shared by the other weights,
    /// so a group holds at most `clusters + 1` distinct values. What clustering a pruned
    /// model needs (TF-MOT's `preserve_sparsity`, which spends one of its clusters on
    /// zero instead).
    pub preserve_sparsity: bool,
    /// Which variables.
    pub variables: Variables,
    /// How the centroids are trained.
    pub optimizer: CentroidOptimizer,
    /// Seed of [`CentroidInit::Random`] and [`CentroidInit::KMeansPlusPlus`]; each group
    /// of each variable draws from its own stream of it.
    pub seed: u64,
}

impl ClusteringConfig {
    /// `clusters` per tensor with TF-MOT's defaults: k-means++ initialisation, summed
    /// gradients, no sparsity preservation; the default variables, Adam at 1e-3 for
    /// the centroids, seed 0. Not validated until [`ClusteringConfig::validate`] or
    /// [`Clusterer::new`](crate::Clusterer::new).
    pub fn new(clusters: usize) -> Self {
        Self {
            clusters,
            init: CentroidInit::default(),
            granularity: Granularity::default(),
            aggregation: GradientAggregation::default(),
            preserve_sparsity: false,
            variables: Variables::default(),
            optimizer: CentroidOptimizer::default(),
            seed: 0,
        }
    }

    /// Checks what can be checked without the variables: [`Error::TooFewClusters`] for
    /// fewer than 2 clusters, [`Error::InvalidOptimizer`] for the optimizer's settings.
    /// The number of clusters against each group's size is checked by
    /// [`Clusterer::new`](crate::Clusterer::new).
    pub fn validate(&self) -> Result<()> {
        if self.clusters < 2 {
            return Err(Error::TooFewClusters {
                clusters: self.clusters,
            });
        }
        self.optimizer.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_tf_mot_s() {
        let config = ClusteringConfig::new(16);
        assert_eq!(config.init, CentroidInit::KMeansPlusPlus);
        assert_eq!(config.aggregation, GradientAggregation::Sum);
        assert_eq!(config.granularity, Granularity::PerTensor);
        assert!(!config.preserve_sparsity);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn nonsense_is_refused() {
        for clusters in [0, 1] {
            let err = ClusteringConfig::new(clusters).validate().unwrap_err();
            assert!(matches!(err, Error::TooFewClusters { clusters: c } if c == clusters));
        }
        for learning_rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            for optimizer in [
                CentroidOptimizer::Adam { learning_rate },
                CentroidOptimizer::Sgd {
                    learning_rate,
                    momentum: 0.0,
                },
            ] {
                let config = ClusteringConfig {
                    optimizer,
                    ..ClusteringConfig::new(4)
                };
                assert!(matches!(config.validate(), Err(Error::InvalidOptimizer(_))));
            }
        }
        for momentum in [-0.1, 1.0, f64::NAN] {
            let optimizer = CentroidOptimizer::Sgd {
                learning_rate: 0.1,
                momentum,
            };
            assert!(matches!(
                optimizer.validate(),
                Err(Error::InvalidOptimizer(_))
            ));
        }
    }

    #[test]
    fn variants_read_well() {
        assert_eq!(CentroidInit::KMeansPlusPlus.to_string(), "k-means++");
        assert_eq!(Granularity::PerChannel.to_string(), "per channel");
        assert_eq!(GradientAggregation::Avg.to_string(), "average");
    }
}
