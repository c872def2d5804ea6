//! The variants of the report's rows, one enum per stage. A row's `variant` is the
//! [`Display`](fmt::Display) of one of these, and so are the artifact files named after it:
//! stages build rows from the enums and the report finds rows by them, so no name is spelt
//! twice and no meaning is parsed back out of one. A leaf, like [`crate::stage`].

use std::fmt;

use models::Policy;
use serde::{Deserialize, Serialize};

use crate::settings::Calibrator;

/// The baseline's one row: the float32 teacher.
pub const TEACHER: &str = "teacher_float32";

/// A run of the `precision` stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionRun {
    /// The teacher trained under a policy (named after it: `float32`, `mixed_bfloat16`, ...).
    Teacher(Policy),
    /// The short float16 run of a small network that shows the loss scaler at work on a CPU.
    Float16Demo,
}

impl fmt::Display for PrecisionRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Teacher(policy) => f.write_str(policy.name()),
            Self::Float16Demo => f.write_str("mixed_float16_small_demo"),
        }
    }
}

/// A student of the `distillation` stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Student {
    /// Trained on the labels only.
    Scratch,
    /// Trained on the labels and the teacher's softened logits.
    Distilled,
    /// Distilled, with the hint loss on an intermediate layer as well.
    DistilledHint,
}

impl fmt::Display for Student {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Scratch => "student_scratch",
            Self::Distilled => "student_distilled",
            Self::DistilledHint => "student_distilled_hint",
        })
    }
}

/// A deployment of the `quantization` stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantized {
    /// Float32 weights: the reference.
    Float32,
    /// Float16 weights, widened at load.
    Float16,
    /// Int8 weights, activations quantized on the fly.
    DynamicInt8,
    /// Full-integer int8 with activation ranges from a calibrator.
    StaticInt8(Calibrator),
    /// Full-integer int8 after quantization-aware training.
    QatInt8,
}

impl fmt::Display for Quantized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Float32 => f.write_str("float32"),
            Self::Float16 => f.write_str("float16"),
            Self::DynamicInt8 => f.write_str("dynamic_int8"),
            Self::StaticInt8(calibrator) => write!(f, "static_int8_{calibrator}"),
            Self::QatInt8 => f.write_str("qat_int8"),
        }
    }
}

/// What the `pruning` stage pruned the teacher to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsity {
    /// Not pruned: the reference.
    Dense,
    /// Unstructured, this percentage of the weights zero.
    Percent(u8),
    /// `n` of every `m` consecutive weights kept.
    NOutOfM {
        /// Weights kept per group.
        n: u8,
        /// Group length.
        m: u8,
    },
}

/// How a pruned model's weights are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrunedWeights {
    /// f32, each layer dense or CSR.
    #[default]
    F32,
    /// int8 per channel, zeros kept.
    Int8,
}

/// A deployment of the `pruning` stage: a sparsity and how its weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pruned {
    /// The sparsity pruned to.
    pub sparsity: Sparsity,
    /// How the weights are stored.
    pub weights: PrunedWeights,
}

impl fmt::Display for Pruned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sparsity {
            Sparsity::Dense => f.write_str("dense")?,
            Sparsity::Percent(percent) => write!(f, "sparsity_{percent}")?,
            Sparsity::NOutOfM { n, m } => write!(f, "n{n}m{m}")?,
        }
        match self.weights {
            PrunedWeights::F32 => Ok(()),
            PrunedWeights::Int8 => f.write_str("_int8"),
        }
    }
}

/// How the `clustering` stage stores a clustered teacher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusteredStorage {
    /// Indices into a codebook of the shared values (`palette` or `palette_sparse`).
    Palette,
    /// Int8 codes per output channel (`int8`, or `int8_sparse` where smaller).
    Int8,
}

/// A deployment of the `clustering` stage: what was clustered, to how many values, stored
/// how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clustered {
    /// The dense teacher, or a pruned one (its zeros kept).
    pub base: Sparsity,
    /// Shared values per weight tensor.
    pub clusters: usize,
    /// How the weights are stored.
    pub storage: ClusteredStorage,
}

impl fmt::Display for Clustered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.base != Sparsity::Dense {
            let pruned = Pruned {
                sparsity: self.base,
                weights: PrunedWeights::F32,
            };
            write!(f, "{pruned}_")?;
        }
        write!(f, "clusters_{}_", self.clusters)?;
        f.write_str(match self.storage {
            ClusteredStorage::Palette => "palette",
            ClusteredStorage::Int8 => "int8",
        })
    }
}

/// A step of the `pipeline` stage, each deployed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipelineStep {
    /// The student distilled from the teacher, float32.
    Distilled,
    /// The distilled student pruned, float32 (dense or CSR per layer).
    Pruned,
    /// The pruned student after quantization-aware training, sparse full-integer int8.
    PrunedInt8,
    /// The pruned student after pruning- and cluster-preserving quantization-aware training
    /// (PCQAT), palettized, full-integer int8.
    PrunedClusteredInt8,
}

impl PipelineStep {
    /// The step's name in the report's detail.
    pub fn step(self) -> &'static str {
        match self {
            Self::Distilled => "distillation",
            Self::Pruned => "pruning",
            Self::PrunedInt8 => "pruning-preserving quantization-aware training",
            Self::PrunedClusteredInt8 => {
                "pruning- and cluster-preserving quantization-aware training (PCQAT)"
            }
        }
    }
}

impl fmt::Display for PipelineStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Distilled => "distilled_float32",
            Self::Pruned => "distilled_pruned_float32",
            Self::PrunedInt8 => "distilled_pruned_int8",
            Self::PrunedClusteredInt8 => "distilled_pruned_clustered_int8",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are those of earlier reports, which `--resume` and `cargo xtask results`
    /// read back.
    #[test]
    fn names_are_the_reports() {
        assert_eq!(
            PrecisionRun::Teacher(Policy::MixedBfloat16).to_string(),
            "mixed_bfloat16"
        );
        assert_eq!(
            PrecisionRun::Float16Demo.to_string(),
            "mixed_float16_small_demo"
        );
        assert_eq!(Student::DistilledHint.to_string(), "student_distilled_hint");
        assert_eq!(
            Quantized::StaticInt8(Calibrator::Percentile).to_string(),
            "static_int8_percentile"
        );
        let pruned = |sparsity, weights| Pruned { sparsity, weights }.to_string();
        assert_eq!(pruned(Sparsity::Dense, PrunedWeights::F32), "dense");
        assert_eq!(
            pruned(Sparsity::Percent(90), PrunedWeights::Int8),
            "sparsity_90_int8"
        );
        assert_eq!(
            pruned(Sparsity::NOutOfM { n: 2, m: 4 }, PrunedWeights::F32),
            "n2m4"
        );
        assert_eq!(
            PipelineStep::PrunedInt8.to_string(),
            "distilled_pruned_int8"
        );
        let clustered = |base, storage| {
            Clustered {
                base,
                clusters: 16,
                storage,
            }
            .to_string()
        };
        assert_eq!(
            clustered(Sparsity::Dense, ClusteredStorage::Palette),
            "clusters_16_palette"
        );
        assert_eq!(
            clustered(Sparsity::Percent(90), ClusteredStorage::Int8),
            "sparsity_90_clusters_16_int8"
        );
    }
}
