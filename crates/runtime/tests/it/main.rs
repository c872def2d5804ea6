//! Integration tests of the runtime: artifacts written, loaded, validated and run. One test
//! binary (`autotests = false`), one module per concern.

mod artifact_view;
mod common;
mod engine;
mod graphs;
mod palette;
mod validation;
