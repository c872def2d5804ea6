//! Drawing a validated chart with `plotters`' SVG backend.

use std::ops::Range;

use plotters::coord::combinators::LogCoord;
use plotters::coord::ranged1d::{
    AsRangedCoord, KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter,
};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

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

const MARKER_SIZE: u32 = 3;
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
    match (chart.x_scale, chart.y_scale) {
        (Scale::Linear, Scale::Linear) => draw(chart, legend, xs, &mut out, x, y),
        (Scale::Linear, Scale::Log10) => draw(chart, legend, xs, &mut out, x, Log10::new(y)),
        (Scale::Log10, Scale::Linear) => draw(chart, legend, xs, &mut out, Log10::new(x), y),
        (Scale::Log10, Scale::Log10) => {
            draw(chart, legend, xs, &mut out, Log10::new(x), Log10::new(y))
        }
    }
    .map_err(|e| PlotError::Render(e.to_string()))?;
    Ok(out)
}

type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw<X, Y>(
    chart: &Chart,
    legend: SeriesLabelPosition,
    xs: (f64, f64),
    out: &mut String,
    x: X,
    y: Y,
) -> DrawResult
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
        let legend = match kind {
            Kind::Lines => {
                let series =
                    LineSeries::new(series.points.iter().copied(), line).point_size(MARKER_SIZE);
                context.draw_series(series)?
            }
            Kind::Scatter => context.draw_series(
                series
                    .points
                    .iter()
                    .map(|&p| Circle::new(p, MARKER_SIZE + 1, filled)),
            )?,
        };
        legend.label(series.label.as_str()).legend(move |(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new(vec![(0, 0), (20, 0)], legend_line)
                + Circle::new((10, 0), MARKER_SIZE, legend_marker)
        });
        context.draw_series(
            series
                .points
                .iter()
                .zip(&series.point_labels)
                .map(|(&p, text)| {
                    // Above and to the right of the marker; to the left near the right edge.
                    let font = (FONT, 11).into_font().color(&colour);
                    let (font, dx) = if fraction(chart.x_scale, xs, p.0) > 0.8 {
                        (font.pos(Pos::new(HPos::Right, VPos::Top)), -6)
                    } else {
                        (font, 6)
                    };
                    EmptyElement::at(p) + Text::new(text.clone(), (dx, -14), font)
                }),
        )?;
    }

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
    Ok(())
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

/// A base-10 logarithmic axis: plotters' mapping, with ticks at every power of ten in range
/// (and at 2x and 5x steps on short ranges, see [`log_ticks`]) labelled to three significant
/// digits. (Linear axes keep plotters' tick labels, which have the digits the tick step needs.)
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
        format_significant(*value)
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

/// `v` to three significant digits, in positional notation from 0.001 to below 10000 and in
/// scientific notation (`2.5e-7`) elsewhere.
pub(crate) fn format_significant(v: f64) -> String {
    let rounded: f64 = format!("{v:.2e}").parse().unwrap_or(v);
    if rounded == 0.0 || (1e-3..1e4).contains(&rounded.abs()) {
        return format!("{rounded}");
    }
    format!("{rounded:e}")
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .map(format_significant)
            .collect()
    }

    #[test]
    fn log_axes_tick_every_decade() {
        assert_eq!(
            ticks(0.5, 2e5, 10),
            ["1", "10", "100", "1000", "1e4", "1e5"]
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
        assert_eq!(format_significant(100.0), "100");
        assert_eq!(format_significant(0.002), "0.002");
        assert_eq!(format_significant(1e6), "1e6");
        assert_eq!(format_significant(2.5e-7), "2.5e-7");
        assert_eq!(format_significant(3000.0000000000005), "3000");
        assert_eq!(format_significant(30000.000000000004), "3e4");
    }
}
