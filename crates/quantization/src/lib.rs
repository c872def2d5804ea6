//! The one home of the toolkit's affine quantization math: the parameter type, the rules
//! that choose parameters, the rounding, the weight quantizer, and activation calibration.
//! Pure Rust, no LibTorch.
//!
//! - [`QParams`]: an affine quantizer `q = clamp(round_ties_even(x / scale) + zero_point,
//!   qmin, qmax)`. The runtime stores and runs this very type (`runtime::QParams` is a
//!   re-export; its activations are on the u8 grid, [`QParams::u8`]).
//! - Weights: [`quantize_weights`], symmetric (zero point 0, codes in [-127, 127] for int8,
//!   the TFLite convention), per output channel or per tensor ([`Granularity`]). Its
//!   [`QuantizedWeights`] are codes, scales and zero points, what the runtime's artifact
//!   builder stores; the builder quantizes every int8 weight with it.
//! - Activations: [`QParams::asymmetric`], unsigned with zero exactly representable, is
//!   both the dynamic-range rule the runtime applies to every batch ([`QParams::dynamic`])
//!   and the rule of calibrated ranges; an [`Observer`] calibrates a range over batches by
//!   min-max, percentile, entropy (KL divergence, TensorRT-style) or MSE.
//! - Rounding: half to even everywhere, like `torch.round` and PyTorch's quantize ops.
//!
//! PyTorch cross-checks the weight quantizer and the dynamic rule in the workspace's
//! integration tests; the runtime's vectorised quantizers are tested against
//! [`QParams::quantize`].
//!
//! ```
//! use quantization::{BitWidth, Granularity, Method, Observer, QParams, quantize_weights};
//!
//! // Weights: one scale per output channel.
//! let w = [0.5f32, -1.0, 0.25, 2.0, -0.5, 1.0];
//! let q = quantize_weights(&w, 2, Granularity::PerChannel, BitWidth::INT8)?;
//! assert_eq!(q.values, [64, -127, 32, 127, -32, 64]);
//!
//! // Activations: observe calibration batches, then choose a range.
//! let mut observer = Observer::new();
//! observer.observe(&[0.0, 0.5, 1.0, 6.0])?;
//! let params = observer.qparams(Method::MinMax, BitWidth::INT8)?;
//! assert_eq!(params.zero_point, 0);
//! assert_eq!(params.quantize(6.0), 255);
//! // Min-max calibration of one batch is the dynamic-range rule.
//! assert_eq!(params, QParams::dynamic(&[0.0, 0.5, 1.0, 6.0]));
//! # Ok::<(), quantization::Error>(())
//! ```
#![warn(missing_docs)]

mod calibrate;
mod error;
mod params;
mod sample;
mod weights;

pub use calibrate::{Method, Observer, ObserverConfig};
pub use error::{Error, Result};
pub use params::{BitWidth, Granularity, QParams, check_finite};
pub use weights::{QuantizedWeights, quantize_weights};
