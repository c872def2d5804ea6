//! Where point labels go: beside their marker, clear of every label placed before them and,
//! where there is room, of the other markers.

/// A box in pixels: `left` and `top` inside it, `right` and `bottom` just outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rect {
    pub left: i32,
    pub top: i32,
    pub right: i32,
    pub bottom: i32,
}

impl Rect {
    /// Whether the two boxes share a pixel.
    pub fn intersects(&self, other: &Rect) -> bool {
        self.left < other.right
            && other.left < self.right
            && self.top < other.bottom
            && other.top < self.bottom
    }

    fn inside(&self, area: &Rect) -> bool {
        self.left >= area.left
            && self.right <= area.right
            && self.top >= area.top
            && self.bottom <= area.bottom
    }

    /// The square around a marker of `radius` at `(x, y)`.
    pub fn around((x, y): (i32, i32), radius: i32) -> Self {
        Self {
            left: x - radius,
            top: y - radius,
            right: x + radius + 1,
            bottom: y + radius + 1,
        }
    }
}

/// Size of the label font (plotters writes it at about 0.8 of this in the SVG, ~9 pixels).
pub(crate) const FONT_SIZE: u32 = 11;
/// Estimated width of one character of a label, generous for wide letters.
const CHAR_WIDTH: i32 = 6;
/// Estimated height of a label's line, with a pixel to spare.
const LINE_HEIGHT: i32 = 12;
/// How far above its marker's centre a label's top sits in its first place.
const RAISE: i32 = 14;
/// How far below its marker's centre a label's top sits in its place below.
const LOWER: i32 = 4;
/// Rows tried above and below (after the first two), a line height apart.
const MAX_ROWS: i32 = 10;

/// The box a label's text is estimated to fill.
pub(crate) fn text_size(text: &str) -> (i32, i32) {
    let chars = i32::try_from(text.chars().count()).unwrap_or(i32::MAX / CHAR_WIDTH);
    (
        chars.saturating_mul(CHAR_WIDTH).saturating_add(2),
        LINE_HEIGHT,
    )
}

/// Which side of its marker a label is written on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Right,
    Left,
}

/// A label to place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wanted {
    /// The marker's centre.
    pub anchor: (i32, i32),
    /// The text's estimated size.
    pub size: (i32, i32),
    /// Horizontal distance from the centre to the text: clear of the marker (and of any ring
    /// drawn around it).
    pub gap: i32,
    /// The side tried first (the left one near the right edge of the plot).
    pub side: Side,
}

/// Where a label went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placed {
    pub rect: Rect,
    pub side: Side,
}

/// Places `labels` in order, greedily: each takes the first of its candidate places, nearest
/// first (just above its marker, just below, the same on the other side, then a row further
/// up or down each time), that lies inside `area` and meets no label placed before it nor
/// any of the `markers` (boxes of markers; a label's own marker is left of or right of it by
/// its gap). When every candidate meets a marker, the first that meets no label wins; when
/// every candidate leaves the area, the first that meets no label; failing all, the first.
pub(crate) fn place(labels: &[Wanted], markers: &[Rect], area: Rect) -> Vec<Placed> {
    let mut placed: Vec<Placed> = Vec::with_capacity(labels.len());
    for wanted in labels {
        let candidates = candidates(wanted);
        let clear_of_labels = |c: &Placed| !placed.iter().any(|p| p.rect.intersects(&c.rect));
        let own = Rect::around(wanted.anchor, wanted.gap - 1);
        let clear_of_markers = |c: &Placed| {
            !markers
                .iter()
                .any(|m| m.intersects(&c.rect) && !own.intersects(m))
        };
        let choice = candidates
            .iter()
            .find(|c| c.rect.inside(&area) && clear_of_labels(c) && clear_of_markers(c))
            .or_else(|| {
                candidates
                    .iter()
                    .find(|c| c.rect.inside(&area) && clear_of_labels(c))
            })
            .or_else(|| candidates.iter().find(|c| clear_of_labels(c)))
            .unwrap_or(&candidates[0]);
        placed.push(*choice);
    }
    placed
}

/// A label's candidate places, nearest first.
fn candidates(wanted: &Wanted) -> Vec<Placed> {
    let (x, y) = wanted.anchor;
    let (width, height) = wanted.size;
    let other = match wanted.side {
        Side::Right => Side::Left,
        Side::Left => Side::Right,
    };
    let at = |top: i32, side: Side| {
        let left = match side {
            Side::Right => x.saturating_add(wanted.gap),
            Side::Left => x.saturating_sub(wanted.gap).saturating_sub(width),
        };
        Placed {
            rect: Rect {
                left,
                top,
                right: left.saturating_add(width),
                bottom: top.saturating_add(height),
            },
            side,
        }
    };
    let mut out = Vec::new();
    for row in 0..=MAX_ROWS {
        let above = y - RAISE - row * height;
        let below = y + LOWER + row * height;
        for side in [wanted.side, other] {
            out.push(at(above, side));
            out.push(at(below, side));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const AREA: Rect = Rect {
        left: 0,
        top: 0,
        right: 800,
        bottom: 500,
    };

    fn wanted(anchor: (i32, i32), text: &str) -> Wanted {
        Wanted {
            anchor,
            size: text_size(text),
            gap: 6,
            side: Side::Right,
        }
    }

    fn assert_disjoint(placed: &[Placed]) {
        for (i, a) in placed.iter().enumerate() {
            for b in &placed[..i] {
                assert!(!a.rect.intersects(&b.rect), "{a:?} meets {b:?}");
            }
        }
    }

    #[test]
    fn a_lone_label_sits_above_right_of_its_marker() {
        let placed = place(&[wanted((100, 200), "int8")], &[], AREA);
        assert_eq!(placed[0].side, Side::Right);
        assert_eq!((placed[0].rect.left, placed[0].rect.top), (106, 186));
    }

    #[test]
    fn labels_of_one_spot_do_not_overlap() {
        let names = [
            "sparsity_50_int8",
            "static_int8_percentile",
            "qat_int8",
            "x",
            "y",
        ];
        let labels: Vec<Wanted> = names.iter().map(|n| wanted((400, 250), n)).collect();
        let placed = place(&labels, &[], AREA);
        assert_disjoint(&placed);
        // All stay near the spot: within a few rows of it.
        for p in &placed {
            assert!((p.rect.top - 250).abs() < 4 * LINE_HEIGHT, "{p:?}");
        }
    }

    #[test]
    fn labels_avoid_other_markers_when_they_can() {
        // A marker just where the first place would be.
        let marker = Rect::around((120, 192), 4);
        let placed = place(&[wanted((100, 200), "int8")], &[marker], AREA);
        assert!(!placed[0].rect.intersects(&marker), "{placed:?}");
    }

    #[test]
    fn labels_stay_inside_the_area_when_they_can() {
        // Near the top right corner: neither above nor to the right fits.
        let placed = place(&[wanted((795, 5), "a long label")], &[], AREA);
        assert!(placed[0].rect.inside(&AREA), "{placed:?}");
        assert_eq!(placed[0].side, Side::Left);
    }

    #[test]
    fn a_crowded_plot_still_places_every_label() {
        let labels: Vec<Wanted> = (0..200).map(|_| wanted((10, 10), "label")).collect();
        let placed = place(
            &labels,
            &[],
            Rect {
                right: 60,
                bottom: 40,
                ..AREA
            },
        );
        assert_eq!(placed.len(), 200);
    }
}
