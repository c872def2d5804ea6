//! Throughput of artifacts on one input, measured alternately so that every file sees the
//! same machine conditions:
//!
//! ```text
//! cargo run --release -p runtime --example time_artifacts -- [--batch 256] [--seconds 1] \
//!     [--repeats 5] a.safetensors b.safetensors ...
//! ```
//!
//! Prints the median samples/s of each file and its ratio to the first one. The input is
//! seeded noise in the artifact's input shape (speed does not depend on the values, except
//! through ReLU sparsity, which every file sees alike).

use std::process::ExitCode;
use std::time::Instant;

use ndarray::Array4;
use runtime::Model;

struct Options {
    batch: usize,
    seconds: f64,
    repeats: usize,
    files: Vec<String>,
}

fn parse() -> Result<Options, String> {
    let mut options = Options {
        batch: 256,
        seconds: 1.0,
        repeats: 5,
        files: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--batch" => {
                options.batch = value("--batch")?
                    .parse()
                    .map_err(|e| format!("--batch: {e}"))?
            }
            "--seconds" => {
                options.seconds = value("--seconds")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?
            }
            "--repeats" => {
                options.repeats = value("--repeats")?
                    .parse()
                    .map_err(|e| format!("--repeats: {e}"))?
            }
            "-h" | "--help" => {
                return Err(
                    "usage: time_artifacts [--batch N] [--seconds S] [--repeats R] FILE...".into(),
                );
            }
            _ => options.files.push(arg),
        }
    }
    if options.files.is_empty()
        || options.batch == 0
        || options.repeats == 0
        || options.seconds.is_nan()
        || options.seconds <= 0.0
    {
        return Err("usage: time_artifacts [--batch N] [--seconds S] [--repeats R] FILE...".into());
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse() {
        Ok(o) => o,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let mut models = Vec::new();
    for file in &options.files {
        match Model::load(file) {
            Ok(m) => models.push(m),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let [c, h, w] = models[0].input_shape();
    let input = Array4::from_shape_fn((options.batch, c, h, w), |(n, c, y, x)| {
        let i = ((n * 7 + c) * 31 + y) * 29 + x;
        ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / (1 << 24) as f32 * 3.0 - 0.5
    });
    let mut rates = vec![Vec::new(); models.len()];
    for _ in 0..options.repeats {
        for (model, rate) in models.iter().zip(&mut rates) {
            if let Err(e) = model.run(input.view()) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            let start = Instant::now();
            let mut samples = 0;
            while start.elapsed().as_secs_f64() < options.seconds {
                if model.run(input.view()).is_err() {
                    return ExitCode::FAILURE;
                }
                samples += options.batch;
            }
            rate.push(samples as f64 / start.elapsed().as_secs_f64());
        }
    }
    let medians: Vec<f64> = rates
        .iter_mut()
        .map(|r| {
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        })
        .collect();
    println!(
        "| artifact | samples/s (batch {}) | ratio to the first |",
        options.batch
    );
    println!("|---|---:|---:|");
    for (file, rate) in options.files.iter().zip(&medians) {
        println!("| {file} | {rate:.0} | {:.2}x |", rate / medians[0]);
    }
    ExitCode::SUCCESS
}
