//! Cross-crate integration tests, built into one test binary (every test binary links
//! LibTorch, so fewer binaries means much faster builds).

mod data_to_model;
mod python_round_trip;
mod quantization_pytorch;
mod runtime_isolation;
