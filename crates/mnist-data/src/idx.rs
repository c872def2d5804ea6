//! Byte-level IDX and gzip handling. Every function here accepts arbitrary bytes without
//! panicking, and never allocates more than the input (or the decompression cap) justifies.

use std::io::{Read, Write};

use ndarray::{Array1, Array3};

use crate::{Error, Result};

/// Magic number of an IDX file of unsigned bytes with three dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with one dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// The largest decompressed size [`gunzip`] accepts (256 MiB; MNIST train images are 47 MB).
pub const MAX_DECOMPRESSED_BYTES: usize = 256 << 20;
/// The largest image side (rows or cols) [`parse_images`] accepts.
pub const MAX_SIDE: usize = 1 << 14;
/// The number of label classes; labels must be in `0..NUM_CLASSES`.
pub const NUM_CLASSES: usize = 10;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Decompresses gzip data (one or more concatenated members), capped at
/// [`MAX_DECOMPRESSED_BYTES`]; `name` is used in error messages.
pub fn gunzip(name: &str, gz_bytes: &[u8]) -> Result<Vec<u8>> {
    gunzip_capped(name, gz_bytes, MAX_DECOMPRESSED_BYTES)
}

pub(crate) fn gunzip_capped(name: &str, gz_bytes: &[u8], limit: usize) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::BadGzip {
        file: name.to_owned(),
        reason,
    };
    if !gz_bytes.starts_with(&GZIP_MAGIC) {
        return Err(bad("not gzip data (missing magic bytes 1f 8b)".into()));
    }
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    flate2::read::MultiGzDecoder::new(gz_bytes)
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| {
            bad(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the gzip stream is truncated (it ends before its end marker)".into()
            } else {
                e.to_string()
            })
        })?;
    if out.len() > limit {
        return Err(Error::TooLarge {
            file: name.to_owned(),
            limit,
        });
    }
    Ok(out)
}

/// Compresses bytes with gzip at the best compression level.
pub(crate) fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes)?;
    encoder.finish()
}

/// Parses an uncompressed IDX3 images file (magic 0x00000803, big-endian `u32` count, rows,
/// cols, then `count * rows * cols` pixel bytes) into an `(count, rows, cols)` array.
///
/// Rows and cols must be in `1..=MAX_SIDE`; the payload length must match the header exactly
/// ([`Error::Truncated`] if short, [`Error::TrailingData`] if long).
pub fn parse_images(name: &str, idx_bytes: &[u8]) -> Result<Array3<u8>> {
    let ([count, rows, cols], payload) = parse_header(name, idx_bytes, IMAGES_MAGIC)?;
    let wrong = |reason: String| Error::WrongDimensions {
        file: name.to_owned(),
        reason,
    };
    for (axis, side) in [("rows", rows), ("cols", cols)] {
        if !(1..=MAX_SIDE).contains(&side) {
            return Err(wrong(format!(
                "{axis} is {side}, must be in 1..={MAX_SIDE}"
            )));
        }
    }
    let size = count.checked_mul(rows).and_then(|s| s.checked_mul(cols));
    let size = size.ok_or_else(|| wrong(format!("{count} x {rows} x {cols} overflows")))?;
    check_len(name, idx_bytes.len() - payload.len(), payload.len(), size)?;
    Array3::from_shape_vec((count, rows, cols), payload.to_vec()).map_err(|e| wrong(e.to_string()))
}

/// Parses an uncompressed IDX1 labels file (magic 0x00000801, big-endian `u32` count, then
/// `count` label bytes, each in `0..=9`).
pub fn parse_labels(name: &str, idx_bytes: &[u8]) -> Result<Array1<u8>> {
    let ([count], payload) = parse_header(name, idx_bytes, LABELS_MAGIC)?;
    check_len(name, idx_bytes.len() - payload.len(), payload.len(), count)?;
    if let Some((index, &label)) = payload
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= NUM_CLASSES)
    {
        return Err(Error::LabelOutOfRange {
            file: name.to_owned(),
            index,
            label,
        });
    }
    Ok(Array1::from(payload.to_vec()))
}

/// Encodes images as an uncompressed IDX3 file; fails if a dimension does not fit in `u32`.
pub fn encode_images(images: &Array3<u8>) -> Result<Vec<u8>> {
    let (n, rows, cols) = images.dim();
    encode(IMAGES_MAGIC, &[n, rows, cols], images.iter())
}

/// Encodes labels as an uncompressed IDX1 file; fails if the count does not fit in `u32`.
pub fn encode_labels(labels: &Array1<u8>) -> Result<Vec<u8>> {
    encode(LABELS_MAGIC, &[labels.len()], labels.iter())
}

fn encode<'a>(
    magic: u32,
    dims: &[usize],
    data: impl ExactSizeIterator<Item = &'a u8>,
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(4 * (dims.len() + 1) + data.len());
    out.extend(magic.to_be_bytes());
    for &d in dims {
        let d = u32::try_from(d).map_err(|_| Error::WrongDimensions {
            file: "<encoded data>".into(),
            reason: format!("dimension {d} does not fit in u32"),
        })?;
        out.extend(d.to_be_bytes());
    }
    out.extend(data);
    Ok(out)
}

/// Checks the magic number and splits off a header of `D` big-endian `u32` dimensions.
fn parse_header<'a, const D: usize>(
    name: &str,
    bytes: &'a [u8],
    magic: u32,
) -> Result<([usize; D], &'a [u8])> {
    let header_len = 4 * (D + 1);
    let (words, _) = bytes.as_chunks::<4>();
    let mut words = words.iter().map(|w| u32::from_be_bytes(*w));
    if let Some(found) = words.next()
        && found != magic
    {
        return Err(Error::WrongMagic {
            file: name.to_owned(),
            expected: magic,
            found,
        });
    }
    let Some((_, payload)) = bytes.split_at_checked(header_len) else {
        return Err(Error::Truncated {
            file: name.to_owned(),
            expected: header_len,
            actual: bytes.len(),
        });
    };
    // `u32 -> usize` is lossless on the 32- and 64-bit targets this crate supports.
    let dims = std::array::from_fn(|_| words.next().unwrap_or(0) as usize);
    Ok((dims, payload))
}

/// Compares the payload length with the `size` the header implies.
fn check_len(name: &str, header: usize, payload: usize, size: usize) -> Result<()> {
    let expected = header
        .checked_add(size)
        .ok_or_else(|| Error::WrongDimensions {
            file: name.to_owned(),
            reason: format!("payload of {size} bytes overflows"),
        })?;
    let (file, actual) = (name.to_owned(), header + payload);
    match payload.cmp(&size) {
        std::cmp::Ordering::Less => Err(Error::Truncated {
            file,
            expected,
            actual,
        }),
        std::cmp::Ordering::Greater => Err(Error::TrailingData {
            file,
            expected,
            actual,
        }),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gunzip_caps_decompressed_size() {
        let gz = gzip(&[0u8; 1000]).unwrap();
        assert_eq!(gunzip_capped("x.gz", &gz, 1000).unwrap().len(), 1000);
        let err = gunzip_capped("x.gz", &gz, 999).unwrap_err();
        assert!(matches!(err, Error::TooLarge { limit: 999, .. }), "{err}");
        assert!(err.to_string().contains("x.gz"));
    }

    #[test]
    fn gunzip_rejects_non_gzip_and_empty_input() {
        for bytes in [&b""[..], b"\x1f", b"IDX data", b"\x1f\x8b"] {
            assert!(
                matches!(gunzip("g", bytes), Err(Error::BadGzip { .. })),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn gunzip_reads_concatenated_members() {
        let mut gz = gzip(b"ab").unwrap();
        gz.extend(gzip(b"cd").unwrap());
        assert_eq!(gunzip("g", &gz).unwrap(), b"abcd");
    }

    #[test]
    fn header_errors() {
        let err = parse_labels("l", &[0, 0, 8]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Truncated {
                    expected: 8,
                    actual: 3,
                    ..
                }
            ),
            "{err}"
        );
        let err = parse_labels("l", &[0, 0, 8, 3, 0, 0, 0, 0]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::WrongMagic {
                    expected: LABELS_MAGIC,
                    found: 0x803,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "wrong magic number in l: expected 0x00000801, found 0x00000803"
        );
        let err = parse_images("i", &[0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 1]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Truncated {
                    expected: 16,
                    actual: 12,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn huge_header_counts_are_rejected_before_allocating() {
        let max = u32::MAX.to_be_bytes();
        let side = (MAX_SIDE as u32).to_be_bytes();
        let images: Vec<u8> = [IMAGES_MAGIC.to_be_bytes(), max, side, side].concat();
        let err = parse_images("i", &images).unwrap_err();
        assert!(matches!(err, Error::Truncated { .. }), "{err}");
        let images: Vec<u8> = [IMAGES_MAGIC.to_be_bytes(), max, max, max].concat();
        assert!(matches!(
            parse_images("i", &images),
            Err(Error::WrongDimensions { .. })
        ));
        let empty_but_wide: Vec<u8> = [IMAGES_MAGIC.to_be_bytes(), [0; 4], side, side].concat();
        assert_eq!(
            parse_images("i", &empty_but_wide).unwrap().dim(),
            (0, MAX_SIDE, MAX_SIDE)
        );
        let labels: Vec<u8> = [LABELS_MAGIC.to_be_bytes(), max].concat();
        assert!(matches!(
            parse_labels("l", &labels),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn trailing_bytes_and_bad_labels() {
        let mut labels = encode_labels(&Array1::from(vec![0, 9, 3])).unwrap();
        assert_eq!(parse_labels("l", &labels).unwrap().to_vec(), [0, 9, 3]);
        labels.push(1);
        let err = parse_labels("l", &labels).unwrap_err();
        assert!(
            matches!(
                err,
                Error::TrailingData {
                    expected: 11,
                    actual: 12,
                    ..
                }
            ),
            "{err}"
        );
        labels.pop();
        labels[9] = 10;
        let err = parse_labels("l", &labels).unwrap_err();
        assert!(
            matches!(
                err,
                Error::LabelOutOfRange {
                    index: 1,
                    label: 10,
                    ..
                }
            ),
            "{err}"
        );
    }
}
