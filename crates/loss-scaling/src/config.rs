//! What a loss scaler does: a fixed scale, or a dynamic one with its growth rules.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The dynamic loss-scaling rules: start at `initial_scale`; on a step with a non-finite
/// gradient skip the update, multiply the scale by `backoff_factor` and restart the
/// count; after `growth_interval` consecutive finite steps multiply it by
/// `growth_factor`; always keep it within `[min_scale, max_scale]`.
///
/// [`Default`] is [`DynamicConfig::keras`]. The fields are checked by
/// [`DynamicConfig::validate`], which every scaler constructor calls.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DynamicConfig {
    /// The scale of the first step.
    #[serde(with = "exact_f32")]
    pub initial_scale: f32,
    /// Consecutive finite steps after which the scale grows.
    pub growth_interval: u32,
    /// Multiplier of a growth, greater than 1.
    pub growth_factor: f64,
    /// Multiplier after a non-finite step, in (0, 1).
    pub backoff_factor: f64,
    /// Floor of the scale.
    #[serde(with = "exact_f32")]
    pub min_scale: f32,
    /// Ceiling of the scale.
    #[serde(with = "exact_f32")]
    pub max_scale: f32,
}

impl DynamicConfig {
    /// Keras's `LossScaleOptimizer`: initial scale 2^15, doubled after 2000 finite steps,
    /// halved on a non-finite one. Keras 3 documents no floor; tf.keras's
    /// `DynamicLossScale` never went below 1, and neither does this preset (a scale
    /// below 1 shrinks gradients, the opposite of its purpose). No ceiling but f32's.
    pub fn keras() -> Self {
        Self {
            initial_scale: 32768.0,
            growth_interval: 2000,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            min_scale: 1.0,
            max_scale: f32::MAX,
        }
    }

    /// PyTorch's `GradScaler` defaults: initial scale 2^16, doubled after 2000 finite
    /// steps, halved on a non-finite one. PyTorch has no floor (its scale can halve
    /// towards zero); this preset stops at the smallest normal f32, and at f32's largest
    /// value as PyTorch does (it only grows while the result stays finite).
    pub fn pytorch() -> Self {
        Self {
            initial_scale: 65536.0,
            growth_interval: 2000,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            min_scale: f32::MIN_POSITIVE,
            max_scale: f32::MAX,
        }
    }

    /// Checks every field; the first problem found is the error.
    pub fn validate(&self) -> Result<()> {
        check_scale("initial scale", self.initial_scale)?;
        check_scale("minimum scale", self.min_scale)?;
        check_scale("maximum scale", self.max_scale)?;
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return Err(Error::InvalidGrowthFactor(self.growth_factor));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return Err(Error::InvalidBackoffFactor(self.backoff_factor));
        }
        if self.growth_interval == 0 {
            return Err(Error::ZeroGrowthInterval);
        }
        if self.min_scale > self.max_scale {
            return Err(Error::MinAboveMax {
                min: self.min_scale,
                max: self.max_scale,
            });
        }
        check_bounds(self.initial_scale, self.min_scale, self.max_scale)
    }
}

impl Default for DynamicConfig {
    fn default() -> Self {
        Self::keras()
    }
}

/// Fixed or dynamic loss scaling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum LossScaleConfig {
    /// The same scale at every step.
    Fixed {
        /// The scale.
        #[serde(with = "exact_f32")]
        scale: f32,
    },
    /// A scale adjusted to the gradients, see [`DynamicConfig`].
    Dynamic(DynamicConfig),
}

impl LossScaleConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Fixed { scale } => check_scale("fixed scale", *scale),
            Self::Dynamic(config) => config.validate(),
        }
    }

    /// The scale of the first step.
    pub fn initial_scale(&self) -> f32 {
        match self {
            Self::Fixed { scale } => *scale,
            Self::Dynamic(config) => config.initial_scale,
        }
    }
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        Self::Dynamic(DynamicConfig::default())
    }
}

fn check_scale(what: &'static str, value: f32) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidScale { what, value })
    }
}

pub(crate) fn check_bounds(scale: f32, min: f32, max: f32) -> Result<()> {
    if (min..=max).contains(&scale) {
        Ok(())
    } else {
        Err(Error::ScaleOutOfBounds { scale, min, max })
    }
}

/// Serialises an f32 as the f64 of the same value, which JSON carries exactly (with
/// serde_json's `float_roundtrip`), so that a resumed scaler has the very same scale.
pub(crate) mod exact_f32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(value: &f32, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(f64::from(*value))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f32, D::Error> {
        // Exact for every value `serialize` wrote.
        Ok(f64::deserialize(deserializer)? as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_keras_and_pytorch() {
        let keras = DynamicConfig::default();
        assert_eq!(keras, DynamicConfig::keras());
        assert_eq!(keras.initial_scale, 2f32.powi(15));
        assert_eq!(DynamicConfig::pytorch().initial_scale, 2f32.powi(16));
        for config in [DynamicConfig::keras(), DynamicConfig::pytorch()] {
            assert_eq!(config.growth_interval, 2000);
            assert_eq!((config.growth_factor, config.backoff_factor), (2.0, 0.5));
            config.validate().unwrap();
        }
        assert_eq!(
            LossScaleConfig::default(),
            LossScaleConfig::Dynamic(DynamicConfig::keras())
        );
    }

    #[test]
    fn every_invalid_field_is_an_error_with_a_lowercase_message() {
        let ok = DynamicConfig::keras();
        let cases: Vec<(DynamicConfig, &str)> = vec![
            (
                DynamicConfig {
                    initial_scale: 0.0,
                    ..ok
                },
                "initial scale 0 must be positive and finite",
            ),
            (
                DynamicConfig {
                    initial_scale: -2.0,
                    ..ok
                },
                "initial scale -2 must be positive and finite",
            ),
            (
                DynamicConfig {
                    initial_scale: f32::INFINITY,
                    ..ok
                },
                "initial scale inf must be positive and finite",
            ),
            (
                DynamicConfig {
                    min_scale: f32::NAN,
                    ..ok
                },
                "minimum scale NaN must be positive and finite",
            ),
            (
                DynamicConfig {
                    growth_factor: 1.0,
                    ..ok
                },
                "growth factor 1 must be finite and greater than 1",
            ),
            (
                DynamicConfig {
                    growth_factor: f64::INFINITY,
                    ..ok
                },
                "growth factor inf must be finite and greater than 1",
            ),
            (
                DynamicConfig {
                    backoff_factor: 1.0,
                    ..ok
                },
                "backoff factor 1 must lie in (0, 1)",
            ),
            (
                DynamicConfig {
                    backoff_factor: 0.0,
                    ..ok
                },
                "backoff factor 0 must lie in (0, 1)",
            ),
            (
                DynamicConfig {
                    backoff_factor: f64::NAN,
                    ..ok
                },
                "backoff factor NaN must lie in (0, 1)",
            ),
            (
                DynamicConfig {
                    growth_interval: 0,
                    ..ok
                },
                "growth interval must be at least one step",
            ),
            (
                DynamicConfig {
                    min_scale: 8.0,
                    max_scale: 4.0,
                    initial_scale: 4.0,
                    ..ok
                },
                "minimum scale 8 exceeds maximum scale 4",
            ),
            (
                DynamicConfig {
                    max_scale: 1024.0,
                    ..ok
                },
                "scale 32768 lies outside [1, 1024]",
            ),
        ];
        for (config, message) in cases {
            let err = config.validate().unwrap_err();
            assert_eq!(err.to_string(), message);
        }
        assert!(matches!(
            LossScaleConfig::Fixed { scale: -1.0 }.validate(),
            Err(Error::InvalidScale {
                what: "fixed scale",
                ..
            })
        ));
    }

    #[test]
    fn configs_round_trip_through_json() {
        let config = LossScaleConfig::Dynamic(DynamicConfig {
            initial_scale: 0.1,
            ..DynamicConfig::pytorch()
        });
        let json = serde_json::to_string(&config).unwrap();
        let back: LossScaleConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
        let fixed = LossScaleConfig::Fixed { scale: 1024.0 };
        let json = serde_json::to_string(&fixed).unwrap();
        assert_eq!(json, r#"{"mode":"fixed","scale":1024.0}"#);
    }
}
