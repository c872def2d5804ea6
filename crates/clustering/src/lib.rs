//! Weight clustering for tch models, TF-MOT's `cluster_weights`: the weights of each
//! clustered variable (or of each output channel) share a few trained values.
//!
//! This part holds the settings ([`ClusteringConfig`]), TF-MOT's centroid
//! initialisations ([`centroids`]) and the tensor computations of a step
//! ([`assignment`]).
//!
//! ```
//! use clustering::{CentroidInit, ClusteringConfig};
//! use clustering::centroids::initial_centroids;
//!
//! let config = ClusteringConfig { init: CentroidInit::Linear, ..ClusteringConfig::new(3) };
//! config.validate()?;
//! let centroids = initial_centroids(&[0.0, 1.0, 3.0, 4.0], 3, config.init, false, config.seed);
//! assert_eq!(centroids, [0.0, 2.0, 4.0]);
//! # Ok::<(), clustering::Error>(())
//! ```
#![warn(missing_docs)]

pub mod assignment;
pub mod centroids;
mod config;
mod error;
mod rng;

pub use config::{
    CentroidInit, CentroidOptimizer, ClusteringConfig, GradientAggregation, Granularity, Variables,
};
pub use error::{Error, Result};
