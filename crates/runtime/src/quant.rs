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
        let (lo, hi) = min_max(x);
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
            self.quantize_chunk(x, out);
        } else {
            out.par_chunks_mut(PARALLEL_CHUNK)
                .zip(x.par_chunks(PARALLEL_CHUNK))
                .for_each(|(q, x)| self.quantize_chunk(x, q));
        }
    }

    /// [`QParams::quantize`] of every element, 16 at a time where AVX-512 is available.
    fn quantize_chunk(&self, x: &[f32], out: &mut [u8]) {
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected just above; the function checks lengths.
            done = unsafe { simd::quantize(x, self.scale, self.zero_point, out) };
        }
        out[done..]
            .iter_mut()
            .zip(&x[done..])
            .for_each(|(q, &v)| *q = self.quantize(v));
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

/// `(min(x, 0), max(x, 0))`, ignoring NaN (like folding with `f32::min` and `f32::max`).
fn min_max(x: &[f32]) -> (f32, f32) {
    let scalar =
        |x: &[f32], start: (f32, f32)| x.iter().fold(start, |(lo, hi), &v| (lo.min(v), hi.max(v)));
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected just above.
        let (lo, hi, done) = unsafe { simd::min_max(x) };
        return scalar(&x[done..], (lo, hi));
    }
    scalar(x, (0.0, 0.0))
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::{
        _CMP_LE_OQ, _CMP_UNORD_Q, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT, _mm_storeu_si128,
        _mm512_abs_ps, _mm512_add_ps, _mm512_cmp_ps_mask, _mm512_cvtps_epi32,
        _mm512_cvtusepi32_epi8, _mm512_div_ps, _mm512_loadu_ps, _mm512_mask_mov_ps, _mm512_max_ps,
        _mm512_min_ps, _mm512_mul_ps, _mm512_reduce_max_ps, _mm512_reduce_min_ps,
        _mm512_roundscale_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_sub_ps,
    };

    /// The running `(min, max)` from 0 over the first multiple of 64 elements, and how many
    /// that was. NaN lanes never win (`vminps` returns its second operand on NaN).
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn min_max(x: &[f32]) -> (f32, f32, usize) {
        let mut lo = [_mm512_setzero_ps(); 4];
        let mut hi = [_mm512_setzero_ps(); 4];
        let chunks = x.chunks_exact(64);
        let done = x.len() - chunks.remainder().len();
        for chunk in chunks {
            for j in 0..4 {
                // SAFETY: `chunk` holds 64 values, lanes `16 j .. 16 j + 16` are inside.
                let v = unsafe { _mm512_loadu_ps(chunk.as_ptr().add(16 * j)) };
                lo[j] = _mm512_min_ps(v, lo[j]);
                hi[j] = _mm512_max_ps(v, hi[j]);
            }
        }
        let lo = _mm512_min_ps(_mm512_min_ps(lo[0], lo[1]), _mm512_min_ps(lo[2], lo[3]));
        let hi = _mm512_max_ps(_mm512_max_ps(hi[0], hi[1]), _mm512_max_ps(hi[2], hi[3]));
        (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), done)
    }

    /// Quantizes the first multiple of 16 elements exactly like `QParams::quantize` and
    /// returns how many that was.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize(x: &[f32], scale: f32, zero_point: i32, out: &mut [u8]) -> usize {
        let len = x.len().min(out.len());
        let (s, z) = (_mm512_set1_ps(scale), _mm512_set1_ps(zero_point as f32));
        let (lo, hi) = (_mm512_setzero_ps(), _mm512_set1_ps(255.0));
        // `x * (1 / scale)` is within 2^-22 |x / scale| of the rounded quotient `x / scale`
        // (two roundings of 2^-24 each, against one): both round to the same integer unless
        // a tie point `k + 1/2` lies closer than that. Those vectors (and values beyond 2^20,
        // which the clamp saturates anyway) take the division, so the codes are exactly the
        // division's. A reciprocal that is not a normal number always takes the division.
        let inverse = 1.0 / scale;
        let fast = inverse.is_normal();
        let (inv, half) = (_mm512_set1_ps(inverse), _mm512_set1_ps(0.5));
        let margin = _mm512_set1_ps(1.0 / (1 << 20) as f32);
        let round =
            |y| _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
        let mut i = 0;
        while i + 16 <= len {
            // SAFETY: `i + 16 <= len`, inside both slices.
            let v = unsafe { _mm512_loadu_ps(x.as_ptr().add(i)) };
            let r = if fast {
                let y = _mm512_mul_ps(v, inv);
                let r = round(y);
                // 1/2 - |y - r| is the distance to the nearest tie (NaN compares false).
                let to_tie = _mm512_sub_ps(half, _mm512_abs_ps(_mm512_sub_ps(y, r)));
                let tolerance = _mm512_mul_ps(_mm512_abs_ps(y), margin);
                if _mm512_cmp_ps_mask::<_CMP_LE_OQ>(to_tie, tolerance) == 0 {
                    r
                } else {
                    round(_mm512_div_ps(v, s))
                }
            } else {
                round(_mm512_div_ps(v, s))
            };
            // NaN converts to code 0 before the zero point is added, as `as i32` does.
            let r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(r, r), lo);
            // Integers up to 2^24 add exactly; beyond, the clamp gives the same code.
            let q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, z), lo), hi);
            let bytes = _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(q));
            // SAFETY: 16 bytes at `i` are inside `out`.
            unsafe { _mm_storeu_si128(out.as_mut_ptr().add(i).cast(), bytes) };
            i += 16;
        }
        i
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
        fn slices_quantize_like_single_values(bits in proptest::collection::vec(any::<u32>(), 0..200), ties in proptest::collection::vec(-600i32..600, 0..100), scale in prop_oneof![1e-4f32..10.0, 1e-38f32..1e-30, 1e30f32..3e38], zero_point in 0i32..=255) {
            let q = QParams { scale, zero_point };
            // Arbitrary bit patterns (NaN, infinities) and exact halves of the step.
            // Values just beside the ties too: one ulp either side.
            let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b))
                .chain(ties.iter().map(|&t| t as f32 * 0.5 * scale))
                .chain(ties.iter().map(|&t| f32::from_bits((t as f32 * 0.5 * scale).to_bits().wrapping_add(1))))
                .chain(ties.iter().map(|&t| f32::from_bits((t as f32 * 0.5 * scale).to_bits().wrapping_sub(1))))
                .collect();
            let mut out = vec![0u8; x.len()];
            q.quantize_slice(&x, &mut out);
            for (&v, &o) in x.iter().zip(&out) {
                prop_assert_eq!(o, q.quantize(v), "{}", v);
            }
            let folded = x.iter().fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            prop_assert_eq!(min_max(&x), folded);
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
