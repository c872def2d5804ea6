//! Symmetric weight quantization: the one quantizer behind every exported int8 weight.

use crate::{BitWidth, Error, Granularity, QParams, Result, check_finite};

/// Quantized weights, as an artifact stores them: codes, and one scale and zero point per
/// output channel (or one pair for the whole tensor). `w ~ scale * (code - zero_point)`.
///
/// The fields are the arguments of the runtime's `ArtifactBuilder::add_int8_per_channel`
/// (or, per tensor, `add_int8_per_tensor` with `scales[0]` and `zero_points[0]`).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeights {
    /// Codes, row-major like the input.
    pub values: Vec<i8>,
    /// One scale per output channel, or a single one per tensor.
    pub scales: Vec<f32>,
    /// One zero point per scale (0: the quantizer is symmetric).
    pub zero_points: Vec<i8>,
    /// Whether the scales are per output channel or per tensor.
    pub granularity: Granularity,
}

impl QuantizedWeights {
    /// The weights the codes stand for, row-major: `scale * (code - zero_point)` of each
    /// element's group.
    pub fn dequantize(&self) -> Vec<f32> {
        let per_group = self.values.len() / self.scales.len().max(1);
        self.values
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let g = i.checked_div(per_group).unwrap_or(0);
                let scale = self.scales.get(g).copied().unwrap_or(1.0);
                let zero_point = self.zero_points.get(g).copied().unwrap_or(0);
                (i32::from(q) - i32::from(zero_point)) as f32 * scale
            })
            .collect()
    }
}

/// Symmetric quantization of a weight tensor `[out_channels, ...]` given as a flat
/// row-major slice: per output channel or per tensor ([`QParams::symmetric`] of each
/// group's largest magnitude: scale `max |w| / qmax`, 1 for an all-zero group), codes in
/// `[-qmax, qmax]` rounded half to even, zero points 0.
///
/// Every int8 weight the runtime's `ArtifactBuilder` quantizes goes through this function
/// with [`BitWidth::INT8`] (codes in -127..=127, the TFLite convention).
///
/// Errors: [`Error::NonFinite`] for a NaN or infinite weight, [`Error::Shape`] when the
/// weights do not split into `out_channels` rows (or `out_channels` is 0).
///
/// ```
/// use quantization::{BitWidth, Granularity, quantize_weights};
///
/// let w = [0.5f32, -1.0, 0.25, 2.0, -0.5, 1.0];
/// let q = quantize_weights(&w, 2, Granularity::PerChannel, BitWidth::INT8)?;
/// assert_eq!(q.values, [64, -127, 32, 127, -32, 64]);
/// assert_eq!(q.scales, [1.0 / 127.0, 2.0 / 127.0]);
/// assert_eq!(q.zero_points, [0, 0]);
/// let back = q.dequantize();
/// assert!(back.iter().zip(&w).all(|(b, w)| (b - w).abs() <= 1.0 / 127.0));
///
/// let t = quantize_weights(&w, 2, Granularity::PerTensor, BitWidth::INT8)?;
/// assert_eq!(t.scales, [2.0 / 127.0]);
/// # Ok::<(), quantization::Error>(())
/// ```
pub fn quantize_weights(
    weights: &[f32],
    out_channels: usize,
    granularity: Granularity,
    bits: BitWidth,
) -> Result<QuantizedWeights> {
    check_finite(weights, "the weights")?;
    if out_channels == 0 || !weights.len().is_multiple_of(out_channels) {
        return Err(Error::Shape(format!(
            "{} weights do not split into {out_channels} output channels",
            weights.len()
        )));
    }
    let groups = match granularity {
        Granularity::PerChannel => out_channels,
        Granularity::PerTensor => 1,
    };
    let per_group = weights.len() / groups;
    let mut values = Vec::with_capacity(weights.len());
    let mut scales = Vec::with_capacity(groups);
    for g in 0..groups {
        let group = &weights[g * per_group..(g + 1) * per_group];
        let max_abs = group.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let p = QParams::symmetric(max_abs, bits);
        // Codes are within `[-qmax, qmax]`, inside i8 for every bit width.
        values.extend(group.iter().map(|&w| p.quantize(w) as i8));
        scales.push(p.scale);
    }
    Ok(QuantizedWeights {
        values,
        scales,
        zero_points: vec![0; groups],
        granularity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The runtime's weight quantizer as it shipped before it moved here, verbatim: the
    /// codes and scales of every exported artifact.
    fn shipped(w: &[f32], rows: usize, per_channel: bool) -> (Vec<i8>, Vec<f32>) {
        let group = if per_channel { w.len() / rows } else { w.len() };
        let mut codes = Vec::with_capacity(w.len());
        let mut scales = Vec::new();
        for chunk in w.chunks(group.max(1)) {
            let max = chunk.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
            let scale = if max.is_finite() && max > 0.0 {
                max / 127.0
            } else {
                1.0
            };
            scales.push(scale);
            codes.extend(
                chunk
                    .iter()
                    .map(|&v| (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8),
            );
        }
        if scales.is_empty() {
            scales.push(1.0);
        }
        (codes, scales)
    }

    proptest! {
        #[test]
        fn int8_weights_are_the_shipped_ones(
            rows in 1usize..6,
            cols in 1usize..12,
            seed in prop::collection::vec(prop_oneof![-5f32..5.0, -1e-3f32..1e-3, Just(0.0)], 72),
            per_channel in any::<bool>(),
        ) {
            let w: Vec<f32> = (0..rows * cols).map(|i| seed[i % seed.len()]).collect();
            let granularity = if per_channel { Granularity::PerChannel } else { Granularity::PerTensor };
            let q = quantize_weights(&w, rows, granularity, BitWidth::INT8).unwrap();
            let (codes, scales) = shipped(&w, rows, per_channel);
            prop_assert_eq!(&q.values, &codes);
            prop_assert_eq!(
                q.scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
                scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>()
            );
            prop_assert_eq!(q.zero_points.len(), q.scales.len());
            prop_assert_eq!(q.granularity, granularity);
        }
    }

    #[test]
    fn empty_rows_get_one_unit_scale_each() {
        let q = quantize_weights(&[], 3, Granularity::PerChannel, BitWidth::INT8).unwrap();
        assert_eq!(q.scales, [1.0; 3]);
        assert_eq!(q.zero_points, [0; 3]);
        assert!(q.values.is_empty());
        assert!(q.dequantize().is_empty());
    }
}
