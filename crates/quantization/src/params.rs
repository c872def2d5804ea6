//! Quantization parameters, the affine map and its rules: the symmetric weight rule, the
//! asymmetric (dynamic-range) activation rule, rounding half to even.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A bit width in 2..=8.
///
/// ```
/// use quantization::BitWidth;
///
/// assert_eq!(BitWidth::INT8.symmetric_max(), 127);
/// assert_eq!(BitWidth::new(4)?.unsigned_max(), 15);
/// assert!(BitWidth::new(9).is_err());
/// # Ok::<(), quantization::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitWidth(u32);

impl BitWidth {
    /// Eight bits.
    pub const INT8: Self = Self(8);

    /// A bit width, or [`Error::InvalidBitWidth`] outside 2..=8.
    pub fn new(bits: u32) -> Result<Self> {
        if (2..=8).contains(&bits) {
            Ok(Self(bits))
        } else {
            Err(Error::InvalidBitWidth(bits))
        }
    }

    /// The number of bits.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Largest symmetric signed level: `2^(bits-1) - 1` (127 for int8: the TFLite
    /// convention of [-127, 127], which keeps the range symmetric).
    pub fn symmetric_max(self) -> i32 {
        (1 << (self.0 - 1)) - 1
    }

    /// Largest unsigned level: `2^bits - 1` (255 for u8).
    pub fn unsigned_max(self) -> i32 {
        (1 << self.0) - 1
    }
}

/// Whether a weight tensor has one set of quantization parameters per output channel (axis
/// 0) or one for the whole tensor. Serialised in snake case (`"per_channel"`), as artifacts
/// store it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One scale and zero point for the whole tensor.
    PerTensor,
    /// One scale and zero point per output channel (axis 0).
    PerChannel,
}

/// An affine quantizer: `q = clamp(round_ties_even(x / scale) + zero_point, qmin, qmax)`,
/// `x ~ scale * (q - zero_point)`.
///
/// The one parameter type of the toolkit: calibration ([`crate::Observer`]) and the
/// activation rule ([`QParams::asymmetric`], [`QParams::dynamic`]) produce it, the runtime
/// stores and runs it (activations on the u8 grid, [`QParams::u8`]), and quantization-aware
/// training fakes it.
///
/// ```
/// use quantization::{BitWidth, QParams};
///
/// // Activations within [-1, 3]: 255 steps of 4 / 255, zero at code 64.
/// let p = QParams::asymmetric(-1.0, 3.0, BitWidth::INT8);
/// assert_eq!((p.qmin, p.qmax, p.zero_point), (0, 255, 64));
/// assert_eq!(p.quantize(0.0), 64);
/// assert_eq!(p.quantize(100.0), 255); // clamped
/// assert!((p.dequantize(p.quantize(1.0)) - 1.0).abs() <= p.scale / 2.0);
/// // The dynamic-range rule is the same rule over a tensor's own range.
/// assert_eq!(QParams::dynamic(&[-1.0, 0.5, 3.0]), p);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QParams {
    /// Step between levels; positive and finite.
    pub scale: f32,
    /// The level that represents 0.0 exactly.
    pub zero_point: i32,
    /// Lowest level.
    pub qmin: i32,
    /// Highest level.
    pub qmax: i32,
}

impl QParams {
    /// Parameters on the unsigned 8-bit grid (levels 0..=255), the runtime's activation
    /// quantization, as an artifact stores it. Nothing is checked: see [`QParams::is_valid`].
    pub const fn u8(scale: f32, zero_point: i32) -> Self {
        Self {
            scale,
            zero_point,
            qmin: 0,
            qmax: 255,
        }
    }

    /// Symmetric signed parameters for values within `[-max_abs, max_abs]`: zero point 0,
    /// levels `[-qmax, qmax]`, scale `max_abs / qmax`. A scale that would not be positive
    /// and finite (a constant-zero tensor) is 1, so nothing divides by zero.
    pub fn symmetric(max_abs: f32, bits: BitWidth) -> Self {
        let qmax = bits.symmetric_max();
        let scale = max_abs / qmax as f32;
        Self {
            scale: if scale.is_finite() && scale > 0.0 {
                scale
            } else {
                1.0
            },
            zero_point: 0,
            qmin: -qmax,
            qmax,
        }
    }

    /// Asymmetric unsigned parameters for values within `[min, max]`: the range is widened
    /// to `[min(min, 0), max(max, 0)]` so that zero is exactly representable (PyTorch's
    /// observers do the same), the scale is its width over `qmax` and the zero point
    /// `round_ties_even(-min / scale)`, clamped to the grid. A scale that would not be
    /// positive and finite (an all-zero range, an overflowing one) gives scale 1 and zero
    /// point 0. NaN bounds count as 0.
    ///
    /// With [`BitWidth::INT8`] this is the dynamic-range rule the runtime applies to every
    /// batch of a dynamic-range layer ([`QParams::dynamic`]), and the rule of calibrated
    /// (static) activations.
    pub fn asymmetric(min: f32, max: f32, bits: BitWidth) -> Self {
        let (lo, hi) = (min.min(0.0), max.max(0.0));
        let qmax = bits.unsigned_max();
        let scale = (hi - lo) / qmax as f32;
        if !(scale.is_finite() && scale > 0.0) {
            return Self {
                scale: 1.0,
                zero_point: 0,
                qmin: 0,
                qmax,
            };
        }
        // `as` saturates; the clamp keeps the zero point a level.
        let zero_point = ((-lo / scale).round_ties_even() as i32).clamp(0, qmax);
        Self {
            scale,
            zero_point,
            qmin: 0,
            qmax,
        }
    }

    /// Per-tensor u8 parameters covering `[min(x, 0), max(x, 0)]` (NaN ignored): the
    /// dynamic-range rule, [`QParams::asymmetric`] over the tensor's own range with
    /// [`BitWidth::INT8`]. An all-zero (or empty) input gets scale 1 and zero point 0.
    pub fn dynamic(x: &[f32]) -> Self {
        let (lo, hi) = x
            .iter()
            .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        Self::asymmetric(lo, hi, BitWidth::INT8)
    }

    /// Whether the scale is positive and finite, the levels ordered and the zero point one
    /// of them.
    pub fn is_valid(&self) -> bool {
        self.scale.is_finite()
            && self.scale > 0.0
            && self.qmin <= self.qmax
            && (self.qmin..=self.qmax).contains(&self.zero_point)
    }

    /// Whether the levels are the unsigned 8-bit grid 0..=255 (the runtime's activations).
    pub fn is_u8(&self) -> bool {
        self.qmin == 0 && self.qmax == 255
    }

    /// The level of `x`: `round_ties_even(x / scale) + zero_point` (saturating), clamped
    /// to `[qmin, qmax]`. NaN maps to the zero point (the level of 0.0). The reference every
    /// fast quantizer (the runtime's vectorised slices) is tested against.
    #[inline]
    pub fn quantize(&self, x: f32) -> i32 {
        ((x / self.scale).round_ties_even() as i32)
            .saturating_add(self.zero_point)
            .max(self.qmin)
            .min(self.qmax)
    }

    /// The value of level `q`.
    #[inline]
    pub fn dequantize(&self, q: i32) -> f32 {
        (i64::from(q) - i64::from(self.zero_point)) as f32 * self.scale
    }

    /// The smallest and largest values representable without clipping.
    pub fn range(&self) -> (f32, f32) {
        (self.dequantize(self.qmin), self.dequantize(self.qmax))
    }
}

/// Rejects NaN and infinities, naming what was checked.
pub fn check_finite(values: &[f32], what: &str) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::NonFinite {
            what: what.into(),
            index,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The runtime's dynamic-range rule as it shipped before it moved here, verbatim: the
    /// artifacts and the ONNX export depend on its exact parameters.
    fn shipped_dynamic(x: &[f32]) -> (f32, i32) {
        let (lo, hi) = x
            .iter()
            .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let scale = (hi - lo) / 255.0;
        if !(scale.is_finite() && scale > 0.0) {
            return (1.0, 0);
        }
        let zero_point = ((-lo / scale).round_ties_even() as i32).clamp(0, 255);
        (scale, zero_point)
    }

    /// Any f32, NaN, infinities and subnormals included.
    fn any_f32() -> impl Strategy<Value = f32> {
        any::<u32>().prop_map(f32::from_bits)
    }

    proptest! {
        #[test]
        fn the_dynamic_rule_is_the_shipped_one(
            x in prop::collection::vec(prop_oneof![any_f32(), -1e3f32..1e3, -1e-30f32..1e-30], 0..64),
        ) {
            let p = QParams::dynamic(&x);
            let (scale, zero_point) = shipped_dynamic(&x);
            prop_assert_eq!(p.scale.to_bits(), scale.to_bits());
            prop_assert_eq!(p.zero_point, zero_point);
            prop_assert!(p.is_u8() && p.is_valid());
        }

        #[test]
        fn quantize_rounds_half_to_even_and_clamps(x in any_f32(), scale in 1e-4f32..10.0, zero_point in 0i32..=255) {
            let p = QParams::u8(scale, zero_point);
            // The rule in f64, where `x / scale` is exact enough to decide every tie the
            // same way as the f32 quotient does (its rounding is reproduced first).
            let quotient = f64::from(x / scale);
            let expected = if quotient.is_nan() {
                f64::from(zero_point)
            } else {
                (quotient.round_ties_even() + f64::from(zero_point)).clamp(0.0, 255.0)
            };
            prop_assert_eq!(f64::from(p.quantize(x)), expected);
        }
    }

    #[test]
    fn degenerate_ranges_get_usable_parameters() {
        assert_eq!(QParams::dynamic(&[]), QParams::u8(1.0, 0));
        assert_eq!(QParams::dynamic(&[0.0; 4]), QParams::u8(1.0, 0));
        assert!(QParams::dynamic(&[f32::NAN, 1.0]).is_valid());
        assert_eq!(QParams::dynamic(&[f32::INFINITY]), QParams::u8(1.0, 0));
        assert_eq!(QParams::symmetric(0.0, BitWidth::INT8).scale, 1.0);
        assert_eq!(QParams::symmetric(f32::INFINITY, BitWidth::INT8).scale, 1.0);
        // Exact halves go to the even level.
        let p = QParams::u8(1.0, 0);
        assert_eq!([0.5, 1.5, 2.5, -0.5].map(|x| p.quantize(x)), [0, 2, 2, 0]);
        // Levels out of order never panic.
        let odd = QParams {
            scale: 1.0,
            zero_point: 0,
            qmin: 5,
            qmax: -5,
        };
        assert!(!odd.is_valid());
        assert_eq!(odd.quantize(1.0), -5);
    }
}
