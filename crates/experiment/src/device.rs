//! Choosing the device and describing the machine for the report.

use std::process::Command;

use anyhow::{Result, bail};
use tch::{Cuda, Device};

use crate::cli::DeviceChoice;

/// The device a run uses, with the names the report shows.
#[derive(Debug, Clone)]
pub struct RunDevice {
    pub device: Device,
    /// `"cpu"` or `"cuda"`.
    pub kind: &'static str,
    /// The processor or GPU model.
    pub name: String,
}

impl RunDevice {
    pub fn resolve(choice: DeviceChoice) -> Result<Self> {
        let cuda = Cuda::is_available();
        let use_cuda = match choice {
            DeviceChoice::Cpu => false,
            DeviceChoice::Auto => cuda,
            DeviceChoice::Cuda if cuda => true,
            DeviceChoice::Cuda => bail!(
                "--device cuda: no usable CUDA device (LibTorch sees {} CUDA devices); \
                 use --device cpu or --device auto",
                Cuda::device_count()
            ),
        };
        Ok(if use_cuda {
            Self {
                device: Device::Cuda(0),
                kind: "cuda",
                name: gpu_name().unwrap_or_else(|| "CUDA device 0".into()),
            }
        } else {
            Self {
                device: Device::Cpu,
                kind: "cpu",
                name: cpu_name().unwrap_or_else(|| std::env::consts::ARCH.into()),
            }
        })
    }
}

fn cpu_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
}

fn gpu_name() -> Option<String> {
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader", "--id=0"])
        .output()
        .ok()?;
    let name = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !name.is_empty()).then_some(name)
}

/// The commit the binary runs from, when it runs inside a git checkout.
pub fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let commit = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !commit.is_empty()).then_some(commit)
}

/// Makes this thread's SSE/AVX arithmetic flush subnormal results and inputs to zero (the
/// MXCSR FTZ and DAZ bits, PyTorch's `torch.set_flush_denormal(True)`). Threads created
/// afterwards (LibTorch's pool) inherit it. Fine-tuning a pruned network leaves the Adam
/// moments of dead units decaying geometrically into the subnormal range, where every
/// operation on them takes a slow microcode path; flushing them changes no result that
/// matters (they are below 1e-38) and keeps those steps at full speed.
pub fn flush_subnormals() {
    #[cfg(target_arch = "x86_64")]
    {
        const FTZ_DAZ: u32 = 0x8040;
        let mut csr = 0u32;
        // SAFETY: `stmxcsr`/`ldmxcsr` read and write this thread's MXCSR through a valid
        // pointer to a local; setting FTZ and DAZ changes rounding of subnormals only.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &raw mut csr, options(nostack));
            csr |= FTZ_DAZ;
            std::arch::asm!("ldmxcsr [{}]", in(reg) &raw const csr, options(nostack));
        }
    }
}
