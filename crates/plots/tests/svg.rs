//! Rendering, validation and atomic writing, through the public API.

use std::path::Path;

use plots::{Axis, Chart, Kind, PlotError, Scale, Series};
use proptest::prelude::*;

fn chart(series: Vec<Series>) -> Chart {
    Chart {
        title: "Accuracy by epoch".into(),
        x_label: "epoch".into(),
        y_label: "test accuracy".into(),
        series,
        ..Chart::default()
    }
}

fn two_series() -> Chart {
    chart(vec![
        Series::new("teacher", vec![(1.0, 0.95), (2.0, 0.97), (3.0, 0.98)]),
        Series::new("student", vec![(1.0, 0.90), (2.0, 0.93), (3.0, 0.95)]),
    ])
}

fn assert_svg_document(svg: &str) {
    let start = svg.trim_start();
    assert!(
        start.starts_with("<svg") || start.starts_with("<?xml"),
        "{svg:.80}"
    );
    assert!(svg.trim_end().ends_with("</svg>"), "{svg:.80}");
}

#[test]
fn svg_holds_title_axis_labels_and_series_labels() {
    for kind in [Kind::Lines, Kind::Scatter] {
        let svg = Chart {
            kind,
            ..two_series()
        }
        .to_svg_string()
        .unwrap();
        assert_svg_document(&svg);
        for text in [
            "Accuracy by epoch",
            "epoch",
            "test accuracy",
            "teacher",
            "student",
        ] {
            assert!(svg.contains(text), "{kind:?}: {text} missing");
        }
        assert!(svg.contains(r#"width="800""#) && svg.contains(r#"height="500""#));
    }
}

#[test]
fn series_get_different_colours() {
    let svg = two_series().to_svg_string().unwrap();
    // The first two colours of the palette.
    assert!(svg.contains("#1F77B4") && svg.contains("#FF7F0E"), "{svg}");
}

#[test]
fn a_single_series_has_no_legend_but_point_labels_are_written() {
    let mut series = Series::new("models", vec![(1.2e6, 0.991), (3.1e5, 0.987)]);
    series.point_labels = vec!["float32".into(), "int8 <fast> & small".into()];
    let svg = Chart {
        kind: Kind::Scatter,
        x_scale: Scale::Log10,
        ..chart(vec![series])
    }
    .to_svg_string()
    .unwrap();
    assert_svg_document(&svg);
    assert!(svg.contains("float32"));
    // Text is escaped, so labels cannot break the document.
    assert!(svg.contains("int8 &lt;fast&gt; &amp; small"), "{svg}");
    assert!(!svg.contains("models"), "a lone series needs no legend");
}

#[test]
fn single_points_and_equal_values_draw() {
    for points in [vec![(0.0, 0.0)], vec![(5.0, 5.0); 4], vec![(-3.0, 1e-300)]] {
        let svg = chart(vec![Series::new("s", points)])
            .to_svg_string()
            .unwrap();
        assert_svg_document(&svg);
    }
    for (x_scale, y_scale) in [(Scale::Log10, Scale::Log10), (Scale::Log10, Scale::Linear)] {
        let svg = Chart {
            x_scale,
            y_scale,
            ..chart(vec![Series::new("s", vec![(100.0, 100.0); 3])])
        }
        .to_svg_string()
        .unwrap();
        assert_svg_document(&svg);
    }
}

/// The contents of the document's `<text>` elements, in order.
fn texts(svg: &str) -> Vec<String> {
    svg.split("</text>")
        .filter_map(|chunk| {
            let start = chunk.rfind("<text")?;
            let body = &chunk[start..];
            Some(body[body.find('>')? + 1..].trim().to_string())
        })
        .collect()
}

/// Whether some `<polyline>` of the document is stroked in `colour` (`#RRGGBB`).
fn has_line_in(svg: &str, colour: &str) -> bool {
    svg.split('<')
        .any(|element| element.starts_with("polyline") && element.contains(colour))
}

#[test]
fn a_series_can_be_drawn_unlike_the_chart() {
    // Blue points without a line, an orange line through two of them.
    let scatter = Series::new("models", vec![(1.0, 3.0), (2.0, 1.0), (3.0, 2.0)]);
    let front = Series::new("front", vec![(1.0, 3.0), (3.0, 2.0)]).with_kind(Kind::Lines);
    let svg = Chart {
        kind: Kind::Scatter,
        ..chart(vec![scatter.clone(), front.clone()])
    }
    .to_svg_string()
    .unwrap();
    assert!(has_line_in(&svg, "#FF7F0E"), "no line for the front: {svg}");
    assert!(
        !has_line_in(&svg, "#1F77B4"),
        "the scatter got a line: {svg}"
    );
    assert!(texts(&svg).iter().any(|t| t == "front"), "{svg}");

    // The other way round: a line chart with one markers-only series.
    let svg = Chart {
        kind: Kind::Lines,
        ..chart(vec![
            scatter.with_kind(Kind::Scatter),
            Series {
                kind: None,
                ..front
            },
        ])
    }
    .to_svg_string()
    .unwrap();
    assert!(
        has_line_in(&svg, "#FF7F0E") && !has_line_in(&svg, "#1F77B4"),
        "{svg}"
    );
    assert_eq!(
        Series::new("s", vec![]).kind_in(Kind::Scatter),
        Kind::Scatter,
        "a series without a kind follows the chart"
    );
}

#[test]
fn log_axes_label_every_decade() {
    // Five decades on x; the axis used to show no label below 100.
    let svg = Chart {
        x_scale: Scale::Log10,
        ..chart(vec![Series::new("s", vec![(1.0, 1.0), (1e5, 2.0)])])
    }
    .to_svg_string()
    .unwrap();
    let labels = texts(&svg);
    for tick in ["1", "10", "100", "1000", "10k", "100k"] {
        assert!(
            labels.iter().any(|t| t == tick),
            "no tick {tick}: {labels:?}"
        );
    }
}

#[test]
fn tick_labels_have_no_trailing_zero_decimals() {
    // Optimizer steps against a loss: plotters' own labels would read 0.0, 500.0, ...
    let svg = Chart {
        y_scale: Scale::Log10,
        ..chart(vec![Series::new(
            "s",
            vec![(0.0, 2.0), (1000.0, 0.3), (3800.0, 0.05)],
        )])
    }
    .to_svg_string()
    .unwrap();
    let labels = texts(&svg);
    for tick in ["0", "1000", "2000", "0.05", "0.1", "1"] {
        assert!(
            labels.iter().any(|t| t == tick),
            "no tick {tick}: {labels:?}"
        );
    }
    assert!(
        !labels.iter().any(|t| t.ends_with(".0")),
        "a label ends with .0: {labels:?}"
    );
}

#[test]
fn short_log_axes_label_two_and_five_steps() {
    // Under two decades on y (a training loss, say): 1x, 2x and 5x steps.
    let svg = Chart {
        y_scale: Scale::Log10,
        ..chart(vec![Series::new("s", vec![(100.0, 2.0), (200.0, 0.05)])])
    }
    .to_svg_string()
    .unwrap();
    let labels = texts(&svg);
    for tick in ["0.05", "0.1", "0.2", "0.5", "1", "2"] {
        assert!(
            labels.iter().any(|t| t == tick),
            "no tick {tick}: {labels:?}"
        );
    }
    // Not every step: 0.3 would be a 1x-9x tick, for ranges under a decade.
    assert!(!labels.iter().any(|t| t == "0.3"), "{labels:?}");
}

#[test]
fn empty_charts_and_series_are_errors() {
    assert!(matches!(
        chart(vec![]).to_svg_string(),
        Err(PlotError::NoSeries)
    ));
    let err = chart(vec![
        Series::new("a", vec![(1.0, 1.0)]),
        Series::new("b", vec![]),
    ])
    .to_svg_string()
    .unwrap_err();
    assert!(
        matches!(&err, PlotError::NoPoints { series: 1, label } if label == "b"),
        "{err}"
    );
}

#[test]
fn non_finite_values_are_errors() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        for point in [(bad, 1.0), (1.0, bad)] {
            let err = chart(vec![Series::new("s", vec![(0.0, 0.0), point])])
                .to_svg_string()
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    PlotError::NonFinite {
                        series: 0,
                        index: 1,
                        ..
                    }
                ),
                "{err}"
            );
        }
    }
}

#[test]
fn non_positive_values_on_a_log_axis_are_errors() {
    for (value, y_scale, axis, point) in [
        (0.0, Scale::Log10, Axis::Y, (1.0, 0.0)),
        (-2.0, Scale::Linear, Axis::X, (-2.0, 1.0)),
    ] {
        let err = Chart {
            x_scale: Scale::Log10,
            y_scale,
            ..chart(vec![Series::new("s", vec![(1.0, 1.0), point])])
        }
        .to_svg_string()
        .unwrap_err();
        assert!(
            matches!(err, PlotError::NonPositive { index: 1, axis: a, value: v, .. } if a == axis && v == value),
            "{err}"
        );
        assert!(err.to_string().contains("logarithmic"), "{err}");
    }
    // Negative values are fine on a linear axis.
    let ok = Chart {
        x_scale: Scale::Log10,
        ..chart(vec![Series::new("s", vec![(1.0, -1.0)])])
    };
    ok.to_svg_string().unwrap();
}

#[test]
fn point_labels_must_match_the_points() {
    let mut series = Series::new("s", vec![(1.0, 1.0), (2.0, 2.0)]);
    series.point_labels = vec!["only one".into()];
    let err = chart(vec![series]).to_svg_string().unwrap_err();
    assert!(
        matches!(
            err,
            PlotError::PointLabelCount {
                points: 2,
                labels: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn write_svg_replaces_the_file_and_leaves_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("accuracy.svg");
    std::fs::write(&path, "old").unwrap();
    two_series().write_svg(&path).unwrap();
    let written = std::fs::read_to_string(&path).unwrap();
    assert_eq!(written, two_series().to_svg_string().unwrap());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn write_svg_into_a_missing_folder_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("accuracy.svg");
    let err = two_series().write_svg(&path).unwrap_err();
    assert!(
        matches!(&err, PlotError::Io { path: p, .. } if p == &path),
        "{err}"
    );
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
}

#[test]
fn a_failed_write_leaves_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("accuracy.svg");
    std::fs::write(&path, "old").unwrap();

    // Invalid data: nothing is touched.
    assert!(chart(vec![]).write_svg(&path).is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");

    // The rename fails (a non-empty folder stands where the file should go): the folder and
    // the old file beside it are untouched and no temporary file is left behind.
    let blocked = dir.path().join("blocked.svg");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("keep"), "x").unwrap();
    let err = two_series().write_svg(&blocked).unwrap_err();
    assert!(
        matches!(&err, PlotError::Io { path: p, .. } if p == &blocked),
        "{err}"
    );
    assert!(blocked.join("keep").exists());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["accuracy.svg", "blocked.svg"]);
}

#[test]
fn write_svg_to_a_path_without_a_file_name_is_an_error() {
    let err = two_series().write_svg(Path::new("")).unwrap_err();
    assert!(matches!(err, PlotError::Io { .. }), "{err}");
}

fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => -1e3..1e3f64,
        1 => prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO,
        1 => Just(f64::MAX),
        1 => Just(f64::MIN),
    ]
}

fn positive() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => 1e-3..1e3f64,
        1 => (prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL).prop_map(f64::abs),
        1 => Just(f64::MAX),
        1 => Just(f64::from_bits(1)),
    ]
}

fn series_of(values: impl Strategy<Value = (f64, f64)>) -> impl Strategy<Value = Vec<Series>> {
    prop::collection::vec(
        (
            prop::collection::vec(values, 1..12),
            any::<bool>(),
            ".{0,24}",
        )
            .prop_map(|(points, labelled, label)| {
                let point_labels = if labelled {
                    (0..points.len()).map(|i| format!("{label}{i}")).collect()
                } else {
                    Vec::new()
                };
                Series {
                    label,
                    points,
                    point_labels,
                    kind: None,
                }
            }),
        1..4,
    )
}

/// Series with a random per-series kind, some following the chart's.
fn series_with_kinds(
    values: impl Strategy<Value = (f64, f64)>,
) -> impl Strategy<Value = Vec<Series>> {
    (
        series_of(values),
        prop::collection::vec(prop::option::of(kind()), 4),
    )
        .prop_map(|(mut series, kinds)| {
            for (s, kind) in series.iter_mut().zip(kinds) {
                s.kind = kind;
            }
            series
        })
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Lines), Just(Kind::Scatter)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn any_finite_points_draw_a_document(series in series_with_kinds((finite(), finite())), kind in kind()) {
        let svg = Chart { kind, ..chart(series) }.to_svg_string().unwrap();
        assert_svg_document(&svg);
    }

    #[test]
    fn any_positive_points_draw_on_log_axes(
        series in series_with_kinds((positive(), positive())),
        kind in kind(),
        x_log in any::<bool>(),
    ) {
        let x_scale = if x_log { Scale::Log10 } else { Scale::Linear };
        let svg = Chart { kind, x_scale, y_scale: Scale::Log10, ..chart(series) }
            .to_svg_string()
            .unwrap();
        assert_svg_document(&svg);
    }
}
