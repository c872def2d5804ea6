//! `pipeline`: the techniques chained, the way a model is shipped. The baseline teacher
//! distils a small student on the full training set; the student (batch norm folded) is
//! pruned under TF-MOT's `PolynomialDecay` to `--sparsity`, each layer by its own
//! magnitudes, still learning from the teacher; quantization-aware fine-tuning then keeps the pruning masks
//! (TF-MOT's pruning-preserving QAT: the zeros stay zero, so they stay zero int8 codes);
//! the result is a full-integer int8 artifact whose weights are stored as a bitmask and
//! the kept codes, scored by the pure-Rust runtime. With `--pcqat-clusters`, the same pruned
//! student is also fine-tuned with its weights clustered (TF-MOT's PCQAT: zeros and shared
//! values kept through quantization-aware training) and shipped palettized, still run in
//! integers. Every step is a row, compared with the float32 teacher.

use anyhow::{Context as _, Result, bail};
use clustering::{CentroidOptimizer, Clusterer, ClusteringConfig};
use distillation::TeacherCache;
use models::export::{self, DeployedParameter, WeightFormat};
use models::{FakeQuantConfig, Network, NetworkSpec};
use pruning::{Granularity, Pruner, PruningConfig, Schedule, Scope};
use tch::nn;

use crate::context::Context;
use crate::deploy::{self, Deployed, TestSets};
use crate::report::detail::{Detail, PipelineDetail, PipelineTarget, PruningTarget};
use crate::report::sections::pipeline::{
    PCQAT_TARGET_SIZE_RATIO, TARGET_ACCURACY, TARGET_SIZE_RATIO,
};
use crate::report::{Row, StageReport, sections};
use crate::settings::PipelineSettings;
use crate::stage::Stage;
use crate::teacher;
use crate::train::{self, DeviceSplit, Distill, TrainConfig, TrainOptions, TrainStats};
use crate::variant::PipelineStep;

/// Folder of the stage's artifacts, inside the run's output folder.
const FOLDER: &str = "pipeline";
/// Distillation of the student on the full training set.
const DISTILL_EPOCHS: usize = 4;
const DISTILL_LEARNING_RATE: f64 = 3e-3;
/// Pruning fine-tune: the sparsity ramps over the first [`RAMP_SHARE`] of its steps, the
/// rest recovers (two epochs and a 60% ramp lost 0.2 points more at 85%; four instead of
/// three, with two QAT epochs instead of one, gained 0.08 at 82%; six instead of four
/// gained 0.05-0.08 more, on one and on two threads).
const PRUNE_EPOCHS: usize = 6;
const PRUNE_LEARNING_RATE: f64 = 1e-3;
const RAMP_SHARE: f64 = 0.5;
const FREQUENCY: u64 = 50;
/// Pruning-preserving quantization-aware fine-tune.
const QAT_EPOCHS: usize = 2;
const QAT_LEARNING_RATE: f64 = 5e-4;
const QAT_OBSERVER_STEPS: usize = 200;
/// PCQAT: the centroids' own optimizer (Adam), slower than the weights'.
const CENTROID_LEARNING_RATE: f64 = 1e-4;
const BATCH: usize = 64;
/// `--quick`: steps per phase and mask updates.
const QUICK_STEPS: usize = 40;
const QUICK_FREQUENCY: u64 = 5;
const QUICK_OBSERVER_STEPS: usize = 10;
/// The layer left dense: the first convolution (144 weights: at 82% a 3x3 filter would keep
/// about one weight).
const DENSE_LAYER: &str = "0.weight";

pub fn run(ctx: &Context, settings: &PipelineSettings) -> Result<StageReport> {
    let tests = TestSets::new(ctx)?;
    let reference = teacher::deployed(ctx, &tests.runtime)?;
    let (data, _) = teacher::training(ctx)?;
    let cache = {
        let (_teacher_vs, teacher) = teacher::load(ctx)?;
        ctx.progress.info(&format!(
            "teacher logits for {} training images",
            data.len()
        ));
        TeacherCache::compute(&teacher, &data.images, 512)?
    };
    let spec = NetworkSpec::compact_cnn();
    let pipeline = Pipeline {
        ctx,
        settings,
        data: &data,
        cache: &cache,
        tests: &tests,
        reference: &reference,
        deployed_spec: spec.without_batch_norm(),
        model: spec.name.clone(),
    };
    let mut rows = Vec::new();
    let (params, row) = pipeline.distil(&spec)?;
    rows.push(row);
    let (pruned, row) = pipeline.prune(&params)?;
    rows.push(row);
    // PCQAT starts from the same pruned student as the plain QAT.
    let snapshot = (settings.pcqat_clusters > 0)
        .then(|| pruned.snapshot())
        .transpose()?;
    rows.push(pipeline.quantize(pruned, None)?);
    if let Some(snapshot) = snapshot {
        let pruned = pipeline.restore(snapshot)?;
        rows.push(pipeline.quantize(pruned, Some(settings.pcqat_clusters))?);
    }
    let section = sections::pipeline::section(&rows, reference.reference(), settings.sparsity);
    Ok(StageReport {
        rows,
        section: Some(section.markdown),
    })
}

impl Pruned {
    /// What [`Pipeline::restore`] needs to start another fine-tuning from this state.
    fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot {
            params: export::deployed_parameters(&self.net, &self.vs)?,
            names: self.names.clone(),
            zeros: self.zeros,
            total: self.total,
        })
    }
}

/// The pruned student's parameters and pruning record, for a second fine-tuning.
struct Snapshot {
    params: Vec<DeployedParameter>,
    names: Vec<String>,
    zeros: usize,
    total: usize,
}

/// What the pipeline's steps share.
struct Pipeline<'a> {
    ctx: &'a Context,
    settings: &'a PipelineSettings,
    /// The full training set on the device.
    data: &'a DeviceSplit,
    /// The teacher's logits for it.
    cache: &'a TeacherCache,
    tests: &'a TestSets<'a>,
    reference: &'a Deployed,
    /// The student with batch norm folded: what is pruned, quantized and deployed.
    deployed_spec: NetworkSpec,
    model: String,
}

/// The pruned student, still training: its network, its variables, the layers pruned, and
/// the zeros pruning left.
struct Pruned {
    net: Network,
    vs: nn::VarStore,
    names: Vec<String>,
    zeros: usize,
    total: usize,
}

impl Pipeline<'_> {
    /// Optimizer steps of a phase of `epochs` epochs (fewer in `--quick` mode).
    fn steps(&self, epochs: usize) -> usize {
        let batches = self.data.len().div_ceil(BATCH);
        if self.ctx.quick {
            QUICK_STEPS.min(batches)
        } else {
            epochs * batches
        }
    }

    /// Trains `net` for a phase, distilling from the teacher all along; `pruner` prunes or
    /// keeps the zeros.
    fn train(
        &self,
        net: &Network,
        vs: &nn::VarStore,
        (epochs, learning_rate): (usize, f64),
        pruner: Option<&mut Pruner>,
        clusterer: Option<&mut Clusterer>,
        label: &str,
    ) -> Result<TrainStats> {
        let config = TrainConfig {
            epochs: if self.ctx.quick { 1 } else { epochs },
            batch_size: BATCH,
            learning_rate,
            seed: self.ctx.seed,
        };
        tch::manual_seed(self.ctx.seed as i64);
        train::train_with(
            net,
            vs,
            self.data,
            &config,
            TrainOptions {
                max_steps: Some(self.steps(epochs)),
                distill: Some(Distill {
                    teacher_logits: self.cache.logits(),
                    config: self.settings.distillation(),
                    hint: None,
                }),
                pruner,
                clusterer,
                ..TrainOptions::default()
            },
            &self.ctx.progress,
            label,
        )
    }

    /// Deploys `builder` as `variant` and makes its row.
    fn deploy(
        &self,
        builder: &runtime::ArtifactBuilder,
        variant: PipelineStep,
        params: &[DeployedParameter],
        stats: &TrainStats,
        detail: PipelineDetail,
    ) -> Result<(Deployed, Row)> {
        let file = self.ctx.file(FOLDER, &format!("{variant}.safetensors"))?;
        let deployed = deploy::deploy(builder, &file, &self.tests.runtime)?;
        let mut row = pipeline_row(
            &self.model,
            variant,
            params,
            &deployed,
            self.reference,
            detail,
        );
        stats.record(&mut row);
        Ok((deployed, row))
    }

    /// 1. Distillation of the student on the full training set.
    fn distil(&self, spec: &NetworkSpec) -> Result<(Vec<DeployedParameter>, Row)> {
        self.ctx.progress.info(&format!(
            "distilling the student on {} images for {} steps",
            self.data.len(),
            self.steps(DISTILL_EPOCHS)
        ));
        tch::manual_seed(self.ctx.seed as i64);
        let vs = nn::VarStore::new(self.ctx.device.device);
        let student = Network::new(&vs.root(), spec)?;
        let phase = (DISTILL_EPOCHS, DISTILL_LEARNING_RATE);
        let stats = self.train(&student, &vs, phase, None, None, "distil")?;
        let params = export::deployed_parameters(&student, &vs)?;
        let builder = export::artifact_from_parameters(
            self.deployed_spec.clone(),
            &params,
            WeightFormat::F32,
        )?;
        let detail = PipelineDetail {
            step: PipelineStep::Distilled.step().into(),
            weights: "f32".into(),
            ..PipelineDetail::default()
        };
        let (distilled, row) =
            self.deploy(&builder, PipelineStep::Distilled, &params, &stats, detail)?;
        self.ctx.progress.info(&format!(
            "distilled student: {:.2}%",
            distilled.accuracy * 100.0
        ));
        Ok((params, row))
    }

    /// 2. Pruning, batch norm folded, still distilling.
    fn prune(&self, params: &[DeployedParameter]) -> Result<(Pruned, Row)> {
        let vs = nn::VarStore::new(self.ctx.device.device);
        let net = Network::new(&vs.root(), &self.deployed_spec)?;
        export::load_parameters(&vs, params)?;
        let weights: Vec<&DeployedParameter> = params
            .iter()
            .filter(|p| p.name.ends_with(".weight"))
            .collect();
        let total: usize = weights.iter().map(|p| p.data.len()).sum();
        let pruned: Vec<&DeployedParameter> = weights
            .into_iter()
            .filter(|p| p.name != DENSE_LAYER)
            .collect();
        let names: Vec<String> = pruned.iter().map(|p| p.name.clone()).collect();
        let prunable: usize = pruned.iter().map(|p| p.data.len()).sum();
        let target = self.settings.sparsity;
        // The share of zeros among the pruned layers that makes the whole network's the
        // target. Per layer, not global: folding batch norm leaves the convolutions' weights
        // much smaller than the dense layer's, and one global threshold empties them first
        // (95% of the second convolution for 49% of the dense layer, and a point of accuracy
        // lost).
        let layer_sparsity = (target * total as f64 / prunable as f64).min(0.99);
        let prune_steps = self.steps(PRUNE_EPOCHS);
        let frequency = if self.ctx.quick {
            QUICK_FREQUENCY
        } else {
            FREQUENCY
        };
        let end_step = train::ramp_end(prune_steps, RAMP_SHARE, frequency);
        let schedule = Schedule::polynomial_decay(0.0, layer_sparsity, 0, end_step, frequency)?;
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut pruner = Pruner::with_layers(
            &vs,
            &name_refs,
            PruningConfig {
                schedule,
                granularity: Granularity::Unstructured,
                scope: Scope::PerLayer,
            },
        )?;
        self.ctx.progress.info(&format!(
            "pruning to {:.0}% for {prune_steps} steps, sparsity reached at step {end_step}",
            target * 100.0
        ));
        let phase = (PRUNE_EPOCHS, PRUNE_LEARNING_RATE);
        let stats = self.train(&net, &vs, phase, Some(&mut pruner), None, "prune")?;
        let layers = pruner.strip();
        let pruned_params = export::deployed_parameters(&net, &vs)?;
        let zeros = deploy::weight_zeros(&pruned_params);
        let (builder, storage) =
            deploy::sparse_artifact(&self.deployed_spec.clone().into(), &pruned_params)?;
        let detail = PipelineDetail {
            step: PipelineStep::Pruned.step().into(),
            weights: "f32, each layer dense or CSR".into(),
            weight_sparsity: Some(zeros as f64 / total as f64),
            pruning: Some(PruningTarget {
                sparsity: target,
                granularity: format!("{:?}", Granularity::Unstructured),
                scope: format!("{:?}", Scope::PerLayer),
                dense_layers: vec![DENSE_LAYER.into()],
                fine_tune_steps: stats.steps,
                libtorch_accuracy: None,
                schedule,
                layers,
                storage,
            }),
            ..PipelineDetail::default()
        };
        let variant = PipelineStep::Pruned;
        let (deployed, row) = self.deploy(&builder, variant, &pruned_params, &stats, detail)?;
        self.ctx.progress.info(&format!(
            "pruned student: {:.2}% of weights zero, {:.2}%",
            zeros as f64 / total as f64 * 100.0,
            deployed.accuracy * 100.0
        ));
        let pruned = Pruned {
            net,
            vs,
            names,
            zeros,
            total,
        };
        Ok((pruned, row))
    }

    /// The pruned student of `snapshot`, trainable again.
    fn restore(&self, snapshot: Snapshot) -> Result<Pruned> {
        let vs = nn::VarStore::new(self.ctx.device.device);
        let net = Network::new(&vs.root(), &self.deployed_spec)?;
        export::load_parameters(&vs, &snapshot.params)?;
        Ok(Pruned {
            net,
            vs,
            names: snapshot.names,
            zeros: snapshot.zeros,
            total: snapshot.total,
        })
    }

    /// 3. Quantization-aware fine-tuning that keeps the zeros, deployed full-integer.
    ///
    /// With `clusters`, PCQAT: the weights clustered to that many values per tensor (zeros
    /// kept apart) all through the fine-tuning, and shipped palettized.
    fn quantize(&self, pruned: Pruned, clusters: Option<usize>) -> Result<Row> {
        let Pruned {
            mut net,
            vs,
            names,
            zeros,
            total,
        } = pruned;
        let quick = self.ctx.quick;
        let mut clusterer = clusters
            .map(|k| {
                Clusterer::new(
                    &vs,
                    ClusteringConfig {
                        preserve_sparsity: true,
                        optimizer: CentroidOptimizer::Adam {
                            learning_rate: CENTROID_LEARNING_RATE,
                        },
                        seed: self.ctx.seed,
                        ..ClusteringConfig::new(k)
                    },
                )
            })
            .transpose()?;
        net.enable_fake_quant(FakeQuantConfig {
            observer_steps: if quick {
                QUICK_OBSERVER_STEPS
            } else {
                QAT_OBSERVER_STEPS
            },
            ..FakeQuantConfig::default()
        })
        .context("enabling fake quantization")?;
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut keeper = Pruner::preserving(&vs, &name_refs)?;
        let variant = match clusters {
            None => PipelineStep::PrunedInt8,
            Some(_) => PipelineStep::PrunedClusteredInt8,
        };
        self.ctx.progress.info(&format!(
            "{} for {} steps",
            variant.step(),
            self.steps(QAT_EPOCHS)
        ));
        let phase = (QAT_EPOCHS, QAT_LEARNING_RATE);
        let label = if clusters.is_some() { "pcqat" } else { "qat" };
        let stats = self.train(
            &net,
            &vs,
            phase,
            Some(&mut keeper),
            clusterer.as_mut(),
            label,
        )?;
        let clustered = clusterer.map(Clusterer::strip).transpose()?;
        let fake_quant = train::evaluate(&net, self.tests.libtorch());
        let qat_params = export::deployed_parameters(&net, &vs)?;
        let qat_zeros = deploy::weight_zeros(&qat_params);
        if qat_zeros < zeros {
            bail!("quantization-aware training lost pruned weights: {qat_zeros} zeros of {zeros}");
        }
        let (format, weights, target_ratio) = match clusters {
            None => (
                WeightFormat::Int8Compact,
                "int8 per-channel, bitmask-sparse where smaller".to_string(),
                TARGET_SIZE_RATIO,
            ),
            Some(k) => (
                WeightFormat::PaletteHalf,
                format!(
                    "{k} values per tensor, palettized with f16 codebooks (zeros implicit where \
                     smaller), quantized to int8 per channel at load; f16 biases"
                ),
                PCQAT_TARGET_SIZE_RATIO,
            ),
        };
        let mut builder =
            export::artifact_from_parameters(self.deployed_spec.clone(), &qat_params, format)?;
        for range in net.activation_ranges() {
            builder.set_input_quantization(range.layer, range.qparams());
        }
        let file = self.ctx.file(FOLDER, &format!("{variant}.safetensors"))?;
        let int8 = deploy::deploy(&builder, &file, &self.tests.runtime)?;
        let size_ratio = self.reference.size_bytes as f64 / int8.size_bytes as f64;
        let met = size_ratio >= target_ratio && int8.accuracy >= TARGET_ACCURACY && !quick;
        let detail = PipelineDetail {
            step: variant.step().into(),
            weights,
            clusters: clustered.map(|layers| {
                layers
                    .iter()
                    .map(|l| (l.name.clone(), l.distinct_values))
                    .collect()
            }),
            activations: Some("u8 per-tensor, observed during training".into()),
            weight_sparsity: Some(qat_zeros as f64 / total as f64),
            fake_quant_accuracy: Some(fake_quant.accuracy),
            target: Some(PipelineTarget {
                size_ratio_at_least: target_ratio,
                accuracy_at_least: TARGET_ACCURACY,
                met,
            }),
            ..PipelineDetail::default()
        };
        let mut row = pipeline_row(
            &self.model,
            variant,
            &qat_params,
            &int8,
            self.reference,
            detail,
        );
        stats.record(&mut row);
        self.ctx.progress.info(&format!(
            "{variant}: {:.2}% ({:.2}% fake-quantized), {} bytes, {size_ratio:.1}x smaller than \
             the teacher",
            int8.accuracy * 100.0,
            fake_quant.accuracy * 100.0,
            int8.size_bytes
        ));
        Ok(row)
    }
}

fn pipeline_row(
    model: &str,
    variant: PipelineStep,
    params: &[DeployedParameter],
    d: &Deployed,
    teacher: &Deployed,
    mut detail: PipelineDetail,
) -> Row {
    detail.deployment = d.against(teacher);
    let detail = Detail::Pipeline(detail);
    let mut row = deploy::runtime_row(Stage::Pipeline, model, variant, params, d, detail);
    row.nonzero_params = Some(deploy::nonzero(params));
    row
}
