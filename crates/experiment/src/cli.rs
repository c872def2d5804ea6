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

    /// Output folder [default: results/<timestamp>, with results/latest pointing at it].
    #[arg(long)]
    pub out: Option<PathBuf>,

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
}
