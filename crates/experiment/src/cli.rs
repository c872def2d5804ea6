//! Command-line options.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::stages::Stage;

/// Every technique of the toolkit, measured end to end on MNIST.
///
/// Trains and converts models stage by stage and writes `report.json`, `report.md`
/// and the model artifacts to the output folder.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// Small subsets and few steps: checks that everything runs, in seconds
    /// (accuracy is not meaningful).
    #[arg(long)]
    pub quick: bool,

    /// Where to train and run the models; `auto` picks CUDA when it is usable.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,

    /// Seed for weight initialisation, data order and subsets.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Output folder [default: results/<timestamp>, with results/latest pointing at it;
    /// with --resume, results/latest].
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Continue the run in the output folder: stages its report shows as completed with the
    /// same settings (and inputs) are kept, the others run.
    #[arg(long)]
    pub resume: bool,

    /// Comma-separated stages to run, in order.
    #[arg(long, value_delimiter = ',', default_values_t = Stage::all())]
    pub stages: Vec<Stage>,

    /// Folder with the four MNIST-layout IDX files (gzip), checked against its
    /// SHA256SUMS when present [default: the bundled MNIST].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// LibTorch intra-op threads [default: LibTorch's choice, one per core].
    #[arg(long)]
    pub threads: Option<usize>,

    /// No progress output; errors and the final summary only.
    #[arg(long, short)]
    pub quiet: bool,

    /// The activation calibrator of full-integer quantization to select: the quantization
    /// stage measures all four and marks this one as selected in the report.
    #[arg(long, value_enum, default_value_t = Calibrator::Percentile)]
    pub calibrator: Calibrator,

    /// The percentile calibrator's percentile, in (0, 100].
    #[arg(long, default_value_t = 99.99, value_parser = parse_percentile)]
    pub percentile: f64,

    /// The pipeline stage's pruning target: the share of the student's weights that are
    /// zero, in [0, 1).
    #[arg(long, default_value_t = 0.82, value_parser = parse_sparsity)]
    pub sparsity: f64,
}

/// The `--calibrator` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Calibrator {
    /// The observed minimum and maximum.
    Minmax,
    /// The `--percentile` of the values on each side (outliers clipped).
    Percentile,
    /// The clipping threshold that minimises the KL divergence of the histograms (TensorRT).
    Entropy,
    /// The clipping threshold that minimises the mean squared quantization error.
    Mse,
}

impl Calibrator {
    /// Every calibrator, in report order.
    pub fn all() -> [Self; 4] {
        [Self::Minmax, Self::Percentile, Self::Entropy, Self::Mse]
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Minmax => "minmax",
            Self::Percentile => "percentile",
            Self::Entropy => "entropy",
            Self::Mse => "mse",
        }
    }

    pub fn method(self, percentile: f64) -> quantization::Method {
        match self {
            Self::Minmax => quantization::Method::MinMax,
            Self::Percentile => quantization::Method::Percentile(percentile),
            Self::Entropy => quantization::Method::Entropy,
            Self::Mse => quantization::Method::Mse,
        }
    }
}

fn parse_percentile(value: &str) -> Result<f64, String> {
    let p: f64 = value
        .parse()
        .map_err(|_| format!("`{value}` is not a number"))?;
    quantization::Method::Percentile(p)
        .validate()
        .map_err(|e| e.to_string())?;
    Ok(p)
}

fn parse_sparsity(value: &str) -> Result<f64, String> {
    let s: f64 = value
        .parse()
        .map_err(|_| format!("`{value}` is not a number"))?;
    pruning::Sparsity::new(s).map_err(|e| e.to_string())?;
    Ok(s)
}

/// The `--device` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when available, otherwise the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA device; an error when there is none.
    Cuda,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_every_stage_on_auto() {
        let args = Args::try_parse_from(["experiment"]).unwrap();
        assert_eq!(args.device, DeviceChoice::Auto);
        assert_eq!(args.stages, Stage::all());
        assert!(!args.quick);
    }

    #[test]
    fn unknown_stage_and_device_are_rejected() {
        let err = Args::try_parse_from(["experiment", "--stages", "baseline,nope"]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(Args::try_parse_from(["experiment", "--device", "tpu"]).is_err());
    }

    #[test]
    fn calibrator_and_percentile_are_checked() {
        let args = Args::try_parse_from(["experiment"]).unwrap();
        assert_eq!(
            args.calibrator.method(args.percentile),
            quantization::Method::Percentile(99.99)
        );
        let args = Args::try_parse_from(["experiment", "--calibrator", "mse"]).unwrap();
        assert_eq!(
            args.calibrator.method(args.percentile),
            quantization::Method::Mse
        );
        for bad in ["0", "100.5", "-3", "nan", "x"] {
            let flag = format!("--percentile={bad}");
            let err = Args::try_parse_from(["experiment", flag.as_str()]).unwrap_err();
            assert!(err.to_string().contains("percentile"), "{bad}: {err}");
        }
        assert!(Args::try_parse_from(["experiment", "--calibrator", "kl"]).is_err());
    }
}
