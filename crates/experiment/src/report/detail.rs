//! What each stage measures besides the columns every row has: one type per stage, so a
//! mistyped field is a compile error rather than a `-` in the report.

use std::collections::BTreeMap;

use loss_scaling::{LossScaleConfig, ScalePoint};
use serde::{Deserialize, Serialize};
use tensor_precision::GradientAudit;

use crate::settings::Calibrator;
use crate::variant::PrunedWeights;

/// A row's stage-specific measurements, tagged with their kind in `report.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Detail {
    #[default]
    None,
    /// A training run measured by LibTorch (baseline and precision).
    Training(TrainingDetail),
    Distillation(DistillationDetail),
    Quantization(QuantizationDetail),
    Pruning(PruningDetail),
    Clustering(ClusteringDetail),
    Pipeline(PipelineDetail),
}

impl Detail {
    /// The loss scaler's record, for rows that trained with one.
    pub fn scaling(&self) -> Option<&Scaling> {
        self.training().and_then(|t| t.scaling.as_ref())
    }

    /// A training run's detail.
    pub fn training(&self) -> Option<&TrainingDetail> {
        match self {
            Self::Training(t) => Some(t),
            _ => None,
        }
    }

    /// A training run's detail, to fill in.
    pub fn training_mut(&mut self) -> Option<&mut TrainingDetail> {
        match self {
            Self::Training(t) => Some(t),
            _ => None,
        }
    }

    /// Training steps of a training run.
    pub fn train_steps(&self) -> Option<usize> {
        match self {
            Self::Training(t) => Some(t.train_steps),
            _ => None,
        }
    }

    /// The row against its stage's reference, for artifacts the runtime ran.
    pub fn deployment(&self) -> Option<&Deployment> {
        match self {
            Self::Quantization(q) => Some(&q.deployment),
            Self::Pruning(p) => Some(&p.deployment),
            Self::Clustering(c) => Some(&c.deployment),
            Self::Pipeline(p) => Some(&p.deployment),
            _ => None,
        }
    }
}

/// A training run under a precision policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingDetail {
    pub policy: String,
    /// Optimizer steps, skipped ones included.
    pub train_steps: usize,
    pub train_loss_per_epoch: Vec<f64>,
    /// The stage whose run this row reports, when another stage trained it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub against_float32: Option<AgainstFloat32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The float16 gradient-underflow audit of the float32 run (on the stage's first row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_audit: Option<Audit>,
}

/// What a loss scaler did during a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scaling {
    pub config: LossScaleConfig,
    pub skipped_steps: u64,
    pub final_loss_scale: Option<f32>,
    /// The initial scale and every change of it.
    pub history: Vec<ScalePoint>,
}

/// A mixed-precision run against the float32 run of the same recipe.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgainstFloat32 {
    pub train_speedup: Option<f64>,
    pub infer_speedup: Option<f64>,
    /// Test accuracy minus float32's, in percentage points.
    pub accuracy_difference_pp: Option<f64>,
}

/// The gradient-underflow audit and the steps it read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Audit {
    pub audit: GradientAudit,
    pub steps: usize,
}

/// Students trained over several seeds (the row's accuracy is their mean).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DistillationDetail {
    pub seeds: Vec<u64>,
    pub per_seed_accuracy: Vec<f64>,
    /// Sample standard deviation of the accuracy over the seeds.
    pub test_accuracy_std: f64,
    /// For the distilled student: its settings, its gain over the scratch student and the
    /// temperature sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distilled: Option<Distilled>,
    /// For the hinted student: its gain over the distilled one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<Hinted>,
}

/// The distilled student against the one trained from scratch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Distilled {
    pub temperature: f64,
    pub alpha: f64,
    /// Mean and standard deviation over the seeds of distilled minus scratch accuracy.
    pub accuracy_gain_mean: f64,
    pub accuracy_gain_std: f64,
    /// (temperature, test accuracy) on the first seed.
    pub temperature_sweep: Vec<(f64, f64)>,
    /// Training time the teacher-logit cache saved against running the teacher every epoch.
    pub teacher_cache_seconds_saved: f64,
}

/// Hint distillation on top of the logits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hinted {
    pub weight: f64,
    /// Mean and standard deviation over the seeds of hinted minus distilled accuracy.
    pub gain_over_distilled_mean: f64,
    pub gain_over_distilled_std: f64,
}

/// An artifact run by the runtime, against its stage's reference artifact.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// How the runtime executed each conv2d/linear layer (`"int8-static"`, `"csr"`, ...).
    pub execution: Vec<String>,
    /// Test accuracy minus the reference's, in percentage points.
    pub accuracy_delta_pp: f64,
    /// How many times smaller than the reference, raw and gzipped.
    pub size_ratio: f64,
    pub gzip_ratio: f64,
    /// Inference throughput over the reference's.
    pub speedup: f64,
}

/// A quantized model (the reference: the same model's float32 artifact).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuantizationDetail {
    pub deployment: Deployment,
    pub weights: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qat: Option<Qat>,
}

/// Full-integer int8 with calibrated input ranges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub calibrator: Calibrator,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentile: Option<f64>,
    /// The calibrator `--calibrator` chose.
    pub selected: bool,
    pub images: usize,
    /// Layer index -> the (low, high) range of its input.
    #[serde(deserialize_with = "layer_keyed")]
    pub input_ranges: BTreeMap<usize, (f32, f32)>,
}

/// A map keyed by layer index, as JSON writes it (string keys). Serde's derive cannot read
/// integer keys inside an internally tagged enum such as [`Detail`] (the content is buffered
/// and its keys stay strings), so they are read as strings and parsed.
fn layer_keyed<'de, D, V>(deserializer: D) -> Result<BTreeMap<usize, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    BTreeMap::<String, V>::deserialize(deserializer)?
        .into_iter()
        .map(|(key, value)| {
            let layer = key
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("`{key}` is not a layer index")))?;
            Ok((layer, value))
        })
        .collect()
}

/// Quantization-aware training.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Qat {
    /// LibTorch's accuracy of the fake-quantized model.
    pub fake_quant_accuracy: f64,
    pub steps: usize,
    pub observer_steps: usize,
    pub learning_rate: f64,
}

/// A clustered teacher (the reference: the float32 teacher artifact).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusteringDetail {
    pub deployment: Deployment,
    /// Shared values per weight tensor (zeros aside, when they are kept).
    pub clusters: usize,
    /// What was clustered: the dense teacher, or the pruning stage's sparse one (its zeros
    /// kept).
    pub base: String,
    /// How the artifact stores the weights.
    pub weights: String,
    /// Share of all weights that are zero.
    pub weight_sparsity: f64,
    pub fine_tune_steps: usize,
    /// LibTorch's accuracy of the clustered model before export.
    pub libtorch_accuracy: f64,
    pub layers: Vec<ClusteredLayer>,
}

/// One clustered weight after fine-tuning.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusteredLayer {
    pub name: String,
    /// Centroids that some weight uses.
    pub clusters_used: usize,
    /// Distinct values in the tensor, zero included.
    pub distinct_values: usize,
    pub zeros: usize,
    pub total: usize,
}

/// A pruned teacher (the reference: the dense float32 artifact).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PruningDetail {
    pub deployment: Deployment,
    pub weights: PrunedWeights,
    /// Share of all weights that are zero.
    pub weight_sparsity: f64,
    /// The target and how it was reached (not for the dense row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PruningTarget>,
}

/// A pruning target and its fine-tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruningTarget {
    pub sparsity: f64,
    /// `Unstructured` or `NOutOfM { n, m }`.
    pub granularity: String,
    pub scope: String,
    pub dense_layers: Vec<String>,
    pub fine_tune_steps: usize,
    /// LibTorch's accuracy of the pruned model before export, where measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libtorch_accuracy: Option<f64>,
    pub schedule: pruning::Schedule,
    /// Each pruned layer's sparsity and, per weight, dense or CSR (f32 rows only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<pruning::LayerSparsity>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub storage: BTreeMap<String, String>,
}

/// One step of the pipeline (the reference: the float32 teacher).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineDetail {
    pub deployment: Deployment,
    pub step: String,
    pub weights: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_sparsity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<PruningTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fake_quant_accuracy: Option<f64>,
    /// For PCQAT: each clustered weight's distinct values, zero included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusters: Option<BTreeMap<String, usize>>,
    /// For the quantization-aware rows: the size and accuracy to reach, and whether it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PipelineTarget>,
}

/// The pipeline's goal for its final artifact.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineTarget {
    pub size_ratio_at_least: f64,
    pub accuracy_at_least: f64,
    pub met: bool,
}
