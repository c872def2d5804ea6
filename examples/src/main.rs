//! `own-model`: a plain tch MLP of one's own through mixed precision, loss scaling,
//! distillation, pruning, quantization-aware training, export and the pure-Rust runtime.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use examples::{Options, bundled_mnist, run};

/// Takes a model of one's own through every technique of the toolkit and prints what each
/// step measured.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// A sixth of the training data, three epochs per phase, 2000 test images.
    #[arg(long)]
    quick: bool,
    /// A folder of MNIST-layout IDX files (default: the bundled copy).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where to write the int8 artifact.
    #[arg(long)]
    artifact: Option<PathBuf>,
    /// Seeds the initialisation and the shuffling.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let data_dir = args.data_dir.unwrap_or_else(bundled_mnist);
    let mut options = if args.quick {
        Options::quick(data_dir)
    } else {
        Options::full(data_dir)
    };
    options.seed = args.seed;
    options.artifact = args.artifact;
    match run(&options) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
