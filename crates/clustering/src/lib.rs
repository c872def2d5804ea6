//! Weight clustering for tch models, TF-MOT's `cluster_weights`: the weights of each
//! clustered variable (or of each output channel) share a few trained values, so an
//! artifact can store small indices and a codebook instead of the weights.
//!
//! **How it follows TF-MOT.** Centroids start as TF-MOT's [`CentroidInit`] defines them
//! ([`centroids`]); each weight is pulled from its nearest centroid, recomputed on every
//! step from the latent (original) weights; a centroid is trained on the sum or the mean
//! of its weights' gradients ([`GradientAggregation`]); the latent weights are trained
//! straight through, with the gradient of the clustered weights. Two differences: the
//! centroids are trained by an optimizer the [`Clusterer`] owns ([`CentroidOptimizer`];
//! TF-MOT uses the model's), and with [`ClusteringConfig::preserve_sparsity`] the zeros
//! are kept outside the clusters instead of taking one of them.
//!
//! **The loop.** Create the [`Clusterer`] from a trained model's store (it writes the
//! clustered weights into the variables), then call [`Clusterer::apply`] after every
//! optimizer step, while the step's gradients are still in the variables: right after
//! `optimizer.backward_step(&loss)`, which zeroes gradients before its backward pass, not
//! after. [`Clusterer::strip`] ends it; [`Clusterer::codebooks`] gives what an exporter
//! stores.
//!
//! ```
//! use clustering::{CentroidOptimizer, Clusterer, ClusteringConfig, Granularity};
//! use tch::nn::{self, Module, OptimizerConfig};
//! use tch::{Device, Kind, Tensor};
//!
//! tch::manual_seed(0);
//! let vs = nn::VarStore::new(Device::Cpu);
//! let layer = nn::linear(vs.root() / "0", 16, 8, Default::default());
//! let mut optimizer = nn::Adam::default().build(&vs, 1e-2)?;
//! let config = ClusteringConfig {
//!     granularity: Granularity::PerChannel,
//!     optimizer: CentroidOptimizer::Adam { learning_rate: 1e-2 },
//!     ..ClusteringConfig::new(4) // k-means++ centroids, summed gradients
//! };
//! let mut clusterer = Clusterer::new(&vs, config)?; // "0.weight" now holds 4 values a row
//! let xs = Tensor::randn([32, 16], (Kind::Float, Device::Cpu));
//! let ys = Tensor::randn([32, 8], (Kind::Float, Device::Cpu));
//! for _ in 0..20 {
//!     let loss = (layer.forward(&xs) - &ys).square().mean(Kind::Float);
//!     optimizer.backward_step(&loss); // gradients stay in the variables after the step
//!     clusterer.apply()?; // train centroids, reassign, write clustered weights
//! }
//! let codebooks = clusterer.codebooks()?; // indices and 8 codebooks of 4 values
//! assert!(codebooks[0].decode()?.equal(&layer.ws));
//! let report = clusterer.strip()?;
//! assert_eq!((report[0].name.as_str(), report[0].groups), ("0.weight", 8));
//! assert!(report[0].distinct_values <= 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **With the other techniques.** To cluster a pruned model, end the pruning
//! (`pruning::Pruner::strip`: its masks' zeros are then plain zeros) and cluster with
//! `preserve_sparsity`: those zeros stay exactly zero through training, with no pruner
//! re-applying masks, and every group holds at most `clusters + 1` values.
//! Quantizing a clustered weight to a fixed grid (per tensor or per channel, as
//! `Tensor::fake_quantize_per_channel_affine` does in quantization-aware training) maps
//! each of its few values to one code, so each group keeps at most that many codes:
//! cluster-preserving quantization relies on it.
#![warn(missing_docs)]

pub mod assignment;
pub mod centroids;
mod clusterer;
mod config;
mod error;
mod rng;

pub use clusterer::{ClusterReport, Clusterer, Codebook};
pub use config::{
    CentroidInit, CentroidOptimizer, ClusteringConfig, GradientAggregation, Granularity, Variables,
};
pub use error::{Error, Result};
