//! Direct sparse convolution: a pruned stride-1 convolution evaluated straight from NHWC
//! images, without an im2col matrix and without transposing row blocks of one.
//!
//! Each image is first transposed into planes, one zero-padded `Hp x Wp` plane per input
//! channel (`Hp = height + 2 * padding`, `Wp = width + 2 * padding`). On that padded grid the
//! output pixel `(oy, ox)` has the position `q = oy * Wp + ox`, and the input that its weight
//! `(ky, kx, c)` meets is at `c * Hp * Wp + ky * Wp + kx + q`: for one stored weight, the
//! inputs of consecutive positions are consecutive. Every stored weight is therefore kept as
//! that offset (computed once, at preparation) and its value, and costs one broadcast and
//! one 16-wide multiply-add per 16 positions, over contiguous activations. The positions with
//! `ox >= out_width` (`Wp - out_width` per output row) are computed and thrown away.
//!
//! The outputs of 16 channels over a chunk of positions are transposed in registers (16 x 16)
//! into the rows of the NHWC output, with the bias and ReLU applied on the way.

use std::cell::Cell;

use rayon::prelude::*;

use super::{ConvGeometry, CsrMatrix, PARALLEL_MIN_MACS};

/// Positions per vector.
const LANES: usize = 16;

/// Vectors of positions per chunk, at most: one accumulator register each.
const MAX_VECTORS: usize = 12;

/// Row stride of the per-thread output scratch: one chunk of positions per channel.
const CHUNK_LEN: usize = MAX_VECTORS * LANES;

/// A pruned stride-1 convolution prepared for [`sparse_conv_nhwc`]: for every output channel,
/// the offset of each stored weight in the padded planar image and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseConv {
    geometry: ConvGeometry,
    outputs: usize,
    row_ptr: Vec<usize>,
    offsets: Vec<u32>,
    values: Vec<f32>,
    /// Padded width and plane length.
    wp: usize,
    plane: usize,
    /// Vectors of positions, and vectors per chunk.
    vectors: usize,
    chunk: usize,
    /// Length of the planar image buffer: the planes, and the tail read by the positions
    /// past the last output.
    planar_len: usize,
    /// Positions up to the last output pixel.
    positions: usize,
}

impl SparseConv {
    /// Prepares the CSR weight `w` (one row per output channel, columns in the
    /// `(ky, kx, channel)` order of [`super::im2col_nhwc`]) of a convolution with geometry
    /// `g`. `None` where the direct method does not apply: a stride other than 1, a weight
    /// whose columns are not `g.patch_len()`, an empty image or output, or an image too large
    /// for 32-bit offsets.
    pub fn new(w: &CsrMatrix, g: ConvGeometry) -> Option<Self> {
        let (c, k, p) = (g.channels, g.kernel, g.padding);
        let (hp, wp) = (g.height + 2 * p, g.width + 2 * p);
        if g.stride != 1 || k == 0 || c == 0 || k > hp || k > wp || g.image_len() == 0 {
            return None;
        }
        if w.cols() != g.patch_len() {
            return None;
        }
        let plane = hp.checked_mul(wp)?;
        let (oh, ow) = (g.out_height(), g.out_width());
        let positions = (oh - 1) * wp + ow;
        let vectors = positions.div_ceil(LANES);
        let chunk = vectors.div_ceil(vectors.div_ceil(MAX_VECTORS));
        let max_offset = (c - 1) * plane + (k - 1) * wp + (k - 1);
        let planar_len = c.checked_mul(plane)?.max(max_offset + vectors * LANES);
        u32::try_from(planar_len).ok()?;
        let mut offsets = Vec::with_capacity(w.nnz());
        let mut values = Vec::with_capacity(w.nnz());
        let mut entries = Vec::new();
        for j in 0..w.rows() {
            let (lo, hi) = (w.row_ptr()[j], w.row_ptr()[j + 1]);
            entries.clear();
            entries.extend(w.col_idx()[lo..hi].iter().zip(&w.values()[lo..hi]).map(
                |(&col, &v)| {
                    let col = col as usize;
                    let (ky, kx, ch) = (col / (k * c), col / c % k, col % c);
                    ((ch * plane + ky * wp + kx) as u32, v)
                },
            ));
            // Ascending offsets: the planes are read front to back.
            entries.sort_by_key(|&(o, _)| o);
            offsets.extend(entries.iter().map(|&(o, _)| o));
            values.extend(entries.iter().map(|&(_, v)| v));
        }
        Some(Self {
            geometry: g,
            outputs: w.rows(),
            row_ptr: w.row_ptr().to_vec(),
            offsets,
            values,
            wp,
            plane,
            vectors,
            chunk,
            planar_len,
            positions,
        })
    }

    /// The convolution's geometry.
    pub fn geometry(&self) -> &ConvGeometry {
        &self.geometry
    }

    /// Output channels.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Stored weights.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// The output pixel of each position from `q0` on: `None` past the end of an output row
    /// or past the last output.
    fn pixels_from(&self, q0: usize) -> impl Iterator<Item = Option<usize>> + use<> {
        let (wp, ow, positions) = (self.wp, self.geometry.out_width(), self.positions);
        let (mut oy, mut ox) = (q0 / wp, q0 % wp);
        (q0..).map(move |q| {
            let pixel = (q < positions && ox < ow).then_some(oy * ow + ox);
            ox += 1;
            if ox == wp {
                (oy, ox) = (oy + 1, 0);
            }
            pixel
        })
    }

    /// The stored weights of output channel `j`: offsets and values.
    fn channel(&self, j: usize) -> (&[u32], &[f32]) {
        let (lo, hi) = (self.row_ptr[j], self.row_ptr[j + 1]);
        (&self.offsets[lo..hi], &self.values[lo..hi])
    }
}

thread_local! {
    /// The planar image and one chunk of outputs of 16 channels, kept by each thread
    /// between images and calls.
    static SCRATCH: Cell<(Vec<f32>, Vec<f32>)> = const { Cell::new((Vec::new(), Vec::new())) };
}

/// The convolution `conv` (bias, then ReLU if asked) of a batch of NHWC images `x`
/// (`height x width x channels` each): `out` gets `batch x pixels` rows of the output
/// channels, what [`super::im2col_nhwc`] followed by [`super::csr_gemm_bias`] gives.
///
/// # Panics
/// If a slice does not have the length its shape gives.
pub fn sparse_conv_nhwc(
    x: &[f32],
    batch: usize,
    conv: &SparseConv,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
) {
    let g = &conv.geometry;
    let (ilen, olen) = (g.image_len(), g.pixels() * conv.outputs);
    assert_eq!(x.len(), batch * ilen, "x must be batch images");
    assert_eq!(bias.len(), conv.outputs, "one bias per output");
    assert_eq!(
        out.len(),
        batch * olen,
        "out must be batch x pixels x outputs"
    );
    if batch == 0 || olen == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    let avx512 = is_x86_feature_detected!("avx512f");
    let images = |x: &[f32], out: &mut [f32]| {
        let mut scratch = SCRATCH.with(Cell::take);
        scratch.0.resize(scratch.0.len().max(conv.planar_len), 0.0);
        scratch.1.resize(LANES * CHUNK_LEN, 0.0);
        for (x, out) in x.chunks_exact(ilen).zip(out.chunks_exact_mut(olen)) {
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the feature was detected above.
                unsafe { image_avx512(x, conv, bias, relu, out, &mut scratch) };
                continue;
            }
            image_portable(x, conv, bias, relu, out, &mut scratch);
        }
        SCRATCH.with(|cell| cell.set(scratch));
    };
    let macs = g.pixels() * conv.nnz().max(1);
    let per_task = PARALLEL_MIN_MACS.div_ceil(macs).clamp(1, batch);
    if batch * macs < PARALLEL_MIN_MACS || batch <= per_task {
        images(x, out);
    } else {
        x.par_chunks(per_task * ilen)
            .zip(out.par_chunks_mut(per_task * olen))
            .for_each(|(x, out)| images(x, out));
    }
}

/// One image without AVX-512: the same method in portable Rust (vectorised by the compiler).
fn image_portable(
    x: &[f32],
    conv: &SparseConv,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
    (planar, yt): &mut (Vec<f32>, Vec<f32>),
) {
    let g = &conv.geometry;
    let (c, p, n) = (g.channels, g.padding, conv.outputs);
    let planar = &mut planar[..conv.planar_len];
    if p > 0 {
        planar[..c * conv.plane].fill(0.0);
    }
    for (pixel, v) in x.chunks_exact(c).enumerate() {
        let (y, xx) = (pixel / g.width, pixel % g.width);
        let at = (y + p) * conv.wp + xx + p;
        for (ch, &v) in v.iter().enumerate() {
            planar[ch * conv.plane + at] = v;
        }
    }
    for v0 in (0..conv.vectors).step_by(conv.chunk) {
        let (q0, len) = (v0 * LANES, (conv.vectors - v0).min(conv.chunk) * LANES);
        for j0 in (0..n).step_by(LANES) {
            let group = (n - j0).min(LANES);
            for (jj, acc) in yt.chunks_exact_mut(CHUNK_LEN).take(group).enumerate() {
                let acc = &mut acc[..len];
                acc.fill(0.0);
                let (offsets, values) = conv.channel(j0 + jj);
                for (&o, &w) in offsets.iter().zip(values) {
                    let src = &planar[o as usize + q0..][..len];
                    for (a, &s) in acc.iter_mut().zip(src) {
                        *a += w * s;
                    }
                }
            }
            for (l, pixel) in conv.pixels_from(q0).take(len).enumerate() {
                let Some(pixel) = pixel else { continue };
                let row = &mut out[pixel * n + j0..][..group];
                for (jj, (o, &b)) in row.iter_mut().zip(&bias[j0..]).enumerate() {
                    let v = yt[jj * CHUNK_LEN + l] + b;
                    *o = if relu { v.max(0.0) } else { v };
                }
            }
        }
    }
}

/// One image with AVX-512: the planes by 16 x 16 register transposes, 16-wide multiply-adds
/// over positions, and the outputs transposed back 16 x 16.
///
/// # Safety
/// AVX-512F. `x` is one image and `out` its outputs (checked by the caller); the scratch
/// buffers hold at least `planar_len` and `16 * CHUNK_LEN` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn image_avx512(
    x: &[f32],
    conv: &SparseConv,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
    (planar, yt): &mut (Vec<f32>, Vec<f32>),
) {
    use super::sgemm512::{sparse_conv_accumulate, sparse_conv_planes, sparse_conv_write};
    let g = &conv.geometry;
    let n = conv.outputs;
    assert!(planar.len() >= conv.planar_len && yt.len() >= LANES * CHUNK_LEN);
    assert!(x.len() == g.image_len() && out.len() == g.pixels() * n && bias.len() == n);
    // SAFETY: `x` holds the image and `planar` its planes (asserted above).
    unsafe { sparse_conv_planes(x, g, conv.wp, conv.plane, planar) };
    for v0 in (0..conv.vectors).step_by(conv.chunk) {
        let (q0, vb) = (v0 * LANES, (conv.vectors - v0).min(conv.chunk));
        for j0 in (0..n).step_by(LANES) {
            let group = (n - j0).min(LANES);
            for jj in 0..group {
                let (offsets, values) = conv.channel(j0 + jj);
                // SAFETY: every offset plus `q0 + 16 * vb` is at most `planar_len` (the
                // constructor sized it so), which `planar` holds; row `jj < 16` of `yt`
                // holds `CHUNK_LEN >= 16 * vb` values.
                unsafe {
                    let src = planar.as_ptr().add(q0);
                    let y = yt.as_mut_ptr().add(jj * CHUNK_LEN);
                    match vb {
                        12 => sparse_conv_accumulate::<12>(src, offsets, values, y),
                        11 => sparse_conv_accumulate::<11>(src, offsets, values, y),
                        10 => sparse_conv_accumulate::<10>(src, offsets, values, y),
                        9 => sparse_conv_accumulate::<9>(src, offsets, values, y),
                        8 => sparse_conv_accumulate::<8>(src, offsets, values, y),
                        7 => sparse_conv_accumulate::<7>(src, offsets, values, y),
                        6 => sparse_conv_accumulate::<6>(src, offsets, values, y),
                        5 => sparse_conv_accumulate::<5>(src, offsets, values, y),
                        4 => sparse_conv_accumulate::<4>(src, offsets, values, y),
                        3 => sparse_conv_accumulate::<3>(src, offsets, values, y),
                        2 => sparse_conv_accumulate::<2>(src, offsets, values, y),
                        _ => sparse_conv_accumulate::<1>(src, offsets, values, y),
                    }
                }
            }
            // SAFETY: `yt` holds 16 rows of `CHUNK_LEN >= 16 * vb` values; every pixel the
            // walk gives is below `g.pixels()`, and the function checks its row of `out`.
            unsafe {
                sparse_conv_write(
                    yt,
                    CHUNK_LEN,
                    vb,
                    conv.pixels_from(q0),
                    &bias[j0..j0 + group],
                    relu,
                    out,
                    n,
                    j0,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{csr_gemm_bias, im2col_nhwc};
    use proptest::prelude::*;

    fn values(len: usize, sparsity: f64, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let u = (s >> 40) as f64 / (1u64 << 24) as f64;
                if u < sparsity {
                    0.0
                } else {
                    (u * 8.0 - 4.0) as f32
                }
            })
            .collect()
    }

    /// The direct convolution in f64, NHWC in and out, weight columns `(ky, kx, c)`, with the
    /// sum of absolute products of each output for the tolerance.
    fn reference(
        x: &[f32],
        batch: usize,
        g: &ConvGeometry,
        w: &[f32],
        bias: &[f32],
        relu: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let (n, k, c) = (bias.len(), g.kernel, g.channels);
        let (oh, ow, kk) = (g.out_height(), g.out_width(), g.patch_len());
        let (mut out, mut mag) = (Vec::new(), Vec::new());
        for b in 0..batch {
            let image = &x[b * g.image_len()..][..g.image_len()];
            for oy in 0..oh {
                for ox in 0..ow {
                    for j in 0..n {
                        let (mut s, mut a) = (f64::from(bias[j]), f64::from(bias[j]).abs());
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * g.stride + ky).wrapping_sub(g.padding);
                                let ix = (ox * g.stride + kx).wrapping_sub(g.padding);
                                if iy >= g.height || ix >= g.width {
                                    continue;
                                }
                                for ch in 0..c {
                                    let p = f64::from(image[(iy * g.width + ix) * c + ch])
                                        * f64::from(w[j * kk + (ky * k + kx) * c + ch]);
                                    s += p;
                                    a += p.abs();
                                }
                            }
                        }
                        out.push(if relu { s.max(0.0) } else { s });
                        mag.push(a);
                    }
                }
            }
        }
        (out, mag)
    }

    fn close(got: &[f32], expected: &[f64], mag: &[f64], k: usize) -> Result<(), TestCaseError> {
        prop_assert_eq!(got.len(), expected.len());
        for (i, ((&g, &e), &a)) in got.iter().zip(expected).zip(mag).enumerate() {
            let tol =
                2.0 * f64::from(f32::EPSILON) * (k as f64 + 1.0) * a + f64::from(f32::MIN_POSITIVE);
            prop_assert!(
                (f64::from(g) - e).abs() <= tol,
                "entry {i}: {g} vs {e} (tol {tol})"
            );
        }
        Ok(())
    }

    /// Runs the portable and (where the CPU has it) the AVX-512 image kernel on every image.
    fn both_paths(
        x: &[f32],
        batch: usize,
        conv: &SparseConv,
        bias: &[f32],
        relu: bool,
    ) -> Vec<Vec<f32>> {
        let g = conv.geometry;
        let olen = g.pixels() * conv.outputs;
        let mut results = Vec::new();
        let scratch = || {
            // Stale, non-zero scratch: every kernel must write what it reads.
            (
                vec![f32::NAN; conv.planar_len + 5],
                vec![f32::NAN; LANES * CHUNK_LEN],
            )
        };
        let mut out = vec![f32::NAN; batch * olen];
        let mut s = scratch();
        for (x, o) in x
            .chunks_exact(g.image_len())
            .zip(out.chunks_exact_mut(olen))
        {
            image_portable(x, conv, bias, relu, o, &mut s);
        }
        results.push(out);
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            let mut out = vec![f32::NAN; batch * olen];
            let mut s = scratch();
            for (x, o) in x
                .chunks_exact(g.image_len())
                .zip(out.chunks_exact_mut(olen))
            {
                // SAFETY: the feature was detected just above; the scratch is large enough.
                unsafe { image_avx512(x, conv, bias, relu, o, &mut s) };
            }
            results.push(out);
        }
        let mut out = vec![f32::NAN; batch * olen];
        sparse_conv_nhwc(x, batch, conv, bias, relu, &mut out);
        results.push(out);
        results
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn sparse_conv_matches_the_direct_reference(
            channels in 1usize..40, height in 1usize..16, width in 1usize..16,
            kernel in 1usize..5, padding in 0usize..3, outputs in 1usize..40,
            batch in 1usize..3, sparsity in 0.0f64..1.0, seed in any::<u64>(),
            relu in any::<bool>(),
        ) {
            prop_assume!(kernel <= height + 2 * padding && kernel <= width + 2 * padding);
            let g = ConvGeometry { channels, height, width, kernel, stride: 1, padding };
            let kk = g.patch_len();
            let x = values(batch * g.image_len(), 0.0, seed);
            let w = values(outputs * kk, sparsity, !seed);
            let bias = values(outputs, 0.0, seed ^ 5);
            let csr = CsrMatrix::from_dense(&w, outputs, kk);
            let conv = SparseConv::new(&csr, g).expect("stride 1 applies");
            let (e, mag) = reference(&x, batch, &g, &w, &bias, relu);
            for got in both_paths(&x, batch, &conv, &bias, relu) {
                close(&got, &e, &mag, kk)?;
            }
            // And what the im2col path computes.
            let rows = batch * g.pixels();
            let mut cols = vec![0.0; rows * kk];
            im2col_nhwc(&x, batch, &g, 0.0, &mut cols, kk);
            let mut out = vec![0.0; rows * outputs];
            csr_gemm_bias(&cols, rows, &csr, &bias, relu, &mut out);
            close(&out, &e, &mag, kk)?;
        }
    }

    #[test]
    fn the_teacher_convolution_at_every_sparsity_and_batch() {
        // 13 x 13 x 32 to 11 x 11 x 64: 141 positions, 9 vectors in one chunk.
        let g = ConvGeometry {
            channels: 32,
            height: 13,
            width: 13,
            kernel: 3,
            stride: 1,
            padding: 0,
        };
        for (sparsity, batch) in [(0.0, 1), (0.5, 3), (0.9, 40), (0.99, 2), (1.0, 2)] {
            let kk = g.patch_len();
            let x = values(batch * g.image_len(), 0.0, 11);
            let w = values(64 * kk, sparsity, 12);
            let bias = values(64, 0.0, 13);
            let conv = SparseConv::new(&CsrMatrix::from_dense(&w, 64, kk), g).unwrap();
            assert_eq!((conv.vectors, conv.chunk), (9, 9));
            let (e, mag) = reference(&x, batch, &g, &w, &bias, true);
            for got in both_paths(&x, batch, &conv, &bias, true) {
                close(&got, &e, &mag, kk).unwrap();
            }
        }
    }

    #[test]
    fn large_images_are_chunked_and_batches_run_in_parallel() {
        // 40 x 40 with padding 1: 1640 positions, 103 vectors in 9 chunks of at most 12.
        let g = ConvGeometry {
            channels: 3,
            height: 40,
            width: 40,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        let (n, kk, batch) = (20, g.patch_len(), 9);
        let x = values(batch * g.image_len(), 0.0, 21);
        let w = values(n * kk, 0.6, 22);
        let bias = values(n, 0.0, 23);
        let conv = SparseConv::new(&CsrMatrix::from_dense(&w, n, kk), g).unwrap();
        assert!(conv.vectors > conv.chunk && conv.chunk <= MAX_VECTORS);
        assert!(batch * g.pixels() * conv.nnz() >= PARALLEL_MIN_MACS);
        let (e, mag) = reference(&x, batch, &g, &w, &bias, false);
        for got in both_paths(&x, batch, &conv, &bias, false) {
            close(&got, &e, &mag, kk).unwrap();
        }
    }

    #[test]
    fn only_stride_one_applies() {
        let g = ConvGeometry {
            channels: 2,
            height: 8,
            width: 8,
            kernel: 3,
            stride: 2,
            padding: 0,
        };
        let w = CsrMatrix::from_dense(&values(4 * 18, 0.5, 1), 4, 18);
        assert!(SparseConv::new(&w, g).is_none());
        let g = ConvGeometry { stride: 1, ..g };
        assert!(SparseConv::new(&w, g).is_some());
        let wrong = CsrMatrix::from_dense(&values(4 * 17, 0.5, 1), 4, 17);
        assert!(SparseConv::new(&wrong, g).is_none());
    }
}
