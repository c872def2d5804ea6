//! Grouped and depthwise convolutions over NHWC images, computed directly (no im2col): each
//! output pixel accumulates its window tap by tap, every output channel at once, so the
//! innermost loop runs over contiguous channels. The kernels also take what the GEMM path
//! does not: rectangular kernels and unequal strides or paddings.

use super::ConvGeometry;

/// A convolution's shape over one NHWC image: input channels and size, kernel, stride and
/// padding per axis (`[height, width]`, PyTorch's order), output channels and groups.
///
/// ```
/// use runtime::kernels::{Grouped, grouped_conv_f32};
///
/// // A depthwise 1x3 kernel over two channels of a 2x4 image, padded by one column on each
/// // side, stride 2 across: PyTorch's `Conv2d(2, 2, (1, 3), (1, 2), (0, 1), groups=2)`.
/// let shape = Grouped {
///     channels: 2, height: 2, width: 4,
///     kernel: [1, 3], stride: [1, 2], padding: [0, 1],
///     out: 2, groups: 2,
/// };
/// assert_eq!((shape.out_height(), shape.out_width()), (2, 2));
/// assert_eq!(shape.geometry(), None, "not square: the GEMM kernels do not take it");
/// // NHWC input: channel 0 holds 1..=8 row by row, channel 1 holds 10 everywhere.
/// let x: Vec<f32> = (1..=8).flat_map(|v| [v as f32, 10.0]).collect();
/// // PyTorch's [out, in / groups, kh, kw] weight: channel 0 sums its window, channel 1
/// // takes its right neighbour.
/// let weight = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0];
/// let mut y = vec![0.0; shape.out_len()];
/// let (w, bias) = (shape.pack(&weight), [0.0, 0.5]);
/// grouped_conv_f32(&shape, &shape.taps(), &x, 1, (&w, &bias), false, &mut y);
/// // Row 0, column 0 reads columns -1..=1: 0 + 1 + 2 and 10 + 0.5;
/// // column 1 reads columns 1..=3: 2 + 3 + 4 and 10 + 0.5.
/// assert_eq!(&y[..4], &[3.0, 10.5, 9.0, 10.5]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grouped {
    /// Input channels in all.
    pub channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Vertical and horizontal stride.
    pub stride: [usize; 2],
    /// Zero padding above and below, left and right.
    pub padding: [usize; 2],
    /// Output channels, a multiple of `groups`.
    pub out: usize,
    /// Channel groups, dividing the input and output channels.
    pub groups: usize,
}

impl Grouped {
    /// The square geometry of this convolution, when kernel, stride and padding agree on
    /// both axes: what the GEMM kernels take.
    pub fn geometry(&self) -> Option<ConvGeometry> {
        let same = |v: [usize; 2]| (v[0] == v[1]).then_some(v[0]);
        Some(ConvGeometry {
            channels: self.channels,
            height: self.height,
            width: self.width,
            kernel: same(self.kernel)?,
            stride: same(self.stride)?,
            padding: same(self.padding)?,
        })
    }

    /// Output height.
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding[0] - self.kernel[0]) / self.stride[0] + 1
    }

    /// Output width.
    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding[1] - self.kernel[1]) / self.stride[1] + 1
    }

    /// Values per input image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Input channels per group.
    pub fn in_per_group(&self) -> usize {
        self.channels / self.groups
    }

    /// Whether every output channel reads one input channel, its own.
    pub fn depthwise(&self) -> bool {
        self.in_per_group() == 1 && self.out_per_group() == 1
    }

    /// Output channels per group.
    pub fn out_per_group(&self) -> usize {
        self.out / self.groups
    }

    /// Values per output image.
    pub fn out_len(&self) -> usize {
        self.out_height() * self.out_width() * self.out
    }

    /// PyTorch's `[out, in / groups, kh, kw]` weight in the kernels' layout: tap by tap, then
    /// input channel of the group, then every output channel (`[kh * kw][in / groups][out]`).
    pub fn pack<T: Copy + Default>(&self, weight: &[T]) -> Vec<T> {
        let (taps, cin) = (self.kernel[0] * self.kernel[1], self.in_per_group());
        let mut packed = vec![T::default(); taps * cin * self.out];
        for o in 0..self.out {
            for i in 0..cin {
                for t in 0..taps {
                    packed[(t * cin + i) * self.out + o] = weight[(o * cin + i) * taps + t];
                }
            }
        }
        packed
    }

    /// `[output pixel, tap, input offset]` for every output pixel of one image and every tap
    /// of its window that lies inside the image (padding contributes nothing), in order:
    /// what the kernels walk, computed once per layer.
    ///
    /// # Panics
    /// When an image holds 2^32 values or more.
    pub fn taps(&self) -> Vec<[u32; 3]> {
        let ([kh, kw], [sy, sx], [py, px]) = (self.kernel, self.stride, self.padding);
        let (oh, ow) = (self.out_height(), self.out_width());
        let mut taps = Vec::with_capacity(oh * ow * kh * kw);
        for oy in 0..oh {
            for ox in 0..ow {
                for ky in 0..kh {
                    let Some(iy) = (oy * sy + ky).checked_sub(py) else {
                        continue;
                    };
                    if iy >= self.height {
                        continue;
                    }
                    for kx in 0..kw {
                        let Some(ix) = (ox * sx + kx).checked_sub(px) else {
                            continue;
                        };
                        if ix < self.width {
                            let offset = (iy * self.width + ix) * self.channels;
                            let entry = [oy * ow + ox, ky * kw + kx, offset];
                            taps.push(entry.map(|v| {
                                u32::try_from(v).expect("an image holds fewer than 2^32 values")
                            }));
                        }
                    }
                }
            }
        }
        taps
    }
}

thread_local! {
    /// The int8 kernel's buffers (widened weights, accumulators, centred input, a zero
    /// column), kept per thread: the graph plan calls it once per group of a few images,
    /// and allocating and zeroing them every time cost more than the products.
    static BUFFERS: std::cell::Cell<[Vec<i32>; 4]> = std::cell::Cell::default();
}

/// Depthwise accumulation of one NHWC image: `y[pixel][o] += x[offset + o] * w[tap][o]`
/// over `taps` ([`Grouped::taps`], grouped by output pixel), `n` channels. Each pixel's
/// taps are summed in blocks of 32, 16 or 8 channels held in registers (AVX2 vectors) and
/// stored once; the order of the sums is the taps' order, as in the general loop.
#[inline(always)]
fn depthwise<T: Copy + Default + std::ops::AddAssign + std::ops::Mul<Output = T>>(
    taps: &[[u32; 3]],
    n: usize,
    x: &[T],
    w: &[T],
    y: &mut [T],
) {
    for run in taps.chunk_by(|a, b| a[0] == b[0]) {
        let out = &mut y[run[0][0] as usize * n..][..n];
        let mut c0 = 0;
        c0 = depthwise_blocks::<T, 32>(run, n, x, w, out, c0);
        c0 = depthwise_blocks::<T, 16>(run, n, x, w, out, c0);
        c0 = depthwise_blocks::<T, 8>(run, n, x, w, out, c0);
        if c0 < n {
            let out = &mut out[c0..];
            for &[_, tap, offset] in run {
                let xs = &x[offset as usize + c0..][..out.len()];
                let ws = &w[tap as usize * n + c0..][..out.len()];
                for ((a, &xv), &wv) in out.iter_mut().zip(xs).zip(ws) {
                    *a += xv * wv;
                }
            }
        }
    }
}

/// [`depthwise`] for one output pixel (`run`: its taps), in blocks of `B` channels from
/// channel `c0` on while a whole block fits; returns the first channel left.
#[inline(always)]
fn depthwise_blocks<T, const B: usize>(
    run: &[[u32; 3]],
    n: usize,
    x: &[T],
    w: &[T],
    out: &mut [T],
    mut c0: usize,
) -> usize
where
    T: Copy + Default + std::ops::AddAssign + std::ops::Mul<Output = T>,
{
    while c0 + B <= n {
        let mut acc = [T::default(); B];
        acc.copy_from_slice(&out[c0..][..B]);
        for &[_, tap, offset] in run {
            let xs = &x[offset as usize + c0..][..B];
            let ws = &w[tap as usize * n + c0..][..B];
            for ((a, &xv), &wv) in acc.iter_mut().zip(xs).zip(ws) {
                *a += xv * wv;
            }
        }
        out[c0..][..B].copy_from_slice(&acc);
        c0 += B;
    }
    c0
}

/// Accumulation of one NHWC image by a convolution of one group:
/// `y[pixel][o] += x[offset + i] * w[tap][i][o]` over `taps` ([`Grouped::taps`]) and the
/// `cin` input channels, `n` output channels, in register blocks as [`depthwise`] does;
/// the order of the sums is the general loop's (taps, then input channels).
#[inline(always)]
fn dense<T: Copy + Default + std::ops::AddAssign + std::ops::Mul<Output = T>>(
    taps: &[[u32; 3]],
    n: usize,
    cin: usize,
    x: &[T],
    w: &[T],
    y: &mut [T],
) {
    for run in taps.chunk_by(|a, b| a[0] == b[0]) {
        let out = &mut y[run[0][0] as usize * n..][..n];
        let mut c0 = 0;
        c0 = dense_blocks::<T, 32>(run, (n, cin), x, w, out, c0);
        c0 = dense_blocks::<T, 16>(run, (n, cin), x, w, out, c0);
        c0 = dense_blocks::<T, 8>(run, (n, cin), x, w, out, c0);
        if c0 < n {
            let out = &mut out[c0..];
            for &[_, tap, offset] in run {
                for i in 0..cin {
                    let xv = x[offset as usize + i];
                    let ws = &w[(tap as usize * cin + i) * n + c0..][..out.len()];
                    for (a, &wv) in out.iter_mut().zip(ws) {
                        *a += xv * wv;
                    }
                }
            }
        }
    }
}

/// [`dense`] for one output pixel (`run`: its taps), in blocks of `B` output channels from
/// channel `c0` on while a whole block fits; returns the first channel left. (The same loop
/// as [`depthwise_blocks`] but for how the input is read; one loop taking the read as a
/// closure measured 15-35% slower on the kernel bench.)
#[inline(always)]
fn dense_blocks<T, const B: usize>(
    run: &[[u32; 3]],
    (n, cin): (usize, usize),
    x: &[T],
    w: &[T],
    out: &mut [T],
    mut c0: usize,
) -> usize
where
    T: Copy + Default + std::ops::AddAssign + std::ops::Mul<Output = T>,
{
    while c0 + B <= n {
        let mut acc = [T::default(); B];
        acc.copy_from_slice(&out[c0..][..B]);
        for &[_, tap, offset] in run {
            let xs = &x[offset as usize..][..cin];
            for (i, &xv) in xs.iter().enumerate() {
                let ws = &w[(tap as usize * cin + i) * n + c0..][..B];
                for (a, &wv) in acc.iter_mut().zip(ws) {
                    *a += xv * wv;
                }
            }
        }
        out[c0..][..B].copy_from_slice(&acc);
        c0 += B;
    }
    c0
}

/// Accumulates `acc[o] += x[channel of o, i] * w[o]` for one tap and one input channel of
/// each group (`x`: one input pixel, all channels; `w`: the packed row of that tap and
/// channel): group g's outputs all read input channel `g * cin + i`. Depthwise convolutions
/// and those of one group take [`depthwise`] and [`dense`] instead.
#[inline(always)]
fn accumulate<T: Copy + std::ops::AddAssign + std::ops::Mul<Output = T>>(
    shape: &Grouped,
    i: usize,
    x: &[T],
    w: &[T],
    acc: &mut [T],
) {
    let (cin, cout) = (shape.in_per_group(), shape.out_per_group());
    let groups = acc.chunks_exact_mut(cout).zip(w.chunks_exact(cout));
    for (g, (accs, ws)) in groups.enumerate() {
        let xv = x[g * cin + i];
        for (a, &wv) in accs.iter_mut().zip(ws) {
            *a += xv * wv;
        }
    }
}

/// A grouped convolution in f32: `taps` are [`Grouped::taps`], `x` holds `batch` NHWC
/// images, `weights` the weight packed by [`Grouped::pack`] and the bias; writes `batch`
/// NHWC output images to `y` with the bias added and, when `relu`, negative values clamped
/// to 0. On CPUs with AVX2 it runs a copy compiled for them.
///
/// # Panics
/// On slices shorter than the shapes need.
pub fn grouped_conv_f32(
    shape: &Grouped,
    taps: &[[u32; 3]],
    x: &[f32],
    batch: usize,
    weights: (&[f32], &[f32]),
    relu: bool,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, which is all the copy below is compiled for.
        unsafe { grouped_conv_f32_avx2(shape, taps, x, batch, weights, relu, y) };
        return;
    }
    grouped_conv_f32_body(shape, taps, x, batch, weights, relu, y);
}

/// [`grouped_conv_f32`] compiled for AVX2: its loops over the channels vectorize 8 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn grouped_conv_f32_avx2(
    shape: &Grouped,
    taps: &[[u32; 3]],
    x: &[f32],
    batch: usize,
    weights: (&[f32], &[f32]),
    relu: bool,
    y: &mut [f32],
) {
    grouped_conv_f32_body(shape, taps, x, batch, weights, relu, y);
}

#[inline(always)]
fn grouped_conv_f32_body(
    shape: &Grouped,
    taps: &[[u32; 3]],
    x: &[f32],
    batch: usize,
    (w, bias): (&[f32], &[f32]),
    relu: bool,
    y: &mut [f32],
) {
    let (image, out_image, n, cin) = (
        shape.image_len(),
        shape.out_len(),
        shape.out,
        shape.in_per_group(),
    );
    for b in 0..batch {
        let x = &x[b * image..][..image];
        let y = &mut y[b * out_image..][..out_image];
        for pixel in y.chunks_exact_mut(n) {
            pixel.copy_from_slice(bias);
        }
        if shape.depthwise() || shape.groups == 1 {
            if shape.depthwise() {
                depthwise(taps, n, x, w, y);
            } else {
                dense(taps, n, cin, x, w, y);
            }
            if relu {
                y.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            continue;
        }
        for &[pixel, tap, offset] in taps {
            let (pixel, tap, offset) = (pixel as usize, tap as usize, offset as usize);
            let acc = &mut y[pixel * n..][..n];
            for i in 0..cin {
                let row = &w[(tap * cin + i) * n..][..n];
                accumulate(shape, i, &x[offset..], row, acc);
            }
        }
        if relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }
}

/// What an int8 grouped convolution does with its accumulators.
#[derive(Clone, Copy, Debug)]
pub enum GroupedEpilogue<'a> {
    /// `y = acc * scales[o] + bias[o]` in f32 (`scales`: input scale times weight scale).
    Dequantize {
        /// Per output channel.
        scales: &'a [f32],
        /// Per output channel.
        bias: &'a [f32],
    },
    /// `y = requantize(acc, bias[o], multipliers[o], zero_point)` in u8
    /// ([`requantize`](super::requantize)).
    Requantize {
        /// Per output channel, in accumulator units.
        bias: &'a [i32],
        /// Per output channel.
        multipliers: &'a [f32],
        /// The output's zero point.
        zero_point: i32,
    },
}

/// A grouped convolution in int8: `taps` are [`Grouped::taps`], `x` holds `batch` NHWC
/// images of `u8` codes with zero
/// point `x_zero`, `w` the `i8` weight packed by [`Grouped::pack`] with a zero point per
/// output channel; exact `i32` accumulation of `(x - x_zero) * (w - w_zero)`, then the
/// epilogue, into `y_f32` or `y_u8` (the one the epilogue writes; the other may be empty).
/// `relu` clamps at 0 (at the output zero point when requantizing).
///
/// # Panics
/// On slices shorter than the shapes need.
#[allow(clippy::too_many_arguments)]
pub fn grouped_conv_int8(
    shape: &Grouped,
    taps: &[[u32; 3]],
    x: &[u8],
    x_zero: i32,
    batch: usize,
    w: (&[i8], &[i32]),
    epilogue: GroupedEpilogue,
    relu: bool,
    y_f32: &mut [f32],
    y_u8: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, which is all the copy below is compiled for.
        unsafe {
            grouped_conv_int8_avx2(
                shape, taps, x, x_zero, batch, w, epilogue, relu, y_f32, y_u8,
            );
        }
        return;
    }
    grouped_conv_int8_body(
        shape, taps, x, x_zero, batch, w, epilogue, relu, y_f32, y_u8,
    );
}

/// [`grouped_conv_int8`] compiled for AVX2: its `i32` loops over the channels vectorize 8
/// wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn grouped_conv_int8_avx2(
    shape: &Grouped,
    taps: &[[u32; 3]],
    x: &[u8],
    x_zero: i32,
    batch: usize,
    w: (&[i8], &[i32]),
    epilogue: GroupedEpilogue,
    relu: bool,
    y_f32: &mut [f32],
    y_u8: &mut [u8],
) {
    grouped_conv_int8_body(
        shape, taps, x, x_zero, batch, w, epilogue, relu, y_f32, y_u8,
    );
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grouped_conv_int8_body(
    shape: &Grouped,
    taps: &[[u32; 3]],
    x: &[u8],
    x_zero: i32,
    batch: usize,
    (w, w_zero): (&[i8], &[i32]),
    epilogue: GroupedEpilogue,
    relu: bool,
    y_f32: &mut [f32],
    y_u8: &mut [u8],
) {
    let (image, out_image, n, cin) = (
        shape.image_len(),
        shape.out_len(),
        shape.out,
        shape.in_per_group(),
    );
    let [mut wide, mut acc, mut centred, mut no_column] = BUFFERS.with(std::cell::Cell::take);
    // Weights with their zero points taken out, widened once.
    wide.clear();
    wide.extend(
        w.chunks_exact(n)
            .flat_map(|row| row.iter().zip(w_zero).map(|(&v, &z)| i32::from(v) - z)),
    );
    let w = &wide;
    // Both overwritten for every image before they are read.
    acc.resize(out_image, 0);
    centred.resize(image, 0);
    // The requantization runs 8 channels at a time where every accumulator plus its bias
    // provably fits an `i32`: at most `taps * cin` products of a centred input (at most
    // 255 in magnitude) and a centred weight.
    no_column.clear();
    no_column.resize(n, 0);
    let vector_requantize = {
        let taps_per_output = (shape.kernel[0] * shape.kernel[1] * cin) as i64;
        let widest = i64::from(w.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0));
        let bound = taps_per_output * 255 * widest;
        let fits = |bias: &[i32]| {
            let b = bias
                .iter()
                .map(|v| i64::from(v.unsigned_abs()))
                .max()
                .unwrap_or(0);
            bound + b < 1 << 31
        };
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        avx2 && matches!(epilogue, GroupedEpilogue::Requantize { bias, .. } if fits(bias))
    };
    for b in 0..batch {
        for (c, &q) in centred.iter_mut().zip(&x[b * image..][..image]) {
            *c = i32::from(q) - x_zero;
        }
        acc.fill(0);
        if shape.depthwise() {
            depthwise(taps, n, &centred, w, &mut acc);
        } else if shape.groups == 1 {
            dense(taps, n, cin, &centred, w, &mut acc);
        } else {
            for &[pixel, tap, offset] in taps {
                let (pixel, tap, offset) = (pixel as usize, tap as usize, offset as usize);
                let acc = &mut acc[pixel * n..][..n];
                for i in 0..cin {
                    let row = &w[(tap * cin + i) * n..][..n];
                    accumulate(shape, i, &centred[offset..], row, acc);
                }
            }
        }
        match epilogue {
            GroupedEpilogue::Dequantize { scales, bias } => {
                let y = &mut y_f32[b * out_image..][..out_image];
                for (ys, accs) in y.chunks_exact_mut(n).zip(acc.chunks_exact(n)) {
                    for (o, (v, &a)) in ys.iter_mut().zip(accs).enumerate() {
                        let r = a as f32 * scales[o] + bias[o];
                        *v = if relu { r.max(0.0) } else { r };
                    }
                }
            }
            GroupedEpilogue::Requantize {
                bias,
                multipliers,
                zero_point,
            } => {
                let lo = if relu { zero_point } else { 0 };
                let y = &mut y_u8[b * out_image..][..out_image];
                for (ys, accs) in y.chunks_exact_mut(n).zip(acc.chunks_exact(n)) {
                    #[allow(unused_mut)]
                    let mut done = 0;
                    #[cfg(target_arch = "x86_64")]
                    if vector_requantize {
                        // SAFETY: AVX2 was detected; every `acc + bias` fits an `i32`
                        // (`vector_requantize`'s bound) and `lo` is a code.
                        done = unsafe {
                            super::avx2::requantize_row(
                                accs,
                                &no_column,
                                bias,
                                multipliers,
                                zero_point,
                                lo,
                                ys,
                            )
                        };
                    }
                    for (o, (v, &a)) in ys.iter_mut().zip(accs).enumerate().skip(done) {
                        *v = super::requantize(
                            i64::from(a),
                            bias[o],
                            multipliers[o],
                            zero_point,
                            lo,
                        );
                    }
                }
            }
        }
    }
    BUFFERS.with(|b| b.set([wide, acc, centred, no_column]));
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The accumulator of output channel `o` at output pixel `(oy, ox)` of one NHWC image,
    /// straight from the definition with PyTorch's weight layout, in `i64` or `f64`.
    fn reference<X: Copy, W: Copy, A: std::iter::Sum<A>>(
        shape: &Grouped,
        x: &[X],
        w: &[W],
        (o, oy, ox): (usize, usize, usize),
        mul: impl Fn(X, W) -> A,
    ) -> A {
        let g = shape;
        let (cin, [kh, kw]) = (shape.in_per_group(), g.kernel);
        let group = o / shape.out_per_group();
        (0..cin)
            .flat_map(|i| (0..kh).flat_map(move |ky| (0..kw).map(move |kx| (i, ky, kx))))
            .filter_map(|(i, ky, kx)| {
                let iy = (oy * g.stride[0] + ky).checked_sub(g.padding[0])?;
                let ix = (ox * g.stride[1] + kx).checked_sub(g.padding[1])?;
                (iy < g.height && ix < g.width).then(|| {
                    let xv = x[(iy * g.width + ix) * g.channels + group * cin + i];
                    mul(xv, w[((o * cin + i) * kh + ky) * kw + kx])
                })
            })
            .sum()
    }

    /// Square and rectangular kernels, equal and unequal strides and paddings; grouped,
    /// depthwise and of one group.
    fn shapes() -> impl Strategy<Value = Grouped> {
        prop_oneof![grouped_shapes(), depthwise_shapes(), dense_shapes()]
    }

    /// One group with enough output channels for every block width of the fast path.
    fn dense_shapes() -> impl Strategy<Value = Grouped> {
        (1usize..4, 1usize..80, depthwise_shapes()).prop_map(|(channels, out, window)| Grouped {
            channels,
            out,
            groups: 1,
            ..window
        })
    }

    fn grouped_shapes() -> impl Strategy<Value = Grouped> {
        (
            (1usize..4, 1usize..4, 1usize..4),
            [1usize..4, 1usize..4],
            [1usize..3, 1usize..3],
            (3usize..8, 3usize..8),
        )
            .prop_flat_map(|((groups, cin, cout), kernel, stride, (height, width))| {
                [0..=kernel[0] / 2, 0..=kernel[1] / 2].prop_map(move |padding| Grouped {
                    channels: groups * cin,
                    height: height.max(kernel[0]),
                    width: width.max(kernel[1]),
                    kernel,
                    stride,
                    padding,
                    out: groups * cout,
                    groups,
                })
            })
    }

    /// Depthwise shapes with enough channels for every block width of the fast path.
    fn depthwise_shapes() -> impl Strategy<Value = Grouped> {
        (
            1usize..80,
            [1usize..4, 1usize..4],
            [1usize..3, 1usize..3],
            (3usize..7, 3usize..7),
        )
            .prop_flat_map(|(channels, kernel, stride, (height, width))| {
                [0..=kernel[0] / 2, 0..=kernel[1] / 2].prop_map(move |padding| Grouped {
                    channels,
                    height: height.max(kernel[0]),
                    width: width.max(kernel[1]),
                    kernel,
                    stride,
                    padding,
                    out: channels,
                    groups: channels,
                })
            })
    }

    proptest! {
        #[test]
        fn f32_matches_the_definition(shape in shapes(), seed in any::<u64>(), relu in any::<bool>()) {
            let mut state = seed | 1;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 2001) as f32 / 1000.0 - 1.0
            };
            let batch = 2;
            let x: Vec<f32> = (0..batch * shape.image_len()).map(|_| next()).collect();
            let k = shape.kernel[0] * shape.kernel[1];
            let w: Vec<f32> = (0..shape.out * shape.in_per_group() * k).map(|_| next()).collect();
            let bias: Vec<f32> = (0..shape.out).map(|_| next()).collect();
            let mut y = vec![f32::NAN; batch * shape.out_len()];
            grouped_conv_f32(&shape, &shape.taps(), &x, batch, (&shape.pack(&w), &bias), relu, &mut y);
            let (oh, ow) = (shape.out_height(), shape.out_width());
            for b in 0..batch {
                let image = &x[b * shape.image_len()..];
                for (p, o) in (0..oh * ow).flat_map(|p| (0..shape.out).map(move |o| (p, o))) {
                    let acc: f64 = reference(&shape, image, &w, (o, p / ow, p % ow), |a, b| {
                        f64::from(a) * f64::from(b)
                    });
                    let mut expected = acc + f64::from(bias[o]);
                    if relu {
                        expected = expected.max(0.0);
                    }
                    let got = y[b * shape.out_len() + p * shape.out + o];
                    prop_assert!((f64::from(got) - expected).abs() < 1e-5, "{got} against {expected}");
                }
            }
        }

        #[test]
        fn int8_is_exact(
            shape in shapes(),
            seed in any::<u64>(),
            x_zero in 0i32..256,
            out_zero in 0i32..256,
            relu in any::<bool>(),
        ) {
            let mut state = seed | 1;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let batch = 2;
            let x: Vec<u8> = (0..batch * shape.image_len()).map(|_| next() as u8).collect();
            let k = shape.kernel[0] * shape.kernel[1];
            let w: Vec<i8> = (0..shape.out * shape.in_per_group() * k).map(|_| next() as i8).collect();
            let w_zero: Vec<i32> = (0..shape.out).map(|_| (next() % 9) as i32 - 4).collect();
            let scales: Vec<f32> = (0..shape.out).map(|_| (1 + next() % 100) as f32 * 1e-4).collect();
            let bias: Vec<f32> = (0..shape.out).map(|_| (next() % 200) as f32 / 100.0 - 1.0).collect();
            let bias_q: Vec<i32> = (0..shape.out).map(|_| (next() % 2001) as i32 - 1000).collect();
            let multipliers: Vec<f32> = (0..shape.out).map(|_| (1 + next() % 1000) as f32 * 1e-5).collect();
            let packed = shape.pack(&w);
            let mut dequantized = vec![f32::NAN; batch * shape.out_len()];
            let epilogue = GroupedEpilogue::Dequantize { scales: &scales, bias: &bias };
            grouped_conv_int8(&shape, &shape.taps(), &x, x_zero, batch, (&packed, &w_zero), epilogue, relu, &mut dequantized, &mut []);
            let mut requantized = vec![0u8; batch * shape.out_len()];
            let epilogue = GroupedEpilogue::Requantize { bias: &bias_q, multipliers: &multipliers, zero_point: out_zero };
            grouped_conv_int8(&shape, &shape.taps(), &x, x_zero, batch, (&packed, &w_zero), epilogue, relu, &mut [], &mut requantized);
            let (oh, ow) = (shape.out_height(), shape.out_width());
            for b in 0..batch {
                let image = &x[b * shape.image_len()..];
                for (p, o) in (0..oh * ow).flat_map(|p| (0..shape.out).map(move |o| (p, o))) {
                    let acc: i64 = reference(&shape, image, &w, (o, p / ow, p % ow), |a, b| {
                        (i64::from(a) - i64::from(x_zero)) * (i64::from(b) - i64::from(w_zero[o]))
                    });
                    let at = b * shape.out_len() + p * shape.out + o;
                    let mut expected = acc as f32 * scales[o] + bias[o];
                    if relu {
                        expected = expected.max(0.0);
                    }
                    prop_assert_eq!(dequantized[at], expected);
                    let lo = if relu { out_zero } else { 0 };
                    let expected = super::super::requantize(acc, bias_q[o], multipliers[o], out_zero, lo);
                    prop_assert_eq!(requantized[at], expected);
                }
            }
        }
    }
}
