//! The stages of the experiment and the files they hand on to one another. A leaf: what a
//! stage is, not what it does (that is [`crate::stages`]).

use std::fmt;

use clap::ValueEnum;

/// A stage of the experiment, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Stage {
    /// Train the float32 teacher on the full training set.
    Baseline,
    /// Train the teacher under float32 and under the device's mixed-precision policy.
    Precision,
    /// Train a small student from scratch and from the teacher's softened logits.
    Distillation,
    /// Deploy the teacher (and the student) as float16, dynamic, static and QAT int8.
    Quantization,
    /// Fine-tune the teacher while pruning it to 50, 75, 90% and 2:4 sparsity.
    Pruning,
    /// Cluster the teacher's weights to 8, 16 and 32 values (dense and 90% sparse), deployed
    /// palettized and as int8.
    Clustering,
    /// Distil a student, prune it to `--sparsity`, fine-tune it quantization-aware with its
    /// zeros kept, and ship it as a sparse int8 artifact.
    Pipeline,
}

impl Stage {
    /// Every stage, in the order they run.
    pub fn all() -> Vec<Self> {
        Self::value_variants().to_vec()
    }

    /// The stage's name on the command line and in the report.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Precision => "precision",
            Self::Distillation => "distillation",
            Self::Quantization => "quantization",
            Self::Pruning => "pruning",
            Self::Clustering => "clustering",
            Self::Pipeline => "pipeline",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A file one stage writes into the run folder for later stages to read. Stages declare the
/// products they read (`stages::inputs`) and open them only through
/// [`crate::context::Context::input`], so `--resume` keys, which follow the declarations,
/// cannot drift from what a stage loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Product {
    /// The stage that writes it.
    pub stage: Stage,
    /// Its path, relative to the run folder.
    pub file: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for stage in Stage::all() {
            assert_eq!(
                Stage::from_str(stage.name(), false).ok(),
                Some(stage),
                "{stage}"
            );
        }
    }
}
