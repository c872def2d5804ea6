//! The `precision` stage's section: every policy against float32, the loss-scale traces and
//! the gradient-underflow audit, all read from the stage's rows.

use std::fmt::Write as _;

use super::percent;
use crate::report::Row;
use crate::stage::Stage;
use crate::variant::PrecisionRun;
use models::Policy;

/// A mixed policy counts as accurate when its test accuracy is at most this many
/// percentage points below float32's (meaningful for full runs only).
pub const ACCURACY_TOLERANCE_PP: f64 = 0.2;
/// Scale-trace points shown in report.md (the JSON has them all).
const TRACE_ROWS: usize = 12;
/// The reference run every policy is compared with.
const FLOAT32: PrecisionRun = PrecisionRun::Teacher(Policy::Float32);
const DEMO: PrecisionRun = PrecisionRun::Float16Demo;

/// The section of `rows` (the stage's), trained on `device` (`quick`: a smoke test).
pub fn section(rows: &[Row], device: &str, quick: bool) -> String {
    let mut md = String::new();
    let is = |row: &Row, run| row.is(Stage::Precision, run);
    let _ = writeln!(
        md,
        "Mixed precision against float32 on {device} (same seed, data order and recipe):\n"
    );
    let _ = writeln!(
        md,
        "| policy | test accuracy | difference | train samples/s | train speed-up | infer samples/s | infer speed-up |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for row in rows.iter().filter(|r| !is(r, DEMO)) {
        let against = row
            .detail
            .training()
            .and_then(|t| t.against_float32.clone())
            .unwrap_or_default();
        let number = |value: Option<f64>, show: &dyn Fn(f64) -> String| {
            value.map_or_else(|| "-".into(), show)
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {} | {:.0} | {} |",
            row.variant,
            percent(row.test_accuracy),
            number(against.accuracy_difference_pp, &|v| format!("{v:+.2} pp")),
            row.train_samples_per_second.unwrap_or(f64::NAN),
            number(against.train_speedup, &|v| format!("{v:.2}x")),
            row.infer_samples_per_second.unwrap_or(f64::NAN),
            number(against.infer_speedup, &|v| format!("{v:.2}x")),
        );
    }
    md.push('\n');
    for row in rows.iter().filter(|r| !is(r, FLOAT32) && !is(r, DEMO)) {
        let against = row
            .detail
            .training()
            .and_then(|t| t.against_float32.as_ref());
        let (Some(speedup), Some(difference)) = (
            against.and_then(|a| a.train_speedup),
            against.and_then(|a| a.accuracy_difference_pp),
        ) else {
            continue;
        };
        let verdict = if difference >= -ACCURACY_TOLERANCE_PP {
            "within"
        } else {
            "outside"
        };
        let _ = writeln!(
            md,
            "- {}: trains {speedup:.2}x as fast as float32; test accuracy {difference:+.2} \
             percentage points, {verdict} the {ACCURACY_TOLERANCE_PP}-point tolerance{}.",
            row.variant,
            if quick {
                " (quick mode: accuracy not meaningful)"
            } else {
                ""
            }
        );
    }
    if !rows.iter().any(|r| is(r, FLOAT32)) {
        let _ = writeln!(md, "- no float32 row to compare with.");
    }
    traces(&mut md, rows);
    audit(&mut md, rows);
    md
}

/// Every loss scaler's trace: the rows that trained with one.
fn traces(md: &mut String, rows: &[Row]) {
    for row in rows {
        let (Some(scaling), Some(training)) = (row.detail.scaling(), row.detail.training()) else {
            continue;
        };
        let note = match &training.note {
            Some(note) => format!(", {}: {note}", row.model),
            None => String::new(),
        };
        let _ = writeln!(
            md,
            "\nLoss-scale trace of {}{note} ({} of {} steps skipped; \
             from step `step` on the scale was `scale`):\n",
            row.variant, scaling.skipped_steps, training.train_steps,
        );
        let _ = writeln!(md, "| step | scale |\n|---:|---:|");
        for point in scaling.history.iter().take(TRACE_ROWS) {
            let _ = writeln!(md, "| {} | {} |", point.step, point.scale);
        }
        if scaling.history.len() > TRACE_ROWS {
            let _ = writeln!(
                md,
                "| ... | {} more in report.json |",
                scaling.history.len() - TRACE_ROWS
            );
        }
    }
}

/// The float32 run's gradient-underflow audit, kept with the stage's first row.
fn audit(md: &mut String, rows: &[Row]) {
    let Some(audit) = rows
        .first()
        .and_then(|r| r.detail.training())
        .and_then(|t| t.gradient_audit.as_ref())
    else {
        return;
    };
    let _ = writeln!(
        md,
        "\nGradient-underflow audit: the float32 gradients of {} steps spread over the \
         teacher's float32 run, cast to float16 after multiplication by each loss scale:\n",
        audit.steps
    );
    let _ = write!(md, "{}", audit.audit);
}
