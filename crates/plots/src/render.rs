//! Drawing a validated chart with `plotters`' SVG backend.

use std::ops::Range;

use plotters::coord::combinators::LogCoord;
use plotters::coord::ranged1d::{
    AsRangedCoord, KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter,
};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::labels::{self, Placed, Rect, Side, Wanted};
use crate::range::axis_range;
use crate::{Chart, HEIGHT, Kind, PlotError, Scale, WIDTH};

/// Tableau's ten categorical colours; series past the tenth get hues spread by the golden angle.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Radius of a line chart's markers; a scatter chart's are a pixel larger.
const MARKER_SIZE: u32 = 3;
/// How much wider than what it surrounds a ring around coincident markers is drawn.
const RING_STEP: u32 = 3;
/// Markers whose centres are at most this many pixels apart coincide.
const COINCIDENT: i32 = 3;
const FONT: &str = "sans-serif";

/// The colour of the `index`-th series: distinct from every other series' colour.
pub(crate) fn colour(index: usize) -> RGBColor {
    if let Some(&c) = PALETTE.get(index) {
        return c;
    }
    // Steps of 0.381966... of a turn: consecutive hues land far apart and never repeat exactly.
    // Darker or lighter than the palette, so that they do not pass for one of its colours.
    let k = index - PALETTE.len();
    let hue = (0.08 + k as f64 * 0.381_966_011_250_105).fract();
    let lightness = [0.3, 0.72][k % 2];
    let (r, g, b) = HSLColor(hue, 0.7, lightness).rgb();
    RGBColor(r, g, b)
}

/// Renders a chart that passed validation (finite values, positive ones on log axes).
pub(crate) fn svg(chart: &Chart) -> Result<String, PlotError> {
    svg_and_labels(chart).map(|(svg, _)| svg)
}

/// [`svg`], and the boxes its point labels were given (in the order of the series and
/// their points).
pub(crate) fn svg_and_labels(chart: &Chart) -> Result<(String, Vec<Rect>), PlotError> {
    let xs = axis_range(
        chart.x_scale,
        chart
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0)),
    );
    let ys = axis_range(
        chart.y_scale,
        chart
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1)),
    );
    let legend = legend_position(chart, xs, ys);
    let (x, y) = (xs.0..xs.1, ys.0..ys.1);
    let mut out = String::new();
    let labels = match (chart.x_scale, chart.y_scale) {
        (Scale::Linear, Scale::Linear) => {
            draw(chart, legend, xs, &mut out, Linear::new(x), Linear::new(y))
        }
        (Scale::Linear, Scale::Log10) => {
            draw(chart, legend, xs, &mut out, Linear::new(x), Log10::new(y))
        }
        (Scale::Log10, Scale::Linear) => {
            draw(chart, legend, xs, &mut out, Log10::new(x), Linear::new(y))
        }
        (Scale::Log10, Scale::Log10) => {
            draw(chart, legend, xs, &mut out, Log10::new(x), Log10::new(y))
        }
    }
    .map_err(|e| PlotError::Render(e.to_string()))?;
    Ok((out, labels))
}

type DrawResult<T> = Result<T, DrawingAreaErrorKind<std::io::Error>>;

/// A marker as drawn: where (pixels), how large, whether it is a ring around earlier markers
/// at the same spot, and whether it belongs to a scatter series.
#[derive(Debug, Clone, Copy)]
struct Marker {
    at: (i32, i32),
    radius: u32,
    ring: bool,
    scatter: bool,
}

fn draw<X, Y>(
    chart: &Chart,
    legend: SeriesLabelPosition,
    xs: (f64, f64),
    out: &mut String,
    x: X,
    y: Y,
) -> DrawResult<Vec<Rect>>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut context = ChartBuilder::on(&root)
        .caption(&chart.title, (FONT, 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)?;

    context
        .configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 12))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;

    let mut markers: Vec<Marker> = Vec::new();
    for (index, series) in chart.series.iter().enumerate() {
        let colour = colour(index);
        let line = colour.stroke_width(2);
        let filled = ShapeStyle::from(colour).filled();
        let kind = series.kind_in(chart.kind);
        // The legend shows what the plot shows: a line with a hollow marker, or a dot.
        let legend_marker = match kind {
            Kind::Lines => line,
            Kind::Scatter => filled,
        };
        let legend_line = match kind {
            Kind::Lines => line,
            Kind::Scatter => ShapeStyle::from(TRANSPARENT),
        };
        let scatter = kind == Kind::Scatter;
        let first = markers.len();
        for &p in &series.points {
            let marker = marker_at(&markers, context.backend_coord(&p), scatter);
            markers.push(marker);
        }
        let circles = series.points.iter().zip(&markers[first..]).map(|(&p, m)| {
            let style = if m.ring { line } else { filled };
            Circle::new(p, m.radius, style)
        });
        let label = series.label.as_str();
        let legend = move |(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new(vec![(0, 0), (20, 0)], legend_line)
                + Circle::new((10, 0), MARKER_SIZE, legend_marker)
        };
        match kind {
            Kind::Lines => {
                context
                    .draw_series(LineSeries::new(series.points.iter().copied(), line))?
                    .label(label)
                    .legend(legend);
                context.draw_series(circles)?;
            }
            Kind::Scatter => {
                context.draw_series(circles)?.label(label).legend(legend);
            }
        }
    }

    // Point labels last, over every marker, placed clear of each other.
    let (xr, yr) = context.plotting_area().get_pixel_range();
    let area = Rect {
        left: xr.start,
        top: yr.start,
        right: xr.end,
        bottom: yr.end,
    };
    let mut texts = Vec::new();
    let mut wanted = Vec::new();
    let mut offset = 0;
    for (index, series) in chart.series.iter().enumerate() {
        let series_markers = &markers[offset..offset + series.points.len()];
        offset += series.points.len();
        for ((&p, text), marker) in series
            .points
            .iter()
            .zip(&series.point_labels)
            .zip(series_markers)
        {
            // Clear of the largest marker or ring drawn at the spot.
            let widest = markers
                .iter()
                .filter(|m| coincide(m.at, marker.at))
                .map(|m| m.radius)
                .max()
                .unwrap_or(marker.radius);
            let side = if fraction(chart.x_scale, xs, p.0) > 0.8 {
                Side::Left
            } else {
                Side::Right
            };
            wanted.push(Wanted {
                anchor: marker.at,
                size: labels::text_size(text),
                gap: i32::try_from(widest).unwrap_or(0) + 3,
                side,
            });
            texts.push((p, text.clone(), colour(index)));
        }
    }
    let obstacles: Vec<Rect> = markers
        .iter()
        .map(|m| Rect::around(m.at, i32::try_from(m.radius).unwrap_or(0)))
        .collect();
    let placed = labels::place(&wanted, &obstacles, area);
    context.draw_series(texts.into_iter().zip(&wanted).zip(&placed).map(
        |(((p, text, colour), wanted), placed)| {
            let font = (FONT, labels::FONT_SIZE).into_font().color(&colour);
            let (anchor_x, anchor_y) = wanted.anchor;
            let Placed { rect, side } = *placed;
            // Text hugs the marker: left-aligned on the right, right-aligned on the left, so
            // that a narrower text than estimated stays next to it.
            let (font, dx) = match side {
                Side::Right => (font, rect.left - anchor_x),
                Side::Left => (
                    font.pos(Pos::new(HPos::Right, VPos::Top)),
                    rect.right - anchor_x,
                ),
            };
            EmptyElement::at(p) + Text::new(text, (dx, rect.top - anchor_y), font)
        },
    ))?;

    if chart.series.len() > 1 {
        context
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font((FONT, 12))
            .position(legend)
            .draw()?;
    }
    root.present()?;
    Ok(placed.into_iter().map(|p| p.rect).collect())
}

/// Whether two markers' centres are close enough for one to hide the other.
fn coincide(a: (i32, i32), b: (i32, i32)) -> bool {
    (a.0 - b.0).abs() <= COINCIDENT && (a.1 - b.1).abs() <= COINCIDENT
}

/// The marker at pixel `at`, given those drawn before it: a dot, or, where it would hide an
/// earlier marker and one of the two is a scatter marker, a ring around the widest marker
/// there. (Markers of lines may overlap: a line's own consecutive points often do.)
fn marker_at(earlier: &[Marker], at: (i32, i32), scatter: bool) -> Marker {
    let radius = if scatter {
        MARKER_SIZE + 1
    } else {
        MARKER_SIZE
    };
    let under = earlier
        .iter()
        .filter(|m| (scatter || m.scatter) && coincide(m.at, at))
        .map(|m| m.radius)
        .max();
    match under {
        Some(widest) => Marker {
            at,
            radius: widest.max(radius) + RING_STEP,
            ring: true,
            scatter,
        },
        None => Marker {
            at,
            radius,
            ring: false,
            scatter,
        },
    }
}

/// The corner of the plot for the legend: the one that hides the fewest points (and, for line
/// charts, midpoints of segments), upper right when there is a tie.
fn legend_position(chart: &Chart, xs: (f64, f64), ys: (f64, f64)) -> SeriesLabelPosition {
    // The legend's size as a fraction of the plotting area (about 700x400 pixels), from the
    // 12-pixel font: about 7 pixels a character, 15 a line, and room for the marker.
    let longest = chart.series.iter().map(|s| s.label.chars().count()).max();
    let width = (50.0 + 7.0 * longest.unwrap_or(0) as f64) / 700.0;
    let height = (20.0 + 15.0 * chart.series.len() as f64) / 400.0;

    let mut samples = Vec::new();
    for series in &chart.series {
        samples.extend(series.points.iter().copied());
        if series.kind_in(chart.kind) == Kind::Lines {
            let midpoints = series.points.windows(2);
            samples.extend(
                midpoints.map(|w| (w[0].0 / 2.0 + w[1].0 / 2.0, w[0].1 / 2.0 + w[1].1 / 2.0)),
            );
        }
    }
    let fractions: Vec<(f64, f64)> = samples
        .iter()
        .map(|&(x, y)| {
            (
                fraction(chart.x_scale, xs, x),
                fraction(chart.y_scale, ys, y),
            )
        })
        .collect();
    let hidden = |right: bool, upper: bool| {
        fractions
            .iter()
            .filter(|&&(u, v)| {
                let across = if right { u >= 1.0 - width } else { u <= width };
                let up = if upper {
                    v >= 1.0 - height
                } else {
                    v <= height
                };
                across && up
            })
            .count()
    };
    [
        (SeriesLabelPosition::UpperRight, hidden(true, true)),
        (SeriesLabelPosition::UpperLeft, hidden(false, true)),
        (SeriesLabelPosition::LowerRight, hidden(true, false)),
        (SeriesLabelPosition::LowerLeft, hidden(false, false)),
    ]
    .into_iter()
    .min_by_key(|&(_, count)| count)
    .map_or(SeriesLabelPosition::UpperRight, |(position, _)| position)
}

/// Where `value` lies along an axis spanning `(low, high)`: 0 at `low`, 1 at `high`.
fn fraction(scale: Scale, (low, high): (f64, f64), value: f64) -> f64 {
    let (low, high, value) = match scale {
        Scale::Linear => (low / 2.0, high / 2.0, value / 2.0),
        Scale::Log10 => (low.log10(), high.log10(), value.log10()),
    };
    (value - low) / (high - low)
}

/// A linear axis: plotters' mapping and ticks, labelled by [`tick_label`] with the digits the
/// axis' span needs (plotters' own labels always carry a decimal: `500.0`).
struct Linear {
    coord: RangedCoordf64,
    range: Range<f64>,
}

impl Linear {
    fn new(range: Range<f64>) -> Self {
        Self {
            coord: range.clone().into(),
            range,
        }
    }
}

impl Ranged for Linear {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.coord.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        self.coord.key_points(hint)
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

impl ValueFormatter<f64> for Linear {
    fn format_ext(&self, value: &f64) -> String {
        // Ticks are round multiples of a step of at least a thousandth of the span (plotters
        // puts at most a dozen or so on an axis): the fourth digit of the span is enough.
        let half_span = self.range.end / 2.0 - self.range.start / 2.0;
        tick_label(*value, power_of_ten_below(half_span) / 1000.0)
    }
}

/// A base-10 logarithmic axis: plotters' mapping, with ticks at every power of ten in range
/// (and at 2x and 5x steps on short ranges, see [`log_ticks`]) labelled by [`tick_label`] to
/// three significant digits.
struct Log10 {
    coord: LogCoord<f64>,
    range: Range<f64>,
}

impl Log10 {
    fn new(range: Range<f64>) -> Self {
        Self {
            coord: range.clone().log_scale().into(),
            range,
        }
    }
}

impl Ranged for Log10 {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.coord.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        log_ticks(self.range.start, self.range.end, hint.max_num_points())
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

impl ValueFormatter<f64> for Log10 {
    fn format_ext(&self, value: &f64) -> String {
        log_label(*value)
    }
}

/// Spans (in decades) up to which a logarithmic axis is also labelled at 2x and 5x steps.
const FINE_LOG_DECADES: f64 = 2.5;

/// The ticks of a logarithmic axis over `[low, high]` (positive, `low < high`), at most
/// `max_points` of them: every power of ten in range; on a range of at most
/// [`FINE_LOG_DECADES`] decades, the 2x and 5x steps as well; on one too short for three of
/// those, every 1x to 9x step. When there are more than `max_points`, the 2x and 5x steps go
/// first, then every other power of ten (every third, ...), so that ticks stay evenly spaced.
pub(crate) fn log_ticks(low: f64, high: f64, max_points: usize) -> Vec<f64> {
    if max_points == 0 || !(low > 0.0 && low < high && high.is_finite()) {
        return Vec::new();
    }
    let decades = high.log10() - low.log10();
    // Values are parsed from decimal text, so that 2e-5 is the double nearest 2e-5 and its
    // label reads "2e-5" rather than 1.9999999999999998e-5.
    let first = low.log10().floor() as i32;
    let last = high.log10().ceil() as i32;
    let steps = |multipliers: &[u32]| -> Vec<f64> {
        (first..=last)
            .flat_map(|exponent| {
                multipliers
                    .iter()
                    .filter_map(move |m| format!("{m}e{exponent}").parse::<f64>().ok())
            })
            .filter(|v| (low..=high).contains(v))
            .collect()
    };
    let powers = steps(&[1]);
    let mut ticks = powers.clone();
    if decades <= FINE_LOG_DECADES {
        ticks = steps(&[1, 2, 5]);
        if ticks.len() < 3 {
            ticks = steps(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        }
    }
    if ticks.len() <= max_points {
        return ticks;
    }
    if powers.is_empty() {
        // Only on a range without a power of ten (the axis ranges always hold one).
        let stride = ticks.len().div_ceil(max_points);
        return ticks.into_iter().step_by(stride).collect();
    }
    // Too many: powers of ten only, every `stride`-th one, counted from a multiple of the
    // stride so that the labels are round exponents (n consecutive exponents hold at least
    // one and at most ceil(n / stride) multiples of it).
    let stride = powers.len().div_ceil(max_points);
    powers
        .into_iter()
        .filter(|v| (v.log10().round() as i64).rem_euclid(stride as i64) == 0)
        .collect()
}

/// A logarithmic axis' tick label: `v` to three significant digits, by [`tick_label`].
pub(crate) fn log_label(v: f64) -> String {
    tick_label(v, power_of_ten_below(v.abs()) / 100.0)
}

/// The largest power of ten at most `v` (positive and finite), or 1 for any other `v`.
fn power_of_ten_below(v: f64) -> f64 {
    if !(v > 0.0 && v.is_finite()) {
        return 1.0;
    }
    // Parsed from text, so that 1e-5 is the double nearest 1e-5, not 10^-5 computed.
    format!("1e{}", v.log10().floor()).parse().unwrap_or(1.0)
}

/// Multiples of a thousand used from [`SUFFIX_FROM`] up, and their suffixes.
const SUFFIXES: [(f64, &str); 4] = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
/// The smallest magnitude written with a suffix: ten thousand (`10k`); below it, plain
/// numbers (`2000`).
const SUFFIX_FROM: f64 = 1e4;
/// Magnitudes from here up are written in scientific notation (`2e15`).
const SCIENTIFIC_FROM: f64 = 1e15;
/// Magnitudes below this (other than zero) are written in scientific notation (`2.5e-7`).
const SCIENTIFIC_BELOW: f64 = 1e-3;

/// A tick label: `v` rounded to a multiple of `resolution` (the place of the last digit
/// that matters, a power of ten), without trailing zeros or a trailing point. Magnitudes
/// from 0.001 to below 10 000 are plain decimals (`0.05`, `97.5`, `500`, `2000`); from
/// 10 000 to below 10^15, thousands, millions, billions and trillions with a suffix (`10k`,
/// `12.5k`, `200k`, `1M`, `2.5G`); the rest, scientific notation (`2.5e-7`, `3e16`).
pub(crate) fn tick_label(v: f64, resolution: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let resolution = if resolution > 0.0 && resolution.is_finite() {
        resolution
    } else {
        power_of_ten_below(v.abs()) / 100.0
    };
    let rounded = (v / resolution).round() * resolution;
    let rounded = if rounded.is_finite() { rounded } else { v };
    let magnitude = rounded.abs();
    if magnitude == 0.0 {
        return "0".into();
    }
    // Digits after the point that `resolution` asks for, relative to a unit of `scale`.
    let decimals = |scale: f64| -> usize {
        let places = -(resolution / scale).log10().round();
        if places > 0.0 {
            (places as usize).min(17)
        } else {
            0
        }
    };
    if (SCIENTIFIC_BELOW..SUFFIX_FROM).contains(&magnitude) {
        return trim(format!("{rounded:.*}", decimals(1.0)));
    }
    if (SUFFIX_FROM..SCIENTIFIC_FROM).contains(&magnitude)
        && let Some(&(scale, suffix)) = SUFFIXES.iter().find(|(scale, _)| magnitude >= *scale)
    {
        let mantissa = trim(format!("{:.*}", decimals(scale), rounded / scale));
        return format!("{mantissa}{suffix}");
    }
    // Significant digits that `resolution` leaves, at least one.
    let digits = (magnitude.log10().floor() - resolution.log10().round()).clamp(0.0, 16.0);
    let text = format!("{rounded:.*e}", digits as usize);
    match text.split_once('e') {
        Some((mantissa, exponent)) => format!("{}e{exponent}", trim(mantissa.to_owned())),
        None => text,
    }
}

/// `text` without trailing zeros after a decimal point, nor a trailing point, nor a minus
/// sign on zero.
fn trim(mut text: String) -> String {
    if text.contains('.') {
        let kept = text.trim_end_matches('0').trim_end_matches('.').len();
        text.truncate(kept);
    }
    if text == "-0" {
        text = "0".into();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Series;

    fn labelled(label: &str, points: Vec<(f64, f64)>, names: &[&str]) -> Series {
        let mut series = Series::new(label, points);
        series.point_labels = names.iter().map(|n| (*n).to_string()).collect();
        series
    }

    /// An accuracy-against-size chart where a stage's model has the teacher's size and
    /// accuracy, two more lie on the same spot, and a front line runs through them.
    fn crowded() -> Chart {
        Chart {
            title: "Every model".into(),
            x_label: "size (KiB)".into(),
            y_label: "accuracy (%)".into(),
            x_scale: Scale::Log10,
            kind: Kind::Scatter,
            series: vec![
                labelled("baseline", vec![(880.5, 99.26)], &["teacher_float32"]),
                labelled(
                    "pruning",
                    vec![(880.5, 99.26), (224.0, 99.1), (224.3, 99.1), (60.0, 98.0)],
                    &[
                        "sparsity_50",
                        "sparsity_50_int8",
                        "static_int8_percentile",
                        "n2m4",
                    ],
                ),
                labelled("quantization", vec![(224.1, 99.1)], &["qat_int8"]),
                labelled(
                    "Pareto front",
                    vec![(60.0, 98.0), (224.0, 99.1), (880.5, 99.26)],
                    &["n2m4", "sparsity_50_int8", "teacher_float32"],
                )
                .with_kind(Kind::Lines),
            ],
            ..Chart::default()
        }
    }

    #[test]
    fn labels_of_coincident_points_do_not_overlap() {
        let (svg, boxes) = svg_and_labels(&crowded()).unwrap();
        assert_eq!(boxes.len(), 9);
        for (i, a) in boxes.iter().enumerate() {
            for (j, b) in boxes[..i].iter().enumerate() {
                assert!(!a.intersects(b), "label {i} {a:?} meets label {j} {b:?}");
            }
        }
        for name in ["static_int8_percentile", "qat_int8", "teacher_float32"] {
            assert!(svg.contains(name), "{name}");
        }
    }

    #[test]
    fn coincident_markers_become_rings_around_each_other() {
        let svg = svg(&crowded()).unwrap();
        let circles: Vec<&str> = svg.lines().filter(|l| l.starts_with("<circle")).collect();
        // (The legend's hollow marker for the front line has a radius of 3.)
        let rings = circles
            .iter()
            .filter(|c| c.contains(r#"fill="none""#) && !c.contains(r#"r="3""#));
        // The pruned model on the teacher's spot, the second pruned model on the first, the
        // quantized one on both, and the front's three markers on the scatter's.
        assert_eq!(rings.count(), 6, "{circles:#?}");
        // Each ring is wider than what it surrounds: dots of 4 pixels, rings of 7, 10, 13.
        for radius in [r#"r="4""#, r#"r="7""#, r#"r="10""#, r#"r="13""#] {
            assert!(circles.iter().any(|c| c.contains(radius)), "{radius}");
        }
    }

    #[test]
    fn colours_are_distinct() {
        let colours: Vec<_> = (0..64).map(|i| colour(i).rgb()).collect();
        for (i, a) in colours.iter().enumerate() {
            assert!(!colours[..i].contains(a), "colour {i} repeats: {a:?}");
        }
    }

    fn ticks(low: f64, high: f64, max: usize) -> Vec<String> {
        log_ticks(low, high, max)
            .into_iter()
            .map(log_label)
            .collect()
    }

    #[test]
    fn log_axes_tick_every_decade() {
        assert_eq!(
            ticks(0.5, 2e5, 10),
            ["1", "10", "100", "1000", "10k", "100k"]
        );
        assert_eq!(ticks(3e-4, 0.2, 10), ["0.001", "0.01", "0.1"]);
    }

    #[test]
    fn short_log_axes_tick_at_two_and_five_too() {
        assert_eq!(ticks(15.0, 900.0, 10), ["20", "50", "100", "200", "500"]);
        assert_eq!(
            ticks(0.03, 2.5, 10),
            ["0.05", "0.1", "0.2", "0.5", "1", "2"]
        );
        // Less than a decade: every step from 1x to 9x.
        assert_eq!(
            ticks(250.0, 900.0, 10),
            ["300", "400", "500", "600", "700", "800", "900"]
        );
    }

    #[test]
    fn crowded_log_axes_keep_every_nth_decade() {
        // 2.4 decades would be 8 ticks at 1x, 2x and 5x: over the limit, so decades only.
        assert_eq!(ticks(1.0, 250.0, 5), ["1", "10", "100"]);
        // 300 decades, at most 10 ticks: every 30th power of ten.
        let wide = log_ticks(1e-150, 1e150, 10);
        assert!(wide.len() <= 10 && wide.len() >= 5, "{wide:?}");
        assert!(wide.contains(&1.0), "{wide:?}");
        assert!(log_ticks(1.0, 10.0, 0).is_empty());
        assert_eq!(ticks(2.0, 9.0, 3), ["2", "5", "8"]);
    }

    #[test]
    fn log_ticks_read_well() {
        assert_eq!(log_label(100.0), "100");
        assert_eq!(log_label(500.0), "500");
        assert_eq!(log_label(2000.0), "2000");
        assert_eq!(log_label(0.002), "0.002");
        assert_eq!(log_label(1e6), "1M");
        assert_eq!(log_label(2e5), "200k");
        assert_eq!(log_label(2.5e9), "2.5G");
        assert_eq!(log_label(2.5e-7), "2.5e-7");
        assert_eq!(log_label(3e16), "3e16");
        assert_eq!(log_label(3000.0000000000005), "3000");
        assert_eq!(log_label(30000.000000000004), "30k");
        assert_eq!(log_label(12345.0), "12.3k");
    }

    #[test]
    fn linear_ticks_have_the_digits_their_step_needs_and_no_more() {
        let label = |v: f64, low: f64, high: f64| Linear::new(low..high).format_ext(&v);
        // Plotters' own labels would read 0.0, 500.0, 97.0.
        assert_eq!(label(0.0, -100.0, 3800.0), "0");
        assert_eq!(label(500.0, -100.0, 3800.0), "500");
        assert_eq!(label(97.0, 96.9, 99.3), "97");
        assert_eq!(label(97.5, 96.9, 99.3), "97.5");
        assert_eq!(label(99.05, 99.0, 99.3), "99.05");
        assert_eq!(label(0.1 + 0.2, 0.0, 1.0), "0.3");
        assert_eq!(label(-0.5, -1.0, 1.0), "-0.5");
        assert_eq!(label(12_500.0, 0.0, 40_000.0), "12.5k");
        assert_eq!(label(150_000.0, 0.0, 400_000.0), "150k");
        assert_eq!(label(2e-4, 0.0, 1e-3), "2e-4");
        assert_eq!(label(f64::MAX, f64::MIN, f64::MAX), "1.798e308");
    }
}
