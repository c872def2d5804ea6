//! The benchmark suites, one module each.

mod precision;
mod runtime;
mod sparse;

use std::path::Path;

use anyhow::Result;
use clap::ValueEnum;

use crate::report::BenchReport;

/// A benchmark suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// Mixed-precision training throughput, ours against PyTorch autocast.
    Precision,
    /// Inference of the pure-Rust runtime against TFLite (XNNPACK), ONNX Runtime, tract and
    /// libtorch, on the artifacts of an experiment run.
    Runtime,
    /// Our CSR-sparse products against our dense f32 GEMM on the project's layer shapes.
    Sparse,
}

impl Suite {
    /// Runs the suite; `threads` (the runtime and sparse suites) limits every engine; `run`
    /// is the experiment run the runtime suite measures.
    pub fn run(self, quick: bool, threads: Option<usize>, run: &Path) -> Result<BenchReport> {
        match self {
            Self::Precision => precision::run(quick),
            Self::Runtime => runtime::run(&runtime::Options {
                quick,
                threads,
                run: run.to_path_buf(),
            }),
            Self::Sparse => sparse::run(quick, threads),
        }
    }
}
