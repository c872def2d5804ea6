//! Axis ranges: the data's extent with a margin, kept within what the tick computation can
//! handle for any finite input.

use crate::Scale;

/// Fraction of the data's span added on each side.
const MARGIN: f64 = 0.05;
/// Widest linear span: wider ones overflow the tick computation (its step reaches infinity).
const MAX_LINEAR_SPAN: f64 = 1e307;
/// Most decades on a logarithmic axis: the ratio of its ends must stay finite.
const MAX_DECADES: f64 = 300.0;

/// The `(low, high)` range of an axis for `values`: finite, `low < high`, and positive for
/// [`Scale::Log10`]. `values` must be finite (and positive for a logarithmic scale) and not
/// empty; otherwise the result is still a valid range, just not a useful one.
pub(crate) fn axis_range(scale: Scale, values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (scale == Scale::Linear || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    match scale {
        Scale::Linear if lo <= hi => linear(lo, hi),
        Scale::Linear => (0.0, 1.0),
        Scale::Log10 if lo <= hi => log10(lo, hi),
        Scale::Log10 => (1.0, 10.0),
    }
}

fn linear(lo: f64, hi: f64) -> (f64, f64) {
    // Halves, so that the span of any two finite values is finite.
    let half_span = hi / 2.0 - lo / 2.0;
    let margin = if half_span > 0.0 {
        2.0 * half_span * MARGIN
    } else if lo == 0.0 {
        1.0
    } else {
        lo.abs() * 0.1
    };
    let low = (lo - margin).max(f64::MIN);
    let high = (hi + margin).min(f64::MAX);
    if high / 2.0 - low / 2.0 <= MAX_LINEAR_SPAN / 2.0 && high - low > 0.0 {
        return (low, high);
    }
    if high - low <= 0.0 {
        // A tiny margin vanished in rounding (a value near the largest float, say).
        return (lo.min(0.0), hi.max(0.0).max(1.0));
    }
    // Wider than the tick computation copes with: keep a window around the centre.
    let centre = low / 2.0 + high / 2.0;
    (
        centre - MAX_LINEAR_SPAN / 2.0,
        (centre + MAX_LINEAR_SPAN / 2.0).min(f64::MAX),
    )
}

fn log10(lo: f64, hi: f64) -> (f64, f64) {
    let (llo, lhi) = (lo.log10(), hi.log10());
    let margin = if lhi > llo { (lhi - llo) * MARGIN } else { 0.1 };
    let mut low_exp = llo - margin;
    let high_exp = lhi + margin;
    if high_exp.floor() < low_exp.ceil() {
        // No power of ten inside: start at the one below, so the axis has a labelled tick.
        low_exp = low_exp.floor();
    }
    low_exp = low_exp.max(high_exp - MAX_DECADES);
    let mut low = 10f64.powf(low_exp);
    let mut high = 10f64.powf(high_exp);
    if !(low > 0.0 && low.is_finite()) {
        low = lo.min(high);
    }
    if !high.is_finite() {
        high = f64::MAX;
    }
    if high <= low {
        high = (low * 10.0).min(f64::MAX);
        if high <= low {
            low = high / 10.0;
        }
    }
    (low, high)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lin(values: &[f64]) -> (f64, f64) {
        axis_range(Scale::Linear, values.iter().copied())
    }

    fn log(values: &[f64]) -> (f64, f64) {
        axis_range(Scale::Log10, values.iter().copied())
    }

    #[test]
    fn linear_adds_five_percent_each_side() {
        let (lo, hi) = lin(&[0.0, 10.0, 5.0]);
        assert!(
            (lo + 0.5).abs() < 1e-12 && (hi - 10.5).abs() < 1e-12,
            "{lo} {hi}"
        );
    }

    #[test]
    fn single_values_get_a_range_around_them() {
        assert_eq!(lin(&[0.0]), (-1.0, 1.0));
        let (lo, hi) = lin(&[3.0, 3.0]);
        assert!(lo < 3.0 && hi > 3.0);
        let (lo, hi) = lin(&[-1e-300]);
        assert!(lo < -1e-300 && hi > -1e-300);
        let (lo, hi) = log(&[100.0]);
        assert!(lo < 100.0 && hi > 100.0 && lo > 0.0);
    }

    #[test]
    fn extreme_linear_values_keep_a_finite_bounded_span() {
        for values in [
            &[f64::MIN, f64::MAX][..],
            &[f64::MAX],
            &[f64::MIN],
            &[0.0, f64::MAX],
            &[f64::MAX, f64::MAX / 2.0],
        ] {
            let (lo, hi) = lin(values);
            assert!(
                lo.is_finite() && hi.is_finite() && lo < hi,
                "{values:?}: {lo} {hi}"
            );
            assert!(
                hi / 2.0 - lo / 2.0 <= MAX_LINEAR_SPAN,
                "{values:?}: {lo} {hi}"
            );
        }
    }

    #[test]
    fn log_ranges_contain_a_power_of_ten_and_stay_positive() {
        let (lo, hi) = log(&[2.0, 5.0]);
        assert!(lo <= 1.0 && hi > 5.0, "{lo} {hi}");
        for values in [
            &[f64::MIN_POSITIVE / 1e10, f64::MAX][..],
            &[f64::MAX],
            &[5e-324],
            &[1.0, 1.0 + f64::EPSILON],
        ] {
            let (lo, hi) = log(values);
            assert!(
                lo > 0.0 && hi.is_finite() && lo < hi,
                "{values:?}: {lo} {hi}"
            );
            assert!((hi / lo).is_finite(), "{values:?}: {lo} {hi}");
        }
    }
}
