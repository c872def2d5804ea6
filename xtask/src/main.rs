//! Project automation, in the style of `cargo xtask`.
//!
//! The xtask never links tch. It makes sure LibTorch is present (installing the
//! PyTorch wheel into a private virtual environment on first use), then spawns
//! `cargo` with `LIBTORCH` and the runtime library path set.

mod libtorch;
mod peers;
mod results;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

use crate::libtorch::LibTorch;

const HELP: &str = "\
cargo xtask <COMMAND> [ARGS...]

Commands:
  experiment [ARGS...]  build the experiment driver (release) and run it; ARGS go to it
                        (try `cargo xtask experiment --help`)
  bench <SUITE> [ARGS]  benchmarks against peers measured in the same run; writes
                        results/bench/<SUITE>.json (try `cargo xtask bench --help`); the
                        runtime suite installs its peers (TensorFlow Lite, ONNX Runtime,
                        pinned) into their own environment under ~/.cache/tch-mot on first use
  results <RUN>         rewrite README.md's results section (between its
                        `<!-- results:start -->` and `<!-- results:end -->` lines) from the
                        run folder RUN: machine, date, command, tables, plots
  test [ARGS...]        every check: cargo fmt --check, clippy -D warnings, cargo test
                        --workspace (doc tests included); ARGS go to `cargo test`
  fuzz <TARGET> [--runs N] [ARGS...]
                        run a cargo-fuzz target of fuzz/ (idx_parser, artifact_loader) for N
                        executions (default 1000000) on its corpus (artifact_loader's
                        seeded first with the runtime's fuzz_corpus example); ARGS go to libFuzzer
                        (needs the nightly toolchain and `cargo install cargo-fuzz`)
  setup                 make sure LibTorch is available (installs it on first use)
  env                   print the shell exports for using plain `cargo build/test/run`
  help                  print this message

LibTorch: if LIBTORCH is set it is used as is. Otherwise `pip install torch==2.11.0`
runs once into a virtual environment under $XDG_CACHE_HOME/tch-mot (or ~/.cache/tch-mot);
it needs python3 with the venv module and about 5 GB of disk. The same environment gets
onnx==1.23.2 and onnxruntime==1.31.1 (the ONNX export's cross-check), installed on the
first call that finds them missing. With LIBTORCH set, install those into the Python
that TCH_MOT_PYTHON names yourself.
";

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    let command = args.next().map(|c| c.to_string_lossy().into_owned());
    let rest: Vec<OsString> = args.collect();
    match command.as_deref() {
        None | Some("help" | "--help" | "-h") => {
            print!("{HELP}");
            Ok(ExitCode::SUCCESS)
        }
        Some("setup") => {
            let torch = LibTorch::ensure()?;
            eprintln!("LibTorch ready: {}", torch.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Some("env") => {
            print!("{}", LibTorch::ensure()?.shell_exports());
            Ok(ExitCode::SUCCESS)
        }
        Some("test") => test(&rest),
        Some("results") => {
            let [run] = rest.as_slice() else {
                bail!("usage: cargo xtask results <RUN FOLDER> (the folder holding report.json)");
            };
            let root = workspace_root();
            results::rewrite_readme(&root.join("README.md"), Path::new(run), &root)?;
            eprintln!(
                "README.md: results section written from {}",
                Path::new(run).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Some("experiment") => run_release(&rest, "experiment", "experiment", &[]),
        Some("bench") => bench(&rest),
        Some("fuzz") => fuzz(&rest),
        Some(other) => bail!("unknown command `{other}`\n\n{HELP}"),
    }
}

/// Every check, cheapest first: formatting, lints, then the tests.
fn test(extra: &[OsString]) -> Result<ExitCode> {
    let root = workspace_root();
    let fmt = cargo(&root, None)
        .args(["fmt", "--all", "--", "--check"])
        .status();
    if !step("cargo fmt --check", fmt)? {
        eprintln!("hint: run `cargo fmt --all`");
        return Ok(ExitCode::FAILURE);
    }
    let torch = LibTorch::ensure()?;
    let clippy = cargo(&root, Some(&torch))
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .status();
    if !step("cargo clippy", clippy)? {
        return Ok(ExitCode::FAILURE);
    }
    let tests = cargo(&root, Some(&torch))
        .args(["test", "--workspace"])
        .args(extra)
        .status();
    if !step("cargo test", tests)? {
        return Ok(ExitCode::FAILURE);
    }
    eprintln!("all checks passed");
    Ok(ExitCode::SUCCESS)
}

/// The targets of `fuzz/Cargo.toml`.
const FUZZ_TARGETS: [&str; 2] = ["idx_parser", "artifact_loader"];

/// Executions of `cargo xtask fuzz` without `--runs`.
const DEFAULT_FUZZ_RUNS: u64 = 1_000_000;

/// `fuzz <TARGET> [--runs N] [ARGS...]`: `cargo +nightly fuzz run` with one job, stopping
/// after N executions; crashes land in `fuzz/artifacts/<TARGET>/`. The artifact loader's
/// corpus gets its seeds first (the runtime's `fuzz_corpus` example: a valid artifact in
/// every storage scheme), beside what earlier runs left there.
fn fuzz(args: &[OsString]) -> Result<ExitCode> {
    let mut args = args.iter().map(|a| a.to_string_lossy().into_owned());
    let target = match args.next() {
        Some(target) if FUZZ_TARGETS.contains(&target.as_str()) => target,
        Some(other) => bail!(
            "unknown fuzz target `{other}`: expected one of {}",
            FUZZ_TARGETS.join(", ")
        ),
        None => bail!(
            "usage: cargo xtask fuzz <TARGET> [--runs N] [ARGS...]; targets: {}",
            FUZZ_TARGETS.join(", ")
        ),
    };
    let mut runs = DEFAULT_FUZZ_RUNS;
    let mut libfuzzer = Vec::new();
    while let Some(arg) = args.next() {
        let value = match arg.strip_prefix("--runs") {
            Some("") => args.next(),
            Some(rest) if rest.starts_with('=') => Some(rest[1..].to_owned()),
            _ => {
                libfuzzer.push(arg);
                continue;
            }
        };
        runs = value
            .as_deref()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &u64| n >= 1)
            .with_context(|| format!("--runs needs a whole number of at least 1, got {value:?}"))?;
    }
    if target == "artifact_loader" {
        let seeds = cargo(&workspace_root(), None)
            .args([
                "run",
                "--quiet",
                "--package",
                "runtime",
                "--example",
                "fuzz_corpus",
                "--",
            ])
            .arg(Path::new("fuzz").join("corpus").join(&target))
            .status();
        if !step("seeding the artifact loader's corpus", seeds)? {
            return Ok(ExitCode::FAILURE);
        }
    }
    // `+nightly` is understood by rustup's `cargo` proxy, not by the toolchain's cargo
    // binary that `CARGO` names.
    let status = Command::new("cargo")
        .current_dir(workspace_root())
        .args(["+nightly", "fuzz", "run", &target, "--"])
        .arg(format!("-runs={runs}"))
        .args(&libfuzzer)
        .status()
        .context("starting `cargo +nightly fuzz` (rustup's cargo, with cargo-fuzz installed)")?;
    Ok(exit_code(status.code()))
}

/// Builds a binary of the workspace in release mode and runs it with `args`,
/// with `env` added to its environment.
fn run_release(
    args: &[OsString],
    package: &str,
    bin: &str,
    env: &[(&str, OsString)],
) -> Result<ExitCode> {
    let root = workspace_root();
    let torch = LibTorch::ensure()?;
    let status = cargo(&root, Some(&torch))
        .envs(env.iter().map(|(key, value)| (key, value)))
        .args(["run", "--release", "--package", package, "--bin", bin, "--"])
        .args(args)
        .status()
        .context("starting cargo")?;
    Ok(exit_code(status.code()))
}

/// `bench <SUITE> [ARGS]`: the runtime suite's peers run in their own Python environment,
/// installed on first use and handed over in `TCH_MOT_PEER_PYTHON`.
fn bench(args: &[OsString]) -> Result<ExitCode> {
    let mut env = Vec::new();
    if args.first().is_some_and(|suite| suite == "runtime") {
        env.push((peers::PYTHON_VAR, peers::ensure()?.into_os_string()));
    }
    run_release(args, "bench", "bench", &env)
}

/// Reports a step's outcome; `Ok(false)` when it ran and failed.
fn step(name: &str, status: std::io::Result<std::process::ExitStatus>) -> Result<bool> {
    let status = status.with_context(|| format!("starting {name}"))?;
    if status.success() {
        Ok(true)
    } else {
        eprintln!("{name} failed ({status})");
        Ok(false)
    }
}

fn exit_code(code: Option<i32>) -> ExitCode {
    match code {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}

/// A `cargo` command run in the workspace root, with LibTorch in its environment.
fn cargo(root: &Path, torch: Option<&LibTorch>) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(root);
    if let Some(torch) = torch {
        for (key, value) in torch.env() {
            command.env(key, value);
        }
    }
    command
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
