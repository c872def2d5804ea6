//! `pruning`: the baseline teacher, batch norm folded, fine-tuned under TF-MOT's
//! `PolynomialDecay` to 50, 75 and 90% sparsity (per-layer magnitude pruning) and under 2:4
//! sparsity. The first convolution (288 of 225 034 weights, one 3x3 filter per feature)
//! stays dense, as is common practice: at 90% it would keep about one weight per filter.
//! The other layers are pruned a little further so that the share of zero weights in the
//! whole network is the target. The models are then deployed with each pruned layer in CSR form where that is smaller and
//! faster and dense otherwise, and once more with int8 weights; every row is scored by the
//! pure-Rust runtime on the test set.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use models::Policy;
use models::export::{self, DeployedParameter, WeightFormat};
use pruning::{Granularity, Pruner, PruningConfig, Schedule, Scope};
use tch::nn;

use crate::architecture::Architecture;
use crate::context::{Context, RunFile};
use crate::deploy::{self, Deployed, TestSets};
use crate::report::detail::{Detail, PruningDetail, PruningTarget};
use crate::report::{Row, StageReport, sections};
use crate::stage::{Product, Stage};
use crate::teacher;
use crate::train::{self, DeviceSplit, TrainConfig, TrainOptions};
use crate::variant::{Pruned, PrunedWeights, Sparsity};

/// Folder of the stage's artifacts, inside the run's output folder.
const FOLDER: &str = "pruning";
/// Fine-tuning at a third of the teacher's learning rate: epochs of a full run for 90%
/// (the hard target), and for the others, which recover within one.
const EPOCHS_90: usize = 2;
/// The same for a graph teacher (pruned with its batch norms): the residual network keeps
/// 98.98% after 2 epochs at 90% and 99.34% after 6, against 99.44% dense
/// (`docs/results/graphs-deployed-2026-12-05.md`).
const EPOCHS_90_GRAPH: usize = 6;
const EPOCHS: usize = 1;
const QUICK_STEPS: usize = 40;
const LEARNING_RATE: f64 = 1e-3;
/// The sparsity ramps up over this share of the fine-tuning steps, then holds.
const RAMP_SHARE: f64 = 0.6;
/// Masks are recomputed every this many steps during the ramp (TF-MOT's tutorial uses 100).
const FREQUENCY: u64 = 25;
const QUICK_FREQUENCY: u64 = 5;

/// One pruned variant.
struct Target {
    variant: Sparsity,
    epochs: usize,
    sparsity: f64,
    granularity: Granularity,
    scope: Scope,
}

/// The teacher pruned to 90% in f32 (each layer dense or CSR), which the clustering stage
/// clusters with its zeros kept.
pub const SPARSE_TEACHER: Product = Product {
    stage: Stage::Pruning,
    file: "pruning/teacher_sparsity_90.safetensors",
};

/// The unpruned teacher, every variant's reference. Its artifact is named
/// `..._dense_float32`.
const DENSE: Pruned = Pruned {
    sparsity: Sparsity::Dense,
    weights: PrunedWeights::F32,
};

const TARGETS: [Target; 4] = [
    Target {
        variant: Sparsity::Percent(50),
        epochs: EPOCHS,
        sparsity: 0.5,
        granularity: Granularity::Unstructured,
        scope: Scope::Global,
    },
    Target {
        variant: Sparsity::Percent(75),
        epochs: EPOCHS,
        sparsity: 0.75,
        granularity: Granularity::Unstructured,
        scope: Scope::Global,
    },
    Target {
        variant: Sparsity::Percent(90),
        epochs: EPOCHS_90,
        sparsity: 0.9,
        granularity: Granularity::Unstructured,
        scope: Scope::Global,
    },
    Target {
        variant: Sparsity::NOutOfM { n: 2, m: 4 },
        epochs: EPOCHS,
        sparsity: 0.5,
        granularity: Granularity::NOutOfM { n: 2, m: 4 },
        scope: Scope::PerLayer,
    },
];

pub fn run(ctx: &Context) -> Result<StageReport> {
    let spec = teacher::architecture(ctx);
    let (vs, net) = teacher::load(ctx)?;
    let params = net.deployed_parameters(&vs)?;
    let tests = TestSets::new(ctx)?;
    let (data, teacher_config) = teacher::training(ctx)?;
    let mut stage = Pruning {
        ctx,
        dense_layer: spec.first_weight().unwrap_or_default(),
        deployed_spec: spec.deployed(),
        model: spec.name().to_owned(),
        params: &params,
        tests: &tests,
        data: &data,
        teacher_config: &teacher_config,
        trained: matches!(spec, Architecture::Graph(_)).then_some((&spec, &vs)),
        dense: None,
    };
    let dense_file = stage.file("dense_float32")?;
    let builder = stage.deployed_spec.artifact(&params, WeightFormat::F32)?;
    let dense = deploy::deploy(&builder, &dense_file, &tests.runtime)?;
    let mut rows = vec![pruning_row(
        &stage.model,
        DENSE,
        &params,
        &dense,
        &dense,
        PruningDetail::default(),
    )];
    stage.dense = Some(dense);
    let mut schedules = Vec::new();
    for target in &TARGETS {
        let (pruned, schedule) = stage.prune(target)?;
        rows.extend(pruned);
        schedules.push(schedule);
    }

    let section = sections::pruning::section(&rows).write(&ctx.out)?;
    Ok(StageReport {
        rows,
        section: Some(section),
    })
}

/// A variant's schedule and the steps it ran, for the schedule chart.
type ScheduleRun = (String, Schedule, u64);

/// A fine-tuned, pruned teacher.
struct Tuned {
    /// Each pruned layer's sparsity.
    layers: Vec<pruning::LayerSparsity>,
    libtorch_accuracy: f64,
    params: Vec<DeployedParameter>,
    stats: train::TrainStats,
    schedule: ScheduleRun,
    /// Weights of every layer, the dense one included.
    prunable_total: usize,
}

/// What every pruned variant starts from.
struct Pruning<'a> {
    ctx: &'a Context,
    /// The teacher with batch norm folded: what is pruned.
    deployed_spec: Architecture,
    /// The weight left dense: the first convolution's.
    dense_layer: String,
    model: String,
    /// Its trained parameters.
    params: &'a [DeployedParameter],
    tests: &'a TestSets<'a>,
    /// The teacher's training data and recipe.
    data: &'a DeviceSplit,
    teacher_config: &'a TrainConfig,
    /// The dense float32 artifact, which every variant is compared with.
    dense: Option<Deployed>,
    /// For a graph teacher, its trained form and variables: it is pruned with its batch
    /// norms in place (a deep residual network fine-tunes poorly without them), then
    /// folded, which keeps every zero (folding scales whole output channels). A sequential
    /// teacher is pruned in its folded form.
    trained: Option<(&'a Architecture, &'a nn::VarStore)>,
}

impl Target {
    /// The variant of this target's weights stored as `weights`.
    fn name(&self, weights: PrunedWeights) -> Pruned {
        Pruned {
            sparsity: self.variant,
            weights,
        }
    }
}

impl Pruning<'_> {
    fn file(&self, variant: impl std::fmt::Display) -> Result<RunFile> {
        self.ctx
            .file(FOLDER, &format!("teacher_{variant}.safetensors"))
    }

    /// Fine-tunes the teacher while pruning it to `target`.
    fn fine_tune(&self, target: &Target) -> Result<Tuned> {
        let ctx = self.ctx;
        let weights: Vec<&DeployedParameter> = self
            .params
            .iter()
            .filter(|p| p.name.ends_with(".weight"))
            .collect();
        let prunable_total: usize = weights.iter().map(|p| p.data.len()).sum();
        let pruned_total: usize = weights
            .iter()
            .filter(|p| p.name != self.dense_layer)
            .map(|p| p.data.len())
            .sum();
        let config = TrainConfig {
            epochs: match (ctx.quick, &self.trained) {
                (true, _) => 1,
                (false, Some(_)) if target.variant == Sparsity::Percent(90) => EPOCHS_90_GRAPH,
                (false, _) => target.epochs,
            },
            learning_rate: LEARNING_RATE,
            ..self.teacher_config.clone()
        };
        let batches = self.data.len().div_ceil(config.batch_size);
        let (steps, frequency) = if ctx.quick {
            (QUICK_STEPS.min(batches), QUICK_FREQUENCY)
        } else {
            (config.epochs * batches, FREQUENCY)
        };
        let end_step = train::ramp_end(steps, RAMP_SHARE, frequency);
        // Per-layer sparsity that makes the whole network's share of zeros the target.
        let layer_sparsity =
            (target.sparsity * prunable_total as f64 / pruned_total as f64).min(0.99);
        let schedule = match target.granularity {
            // N:M masks have their own sparsity; the schedule says when to recompute them.
            Granularity::NOutOfM { .. } => {
                Schedule::constant(target.sparsity, 0, Some(end_step), frequency)?
            }
            _ => Schedule::polynomial_decay(0.0, layer_sparsity, 0, end_step, frequency)?,
        };
        let mut pruned_vs = nn::VarStore::new(ctx.device.device);
        let pruned = match self.trained {
            Some((architecture, teacher_vs)) => {
                let net = architecture.build(&pruned_vs.root(), Policy::Float32)?;
                pruned_vs.copy(teacher_vs)?;
                net
            }
            None => {
                let net = self
                    .deployed_spec
                    .build(&pruned_vs.root(), Policy::Float32)?;
                export::load_parameters(&pruned_vs, self.params)?;
                net
            }
        };
        // N:M groups must tile the input dimension (the first convolution's 9 inputs do
        // not split into groups of 4, and it stays dense anyway).
        let names: Vec<&str> = weights
            .iter()
            .filter(|p| p.name != self.dense_layer)
            .filter(|p| match target.granularity {
                Granularity::NOutOfM { m, .. } => (p.data.len() / p.shape[0]).is_multiple_of(m),
                _ => true,
            })
            .map(|p| p.name.as_str())
            .collect();
        let pruning = PruningConfig {
            schedule,
            granularity: target.granularity,
            scope: target.scope,
        };
        let mut pruner = Pruner::with_layers(&pruned_vs, &names, pruning)?;
        tch::manual_seed(ctx.seed as i64);
        ctx.progress.info(&format!(
            "{}: fine-tuning for {steps} steps, sparsity reached at step {end_step}",
            target.name(PrunedWeights::F32)
        ));
        let options = TrainOptions {
            max_steps: Some(steps),
            pruner: Some(&mut pruner),
            ..TrainOptions::default()
        };
        let stats = train::train_with(
            &pruned,
            &pruned_vs,
            self.data,
            &config,
            options,
            &ctx.progress,
            &target.name(PrunedWeights::F32).to_string(),
        )?;
        Ok(Tuned {
            layers: pruner.strip(),
            libtorch_accuracy: train::evaluate(&pruned, self.tests.libtorch()).accuracy,
            params: pruned.deployed_parameters(&pruned_vs)?,
            stats,
            schedule: (
                target.name(PrunedWeights::F32).to_string(),
                schedule,
                steps as u64,
            ),
            prunable_total,
        })
    }

    /// The teacher pruned to `target`, deployed sparse and as int8: two rows, and the
    /// schedule with the steps it ran.
    fn prune(&self, target: &Target) -> Result<(Vec<Row>, ScheduleRun)> {
        let dense = self
            .dense
            .as_ref()
            .context("the dense artifact comes first")?;
        let Tuned {
            layers,
            libtorch_accuracy,
            params: pruned_params,
            stats,
            schedule,
            prunable_total,
        } = self.fine_tune(target)?;
        let (builder, storage) = deploy::sparse_artifact(&self.deployed_spec, &pruned_params)?;
        let test = &self.tests.runtime;
        let (f32_variant, int8_variant) = (
            target.name(PrunedWeights::F32),
            target.name(PrunedWeights::Int8),
        );
        let deployed = deploy::deploy(&builder, &self.file(f32_variant)?, test)?;
        let int8_builder = self
            .deployed_spec
            .artifact(&pruned_params, WeightFormat::Int8DynamicRange)?;
        let int8 = deploy::deploy(&int8_builder, &self.file(int8_variant)?, test)?;
        let sparsity = deploy::weight_zeros(&pruned_params) as f64 / prunable_total as f64;
        self.ctx.progress.info(&format!(
            "{f32_variant}: {:.2}% of weights zero, {:.2}% test accuracy ({:.2}% with int8 weights)",
            sparsity * 100.0,
            deployed.accuracy * 100.0,
            int8.accuracy * 100.0
        ));
        let how = PruningTarget {
            sparsity: target.sparsity,
            granularity: format!("{:?}", target.granularity),
            scope: format!("{:?}", target.scope),
            dense_layers: vec![self.dense_layer.clone()],
            fine_tune_steps: stats.steps,
            libtorch_accuracy: Some(libtorch_accuracy),
            schedule: schedule.1,
            layers,
            storage,
        };
        let mut row = pruning_row(
            &self.model,
            f32_variant,
            &pruned_params,
            &deployed,
            dense,
            PruningDetail {
                weight_sparsity: sparsity,
                target: Some(how.clone()),
                ..PruningDetail::default()
            },
        );
        stats.record(&mut row);
        let int8_row = pruning_row(
            &self.model,
            int8_variant,
            &pruned_params,
            &int8,
            dense,
            PruningDetail {
                weights: PrunedWeights::Int8,
                weight_sparsity: sparsity,
                // Every weight is int8: the f32 row's dense-or-CSR choice does not apply.
                target: Some(PruningTarget {
                    storage: BTreeMap::new(),
                    ..how
                }),
                ..PruningDetail::default()
            },
        );
        Ok((vec![row, int8_row], schedule))
    }
}

fn pruning_row(
    model: &str,
    variant: Pruned,
    params: &[DeployedParameter],
    d: &Deployed,
    dense: &Deployed,
    mut detail: PruningDetail,
) -> Row {
    detail.deployment = d.against(dense);
    let detail = Detail::Pruning(detail);
    let mut row = deploy::runtime_row(Stage::Pruning, model, variant, params, d, detail);
    row.nonzero_params = Some(deploy::nonzero(params));
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sparse_teacher_product_is_the_file_the_90_percent_target_writes() {
        let target = TARGETS
            .iter()
            .find(|t| t.variant == Sparsity::Percent(90))
            .expect("a 90% target");
        let file = format!(
            "{FOLDER}/teacher_{}.safetensors",
            target.name(PrunedWeights::F32)
        );
        assert_eq!(SPARSE_TEACHER.file, file);
    }
}
