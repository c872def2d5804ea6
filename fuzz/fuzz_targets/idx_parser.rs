//! Feeds arbitrary bytes to the gzip and IDX parsers of mnist-data: they must return `Ok` or
//! `Err`, never panic, and never allocate beyond the decompression cap.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mnist_data::{gunzip, parse_images, parse_labels};

fuzz_target!(|data: &[u8]| {
    let parse = |bytes: &[u8]| {
        let _ = parse_images("fuzz", bytes);
        let _ = parse_labels("fuzz", bytes);
    };
    parse(data);
    if let Ok(raw) = gunzip("fuzz", data) {
        parse(&raw);
    }
});
