//! Pruning schedules with TF-MOT's semantics.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A fraction of weights set to zero, in [0, 1).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct Sparsity(f64);

impl Sparsity {
    /// A sparsity, or [`Error::InvalidSparsity`] outside [0, 1).
    pub fn new(value: f64) -> Result<Self> {
        if (0.0..1.0).contains(&value) {
            Ok(Self(value))
        } else {
            Err(Error::InvalidSparsity(value))
        }
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// When to prune and to which sparsity, step by step (TF-MOT's `PruningSchedule`s).
///
/// Pruning happens only on steps in `[begin_step, end_step]` where
/// `(step - begin_step)` is a multiple of `frequency`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// The same target sparsity on every pruning step (`end_step: None` prunes forever).
    ConstantSparsity {
        /// The sparsity.
        target: Sparsity,
        /// First step that prunes.
        begin_step: u64,
        /// Last step that may prune, or `None` for no end.
        end_step: Option<u64>,
        /// Prune every `frequency` steps.
        frequency: u64,
    },
    /// Sparsity rising from `initial` to `final_` along
    /// `final + (initial - final) * (1 - p)^power`, `p = clamp((step - begin) / (end - begin), 0, 1)`.
    PolynomialDecay {
        /// Sparsity at `begin_step`.
        initial: Sparsity,
        /// Sparsity from `end_step` on.
        final_: Sparsity,
        /// First step that prunes.
        begin_step: u64,
        /// Last step that prunes.
        end_step: u64,
        /// Exponent of the decay (TF-MOT's default is 3).
        power: f64,
        /// Prune every `frequency` steps.
        frequency: u64,
    },
}

impl Schedule {
    /// TF-MOT's `PolynomialDecay` with its default power 3, validated.
    pub fn polynomial_decay(
        initial: f64,
        final_: f64,
        begin_step: u64,
        end_step: u64,
        frequency: u64,
    ) -> Result<Self> {
        let schedule = Self::PolynomialDecay {
            initial: Sparsity::new(initial)?,
            final_: Sparsity::new(final_)?,
            begin_step,
            end_step,
            power: 3.0,
            frequency,
        };
        schedule.validate()?;
        Ok(schedule)
    }

    /// TF-MOT's `ConstantSparsity`, validated.
    pub fn constant(
        target: f64,
        begin_step: u64,
        end_step: Option<u64>,
        frequency: u64,
    ) -> Result<Self> {
        let schedule = Self::ConstantSparsity {
            target: Sparsity::new(target)?,
            begin_step,
            end_step,
            frequency,
        };
        schedule.validate()?;
        Ok(schedule)
    }

    /// Checks the step bounds, frequency and power.
    pub fn validate(&self) -> Result<()> {
        let (begin, end, frequency) = self.window();
        if frequency == 0 {
            return Err(Error::InvalidSchedule("frequency must be positive".into()));
        }
        if end.is_some_and(|end| end < begin) {
            return Err(Error::InvalidSchedule(format!(
                "end_step {} is before begin_step {begin}",
                end.unwrap_or_default()
            )));
        }
        if let Self::PolynomialDecay { power, .. } = *self
            && !(power > 0.0 && power.is_finite())
        {
            return Err(Error::InvalidSchedule(format!(
                "power must be positive and finite, got {power}"
            )));
        }
        Ok(())
    }

    fn window(&self) -> (u64, Option<u64>, u64) {
        match *self {
            Self::ConstantSparsity {
                begin_step,
                end_step,
                frequency,
                ..
            } => (begin_step, end_step, frequency),
            Self::PolynomialDecay {
                begin_step,
                end_step,
                frequency,
                ..
            } => (begin_step, Some(end_step), frequency),
        }
    }

    /// Whether masks are recomputed at `step`.
    pub fn should_prune(&self, step: u64) -> bool {
        let (begin, end, frequency) = self.window();
        step >= begin
            && end.is_none_or(|end| step <= end)
            && frequency > 0
            && (step - begin).is_multiple_of(frequency)
    }

    /// The target sparsity at `step`.
    pub fn sparsity(&self, step: u64) -> f64 {
        match *self {
            Self::ConstantSparsity { target, .. } => target.get(),
            Self::PolynomialDecay {
                initial,
                final_,
                begin_step,
                end_step,
                power,
                ..
            } => {
                let p = if end_step == begin_step {
                    if step >= begin_step { 1.0 } else { 0.0 }
                } else {
                    ((step as f64 - begin_step as f64) / (end_step - begin_step) as f64)
                        .clamp(0.0, 1.0)
                };
                final_.get() + (initial.get() - final_.get()) * (1.0 - p).powf(power)
            }
        }
    }
}
