//! Progress output: bars on a terminal, periodic plain lines otherwise, nothing with `--quiet`.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a non-terminal run prints a progress line.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Bars,
    Lines,
    Quiet,
}

/// The run's progress reporter.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    mode: Mode,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bars
        } else {
            Mode::Lines
        };
        Self { mode }
    }

    /// A line of information (suppressed by `--quiet`).
    pub fn info(&self, message: &str) {
        if self.mode != Mode::Quiet {
            eprintln!("{message}");
        }
    }

    /// Progress of one training epoch of `steps` steps.
    pub fn epoch(&self, label: &str, epoch: usize, epochs: usize, steps: usize) -> EpochProgress {
        let prefix = format!("{label} epoch {}/{epochs}", epoch + 1);
        let bar = (self.mode == Mode::Bars).then(|| {
            let bar = ProgressBar::new(steps as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} steps {msg} ({elapsed}, eta {eta})",
                )
                .expect("the template is valid")
                .progress_chars("=> "),
            );
            bar.set_prefix(prefix.clone());
            bar
        });
        EpochProgress {
            bar,
            lines: self.mode == Mode::Lines,
            prefix,
            steps,
            last_line: Instant::now(),
        }
    }
}

/// Progress of one epoch; see [`Progress::epoch`].
#[derive(Debug)]
pub struct EpochProgress {
    bar: Option<ProgressBar>,
    lines: bool,
    prefix: String,
    steps: usize,
    last_line: Instant,
}

impl EpochProgress {
    /// Records that `done` steps are finished, with running statistics.
    pub fn update(&mut self, done: usize, loss: f64, accuracy: f64, samples_per_second: f64) {
        let message = format!(
            "loss {loss:.4} acc {:.2}% {samples_per_second:.0} samples/s",
            accuracy * 100.0
        );
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            bar.set_message(message);
        } else if self.lines && self.last_line.elapsed() >= LOG_INTERVAL {
            eprintln!("{} step {done}/{}: {message}", self.prefix, self.steps);
            self.last_line = Instant::now();
        }
    }

    /// Ends the epoch with a summary line.
    pub fn finish(self, summary: &str) {
        let shown = self.bar.is_some() || self.lines;
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        if shown {
            eprintln!("{}: {summary}", self.prefix);
        }
    }
}
