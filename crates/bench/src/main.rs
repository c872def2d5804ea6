//! Benchmarks against peers measured in the same run: `cargo xtask bench <suite>`.
//!
//! Every suite writes `results/bench/<suite>.json`:
//! `{"schema_version": 1, "suite": ..., "machine": ..., "date": ..., "results": [{"case": ...,
//! "ours": {"engine": ..., "samples_per_second": ...}, "peer": {...}, "ratio": ours/peer}]}`
//! and prints the same as a table. Speed goals live here, never in timed tests.

mod onnx;
mod peer;
mod report;
mod suites;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser;

use crate::suites::Suite;

/// Benchmarks of the toolkit against its peers, measured in the same run.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Which suite to run.
    #[arg(value_enum)]
    suite: Suite,
    /// Fewer repeats and steps: checks that the suite runs, numbers are rough.
    #[arg(long)]
    quick: bool,
    /// Threads for ours and the peers (runtime and sparse suites; default: all cores). With
    /// another job on the machine, one thread each compares kernels without the collapse
    /// that OpenMP's spinning barriers suffer when a core is taken.
    #[arg(long)]
    threads: Option<usize>,
    /// The experiment run whose artifacts the runtime suite measures.
    #[arg(long, default_value = "results/latest")]
    run: PathBuf,
    /// Folder for `<suite>.json`.
    #[arg(long, default_value = "results/bench")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("setting the number of threads")?;
    }
    let report = args.suite.run(args.quick, args.threads, &args.run)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let path = args.out.join(format!("{}.json", report.suite));
    report.write(&path)?;
    print!(
        "{}",
        report.summary.clone().unwrap_or_else(|| report.table())
    );
    println!("written to {}", path.display());
    Ok(())
}
