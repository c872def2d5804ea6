use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::Kind;

use crate::{Error, HalfFormat};

/// A mixed-precision policy: the element type layers compute in and the element type
/// their variables are stored in, named as Keras names them.
///
/// Variables always stay float32 (the "master weights"): under a mixed policy a layer
/// casts its weights and its input to the compute type on the forward pass, so that
/// gradients flow back through the casts to the float32 variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Policy {
    /// Compute and variables in float32.
    #[default]
    #[serde(rename = "float32")]
    Float32,
    /// Compute in float16, variables in float32; needs loss scaling.
    #[serde(rename = "mixed_float16")]
    MixedFloat16,
    /// Compute in bfloat16, variables in float32.
    #[serde(rename = "mixed_bfloat16")]
    MixedBfloat16,
}

impl Policy {
    /// Every policy, in the order of [`Policy::NAMES`].
    pub const ALL: [Policy; 3] = [Self::Float32, Self::MixedFloat16, Self::MixedBfloat16];
    /// The names [`FromStr`] accepts.
    pub const NAMES: [&'static str; 3] = ["float32", "mixed_float16", "mixed_bfloat16"];

    /// Keras's name of the policy.
    pub fn name(self) -> &'static str {
        match self {
            Self::Float32 => "float32",
            Self::MixedFloat16 => "mixed_float16",
            Self::MixedBfloat16 => "mixed_bfloat16",
        }
    }

    /// The element type layers compute in.
    pub fn compute_kind(self) -> Kind {
        match self {
            Self::Float32 => Kind::Float,
            Self::MixedFloat16 => Kind::Half,
            Self::MixedBfloat16 => Kind::BFloat16,
        }
    }

    /// The element type variables are stored in: float32 for every policy.
    pub fn variable_kind(self) -> Kind {
        Kind::Float
    }

    /// The 16-bit format of the compute type, `None` for float32.
    pub fn compute_format(self) -> Option<HalfFormat> {
        match self {
            Self::Float32 => None,
            Self::MixedFloat16 => Some(HalfFormat::F16),
            Self::MixedBfloat16 => Some(HalfFormat::Bf16),
        }
    }

    /// Whether compute and variable types differ.
    pub fn is_mixed(self) -> bool {
        self.compute_kind() != self.variable_kind()
    }

    /// Whether training under this policy needs loss scaling: float16's narrow exponent
    /// range flushes small gradients to zero; bfloat16 has float32's range and does not.
    pub fn needs_loss_scaling(self) -> bool {
        self == Self::MixedFloat16
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|policy| policy.name() == name)
            .ok_or_else(|| Error::UnknownPolicy {
                name: name.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_display_and_from_str() {
        for (policy, name) in Policy::ALL.into_iter().zip(Policy::NAMES) {
            assert_eq!(policy.to_string(), name);
            assert_eq!(name.parse::<Policy>().unwrap(), policy);
            assert_eq!(
                serde_json::to_string(&policy).unwrap(),
                format!("\"{name}\"")
            );
        }
    }

    #[test]
    fn an_unknown_name_lists_the_valid_ones() {
        let err = "float16".parse::<Policy>().unwrap_err();
        assert!(matches!(&err, Error::UnknownPolicy { name } if name == "float16"));
        assert_eq!(
            err.to_string(),
            "unknown precision policy `float16`: expected one of float32, mixed_float16, mixed_bfloat16"
        );
    }

    #[test]
    fn kinds_and_flags_follow_keras() {
        assert_eq!(Policy::default(), Policy::Float32);
        assert_eq!(Policy::MixedFloat16.compute_kind(), Kind::Half);
        assert_eq!(Policy::MixedBfloat16.compute_kind(), Kind::BFloat16);
        for policy in Policy::ALL {
            assert_eq!(policy.variable_kind(), Kind::Float);
        }
        assert!(!Policy::Float32.is_mixed());
        assert!(Policy::MixedFloat16.is_mixed() && Policy::MixedBfloat16.is_mixed());
        assert!(Policy::MixedFloat16.needs_loss_scaling());
        assert!(!Policy::MixedBfloat16.needs_loss_scaling());
        assert!(!Policy::Float32.needs_loss_scaling());
    }
}
