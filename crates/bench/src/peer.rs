//! Running the peers written in Python (scripts in `peers/`), answering in JSON on stdout.
//!
//! Two kinds: a one-shot script under the Python of the project's LibTorch environment (the
//! precision suite's PyTorch peer), and a long-lived [`Server`] under the Python of the
//! runtime suite's peer environment (TensorFlow Lite, ONNX Runtime), which keeps its
//! models built between the requests of the repeats.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// The variable that names the Python of the runtime suite's peers (`cargo xtask bench
/// runtime` installs them and sets it).
pub const PEER_PYTHON_VAR: &str = "TCH_MOT_PEER_PYTHON";

/// The Python that has the same torch as our LibTorch (`cargo xtask` sets it).
pub fn python() -> Result<PathBuf> {
    std::env::var_os("TCH_MOT_PYTHON")
        .map(PathBuf::from)
        .context(
            "the PyTorch peer needs TCH_MOT_PYTHON (the Python of the LibTorch environment); \
         run through `cargo xtask bench`, which sets it",
        )
}

/// The Python of the runtime suite's peers, when the environment names one.
pub fn peer_python() -> Option<PathBuf> {
    std::env::var_os(PEER_PYTHON_VAR).map(PathBuf::from)
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join(name)
}

/// Runs `peers/<script>` with `args`; returns the JSON it prints last on stdout.
pub fn run(script_name: &str, args: &[String]) -> Result<Value> {
    let path = script(script_name);
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

/// A long-lived peer: `peers/<script>` under `python`, one JSON request per line on its
/// stdin, one JSON answer per line on its stdout (the protocol of `peers/serve.py`); its
/// stderr goes to ours. Dropping it closes its input, which ends it.
#[derive(Debug)]
pub struct Server {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Server {
    pub fn start(python: &Path, script_name: &str) -> Result<Self> {
        let path = script(script_name);
        let mut child = Command::new(python)
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "starting the peer {} with {}",
                    path.display(),
                    python.display()
                )
            })?;
        let stdin = child.stdin.take().context("the peer's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("the peer's stdout")?);
        Ok(Self {
            name: script_name.into(),
            child,
            stdin: Some(stdin),
            stdout,
        })
    }

    /// Sends `request` and waits for the answer; an answer with an `error` field is an error.
    pub fn request(&mut self, request: &Value) -> Result<Value> {
        let stdin = self.stdin.as_mut().context("the peer was closed")?;
        writeln!(stdin, "{request}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("writing to the peer {} (did it exit?)", self.name))?;
        let mut line = String::new();
        let read = self
            .stdout
            .read_line(&mut line)
            .with_context(|| format!("reading the peer {}", self.name))?;
        if read == 0 {
            let status = self.child.wait().ok();
            bail!(
                "the peer {} exited ({}) before answering; its error is above",
                self.name,
                status.map_or("unknown status".into(), |s| s.to_string())
            );
        }
        let answer: Value = serde_json::from_str(&line)
            .with_context(|| format!("reading the peer {}'s answer: {line:?}", self.name))?;
        if let Some(error) = answer.get("error") {
            bail!("the peer {} failed: {error}", self.name);
        }
        Ok(answer)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
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

/// The SIMD extensions of the processor that matter to the kernels measured here.
pub fn simd_flags() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut flags = Vec::new();
        macro_rules! check {
            ($($feature:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($feature) {
                    flags.push($feature);
                }
            )*};
        }
        check!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vnni"
        );
        flags.join(" ")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}
