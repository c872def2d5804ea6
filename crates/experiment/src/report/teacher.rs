//! Every row against the float32 teacher, and the rows on the accuracy-size Pareto front.

use std::fmt::Write as _;

use super::{Row, human_bytes, opt};
use crate::stage::Stage;
use crate::variant::{self, Pruned, PrunedWeights, Quantized, Sparsity};

/// Rows that measure the float32 teacher itself, each with the engine that ran it: the
/// baseline (libtorch), the quantization stage's float32 teacher and the pruning stage's
/// dense teacher (both run by the runtime). A row's speed is compared with one of these
/// measured by the same engine.
fn measures_the_teacher(row: &Row, teacher: &Row) -> bool {
    let dense = Pruned {
        sparsity: Sparsity::Dense,
        weights: PrunedWeights::F32,
    };
    row.is(Stage::Baseline, variant::TEACHER)
        || (row.model == teacher.model
            && (row.is(Stage::Quantization, Quantized::Float32) || row.is(Stage::Pruning, dense)))
}

/// The baseline teacher row, if the run has one.
pub fn teacher(rows: &[Row]) -> Option<&Row> {
    rows.iter()
        .find(|r| r.is(Stage::Baseline, variant::TEACHER))
}

/// A row against the teacher. `None` fields could not be computed (a missing size, say).
#[derive(Debug, Clone)]
pub struct Delta<'a> {
    pub row: &'a Row,
    /// Test accuracy minus the teacher's, in percentage points.
    pub accuracy_pp: Option<f64>,
    /// The teacher's artifact size over the row's: above 1 when the row is smaller.
    pub size_ratio: Option<f64>,
    /// The row's inference throughput over the teacher's, both measured by the same engine.
    pub speed_ratio: Option<f64>,
    /// The teacher measurement `speed_ratio` is taken against.
    pub speed_reference: Option<&'a Row>,
}

/// Every row against `teacher`, in the report's order.
pub fn deltas<'a>(rows: &'a [Row], teacher: &'a Row) -> Vec<Delta<'a>> {
    rows.iter()
        .map(|row| {
            let speed_reference = speed_reference(rows, teacher, row);
            Delta {
                row,
                accuracy_pp: row
                    .test_accuracy
                    .zip(teacher.test_accuracy)
                    .map(|(ours, theirs)| (ours - theirs) * 100.0),
                size_ratio: teacher
                    .size_bytes
                    .zip(row.size_bytes)
                    .filter(|&(_, ours)| ours > 0)
                    .map(|(theirs, ours)| theirs as f64 / ours as f64),
                speed_ratio: speed_reference
                    .and_then(|r| r.infer_samples_per_second)
                    .zip(row.infer_samples_per_second)
                    .filter(|&(theirs, _)| theirs > 0.0)
                    .map(|(theirs, ours)| ours / theirs),
                speed_reference,
            }
        })
        .collect()
}

/// The teacher measured by `row`'s engine: the one of `row`'s own stage when there is one (the
/// closest in time), otherwise the first in the report.
fn speed_reference<'a>(rows: &'a [Row], teacher: &Row, row: &Row) -> Option<&'a Row> {
    let engine = row.engine.as_deref()?;
    let mut candidates = rows.iter().filter(|r| {
        measures_the_teacher(r, teacher)
            && r.engine.as_deref() == Some(engine)
            && r.infer_samples_per_second.is_some()
    });
    let first = candidates.clone().next();
    candidates.find(|r| r.stage == row.stage).or(first)
}

/// The "against the teacher" section's body: what it compares, then one table row per
/// report row; without a baseline row, a sentence saying so.
pub fn section(rows: &[Row]) -> String {
    let (stage, variant) = (Stage::Baseline, variant::TEACHER);
    let Some(teacher) = teacher(rows) else {
        return format!(
            "This run has no `{stage}`/`{variant}` row, so there is no teacher to compare with: \
             the deltas are left out (run the `{stage}` stage in the same run to get them).\n"
        );
    };
    let mut md = format!(
        "Each row against the float32 teacher (`{stage}`/`{variant}`: {}, {}): test accuracy \
         minus the teacher's in percentage points, the teacher's artifact size over the row's, \
         and the row's inference throughput over the teacher's as measured by the same engine \
         (the row named under \"speed measured against\"; its own stage's when it has one).\n\n\
         | stage | variant | model | test accuracy | vs teacher (pp) | size | size vs teacher | speed vs teacher | speed measured against |\n\
         |---|---|---|---:|---:|---:|---:|---:|---|\n",
        opt(teacher.test_accuracy, |v| format!("{:.2}%", v * 100.0)),
        opt(teacher.size_bytes, human_bytes),
    );
    for delta in deltas(rows, teacher) {
        let row = delta.row;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.stage,
            row.variant,
            row.model,
            opt(row.test_accuracy, |v| format!("{:.2}%", v * 100.0)),
            opt(delta.accuracy_pp, |v| format!("{v:+.2}")),
            opt(row.size_bytes, human_bytes),
            opt(delta.size_ratio, size_ratio),
            opt(delta.speed_ratio, |v| format!("{v:.2}x")),
            opt(delta.speed_ratio.and(delta.speed_reference), |r| format!(
                "{}/{} ({})",
                r.stage,
                r.variant,
                r.engine.as_deref().unwrap_or("-")
            )),
        );
    }
    md
}

/// `12.3x smaller`, `2.0x larger`, or `1.0x` for the same size to the shown digit.
pub fn size_ratio(ratio: f64) -> String {
    if (ratio * 10.0).round() == 10.0 || (10.0 / ratio).round() == 10.0 {
        "1.0x".into()
    } else if ratio > 1.0 {
        format!("{ratio:.1}x smaller")
    } else {
        format!("{:.1}x larger", 1.0 / ratio)
    }
}

/// The rows on the accuracy-size Pareto front, in the report's order: those with an artifact
/// size and an accuracy that no other row beats, where beating means being at least as small
/// and at least as accurate, and strictly better on one of the two. Rows with the same size
/// and accuracy do not beat each other: all of them stay on the front.
pub fn pareto_front(rows: &[Row]) -> Vec<&Row> {
    let points: Vec<(&Row, u64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r, r.size_bytes?, r.test_accuracy?)))
        .filter(|&(_, _, accuracy)| accuracy.is_finite())
        .collect();
    points
        .iter()
        .filter(|&&(_, size, accuracy)| {
            !points
                .iter()
                .any(|&(_, s, a)| s <= size && a >= accuracy && (s < size || a > accuracy))
        })
        .map(|&(row, _, _)| row)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Printed to two decimals: anything closer is the same number in the report.
    const PP_TOLERANCE: f64 = 1e-9;

    fn row(stage: &str, variant: &str, model: &str, engine: &str) -> Row {
        Row {
            stage: stage.into(),
            variant: variant.into(),
            model: model.into(),
            engine: Some(engine.into()),
            ..Row::default()
        }
    }

    fn measured(mut row: Row, accuracy: f64, size: u64, speed: f64) -> Row {
        row.test_accuracy = Some(accuracy);
        row.size_bytes = Some(size);
        row.infer_samples_per_second = Some(speed);
        row
    }

    fn sized(variant: &str, size: u64, accuracy: f64) -> Row {
        measured(row("s", variant, "m", "e"), accuracy, size, 1.0)
    }

    fn names(rows: &[&Row]) -> Vec<String> {
        rows.iter().map(|r| r.variant.clone()).collect()
    }

    #[test]
    fn each_engine_is_compared_with_the_teacher_it_ran() {
        let rows = vec![
            measured(
                row("baseline", "teacher_float32", "teacher_cnn", "libtorch"),
                0.99,
                1000,
                100.0,
            ),
            measured(
                row("precision", "mixed_bfloat16", "teacher_cnn", "libtorch"),
                0.985,
                0,
                150.0,
            ),
            measured(
                row("quantization", "float32", "teacher_cnn", "runtime"),
                0.99,
                1000,
                200.0,
            ),
            measured(
                row("quantization", "dynamic_int8", "teacher_cnn", "runtime"),
                0.9895,
                250,
                300.0,
            ),
            // The student's float32 row is not a teacher measurement.
            measured(
                row("quantization", "float32", "student_cnn", "runtime"),
                0.97,
                80,
                900.0,
            ),
            measured(
                row("pruning", "dense", "teacher_cnn", "runtime"),
                0.99,
                1000,
                400.0,
            ),
            measured(
                row("pruning", "sparsity_90", "teacher_cnn", "runtime"),
                0.988,
                125,
                200.0,
            ),
            measured(
                row(
                    "pipeline",
                    "distilled_pruned_int8",
                    "compact_cnn",
                    "runtime",
                ),
                0.98,
                40,
                1000.0,
            ),
        ];
        let teacher = teacher(&rows).unwrap();
        let deltas = deltas(&rows, teacher);
        let expect = [
            // (accuracy pp, size ratio, speed ratio, reference variant)
            (0.0, Some(1.0), 1.0, "teacher_float32"),
            (-0.5, None, 1.5, "teacher_float32"),
            (0.0, Some(1.0), 1.0, "float32"),
            (-0.05, Some(4.0), 1.5, "float32"),
            (-2.0, Some(12.5), 4.5, "float32"),
            (0.0, Some(1.0), 1.0, "dense"),
            (-0.2, Some(8.0), 0.5, "dense"),
            // No runtime teacher in its own stage: the first in the report.
            (-1.0, Some(25.0), 5.0, "float32"),
        ];
        for (delta, (pp, size, speed, reference)) in deltas.iter().zip(expect) {
            let name = &delta.row.variant;
            assert!(
                (delta.accuracy_pp.unwrap() - pp).abs() < PP_TOLERANCE,
                "{name}: {delta:?}"
            );
            match (delta.size_ratio, size) {
                (Some(got), Some(want)) => assert!((got - want).abs() < 1e-12, "{name}: {got}"),
                (got, want) => assert_eq!(got, want, "{name}"),
            }
            assert!(
                (delta.speed_ratio.unwrap() - speed).abs() < 1e-12,
                "{name}: {delta:?}"
            );
            assert_eq!(delta.speed_reference.unwrap().variant, reference, "{name}");
        }
        // A size of zero (precision rows write no artifact here) gives no ratio.
        assert_eq!(deltas[1].size_ratio, None);
    }

    #[test]
    fn missing_fields_give_no_delta() {
        let rows = vec![
            measured(
                row("baseline", "teacher_float32", "t", "libtorch"),
                0.99,
                1000,
                100.0,
            ),
            row("distillation", "student_scratch", "s", "libtorch"),
            // An engine with no teacher measurement.
            measured(row("x", "y", "t", "other"), 0.5, 10, 1.0),
        ];
        let deltas = deltas(&rows, &rows[0]);
        assert_eq!(
            (
                deltas[1].accuracy_pp,
                deltas[1].size_ratio,
                deltas[1].speed_ratio
            ),
            (None, None, None)
        );
        assert_eq!(deltas[2].speed_ratio, None);
        assert!(deltas[2].speed_reference.is_none());
        let md = section(&rows);
        assert!(
            md.contains("| distillation | student_scratch | s | - | - | - | - | - | - |"),
            "{md}"
        );
        assert!(
            md.contains("| x | y | t | 50.00% | -49.00 | 10 B | 100.0x smaller | - | - |"),
            "{md}"
        );
    }

    #[test]
    fn size_ratios_read_as_smaller_or_larger() {
        assert_eq!(size_ratio(12.34), "12.3x smaller");
        assert_eq!(size_ratio(1.0), "1.0x");
        assert_eq!(size_ratio(1.02), "1.0x");
        assert_eq!(size_ratio(0.98), "1.0x");
        assert_eq!(size_ratio(0.5), "2.0x larger");
    }

    #[test]
    fn a_run_without_a_baseline_says_so() {
        let rows = vec![sized("a", 10, 0.9)];
        assert!(teacher(&rows).is_none());
        let md = section(&rows);
        assert!(md.contains("no `baseline`/`teacher_float32` row"), "{md}");
        assert!(!md.contains('|'), "no table without a teacher: {md}");
    }

    #[test]
    fn the_pareto_front_keeps_rows_nothing_beats() {
        let rows = vec![
            sized("big_best", 1000, 0.99),
            sized("big_worse", 1000, 0.98), // same size, less accurate: beaten
            sized("mid", 250, 0.985),
            sized("mid_twin", 250, 0.985), // a tie: neither beats the other
            sized("mid_larger", 300, 0.985), // as accurate, larger: beaten
            sized("small", 20, 0.97),
            sized("small_bad", 30, 0.5), // beaten by small
            sized("tiny_bad", 10, 0.4),  // the smallest: nothing beats it
        ];
        let mut no_size = sized("no_size", 0, 1.0);
        no_size.size_bytes = None;
        let mut rows = rows;
        rows.push(no_size);
        assert_eq!(
            names(&pareto_front(&rows)),
            ["big_best", "mid", "mid_twin", "small", "tiny_bad"]
        );
        assert!(pareto_front(&[]).is_empty());
        assert_eq!(names(&pareto_front(&[sized("only", 5, 0.1)])), ["only"]);
    }
}
