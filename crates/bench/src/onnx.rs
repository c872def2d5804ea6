//! The ONNX side of the runtime suite: exporting an artifact to ONNX (for ONNX Runtime and
//! tract) and running it with tract, in process.

use std::path::Path;

use anyhow::{Context as _, Result};
use ndarray::{Array2, ArrayView4};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike as _;
use tract_onnx::tract_hir::infer::Factoid as _;

/// The tract release this bench links (keep in step with `Cargo.toml`).
pub const TRACT_VERSION: &str = "0.23.9";

/// The ONNX model of an artifact (`onnx_export`), or why there is none.
pub fn export(artifact: &[u8]) -> std::result::Result<Vec<u8>, String> {
    onnx_export::export(artifact).map_err(|e| format!("onnx_export: {e}"))
}

/// Gives tract's matrix products a pool of `threads` threads (tract runs on one otherwise).
pub fn set_threads(threads: usize) {
    use tract_linalg::multithread::{Executor, set_default_executor};
    set_default_executor(if threads > 1 {
        Executor::multithread(threads)
    } else {
        Executor::SingleThread
    });
}

type Plan = Arc<TypedRunnableModel>;

/// One ONNX model in tract, optimized for each batch size it runs at.
pub struct Tract {
    plans: Vec<(usize, Plan)>,
}

impl Tract {
    /// Loads `file` and optimizes it for every batch size in `batches` and `extra`.
    pub fn load(file: &Path, batches: &[usize], extra: usize) -> Result<Self> {
        let model = tract_onnx::onnx()
            .model_for_path(file)
            .with_context(|| format!("tract reading {}", file.display()))?;
        let mut plans = Vec::new();
        for &batch in batches.iter().chain([&extra]) {
            let input = model.input_fact(0)?.clone();
            let shape: Vec<usize> = input
                .shape
                .dims()
                .skip(1)
                .map(|d| d.concretize().and_then(|d| d.to_usize().ok()))
                .collect::<Option<_>>()
                .context("the ONNX input's non-batch dimensions are not fixed")?;
            let mut full = vec![batch];
            full.extend(shape);
            let plan = model
                .clone()
                .with_input_fact(0, f32::fact(&full).into())?
                .into_optimized()?
                .into_runnable()?;
            plans.push((batch, plan));
        }
        Ok(Self { plans })
    }

    /// The logits of `images` (a batch size given to `load`).
    pub fn run(&self, images: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        let batch = images.shape()[0];
        let (_, plan) = self
            .plans
            .iter()
            .find(|(b, _)| *b == batch)
            .with_context(|| format!("tract was not prepared for batch {batch}"))?;
        let input: Tensor = images.as_standard_layout().into_owned().into_dyn().into();
        let outputs = plan.run(tvec!(input.into()))?;
        let logits = outputs[0].to_plain_array_view::<f32>()?;
        let classes = logits.len() / batch.max(1);
        Ok(Array2::from_shape_vec(
            (batch, classes),
            logits.iter().copied().collect(),
        )?)
    }
}
