//! Command-line options.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::architecture::TeacherChoice;
use crate::settings::{
    Calibrator, DistillationSettings, PipelineSettings, PrecisionSettings, QuantizationSettings,
    Settings,
};
use crate::stage::Stage;

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

    /// Seed for weight initialisation, data order and subsets, in 0..=2^63-1.
    #[arg(long, default_value_t = 42, value_parser = parse_seed, allow_negative_numbers = true)]
    pub seed: u64,

    /// Output folder [default: results/<timestamp>, with results/latest pointing at it;
    /// with --resume, results/latest].
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Continue the run in the output folder: stages its report shows as completed with the
    /// same settings (and inputs) are kept, the others run.
    #[arg(long)]
    pub resume: bool,

    /// The teacher every technique starts from: the sequential CNN, or a graph (a residual
    /// network, or depthwise-separable blocks).
    #[arg(long, value_enum, default_value_t = TeacherChoice::Cnn)]
    pub teacher: TeacherChoice,

    /// Comma-separated stages to run, in order.
    #[arg(long, value_delimiter = ',', default_values_t = Stage::all())]
    pub stages: Vec<Stage>,

    /// Folder with the four MNIST-layout IDX files (gzip), checked against its
    /// SHA256SUMS when present [default: $TCH_MOT_MNIST_DIR, else datasets/mnist under the
    /// current folder].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// LibTorch intra-op threads, at least 1 [default: LibTorch's choice, one per core].
    #[arg(long, value_parser = parse_threads, allow_negative_numbers = true)]
    pub threads: Option<usize>,

    /// No progress output; errors and the final summary only.
    #[arg(long, short)]
    pub quiet: bool,

    /// The activation calibrator of full-integer quantization to select: the quantization
    /// stage measures all four and marks this one as selected in the report.
    #[arg(long, value_enum, default_value_t = Calibrator::Percentile)]
    pub calibrator: Calibrator,

    /// The percentile calibrator's percentile, in (0, 100].
    #[arg(
        long,
        default_value_t = 99.99,
        value_parser = parse_percentile,
        allow_negative_numbers = true,
    )]
    pub percentile: f64,

    /// The pipeline stage's pruning target: the share of the student's weights that are
    /// zero, in [0, 1).
    #[arg(long, default_value_t = 0.82, value_parser = parse_sparsity)]
    pub sparsity: f64,

    /// The pipeline stage's pruning- and cluster-preserving QAT (PCQAT): the shared values
    /// per weight tensor of the pruned student, reported beside the plain QAT; 0 leaves it
    /// out, else 2..=256.
    #[arg(long, default_value_t = 16, value_parser = parse_clusters)]
    pub pcqat_clusters: usize,

    /// The distillation temperature of the distillation stage's distilled student and of
    /// the pipeline's (the temperature sweep tries its own), positive and finite.
    #[arg(
        long,
        value_name = "T",
        default_value = "10",
        value_parser = parse_temperature,
        allow_negative_numbers = true,
    )]
    pub temperature: distillation::Temperature,

    /// The weight of the distilled students' hard-label loss (distillation and pipeline
    /// stages), in [0, 1]; the distillation loss gets 1 - alpha.
    #[arg(
        long,
        value_name = "A",
        default_value = "0.1",
        value_parser = parse_alpha,
        allow_negative_numbers = true,
    )]
    pub alpha: distillation::Alpha,

    /// The starting scale of the dynamic loss scaler of the mixed_float16 run (CUDA only),
    /// finite and at least 1 (Keras's preset otherwise: doubled after 2000 finite steps,
    /// halved after an overflow, never below 1).
    #[arg(
        long,
        value_name = "S",
        default_value = "32768",
        value_parser = parse_initial_loss_scale,
        allow_negative_numbers = true,
    )]
    pub initial_loss_scale: f32,
}

impl Args {
    /// Each stage's settings, as these options give them.
    pub fn settings(&self) -> Settings {
        Settings {
            precision: PrecisionSettings {
                initial_loss_scale: self.initial_loss_scale,
            },
            distillation: DistillationSettings {
                temperature: self.temperature,
                alpha: self.alpha,
            },
            quantization: QuantizationSettings {
                calibrator: self.calibrator,
                percentile: self.percentile,
            },
            pipeline: PipelineSettings {
                sparsity: self.sparsity,
                pcqat_clusters: self.pcqat_clusters,
                temperature: self.temperature,
                alpha: self.alpha,
            },
        }
    }

    /// The run-wide options that differ from the defaults (`--quick`, `--stages`, `--seed`,
    /// `--teacher`),
    /// as command-line arguments; each stage's own are [`Settings::options`].
    pub fn run_options(&self) -> Vec<String> {
        let Ok(defaults) = Self::try_parse_from(["experiment"]) else {
            return Vec::new();
        };
        let mut options = Vec::new();
        if self.quick {
            options.push("--quick".to_string());
        }
        if self.stages != defaults.stages {
            let names: Vec<&str> = self.stages.iter().map(|s| s.name()).collect();
            options.extend(["--stages".to_string(), names.join(",")]);
        }
        if self.seed != defaults.seed {
            options.extend(["--seed".to_string(), self.seed.to_string()]);
        }
        if self.teacher != defaults.teacher {
            options.extend(["--teacher".to_string(), self.teacher.name().to_string()]);
        }
        options
    }

    /// The settings of a command line without options: the defaults.
    pub fn default_settings() -> Settings {
        // Every option has a default or is optional, so no arguments parse.
        Self::try_parse_from(["experiment"])
            .map(|args| args.settings())
            .unwrap_or_else(|e| unreachable!("the options without arguments: {e}"))
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

fn parse_clusters(value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|&k| k == 0 || (2..=runtime::MAX_PALETTE_CLUSTERS).contains(&k))
        .ok_or_else(|| {
            format!(
                "`{value}` is not 0 or a whole number in 2..={}",
                runtime::MAX_PALETTE_CLUSTERS
            )
        })
}

fn parse_seed(value: &str) -> Result<u64, String> {
    // LibTorch takes an i64 seed: larger values would wrap around.
    value
        .parse::<u64>()
        .ok()
        .filter(|&seed| i64::try_from(seed).is_ok())
        .ok_or_else(|| format!("`{value}` is not a whole number in 0..={}", i64::MAX))
}

fn parse_threads(value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|&n| n >= 1 && i32::try_from(n).is_ok())
        .ok_or_else(|| format!("`{value}` is not a whole number in 1..={}", i32::MAX))
}

fn parse_number<T: std::str::FromStr>(value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("`{value}` is not a number"))
}

fn parse_temperature(value: &str) -> Result<distillation::Temperature, String> {
    distillation::Temperature::new(parse_number(value)?).map_err(|e| e.to_string())
}

fn parse_alpha(value: &str) -> Result<distillation::Alpha, String> {
    distillation::Alpha::new(parse_number(value)?).map_err(|e| e.to_string())
}

fn parse_initial_loss_scale(value: &str) -> Result<f32, String> {
    let initial_scale = parse_number(value)?;
    loss_scaling::DynamicConfig {
        initial_scale,
        ..loss_scaling::DynamicConfig::keras()
    }
    .validate()
    .map_err(|e| e.to_string())?;
    Ok(initial_scale)
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

    #[test]
    fn seed_and_threads_are_checked() {
        let args = Args::try_parse_from(["experiment", "--seed=7", "--threads=3"]).unwrap();
        assert_eq!((args.seed, args.threads), (7, Some(3)));
        for (flag, bad, range) in [
            ("--seed", "-1", "0..=9223372036854775807"),
            ("--seed", "9223372036854775808", "0..=9223372036854775807"),
            ("--threads", "0", "1..=2147483647"),
            ("--threads", "many", "1..=2147483647"),
            ("--threads", "4294967296", "1..=2147483647"),
        ] {
            let arg = format!("{flag}={bad}");
            let err = Args::try_parse_from(["experiment", arg.as_str()]).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(flag) && text.contains(range), "{arg}: {text}");
        }
    }

    #[test]
    fn the_teacher_is_chosen_by_name() {
        let args = Args::try_parse_from(["experiment"]).unwrap();
        assert_eq!(args.teacher, TeacherChoice::Cnn);
        assert!(args.run_options().is_empty());
        for choice in [TeacherChoice::Resnet, TeacherChoice::Mobilenet] {
            let args = Args::try_parse_from(["experiment", "--teacher", choice.name()]).unwrap();
            assert_eq!(args.teacher, choice);
            assert_eq!(args.run_options(), ["--teacher", choice.name()]);
            assert_eq!(choice.architecture().name(), choice.name());
        }
        let err = Args::try_parse_from(["experiment", "--teacher", "vgg"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("cnn, resnet, mobilenet"), "{text}");
    }

    #[test]
    fn every_setting_is_named_after_its_option() {
        use clap::CommandFactory as _;
        let command = Args::command();
        let settings = Args::default_settings();
        for stage in Stage::all() {
            let value = settings.of(stage);
            for field in value.as_object().unwrap().keys() {
                let flag = field.replace('_', "-");
                assert!(
                    command
                        .get_arguments()
                        .any(|a| a.get_long() == Some(flag.as_str())),
                    "{stage}: `{field}` is no option"
                );
            }
        }
    }

    #[test]
    fn options_are_the_settings_that_differ_from_the_defaults() {
        let defaults = Args::default_settings();
        let args = Args::try_parse_from([
            "experiment",
            "--temperature=4",
            "--calibrator=mse",
            "--seed=9",
        ])
        .unwrap();
        let settings = args.settings();
        assert_eq!(
            settings.options(&defaults, Stage::Distillation),
            ["--temperature", "4.0"]
        );
        assert_eq!(
            settings.options(&defaults, Stage::Quantization),
            ["--calibrator", "mse"]
        );
        assert!(settings.options(&defaults, Stage::Baseline).is_empty());
        assert_eq!(args.run_options(), ["--seed", "9"]);
        let quick = Args::try_parse_from(["experiment", "--quick", "--stages=pruning,baseline"]);
        assert_eq!(
            quick.unwrap().run_options(),
            ["--quick", "--stages", "pruning,baseline"]
        );
        // What the options print parses back to the same settings.
        let again = Args::try_parse_from(
            ["experiment"]
                .into_iter()
                .map(String::from)
                .chain(settings.options(&defaults, Stage::Pipeline))
                .chain(settings.options(&defaults, Stage::Quantization)),
        )
        .unwrap();
        assert_eq!(again.settings(), settings);
    }

    #[test]
    fn technique_settings_default_to_the_library_presets() {
        let args = Args::try_parse_from(["experiment"]).unwrap();
        let distillation = distillation::DistillationConfig::default();
        assert_eq!(args.temperature, distillation.temperature);
        assert_eq!(args.alpha, distillation.alpha);
        assert_eq!(
            args.initial_loss_scale,
            loss_scaling::DynamicConfig::keras().initial_scale
        );
        let args = Args::try_parse_from([
            "experiment",
            "--temperature=4",
            "--alpha=0",
            "--initial-loss-scale=65536",
        ])
        .unwrap();
        assert_eq!(args.temperature.get(), 4.0);
        assert_eq!(args.alpha.get(), 0.0);
        assert_eq!(args.initial_loss_scale, 65536.0);
    }

    #[test]
    fn technique_settings_are_checked_with_the_library_messages() {
        for (flag, bad, message) in [
            (
                "--temperature",
                "0",
                "temperature must be positive and finite",
            ),
            (
                "--temperature",
                "inf",
                "temperature must be positive and finite",
            ),
            ("--temperature", "warm", "`warm` is not a number"),
            ("--alpha", "1.5", "alpha must be in [0, 1]"),
            ("--alpha", "NaN", "alpha must be in [0, 1]"),
            ("--initial-loss-scale", "0", "must be positive and finite"),
            ("--initial-loss-scale", "0.5", "lies outside [1, "),
            (
                "--initial-loss-scale",
                "1e40",
                "must be positive and finite",
            ),
        ] {
            let arg = format!("{flag}={bad}");
            let err = Args::try_parse_from(["experiment", arg.as_str()]).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(flag) && text.contains(message),
                "{arg}: {text}"
            );
        }
    }
}
