//! The benchmark suites, one module each.

mod precision;
mod runtime;
mod sparse;

use anyhow::Result;
use clap::ValueEnum;

use crate::report::BenchReport;

/// A benchmark suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// Mixed-precision training throughput, ours against PyTorch autocast.
    Precision,
    /// Inference throughput of the pure-Rust runtime against libtorch and PyTorch.
    Runtime,
    /// Our CSR-sparse products against our dense f32 GEMM on the project's layer shapes.
    Sparse,
}

impl Suite {
    /// Runs the suite; `threads` (the runtime and sparse suites) limits every engine.
    pub fn run(self, quick: bool, threads: Option<usize>) -> Result<BenchReport> {
        match self {
            Self::Precision => precision::run(quick),
            Self::Runtime => runtime::run(quick, threads),
            Self::Sparse => sparse::run(quick, threads),
        }
    }
}
