//! The experiment driver: `cargo xtask experiment --help`.

mod architecture;
mod charts;
mod cli;
mod context;
mod deploy;
mod device;
mod fsutil;
mod progress;
mod report;
mod resume;
mod settings;
mod stage;
mod stages;
mod teacher;
mod train;
mod variant;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use indexmap::IndexMap;
use mnist_data::{Dataset, Normalization};

use crate::cli::Args;
use crate::context::Context;
use crate::device::RunDevice;
use crate::progress::Progress;
use crate::report::{Report, SCHEMA_VERSION, StageOutcome};
use crate::stage::Stage;
use crate::train::DeviceSplit;

fn main() -> ExitCode {
    let args = Args::parse();
    // Before LibTorch starts its threads, so that they inherit it.
    device::flush_subnormals();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the requested stages; `Ok(false)` when a stage failed (the report says which).
fn run(args: &Args) -> Result<bool> {
    let progress = Progress::new(args.quiet);
    if let Some(threads) = args.threads {
        // At least 1 and within i32: checked when the options were parsed.
        tch::set_num_threads(i32::try_from(threads).context("--threads is too large")?);
    }
    let device = RunDevice::resolve(args.device)?;
    let data_dir = mnist_data::data_dir(args.data_dir.as_deref())?;
    let dataset = Dataset::load(&data_dir)
        .with_context(|| format!("loading the dataset from {}", data_dir.display()))?;
    let normalization = Normalization::default();
    let test = DeviceSplit::new(&dataset.test, normalization, device.device)?;

    let started = chrono::Utc::now();
    let out = out_folder(args, &started)?;
    let settings = args.settings();
    let defaults = Args::default_settings();
    let mut resume = resume::Resume::new(args, &settings, device.kind, &data_dir, &out)?;
    resume::remove_leftovers(&out)?;
    if args.out.is_none() && !args.resume {
        point_latest_at(&out)?;
    }
    if args.quick {
        progress.info(report::SMOKE_TEST);
    }
    progress.info(&format!(
        "device: {} ({}), {} threads; writing to {}",
        device.kind,
        device.name,
        tch::get_num_threads(),
        out.display()
    ));

    let mut report = Report {
        schema_version: SCHEMA_VERSION,
        started: started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        device: device.kind.into(),
        device_name: device.name.clone(),
        threads: usize::try_from(tch::get_num_threads()).unwrap_or(0),
        quick: args.quick,
        seed: args.seed,
        git_commit: device::git_commit(),
        options: args.run_options(),
        stages: IndexMap::new(),
        rows: Vec::new(),
    };
    let mut ctx = Context {
        seed: args.seed,
        quick: args.quick,
        teacher: args.teacher,
        device,
        progress,
        out: out.clone(),
        dataset,
        normalization,
        test,
        stage: Stage::Baseline,
        inputs: &[],
    };
    let mut all_ok = true;
    for &stage in &args.stages {
        if let Some(previous) = resume.reusable(stage) {
            progress.info(&format!(
                "== stage {stage}: kept from the earlier run (same settings) =="
            ));
            report.keep(previous, stage);
            report.write(&out)?;
            continue;
        }
        let config_hash = resume.key(stage);
        resume.ran(stage);
        progress.info(&format!("== stage {stage} =="));
        let start = Instant::now();
        ctx.stage = stage;
        ctx.inputs = stages::inputs(stage);
        let outcome = stages::run(stage, &ctx, &settings);
        let seconds = start.elapsed().as_secs_f64();
        let (error, section) = match outcome {
            Ok(stage_report) => {
                report.rows.extend(stage_report.rows);
                (None, stage_report.section)
            }
            Err(err) => {
                all_ok = false;
                eprintln!("error: stage {stage} failed: {err:#}");
                (Some(format!("{err:#}")), None)
            }
        };
        report.stages.insert(
            stage.name().into(),
            StageOutcome {
                status: if error.is_none() { "ok" } else { "failed" }.into(),
                seconds,
                error,
                config_hash: Some(config_hash),
                resumed: false,
                section,
                settings: settings.of(stage),
                options: settings.options(&defaults, stage),
            },
        );
        // After every stage, so that an interrupted run keeps what it finished.
        report.write(&out)?;
    }
    if !args.quiet || !all_ok {
        if args.quick {
            println!("{}\n", report::SMOKE_TEST);
        }
        println!("{}", report.results_table());
    }
    println!("report: {}", out.join("report.md").display());
    Ok(all_ok)
}

/// The run folder: `--out`, `results/latest` with `--resume`, a new timestamped folder
/// otherwise; created, and refused when it holds a run and `--resume` was not asked for.
fn out_folder(args: &Args, started: &chrono::DateTime<chrono::Utc>) -> Result<PathBuf> {
    let out = match &args.out {
        Some(out) => out.clone(),
        None if args.resume => {
            let latest = Path::new("results").join("latest");
            std::fs::canonicalize(&latest).with_context(|| {
                format!(
                    "--resume without --out continues {}, which does not exist: name the run \
                     folder with --out",
                    latest.display()
                )
            })?
        }
        None => Path::new("results").join(started.format("%Y%m%d-%H%M%S").to_string()),
    };
    std::fs::create_dir_all(&out)
        .with_context(|| format!("creating the output folder {}", out.display()))?;
    // A new run would replace the report of the one already there.
    if !args.resume && out.join("report.json").exists() {
        bail!(
            "{} already holds a run (its report.json): pass --resume to continue that run, or \
             choose another --out",
            out.display()
        );
    }
    Ok(out)
}

/// Makes `results/latest` a relative link to the run folder `out` (Unix only).
fn point_latest_at(out: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let (Some(parent), Some(name)) = (out.parent(), out.file_name()) else {
            return Ok(());
        };
        let latest = parent.join("latest");
        let temporary = parent.join(".latest.tmp");
        let _ = std::fs::remove_file(&temporary);
        std::os::unix::fs::symlink(name, &temporary)
            .and_then(|()| std::fs::rename(&temporary, &latest))
            .with_context(|| format!("pointing {} at {}", latest.display(), out.display()))?;
    }
    Ok(())
}
