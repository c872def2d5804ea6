//! Deployed models: write an artifact, measure its size, and score it with the pure-Rust
//! runtime on the full test set.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result};

use mnist_data::{Normalization, Split};
use model_spec::{InputLayout, InputNormalization};
use ndarray::{Array4, Axis, s};

use crate::fsutil;
use crate::report::Row;
use crate::stages::Context;
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
        Ok(if ctx.args.quick {
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

/// A report row for an artifact scored by the runtime; `extra` (a JSON object) and the
/// execution modes go into the row's extra fields.
pub fn runtime_row(
    stage: &str,
    model: &str,
    variant: &str,
    artifact: String,
    params: &[models::export::DeployedParameter],
    d: &Deployed,
    extra: serde_json::Value,
) -> Row {
    let mut map = match extra {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    map.retain(|_, v| !v.is_null());
    map.insert("execution".into(), serde_json::json!(d.execution));
    Row {
        stage: stage.into(),
        variant: variant.into(),
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
        artifact: Some(artifact),
        extra: map,
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

    pub fn len(&self) -> usize {
        self.labels.len()
    }
}

/// An artifact on disk and how the runtime does with it.
#[derive(Debug, Clone)]
pub struct Deployed {
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

/// Writes `net` (built in `vs` at its root) as an f32 artifact at `path`, batch norm folded,
/// with the input normalisation recorded. The file is written in place: `path` is the
/// temporary file of [`fsutil::create_atomic`], which makes the artifact appear atomically.
pub fn export_f32(
    net: &models::Network,
    vs: &tch::nn::VarStore,
    norm: Normalization,
    path: &Path,
) -> Result<()> {
    let bytes = models::export::artifact(net, vs, models::WeightFormat::F32)?
        .set_input_normalization(input_normalization(norm))
        .to_bytes()?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Writes `builder` to `path` atomically, with the input normalisation of `test` recorded,
/// and scores the same bytes with the runtime.
pub fn deploy(
    builder: &runtime::ArtifactBuilder,
    path: &Path,
    test: &RuntimeTest,
) -> Result<Deployed> {
    let bytes = builder
        .clone()
        .set_input_normalization(test.normalization.clone())
        .to_bytes()
        .with_context(|| format!("serialising {}", path.display()))?;
    fsutil::write_atomic(path, &bytes)?;
    let (size_bytes, gzip_bytes) = (bytes.len() as u64, fsutil::gzip_len(&bytes)?);
    let model = runtime::Model::from_bytes(&bytes)
        .with_context(|| format!("loading {}", path.display()))?;
    let (accuracy, samples_per_second) = evaluate(&model, test)?;
    let execution = model
        .execution()
        .iter()
        .map(|(_, e)| execution_name(e).to_string())
        .collect();
    Ok(Deployed {
        size_bytes,
        gzip_bytes,
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

/// Accuracy and throughput (batch [`INFER_BATCH`], after one warm-up batch) of `model`.
pub fn evaluate(model: &runtime::Model, test: &RuntimeTest) -> Result<(f64, f64)> {
    let n = test.len();
    let first = INFER_BATCH.min(n);
    model.run(test.images.slice(s![..first, .., .., ..]))?;
    let start = Instant::now();
    let mut correct = 0usize;
    for (chunk, labels) in test
        .images
        .axis_chunks_iter(Axis(0), INFER_BATCH)
        .zip(test.labels.chunks(INFER_BATCH))
    {
        let logits = model.run(chunk)?;
        for (row, &label) in logits.outer_iter().zip(labels) {
            let predicted = row
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 { (i, v) } else { best }
                })
                .0;
            correct += usize::from(predicted == usize::from(label));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok((correct as f64 / n.max(1) as f64, n as f64 / seconds))
}
