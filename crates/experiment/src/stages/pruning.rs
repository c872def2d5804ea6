//! `pruning`: the baseline teacher, batch norm folded, fine-tuned under TF-MOT's
//! `PolynomialDecay` to 50, 75 and 90% sparsity (per-layer magnitude pruning) and under 2:4
//! sparsity. The first convolution (288 of 225 034 weights, one 3x3 filter per feature)
//! stays dense, as is common practice: at 90% it would keep about one weight per filter.
//! The other layers are pruned a little further so that the share of zero weights in the
//! whole network is the target. The models are then deployed with each pruned layer in CSR form where that is smaller and
//! faster and dense otherwise, and once more with int8 weights; every row is scored by the
//! pure-Rust runtime on the test set.

use std::fmt::Write as _;

use anyhow::{Context as _, Result, bail};
use models::export::{self, DeployedParameter, WeightFormat};
use models::{Network, NetworkSpec};
use plots::Series;
use pruning::{Granularity, Pruner, PruningConfig, Schedule, Scope};
use tch::nn;

use super::Context;
use super::baseline::TEACHER_CHECKPOINT;
use crate::charts::Figure;
use crate::deploy::{self, Deployed, TestSets};
use crate::report::{Row, SECTION_EXTRA};
use crate::train::{self, TrainConfig, TrainOptions};

/// Folder of the stage's artifacts, inside the run's output folder.
const FOLDER: &str = "pruning";
/// Fine-tuning at a third of the teacher's learning rate: epochs of a full run for 90%
/// (the hard target), and for the others, which recover within one.
const EPOCHS_90: usize = 2;
const EPOCHS: usize = 1;
const QUICK_STEPS: usize = 40;
const LEARNING_RATE: f64 = 1e-3;
/// The layer left dense: the first convolution.
const DENSE_LAYER: &str = "0.weight";
/// The sparsity ramps up over this share of the fine-tuning steps, then holds.
const RAMP_SHARE: f64 = 0.6;
/// Masks are recomputed every this many steps during the ramp (TF-MOT's tutorial uses 100).
const FREQUENCY: u64 = 25;
const QUICK_FREQUENCY: u64 = 5;

/// One pruned variant.
struct Target {
    variant: &'static str,
    epochs: usize,
    sparsity: f64,
    granularity: Granularity,
    scope: Scope,
}

const TARGETS: [Target; 4] = [
    Target {
        variant: "sparsity_50",
        epochs: EPOCHS,
        sparsity: 0.5,
        granularity: Granularity::Unstructured,
        scope: Scope::Global,
    },
    Target {
        variant: "sparsity_75",
        epochs: EPOCHS,
        sparsity: 0.75,
        granularity: Granularity::Unstructured,
        scope: Scope::Global,
    },
    Target {
        variant: "sparsity_90",
        epochs: EPOCHS_90,
        sparsity: 0.9,
        granularity: Granularity::Unstructured,
        scope: Scope::Global,
    },
    Target {
        variant: "n2m4",
        epochs: EPOCHS,
        sparsity: 0.5,
        granularity: Granularity::NOutOfM { n: 2, m: 4 },
        scope: Scope::PerLayer,
    },
];

pub fn run(ctx: &Context) -> Result<Vec<Row>> {
    let path = ctx.out.join(TEACHER_CHECKPOINT);
    if !path.exists() {
        bail!(
            "the pruning stage needs the teacher from the baseline stage ({} is missing): \
             run --stages baseline,pruning",
            path.display()
        );
    }
    let spec = NetworkSpec::teacher_cnn();
    let mut vs = nn::VarStore::new(ctx.device.device);
    let net = Network::new(&vs.root(), &spec)?;
    vs.load(&path)
        .with_context(|| format!("loading the teacher from {}", path.display()))?;
    let params = export::deployed_parameters(&net, &vs)?;
    let deployed_spec = spec.without_batch_norm();
    std::fs::create_dir_all(ctx.out.join(FOLDER))
        .with_context(|| format!("creating {}", ctx.out.join(FOLDER).display()))?;

    let tests = TestSets::new(ctx)?;
    let test = &tests.runtime;
    let model = spec.name.as_str();
    let file = |variant: &str| {
        ctx.out
            .join(FOLDER)
            .join(format!("{model}_{variant}.safetensors"))
    };
    let dense = deploy::deploy(
        &export::artifact_from_parameters(deployed_spec.clone(), &params, WeightFormat::F32)?,
        &file("dense_float32"),
        test,
    )?;
    let prunable_total: usize = params
        .iter()
        .filter(|p| p.name.ends_with(".weight"))
        .map(|p| p.data.len())
        .sum();
    let mut rows = vec![pruning_row(
        model,
        "dense",
        &params,
        &dense,
        &dense,
        serde_json::json!({"weight_sparsity": 0.0}),
    )];

    let (data, teacher_config) = super::baseline::teacher_training(ctx)?;
    let frequency = if ctx.args.quick {
        QUICK_FREQUENCY
    } else {
        FREQUENCY
    };
    let weights: Vec<&DeployedParameter> = params
        .iter()
        .filter(|p| p.name.ends_with(".weight"))
        .collect();
    let pruned_total: usize = weights
        .iter()
        .filter(|p| p.name != DENSE_LAYER)
        .map(|p| p.data.len())
        .sum();
    let mut schedules = Vec::new();
    for target in &TARGETS {
        let config = TrainConfig {
            epochs: if ctx.args.quick { 1 } else { target.epochs },
            learning_rate: LEARNING_RATE,
            ..teacher_config
        };
        let batches = data.len().div_ceil(config.batch_size);
        let steps = if ctx.args.quick {
            QUICK_STEPS.min(batches)
        } else {
            config.epochs * batches
        };
        // The ramp ends on a pruning step, so the final masks have the final sparsity.
        let end_step = ((steps as f64 * RAMP_SHARE) as u64 / frequency).max(1) * frequency;
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
        schedules.push((target.variant, schedule, steps as u64));
        let pruned_vs = nn::VarStore::new(ctx.device.device);
        let pruned = Network::new(&pruned_vs.root(), &deployed_spec)?;
        export::load_parameters(&pruned_vs, &params)?;
        let config_for = PruningConfig {
            schedule,
            granularity: target.granularity,
            scope: target.scope,
        };
        // N:M groups must tile the input dimension (the first convolution's 9 inputs do
        // not split into groups of 4, and it stays dense anyway).
        let names: Vec<&str> = weights
            .iter()
            .filter(|p| p.name != DENSE_LAYER)
            .filter(|p| match target.granularity {
                Granularity::NOutOfM { m, .. } => (p.data.len() / p.shape[0]).is_multiple_of(m),
                _ => true,
            })
            .map(|p| p.name.as_str())
            .collect();
        let mut pruner = Pruner::with_layers(&pruned_vs, &names, config_for)?;
        tch::manual_seed(ctx.args.seed as i64);
        ctx.progress.info(&format!(
            "{}: fine-tuning for {steps} steps, sparsity reached at step {end_step}",
            target.variant
        ));
        let stats = train::train_with(
            &pruned,
            &pruned_vs,
            &data,
            &config,
            TrainOptions {
                max_steps: Some(steps),
                pruner: Some(&mut pruner),
                ..TrainOptions::default()
            },
            &ctx.progress,
            target.variant,
        )?;
        let layers = pruner.strip();
        let tch_eval = train::evaluate(&pruned, tests.libtorch());
        let pruned_params = export::deployed_parameters(&pruned, &pruned_vs)?;
        let (builder, storage) = sparse_artifact(&deployed_spec, &pruned_params)?;
        let deployed = deploy::deploy(&builder, &file(target.variant), test)?;
        let int8_variant = format!("{}_int8", target.variant);
        let int8 = deploy::deploy(
            &export::artifact_from_parameters(
                deployed_spec.clone(),
                &pruned_params,
                WeightFormat::Int8DynamicRange,
            )?,
            &file(&int8_variant),
            test,
        )?;
        let zeros = deploy::weight_zeros(&pruned_params);
        let nonzero = deploy::nonzero(&pruned_params);
        ctx.progress.info(&format!(
            "{}: {:.2}% of weights zero, {:.2}% test accuracy ({:.2}% with int8 weights)",
            target.variant,
            zeros as f64 / prunable_total as f64 * 100.0,
            deployed.accuracy * 100.0,
            int8.accuracy * 100.0
        ));
        let mut row = pruning_row(
            model,
            target.variant,
            &pruned_params,
            &deployed,
            &dense,
            serde_json::json!({
                "target_sparsity": target.sparsity,
                "granularity": format!("{:?}", target.granularity),
                "dense_layers": [DENSE_LAYER],
                "scope": format!("{:?}", target.scope),
                "weight_sparsity": zeros as f64 / prunable_total as f64,
                "layers": layers,
                "storage": storage,
                "libtorch_accuracy": tch_eval.accuracy,
                "fine_tune_steps": stats.steps,
                "schedule": schedule,
                "int8_accuracy": int8.accuracy,
                "int8_size_bytes": int8.size_bytes,
                "int8_gzip_bytes": int8.gzip_bytes,
                "int8_gzip_ratio_vs_dense_float32": dense.gzip_bytes as f64 / int8.gzip_bytes as f64,
            }),
        );
        row.nonzero_params = Some(nonzero);
        row.extra.insert("loss_curve".into(), stats.curve_json());
        row.train_seconds = Some(stats.seconds);
        row.train_samples_per_second = Some(stats.samples_per_second);
        rows.push(row);
        let mut int8_row = pruning_row(
            model,
            &int8_variant,
            &pruned_params,
            &int8,
            &dense,
            serde_json::json!({
                "target_sparsity": target.sparsity,
                "weight_sparsity": zeros as f64 / prunable_total as f64,
                "weights": "int8 per-channel (zeros stay zero)",
            }),
        );
        int8_row.nonzero_params = Some(nonzero);
        rows.push(int8_row);
    }

    let mut markdown = section(&rows);
    for figure in figures(&rows, &schedules) {
        markdown.push('\n');
        markdown.push_str(&figure.write(&ctx.out)?);
    }
    if let Some(first) = rows.first_mut() {
        first
            .extra
            .insert(SECTION_EXTRA.into(), serde_json::json!(markdown));
    }
    Ok(rows)
}

/// The artifact with every weight in CSR form where the runtime says that pays off, dense
/// f32 otherwise; and the choice per weight.
pub fn sparse_artifact(
    spec: &NetworkSpec,
    params: &[DeployedParameter],
) -> Result<(runtime::ArtifactBuilder, serde_json::Value)> {
    let mut builder = runtime::ArtifactBuilder::new(spec.clone());
    let mut storage = serde_json::Map::new();
    for p in params {
        let rows = p.shape[0];
        let cols = p.data.len() / rows.max(1);
        let nnz = p.data.iter().filter(|&&w| w != 0.0).count();
        if p.name.ends_with(".weight") && runtime::csr_pays_off(rows, cols, nnz) {
            builder.add(&p.name, &p.data, &p.shape, runtime::Storage::Csr)?;
            storage.insert(p.name.clone(), serde_json::json!("csr"));
        } else {
            builder.add(&p.name, &p.data, &p.shape, runtime::Storage::F32)?;
            if p.name.ends_with(".weight") {
                storage.insert(p.name.clone(), serde_json::json!("dense"));
            }
        }
    }
    Ok((builder, serde_json::Value::Object(storage)))
}

fn pruning_row(
    model: &str,
    variant: &str,
    params: &[DeployedParameter],
    d: &Deployed,
    dense: &Deployed,
    extra: serde_json::Value,
) -> Row {
    let mut row = deploy::runtime_row(
        "pruning",
        model,
        variant,
        format!("{FOLDER}/{model}_{variant}.safetensors"),
        params,
        d,
        extra,
    );
    row.nonzero_params = Some(deploy::nonzero(params));
    let extra = &mut row.extra;
    extra.insert(
        "accuracy_drop_pp".into(),
        serde_json::json!((dense.accuracy - d.accuracy) * 100.0),
    );
    extra.insert(
        "gzip_ratio_vs_dense_float32".into(),
        serde_json::json!(dense.gzip_bytes as f64 / d.gzip_bytes as f64),
    );
    extra.insert(
        "speedup_vs_dense_float32".into(),
        serde_json::json!(d.samples_per_second / dense.samples_per_second),
    );
    row
}

fn section(rows: &[Row]) -> String {
    let mut md = String::from(
        "The teacher with batch norm folded, fine-tuned while pruning; every row is an \
         artifact executed by the pure-Rust runtime. Ratios are against the dense float32 \
         artifact.\n\n\
         | variant | weight sparsity | non-zero params | accuracy | drop (pp) | gzip | gzip ratio | speed-up |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let get = |k: &str| row.extra.get(k).and_then(serde_json::Value::as_f64);
        let _ = writeln!(
            md,
            "| {} | {:.1}% | {} | {:.2}% | {:+.2} | {:.1} KiB | {:.1}x | {:.2}x |",
            row.variant,
            get("weight_sparsity").unwrap_or(0.0) * 100.0,
            row.nonzero_params.unwrap_or(0),
            row.test_accuracy.unwrap_or(f64::NAN) * 100.0,
            -get("accuracy_drop_pp").unwrap_or(f64::NAN),
            row.gzip_bytes.unwrap_or(0) as f64 / 1024.0,
            get("gzip_ratio_vs_dense_float32").unwrap_or(f64::NAN),
            get("speedup_vs_dense_float32").unwrap_or(f64::NAN),
        );
    }
    md
}

fn figures(rows: &[Row], schedules: &[(&str, Schedule, u64)]) -> Vec<Figure> {
    let point = |row: &Row| {
        (
            row.extra
                .get("weight_sparsity")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(0.0)
                * 100.0,
            row.test_accuracy.unwrap_or(0.0) * 100.0,
        )
    };
    let float: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            r.variant == "dense"
                || r.variant.starts_with("sparsity_") && !r.variant.ends_with("_int8")
        })
        .collect();
    let int8: Vec<&Row> = rows
        .iter()
        .filter(|r| r.variant.starts_with("sparsity_") && r.variant.ends_with("_int8"))
        .collect();
    let n2m4: Vec<&Row> = rows.iter().filter(|r| r.variant == "n2m4").collect();
    let mut accuracy = vec![Series::new(
        "unstructured, f32",
        float.iter().map(|r| point(r)).collect(),
    )];
    if !int8.is_empty() {
        accuracy.push(Series::new(
            "unstructured, int8 weights",
            int8.iter().map(|r| point(r)).collect(),
        ));
    }
    if !n2m4.is_empty() {
        accuracy.push(Series::new("2:4", n2m4.iter().map(|r| point(r)).collect()));
    }
    let schedule_series = schedules
        .iter()
        .map(|&(name, schedule, steps)| {
            let mut points = Vec::new();
            let mut current = 0.0;
            for step in 0..steps {
                if schedule.should_prune(step) {
                    current = schedule.sparsity(step);
                }
                points.push((step as f64, current * 100.0));
            }
            Series::new(name, points)
        })
        .collect();
    vec![
        Figure::lines(
            "pruning_accuracy.svg",
            "Pruned teacher: test accuracy against weight sparsity",
            "weights that are zero (%)",
            "test accuracy (%)",
            accuracy,
        ),
        Figure::lines(
            "pruning_schedule.svg",
            "Sparsity schedule (mask updates every few steps)",
            "fine-tuning step",
            "target sparsity (%)",
            schedule_series,
        ),
    ]
}
