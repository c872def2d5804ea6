//! `clustering`: TF-MOT's weight clustering. The teacher (batch norm folded) has every
//! weight tensor clustered to 8, 16 and 32 shared values (k-means++ centroids, one codebook
//! per tensor), fine-tuned for an epoch while the centroids train on their weights'
//! gradients, and is deployed twice: palettized (each weight an index into its tensor's
//! codebook) and as int8. The same on top of the pruning stage's 90%-sparse teacher, its
//! zeros kept out of the clusters (sparsity-preserving clustering), where the palette stores
//! only the non-zero weights. Every row is compared with the float32 teacher artifact.

use anyhow::{Context as _, Result, bail};
use clustering::{CentroidOptimizer, ClusterReport, Clusterer, ClusteringConfig, Granularity};
use models::Policy;
use models::export::{self, DeployedParameter, WeightFormat};
use runtime::{Artifact, WeightValues};
use tch::nn;

use crate::architecture::Architecture;
use crate::context::Context;
use crate::deploy::{self, Deployed, TestSets};
use crate::report::detail::{ClusteredLayer, ClusteringDetail, Detail};
use crate::report::{Row, StageReport, sections};
use crate::stage::Stage;
use crate::teacher;
use crate::train::{self, DeviceSplit, TrainConfig, TrainOptions, TrainStats};
use crate::variant::{Clustered, ClusteredStorage, Sparsity};

use super::pruning::SPARSE_TEACHER;

/// Folder of the stage's artifacts, inside the run's output folder.
const FOLDER: &str = "clustering";
/// Shared values per weight tensor, each a run of its own.
const CLUSTERS: [usize; 3] = [8, 16, 32];
/// The sparsity of the pruning stage's artifact that is clustered with its zeros kept.
const SPARSE_BASE: Sparsity = Sparsity::Percent(90);
/// Fine-tuning after clustering: one epoch, as TF-MOT's guide, at a learning rate well below
/// the teacher's (the weights only move between nearby centroids).
const EPOCHS: usize = 1;
const LEARNING_RATE: f64 = 1e-4;
/// The centroids' own optimizer (TF-MOT trains them with the model's: Adam here too).
const CENTROID_LEARNING_RATE: f64 = 1e-4;
/// `--quick`: optimizer steps of each fine-tune.
const QUICK_STEPS: usize = 20;

pub fn run(ctx: &Context) -> Result<StageReport> {
    let spec = teacher::architecture(ctx);
    let (vs, net) = teacher::load(ctx)?;
    let dense = net.deployed_parameters(&vs)?;
    let sparse = artifact_parameters(ctx)?;
    let tests = TestSets::new(ctx)?;
    let reference = teacher::deployed(ctx, &tests.runtime)?;
    let (data, teacher_config) = teacher::training(ctx)?;
    let stage = Clustering {
        ctx,
        deployed_spec: spec.deployed(),
        model: spec.name().to_owned(),
        tests: &tests,
        reference: &reference,
        data: &data,
        config: TrainConfig {
            epochs: if ctx.quick { 1 } else { EPOCHS },
            learning_rate: LEARNING_RATE,
            ..teacher_config
        },
    };
    let mut rows = Vec::new();
    for (base, params) in [(Sparsity::Dense, &dense), (SPARSE_BASE, &sparse)] {
        for clusters in CLUSTERS {
            rows.extend(stage.cluster(base, params, clusters)?);
        }
    }
    let bases = [Sparsity::Dense, SPARSE_BASE];
    let section = sections::clustering::section(&rows, reference.reference(), &bases, &CLUSTERS)
        .write(&ctx.out)?;
    Ok(StageReport {
        rows,
        section: Some(section),
    })
}

/// The parameters of the pruning stage's sparse teacher, read back from its artifact.
fn artifact_parameters(ctx: &Context) -> Result<Vec<DeployedParameter>> {
    let path = ctx.input(SPARSE_TEACHER)?;
    let artifact = Artifact::load(&path)?;
    let mut params = Vec::new();
    let nodes = &artifact.graph().nodes;
    for (index, layer) in (0..nodes.len()).filter_map(|i| Some((i, artifact.layer(i)?))) {
        let WeightValues::Float(weight) = &layer.weight else {
            bail!(
                "{}: layer {index} holds int8 weights; the pruned teacher is stored in f32",
                path.display()
            );
        };
        let name = &nodes[index].name;
        params.push(DeployedParameter {
            name: format!("{name}.weight"),
            shape: layer.weight_shape.clone(),
            data: weight.clone(),
        });
        params.push(DeployedParameter {
            name: format!("{name}.bias"),
            shape: vec![layer.bias.len()],
            data: layer.bias.clone(),
        });
    }
    Ok(params)
}

/// What every clustering run shares.
struct Clustering<'a> {
    ctx: &'a Context,
    /// The teacher with batch norm folded: what is clustered and deployed.
    deployed_spec: Architecture,
    model: String,
    tests: &'a TestSets<'a>,
    /// The float32 teacher artifact, every row's reference.
    reference: &'a Deployed,
    /// The teacher's training data, and its recipe at the fine-tuning learning rate.
    data: &'a DeviceSplit,
    config: TrainConfig,
}

/// A clustered, fine-tuned teacher.
struct Tuned {
    params: Vec<DeployedParameter>,
    layers: Vec<ClusterReport>,
    stats: TrainStats,
    libtorch_accuracy: f64,
}

impl Clustering<'_> {
    /// `params` clustered to `clusters` values per weight tensor and fine-tuned, deployed
    /// palettized and as int8: two rows.
    fn cluster(
        &self,
        base: Sparsity,
        params: &[DeployedParameter],
        clusters: usize,
    ) -> Result<Vec<Row>> {
        let name = |storage| Clustered {
            base,
            clusters,
            storage,
        };
        let label = name(ClusteredStorage::Palette).to_string();
        let tuned = self
            .fine_tune(params, clusters, base != Sparsity::Dense, &label)
            .with_context(|| format!("clustering the teacher ({label})"))?;
        let palette = self
            .deployed_spec
            .artifact(&tuned.params, WeightFormat::Palette)?;
        let int8 = self
            .deployed_spec
            .artifact(&tuned.params, WeightFormat::Int8Compact)?;
        let mut rows = Vec::new();
        for (storage, builder, weights) in [
            (
                ClusteredStorage::Palette,
                &palette,
                "indices into one f32 codebook per tensor (zeros implicit where sparse)",
            ),
            (
                ClusteredStorage::Int8,
                &int8,
                "int8 per channel, bitmask-sparse where smaller",
            ),
        ] {
            let variant = name(storage);
            let file = self
                .ctx
                .file(FOLDER, &format!("{}_{variant}.safetensors", self.model))?;
            let deployed = deploy::deploy(builder, &file, &self.tests.runtime)?;
            self.ctx.progress.info(&format!(
                "{variant}: {:.2}%, {} bytes ({:.1}x smaller than the teacher)",
                deployed.accuracy * 100.0,
                deployed.size_bytes,
                self.reference.size_bytes as f64 / deployed.size_bytes as f64
            ));
            let detail = ClusteringDetail {
                deployment: deployed.against(self.reference),
                clusters,
                base: sections::clustering::base_name(base),
                weights: weights.into(),
                weight_sparsity: deploy::weight_zeros(&tuned.params) as f64
                    / weight_count(&tuned.params) as f64,
                fine_tune_steps: tuned.stats.steps,
                libtorch_accuracy: tuned.libtorch_accuracy,
                layers: tuned.layers.iter().map(clustered_layer).collect(),
            };
            let mut row = deploy::runtime_row(
                Stage::Clustering,
                &self.model,
                variant,
                &tuned.params,
                &deployed,
                Detail::Clustering(detail),
            );
            row.nonzero_params = Some(deploy::nonzero(&tuned.params));
            // One fine-tune, two deployments: its training is the palettized row's.
            if storage == ClusteredStorage::Palette {
                tuned.stats.record(&mut row);
            }
            rows.push(row);
        }
        Ok(rows)
    }

    /// Clusters `params` and fine-tunes them for an epoch.
    fn fine_tune(
        &self,
        params: &[DeployedParameter],
        clusters: usize,
        preserve_sparsity: bool,
        label: &str,
    ) -> Result<Tuned> {
        let ctx = self.ctx;
        let vs = nn::VarStore::new(ctx.device.device);
        let net = self.deployed_spec.build(&vs.root(), Policy::Float32)?;
        export::load_parameters(&vs, params)?;
        let config = ClusteringConfig {
            granularity: Granularity::PerTensor,
            preserve_sparsity,
            optimizer: CentroidOptimizer::Adam {
                learning_rate: CENTROID_LEARNING_RATE,
            },
            seed: ctx.seed,
            ..ClusteringConfig::new(clusters)
        };
        tch::manual_seed(ctx.seed as i64);
        let mut clusterer = Clusterer::new(&vs, config)?;
        let options = TrainOptions {
            max_steps: ctx.quick.then_some(QUICK_STEPS),
            clusterer: Some(&mut clusterer),
            ..TrainOptions::default()
        };
        let stats = train::train_with(
            &net,
            &vs,
            self.data,
            &self.config,
            options,
            &ctx.progress,
            label,
        )?;
        let layers = clusterer.strip()?;
        Ok(Tuned {
            params: net.deployed_parameters(&vs)?,
            layers,
            stats,
            libtorch_accuracy: train::evaluate(&net, self.tests.libtorch()).accuracy,
        })
    }
}

fn weight_count(params: &[DeployedParameter]) -> usize {
    params
        .iter()
        .filter(|p| p.name.ends_with(".weight"))
        .map(|p| p.data.len())
        .sum::<usize>()
        .max(1)
}

fn clustered_layer(report: &ClusterReport) -> ClusteredLayer {
    ClusteredLayer {
        name: report.name.clone(),
        clusters_used: report.clusters_used,
        distinct_values: report.distinct_values,
        zeros: report.zeros,
        total: report.total,
    }
}
