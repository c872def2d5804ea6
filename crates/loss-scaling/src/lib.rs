//! Loss scaling for float16 training in a tch loop, fixed or dynamic, after Keras's
//! `LossScaleOptimizer` ([`DynamicConfig::keras`], the default) and PyTorch's
//! `GradScaler` ([`DynamicConfig::pytorch`]).
//!
//! Float16 flushes values below 2^-24 to zero, and small gradients of a float16
//! forward pass do exactly that. Multiplying the loss by a large scale lifts every
//! intermediate gradient by the same factor; the scaler divides the float32 gradients by
//! it again before the optimizer step. A dynamic scale starts high, halves whenever a
//! gradient comes out infinite or NaN (that step is skipped, the weights and the
//! optimizer state stay untouched) and doubles after a run of finite steps.
//!
//! In your own loop it takes three lines: scale the loss, backward, `step`:
//!
//! ```
//! use loss_scaling::LossScaler;
//! use tch::nn::{self, Module, OptimizerConfig};
//! use tch::{Device, Kind, Tensor};
//!
//! tch::manual_seed(0);
//! let vs = nn::VarStore::new(Device::Cpu);
//! let model = nn::linear(vs.root(), 4, 1, Default::default());
//! let mut optimizer = nn::Sgd::default().build(&vs, 0.1)?;
//! let mut scaler = LossScaler::default(); // Keras: 2^15, x2 every 2000 finite steps, /2
//!
//! let xs = Tensor::randn([16, 4], (Kind::Float, Device::Cpu));
//! let ys = xs.sum_dim_intlist(-1, true, Kind::Float);
//! for _ in 0..20 {
//!     optimizer.zero_grad();
//!     let loss = (model.forward(&xs) - &ys).square().mean(Kind::Float);
//!     scaler.scale(&loss).backward();
//!     let outcome = scaler.step(&mut optimizer)?; // unscale, check, step or skip, update
//!     assert!(!outcome.skipped);
//! }
//! assert_eq!((scaler.steps(), scaler.skipped_steps()), (20, 0));
//!
//! // The state is serialisable: a resumed run continues with the same scale.
//! let resumed = LossScaler::from_json(&scaler.to_json()?)?;
//! assert_eq!(resumed, scaler);
//! # Ok::<(), loss_scaling::Error>(())
//! ```
//!
//! The gradients are unscaled and checked by LibTorch's fused AMP kernel, on the CPU as
//! on CUDA; they must be float32, which is what the mixed-precision policies of the
//! `models` crate keep (float32 variables, float16 compute).
#![warn(missing_docs)]

mod config;
mod error;
mod scaler;

pub use config::{DynamicConfig, LossScaleConfig};
pub use error::{Error, Result};
pub use scaler::{LossScaler, ScalePoint, StepOutcome, unscale_grads};
