//! The `distillation` stage's section: the temperature sweep of the first seed, when it ran.

use crate::charts::Figure;
use crate::report::Row;
use crate::report::detail::{Detail, DistillationDetail};
use crate::stage::Stage;
use crate::variant::Student;

use super::{Chart, Section};

/// Accuracy against temperature.
pub const TEMPERATURE: Chart = Chart {
    file: "distillation_temperature.svg",
    title: "Distilled student: test accuracy against temperature",
    caption: "The distilled student's test accuracy against the distillation temperature, \
              with the student trained from scratch for reference.",
};

/// The section of the stage's rows; `None` when the sweep did not run (`--quick`).
pub fn section(rows: &[Row]) -> Option<Section> {
    let detail = |student| match &rows
        .iter()
        .find(|r| r.is(Stage::Distillation, student))?
        .detail
    {
        Detail::Distillation(detail) => Some(detail),
        _ => None,
    };
    let distilled: &DistillationDetail = detail(Student::Distilled)?;
    let settings = distilled.distilled.as_ref()?;
    let sweep = &settings.temperature_sweep;
    let (&(lo, _), &(hi, _)) = (sweep.first()?, sweep.last()?);
    // The scratch student of the sweep's seed, for reference across the axis.
    let scratch = *detail(Student::Scratch)?.per_seed_accuracy.first()? * 100.0;
    let seed = distilled.seeds.first()?;
    let points = sweep.iter().map(|&(t, a)| (t, a * 100.0)).collect();
    let figure = Figure::lines(
        TEMPERATURE.file,
        TEMPERATURE.title,
        "temperature T",
        "test accuracy (%)",
        vec![
            plots::Series::new("distilled", points),
            plots::Series::new("from scratch", vec![(lo, scratch), (hi, scratch)]),
        ],
    );
    Some(Section {
        markdown: format!(
            "Temperature sweep on seed {seed} (alpha {}):\n",
            settings.alpha
        ),
        figures: vec![figure],
    })
}
