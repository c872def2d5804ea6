//! Feeds arbitrary bytes to the runtime's artifact loaders: `Model::from_bytes` and
//! `Artifact::from_bytes` must return `Ok` or `Err`, never panic, must agree on what they
//! accept, and a model they accept must answer its queries.

#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::{Artifact, Model};

fuzz_target!(|data: &[u8]| {
    let model = Model::from_bytes(data);
    let artifact = Artifact::from_bytes(data);
    assert_eq!(model.is_ok(), artifact.is_ok(), "the two loaders disagree");
    if let (Ok(model), Ok(artifact)) = (model, artifact) {
        let _ = model.execution();
        let _ = model.output_shape();
        assert_eq!(model.input_normalization(), artifact.input_normalization());
    }
});
