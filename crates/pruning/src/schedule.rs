//! Pruning schedules with TF-MOT's semantics.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A fraction of weights set to zero, in [0, 1). Deserialising checks the range too.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Sparsity(f64);

impl TryFrom<f64> for Sparsity {
    type Error = Error;

    fn try_from(value: f64) -> Result<Self> {
        Self::new(value)
    }
}

impl From<Sparsity> for f64 {
    fn from(sparsity: Sparsity) -> Self {
        sparsity.0
    }
}

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
/// `(step - begin_step)` is a multiple of `frequency`: TF-MOT's `_should_prune_in_step`,
/// `step >= begin_step and (step <= end_step or end_step == -1) and
/// (step - begin_step) % frequency == 0`, with `end_step: None` for TF-MOT's `-1`.
///
/// **End steps.** TF-MOT accepts a `PolynomialDecay` whose `end_step` the frequency never
/// reaches (`begin_step = 0, end_step = 469, frequency = 50`): its last mask update is then
/// at step 450, at 79.995% of a final 80%, and the layer never reaches the final sparsity.
/// This crate refuses such a schedule with [`Error::UnreachableEndStep`], which names the
/// nearest valid end steps, instead of updating off the frequency at the end step: every
/// schedule it accepts prunes on exactly the steps and to exactly the sparsities TF-MOT's
/// would, and reaches its final sparsity exactly at `end_step`. `ConstantSparsity` needs no
/// such rule (every pruning step has the target sparsity), so its `end_step` may be any step
/// from `begin_step` on, as in TF-MOT.
///
/// ```
/// use pruning::{Error, Schedule};
///
/// let schedule = Schedule::polynomial_decay(0.0, 0.8, 0, 450, 50)?;
/// assert!(schedule.should_prune(450) && !schedule.should_prune(469));
/// assert_eq!(schedule.sparsity(450), 0.8);
/// assert_eq!(schedule.final_step(), Some(450));
///
/// let err = Schedule::polynomial_decay(0.0, 0.8, 0, 469, 50).unwrap_err();
/// assert!(matches!(err, Error::UnreachableEndStep { earlier: 450, later: 500, .. }));
/// # Ok::<(), Error>(())
/// ```
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
    /// TF-MOT's `PolynomialDecay` with its default power 3, validated: the sparsities must
    /// be in [0, 1), `frequency` positive, and `end_step - begin_step` a multiple of
    /// `frequency` ([`Error::UnreachableEndStep`] otherwise, see [`Schedule`]).
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

    /// TF-MOT's `ConstantSparsity`, validated: `target` in [0, 1), `frequency` positive,
    /// `end_step` (if any) not before `begin_step`.
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

    /// Checks the sparsities, step bounds, frequency and power, and that a polynomial
    /// decay's `end_step` is a pruning step ([`Error::UnreachableEndStep`] otherwise).
    pub fn validate(&self) -> Result<()> {
        let (begin, end, frequency) = self.window();
        if frequency == 0 {
            return Err(Error::InvalidSchedule("frequency must be positive".into()));
        }
        if let Some(end) = end
            && end < begin
        {
            return Err(Error::InvalidSchedule(format!(
                "end_step {end} is before begin_step {begin}"
            )));
        }
        match *self {
            Self::ConstantSparsity { target, .. } => {
                Sparsity::new(target.get())?;
            }
            Self::PolynomialDecay {
                initial,
                final_,
                begin_step,
                end_step,
                power,
                frequency,
            } => {
                Sparsity::new(initial.get())?;
                Sparsity::new(final_.get())?;
                if !(power > 0.0 && power.is_finite()) {
                    return Err(Error::InvalidSchedule(format!(
                        "power must be positive and finite, got {power}"
                    )));
                }
                let past = (end_step - begin_step) % frequency;
                if past != 0 {
                    return Err(Error::UnreachableEndStep {
                        begin_step,
                        end_step,
                        frequency,
                        earlier: end_step - past,
                        later: end_step.saturating_add(frequency - past),
                    });
                }
            }
        }
        Ok(())
    }

    /// The step from which every pruning step has the final sparsity: `end_step` of a
    /// polynomial decay, `begin_step` of a constant sparsity; `None` if the schedule is
    /// invalid (see [`Schedule::validate`]).
    pub fn final_step(&self) -> Option<u64> {
        self.validate().ok()?;
        Some(match *self {
            Self::ConstantSparsity { begin_step, .. } => begin_step,
            Self::PolynomialDecay { end_step, .. } => end_step,
        })
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
