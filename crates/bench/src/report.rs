//! The shared bench JSON shape.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Version of the bench JSON layout.
pub const SCHEMA_VERSION: u32 = 1;

/// One suite's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub schema_version: u32,
    pub suite: String,
    /// Processor (or GPU) and core count the numbers come from.
    pub machine: String,
    pub date: String,
    pub results: Vec<CaseResult>,
    /// A suite's own tables, printed after the run in place of [`BenchReport::table`]; the
    /// JSON holds the same numbers.
    #[serde(skip)]
    pub summary: Option<String>,
}

/// One case: our engine against the peer on the same work.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    pub case: String,
    pub ours: Measurement,
    pub peer: Measurement,
    /// `ours.samples_per_second / peer.samples_per_second`: above 1 means we are faster.
    pub ratio: f64,
    /// Accuracies and spreads, for suites that measure them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<CaseDetail>,
}

/// What a case measured besides the medians: accuracy of each side on the same test set
/// and the range of each side's throughput over the repeats.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseDetail {
    /// Test accuracy of ours, as a fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ours_accuracy: Option<f64>,
    /// Test accuracy of the peer, as a fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_accuracy: Option<f64>,
    /// Lowest and highest samples per second of ours over the repeats.
    pub ours_range: [f64; 2],
    /// Lowest and highest samples per second of the peer over the repeats.
    pub peer_range: [f64; 2],
    pub repeats: usize,
}

/// A throughput measurement (the median over repeats).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub engine: String,
    pub samples_per_second: f64,
}

impl CaseResult {
    pub fn new(case: impl Into<String>, ours: Measurement, peer: Measurement) -> Self {
        let ratio = ours.samples_per_second / peer.samples_per_second;
        Self {
            case: case.into(),
            ours,
            peer,
            ratio,
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: CaseDetail) -> Self {
        self.detail = Some(detail);
        self
    }
}

impl BenchReport {
    pub fn new(suite: &str, machine: String, results: Vec<CaseResult>) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            suite: suite.into(),
            machine,
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            results,
            summary: None,
        }
    }

    /// Writes the JSON atomically ([`atomic_file::write`]).
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        Ok(atomic_file::write(path, json)?)
    }

    /// The results as a Markdown table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} ({}, {})\n\n| case | ours | samples/s | peer | samples/s | ratio |\n|---|---|---:|---|---:|---:|\n",
            self.suite, self.machine, self.date
        );
        for r in &self.results {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {} | {:.0} | {:.2}x |",
                r.case,
                r.ours.engine,
                r.ours.samples_per_second,
                r.peer.engine,
                r.peer.samples_per_second,
                r.ratio
            );
        }
        out
    }
}

/// The median of some measurements (NaN-free input expected; empty gives NaN).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn ratio_is_ours_over_peer_and_json_has_the_shared_shape() {
        let case = CaseResult::new(
            "mlp",
            Measurement {
                engine: "ours".into(),
                samples_per_second: 300.0,
            },
            Measurement {
                engine: "pytorch".into(),
                samples_per_second: 200.0,
            },
        );
        assert!((case.ratio - 1.5).abs() < 1e-12);
        let report = BenchReport::new("precision", "test".into(), vec![case]);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["schema_version"], 1);
        assert_eq!(json["suite"], "precision");
        assert_eq!(json["results"][0]["peer"]["engine"], "pytorch");
        assert!(
            report
                .table()
                .contains("| mlp | ours | 300 | pytorch | 200 | 1.50x |")
        );
    }
}
