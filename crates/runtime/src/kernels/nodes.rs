//! The operations of graph networks besides products: activations, pooling with padding or
//! averaging, batch norm as a scale and shift, residual sums and channel concatenation, all
//! over NHWC images (channels contiguous per pixel).

/// `f32` ReLU6, sigmoid, tanh, GELU (exact, with the error function), SiLU and hard-swish,
/// as PyTorch defines them.
pub mod activation {
    /// `min(max(x, 0), 6)`.
    pub fn relu6(x: f32) -> f32 {
        x.clamp(0.0, 6.0)
    }

    /// `1 / (1 + e^-x)`, without overflow for large `|x|`.
    pub fn sigmoid(x: f32) -> f32 {
        if x >= 0.0 {
            1.0 / (1.0 + (-x).exp())
        } else {
            let e = x.exp();
            e / (1.0 + e)
        }
    }

    /// `tanh(x)`.
    pub fn tanh(x: f32) -> f32 {
        x.tanh()
    }

    /// `x * Phi(x)` with the exact normal CDF: `x / 2 * (1 + erf(x / sqrt 2))`.
    pub fn gelu(x: f32) -> f32 {
        0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
    }

    /// `x * sigmoid(x)`.
    pub fn silu(x: f32) -> f32 {
        x * sigmoid(x)
    }

    /// `x * relu6(x + 3) / 6`.
    pub fn hard_swish(x: f32) -> f32 {
        x * relu6(x + 3.0) / 6.0
    }
}

/// A pooling window over NHWC images of `channels x height x width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Channels.
    pub channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Window height and width.
    pub kernel: [usize; 2],
    /// Vertical and horizontal stride.
    pub stride: [usize; 2],
    /// Padding above and below, and left and right.
    pub padding: [usize; 2],
}

impl Window {
    /// Output height and width.
    pub fn out(&self) -> [usize; 2] {
        let side =
            |d: usize, i: usize| (d + 2 * self.padding[i] - self.kernel[i]) / self.stride[i] + 1;
        [side(self.height, 0), side(self.width, 1)]
    }

    /// Values per output image.
    pub fn out_len(&self) -> usize {
        let [oh, ow] = self.out();
        oh * ow * self.channels
    }

    /// Calls `f(output pixel, input pixel)` for every output pixel of one image and every
    /// position of its window inside the image, the window's positions in order.
    fn for_window(&self, mut f: impl FnMut(usize, usize)) {
        let [oh, ow] = self.out();
        for oy in 0..oh {
            for ox in 0..ow {
                for ky in 0..self.kernel[0] {
                    let Some(iy) = (oy * self.stride[0] + ky).checked_sub(self.padding[0]) else {
                        continue;
                    };
                    if iy >= self.height {
                        continue;
                    }
                    for kx in 0..self.kernel[1] {
                        let Some(ix) = (ox * self.stride[1] + kx).checked_sub(self.padding[1])
                        else {
                            continue;
                        };
                        if ix < self.width {
                            f(oy * ow + ox, iy * self.width + ix);
                        }
                    }
                }
            }
        }
    }
}

/// Max pooling of `batch` NHWC images; padded positions never win (every window holds at
/// least one position inside the image, since the padding is at most half the window).
///
/// # Panics
/// On slices shorter than the shapes need.
pub fn max_pool_nhwc<T: Copy + PartialOrd>(w: &Window, x: &[T], batch: usize, y: &mut [T]) {
    let (c, image, out) = (w.channels, w.height * w.width * w.channels, w.out_len());
    for b in 0..batch {
        let x = &x[b * image..][..image];
        let y = &mut y[b * out..][..out];
        let mut started = vec![false; out / c.max(1)];
        w.for_window(|o, i| {
            let (dst, src) = (&mut y[o * c..][..c], &x[i * c..][..c]);
            if std::mem::replace(&mut started[o], true) {
                for (d, &s) in dst.iter_mut().zip(src) {
                    if s > *d {
                        *d = s;
                    }
                }
            } else {
                dst.copy_from_slice(src);
            }
        });
    }
}

/// Average pooling of `batch` NHWC images over whole windows (no padding): the sum of the
/// window's values divided by its size.
///
/// # Panics
/// On slices shorter than the shapes need.
pub fn avg_pool_nhwc(w: &Window, x: &[f32], batch: usize, y: &mut [f32]) {
    let (c, image, out) = (w.channels, w.height * w.width * w.channels, w.out_len());
    let area = (w.kernel[0] * w.kernel[1]) as f32;
    for b in 0..batch {
        let x = &x[b * image..][..image];
        let y = &mut y[b * out..][..out];
        y.fill(0.0);
        w.for_window(|o, i| {
            for (d, &s) in y[o * c..][..c].iter_mut().zip(&x[i * c..][..c]) {
                *d += s;
            }
        });
        y.iter_mut().for_each(|v| *v /= area);
    }
}

/// The mean of every channel of `batch` NHWC images of `pixels x channels`: `batch x
/// channels` values.
///
/// # Panics
/// On slices shorter than the shapes need.
pub fn global_avg_pool_nhwc(
    x: &[f32],
    batch: usize,
    pixels: usize,
    channels: usize,
    y: &mut [f32],
) {
    let image = pixels * channels;
    for b in 0..batch {
        let y = &mut y[b * channels..][..channels];
        y.fill(0.0);
        for pixel in x[b * image..][..image].chunks_exact(channels) {
            for (d, &s) in y.iter_mut().zip(pixel) {
                *d += s;
            }
        }
        y.iter_mut().for_each(|v| *v /= pixels as f32);
    }
}

/// `x[p, c] = x[p, c] * scale[c] + shift[c]` over NHWC values with `scale.len()` channels.
///
/// # Panics
/// When `shift` is shorter than `scale`.
pub fn scale_shift_nhwc(x: &mut [f32], scale: &[f32], shift: &[f32]) {
    for pixel in x.chunks_exact_mut(scale.len().max(1)) {
        for ((v, &s), &t) in pixel.iter_mut().zip(scale).zip(shift) {
            *v = *v * s + t;
        }
    }
}

/// Stacks NHWC images along the channels: `parts[i]` holds `pixels` pixels of `channels[i]`
/// values each, and every output pixel is their pixels one after the other.
///
/// # Panics
/// On slices shorter than the shapes need, or `parts` and `channels` of different lengths.
pub fn concat_channels<T: Copy>(parts: &[&[T]], channels: &[usize], pixels: usize, y: &mut [T]) {
    assert_eq!(parts.len(), channels.len());
    let total: usize = channels.iter().sum();
    let mut start = 0;
    for (part, &c) in parts.iter().zip(channels) {
        for (p, src) in part[..pixels * c].chunks_exact(c.max(1)).enumerate() {
            y[p * total + start..][..c].copy_from_slice(src);
        }
        start += c;
    }
}
