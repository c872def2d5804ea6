//! Affine quantization of activations (`u8`) and symmetric quantization of weights (`i8`).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Elements below which quantization stays on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// Elements per parallel task of [`QParams::quantize_slice`].
const PARALLEL_CHUNK: usize = 1 << 14;

/// `x.round_ties_even()` for `|x| < 2^22`; values beyond saturate at `+-2^22` and NaN stays
/// NaN. Adding and subtracting `1.5 * 2^23` rounds to an integer under the default rounding
/// mode (ties to even) in two instructions that vectorise, where `round_ties_even` is a
/// library call on baseline x86-64. Every caller clamps the result to a range far inside
/// `+-2^22`, so the saturation never shows.
#[inline(always)]
pub(crate) fn round_ties_even_saturating(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    const LIMIT: f32 = 4_194_304.0;
    (x.clamp(-LIMIT, LIMIT) + MAGIC) - MAGIC
}

/// Affine `u8` quantization: `x ~ scale * (q - zero_point)`, `q` in `0..=255`.
///
/// Quantization rounds half to even (`round_ties_even(x / scale) + zero_point`, clamped), like
/// PyTorch's `quantize_per_tensor`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QParams {
    /// Step size, positive and finite.
    pub scale: f32,
    /// The code of 0.0, in `0..=255`.
    pub zero_point: i32,
}

impl QParams {
    /// Per-tensor parameters covering `[min(x, 0), max(x, 0)]` (so 0.0 is exact): the
    /// dynamic-range scheme. An all-zero (or empty) input gets scale 1.
    pub fn dynamic(x: &[f32]) -> Self {
        let (lo, hi) = x
            .iter()
            .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let scale = (hi - lo) / 255.0;
        if !(scale.is_finite() && scale > 0.0) {
            return Self {
                scale: 1.0,
                zero_point: 0,
            };
        }
        // `as` saturates; the clamp keeps the zero point a valid code.
        let zero_point = ((-lo / scale).round_ties_even() as i32).clamp(0, 255);
        Self { scale, zero_point }
    }

    /// Whether the scale is positive and finite and the zero point a `u8` code.
    pub fn is_valid(&self) -> bool {
        self.scale.is_finite() && self.scale > 0.0 && (0..=255).contains(&self.zero_point)
    }

    /// The code of `x`.
    #[inline(always)]
    pub fn quantize(&self, x: f32) -> u8 {
        (round_ties_even_saturating(x / self.scale) as i32)
            .saturating_add(self.zero_point)
            .clamp(0, 255) as u8
    }

    /// The value of the code `q`.
    pub fn dequantize(&self, q: u8) -> f32 {
        self.scale * (i32::from(q) - self.zero_point) as f32
    }

    /// Quantizes `x` into `out` (same length).
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn quantize_slice(&self, x: &[f32], out: &mut [u8]) {
        assert_eq!(x.len(), out.len());
        if x.len() < PARALLEL_MIN_ELEMENTS {
            out.iter_mut()
                .zip(x)
                .for_each(|(q, &v)| *q = self.quantize(v));
        } else {
            out.par_chunks_mut(PARALLEL_CHUNK)
                .zip(x.par_chunks(PARALLEL_CHUNK))
                .for_each(|(q, x)| {
                    q.iter_mut()
                        .zip(x)
                        .for_each(|(q, &v)| *q = self.quantize(v));
                });
        }
    }

    /// Dequantizes `q` into `out` (same length).
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn dequantize_slice(&self, q: &[u8], out: &mut [f32]) {
        assert_eq!(q.len(), out.len());
        out.iter_mut()
            .zip(q)
            .for_each(|(x, &v)| *x = self.dequantize(v));
    }
}

/// Symmetric `i8` quantization of a weight tensor with `rows` output channels: codes in
/// `-127..=127`, one scale per row (`per_channel`) or one for the tensor; the scale is
/// `max |w| / 127` (1.0 for an all-zero group). Returns the codes and the scales.
///
/// # Panics
/// If `rows` is 0 or does not divide `w.len()`.
pub fn quantize_symmetric(w: &[f32], rows: usize, per_channel: bool) -> (Vec<i8>, Vec<f32>) {
    assert!(
        rows > 0 && w.len().is_multiple_of(rows),
        "rows must divide the weights"
    );
    let group = if per_channel { w.len() / rows } else { w.len() };
    let mut codes = Vec::with_capacity(w.len());
    let mut scales = Vec::new();
    for chunk in w.chunks(group.max(1)) {
        let max = chunk.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
        let scale = if max.is_finite() && max > 0.0 {
            max / 127.0
        } else {
            1.0
        };
        scales.push(scale);
        codes.extend(
            chunk
                .iter()
                .map(|&v| (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8),
        );
    }
    if scales.is_empty() {
        scales.push(1.0);
    }
    (codes, scales)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Dequantizing a quantized value is off by at most half a step, plus the rounding of the
    /// division and multiplication in f32 (a few ulps of the value).
    const MAX_ROUNDTRIP_STEPS: f32 = 0.5 + 1e-3;

    proptest! {
        #[test]
        fn dynamic_roundtrip_is_within_half_a_step(x in proptest::collection::vec(-1e3f32..1e3, 1..200)) {
            let q = QParams::dynamic(&x);
            prop_assert!(q.is_valid());
            prop_assert_eq!(q.quantize(0.0), q.zero_point as u8);
            for &v in &x {
                let back = q.dequantize(q.quantize(v));
                prop_assert!((back - v).abs() <= MAX_ROUNDTRIP_STEPS * q.scale, "{} -> {}", v, back);
            }
        }

        #[test]
        fn fast_rounding_quantizes_like_round_ties_even(bits in any::<u32>(), scale in 1e-4f32..10.0, zero_point in 0i32..=255) {
            let q = QParams { scale, zero_point };
            // Every bit pattern: NaN, infinities, subnormals and exact halves included.
            let x = f32::from_bits(bits);
            let reference = |x: f32| ((x / scale).round_ties_even() as i32).saturating_add(zero_point).clamp(0, 255) as u8;
            prop_assert_eq!(q.quantize(x), reference(x));
            // Near the codes, where the ties are.
            let near = (bits % 1024) as f32 * 0.5 - 256.0;
            prop_assert_eq!(q.quantize(near * scale), reference(near * scale));
        }

        #[test]
        fn symmetric_roundtrip_is_within_half_a_step(w in proptest::collection::vec(-5f32..5.0, 1..64), per_channel in any::<bool>()) {
            let rows = if w.len() % 2 == 0 { 2 } else { 1 };
            let (codes, scales) = quantize_symmetric(&w, rows, per_channel);
            let group = w.len() / scales.len();
            for (i, (&c, &v)) in codes.iter().zip(&w).enumerate() {
                let s = scales[i / group];
                prop_assert!((f32::from(c) * s - v).abs() <= MAX_ROUNDTRIP_STEPS * s);
            }
        }
    }

    #[test]
    fn degenerate_inputs_get_usable_parameters() {
        assert_eq!(
            QParams::dynamic(&[]),
            QParams {
                scale: 1.0,
                zero_point: 0
            }
        );
        assert_eq!(QParams::dynamic(&[0.0; 4]).scale, 1.0);
        let q = QParams::dynamic(&[f32::NAN, 1.0]);
        assert!(q.is_valid());
        assert!(QParams::dynamic(&[f32::INFINITY]).is_valid());
        assert_eq!(quantize_symmetric(&[0.0; 4], 2, true).1, vec![1.0, 1.0]);
    }
}
