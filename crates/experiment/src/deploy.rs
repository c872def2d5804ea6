//! Deployed models: write an artifact, measure its size, and score it with the pure-Rust
//! runtime on the full test set.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result};

use mnist_data::{Normalization, Split};
use model_spec::{InputLayout, InputNormalization};
use ndarray::{Array4, Axis};

use crate::architecture::Architecture;
use crate::context::{Context, RunFile};
use crate::fsutil;
use crate::report::Row;
use crate::report::detail::{Deployment, Detail};
use crate::report::sections::Reference;
use crate::stage::Stage;
use crate::train::{DeviceSplit, INFER_BATCH};

/// Test images scored in `--quick` mode (a full run scores all 10 000).
const QUICK_TEST_IMAGES: usize = 1000;

/// The test set of a stage that deploys models: for the runtime, and on the device for
/// LibTorch (the same images: all of them, or the first [`QUICK_TEST_IMAGES`] in `--quick`
/// mode).
pub struct TestSets<'a> {
    pub runtime: RuntimeTest,
    quick: Option<DeviceSplit>,
    full: &'a DeviceSplit,
}

impl<'a> TestSets<'a> {
    pub fn new(ctx: &'a Context) -> anyhow::Result<Self> {
        Ok(if ctx.quick {
            let n = QUICK_TEST_IMAGES.min(ctx.dataset.test.len());
            let split = ctx.dataset.test.select(&(0..n).collect::<Vec<_>>());
            Self {
                runtime: RuntimeTest::new(&split, ctx.normalization),
                quick: Some(DeviceSplit::new(
                    &split,
                    ctx.normalization,
                    ctx.device.device,
                )?),
                full: &ctx.test,
            }
        } else {
            Self {
                runtime: RuntimeTest::new(&ctx.dataset.test, ctx.normalization),
                quick: None,
                full: &ctx.test,
            }
        })
    }

    /// The same images on the device, for LibTorch.
    pub fn libtorch(&self) -> &DeviceSplit {
        self.quick.as_ref().unwrap_or(self.full)
    }
}

/// The artifact with every weight in CSR form where the runtime says that pays off, dense
/// f32 otherwise; and the choice per weight.
pub fn sparse_artifact(
    architecture: &Architecture,
    params: &[models::export::DeployedParameter],
) -> Result<(runtime::ArtifactBuilder, BTreeMap<String, String>)> {
    let mut builder = architecture.builder();
    let mut storage = BTreeMap::new();
    for p in params {
        let rows = p.shape[0];
        let cols = p.data.len() / rows.max(1);
        let nnz = p.data.iter().filter(|&&w| w != 0.0).count();
        if p.name.ends_with(".weight") && runtime::csr_pays_off(rows, cols, nnz) {
            builder.add(&p.name, &p.data, &p.shape, runtime::Storage::Csr)?;
            storage.insert(p.name.clone(), "csr".to_string());
        } else {
            builder.add(&p.name, &p.data, &p.shape, runtime::Storage::F32)?;
            if p.name.ends_with(".weight") {
                storage.insert(p.name.clone(), "dense".to_string());
            }
        }
    }
    Ok((builder, storage))
}

/// A report row for an artifact scored by the runtime, with `detail`.
pub fn runtime_row(
    stage: Stage,
    model: &str,
    variant: impl std::fmt::Display,
    params: &[models::export::DeployedParameter],
    d: &Deployed,
    detail: Detail,
) -> Row {
    Row {
        stage: stage.name().into(),
        variant: variant.to_string(),
        model: model.into(),
        params: Some(params.iter().map(|p| p.data.len()).sum()),
        nonzero_params: None,
        test_accuracy: Some(d.accuracy),
        size_bytes: Some(d.size_bytes),
        gzip_bytes: Some(d.gzip_bytes),
        train_seconds: None,
        train_samples_per_second: None,
        infer_samples_per_second: Some(d.samples_per_second),
        engine: Some("tch-mot runtime".into()),
        artifact: Some(d.artifact.clone()),
        loss_curve: Vec::new(),
        detail,
    }
}

impl Deployed {
    /// What the report compares other artifacts with.
    pub fn reference(&self) -> Reference {
        Reference {
            accuracy: self.accuracy,
            size_bytes: self.size_bytes,
            samples_per_second: self.samples_per_second,
        }
    }

    /// This artifact against `reference`: accuracy, size and speed ratios.
    pub fn against(&self, reference: &Deployed) -> Deployment {
        Deployment {
            execution: self.execution.clone(),
            accuracy_delta_pp: (self.accuracy - reference.accuracy) * 100.0,
            size_ratio: reference.size_bytes as f64 / self.size_bytes as f64,
            gzip_ratio: reference.gzip_bytes as f64 / self.gzip_bytes as f64,
            speedup: self.samples_per_second / reference.samples_per_second,
        }
    }
}

/// Parameters (weights and biases) that are not exactly zero.
pub fn nonzero(params: &[models::export::DeployedParameter]) -> usize {
    params
        .iter()
        .map(|p| p.data.iter().filter(|&&w| w != 0.0).count())
        .sum()
}

/// Weights (not biases) that are exactly zero: what pruning set.
pub fn weight_zeros(params: &[models::export::DeployedParameter]) -> usize {
    params
        .iter()
        .filter(|p| p.name.ends_with(".weight"))
        .map(|p| p.data.iter().filter(|&&w| w == 0.0).count())
        .sum()
}

/// The test set as the runtime takes it: normalised images (N, 1, H, W) and labels, and the
/// normalisation that every artifact records.
#[derive(Debug)]
pub struct RuntimeTest {
    pub images: Array4<f32>,
    pub labels: Vec<u8>,
    pub normalization: InputNormalization,
}

impl RuntimeTest {
    pub fn new(split: &Split, norm: Normalization) -> Self {
        Self {
            images: split.normalized(norm),
            labels: split.labels.to_vec(),
            normalization: input_normalization(norm),
        }
    }
}

/// An artifact on disk and how the runtime does with it.
#[derive(Debug, Clone)]
pub struct Deployed {
    /// The artifact's path relative to the run folder.
    pub artifact: String,
    pub size_bytes: u64,
    pub gzip_bytes: u64,
    pub accuracy: f64,
    pub samples_per_second: f64,
    /// The runtime's execution mode of each conv2d/linear layer, e.g. `"int8-static"`.
    pub execution: Vec<String>,
}

/// What every artifact records about its input: 8-bit pixels normalised with `norm`.
pub fn input_normalization(norm: Normalization) -> InputNormalization {
    InputNormalization {
        layout: InputLayout::Nchw,
        raw_max: 255.0,
        mean: vec![norm.mean],
        std: vec![norm.std],
    }
}

/// Writes the deployed parameters `params` of `architecture` (batch norm folded) as an f32
/// artifact at `path`,
/// with the input normalisation recorded. The file is written in place: `path` is the
/// temporary file of [`fsutil::create_atomic`], which makes the artifact appear atomically.
pub fn export_f32(
    architecture: &Architecture,
    params: &[models::export::DeployedParameter],
    norm: Normalization,
    path: &Path,
) -> Result<()> {
    let bytes = architecture
        .deployed()
        .artifact(params, models::WeightFormat::F32)?
        .set_input_normalization(input_normalization(norm))
        .to_bytes()?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Writes `builder` to `file` atomically, with the input normalisation of `test` recorded,
/// and scores the same bytes with the runtime.
pub fn deploy(
    builder: &runtime::ArtifactBuilder,
    file: &RunFile,
    test: &RuntimeTest,
) -> Result<Deployed> {
    let bytes = builder
        .clone()
        .set_input_normalization(test.normalization.clone())
        .to_bytes()
        .with_context(|| format!("serialising {}", file.path.display()))?;
    fsutil::write_atomic(&file.path, &bytes)?;
    measure(&bytes, file, test)
}

/// Scores the artifact `bytes` (the contents of `file`) with the runtime on `test`.
pub fn measure(bytes: &[u8], file: &RunFile, test: &RuntimeTest) -> Result<Deployed> {
    let model = runtime::Model::from_bytes(bytes)
        .with_context(|| format!("loading {}", file.path.display()))?;
    let (accuracy, samples_per_second) = evaluate(&model, test)?;
    let execution = model
        .execution()
        .iter()
        .map(|(_, e)| execution_name(e).to_string())
        .collect();
    Ok(Deployed {
        artifact: file.relative.clone(),
        size_bytes: bytes.len() as u64,
        gzip_bytes: fsutil::gzip_len(bytes)?,
        accuracy,
        samples_per_second,
        execution,
    })
}

fn execution_name(e: &runtime::Execution) -> &'static str {
    match e {
        runtime::Execution::F32 => "f32",
        runtime::Execution::Csr { .. } => "csr",
        runtime::Execution::Int8Dynamic => "int8-dynamic",
        runtime::Execution::Int8Static { .. } => "int8-static",
    }
}

/// Accuracy and throughput (batch [`INFER_BATCH`]) of `model`, by the runtime's one rule
/// ([`runtime::Model::score`], which `infer` reports too).
pub fn evaluate(model: &runtime::Model, test: &RuntimeTest) -> Result<(f64, f64)> {
    let score = model.score(
        test.images
            .axis_chunks_iter(Axis(0), INFER_BATCH)
            .zip(test.labels.chunks(INFER_BATCH)),
    )?;
    Ok((score.accuracy(), score.images_per_second()))
}
