//! The runtime's fast paths over the shared quantization parameters
//! ([`quantization::QParams`], re-exported as `runtime::QParams`): `u8` activation codes
//! per element (inlined), over slices (AVX-512 or AVX2 where available, in parallel when large),
//! back to f32, and the dynamic-range parameters of a batch with a vectorised min-max scan.
//! The rules themselves (the dynamic range, rounding half to even, the weight quantizer)
//! live in the `quantization` crate; every path here is tested to give exactly its results.

use quantization::{BitWidth, QParams};
use rayon::prelude::*;

/// Elements below which quantization stays on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// Elements per parallel task of [`U8Codes::quantize_slice`].
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

/// The dynamic-range parameters of `x`: [`QParams::dynamic`] (the shared rule, applied to
/// `(min(x, 0), max(x, 0))`), with the range scanned 64 values at a time where AVX-512 is
/// available, 32 with AVX2.
pub(crate) fn dynamic(x: &[f32]) -> QParams {
    let (lo, hi) = min_max(x);
    QParams::asymmetric(lo, hi, BitWidth::INT8)
}

/// `u8` codes of activation parameters on the u8 grid (`qmin` 0, `qmax` 255: every decoded
/// artifact's, and every dynamic-range batch's), exactly [`QParams::quantize`] and
/// [`QParams::dequantize`] of them, fast.
pub(crate) trait U8Codes {
    /// The code of `x`: `QParams::quantize(x)` for parameters on the u8 grid, inlined and
    /// free of library calls so that loops over it vectorise.
    fn quantize_u8(&self, x: f32) -> u8;

    /// The value of the code `q`.
    fn dequantize_u8(&self, q: u8) -> f32;

    /// Quantizes `x` into `out` (same length).
    ///
    /// # Panics
    /// If the lengths differ.
    fn quantize_slice(&self, x: &[f32], out: &mut [u8]);

    /// Dequantizes `q` into `out` (same length).
    ///
    /// # Panics
    /// If the lengths differ.
    fn dequantize_slice(&self, q: &[u8], out: &mut [f32]);
}

impl U8Codes for QParams {
    #[inline(always)]
    fn quantize_u8(&self, x: f32) -> u8 {
        (round_ties_even_saturating(x / self.scale) as i32)
            .saturating_add(self.zero_point)
            .clamp(0, 255) as u8
    }

    #[inline(always)]
    fn dequantize_u8(&self, q: u8) -> f32 {
        // A u8 code minus a u8 zero point never wraps; `wrapping_sub` only keeps parameters
        // the decoder would have refused from panicking.
        self.scale * i32::from(q).wrapping_sub(self.zero_point) as f32
    }

    fn quantize_slice(&self, x: &[f32], out: &mut [u8]) {
        assert_eq!(x.len(), out.len());
        if x.len() < PARALLEL_MIN_ELEMENTS {
            quantize_chunk(self, x, out);
        } else {
            out.par_chunks_mut(PARALLEL_CHUNK)
                .zip(x.par_chunks(PARALLEL_CHUNK))
                .for_each(|(q, x)| quantize_chunk(self, x, q));
        }
    }

    fn dequantize_slice(&self, q: &[u8], out: &mut [f32]) {
        assert_eq!(q.len(), out.len());
        out.iter_mut()
            .zip(q)
            .for_each(|(x, &v)| *x = self.dequantize_u8(v));
    }
}

/// [`U8Codes::quantize_u8`] of every element, 16 at a time where AVX-512 is available, 8
/// with AVX2.
fn quantize_chunk(p: &QParams, x: &[f32], out: &mut [u8]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected just above; the function checks lengths.
        done = unsafe { simd::quantize(x, p.scale, p.zero_point, out) };
    } else if is_x86_feature_detected!("avx2") {
        // SAFETY: as above.
        done = unsafe { simd256::quantize(x, p.scale, p.zero_point, out) };
    }
    out[done..]
        .iter_mut()
        .zip(&x[done..])
        .for_each(|(q, &v)| *q = p.quantize_u8(v));
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
    } else if is_x86_feature_detected!("avx2") {
        // SAFETY: as above.
        let (lo, hi, done) = unsafe { simd256::min_max(x) };
        return scalar(&x[done..], (lo, hi));
    }
    scalar(x, (0.0, 0.0))
}

/// The AVX2 versions of [`simd`]'s functions, 8 lanes at a time, with the same results.
#[cfg(target_arch = "x86_64")]
mod simd256 {
    use std::arch::x86_64::{
        __m256, _CMP_LE_OQ, _CMP_UNORD_Q, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT,
        _mm_packus_epi16, _mm_packus_epi32, _mm_storel_epi64, _mm256_add_ps, _mm256_andnot_ps,
        _mm256_blendv_ps, _mm256_castsi256_si128, _mm256_cmp_ps, _mm256_cvtps_epi32, _mm256_div_ps,
        _mm256_extracti128_si256, _mm256_loadu_ps, _mm256_max_ps, _mm256_min_ps,
        _mm256_movemask_ps, _mm256_mul_ps, _mm256_round_ps, _mm256_set1_ps, _mm256_setzero_ps,
        _mm256_storeu_ps, _mm256_sub_ps,
    };

    /// The running `(min, max)` from 0 over the first multiple of 32 elements, and how many
    /// that was. NaN lanes never win (`vminps` returns its second operand on NaN).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn min_max(x: &[f32]) -> (f32, f32, usize) {
        let mut lo = [_mm256_setzero_ps(); 4];
        let mut hi = [_mm256_setzero_ps(); 4];
        let chunks = x.chunks_exact(32);
        let done = x.len() - chunks.remainder().len();
        for chunk in chunks {
            for j in 0..4 {
                // SAFETY: `chunk` holds 32 values, lanes `8 j .. 8 j + 8` are inside.
                let v = unsafe { _mm256_loadu_ps(chunk.as_ptr().add(8 * j)) };
                lo[j] = _mm256_min_ps(v, lo[j]);
                hi[j] = _mm256_max_ps(v, hi[j]);
            }
        }
        let lo = _mm256_min_ps(_mm256_min_ps(lo[0], lo[1]), _mm256_min_ps(lo[2], lo[3]));
        let hi = _mm256_max_ps(_mm256_max_ps(hi[0], hi[1]), _mm256_max_ps(hi[2], hi[3]));
        let (mut l, mut h) = ([0f32; 8], [0f32; 8]);
        // SAFETY: two arrays of 8 writable f32.
        unsafe {
            _mm256_storeu_ps(l.as_mut_ptr(), lo);
            _mm256_storeu_ps(h.as_mut_ptr(), hi);
        }
        // The lanes hold no NaN (see above): any fold order gives the same extremes.
        let lo = l.iter().fold(0.0f32, |a, &b| a.min(b));
        let hi = h.iter().fold(0.0f32, |a, &b| a.max(b));
        (lo, hi, done)
    }

    /// Quantizes the first multiple of 8 elements exactly like `U8Codes::quantize_u8` (the
    /// same reciprocal shortcut and fallback to the division as the AVX-512 version) and
    /// returns how many that was.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize(x: &[f32], scale: f32, zero_point: i32, out: &mut [u8]) -> usize {
        let len = x.len().min(out.len());
        let (s, z) = (_mm256_set1_ps(scale), _mm256_set1_ps(zero_point as f32));
        let (lo, hi) = (_mm256_setzero_ps(), _mm256_set1_ps(255.0));
        let inverse = 1.0 / scale;
        let fast = inverse.is_normal();
        let (inv, half) = (_mm256_set1_ps(inverse), _mm256_set1_ps(0.5));
        let margin = _mm256_set1_ps(1.0 / (1 << 20) as f32);
        let sign = _mm256_set1_ps(-0.0);
        let abs = |y: __m256| _mm256_andnot_ps(sign, y);
        let round = |y| _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
        let mut i = 0;
        while i + 8 <= len {
            // SAFETY: `i + 8 <= len`, inside both slices.
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            let r = if fast {
                let y = _mm256_mul_ps(v, inv);
                let r = round(y);
                let to_tie = _mm256_sub_ps(half, abs(_mm256_sub_ps(y, r)));
                let tolerance = _mm256_mul_ps(abs(y), margin);
                if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(to_tie, tolerance)) == 0 {
                    r
                } else {
                    round(_mm256_div_ps(v, s))
                }
            } else {
                round(_mm256_div_ps(v, s))
            };
            // NaN converts to code 0 before the zero point is added, as `as i32` does.
            let r = _mm256_blendv_ps(r, lo, _mm256_cmp_ps::<_CMP_UNORD_Q>(r, r));
            let q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, z), lo), hi);
            // Codes 0..=255 as i32, packed down without saturating anything.
            let q = _mm256_cvtps_epi32(q);
            let words =
                _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
            let bytes = _mm_packus_epi16(words, words);
            // SAFETY: 8 bytes at `i` are inside `out`.
            unsafe { _mm_storel_epi64(out.as_mut_ptr().add(i).cast(), bytes) };
            i += 8;
        }
        i
    }
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

    /// Quantizes the first multiple of 16 elements exactly like `U8Codes::quantize_u8` and
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Dequantizing a quantized value is off by at most half a step, plus the rounding of the
    /// division and multiplication in f32 (a few ulps of the value).
    const MAX_ROUNDTRIP_STEPS: f32 = 0.5 + 1e-3;

    /// The shared scalar rule's code, which every fast path must give exactly.
    fn reference(q: &QParams, x: f32) -> u8 {
        u8::try_from(q.quantize(x)).expect("the u8 grid's levels are u8 codes")
    }

    proptest! {
        #[test]
        fn dynamic_roundtrip_is_within_half_a_step(x in proptest::collection::vec(-1e3f32..1e3, 1..200)) {
            let q = dynamic(&x);
            prop_assert_eq!(q, QParams::dynamic(&x));
            prop_assert!(q.is_valid() && q.is_u8());
            prop_assert_eq!(q.quantize_u8(0.0), q.zero_point as u8);
            for &v in &x {
                let back = q.dequantize_u8(q.quantize_u8(v));
                prop_assert!((back - v).abs() <= MAX_ROUNDTRIP_STEPS * q.scale, "{} -> {}", v, back);
            }
        }

        #[test]
        fn fast_rounding_quantizes_like_the_shared_rule(bits in any::<u32>(), scale in 1e-4f32..10.0, zero_point in 0i32..=255) {
            let q = QParams::u8(scale, zero_point);
            // Every bit pattern: NaN, infinities, subnormals and exact halves included.
            let x = f32::from_bits(bits);
            prop_assert_eq!(q.quantize_u8(x), reference(&q, x));
            // Near the codes, where the ties are.
            let near = (bits % 1024) as f32 * 0.5 - 256.0;
            prop_assert_eq!(q.quantize_u8(near * scale), reference(&q, near * scale));
            let code = (bits % 256) as u8;
            prop_assert_eq!(q.dequantize_u8(code).to_bits(), q.dequantize(i32::from(code)).to_bits());
        }

        #[test]
        fn slices_quantize_like_the_shared_rule(bits in proptest::collection::vec(any::<u32>(), 0..200), ties in proptest::collection::vec(-600i32..600, 0..100), scale in prop_oneof![1e-4f32..10.0, 1e-38f32..1e-30, 1e30f32..3e38], zero_point in 0i32..=255) {
            let q = QParams::u8(scale, zero_point);
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
                prop_assert_eq!(o, reference(&q, v), "{}", v);
            }
            let mut back = vec![0f32; out.len()];
            q.dequantize_slice(&out, &mut back);
            for (&c, &b) in out.iter().zip(&back) {
                prop_assert_eq!(b.to_bits(), q.dequantize(i32::from(c)).to_bits());
            }
            let folded = x.iter().fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            prop_assert_eq!(min_max(&x), folded);
            prop_assert_eq!(dynamic(&x), QParams::dynamic(&x));
        }
    }

    #[test]
    fn large_slices_quantize_in_parallel_like_the_shared_rule() {
        let x: Vec<f32> = (0..3 * PARALLEL_MIN_ELEMENTS + 5)
            .map(|i| (i % 1001) as f32 * 0.013 - 6.5)
            .collect();
        let q = dynamic(&x);
        let mut out = vec![0u8; x.len()];
        q.quantize_slice(&x, &mut out);
        assert!(x.iter().zip(&out).all(|(&v, &o)| o == reference(&q, v)));
    }

    #[test]
    fn degenerate_inputs_get_usable_parameters() {
        assert_eq!(dynamic(&[]), QParams::u8(1.0, 0));
        assert_eq!(dynamic(&[0.0; 4]).scale, 1.0);
        assert!(dynamic(&[f32::NAN, 1.0]).is_valid());
        assert!(dynamic(&[f32::INFINITY]).is_valid());
    }
}
