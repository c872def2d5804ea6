//! Running the PyTorch peer: a Python script from `peers/` under the Python of the
//! project's LibTorch environment, answering with one JSON document on stdout.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// The Python that has the same torch as our LibTorch (`cargo xtask` sets it).
pub fn python() -> Result<PathBuf> {
    std::env::var_os("TCH_MOT_PYTHON")
        .map(PathBuf::from)
        .context(
            "the PyTorch peer needs TCH_MOT_PYTHON (the Python of the LibTorch environment); \
         run through `cargo xtask bench`, which sets it",
        )
}

/// Runs `peers/<script>` with `args`; returns the JSON it prints last on stdout.
pub fn run(script: &str, args: &[String]) -> Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join(script);
    let output = Command::new(python()?)
        .arg(&path)
        .args(args)
        .output()
        .with_context(|| format!("starting the PyTorch peer {}", path.display()))?;
    if !output.status.success() {
        bail!(
            "the PyTorch peer {} failed ({}):\n{}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .with_context(|| format!("reading the PyTorch peer's answer: {last:?}"))
}

/// The processor model and core count, for the bench report.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {cores} cores")
}
