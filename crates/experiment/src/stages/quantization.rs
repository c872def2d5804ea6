//! `quantization`: the baseline teacher (and the distilled student, when the distillation
//! stage left one) deployed as float16, dynamic-range int8, full-integer int8 with each of
//! the four activation calibrators, and int8 after quantization-aware training; every row is
//! scored by the pure-Rust runtime on the test set.

use std::fmt::Write as _;

use anyhow::{Context as _, Result, bail};
use models::calibrate::Calibrator as Taps;
use models::export::{self, DeployedParameter, WeightFormat};
use models::{FakeQuantConfig, Network, NetworkSpec};
use quantization::{BitWidth, Observer};
use tch::nn;

use super::Context;
use super::baseline::TEACHER_CHECKPOINT;
use super::distillation::STUDENT_CHECKPOINT;
use crate::charts::Figure;
use crate::cli::Calibrator;
use crate::deploy::{self, Deployed, TestSets};
use crate::report::{Row, SECTION_EXTRA};
use crate::train::{self, DeviceSplit, TrainConfig, TrainOptions};

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
/// Batch of calibration forward passes.
const CALIBRATION_BATCH: i64 = 250;

/// One model the stage quantizes.
struct Subject {
    spec: NetworkSpec,
    checkpoint: &'static str,
    label: &'static str,
}

pub fn run(ctx: &Context) -> Result<Vec<Row>> {
    let teacher = ctx.out.join(TEACHER_CHECKPOINT);
    if !teacher.exists() {
        bail!(
            "the quantization stage needs the teacher from the baseline stage ({} is missing): \
             run --stages baseline,quantization",
            teacher.display()
        );
    }
    let mut subjects = vec![Subject {
        spec: NetworkSpec::teacher_cnn(),
        checkpoint: TEACHER_CHECKPOINT,
        label: "teacher",
    }];
    if ctx.out.join(STUDENT_CHECKPOINT).exists() {
        subjects.push(Subject {
            spec: NetworkSpec::student_cnn(),
            checkpoint: STUDENT_CHECKPOINT,
            label: "student",
        });
    }
    std::fs::create_dir_all(ctx.out.join(FOLDER))
        .with_context(|| format!("creating {}", ctx.out.join(FOLDER).display()))?;
    // The runtime scores every row; QAT's fake-quantized model is scored by LibTorch on the
    // same images.
    let tests = TestSets::new(ctx)?;
    let calibration_images = if ctx.args.quick {
        QUICK_CALIBRATION_IMAGES
    } else {
        CALIBRATION_IMAGES
    };
    let fraction = calibration_images as f64 / ctx.dataset.train.len() as f64;
    let calibration = ctx
        .dataset
        .train
        .stratified_subset(fraction, ctx.args.seed)?;
    let calibration = DeviceSplit::new(&calibration, ctx.normalization, ctx.device.device)?;

    // Quantization-aware training fine-tunes on the teacher's training data.
    let (qat_data, _) = super::baseline::teacher_training(ctx)?;
    let mut rows = Vec::new();
    for subject in &subjects {
        rows.extend(quantize(ctx, subject, &calibration, &qat_data, &tests)?);
    }
    let mut markdown = section(&rows);
    markdown.push('\n');
    markdown.push_str(&size_figure(&rows).write(&ctx.out)?);
    if let Some(first) = rows.first_mut() {
        first
            .extra
            .insert(SECTION_EXTRA.into(), serde_json::json!(markdown));
    }
    Ok(rows)
}

fn quantize(
    ctx: &Context,
    subject: &Subject,
    calibration: &DeviceSplit,
    qat_data: &DeviceSplit,
    tests: &TestSets<'_>,
) -> Result<Vec<Row>> {
    let test = &tests.runtime;
    let path = ctx.out.join(subject.checkpoint);
    let mut vs = nn::VarStore::new(ctx.device.device);
    let net = Network::new(&vs.root(), &subject.spec)?;
    vs.load(&path)
        .with_context(|| format!("loading the {} from {}", subject.label, path.display()))?;
    let params = export::deployed_parameters(&net, &vs)?;
    let deployed_spec = subject.spec.without_batch_norm();
    let model = subject.spec.name.as_str();
    let file = |variant: &str| {
        ctx.out
            .join(FOLDER)
            .join(format!("{model}_{variant}.safetensors"))
    };

    ctx.progress.info(&format!(
        "{}: float32, float16 and dynamic int8",
        subject.label
    ));
    let mut rows = Vec::new();
    let float32 = deploy::deploy(
        &export::artifact_from_parameters(deployed_spec.clone(), &params, WeightFormat::F32)?,
        &file("float32"),
        test,
    )?;
    let reference = float32.clone();
    let row = |variant: &str, d: &Deployed, extra: serde_json::Value| {
        quant_row(model, variant, &params, d, &reference, extra)
    };
    rows.push(row(
        "float32",
        &float32,
        serde_json::json!({"weights": "f32"}),
    ));
    let float16 = deploy::deploy(
        &export::artifact_from_parameters(deployed_spec.clone(), &params, WeightFormat::F16)?,
        &file("float16"),
        test,
    )?;
    rows.push(row(
        "float16",
        &float16,
        serde_json::json!({"weights": "f16"}),
    ));
    let dynamic = deploy::deploy(
        &export::artifact_from_parameters(
            deployed_spec.clone(),
            &params,
            WeightFormat::Int8DynamicRange,
        )?,
        &file("dynamic_int8"),
        test,
    )?;
    rows.push(row(
        "dynamic_int8",
        &dynamic,
        serde_json::json!({"weights": "int8 per-channel", "activations": "per batch"}),
    ));

    // Full-integer: calibrate every quantized layer's input on the deployed network.
    let deployed_vs = nn::VarStore::new(ctx.device.device);
    let mut deployed = Network::new(&deployed_vs.root(), &deployed_spec)?;
    export::load_parameters(&deployed_vs, &params)?;
    ctx.progress.info(&format!(
        "{}: calibrating on {} training images",
        subject.label,
        calibration.len()
    ));
    let observers = observe(&deployed, calibration)?;
    let chosen = ctx.args.calibrator;
    for calibrator in Calibrator::all() {
        let method = calibrator.method(ctx.args.percentile);
        let mut builder = export::artifact_from_parameters(
            deployed_spec.clone(),
            &params,
            WeightFormat::Int8DynamicRange,
        )?;
        let mut ranges = serde_json::Map::new();
        for (layer, observer) in &observers {
            let p = observer
                .qparams(method, BitWidth::INT8)
                .with_context(|| format!("calibrating layer {layer} ({})", calibrator.name()))?;
            builder.set_input_quantization(*layer, p);
            let (lo, hi) = p.range();
            ranges.insert(layer.to_string(), serde_json::json!([lo, hi]));
        }
        let variant = format!("static_int8_{}", calibrator.name());
        let d = deploy::deploy(&builder, &file(&variant), test)?;
        ctx.progress.info(&format!(
            "{}: {variant}: {:.2}%",
            subject.label,
            d.accuracy * 100.0
        ));
        rows.push(row(
            &variant,
            &d,
            serde_json::json!({
                "weights": "int8 per-channel",
                "activations": "u8 per-tensor, calibrated",
                "calibrator": calibrator.name(),
                "percentile": (calibrator == Calibrator::Percentile).then_some(ctx.args.percentile),
                "selected": calibrator == chosen,
                "calibration_images": calibration.len(),
                "input_ranges": ranges,
            }),
        ));
    }

    // Quantization-aware training from the float model, in its deployed form.
    let steps = Some(if ctx.args.quick {
        QUICK_QAT_STEPS
    } else {
        QAT_STEPS
    });
    deployed
        .enable_fake_quant(FakeQuantConfig {
            observer_steps: if ctx.args.quick {
                10
            } else {
                QAT_OBSERVER_STEPS
            },
            ..FakeQuantConfig::default()
        })
        .context("enabling fake quantization")?;
    let config = TrainConfig {
        epochs: QAT_EPOCHS,
        batch_size: QAT_BATCH,
        learning_rate: QAT_LEARNING_RATE,
        seed: ctx.args.seed,
    };
    tch::manual_seed(ctx.args.seed as i64);
    let stats = train::train_with(
        &deployed,
        &deployed_vs,
        qat_data,
        &config,
        TrainOptions {
            max_steps: steps,
            ..TrainOptions::default()
        },
        &ctx.progress,
        &format!("{} qat", subject.label),
    )?;
    let fake_quant = train::evaluate(&deployed, tests.libtorch());
    let qat_params = export::deployed_parameters(&deployed, &deployed_vs)?;
    let mut builder = export::artifact_from_parameters(
        deployed_spec.clone(),
        &qat_params,
        WeightFormat::Int8DynamicRange,
    )?;
    let ranges = deployed.activation_ranges();
    if ranges.len() != observers.len() {
        bail!(
            "quantization-aware training observed {} of {} layers",
            ranges.len(),
            observers.len()
        );
    }
    for range in &ranges {
        let p = range.qparams();
        builder.set_input_quantization(range.layer, p);
    }
    let qat = deploy::deploy(&builder, &file("qat_int8"), test)?;
    ctx.progress.info(&format!(
        "{}: qat_int8: {:.2}% in the runtime, {:.2}% with fake quantization",
        subject.label,
        qat.accuracy * 100.0,
        fake_quant.accuracy * 100.0
    ));
    let mut qat_row = row(
        "qat_int8",
        &qat,
        serde_json::json!({
            "weights": "int8 per-channel",
            "activations": "u8 per-tensor, observed during training",
            "fake_quant_accuracy": fake_quant.accuracy,
            "qat_steps": stats.steps,
            "observer_steps": QAT_OBSERVER_STEPS,
            "learning_rate": QAT_LEARNING_RATE,
        }),
    );
    qat_row
        .extra
        .insert("loss_curve".into(), stats.curve_json());
    qat_row.train_seconds = Some(stats.seconds);
    qat_row.train_samples_per_second = Some(stats.samples_per_second);
    rows.push(qat_row);
    Ok(rows)
}

/// Observes the input of every quantized layer of `net` over the calibration set, through
/// the same `Calibrator` a model of one's own uses.
fn observe(net: &Network, data: &DeviceSplit) -> Result<Vec<(usize, Observer)>> {
    let mut calibrator = Taps::new();
    let n = data.len() as i64;
    let mut offset = 0;
    while offset < n {
        let len = CALIBRATION_BATCH.min(n - offset);
        net.calibrate(&data.images.narrow(0, offset, len), &mut calibrator)
            .context("observing the calibration set")?;
        offset += len;
    }
    let observers = calibrator
        .into_observers()
        .context("observing the calibration set")?;
    if observers.is_empty() {
        bail!("the calibration set is empty");
    }
    observers
        .into_iter()
        .map(|(tap, observer)| {
            let layer = tap
                .parse::<usize>()
                .with_context(|| format!("tap `{tap}` is not a layer index"))?;
            Ok((layer, observer))
        })
        .collect()
}

fn quant_row(
    model: &str,
    variant: &str,
    params: &[DeployedParameter],
    d: &Deployed,
    reference: &Deployed,
    extra: serde_json::Value,
) -> Row {
    let mut row = deploy::runtime_row(
        "quantization",
        model,
        variant,
        format!("{FOLDER}/{model}_{variant}.safetensors"),
        params,
        d,
        extra,
    );
    let extra = &mut row.extra;
    extra.insert(
        "accuracy_drop_pp".into(),
        serde_json::json!((reference.accuracy - d.accuracy) * 100.0),
    );
    extra.insert(
        "size_ratio_vs_float32".into(),
        serde_json::json!(reference.size_bytes as f64 / d.size_bytes as f64),
    );
    extra.insert(
        "gzip_ratio_vs_float32".into(),
        serde_json::json!(reference.gzip_bytes as f64 / d.gzip_bytes as f64),
    );
    row
}

/// The stage's markdown: accuracy drop and compression of every row against float32.
fn section(rows: &[Row]) -> String {
    let mut md = String::from(
        "Every row is an artifact executed by the pure-Rust runtime; drops and ratios are \
         against the same model's float32 artifact.\n\n\
         | model | variant | accuracy | drop (pp) | size ratio | gzip ratio | samples/s |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let get = |k: &str| row.extra.get(k).and_then(serde_json::Value::as_f64);
        let _ = writeln!(
            md,
            "| {} | {}{} | {:.2}% | {:+.2} | {:.2}x | {:.2}x | {:.0} |",
            row.model,
            row.variant,
            if row.extra.get("selected") == Some(&serde_json::json!(true)) {
                " (selected)"
            } else {
                ""
            },
            row.test_accuracy.unwrap_or(f64::NAN) * 100.0,
            -get("accuracy_drop_pp").unwrap_or(f64::NAN),
            get("size_ratio_vs_float32").unwrap_or(f64::NAN),
            get("gzip_ratio_vs_float32").unwrap_or(f64::NAN),
            row.infer_samples_per_second.unwrap_or(f64::NAN),
        );
    }
    md
}

/// Accuracy against artifact size, one series per model, each point named by its variant.
fn size_figure(rows: &[Row]) -> Figure {
    let mut models: Vec<&str> = rows.iter().map(|r| r.model.as_str()).collect();
    models.dedup();
    let series = models
        .into_iter()
        .map(|model| {
            let mine: Vec<&Row> = rows.iter().filter(|r| r.model == model).collect();
            let mut s = plots::Series::new(
                model,
                mine.iter()
                    .map(|r| {
                        (
                            r.size_bytes.unwrap_or(0) as f64 / 1024.0,
                            r.test_accuracy.unwrap_or(0.0) * 100.0,
                        )
                    })
                    .collect(),
            );
            s.point_labels = mine.iter().map(|r| r.variant.clone()).collect();
            s
        })
        .collect();
    let mut figure = Figure::scatter(
        "quantization_accuracy_size.svg",
        "Quantized models: test accuracy against artifact size",
        "artifact size (KiB)",
        "test accuracy (%)",
        series,
    );
    figure.chart.x_scale = plots::Scale::Log10;
    figure
}
