use std::fmt;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use tch::Kind;

/// One of the two 16-bit floating-point formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HalfFormat {
    /// IEEE 754 binary16: 5 exponent bits, 10 fraction bits, largest finite value 65504.
    #[serde(rename = "float16")]
    F16,
    /// bfloat16: float32's 8 exponent bits, 7 fraction bits.
    #[serde(rename = "bfloat16")]
    Bf16,
}

impl HalfFormat {
    /// The tch element type of the format.
    pub fn kind(self) -> Kind {
        match self {
            Self::F16 => Kind::Half,
            Self::Bf16 => Kind::BFloat16,
        }
    }

    /// Rounds an f32 to the format (round to nearest, ties to even) and back.
    pub fn round(self, value: f32) -> f32 {
        match self {
            Self::F16 => f16::from_f32(value).to_f32(),
            Self::Bf16 => bf16::from_f32(value).to_f32(),
        }
    }

    /// Largest finite value.
    pub fn max(self) -> f32 {
        match self {
            Self::F16 => f16::MAX.to_f32(),
            Self::Bf16 => bf16::MAX.to_f32(),
        }
    }

    /// Smallest positive normal value.
    pub fn min_positive_normal(self) -> f32 {
        match self {
            Self::F16 => f16::MIN_POSITIVE.to_f32(),
            Self::Bf16 => bf16::MIN_POSITIVE.to_f32(),
        }
    }

    /// Smallest positive subnormal value.
    pub fn min_positive_subnormal(self) -> f32 {
        match self {
            Self::F16 => f16::MIN_POSITIVE_SUBNORMAL.to_f32(),
            Self::Bf16 => bf16::MIN_POSITIVE_SUBNORMAL.to_f32(),
        }
    }

    /// Unit roundoff: the largest relative error of rounding a normal-range value,
    /// 2^-11 for float16 and 2^-8 for bfloat16.
    pub fn unit_roundoff(self) -> f32 {
        match self {
            Self::F16 => f16::EPSILON.to_f32() / 2.0,
            Self::Bf16 => bf16::EPSILON.to_f32() / 2.0,
        }
    }
}

impl fmt::Display for HalfFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        })
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// The 16-bit element types, [`half::f16`] and [`half::bf16`], with bulk conversions
/// from and to f32 (`half`'s SIMD-accelerated slice conversions where the CPU has them).
pub trait HalfFloat: sealed::Sealed + Copy + Default + Send + Sync + fmt::Debug + 'static {
    /// The format of the type.
    const FORMAT: HalfFormat;

    /// Converts `src` into `dst` (same length), rounding to nearest, ties to even.
    fn slice_from_f32(dst: &mut [Self], src: &[f32]);

    /// Converts `src` into `dst` (same length); exact.
    fn slice_to_f32(src: &[Self], dst: &mut [f32]);

    /// The raw bits.
    fn to_bits(self) -> u16;
}

impl HalfFloat for f16 {
    const FORMAT: HalfFormat = HalfFormat::F16;

    fn slice_from_f32(dst: &mut [Self], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }

    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }

    fn to_bits(self) -> u16 {
        f16::to_bits(self)
    }
}

impl HalfFloat for bf16 {
    const FORMAT: HalfFormat = HalfFormat::Bf16;

    fn slice_from_f32(dst: &mut [Self], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }

    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }

    fn to_bits(self) -> u16 {
        bf16::to_bits(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_constants_are_the_textbook_ones() {
        assert_eq!(HalfFormat::F16.max(), 65504.0);
        assert_eq!(HalfFormat::F16.min_positive_normal(), 2f32.powi(-14));
        assert_eq!(HalfFormat::F16.min_positive_subnormal(), 2f32.powi(-24));
        assert_eq!(HalfFormat::F16.unit_roundoff(), 2f32.powi(-11));
        assert_eq!(HalfFormat::Bf16.min_positive_normal(), f32::MIN_POSITIVE);
        assert_eq!(HalfFormat::Bf16.min_positive_subnormal(), 2f32.powi(-133));
        assert_eq!(HalfFormat::Bf16.unit_roundoff(), 2f32.powi(-8));
    }
}
