//! `report.json` and `report.md`, with the report's charts.
//!
//! `report.md` holds, in order: the run's header, the results table, every row against the
//! float32 teacher ([`teacher`]), the charts ([`figures`], drawn into `plots/` whenever the
//! report is written, so that a partial run has them too), the stages' own sections and the
//! stages' outcomes.

pub mod detail;
mod figures;
pub mod sections;
mod teacher;

use indexmap::IndexMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::stage::Stage;

pub use detail::Detail;

/// What a `--quick` run is, said wherever its numbers appear.
pub const SMOKE_TEST: &str = "Smoke test (`--quick`): small subsets and few steps check that \
    every stage runs end to end; the accuracies below are not results, and a technique's \
    effect may even show with the wrong sign.";

/// Version of the `report.json` layout.
pub const SCHEMA_VERSION: u32 = 2;

/// The whole report of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub started: String,
    pub device: String,
    pub device_name: String,
    pub threads: usize,
    pub quick: bool,
    pub seed: u64,
    pub git_commit: Option<String>,
    /// The run-wide command-line options that differ from the defaults (each stage's own are
    /// in its outcome).
    #[serde(default)]
    pub options: Vec<String>,
    /// Stage name -> outcome, in the order they ran.
    pub stages: IndexMap<String, StageOutcome>,
    pub rows: Vec<Row>,
}

/// How one stage went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageOutcome {
    /// `"ok"` or `"failed"`.
    pub status: String,
    pub seconds: f64,
    pub error: Option<String>,
    /// What the stage's results depend on, hashed (see `resume`): `--resume` keeps a
    /// completed stage whose key is unchanged.
    #[serde(default)]
    pub config_hash: Option<String>,
    /// Kept from an earlier invocation by `--resume` (`seconds` is that run's).
    #[serde(default)]
    pub resumed: bool,
    /// The stage's own part of report.md (a comparison, a trace, an audit, its charts):
    /// what a table row cannot show.
    #[serde(default)]
    pub section: Option<String>,
    /// The stage's settings (`crate::settings`), as hashed into `config_hash`.
    #[serde(default)]
    pub settings: serde_json::Value,
    /// The command-line options that gave these settings rather than the defaults, e.g.
    /// `["--temperature", "4.0"]`: what `cargo xtask results` prints as the run's command.
    #[serde(default)]
    pub options: Vec<String>,
}

/// One trained or converted model. Fields that do not apply are `null`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Row {
    pub stage: String,
    pub variant: String,
    pub model: String,
    pub params: Option<usize>,
    pub nonzero_params: Option<usize>,
    /// Accuracy on the full test set, 0..1.
    pub test_accuracy: Option<f64>,
    /// Size of the artifact file.
    pub size_bytes: Option<u64>,
    /// Size of the artifact gzipped at level 9.
    pub gzip_bytes: Option<u64>,
    pub train_seconds: Option<f64>,
    pub train_samples_per_second: Option<f64>,
    /// Inference throughput at batch 256.
    pub infer_samples_per_second: Option<f64>,
    /// What ran the inference.
    pub engine: Option<String>,
    /// Artifact path relative to the report.
    pub artifact: Option<String>,
    /// The training curve: `(step, mean loss of the steps since the previous point)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loss_curve: Vec<(usize, f64)>,
    /// What the row's stage measured besides.
    #[serde(default)]
    pub detail: Detail,
}

impl Row {
    /// Whether this is `stage`'s row of `variant`.
    pub fn is(&self, stage: Stage, variant: impl std::fmt::Display) -> bool {
        self.stage == stage.name() && self.variant == variant.to_string()
    }
}

/// What a stage returns: its rows, and its own part of report.md.
#[derive(Debug, Default)]
pub struct StageReport {
    pub rows: Vec<Row>,
    pub section: Option<String>,
}

impl Report {
    /// Writes `report.json`, the report's charts (into `plots/`) and `report.md` into `dir`,
    /// each file atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).context("serialising the report")?;
        crate::fsutil::write_atomic(&dir.join("report.json"), json.as_bytes())?;
        let plots = figures::section(self, dir);
        crate::fsutil::write_atomic(&dir.join("report.md"), self.markdown(&plots).as_bytes())
    }

    /// Takes `stage`'s outcome and rows from `previous`, marked as kept by `--resume`.
    pub fn keep(&mut self, previous: &Report, stage: crate::stage::Stage) {
        let name = stage.name();
        if let Some(outcome) = previous.stages.get(name) {
            let mut outcome = outcome.clone();
            outcome.resumed = true;
            self.stages.insert(name.into(), outcome);
        }
        let rows = previous.rows.iter().filter(|r| r.stage == name).cloned();
        self.rows.extend(rows);
    }

    /// The report as a Markdown document, with `plots` (Markdown showing the charts) as its
    /// "Plots" section; no such section when it is empty.
    pub fn markdown(&self, plots: &str) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Experiment report\n");
        let _ = writeln!(
            md,
            "- started: {}\n- device: {} ({}), {} threads\n- seed: {}{}\n- commit: {}\n",
            self.started,
            self.device,
            self.device_name,
            self.threads,
            self.seed,
            if self.quick {
                " (quick mode: small subsets, accuracy not meaningful)"
            } else {
                ""
            },
            self.git_commit.as_deref().unwrap_or("unknown"),
        );
        let _ = writeln!(md, "## Results\n");
        if self.quick {
            let _ = writeln!(md, "{SMOKE_TEST}\n");
        }
        md.push_str(&self.results_table());
        let _ = writeln!(md, "\n## Against the teacher\n");
        md.push_str(&teacher::section(&self.rows));
        if !plots.trim().is_empty() {
            let _ = writeln!(md, "\n## Plots\n\n{}", plots.trim_end());
        }
        for (name, outcome) in &self.stages {
            if let Some(section) = &outcome.section {
                let _ = writeln!(md, "\n## Stage {name}\n\n{}", section.trim_end());
            }
        }
        let _ = writeln!(md, "\n## Stages\n");
        let _ = writeln!(
            md,
            "| stage | status | seconds | error |\n|---|---|---:|---|"
        );
        for (name, outcome) in &self.stages {
            let _ = writeln!(
                md,
                "| {name} | {} | {:.1} | {} |",
                outcome.status,
                outcome.seconds,
                outcome
                    .error
                    .as_deref()
                    .unwrap_or("")
                    .replace('|', "\\|")
                    .replace('\n', " ")
            );
        }
        md
    }

    /// The rows as a Markdown table (also used for the README's results section).
    pub fn results_table(&self) -> String {
        let mut md = String::from(
            "| stage | variant | model | params | nonzero | test accuracy | size | gzip | train s | train samples/s | infer samples/s | engine |\n\
             |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for row in &self.rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.stage,
                row.variant,
                row.model,
                opt(row.params, |v| v.to_string()),
                opt(row.nonzero_params, |v| v.to_string()),
                opt(row.test_accuracy, |v| format!("{:.2}%", v * 100.0)),
                opt(row.size_bytes, human_bytes),
                opt(row.gzip_bytes, human_bytes),
                opt(row.train_seconds, |v| format!("{v:.1}")),
                opt(row.train_samples_per_second, |v| format!("{v:.0}")),
                opt(row.infer_samples_per_second, |v| format!("{v:.0}")),
                row.engine.as_deref().unwrap_or("-"),
            );
        }
        md
    }
}

pub(crate) fn opt<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or_else(|| "-".into(), show)
}

pub(crate) fn human_bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b < KIB {
        format!("{bytes} B")
    } else if b < KIB * KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{:.2} MiB", b / (KIB * KIB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report {
            schema_version: SCHEMA_VERSION,
            started: "2026-01-01T00:00:00Z".into(),
            device: "cpu".into(),
            device_name: "test cpu".into(),
            threads: 2,
            quick: true,
            seed: 7,
            git_commit: None,
            options: Vec::new(),
            stages: IndexMap::from([(
                "baseline".into(),
                StageOutcome {
                    status: "ok".into(),
                    seconds: 1.5,
                    error: None,
                    config_hash: None,
                    resumed: false,
                    section: None,
                    settings: serde_json::json!({}),
                    options: Vec::new(),
                },
            )]),
            rows: vec![Row {
                stage: "baseline".into(),
                variant: "teacher_float32".into(),
                model: "teacher_cnn".into(),
                params: Some(10),
                test_accuracy: Some(0.5),
                size_bytes: Some(2048),
                ..Row::default()
            }],
        }
    }

    #[test]
    fn missing_fields_serialise_as_null_and_details_round_trip() {
        let mut report = sample();
        report.rows[0].detail = Detail::Training(detail::TrainingDetail {
            policy: "float32".into(),
            train_steps: 3,
            ..Default::default()
        });
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        let row = &json["rows"][0];
        assert!(row["gzip_bytes"].is_null());
        assert_eq!(row["detail"]["kind"], "training");
        assert_eq!(row["detail"]["train_steps"], 3);
        assert_eq!(json["schema_version"], SCHEMA_VERSION);
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back.rows[0].detail, report.rows[0].detail);
        assert_eq!(back.rows[0].detail.train_steps(), Some(3));
    }

    /// `--resume` reads a report back from its text: layer-keyed maps inside a tagged
    /// detail included.
    #[test]
    fn a_calibrated_row_reads_back_from_json_text() {
        let mut report = sample();
        report.rows[0].detail = Detail::Quantization(detail::QuantizationDetail {
            calibration: Some(detail::Calibration {
                calibrator: crate::settings::Calibrator::Percentile,
                percentile: Some(99.99),
                selected: true,
                images: 10,
                input_ranges: [(0, (-1.0, 2.5)), (11, (0.0, 20.75))].into(),
            }),
            ..Default::default()
        });
        let text = serde_json::to_string_pretty(&report).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back.rows[0].detail, report.rows[0].detail);
        let bad = text.replace("\"11\"", "\"eleven\"");
        let error = serde_json::from_str::<Report>(&bad)
            .unwrap_err()
            .to_string();
        assert!(error.contains("`eleven` is not a layer index"), "{error}");
    }

    #[test]
    fn markdown_shows_rows_and_stages() {
        let md = sample().markdown("");
        assert!(
            md.contains("| baseline | teacher_float32 | teacher_cnn | 10 | - | 50.00% | 2.0 KiB |"),
            "{md}"
        );
        assert!(md.contains("| baseline | ok | 1.5 |"), "{md}");
        assert!(md.contains("quick mode") && md.contains(SMOKE_TEST));
    }

    /// A run with a teacher, runtime rows, a training curve and a loss-scale trace.
    fn full() -> Report {
        let measured =
            |stage: &str, variant: &str, model: &str, engine: &str, acc, size, speed| Row {
                stage: stage.into(),
                variant: variant.into(),
                model: model.into(),
                test_accuracy: Some(acc),
                size_bytes: size,
                infer_samples_per_second: Some(speed),
                engine: Some(engine.into()),
                ..Row::default()
            };
        let mut teacher = measured(
            "baseline",
            "teacher_float32",
            "teacher_cnn",
            "libtorch",
            0.9926,
            Some(901_672),
            5000.0,
        );
        teacher.loss_curve = vec![(0, 2.3), (100, 0.4), (200, 0.08)];
        let mut mixed = measured(
            "precision",
            "mixed_float16",
            "teacher_cnn",
            "libtorch",
            0.9911,
            None,
            7500.0,
        );
        mixed.detail = Detail::Training(detail::TrainingDetail {
            policy: "mixed_float16".into(),
            train_steps: 200,
            scaling: Some(detail::Scaling {
                config: loss_scaling::LossScaleConfig::Dynamic(loss_scaling::DynamicConfig::keras()),
                skipped_steps: 1,
                final_loss_scale: Some(32768.0),
                history: serde_json::from_value(serde_json::json!(
                    [{"step": 0, "scale": 65536.0}, {"step": 7, "scale": 32768.0}]
                ))
                .unwrap(),
            }),
            ..Default::default()
        });
        let mut report = sample();
        report.rows = vec![
            teacher,
            mixed,
            measured(
                "quantization",
                "float32",
                "teacher_cnn",
                "tch-mot runtime",
                0.9926,
                Some(901_672),
                6000.0,
            ),
            measured(
                "quantization",
                "dynamic_int8",
                "teacher_cnn",
                "tch-mot runtime",
                0.9924,
                Some(229_162),
                9000.0,
            ),
            measured(
                "quantization",
                "static_int8_entropy",
                "teacher_cnn",
                "tch-mot runtime",
                0.9878,
                Some(229_378),
                5500.0,
            ),
            measured(
                "pipeline",
                "distilled_pruned_int8",
                "compact_cnn",
                "tch-mot runtime",
                0.9871,
                Some(18_034),
                30_000.0,
            ),
        ];
        report
    }

    #[test]
    fn the_teacher_table_holds_every_rows_deltas() {
        let md = full().markdown("");
        let teacher = md.find("## Against the teacher").expect(&md);
        assert!(
            teacher > md.find("## Results").unwrap() && teacher < md.find("## Stages").unwrap()
        );
        for line in [
            // accuracy pp, size, size ratio, speed ratio, reference
            "| baseline | teacher_float32 | teacher_cnn | 99.26% | +0.00 | 880.5 KiB | 1.0x | 1.00x | baseline/teacher_float32 (libtorch) |",
            "| precision | mixed_float16 | teacher_cnn | 99.11% | -0.15 | - | - | 1.50x | baseline/teacher_float32 (libtorch) |",
            "| quantization | dynamic_int8 | teacher_cnn | 99.24% | -0.02 | 223.8 KiB | 3.9x smaller | 1.50x | quantization/float32 (tch-mot runtime) |",
            // 901672 / 18034 = 50.0; 30000 / 6000 = 5.
            "| pipeline | distilled_pruned_int8 | compact_cnn | 98.71% | -0.55 | 17.6 KiB | 50.0x smaller | 5.00x | quantization/float32 (tch-mot runtime) |",
        ] {
            assert!(md.contains(line), "missing {line}\n{md}");
        }
    }

    #[test]
    fn a_report_without_a_baseline_row_still_renders() {
        let mut report = full();
        report.rows.remove(0);
        let dir = tempfile::tempdir().unwrap();
        report.write(dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("no `baseline`/`teacher_float32` row"), "{md}");
        assert!(!md.contains("vs teacher (pp)"), "{md}");
        assert!(md.contains("| pipeline | distilled_pruned_int8 |"), "{md}");
        assert!(md.contains("## Plots"), "{md}");
    }

    #[test]
    fn charts_are_written_and_linked() {
        let dir = tempfile::tempdir().unwrap();
        let plots = dir.path().join("plots");
        std::fs::create_dir(&plots).unwrap();
        // A chart a stage drew is linked; one it did not draw is not.
        std::fs::write(plots.join("pruning_schedule.svg"), "<svg/>").unwrap();
        full().write(dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        for file in [
            "accuracy_size.svg",
            "training_baseline.svg",
            "precision_loss_scale.svg",
            "pruning_schedule.svg",
        ] {
            assert!(plots.join(file).is_file(), "{file} not written");
            assert!(
                md.contains(&format!("](plots/{file})")),
                "{file} not linked: {md}"
            );
        }
        assert!(!md.contains("distillation_temperature.svg"), "{md}");
        assert!(
            !plots.join("training_precision.svg").exists(),
            "no curve, no chart"
        );
        let section = &md[md.find("## Plots").unwrap()..md.find("## Stages").unwrap()];
        // The Pareto front is listed under its chart: the pipeline's student is the smallest,
        // the float32 teacher rows the most accurate.
        assert!(
            section.contains("- pipeline/distilled_pruned_int8 (compact_cnn): 17.6 KiB, 98.71%\n"),
            "{section}"
        );
        for on_front in [
            "- baseline/teacher_float32 (",
            "- quantization/float32 (",
            "- quantization/dynamic_int8 (",
        ] {
            assert!(section.contains(on_front), "{on_front}: {section}");
        }
        assert!(
            !section.contains("static_int8_entropy ("),
            "dominated: {section}"
        );
        let svg = std::fs::read_to_string(plots.join("accuracy_size.svg")).unwrap();
        for text in [
            "Pareto front",
            "artifact size (KiB, log scale)",
            "baseline",
            "pipeline",
        ] {
            assert!(svg.contains(text), "{text} missing from the chart");
        }
        // Nothing but the charts in plots/: every write was atomic.
        let mut names: Vec<_> = std::fs::read_dir(&plots)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "accuracy_size.svg",
                "precision_loss_scale.svg",
                "pruning_schedule.svg",
                "training_baseline.svg"
            ]
        );
    }

    #[test]
    fn a_stages_section_follows_the_table_under_its_stage() {
        let mut report = sample();
        report.stages["baseline"].section =
            Some("| step | scale |\n|---:|---:|\n| 0 | 65536 |\n".into());
        let md = report.markdown("");
        let section = md.find("## Stage baseline\n\n| step | scale |").expect(&md);
        assert!(section > md.find("## Results").unwrap(), "{md}");
        assert!(section < md.find("## Stages").unwrap(), "{md}");
        // Rows without one add nothing.
        assert!(!sample().markdown("").contains("## Stage baseline"));
    }
}
