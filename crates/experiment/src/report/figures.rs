//! The report's "Plots" section: charts drawn from the rows (accuracy against size with the
//! Pareto front, training curves, the loss-scale trace) and the ones the stages drew.

use std::fmt::Write as _;
use std::path::Path;

use plots::{Kind, Scale, Series};

use super::sections::CHARTS;
use super::teacher::pareto_front;
use super::{Report, Row, human_bytes};
use crate::charts::{FOLDER, Figure};
use crate::stage::Stage;

/// File of the accuracy-against-size chart.
pub const ACCURACY_SIZE: &str = "accuracy_size.svg";
/// File of the loss-scale chart.
pub const LOSS_SCALE: &str = "precision_loss_scale.svg";

/// A chart of the section, its one-line caption and what to list under it.
struct Plot {
    figure: Figure,
    caption: String,
    notes: String,
}

/// Draws the report's charts into `out/plots/` and returns the "Plots" section, empty when
/// there is nothing to show. A chart that cannot be drawn is named in the section with the
/// reason, so that the rest of the report is still written.
pub fn section(report: &Report, out: &Path) -> String {
    let mut md = String::new();
    for plot in plots(&report.rows) {
        match plot.figure.write(out) {
            Ok(image) => {
                let _ = writeln!(md, "{image}\n*{}*\n", plot.caption);
                if !plot.notes.is_empty() {
                    let _ = writeln!(md, "{}", plot.notes);
                }
            }
            Err(err) => {
                let _ = writeln!(md, "{} could not be drawn: {err:#}\n", plot.figure.file);
            }
        }
    }
    // The charts the stages drew, where they did.
    for chart in CHARTS {
        let (file, title, caption) = (chart.file, chart.title, chart.caption);
        if out.join(FOLDER).join(file).is_file() {
            let _ = writeln!(md, "![{title}]({FOLDER}/{file})\n\n*{caption}*\n");
        }
    }
    md
}

/// The charts drawn from the rows, each only when some row has its data.
fn plots(rows: &[Row]) -> Vec<Plot> {
    let mut plots = Vec::new();
    plots.extend(accuracy_size(rows));
    plots.extend(training_curves(rows));
    plots.extend(loss_scale(rows));
    plots
}

/// `(size in KiB, accuracy in %)` of a row that has both.
fn size_point(row: &Row) -> Option<(f64, f64)> {
    let size = row.size_bytes.filter(|&b| b > 0)? as f64 / 1024.0;
    let accuracy = row.test_accuracy.filter(|a| a.is_finite())? * 100.0;
    Some((size, accuracy))
}

/// The stages of `rows` that have rows passing `keep`, in report order.
fn stages(rows: &[Row], keep: impl Fn(&Row) -> bool) -> Vec<&str> {
    let mut stages: Vec<&str> = Vec::new();
    for row in rows.iter().filter(|r| keep(r)) {
        if !stages.contains(&row.stage.as_str()) {
            stages.push(&row.stage);
        }
    }
    stages
}

/// A row's name in a legend among `rows`: its variant, with the model when another row has
/// the same variant.
fn legend_name(row: &Row, rows: &[&Row]) -> String {
    let shared = rows.iter().filter(|r| r.variant == row.variant).count() > 1;
    if shared {
        format!("{} {}", row.model, row.variant)
    } else {
        row.variant.clone()
    }
}

fn accuracy_size(rows: &[Row]) -> Option<Plot> {
    let mut series: Vec<Series> = stages(rows, |r| size_point(r).is_some())
        .into_iter()
        .map(|stage| {
            let points = rows
                .iter()
                .filter(|r| r.stage == stage)
                .filter_map(size_point)
                .collect();
            Series::new(stage, points)
        })
        .collect();
    if series.is_empty() {
        return None;
    }
    let mut front = pareto_front(rows);
    front.sort_by(|a, b| {
        let (a, b) = (size_point(a), size_point(b));
        a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut line = Series::new(
        "Pareto front",
        front.iter().filter_map(|r| size_point(r)).collect(),
    )
    .with_kind(Kind::Lines);
    line.point_labels = front.iter().map(|r| legend_name(r, &front)).collect();
    series.push(line);
    let mut figure = Figure::scatter(
        ACCURACY_SIZE,
        "Every model: test accuracy against artifact size",
        "artifact size (KiB, log scale)",
        "test accuracy on the 10k test set (%)",
        series,
    );
    figure.chart.x_scale = Scale::Log10;
    let caption = "Every row with an artifact, one colour per stage, artifact size on a log \
                   axis; the line joins the Pareto front: the rows no other row matches or \
                   beats on both size and accuracy."
        .to_string();
    let mut notes = String::from("The Pareto front, smallest first:\n\n");
    for row in &front {
        let _ = writeln!(
            notes,
            "- {}/{} ({}): {}, {:.2}%",
            row.stage,
            row.variant,
            row.model,
            human_bytes(row.size_bytes.unwrap_or(0)),
            row.test_accuracy.unwrap_or(f64::NAN) * 100.0
        );
    }
    Some(Plot {
        figure,
        caption,
        notes,
    })
}

/// A row's training curve: its `[step, loss]` pairs with a positive, finite loss.
fn loss_curve(row: &Row) -> Vec<(f64, f64)> {
    row.loss_curve
        .iter()
        .map(|&(step, loss)| (step as f64, loss))
        .filter(|&(_, loss)| loss.is_finite() && loss > 0.0)
        .collect()
}

/// Stages whose rows are phases run one after another on one model (distillation, pruning,
/// quantization-aware training): their curves continue one step axis.
const SEQUENTIAL_STAGES: [&str; 1] = [Stage::Pipeline.name()];

/// The last step a row's training curve records, 0 without one.
fn last_step(row: &Row) -> f64 {
    row.loss_curve
        .iter()
        .map(|&(step, _)| step as f64)
        .fold(0.0, f64::max)
}

/// The training curves of `trained`, rows of `stage` in report order. A stage of
/// [`SEQUENTIAL_STAGES`] restarts its step count at every phase: each phase's curve is moved
/// by the steps of the phases before it (`train_steps` where a row records it, else the last
/// step of its curve), so that the phases follow one another.
fn stage_curves(stage: &str, trained: &[&Row]) -> Vec<Vec<(f64, f64)>> {
    let sequential = SEQUENTIAL_STAGES.contains(&stage);
    let mut offset = 0.0;
    trained
        .iter()
        .map(|row| {
            let curve = loss_curve(row);
            if !sequential {
                return curve;
            }
            let moved = curve
                .iter()
                .map(|&(step, loss)| (step + offset, loss))
                .collect();
            let steps = row.detail.train_steps().map(|s| s as f64);
            offset += steps
                .filter(|s| s.is_finite() && *s > 0.0)
                .unwrap_or_else(|| last_step(row));
            moved
        })
        .collect()
}

/// One chart per stage with training curves, one line per row.
fn training_curves(rows: &[Row]) -> Vec<Plot> {
    stages(rows, |r| !loss_curve(r).is_empty())
        .into_iter()
        .map(|stage| {
            let trained: Vec<&Row> = rows
                .iter()
                .filter(|r| r.stage == stage && !loss_curve(r).is_empty())
                .collect();
            let series = trained
                .iter()
                .zip(stage_curves(stage, &trained))
                .map(|(r, curve)| Series::new(legend_name(r, &trained), curve))
                .collect();
            // A lone series has no legend: the title names it.
            let title = match trained.as_slice() {
                [only] => format!("Stage {stage}: training loss ({})", only.variant),
                _ => format!("Stage {stage}: training loss"),
            };
            let mut figure = Figure::lines(
                &format!("training_{stage}.svg"),
                &title,
                "optimizer step",
                "training loss (log scale)",
                series,
            );
            figure.chart.y_scale = Scale::Log10;
            let mut caption = format!(
                "The training loss of every model the {stage} stage trained, against the \
                 optimizer step (each the loss it minimises: cross-entropy, or the \
                 distillation loss for distilled students)."
            );
            if SEQUENTIAL_STAGES.contains(&stage) {
                caption.push_str(
                    " Its phases trained one model one after another, so they follow one \
                     another on one step axis, in the order they ran.",
                );
            }
            Plot {
                figure,
                caption,
                notes: String::new(),
            }
        })
        .collect()
}

/// A precision row's loss scale as a step function: each value held until the next change,
/// the last one until the row's final step.
fn scale_steps(row: &Row) -> Vec<(f64, f64)> {
    let Some(scaling) = row.detail.scaling() else {
        return Vec::new();
    };
    let changes: Vec<(f64, f64)> = scaling
        .history
        .iter()
        .map(|p| (p.step as f64, f64::from(p.scale)))
        .filter(|&(_, scale)| scale.is_finite() && scale > 0.0)
        .collect();
    let mut points = Vec::with_capacity(2 * changes.len() + 1);
    for (i, &(step, scale)) in changes.iter().enumerate() {
        if i > 0 {
            points.push((step, changes[i - 1].1));
        }
        points.push((step, scale));
    }
    let last_step = row.detail.train_steps().map(|s| s as f64);
    if let (Some(end), Some(&(step, scale))) = (last_step, changes.last())
        && end > step
    {
        points.push((end, scale));
    }
    points
}

fn loss_scale(rows: &[Row]) -> Option<Plot> {
    let scaled: Vec<&Row> = rows
        .iter()
        .filter(|r| r.stage == Stage::Precision.name() && !scale_steps(r).is_empty())
        .collect();
    if scaled.is_empty() {
        return None;
    }
    let series = scaled
        .iter()
        .map(|r| Series::new(legend_name(r, &scaled), scale_steps(r)))
        .collect();
    // A lone series has no legend: the title names it.
    let title = match scaled.as_slice() {
        [only] => format!("float16 training: dynamic loss scale ({})", only.variant),
        _ => "float16 training: dynamic loss scale".to_string(),
    };
    let mut figure = Figure::lines(
        LOSS_SCALE,
        &title,
        "optimizer step",
        "loss scale (log scale)",
        series,
    );
    figure.chart.y_scale = Scale::Log10;
    let mut caption = String::from(
        "The loss scale at each step: halved after a step whose gradients overflowed (the step \
         is skipped), doubled after a run of finite steps. Skipped steps:",
    );
    for row in &scaled {
        let skipped = row.detail.scaling().map(|s| s.skipped_steps);
        let _ = write!(
            caption,
            " {} {};",
            row.variant,
            skipped.map_or_else(|| "-".into(), |s| s.to_string())
        );
    }
    caption.pop();
    caption.push('.');
    Some(Plot {
        figure,
        caption,
        notes: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::detail::{Detail, Scaling, TrainingDetail};

    fn row(stage: &str, variant: &str) -> Row {
        Row {
            stage: stage.into(),
            variant: variant.into(),
            model: "m".into(),
            ..Row::default()
        }
    }

    #[test]
    fn loss_curves_skip_points_a_log_axis_cannot_show() {
        let mut r = row("baseline", "t");
        r.loss_curve = vec![(0, 2.3), (10, 0.0), (20, 0.5), (30, f64::NAN)];
        assert_eq!(loss_curve(&r), [(0.0, 2.3), (20.0, 0.5)]);
        assert!(loss_curve(&row("s", "v")).is_empty());
    }

    #[test]
    fn the_pipeline_phases_continue_one_step_axis() {
        let curve_row = |stage: &str, variant: &str, curve: Vec<(usize, f64)>| {
            let mut r = row(stage, variant);
            r.loss_curve = curve;
            r
        };
        let phase = |variant: &str, curve| curve_row("pipeline", variant, curve);
        let rows = [
            phase("distilled_float32", vec![(20, 3.0), (40, 1.0)]),
            phase("distilled_pruned_float32", vec![(20, 0.5), (40, 0.4)]),
            phase("distilled_pruned_int8", vec![(10, 0.45), (20, 0.4)]),
            row("pipeline", "no_training"),
            curve_row("baseline", "t", vec![(20, 2.0), (40, 1.0)]),
        ];
        let plots = training_curves(&rows);
        let pipeline = &plots[0].figure.chart;
        let steps: Vec<Vec<f64>> = pipeline
            .series
            .iter()
            .map(|s| s.points.iter().map(|p| p.0).collect())
            .collect();
        assert_eq!(steps, [[20.0, 40.0], [60.0, 80.0], [90.0, 100.0]]);
        assert_eq!(pipeline.series[1].points[1].1, 0.4);
        // A phase that records its step count is moved by it, not by its last logged step.
        let mut counted = rows[0].clone();
        counted.detail = Detail::Training(TrainingDetail {
            train_steps: 50,
            ..TrainingDetail::default()
        });
        let curves = stage_curves("pipeline", &[&counted, &rows[1]]);
        assert_eq!(curves[1][0].0, 70.0);
        // Other stages' rows are separate runs: each starts at its own first step.
        let baseline = &plots[1].figure.chart;
        assert_eq!(baseline.series[0].points[0].0, 20.0);
        assert!(plots[0].caption.contains("one step axis"));
        assert!(!plots[1].caption.contains("one step axis"));
    }

    #[test]
    fn the_loss_scale_is_a_step_function_to_the_last_step() {
        let mut r = row("precision", "mixed_float16");
        r.detail = Detail::Training(TrainingDetail {
            train_steps: 100,
            scaling: Some(Scaling {
                config: loss_scaling::LossScaleConfig::Fixed { scale: 1.0 },
                skipped_steps: 1,
                final_loss_scale: None,
                history: serde_json::from_value(serde_json::json!([
                    {"step": 0, "scale": 65536.0},
                    {"step": 3, "scale": 32768.0},
                    {"step": 50, "scale": 65536.0},
                ]))
                .unwrap(),
            }),
            ..TrainingDetail::default()
        });
        assert_eq!(
            scale_steps(&r),
            [
                (0.0, 65536.0),
                (3.0, 65536.0),
                (3.0, 32768.0),
                (50.0, 32768.0),
                (50.0, 65536.0),
                (100.0, 65536.0),
            ]
        );
    }

    #[test]
    fn legends_name_the_model_only_when_variants_repeat() {
        let (a, mut b, c) = (
            row("q", "qat_int8"),
            row("q", "qat_int8"),
            row("q", "float16"),
        );
        b.model = "student".into();
        let all = [&a, &b, &c];
        assert_eq!(legend_name(&a, &all), "m qat_int8");
        assert_eq!(legend_name(&b, &all), "student qat_int8");
        assert_eq!(legend_name(&c, &all), "float16");
    }
}
