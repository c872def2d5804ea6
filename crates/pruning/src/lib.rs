//! Magnitude pruning for tch models with TF-MOT's schedules: unstructured per layer,
//! global (one threshold across layers), block, and N:M (2:4) sparsity.
//!
//! **Schedules and TF-MOT.** A [`Schedule`] prunes on TF-MOT's steps (`_should_prune_in_step`:
//! from `begin_step` to `end_step`, every `frequency` steps) to TF-MOT's sparsities. One
//! difference: a `PolynomialDecay` whose `end_step` the frequency does not reach from
//! `begin_step` is refused ([`Error::UnreachableEndStep`], naming the nearest valid end
//! steps), where TF-MOT accepts it and never reaches its final sparsity (its last update
//! falls before the end step). Every accepted schedule reaches its final sparsity exactly at
//! `end_step`; when the end is computed from epochs and batches, round it to a multiple of
//! the frequency (as the error suggests).
//!
//! ```
//! use pruning::{Granularity, Pruner, PruningConfig, Schedule, Scope};
//! use tch::nn::{self, Module, OptimizerConfig};
//! use tch::{Device, Kind, Tensor};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let layer = nn::linear(vs.root() / "0", 16, 8, Default::default());
//! let mut optimizer = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.01)?;
//! let config = PruningConfig {
//!     schedule: Schedule::polynomial_decay(0.0, 0.75, 0, 10, 2)?,
//!     granularity: Granularity::Unstructured,
//!     scope: Scope::PerLayer,
//! };
//! let mut pruner = Pruner::new(&vs, config)?;
//! let xs = Tensor::randn([32, 16], (Kind::Float, Device::Cpu));
//! for step in 0..20 {
//!     pruner.update(step)?; // new masks on schedule steps
//!     optimizer.backward_step(&layer.forward(&xs).square().mean(Kind::Float));
//!     pruner.apply(); // pruned weights stay exactly zero
//! }
//! let report = pruner.strip();
//! assert_eq!(report[0].zeros, 96); // 75% of 8 x 16
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod error;
pub mod mask;
mod pruner;
mod schedule;

pub use error::{Error, Result};
pub use mask::Granularity;
pub use pruner::{LayerSparsity, Pruner, PruningConfig, Scope};
pub use schedule::{Schedule, Sparsity};
