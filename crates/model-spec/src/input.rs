//! How raw input becomes the tensor a network was trained on.

use serde::{Deserialize, Serialize};

use crate::SpecError;

/// The memory layout of a network's input: batch, channels, height, width, row-major f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputLayout {
    /// `(N, C, H, W)`, as PyTorch's convolutions take it.
    #[default]
    Nchw,
}

/// The normalisation of a network's input: a raw value `r` of channel `c` (a pixel, 0 to
/// `raw_max`) becomes `(r / raw_max - mean[c]) / std[c]`, in f32 and in that order of
/// operations, so that a reader computes bit for bit what training computed. One mean and
/// standard deviation apply to every channel when only one is given.
///
/// ```
/// use model_spec::InputNormalization;
///
/// let mnist = InputNormalization::new(255.0, vec![0.1307], vec![0.3081])?;
/// let x = mnist.normalize(&[0, 255]);
/// assert_eq!(x[0], (0.0 - 0.1307) / 0.3081);
/// assert_eq!(x[1], (1.0 - 0.1307) / 0.3081);
/// assert!(InputNormalization::new(255.0, vec![0.5], vec![0.0]).is_err());
/// # Ok::<(), model_spec::SpecError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputNormalization {
    /// The layout of the normalised input.
    #[serde(default)]
    pub layout: InputLayout,
    /// What raw values are divided by first (255 for 8-bit pixels); positive and finite.
    pub raw_max: f32,
    /// The mean subtracted after the division, per channel (or one for all); finite.
    pub mean: Vec<f32>,
    /// The standard deviation divided by last, per channel (or one for all); positive and
    /// finite.
    pub std: Vec<f32>,
}

impl InputNormalization {
    /// A checked normalisation in the [`InputLayout::Nchw`] layout.
    pub fn new(raw_max: f32, mean: Vec<f32>, std: Vec<f32>) -> Result<Self, SpecError> {
        let normalization = Self {
            layout: InputLayout::Nchw,
            raw_max,
            mean,
            std,
        };
        normalization.check(None)?;
        Ok(normalization)
    }

    /// Checks the values, and with `channels` that there is one mean and standard
    /// deviation for all channels or one per channel.
    pub fn check(&self, channels: Option<usize>) -> Result<(), SpecError> {
        let invalid = |reason: String| SpecError::InvalidInput { reason };
        if !(self.raw_max.is_finite() && self.raw_max > 0.0) {
            return Err(invalid(format!(
                "raw_max {} is not positive and finite",
                self.raw_max
            )));
        }
        if self.mean.is_empty() || self.mean.len() != self.std.len() {
            return Err(invalid(format!(
                "{} means and {} standard deviations: need as many of each, at least one",
                self.mean.len(),
                self.std.len()
            )));
        }
        if let Some(c) = channels
            && self.mean.len() != 1
            && self.mean.len() != c
        {
            return Err(invalid(format!(
                "{} means for an input of {c} channels: give one for all channels or one per channel",
                self.mean.len()
            )));
        }
        if let Some(m) = self.mean.iter().find(|m| !m.is_finite()) {
            return Err(invalid(format!("mean {m} is not finite")));
        }
        if let Some(s) = self.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(invalid(format!(
                "standard deviation {s} is not positive and finite"
            )));
        }
        Ok(())
    }

    /// The mean and standard deviation of channel `channel`.
    fn of(&self, channel: usize) -> (f32, f32) {
        let i = if self.mean.len() == 1 { 0 } else { channel };
        (self.mean[i], self.std[i])
    }

    /// Normalises raw values of one channel-0 plane or of single-channel images: every value
    /// with channel 0's statistics. For several channels use
    /// [`InputNormalization::normalize_planes`].
    pub fn normalize(&self, raw: &[u8]) -> Vec<f32> {
        let (mean, std) = self.of(0);
        raw.iter()
            .map(|&r| (f32::from(r) / self.raw_max - mean) / std)
            .collect()
    }

    /// Normalises raw NCHW values of `channels` channels of `plane` values each (`raw.len()`
    /// a multiple of `channels * plane`).
    pub fn normalize_planes(&self, raw: &[u8], channels: usize, plane: usize) -> Vec<f32> {
        raw.iter()
            .enumerate()
            .map(|(i, &r)| {
                let (mean, std) = self.of(i / plane.max(1) % channels.max(1));
                (f32::from(r) / self.raw_max - mean) / std
            })
            .collect()
    }
}
