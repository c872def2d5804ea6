//! `quantization`: the baseline teacher (and the distilled student, when the distillation
//! stage left one) deployed as float16, dynamic-range int8, full-integer int8 with each of
//! the four activation calibrators, and int8 after quantization-aware training; every row is
//! scored by the pure-Rust runtime on the test set.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use models::calibrate::Calibrator as Taps;
use models::export::{self, DeployedParameter, WeightFormat};
use models::{FakeQuantConfig, NetworkSpec, Policy};
use quantization::{BitWidth, Observer};
use tch::nn;

use super::distillation::STUDENT_CHECKPOINT;
use crate::architecture::{Architecture, Net};
use crate::context::Context;
use crate::deploy::{self, Deployed, TestSets};
use crate::report::detail::{Calibration, Detail, Qat, QuantizationDetail};
use crate::report::{Row, StageReport, sections};
use crate::settings::{Calibrator, QuantizationSettings};
use crate::stage::{Product, Stage};
use crate::teacher;
use crate::train::{self, DeviceSplit, TrainConfig, TrainOptions};
use crate::variant::Quantized;

/// How every int8 row stores its weights.
const INT8_WEIGHTS: &str = "int8 per-channel";
/// Folder of the stage's artifacts, inside the run's output folder.
const FOLDER: &str = "quantization";
/// Images of the calibration set: a stratified sample of the training set.
const CALIBRATION_IMAGES: usize = 1000;
const QUICK_CALIBRATION_IMAGES: usize = 200;
/// Quantization-aware fine-tuning: 600 steps (about two thirds of an epoch) at a small
/// learning rate, observers frozen after the first 200.
const QAT_EPOCHS: usize = 1;
const QAT_STEPS: usize = 600;
const QAT_BATCH: usize = 64;
const QAT_LEARNING_RATE: f64 = 1e-4;
const QAT_OBSERVER_STEPS: usize = 200;
const QUICK_QAT_STEPS: usize = 30;
/// Steps the activation observers run before their ranges freeze, in `--quick` mode.
const QUICK_OBSERVER_STEPS: usize = 10;
/// Batch of calibration forward passes.
const CALIBRATION_BATCH: usize = 250;

/// One model the stage quantizes.
struct Subject {
    spec: Architecture,
    checkpoint: Product,
    label: &'static str,
}

pub fn run(ctx: &Context, settings: &QuantizationSettings) -> Result<StageReport> {
    ctx.input(teacher::CHECKPOINT)?;
    let mut subjects = vec![Subject {
        spec: teacher::architecture(ctx),
        checkpoint: teacher::CHECKPOINT,
        label: "teacher",
    }];
    if ctx.optional_input(STUDENT_CHECKPOINT)?.is_some() {
        subjects.push(Subject {
            spec: NetworkSpec::student_cnn().into(),
            checkpoint: STUDENT_CHECKPOINT,
            label: "student",
        });
    }
    ctx.folder(FOLDER)?;
    // The runtime scores every row; QAT's fake-quantized model is scored by LibTorch on the
    // same images.
    let tests = TestSets::new(ctx)?;
    let calibration_images = if ctx.quick {
        QUICK_CALIBRATION_IMAGES
    } else {
        CALIBRATION_IMAGES
    };
    let fraction = calibration_images as f64 / ctx.dataset.train.len() as f64;
    let calibration = ctx.dataset.train.stratified_subset(fraction, ctx.seed)?;
    let calibration = DeviceSplit::new(&calibration, ctx.normalization, ctx.device.device)?;

    // Quantization-aware training fine-tunes on the teacher's training data.
    let (qat_data, _) = teacher::training(ctx)?;
    let mut rows = Vec::new();
    for subject in &subjects {
        rows.extend(quantize(
            ctx,
            settings,
            subject,
            &calibration,
            &qat_data,
            &tests,
        )?);
    }
    let section = sections::quantization::section(&rows).write(&ctx.out)?;
    Ok(StageReport {
        rows,
        section: Some(section),
    })
}

/// One subject's trained parameters and where its rows go.
struct Quantizing<'a> {
    ctx: &'a Context,
    settings: &'a QuantizationSettings,
    label: &'static str,
    model: String,
    /// The network with batch norm folded: what is deployed.
    deployed_spec: Architecture,
    params: Vec<DeployedParameter>,
    tests: &'a TestSets<'a>,
}

fn quantize(
    ctx: &Context,
    settings: &QuantizationSettings,
    subject: &Subject,
    calibration: &DeviceSplit,
    qat_data: &DeviceSplit,
    tests: &TestSets<'_>,
) -> Result<Vec<Row>> {
    let path = ctx.input(subject.checkpoint)?;
    let mut vs = nn::VarStore::new(ctx.device.device);
    let net = subject.spec.build(&vs.root(), Policy::Float32)?;
    vs.load(&path)
        .with_context(|| format!("loading the {} from {}", subject.label, path.display()))?;
    let q = Quantizing {
        ctx,
        settings,
        label: subject.label,
        model: subject.spec.name().to_owned(),
        deployed_spec: subject.spec.deployed(),
        params: net.deployed_parameters(&vs)?,
        tests,
    };
    ctx.progress.info(&format!(
        "{}: float32, float16 and dynamic int8",
        subject.label
    ));
    let float32 = q.deploy(
        &q.builder(&q.params, WeightFormat::F32)?,
        Quantized::Float32,
    )?;
    let detail = q.detail("f32", None);
    let mut rows = vec![q.row(Quantized::Float32, &float32, &float32, detail)];
    let float16 = q.deploy(
        &q.builder(&q.params, WeightFormat::F16)?,
        Quantized::Float16,
    )?;
    let detail = q.detail("f16", None);
    rows.push(q.row(Quantized::Float16, &float16, &float32, detail));
    let dynamic = q.deploy(
        &q.builder(&q.params, WeightFormat::Int8DynamicRange)?,
        Quantized::DynamicInt8,
    )?;
    let detail = q.detail(INT8_WEIGHTS, Some("per batch"));
    rows.push(q.row(Quantized::DynamicInt8, &dynamic, &float32, detail));

    // Full-integer: calibrate every quantized layer's input on the deployed network.
    let deployed_vs = nn::VarStore::new(ctx.device.device);
    let deployed = q
        .deployed_spec
        .build(&deployed_vs.root(), Policy::Float32)?;
    export::load_parameters(&deployed_vs, &q.params)?;
    ctx.progress.info(&format!(
        "{}: calibrating on {} training images",
        subject.label,
        calibration.len()
    ));
    let observers = observe(&q.deployed_spec, &deployed, calibration)?;
    for calibrator in Calibrator::all() {
        rows.push(q.calibrated(calibrator, &observers, calibration.len(), &float32)?);
    }
    rows.push(q.qat((deployed, deployed_vs), observers.len(), qat_data, &float32)?);
    Ok(rows)
}

impl Quantizing<'_> {
    fn builder(
        &self,
        params: &[DeployedParameter],
        format: WeightFormat,
    ) -> Result<runtime::ArtifactBuilder> {
        self.deployed_spec.artifact(params, format)
    }

    fn deploy(&self, builder: &runtime::ArtifactBuilder, variant: Quantized) -> Result<Deployed> {
        let file = self
            .ctx
            .file(FOLDER, &format!("{}_{variant}.safetensors", self.model))?;
        deploy::deploy(builder, &file, &self.tests.runtime)
    }

    /// A row's detail: how weights and activations are quantized.
    fn detail(&self, weights: &str, activations: Option<&str>) -> QuantizationDetail {
        QuantizationDetail {
            weights: weights.into(),
            activations: activations.map(Into::into),
            ..QuantizationDetail::default()
        }
    }

    /// The row of `d`, compared with the same model's float32 artifact.
    fn row(
        &self,
        variant: Quantized,
        d: &Deployed,
        float32: &Deployed,
        mut detail: QuantizationDetail,
    ) -> Row {
        detail.deployment = d.against(float32);
        let detail = Detail::Quantization(detail);
        deploy::runtime_row(
            Stage::Quantization,
            &self.model,
            variant,
            &self.params,
            d,
            detail,
        )
    }

    /// Full-integer int8 with the input ranges `calibrator` picks from `observers`.
    fn calibrated(
        &self,
        calibrator: Calibrator,
        observers: &[(usize, Observer)],
        calibration_images: usize,
        float32: &Deployed,
    ) -> Result<Row> {
        let percentile = self.settings.percentile;
        let method = calibrator.method(percentile);
        let mut builder = self.builder(&self.params, WeightFormat::Int8DynamicRange)?;
        let mut ranges = BTreeMap::new();
        for (layer, observer) in observers {
            let p = observer
                .qparams(method, BitWidth::INT8)
                .with_context(|| format!("calibrating layer {layer} ({calibrator})"))?;
            builder.set_input_quantization(*layer, p);
            let (lo, hi) = p.range();
            ranges.insert(*layer, (lo, hi));
        }
        let variant = Quantized::StaticInt8(calibrator);
        let d = self.deploy(&builder, variant)?;
        self.ctx.progress.info(&format!(
            "{}: {variant}: {:.2}%",
            self.label,
            d.accuracy * 100.0
        ));
        let mut detail = self.detail(INT8_WEIGHTS, Some("u8 per-tensor, calibrated"));
        detail.calibration = Some(Calibration {
            calibrator,
            percentile: (calibrator == Calibrator::Percentile).then_some(percentile),
            selected: calibrator == self.settings.calibrator,
            images: calibration_images,
            input_ranges: ranges,
        });
        Ok(self.row(variant, &d, float32, detail))
    }

    /// Quantization-aware training from the float model in its deployed form, then
    /// full-integer int8 with the ranges observed while training.
    fn qat(
        &self,
        (mut net, vs): (Net, nn::VarStore),
        observed_layers: usize,
        data: &DeviceSplit,
        float32: &Deployed,
    ) -> Result<Row> {
        let ctx = self.ctx;
        let (steps, observer_steps) = if ctx.quick {
            (QUICK_QAT_STEPS, QUICK_OBSERVER_STEPS)
        } else {
            (QAT_STEPS, QAT_OBSERVER_STEPS)
        };
        net.enable_fake_quant(FakeQuantConfig {
            observer_steps,
            ..FakeQuantConfig::default()
        })
        .context("enabling fake quantization")?;
        let config = TrainConfig {
            epochs: QAT_EPOCHS,
            batch_size: QAT_BATCH,
            learning_rate: QAT_LEARNING_RATE,
            seed: ctx.seed,
        };
        tch::manual_seed(ctx.seed as i64);
        let options = TrainOptions {
            max_steps: Some(steps),
            ..TrainOptions::default()
        };
        let label = format!("{} qat", self.label);
        let stats = train::train_with(&net, &vs, data, &config, options, &ctx.progress, &label)?;
        let fake_quant = train::evaluate(&net, self.tests.libtorch());
        let qat_params = net.deployed_parameters(&vs)?;
        let mut builder = self.builder(&qat_params, WeightFormat::Int8DynamicRange)?;
        let ranges = net.activation_ranges();
        if ranges.len() != observed_layers {
            bail!(
                "quantization-aware training observed {} of {observed_layers} layers",
                ranges.len(),
            );
        }
        for range in &ranges {
            builder.set_input_quantization(range.layer, range.qparams());
        }
        let qat = self.deploy(&builder, Quantized::QatInt8)?;
        ctx.progress.info(&format!(
            "{}: {}: {:.2}% in the runtime, {:.2}% with fake quantization",
            self.label,
            Quantized::QatInt8,
            qat.accuracy * 100.0,
            fake_quant.accuracy * 100.0
        ));
        let mut detail = self.detail(
            INT8_WEIGHTS,
            Some("u8 per-tensor, observed during training"),
        );
        detail.qat = Some(Qat {
            fake_quant_accuracy: fake_quant.accuracy,
            steps: stats.steps,
            observer_steps,
            learning_rate: QAT_LEARNING_RATE,
        });
        let mut row = self.row(Quantized::QatInt8, &qat, float32, detail);
        stats.record(&mut row);
        Ok(row)
    }
}

/// Observes the input of every quantized layer (or node: products, sums, concatenations) of
/// `net`, of architecture `architecture`, over the calibration set, through the same
/// `Calibrator` a model of one's own uses.
fn observe(
    architecture: &Architecture,
    net: &Net,
    data: &DeviceSplit,
) -> Result<Vec<(usize, Observer)>> {
    let mut calibrator = Taps::new();
    for (images, _) in data.batches(CALIBRATION_BATCH) {
        net.calibrate(&images, &mut calibrator)
            .context("observing the calibration set")?;
    }
    let observers = calibrator
        .into_observers()
        .context("observing the calibration set")?;
    if observers.is_empty() {
        bail!("the calibration set is empty");
    }
    observers
        .into_iter()
        .map(|(tap, observer)| Ok((architecture.tapped(&tap)?, observer)))
        .collect()
}
