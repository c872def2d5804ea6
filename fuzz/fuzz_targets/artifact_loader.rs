//! Feeds arbitrary bytes to the runtime's artifact loader: `Model::from_bytes` must return
//! `Ok` or `Err`, never panic, and a model it accepts must answer its queries.

#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::Model;

fuzz_target!(|data: &[u8]| {
    if let Ok(model) = Model::from_bytes(data) {
        let _ = model.execution();
        let _ = model.output_shape();
    }
});
