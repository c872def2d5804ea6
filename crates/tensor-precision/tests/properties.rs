//! Property tests of the conversions: error bounds, overflow, agreement with LibTorch's
//! rounding, and serial/parallel equality.

use half::{bf16, f16};
use proptest::prelude::*;
use tch::{Kind, Tensor};
use tensor_precision::{
    HalfFloat, HalfFormat, f32_to_half_parallel, f32_to_half_serial, half_to_f32_parallel,
    half_to_f32_serial,
};

/// Unit roundoff of float16 (10 fraction bits): the largest relative error of rounding a
/// value in its normal range to nearest.
const F16_MAX_RELATIVE_ERROR: f64 = 1.0 / 2048.0;
/// Unit roundoff of bfloat16 (7 fraction bits).
const BF16_MAX_RELATIVE_ERROR: f64 = 1.0 / 256.0;
/// The smallest f32 that rounds to float16 infinity: halfway between 65504 and 65536.
const F16_OVERFLOW_THRESHOLD: f32 = 65520.0;

/// Values whose magnitude lies in the normal range [min_normal, max] of `format`.
fn normal_range(format: HalfFormat) -> impl Strategy<Value = f32> {
    let (min_exp, max_exp) = match format {
        HalfFormat::F16 => (-14, 15),
        HalfFormat::Bf16 => (-126, 127),
    };
    (min_exp..=max_exp, 1.0f32..2.0, any::<bool>())
        .prop_map(|(exp, mantissa, negative)| {
            let value = mantissa * 2f32.powi(exp);
            if negative { -value } else { value }
        })
        .prop_filter("within the format's largest finite value", move |v| {
            v.abs() <= format.max()
        })
}

fn narrow<T: HalfFloat>(values: &[f32]) -> Vec<T> {
    let mut out = vec![T::default(); values.len()];
    f32_to_half_serial(values, &mut out).unwrap();
    out
}

fn round_trip<T: HalfFloat>(values: &[f32]) -> Vec<f32> {
    let mut back = vec![0.0; values.len()];
    half_to_f32_serial(&narrow::<T>(values), &mut back).unwrap();
    back
}

fn relative_error(x: f32, y: f32) -> f64 {
    (f64::from(x) - f64::from(y)).abs() / f64::from(x).abs()
}

/// f32 values that stress rounding: arbitrary bit patterns (NaN, infinities,
/// subnormals), exact float16 and bfloat16 ties (including ties between subnormals), and
/// their f32 neighbours.
fn rounding_cases() -> impl Strategy<Value = f32> {
    let any_bits = any::<u32>().prop_map(f32::from_bits);
    // A tie between two adjacent finite float16 values (exact in f32), possibly nudged.
    let f16_tie = (0u16..0x7bff, any::<bool>(), -1i32..=1).prop_map(|(h, negative, nudge)| {
        let lo = f16::from_bits(h).to_f32();
        let hi = f16::from_bits(h + 1).to_f32();
        let mid = (lo + hi) / 2.0;
        let bits = (mid.to_bits() as i64 + i64::from(nudge)) as u32;
        let value = f32::from_bits(bits);
        if negative { -value } else { value }
    });
    // A tie between two adjacent bfloat16 values: the upper half of the f32 bits is the
    // bfloat16, the lower half exactly 0x8000.
    let bf16_tie = (any::<u16>(), -1i32..=1).prop_map(|(b, nudge)| {
        let bits = (u32::from(b) << 16) | 0x8000;
        f32::from_bits((bits as i64 + i64::from(nudge)) as u32)
    });
    // Values around float16's subnormal range and underflow boundary.
    let small = (-27i32..-13, 1.0f32..2.0).prop_map(|(exp, m)| m * 2f32.powi(exp));
    prop_oneof![any_bits, f16_tie, bf16_tie, small]
}

/// The bits of LibTorch's cast of `values` to `T`'s format.
///
/// Read through an int16 view: tch 0.24's `Element` impl of `half::bf16` says
/// `Kind::Half` (tch-rs issue #995), so `Vec::<bf16>::try_from` would convert the
/// bfloat16 tensor to float16 first and hand back float16 bits.
fn torch_bits<T: HalfFloat>(values: &[f32]) -> Vec<u16> {
    let cast = Tensor::from_slice(values).to_kind(T::FORMAT.kind());
    let bits: Vec<i16> = Vec::try_from(cast.view_dtype(Kind::Int16)).unwrap();
    bits.into_iter().map(|b| b as u16).collect()
}

fn assert_same_bits<T: HalfFloat>(values: &[f32]) {
    let ours = narrow::<T>(values);
    let torch = torch_bits::<T>(values);
    for ((x, a), &b) in values.iter().zip(&ours).zip(&torch) {
        let a = a.to_bits();
        let nan = |bits: u16| match T::FORMAT {
            HalfFormat::F16 => f16::from_bits(bits).is_nan(),
            HalfFormat::Bf16 => bf16::from_bits(bits).is_nan(),
        };
        if x.is_nan() {
            // NaN payloads are not specified; NaN must stay NaN.
            assert!(nan(a) && nan(b), "{x:?}: {a:#06x} vs {b:#06x}");
        } else {
            assert_eq!(a, b, "{x:e} ({:#010x}) to {}", x.to_bits(), T::FORMAT);
        }
    }
}

/// Deterministic pseudo-random f32 values of every magnitude (SplitMix64 on the bits).
fn pseudo_random_values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            f32::from_bits((z ^ (z >> 31)) as u32)
        })
        .collect()
}

proptest! {
    #[test]
    fn f16_round_trip_error_is_within_the_unit_roundoff(
        values in prop::collection::vec(normal_range(HalfFormat::F16), 1..64)
    ) {
        for (x, y) in values.iter().zip(round_trip::<f16>(&values)) {
            prop_assert!(relative_error(*x, y) <= F16_MAX_RELATIVE_ERROR, "{x:e} -> {y:e}");
        }
    }

    #[test]
    fn bf16_round_trip_error_is_within_the_unit_roundoff(
        values in prop::collection::vec(normal_range(HalfFormat::Bf16), 1..64)
    ) {
        for (x, y) in values.iter().zip(round_trip::<bf16>(&values)) {
            prop_assert!(relative_error(*x, y) <= BF16_MAX_RELATIVE_ERROR, "{x:e} -> {y:e}");
        }
    }

    #[test]
    fn values_beyond_the_f16_maximum_after_rounding_overflow(
        magnitude in F16_OVERFLOW_THRESHOLD..f32::MAX,
        negative in any::<bool>(),
    ) {
        let x = if negative { -magnitude } else { magnitude };
        let y = round_trip::<f16>(&[x])[0];
        prop_assert!(y.is_infinite() && y.is_sign_negative() == negative, "{x:e} -> {y:e}");
    }

    #[test]
    fn values_just_below_the_overflow_threshold_round_to_the_f16_maximum(
        magnitude in HalfFormat::F16.max()..F16_OVERFLOW_THRESHOLD,
    ) {
        prop_assert_eq!(round_trip::<f16>(&[magnitude])[0], HalfFormat::F16.max());
    }

    #[test]
    fn half_rounds_like_libtorch_bit_for_bit(
        values in prop::collection::vec(rounding_cases(), 1..256)
    ) {
        assert_same_bits::<f16>(&values);
        assert_same_bits::<bf16>(&values);
    }

    #[test]
    fn parallel_and_serial_conversions_give_identical_bits(
        seed in any::<u64>(),
        len in 0usize..70_000,
    ) {
        let values = pseudo_random_values(seed, len);
        let (mut serial, mut parallel) = (vec![f16::ZERO; len], vec![f16::ZERO; len]);
        f32_to_half_serial(&values, &mut serial).unwrap();
        f32_to_half_parallel(&values, &mut parallel).unwrap();
        prop_assert!(serial.iter().zip(&parallel).all(|(a, b)| a.to_bits() == b.to_bits()));

        let (mut serial, mut parallel) = (vec![bf16::ZERO; len], vec![bf16::ZERO; len]);
        f32_to_half_serial(&values, &mut serial).unwrap();
        f32_to_half_parallel(&values, &mut parallel).unwrap();
        prop_assert!(serial.iter().zip(&parallel).all(|(a, b)| a.to_bits() == b.to_bits()));

        let (mut wide_serial, mut wide_parallel) = (vec![0.0f32; len], vec![0.0f32; len]);
        half_to_f32_serial(&serial, &mut wide_serial).unwrap();
        half_to_f32_parallel(&parallel, &mut wide_parallel).unwrap();
        prop_assert!(
            wide_serial.iter().zip(&wide_parallel).all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }
}
