//! Each stage's settings: the options its results depend on besides the seed, `--quick`, the
//! device, the threads and the data (which every stage depends on).
//!
//! A stage gets its own settings, not the whole command line. The settings are hashed into
//! the stage's `--resume` key and written to `report.json` with the stage's outcome, together
//! with the command-line options that differ from the defaults (so `cargo xtask results` can
//! print the command of a run without a copy of the defaults). Each field is named after the
//! option it comes from (`initial_loss_scale` is `--initial-loss-scale`), which a test checks.

use clap::ValueEnum;
use distillation::{Alpha, Temperature};
use serde::{Deserialize, Serialize, Serializer};

use crate::stage::Stage;

/// The settings of every stage of one invocation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    pub precision: PrecisionSettings,
    pub distillation: DistillationSettings,
    pub quantization: QuantizationSettings,
    pub pipeline: PipelineSettings,
}

impl Settings {
    /// The settings of `stage` as a JSON object (empty for a stage without any).
    pub fn of(&self, stage: Stage) -> serde_json::Value {
        let value = match stage {
            Stage::Baseline | Stage::Pruning | Stage::Clustering => Ok(serde_json::json!({})),
            Stage::Precision => serde_json::to_value(&self.precision),
            Stage::Distillation => serde_json::to_value(self.distillation),
            Stage::Quantization => serde_json::to_value(&self.quantization),
            Stage::Pipeline => serde_json::to_value(&self.pipeline),
        };
        // Plain structs of numbers and names: serialising them cannot fail.
        value.unwrap_or_default()
    }

    /// The options that give `stage` these settings rather than `defaults`'s, as
    /// command-line arguments (`["--temperature", "4"]`), in field order.
    pub fn options(&self, defaults: &Self, stage: Stage) -> Vec<String> {
        let (ours, theirs) = (self.of(stage), defaults.of(stage));
        let (Some(ours), Some(theirs)) = (ours.as_object(), theirs.as_object()) else {
            return Vec::new();
        };
        let mut options = Vec::new();
        for (field, value) in ours {
            if theirs.get(field) != Some(value) {
                options.push(format!("--{}", field.replace('_', "-")));
                options.push(match value {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
        }
        options
    }
}

/// The `precision` stage's settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PrecisionSettings {
    /// The starting scale of the dynamic loss scaler of the mixed_float16 run (CUDA only).
    pub initial_loss_scale: f32,
}

/// The `distillation` stage's settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DistillationSettings {
    #[serde(serialize_with = "temperature")]
    pub temperature: Temperature,
    #[serde(serialize_with = "alpha")]
    pub alpha: Alpha,
}

impl DistillationSettings {
    /// The distillation loss these settings describe.
    pub fn config(self) -> distillation::DistillationConfig {
        distillation::DistillationConfig::new(self.temperature, self.alpha)
    }
}

/// The `quantization` stage's settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuantizationSettings {
    /// The calibrator marked as selected (all four are measured).
    pub calibrator: Calibrator,
    /// The percentile calibrator's percentile, in (0, 100].
    pub percentile: f64,
}

/// The `pipeline` stage's settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PipelineSettings {
    /// The share of the student's weights pruned to zero, in [0, 1).
    pub sparsity: f64,
    /// Shared values per weight tensor of the PCQAT student; 0: no PCQAT.
    pub pcqat_clusters: usize,
    #[serde(serialize_with = "temperature")]
    pub temperature: Temperature,
    #[serde(serialize_with = "alpha")]
    pub alpha: Alpha,
}

impl PipelineSettings {
    /// The distillation loss of the pipeline's student.
    pub fn distillation(&self) -> distillation::DistillationConfig {
        distillation::DistillationConfig::new(self.temperature, self.alpha)
    }
}

fn temperature<S: Serializer>(t: &Temperature, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(t.get())
}

fn alpha<S: Serializer>(a: &Alpha, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(a.get())
}

/// The activation calibrators of full-integer quantization (`--calibrator`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Calibrator {
    /// The observed minimum and maximum.
    Minmax,
    /// The `--percentile` of the values on each side (outliers clipped).
    Percentile,
    /// The clipping threshold that minimises the KL divergence of the histograms (TensorRT).
    Entropy,
    /// The clipping threshold that minimises the mean squared quantization error.
    Mse,
}

impl Calibrator {
    /// Every calibrator, in report order.
    pub fn all() -> [Self; 4] {
        [Self::Minmax, Self::Percentile, Self::Entropy, Self::Mse]
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Minmax => "minmax",
            Self::Percentile => "percentile",
            Self::Entropy => "entropy",
            Self::Mse => "mse",
        }
    }

    pub fn method(self, percentile: f64) -> quantization::Method {
        match self {
            Self::Minmax => quantization::Method::MinMax,
            Self::Percentile => quantization::Method::Percentile(percentile),
            Self::Entropy => quantization::Method::Entropy,
            Self::Mse => quantization::Method::Mse,
        }
    }
}

impl std::fmt::Display for Calibrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
