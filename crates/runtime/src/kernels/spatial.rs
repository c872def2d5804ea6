//! Convolution lowering (im2col), max pooling and layout changes, generic over the element
//! type so that the f32 and the u8 paths share them.

use rayon::prelude::*;

/// Elements below which a spatial kernel stays on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// Runs `f` on the first `count` pairs of `ilen`-long chunks of `input` and `olen`-long
/// chunks of `out` (one pair an image or a plane), spread over the cores when there are at
/// least [`PARALLEL_MIN_ELEMENTS`] values on the larger side.
fn for_each_chunk<T: Sync, U: Send>(
    input: &[T],
    ilen: usize,
    out: &mut [U],
    olen: usize,
    count: usize,
    f: impl Fn(&[T], &mut [U]) + Sync + Send,
) {
    if count * ilen.max(olen) < PARALLEL_MIN_ELEMENTS || !super::may_split() {
        input
            .chunks(ilen)
            .zip(out.chunks_mut(olen))
            .take(count)
            .for_each(|(x, o)| f(x, o));
    } else {
        input
            .par_chunks(ilen)
            .zip(out.par_chunks_mut(olen))
            .take(count)
            .for_each(|(x, o)| f(x, o));
    }
}

/// The shapes of one 2-D convolution over one `channels x height x width` image, square
/// kernel, equal stride and zero padding on both axes (PyTorch's `Conv2d` with `int` args).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input channels.
    pub channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Kernel side.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding on every side.
    pub padding: usize,
}

impl ConvGeometry {
    /// Output height.
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Output width.
    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Output pixels per image: the rows im2col produces.
    pub fn pixels(&self) -> usize {
        self.out_height() * self.out_width()
    }

    /// Length of one patch, `channels * kernel^2`: the GEMM's `k`.
    pub fn patch_len(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    /// Where column `column` of a PyTorch weight row (ordered `(channel, ky, kx)`) goes in
    /// the `(ky, kx, channel)` order of [`im2col_nhwc`].
    pub fn nhwc_column(&self, column: usize) -> usize {
        let kk = self.kernel * self.kernel;
        let (c, position) = (column / kk, column % kk);
        position * self.channels + c
    }

    /// Elements of one input image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// One image's patches, one row per output pixel (row-major over `(y, x)`), columns ordered
/// `(channel, ky, kx)` like a PyTorch conv weight flattened to `out x (in * k * k)`.
fn im2col_image<T: Copy>(image: &[T], g: &ConvGeometry, pad: T, out: &mut [T], ld: usize) {
    let (k, s, p) = (g.kernel, g.stride, g.padding);
    let (ow, patch) = (g.out_width(), g.patch_len());
    for (pixel, row) in out.chunks_mut(ld).take(g.pixels()).enumerate() {
        let (oy, ox) = (pixel / ow, pixel % ow);
        let row = &mut row[..patch];
        for c in 0..g.channels {
            for ky in 0..k {
                let dst = &mut row[(c * k + ky) * k..(c * k + ky + 1) * k];
                let iy = (oy * s + ky).wrapping_sub(p);
                if iy >= g.height {
                    dst.fill(pad);
                    continue;
                }
                let src = &image[(c * g.height + iy) * g.width..(c * g.height + iy + 1) * g.width];
                let ix0 = (ox * s).wrapping_sub(p);
                // Interior patches (the common case) are one contiguous copy.
                if let Some(row) = src.get(ix0..ix0.wrapping_add(k)) {
                    dst.copy_from_slice(row);
                    continue;
                }
                for (kx, d) in dst.iter_mut().enumerate() {
                    let ix = (ox * s + kx).wrapping_sub(p);
                    *d = if ix < g.width { src[ix] } else { pad };
                }
            }
        }
    }
}

/// Patches of a batch of NCHW images: `batch * pixels` rows of `patch_len` values at row
/// stride `ld` (the columns past `patch_len` are left as they are). Out-of-image positions get
/// `pad`: 0.0 for f32, the activation zero point for u8.
///
/// # Panics
/// If `ld < patch_len` or a slice is too short.
pub fn im2col<T: Copy + Send + Sync>(
    input: &[T],
    batch: usize,
    g: &ConvGeometry,
    pad: T,
    out: &mut [T],
    ld: usize,
) {
    assert!(ld >= g.patch_len(), "row stride below the patch length");
    assert!(input.len() >= batch * g.image_len(), "input too short");
    let per_image = g.pixels() * ld;
    assert!(out.len() >= batch * per_image, "output too short");
    if batch == 0 || per_image == 0 {
        return;
    }
    for_each_chunk(
        input,
        g.image_len().max(1),
        out,
        per_image,
        batch,
        |x, o| im2col_image(x, g, pad, o, ld),
    );
}

/// One NHWC image's patches, columns ordered `(ky, kx, channel)`: one row per output pixel
/// in raster order, or, with `pool > 1`, one row per pixel of every whole `pool x pool`
/// window, window by window (see [`im2col_nhwc_pooled`]).
fn im2col_nhwc_image<T: Copy>(
    image: &[T],
    g: &ConvGeometry,
    pool: usize,
    pad: T,
    out: &mut [T],
    ld: usize,
) {
    let (k, s, p, c) = (g.kernel, g.stride, g.padding, g.channels);
    let patch = g.patch_len();
    let span = k * c;
    // One output pixel's row.
    let patch_row = |oy: usize, ox: usize, row: &mut [T]| {
        let row = &mut row[..patch];
        let ix0 = (ox * s).wrapping_sub(p);
        let interior = ix0 < g.width && ix0 + k <= g.width;
        for (ky, dst) in row.chunks_exact_mut(span).enumerate() {
            let iy = (oy * s + ky).wrapping_sub(p);
            if iy >= g.height {
                dst.fill(pad);
                continue;
            }
            let src = &image[iy * g.width * c..(iy + 1) * g.width * c];
            // Interior patches (the common case) are one contiguous copy of `k * c` values.
            if interior {
                copy_short(dst, &src[ix0 * c..(ix0 + k) * c]);
                continue;
            }
            for (kx, d) in dst.chunks_exact_mut(c).enumerate() {
                let ix = (ox * s + kx).wrapping_sub(p);
                if ix < g.width {
                    copy_short(d, &src[ix * c..(ix + 1) * c]);
                } else {
                    d.fill(pad);
                }
            }
        }
    };
    let mut rows = out.chunks_mut(ld);
    let (oh, ow) = (g.out_height(), g.out_width());
    if pool <= 1 {
        for oy in 0..oh {
            for ox in 0..ow {
                if let Some(row) = rows.next() {
                    patch_row(oy, ox, row);
                }
            }
        }
        return;
    }
    // Window by window, and inside each window in raster order.
    for wy in (0..oh / pool).map(|y| y * pool) {
        for wx in (0..ow / pool).map(|x| x * pool) {
            for oy in wy..wy + pool {
                for ox in wx..wx + pool {
                    if let Some(row) = rows.next() {
                        patch_row(oy, ox, row);
                    }
                }
            }
        }
    }
}

/// `dst.copy_from_slice(src)` for the short runs of im2col (a kernel row of a few channels:
/// 3 values for a first convolution, 48 bytes for 16 `u8` channels), in fixed-size pieces
/// that compile to a few moves instead of a library call.
#[inline(always)]
fn copy_short<T: Copy>(dst: &mut [T], src: &[T]) {
    if std::mem::size_of_val(dst) > 512 {
        dst.copy_from_slice(src);
        return;
    }
    let mut pieces = dst.chunks_exact_mut(16);
    let mut sources = src.chunks_exact(16);
    for (d, s) in (&mut pieces).zip(&mut sources) {
        let s: &[T; 16] = s.try_into().expect("pieces of 16");
        let d: &mut [T; 16] = d.try_into().expect("pieces of 16");
        *d = *s;
    }
    for (d, &v) in pieces.into_remainder().iter_mut().zip(sources.remainder()) {
        *d = v;
    }
}

/// The im2col rows of a batch of NHWC images, described rather than written out: a kernel
/// produces the rows it needs a few at a time (see [`Patches::fill`]). Rows are ordered as by
/// [`im2col_nhwc_pooled`], image by image.
#[derive(Clone, Copy, Debug)]
pub struct Patches<'a, T> {
    images: &'a [T],
    /// The convolution.
    pub geometry: ConvGeometry,
    pixels: &'a [u32],
    /// Where each pixel's window starts in its image (see [`patch_windows`]), or empty.
    windows: &'a [u32],
    pad: T,
    /// The rows described: `start..end` of all the images' rows.
    start: usize,
    end: usize,
}

/// The output pixels of one image's rows for [`Patches`], `oy << 16 | ox`, in the order of
/// [`im2col_nhwc_pooled`] with the same `pool`.
///
/// # Panics
/// If an output side is 2^16 or more.
pub fn patch_pixels(g: &ConvGeometry, pool: usize) -> Vec<u32> {
    let (oh, ow) = (g.out_height(), g.out_width());
    assert!(oh < 1 << 16 && ow < 1 << 16, "output sides below 2^16");
    let at = |oy: usize, ox: usize| ((oy as u32) << 16) | ox as u32;
    if pool <= 1 {
        return (0..oh)
            .flat_map(|oy| (0..ow).map(move |ox| at(oy, ox)))
            .collect();
    }
    let mut pixels = Vec::with_capacity(pooled_rows(g, pool));
    for wy in (0..oh / pool).map(|y| y * pool) {
        for wx in (0..ow / pool).map(|x| x * pool) {
            for oy in wy..wy + pool {
                for ox in wx..wx + pool {
                    pixels.push(at(oy, ox));
                }
            }
        }
    }
    pixels
}

/// Where the window of each of `pixels` (see [`patch_pixels`]) starts in an image under the
/// convolution `g`, `u32::MAX` for a window that is not wholly inside the image, for
/// [`Patches::with_windows`].
///
/// A 3 x 3 convolution with a 2 x 2 max pooling fused into its product, the windows looked
/// up rather than computed:
///
/// ```
/// use runtime::kernels::{
///     ConvGeometry, PackedF32, Patches, max_rows, patch_pixels, patch_windows, sgemm_patches,
/// };
///
/// let g = ConvGeometry { channels: 2, height: 8, width: 8, kernel: 3, stride: 1, padding: 0 };
/// let images: Vec<f32> = (0..2 * g.image_len()).map(|i| (i % 7) as f32 - 3.0).collect();
/// let (n, k) = (4, g.patch_len());
/// let weights: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1 - 0.2).collect();
/// let packed = PackedF32::new(&weights, n, k);
/// let bias = vec![0.5; n];
/// // Rows window by window (2 x 2 pooling), and where each one's window starts.
/// let pixels = patch_pixels(&g, 2);
/// let windows = patch_windows(&g, &pixels);
/// let patches = Patches::new(&images, g, &pixels, 0.0).with_windows(&windows);
/// let rows = patches.rows();
/// let mut pooled = vec![0.0; rows / 4 * n];
/// sgemm_patches(&patches, &packed, &bias, true, 4, &mut pooled);
/// // The same as pooling the product's rows afterwards.
/// let mut full = vec![0.0; rows * n];
/// sgemm_patches(&patches, &packed, &bias, true, 1, &mut full);
/// let mut expected = vec![0.0; rows / 4 * n];
/// max_rows(&full, 4, n, &mut expected);
/// assert_eq!(pooled, expected);
/// ```
///
/// # Panics
/// If an image has 2^32 - 1 values or more.
pub fn patch_windows(g: &ConvGeometry, pixels: &[u32]) -> Vec<u32> {
    assert!(
        g.image_len() < u32::MAX as usize,
        "images below 2^32 - 1 values"
    );
    pixels
        .iter()
        .map(|&pixel| window_start(g, pixel).map_or(u32::MAX, |at| at as u32))
        .collect()
}

/// Where the window of the output pixel `pixel` (`oy << 16 | ox`) starts in its image, or
/// `None` when it is not wholly inside the image.
fn window_start(g: &ConvGeometry, pixel: u32) -> Option<usize> {
    let (oy, ox) = ((pixel >> 16) as usize, (pixel & 0xffff) as usize);
    let iy0 = (oy * g.stride).checked_sub(g.padding)?;
    let ix0 = (ox * g.stride).checked_sub(g.padding)?;
    (iy0 + g.kernel <= g.height && ix0 + g.kernel <= g.width)
        .then(|| (iy0 * g.width + ix0) * g.channels)
}

impl<'a, T: Copy> Patches<'a, T> {
    /// The rows of `images` (`image_len` values each, NHWC) under the convolution `geometry`,
    /// one per entry of `pixels` (the output pixel of each of an image's rows, see
    /// [`patch_pixels`]) and image, out-of-image positions `pad`.
    ///
    /// # Panics
    /// If a pixel is outside the convolution's output.
    pub fn new(images: &'a [T], geometry: ConvGeometry, pixels: &'a [u32], pad: T) -> Self {
        let (oh, ow) = (geometry.out_height(), geometry.out_width());
        assert!(
            pixels
                .iter()
                .all(|&p| ((p >> 16) as usize) < oh && ((p & 0xffff) as usize) < ow),
            "pixels inside the output"
        );
        let len = geometry.image_len();
        let end = images.len().checked_div(len).unwrap_or(0) * pixels.len();
        Self {
            images,
            geometry,
            pixels,
            windows: &[],
            pad,
            start: 0,
            end,
        }
    }

    /// These patches with the start of every pixel's window in its image precomputed by
    /// [`patch_windows`] (for the same geometry and pixels), which makes
    /// [`Patches::windows`] a lookup.
    ///
    /// # Panics
    /// If `windows` is not one entry per pixel.
    pub fn with_windows(self, windows: &'a [u32]) -> Self {
        assert_eq!(windows.len(), self.pixels.len(), "one window per pixel");
        Self { windows, ..self }
    }

    /// The rows `range` of these rows.
    ///
    /// # Panics
    /// If the range runs past [`Patches::rows`].
    pub fn rows_range(&self, range: std::ops::Range<usize>) -> Self {
        assert!(range.start <= range.end && range.end <= self.rows());
        Self {
            start: self.start + range.start,
            end: self.start + range.end,
            ..*self
        }
    }

    /// The number of rows.
    pub fn rows(&self) -> usize {
        self.end - self.start
    }

    /// The images these rows are taken from.
    pub fn images(&self) -> &'a [T] {
        self.images
    }

    /// The indices of the images that these rows take their windows from.
    pub fn image_range(&self) -> std::ops::Range<usize> {
        let per_image = self.pixels.len();
        if self.rows() == 0 || per_image == 0 {
            return 0..0;
        }
        self.start / per_image..(self.end - 1) / per_image + 1
    }

    /// Where the windows of rows `first..first + out.len()` start in [`Patches::images`]:
    /// each is `kernel` runs of `kernel * channels` values, `width * channels` apart. Returns
    /// false, leaving `out` unspecified, when a window is not wholly inside its image (never
    /// so without padding).
    ///
    /// # Panics
    /// If the rows run past [`Patches::rows`].
    pub fn windows(&self, first: usize, out: &mut [usize]) -> bool {
        self.windows_every(first, 1, out)
    }

    /// [`Patches::windows`] of every `step`-th row: `out[i]` is the start of row
    /// `first + i * step`'s window.
    ///
    /// # Panics
    /// If `step` is 0 or the rows run past [`Patches::rows`].
    pub fn windows_every(&self, first: usize, step: usize, out: &mut [usize]) -> bool {
        assert!(step > 0, "a step of at least one row");
        if out.is_empty() {
            return true;
        }
        assert!(
            first + (out.len() - 1) * step < self.rows(),
            "rows inside the patches"
        );
        let g = &self.geometry;
        let row = first + self.start;
        let per_image = self.pixels.len();
        let (mut image, mut index) = (row / per_image, row % per_image);
        let next = |image: &mut usize, index: &mut usize| {
            *index += step;
            while *index >= per_image {
                (*image, *index) = (*image + 1, *index - per_image);
            }
        };
        if !self.windows.is_empty() {
            for at in out {
                let window = self.windows[index];
                if window == u32::MAX {
                    return false;
                }
                *at = image * g.image_len() + window as usize;
                next(&mut image, &mut index);
            }
            return true;
        }
        for at in out {
            let Some(window) = window_start(g, self.pixels[index]) else {
                return false;
            };
            *at = image * g.image_len() + window;
            next(&mut image, &mut index);
        }
        true
    }

    /// Writes rows `first..first + count` into `dst`, `ld` values apart (at least
    /// `patch_len`; the values past it are left as they are), converted to `U`.
    ///
    /// # Panics
    /// If the rows run past [`Patches::rows`] or `dst` is too short.
    pub fn fill<U: Copy + From<T>>(&self, first: usize, count: usize, dst: &mut [U], ld: usize) {
        assert!(first + count <= self.rows(), "rows inside the patches");
        if count == 0 {
            return;
        }
        let first = first + self.start;
        let g = &self.geometry;
        let (k, s, p, c) = (g.kernel, g.stride, g.padding, g.channels);
        let span = k * c;
        let per_image = self.pixels.len();
        assert!(ld >= g.patch_len());
        assert!(count == 0 || dst.len() >= (count - 1) * ld + g.patch_len());
        let pad = U::from(self.pad);
        let (mut image, mut index) = (first / per_image, first % per_image);
        for row in dst.chunks_mut(ld).take(count) {
            let pixel = self.pixels[index];
            let (oy, ox) = ((pixel >> 16) as usize, (pixel & 0xffff) as usize);
            let base = &self.images[image * g.image_len()..(image + 1) * g.image_len()];
            let ix0 = (ox * s).wrapping_sub(p);
            let iy0 = (oy * s).wrapping_sub(p);
            let interior = ix0 < g.width && ix0 + k <= g.width;
            index += 1;
            if index == per_image {
                (image, index) = (image + 1, 0);
            }
            // The common case: the whole window inside the image, `k` runs of `span`
            // contiguous values.
            if interior && iy0 < g.height && iy0 + k <= g.height {
                let row_stride = g.width * c;
                let origin = iy0 * row_stride + ix0 * c;
                // Checked once for the whole window: its last value is inside the image.
                assert!(origin + (k - 1) * row_stride + span <= base.len());
                let row = &mut row[..k * span];
                for ky in 0..k {
                    // SAFETY: `origin + ky * row_stride + span <= base.len()` (asserted for
                    // the last `ky`), and `row` holds `k * span` values.
                    unsafe {
                        let src = base.as_ptr().add(origin + ky * row_stride);
                        let dst = row.as_mut_ptr().add(ky * span);
                        for e in 0..span {
                            *dst.add(e) = U::from(*src.add(e));
                        }
                    }
                }
                continue;
            }
            for (ky, dst) in row[..g.patch_len()].chunks_exact_mut(span).enumerate() {
                let iy = (oy * s + ky).wrapping_sub(p);
                if iy >= g.height {
                    dst.fill(pad);
                    continue;
                }
                let src = &base[iy * g.width * c..(iy + 1) * g.width * c];
                if interior {
                    for (d, &v) in dst.iter_mut().zip(&src[ix0 * c..(ix0 + k) * c]) {
                        *d = U::from(v);
                    }
                    continue;
                }
                for (kx, d) in dst.chunks_exact_mut(c).enumerate() {
                    let ix = (ox * s + kx).wrapping_sub(p);
                    if ix < g.width {
                        for (d, &v) in d.iter_mut().zip(&src[ix * c..(ix + 1) * c]) {
                            *d = U::from(v);
                        }
                    } else {
                        d.fill(pad);
                    }
                }
            }
        }
    }
}

impl Patches<'_, u8> {
    /// [`Patches::fill`] into `u16`, faster where the windows are inside their images:
    /// their runs are widened 8 values at a time. Unlike [`Patches::fill`], the values of a
    /// row past `patch_len` (up to `ld`) may be overwritten with arbitrary values below 256,
    /// and so may the values after the last row, up to the end of `dst`.
    ///
    /// # Panics
    /// As [`Patches::fill`].
    pub fn fill_u16(&self, first: usize, count: usize, dst: &mut [u16], ld: usize) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("sse4.1") {
            // SAFETY: SSE4.1 was just detected.
            unsafe { self.fill_u16_sse41(first, count, dst, ld) };
            return;
        }
        self.fill(first, count, dst, ld);
    }

    /// [`Patches::fill_u16`] with SSE4.1's 8-wide widening.
    ///
    /// # Safety
    /// The CPU must support SSE4.1.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "sse4.1")]
    unsafe fn fill_u16_sse41(&self, first: usize, count: usize, dst: &mut [u16], ld: usize) {
        use std::arch::x86_64::{__m128i, _mm_cvtepu8_epi16, _mm_loadl_epi64, _mm_storeu_si128};
        let g = self.geometry;
        assert!(first + count <= self.rows(), "rows inside the patches");
        assert!(ld >= g.patch_len());
        assert!(count == 0 || dst.len() >= (count - 1) * ld + g.patch_len());
        let (span, stride) = (g.kernel * g.channels, g.width * g.channels);
        let mut at = [0usize; 16];
        let mut row = 0;
        while row < count {
            let chunk = (count - row).min(at.len());
            if !self.windows(first + row, &mut at[..chunk]) {
                // Some window reaches into the padding: the general path for these rows.
                let end = (row + chunk - 1) * ld + g.patch_len();
                self.fill(first + row, chunk, &mut dst[row * ld..end], ld);
                row += chunk;
                continue;
            }
            for (i, &origin) in at[..chunk].iter().enumerate() {
                let base = (row + i) * ld;
                for ky in 0..g.kernel {
                    let (src, out) = (origin + ky * stride, base + ky * span);
                    let mut e = 0;
                    // Whole groups of 8, and a last partial group where 8 values can be read
                    // and written (the extra ones land on later values of this row, which
                    // are written after, or past `patch_len`).
                    while e < span {
                        if src + e + 8 <= self.images.len() && out + e + 8 <= dst.len() {
                            // SAFETY: 8 bytes readable and 8 `u16` writable, just checked.
                            unsafe {
                                let v = _mm_loadl_epi64(self.images.as_ptr().add(src + e).cast());
                                let p = dst.as_mut_ptr().add(out + e).cast::<__m128i>();
                                _mm_storeu_si128(p, _mm_cvtepu8_epi16(v));
                            }
                            e += 8;
                        } else {
                            dst[out + e] = u16::from(self.images[src + e]);
                            e += 1;
                        }
                    }
                }
            }
            row += chunk;
        }
    }
}

/// Rows per image of [`im2col_nhwc_pooled`]: the output pixels of the whole `pool x pool`
/// windows (all of them when `pool` is 1).
pub fn pooled_rows(g: &ConvGeometry, pool: usize) -> usize {
    if pool <= 1 {
        g.pixels()
    } else {
        (g.out_height() / pool) * (g.out_width() / pool) * pool * pool
    }
}

/// Patches of a batch of NHWC images (`height x width x channels` each): `batch * pixels`
/// rows of `patch_len` values at row stride `ld`, columns ordered `(ky, kx, channel)` (a
/// PyTorch weight needs its columns permuted to match, see [`ConvGeometry::nhwc_column`]).
/// Out-of-image positions get `pad`; the columns past `patch_len` are left as they are.
///
/// # Panics
/// If `ld < patch_len` or a slice is too short.
pub fn im2col_nhwc<T: Copy + Send + Sync>(
    input: &[T],
    batch: usize,
    g: &ConvGeometry,
    pad: T,
    out: &mut [T],
    ld: usize,
) {
    im2col_nhwc_pooled(input, batch, g, 1, pad, out, ld);
}

/// [`im2col_nhwc`] for a convolution followed by a `pool x pool` max pooling of stride
/// `pool`: only the output pixels that some window covers get a row ([`pooled_rows`] per
/// image), ordered window by window (windows in raster order, and inside each the `pool^2`
/// pixels in raster order), so that the product's rows pool in consecutive groups.
///
/// # Panics
/// If `pool` is 0, `ld < patch_len` or a slice is too short.
pub fn im2col_nhwc_pooled<T: Copy + Send + Sync>(
    input: &[T],
    batch: usize,
    g: &ConvGeometry,
    pool: usize,
    pad: T,
    out: &mut [T],
    ld: usize,
) {
    assert!(pool > 0, "pooling windows have at least one pixel");
    assert!(ld >= g.patch_len(), "row stride below the patch length");
    assert!(input.len() >= batch * g.image_len(), "input too short");
    let per_image = pooled_rows(g, pool) * ld;
    assert!(out.len() >= batch * per_image, "output too short");
    if batch == 0 || per_image == 0 || g.image_len() == 0 {
        return;
    }
    for_each_chunk(input, g.image_len(), out, per_image, batch, |x, o| {
        im2col_nhwc_image(x, g, pool, pad, o, ld)
    });
}

/// `out[w][j] = max_r y[w * group + r][j]`: the maximum of each run of `group` consecutive
/// rows of `n` values (the pooling windows of [`im2col_nhwc_pooled`]'s row order).
///
/// # Panics
/// If `group` or `n` is 0 or `out` is shorter than `y.len() / group`.
pub fn max_rows<T: Copy + PartialOrd>(y: &[T], group: usize, n: usize, out: &mut [T]) {
    assert!(group > 0 && n > 0, "groups and rows are not empty");
    let windows = y.len() / (group * n);
    assert!(out.len() >= windows * n, "output too short");
    for (rows, best) in y.chunks_exact(group * n).zip(out.chunks_exact_mut(n)) {
        best.copy_from_slice(&rows[..n]);
        for row in rows[n..].chunks_exact(n) {
            // A select and an unconditional store: the loop vectorises.
            for (b, &v) in best.iter_mut().zip(row) {
                *b = if v > *b { v } else { *b };
            }
        }
    }
}

/// Max pooling without padding over a batch of NHWC images (`height x width x channels`
/// each); the output is NHWC too. Returns the output height and width.
///
/// # Panics
/// If `kernel` or `stride` is 0, the window is larger than the image, or a slice is too short.
#[allow(clippy::too_many_arguments)]
pub fn max_pool2d_nhwc<T: Copy + PartialOrd + Send + Sync>(
    input: &[T],
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    out: &mut [T],
) -> (usize, usize) {
    assert!(kernel > 0 && stride > 0 && kernel <= height && kernel <= width);
    let (oh, ow) = (
        (height - kernel) / stride + 1,
        (width - kernel) / stride + 1,
    );
    let (ilen, olen) = (height * width * channels, oh * ow * channels);
    assert!(input.len() >= batch * ilen && out.len() >= batch * olen);
    if batch == 0 || olen == 0 {
        return (oh, ow);
    }
    let image = |x: &[T], o: &mut [T]| {
        for (pixel, best) in o.chunks_exact_mut(channels).enumerate() {
            let (oy, ox) = (pixel / ow, pixel % ow);
            let first = (oy * stride * width + ox * stride) * channels;
            best.copy_from_slice(&x[first..first + channels]);
            for ky in 0..kernel {
                for kx in 0..kernel {
                    let at = ((oy * stride + ky) * width + ox * stride + kx) * channels;
                    // A select and an unconditional store (not a conditional store): the
                    // loop vectorises to byte or float maxima.
                    for (b, &v) in best.iter_mut().zip(&x[at..at + channels]) {
                        *b = if v > *b { v } else { *b };
                    }
                }
            }
        }
    };
    for_each_chunk(input, ilen, out, olen, batch, image);
    (oh, ow)
}

/// Max pooling without padding over `planes` planes of `height x width` (a batch of NCHW
/// images is `batch * channels` planes). Returns the output height and width.
///
/// # Panics
/// If `kernel` or `stride` is 0, the window is larger than the plane, or a slice is too short.
#[allow(clippy::too_many_arguments)]
pub fn max_pool2d<T: Copy + PartialOrd + Send + Sync>(
    input: &[T],
    planes: usize,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    out: &mut [T],
) -> (usize, usize) {
    assert!(kernel > 0 && stride > 0 && kernel <= height && kernel <= width);
    let (oh, ow) = (
        (height - kernel) / stride + 1,
        (width - kernel) / stride + 1,
    );
    assert!(input.len() >= planes * height * width && out.len() >= planes * oh * ow);
    let plane = |x: &[T], o: &mut [T]| {
        for (oy, out_row) in o.chunks_exact_mut(ow).enumerate() {
            let window_rows = &x[oy * stride * width..(oy * stride + kernel) * width];
            for (ox, best) in out_row.iter_mut().enumerate() {
                let mut m = window_rows[ox * stride];
                for row in window_rows.chunks_exact(width) {
                    for &v in &row[ox * stride..ox * stride + kernel] {
                        if v > m {
                            m = v;
                        }
                    }
                }
                *best = m;
            }
        }
    };
    let (ilen, olen) = (height * width, oh * ow);
    for_each_chunk(input, ilen, out, olen, planes, plane);
    (oh, ow)
}

/// Reorders `batch` blocks of `pixels x channels` (what a GEMM over im2col rows produces) into
/// `batch` blocks of `channels x pixels` (NCHW).
///
/// # Panics
/// If a slice is shorter than `batch * pixels * channels`.
pub fn nhwc_to_nchw<T: Copy + Send + Sync>(
    input: &[T],
    batch: usize,
    pixels: usize,
    channels: usize,
    out: &mut [T],
) {
    let len = pixels * channels;
    assert!(input.len() >= batch * len && out.len() >= batch * len);
    if len == 0 {
        return;
    }
    let image = |x: &[T], o: &mut [T]| {
        for (p, row) in x.chunks_exact(channels).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                o[c * pixels + p] = v;
            }
        }
    };
    for_each_chunk(input, len, out, len, batch, image);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Direct convolution of one image, the definition im2col must reproduce.
    fn direct_conv(x: &[i64], g: &ConvGeometry, w: &[i64], out_ch: usize) -> Vec<i64> {
        let (oh, ow, k) = (g.out_height(), g.out_width(), g.kernel);
        let mut out = vec![0; out_ch * oh * ow];
        for o in 0..out_ch {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut s = 0;
                    for c in 0..g.channels {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * g.stride + ky) as i64 - g.padding as i64;
                                let ix = (ox * g.stride + kx) as i64 - g.padding as i64;
                                if iy >= 0
                                    && ix >= 0
                                    && (iy as usize) < g.height
                                    && (ix as usize) < g.width
                                {
                                    s += x[(c * g.height + iy as usize) * g.width + ix as usize]
                                        * w[((o * g.channels + c) * k + ky) * k + kx];
                                }
                            }
                        }
                    }
                    out[(o * oh + oy) * ow + ox] = s;
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn im2col_then_product_is_the_direct_convolution(
            channels in 1usize..4, height in 1usize..12, width in 1usize..12, kernel in 1usize..5,
            stride in 1usize..4, padding in 0usize..3, out_ch in 1usize..4, batch in 1usize..3,
        ) {
            prop_assume!(kernel <= height + 2 * padding && kernel <= width + 2 * padding);
            let g = ConvGeometry { channels, height, width, kernel, stride, padding };
            let x: Vec<i64> = (0..batch * g.image_len()).map(|i| (i as i64 * 7919) % 13 - 6).collect();
            let w: Vec<i64> = (0..out_ch * g.patch_len()).map(|i| (i as i64 * 104_729) % 11 - 5).collect();
            let ld = g.patch_len() + 3;
            let mut cols = vec![99; batch * g.pixels() * ld];
            im2col(&x, batch, &g, 0, &mut cols, ld);
            let mut nhwc = vec![0; batch * g.pixels() * out_ch];
            for (row, out) in cols.chunks(ld).zip(nhwc.chunks_mut(out_ch)) {
                for (o, y) in out.iter_mut().enumerate() {
                    *y = (0..g.patch_len()).map(|i| row[i] * w[o * g.patch_len() + i]).sum();
                }
            }
            let mut nchw = vec![0; nhwc.len()];
            nhwc_to_nchw(&nhwc, batch, g.pixels(), out_ch, &mut nchw);
            for b in 0..batch {
                let image = &x[b * g.image_len()..(b + 1) * g.image_len()];
                let expected = direct_conv(image, &g, &w, out_ch);
                let len = expected.len();
                prop_assert_eq!(&nchw[b * len..(b + 1) * len], &expected[..]);
            }
        }

        #[test]
        fn nhwc_im2col_with_permuted_weights_is_the_direct_convolution(
            channels in 1usize..4, height in 1usize..12, width in 1usize..12, kernel in 1usize..5,
            stride in 1usize..4, padding in 0usize..3, out_ch in 1usize..4, batch in 1usize..3,
        ) {
            prop_assume!(kernel <= height + 2 * padding && kernel <= width + 2 * padding);
            let g = ConvGeometry { channels, height, width, kernel, stride, padding };
            let x: Vec<i64> = (0..batch * g.image_len()).map(|i| (i as i64 * 7919) % 13 - 6).collect();
            let w: Vec<i64> = (0..out_ch * g.patch_len()).map(|i| (i as i64 * 104_729) % 11 - 5).collect();
            let (hw, k) = (height * width, g.patch_len());
            let mut nhwc_x = vec![0; x.len()];
            nhwc_to_nchw(&x, batch, channels, hw, &mut nhwc_x);
            let mut w_perm = vec![0; w.len()];
            for o in 0..out_ch {
                for col in 0..k {
                    w_perm[o * k + g.nhwc_column(col)] = w[o * k + col];
                }
            }
            let ld = k + 2;
            let mut cols = vec![99; batch * g.pixels() * ld];
            im2col_nhwc(&nhwc_x, batch, &g, 0, &mut cols, ld);
            for b in 0..batch {
                let image = &x[b * g.image_len()..(b + 1) * g.image_len()];
                let expected = direct_conv(image, &g, &w, out_ch);
                for p in 0..g.pixels() {
                    let row = &cols[(b * g.pixels() + p) * ld..][..k];
                    for o in 0..out_ch {
                        let got: i64 = (0..k).map(|i| row[i] * w_perm[o * k + i]).sum();
                        prop_assert_eq!(got, expected[o * g.pixels() + p]);
                    }
                }
            }
        }

        #[test]
        fn nhwc_max_pool_is_the_planar_one_transposed(batch in 1usize..3, channels in 1usize..5, height in 1usize..10, width in 1usize..10, kernel in 1usize..4, stride in 1usize..4) {
            prop_assume!(kernel <= height && kernel <= width);
            let x: Vec<i32> = (0..batch * channels * height * width).map(|i| (i as i32 * 7919) % 101).collect();
            let (oh, ow) = ((height - kernel) / stride + 1, (width - kernel) / stride + 1);
            let mut planar = vec![0; batch * channels * oh * ow];
            max_pool2d(&x, batch * channels, height, width, kernel, stride, &mut planar);
            let mut nhwc_x = vec![0; x.len()];
            nhwc_to_nchw(&x, batch, channels, height * width, &mut nhwc_x);
            let mut out = vec![0; planar.len()];
            prop_assert_eq!(max_pool2d_nhwc(&nhwc_x, batch, channels, height, width, kernel, stride, &mut out), (oh, ow));
            let mut back = vec![0; out.len()];
            nhwc_to_nchw(&out, batch, oh * ow, channels, &mut back);
            prop_assert_eq!(back, planar);
        }

        #[test]
        fn max_pool_takes_window_maxima(planes in 1usize..4, height in 1usize..10, width in 1usize..10, kernel in 1usize..4, stride in 1usize..4) {
            prop_assume!(kernel <= height && kernel <= width);
            let x: Vec<i32> = (0..planes * height * width).map(|i| (i as i32 * 7919) % 101).collect();
            let (oh, ow) = ((height - kernel) / stride + 1, (width - kernel) / stride + 1);
            let mut out = vec![0; planes * oh * ow];
            prop_assert_eq!(max_pool2d(&x, planes, height, width, kernel, stride, &mut out), (oh, ow));
            for p in 0..planes {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let expected = (0..kernel)
                            .flat_map(|ky| (0..kernel).map(move |kx| (ky, kx)))
                            .map(|(ky, kx)| x[(p * height + oy * stride + ky) * width + ox * stride + kx])
                            .max()
                            .unwrap();
                        prop_assert_eq!(out[(p * oh + oy) * ow + ox], expected);
                    }
                }
            }
        }
    }
}
