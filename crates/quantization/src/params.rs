//! Quantization parameters and the affine maps.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A bit width in 2..=8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitWidth(u32);

impl BitWidth {
    /// Eight bits.
    pub const INT8: Self = Self(8);

    /// A bit width, or [`Error::InvalidBitWidth`] outside 2..=8.
    pub fn new(bits: u32) -> Result<Self> {
        if (2..=8).contains(&bits) {
            Ok(Self(bits))
        } else {
            Err(Error::InvalidBitWidth(bits))
        }
    }

    /// The number of bits.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Largest symmetric signed level: `2^(bits-1) - 1` (127 for int8: the TFLite
    /// convention of [-127, 127], which keeps the range symmetric).
    pub fn symmetric_max(self) -> i32 {
        (1 << (self.0 - 1)) - 1
    }

    /// Largest unsigned level: `2^bits - 1` (255 for u8).
    pub fn unsigned_max(self) -> i32 {
        (1 << self.0) - 1
    }
}

/// An affine quantizer `q = clamp(round(x / scale) + zero_point, qmin, qmax)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QParams {
    /// Step between levels; positive and finite.
    pub scale: f32,
    /// The level that represents 0.0 exactly.
    pub zero_point: i32,
    /// Lowest level.
    pub qmin: i32,
    /// Highest level.
    pub qmax: i32,
}

/// Rounds half to even, as `torch.round` and `np.round` do.
fn round_half_even(x: f32) -> f32 {
    x.round_ties_even()
}

impl QParams {
    /// Symmetric signed parameters for values within `[-max_abs, max_abs]`: zero point 0,
    /// levels `[-qmax, qmax]`. A zero range (a constant-zero tensor) gets scale 1, so
    /// nothing divides by zero.
    pub fn symmetric(max_abs: f32, bits: BitWidth) -> Self {
        let qmax = bits.symmetric_max();
        let scale = if max_abs > 0.0 && max_abs.is_finite() {
            max_abs / qmax as f32
        } else {
            1.0
        };
        Self {
            scale: scale.max(f32::MIN_POSITIVE),
            zero_point: 0,
            qmin: -qmax,
            qmax,
        }
    }

    /// Asymmetric unsigned parameters for values within `[min, max]`: the range is widened
    /// to include 0 so that zero is exactly representable (PyTorch's observers do the same).
    pub fn asymmetric(min: f32, max: f32, bits: BitWidth) -> Self {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let qmax = bits.unsigned_max();
        let range = max - min;
        let scale = if range > 0.0 && range.is_finite() {
            range / qmax as f32
        } else {
            1.0
        };
        let scale = scale.max(f32::MIN_POSITIVE);
        let zero_point = (-round_half_even(min / scale)).clamp(0.0, qmax as f32) as i32;
        Self {
            scale,
            zero_point,
            qmin: 0,
            qmax,
        }
    }

    /// The level of `x`.
    pub fn quantize(&self, x: f32) -> i32 {
        let q = round_half_even(x / self.scale) + self.zero_point as f32;
        q.clamp(self.qmin as f32, self.qmax as f32) as i32
    }

    /// The value of level `q`.
    pub fn dequantize(&self, q: i32) -> f32 {
        (q - self.zero_point) as f32 * self.scale
    }

    /// The smallest and largest values representable without clipping.
    pub fn range(&self) -> (f32, f32) {
        (self.dequantize(self.qmin), self.dequantize(self.qmax))
    }
}

/// Rejects NaN and infinities, naming what was checked.
pub fn check_finite(values: &[f32], what: &str) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::NonFinite {
            what: what.into(),
            index,
        }),
        None => Ok(()),
    }
}

/// Int8 weights with one scale per output channel (or one for the whole tensor).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeights {
    /// Levels, row-major like the input.
    pub values: Vec<i8>,
    /// One scale per output channel, or a single one for per-tensor.
    pub scales: Vec<f32>,
}

/// Symmetric quantization of a weight tensor `[out, ...]` given as a flat row-major slice:
/// per output channel when `per_channel`, else per tensor; zero points are 0.
pub fn quantize_weights(
    weights: &[f32],
    out_channels: usize,
    per_channel: bool,
    bits: BitWidth,
) -> Result<QuantizedWeights> {
    check_finite(weights, "the weights")?;
    if out_channels == 0 || !weights.len().is_multiple_of(out_channels) {
        return Err(Error::Shape(format!(
            "{} weights do not split into {out_channels} output channels",
            weights.len()
        )));
    }
    let row = weights.len() / out_channels;
    let max_abs = |w: &[f32]| w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let params: Vec<QParams> = if per_channel {
        weights
            .chunks(row.max(1))
            .map(|w| QParams::symmetric(max_abs(w), bits))
            .collect()
    } else {
        vec![QParams::symmetric(max_abs(weights), bits)]
    };
    let values = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let p = &params[if per_channel { i / row.max(1) } else { 0 }];
            p.quantize(w) as i8
        })
        .collect();
    Ok(QuantizedWeights {
        values,
        scales: params.iter().map(|p| p.scale).collect(),
    })
}
