//! Integration tests of mnist-data (one test binary, several modules).

mod common;
mod errors;
mod props;
mod real;
mod sampling;
