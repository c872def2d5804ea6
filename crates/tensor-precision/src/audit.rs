//! Which loss scale would keep float16 gradients representable?

use std::fmt;

use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::stats::tensor_to_f32_vec;
use crate::{PARALLEL_THRESHOLD, Result};

/// The loss scales the audit tries: 1, 2^8, 2^12, 2^15 (Keras's initial scale) and 2^16
/// (PyTorch's).
pub const AUDIT_SCALES: [f32; 5] = [1.0, 256.0, 4096.0, 32768.0, 65536.0];

/// Largest share of nonzero gradient values that may underflow to zero at a recommended
/// scale: 0.1%.
pub const MAX_UNDERFLOW_SHARE: f64 = 1e-3;

/// Values per block of the counting.
const BLOCK: usize = 1 << 14;

/// What one loss scale does to the audited gradients.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScaleAudit {
    /// The loss scale.
    pub scale: f32,
    /// Nonzero finite values that become zero in float16 after multiplication by `scale`.
    pub underflow: u64,
    /// Finite values that become infinite in float16 after multiplication by `scale`.
    pub overflow: u64,
    /// `underflow` as a share of the nonzero finite values (0 when there are none).
    pub underflow_share: f64,
    /// `overflow` as a share of the nonzero finite values (0 when there are none).
    pub overflow_share: f64,
}

/// The result of a gradient-underflow audit: one row per scale of [`AUDIT_SCALES`] and the
/// smallest scale with under [`MAX_UNDERFLOW_SHARE`] underflow and no overflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradientAudit {
    /// All gradient values seen.
    pub values: u64,
    /// Values that are exactly zero (they cannot underflow, and do not count in shares).
    pub zeros: u64,
    /// Values that are already infinite or NaN in f32 (no scale helps; not in shares).
    pub non_finite: u64,
    /// One row per scale, in the order of [`AUDIT_SCALES`].
    pub scales: Vec<ScaleAudit>,
    /// The smallest qualifying scale, `None` when no scale qualifies.
    pub recommended_scale: Option<f32>,
}

/// Collects f32 gradients (for instance those of a few training steps) for a
/// [`GradientAudit`].
///
/// ```
/// use tensor_precision::GradientAuditor;
///
/// let grads: Vec<f32> = (1..=1000).map(|i| i as f32 * 1e-11).collect();
/// let mut auditor = GradientAuditor::new();
/// auditor.record_slice(&grads);
/// let audit = auditor.finish();
/// // Unscaled, every one of these underflows in float16; 2^8 still loses 1.1%, 2^12 none.
/// assert_eq!(audit.scales[0].underflow, 1000);
/// assert_eq!(audit.recommended_scale, Some(4096.0));
/// println!("{audit}"); // a markdown table
/// ```
#[derive(Debug, Clone, Default)]
pub struct GradientAuditor {
    counts: Counts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    values: u64,
    zeros: u64,
    non_finite: u64,
    underflow: [u64; AUDIT_SCALES.len()],
    overflow: [u64; AUDIT_SCALES.len()],
}

impl Counts {
    fn merge(mut self, other: Self) -> Self {
        self.values += other.values;
        self.zeros += other.zeros;
        self.non_finite += other.non_finite;
        for i in 0..AUDIT_SCALES.len() {
            self.underflow[i] += other.underflow[i];
            self.overflow[i] += other.overflow[i];
        }
        self
    }

    fn of_block(block: &[f32]) -> Self {
        let mut counts = Self {
            values: block.len() as u64,
            ..Self::default()
        };
        for &x in block {
            if !x.is_finite() {
                counts.non_finite += 1;
                continue;
            }
            if x == 0.0 {
                counts.zeros += 1;
                continue;
            }
            for (i, &scale) in AUDIT_SCALES.iter().enumerate() {
                // The product is exact for power-of-two scales (or infinite, which is an
                // overflow too); the cast then rounds exactly as LibTorch would.
                let y = f16::from_f32(x * scale);
                if y.is_infinite() {
                    counts.overflow[i] += 1;
                } else if y.to_f32() == 0.0 {
                    counts.underflow[i] += 1;
                }
            }
        }
        counts
    }
}

impl GradientAuditor {
    /// An auditor that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds f32 gradient values; in parallel for large slices.
    pub fn record_slice(&mut self, grads: &[f32]) {
        let counts = if grads.len() >= PARALLEL_THRESHOLD {
            grads
                .par_chunks(BLOCK)
                .map(Counts::of_block)
                .reduce(Counts::default, Counts::merge)
        } else {
            grads
                .chunks(BLOCK)
                .map(Counts::of_block)
                .fold(Counts::default(), Counts::merge)
        };
        self.counts = self.counts.merge(counts);
    }

    /// Adds gradient tensors (any floating kind, shape and device; read as f32).
    pub fn record_tensors(&mut self, grads: &[Tensor]) -> Result<()> {
        for grad in grads {
            self.record_slice(&tensor_to_f32_vec(grad)?);
        }
        Ok(())
    }

    /// Adds the gradients of `variables` (for instance `vs.trainable_variables()` after
    /// `backward`); variables without a gradient are skipped.
    pub fn record_variable_grads(&mut self, variables: &[Tensor]) -> Result<()> {
        for variable in variables {
            let grad = variable.grad();
            if grad.defined() {
                self.record_slice(&tensor_to_f32_vec(&grad)?);
            }
        }
        Ok(())
    }

    /// The audit of everything recorded.
    pub fn finish(&self) -> GradientAudit {
        let c = &self.counts;
        let nonzero = c.values - c.zeros - c.non_finite;
        let share = |n: u64| {
            if nonzero == 0 {
                0.0
            } else {
                n as f64 / nonzero as f64
            }
        };
        let scales: Vec<ScaleAudit> = AUDIT_SCALES
            .iter()
            .enumerate()
            .map(|(i, &scale)| ScaleAudit {
                scale,
                underflow: c.underflow[i],
                overflow: c.overflow[i],
                underflow_share: share(c.underflow[i]),
                overflow_share: share(c.overflow[i]),
            })
            .collect();
        let recommended_scale = scales
            .iter()
            .find(|row| row.overflow == 0 && row.underflow_share < MAX_UNDERFLOW_SHARE)
            .map(|row| row.scale);
        GradientAudit {
            values: c.values,
            zeros: c.zeros,
            non_finite: c.non_finite,
            scales,
            recommended_scale,
        }
    }
}

impl GradientAudit {
    /// Audits gradients given as f32 slices.
    pub fn of_slices<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> Self {
        let mut auditor = GradientAuditor::new();
        for grad in grads {
            auditor.record_slice(grad);
        }
        auditor.finish()
    }

    /// Audits gradient tensors (any floating kind, shape and device; read as f32).
    pub fn of_tensors(grads: &[Tensor]) -> Result<Self> {
        let mut auditor = GradientAuditor::new();
        auditor.record_tensors(grads)?;
        Ok(auditor.finish())
    }
}

fn log2_label(scale: f32) -> String {
    let exponent = scale.log2();
    if exponent.fract() == 0.0 {
        format!("2^{exponent}")
    } else {
        format!("{scale}")
    }
}

/// A markdown table, one row per scale, followed by the recommendation.
impl fmt::Display for GradientAudit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nonzero = self.values - self.zeros - self.non_finite;
        writeln!(
            f,
            "| loss scale | underflow to 0 in f16 | overflow to inf in f16 |"
        )?;
        writeln!(f, "|---:|---:|---:|")?;
        for row in &self.scales {
            writeln!(
                f,
                "| {} | {} ({:.3}%) | {} ({:.3}%) |",
                log2_label(row.scale),
                row.underflow,
                row.underflow_share * 100.0,
                row.overflow,
                row.overflow_share * 100.0
            )?;
        }
        writeln!(f)?;
        write!(
            f,
            "{nonzero} nonzero finite gradient values ({} zero, {} non-finite). ",
            self.zeros, self.non_finite
        )?;
        match self.recommended_scale {
            Some(scale) => writeln!(
                f,
                "Recommended loss scale: {} (under {}% underflow, no overflow).",
                log2_label(scale),
                MAX_UNDERFLOW_SHARE * 100.0
            ),
            None => writeln!(
                f,
                "No scale qualifies (under {}% underflow and no overflow).",
                MAX_UNDERFLOW_SHARE * 100.0
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_match_the_float16_rounding_boundaries() {
        // 2^-25 is the tie between 0 and the smallest subnormal: it rounds to even, 0.
        // 65520 is the tie between 65504 and the next (infinite) step: it overflows.
        let grads = [
            2f32.powi(-25),
            2f32.powi(-25) * 1.0001,
            65520.0 / 256.0,
            0.0,
        ];
        let audit = GradientAudit::of_slices([&grads[..]]);
        assert_eq!(audit.zeros, 1);
        let unscaled = audit.scales[0];
        assert_eq!((unscaled.underflow, unscaled.overflow), (1, 0));
        let by_256 = audit.scales[1];
        assert_eq!((by_256.underflow, by_256.overflow), (0, 1));
        assert_eq!(audit.recommended_scale, None);
    }

    #[test]
    fn recommends_the_smallest_qualifying_scale() {
        // 1% of values underflow unscaled, none at 2^8 and above; large ones overflow
        // from 2^16 on.
        let mut grads = vec![1e-3f32; 990];
        grads.extend([1e-9f32; 10]);
        grads[0] = 1.5;
        let audit = GradientAudit::of_slices([&grads[..]]);
        assert_eq!(audit.scales[0].underflow, 10);
        assert_eq!(audit.scales[4].overflow, 1);
        assert_eq!(audit.recommended_scale, Some(256.0));
        let table = audit.to_string();
        assert!(
            table.contains("| 2^8 | 0 (0.000%) | 0 (0.000%) |"),
            "{table}"
        );
        assert!(table.contains("Recommended loss scale: 2^8"), "{table}");
    }

    #[test]
    fn non_finite_gradients_are_counted_apart_and_tensors_accumulate() {
        let grads = [
            Tensor::from_slice(&[f32::NAN, 1.0, 0.0]),
            Tensor::from_slice(&[2.0f64, f64::INFINITY]).view([1, 2]),
        ];
        let audit = GradientAudit::of_tensors(&grads).unwrap();
        assert_eq!((audit.values, audit.zeros, audit.non_finite), (5, 1, 2));
        assert_eq!(audit.recommended_scale, Some(1.0));
        let json = serde_json::to_value(&audit).unwrap();
        assert_eq!(json["scales"][3]["scale"], 32768.0);
    }
}
