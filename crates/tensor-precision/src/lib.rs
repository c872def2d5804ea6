//! Numeric precision for mixed-precision training: Keras's precision [`Policy`] names,
//! fast f32 <-> float16/bfloat16 conversion of `ndarray` data, statistics of what a cast
//! does to a tensor ([`PrecisionStats`]) and a gradient-underflow audit that recommends a
//! loss scale for float16 training ([`GradientAudit`]).
//!
//! [`layers`] holds the building blocks that make one's own tch layers honour a policy
//! (policy-aware [`layers::linear`] and [`layers::conv2d`], and [`layers::output`] for the
//! logits), with float32 variables and gradients.
//!
//! ```
//! use half::f16;
//! use ndarray::array;
//! use tch::Kind;
//! use tensor_precision::{GradientAudit, HalfFormat, Policy, PrecisionStats};
//!
//! let policy: Policy = "mixed_float16".parse()?;
//! assert_eq!(policy.compute_kind(), Kind::Half);
//! assert_eq!(policy.variable_kind(), Kind::Float);
//! assert!(policy.needs_loss_scaling());
//!
//! // Bulk conversion of ndarray data (parallel for large arrays).
//! let weights = array![[0.1f32, -2.5], [1e-9, 7e4]];
//! let narrow = tensor_precision::to_half::<f16, _, _>(&weights);
//! let back = tensor_precision::to_f32(&narrow);
//! assert_eq!(back[[1, 0]], 0.0); // underflow
//! assert!(back[[1, 1]].is_infinite()); // overflow
//!
//! // What the cast did, counted.
//! let stats = PrecisionStats::of_slice(weights.as_slice().unwrap(), HalfFormat::F16);
//! assert_eq!((stats.underflow_to_zero, stats.overflow_to_inf), (1, 1));
//!
//! // Would loss scaling save small gradients?
//! let grads = vec![1e-9f32; 100];
//! let audit = GradientAudit::of_slices([grads.as_slice()]);
//! assert_eq!(audit.recommended_scale, Some(256.0));
//! # Ok::<(), tensor_precision::Error>(())
//! ```
#![warn(missing_docs)]

mod audit;
mod convert;
mod error;
mod format;
pub mod layers;
mod policy;
mod stats;

pub use audit::{AUDIT_SCALES, GradientAudit, GradientAuditor, MAX_UNDERFLOW_SHARE, ScaleAudit};
pub use convert::{
    PARALLEL_THRESHOLD, f32_to_half, f32_to_half_parallel, f32_to_half_serial, half_to_f32,
    half_to_f32_parallel, half_to_f32_serial, to_f32, to_half,
};
pub use error::{Error, Result};
pub use format::{HalfFloat, HalfFormat};
pub use layers::Conv2dOptions;
pub use policy::Policy;
pub use stats::PrecisionStats;
