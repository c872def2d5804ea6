//! Post-training quantization: affine int8 parameters (symmetric per-channel weights in
//! [-127, 127] with zero point 0, the TFLite convention; asymmetric unsigned activations
//! with zero exactly representable) and activation calibration by min-max, percentile,
//! entropy (KL divergence, TensorRT-style) or MSE.
//!
//! ```
//! use quantization::{BitWidth, Method, Observer, quantize_weights};
//!
//! // Weights: one scale per output channel.
//! let w = [0.5f32, -1.0, 0.25, 2.0, -0.5, 1.0];
//! let q = quantize_weights(&w, 2, true, BitWidth::INT8)?;
//! assert_eq!(q.values, [64, -127, 32, 127, -32, 64]);
//!
//! // Activations: observe calibration batches, then choose a range.
//! let mut observer = Observer::new();
//! observer.observe(&[0.0, 0.5, 1.0, 6.0])?;
//! let params = observer.qparams(Method::MinMax, BitWidth::INT8)?;
//! assert_eq!(params.zero_point, 0);
//! assert_eq!(params.quantize(6.0), 255);
//! # Ok::<(), quantization::Error>(())
//! ```
#![warn(missing_docs)]

mod calibrate;
mod error;
mod params;

pub use calibrate::{Method, Observer};
pub use error::{Error, Result};
pub use params::{BitWidth, QParams, QuantizedWeights, check_finite, quantize_weights};
