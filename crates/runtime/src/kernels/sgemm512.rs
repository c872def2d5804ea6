//! AVX-512 f32 GEMM over weights packed once at load time, with the bias and ReLU epilogue
//! fused into the stores.
//!
//! Packed layout: panels of 32 output columns; inside a panel, for every `k`, the 32 weights
//! of its columns (`[n / 32][k][32]`, zero padded to whole panels), so the micro-kernel
//! streams each panel front to back with two 64-byte loads per `k`. The micro-kernel keeps a
//! `ROWS x 32` block of `C` in 2 * `ROWS` registers (`ROWS` up to 12: 24 accumulators) and
//! broadcasts one activation per row and `k` from the row-major input.

use std::arch::x86_64::{
    __m512, __m512i, __mmask16, _mm512_add_ps, _mm512_fmadd_ps, _mm512_i32gather_ps,
    _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps,
    _mm512_max_ps, _mm512_reduce_add_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_shuffle_f32x4,
    _mm512_shuffle_ps, _mm512_storeu_ps, _mm512_unpackhi_ps, _mm512_unpacklo_ps,
};

use super::ConvGeometry;

/// Columns per panel.
pub(crate) const NR: usize = 32;
/// Rows per micro-tile.
pub(crate) const MR: usize = 12;

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// Packs `w` (`n` rows of `k`, one row per output) into panels.
pub(crate) fn pack(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let panels = n.div_ceil(NR);
    let mut out = vec![0.0f32; panels * k * NR];
    for (j, row) in w.chunks_exact(k).enumerate().take(n) {
        let (panel, lane) = (j / NR, j % NR);
        let base = panel * k * NR + lane;
        for (kk, &v) in row.iter().enumerate() {
            out[base + kk * NR] = v;
        }
    }
    out
}

/// Column masks of the panel that starts at column `start` of `n`.
fn masks(start: usize, n: usize) -> [__mmask16; 2] {
    let valid = (n - start).min(NR);
    let mask = |v: usize| -> __mmask16 { if v >= 16 { u16::MAX } else { (1u16 << v) - 1 } };
    [mask(valid), mask(valid.saturating_sub(16))]
}

/// `k` per cache block: a panel's block of weights (`KC x 32` f32, 32 KiB) stays in L1
/// while every row tile of the task passes over it.
const KC: usize = 256;

/// One `ROWS x 32` tile over `k` values of the reduction: `c (+)= a b`; on the last block
/// of `k` the bias and ReLU are applied.
///
/// # Safety
/// AVX-512F; `a` readable for `ROWS` rows of `k` values at stride `lda`; `b` for `k * 32`
/// values; `bias` for the columns in `masks`; `c` readable (unless `first`) and writable
/// for `ROWS` rows of those columns at stride `ldc`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const ROWS: usize>(
    a: *const f32,
    lda: usize,
    k: usize,
    b: *const f32,
    bias: *const f32,
    (first, last, relu): (bool, bool, bool),
    c: *mut f32,
    ldc: usize,
    masks: [__mmask16; 2],
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
    if !first {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (h, acc) in acc.iter_mut().enumerate() {
                // SAFETY: the caller vouches for the masked columns of row `r`.
                *acc = unsafe { _mm512_maskz_loadu_ps(masks[h], c.add(r * ldc + 16 * h)) };
            }
        }
    }
    for kk in 0..k {
        // SAFETY: `kk < k`: inside the panel and inside every row.
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_ps(b.add(kk * NR)),
                _mm512_loadu_ps(b.add(kk * NR + 16)),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let x = _mm512_set1_ps(unsafe { *a.add(r * lda + kk) });
            acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
        }
    }
    // SAFETY: masked loads and stores touch only the columns the caller vouches for.
    unsafe {
        let bias: [__m512; 2] = if last {
            [
                _mm512_maskz_loadu_ps(masks[0], bias),
                _mm512_maskz_loadu_ps(masks[1], bias.add(16)),
            ]
        } else {
            [_mm512_setzero_ps(); 2]
        };
        let zero = _mm512_setzero_ps();
        for (r, acc) in acc.iter().enumerate() {
            for h in 0..2 {
                let mut v = acc[h];
                if last {
                    v = _mm512_add_ps(v, bias[h]);
                    if relu {
                        v = _mm512_max_ps(v, zero);
                    }
                }
                _mm512_mask_storeu_ps(c.add(r * ldc + 16 * h), masks[h], v);
            }
        }
    }
}

/// `out = a w^T + bias` (ReLU if asked) for `m` rows of `a` (`m x k`, row-major) and the
/// packed `w`, over the panels `panels` (a range of panel indices): only the columns of
/// those panels of `out` (`m x n`, row-major) are written.
///
/// # Safety
/// AVX-512F; `out` must be valid for reads and writes of `out_len` values, and no one else
/// may access the columns of `panels` during the call. Slice lengths are checked here.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    a: &[f32],
    m: usize,
    k: usize,
    packed: &[f32],
    n: usize,
    bias: &[f32],
    relu: bool,
    out: *mut f32,
    out_len: usize,
    panels: std::ops::Range<usize>,
) {
    assert!(k > 0 && a.len() >= m * k && out_len >= m * n && bias.len() >= n);
    assert!(packed.len() == n.div_ceil(NR) * k * NR && panels.end <= n.div_ceil(NR));
    let (ap, cp) = (a.as_ptr(), out);
    // Blocks of equal length (at most KC): no short last block that would load and store
    // the accumulators for a few multiply-adds.
    let block = k.div_ceil(k.div_ceil(KC));
    for k0 in (0..k).step_by(block) {
        let kc = (k - k0).min(block);
        let flags = (k0 == 0, k0 + kc == k, relu);
        for p in panels.clone() {
            let start = p * NR;
            let masks = masks(start, n);
            let mut r = 0;
            while r < m {
                let rows = (m - r).min(MR);
                // SAFETY: rows `r..r + rows` are inside `a` and `out`; `k0..k0 + kc` inside
                // each row; panel `p`'s block `k0..` inside `packed`; the masks keep the
                // columns below `n`, inside `bias` and `out`.
                unsafe {
                    let a = ap.add(r * k + k0);
                    let b = packed.as_ptr().add(p * k * NR + k0 * NR);
                    let (bias, c) = (bias.as_ptr().add(start), cp.add(r * n + start));
                    match rows {
                        12 => tile::<12>(a, k, kc, b, bias, flags, c, n, masks),
                        11 => tile::<11>(a, k, kc, b, bias, flags, c, n, masks),
                        10 => tile::<10>(a, k, kc, b, bias, flags, c, n, masks),
                        9 => tile::<9>(a, k, kc, b, bias, flags, c, n, masks),
                        8 => tile::<8>(a, k, kc, b, bias, flags, c, n, masks),
                        7 => tile::<7>(a, k, kc, b, bias, flags, c, n, masks),
                        6 => tile::<6>(a, k, kc, b, bias, flags, c, n, masks),
                        5 => tile::<5>(a, k, kc, b, bias, flags, c, n, masks),
                        4 => tile::<4>(a, k, kc, b, bias, flags, c, n, masks),
                        3 => tile::<3>(a, k, kc, b, bias, flags, c, n, masks),
                        2 => tile::<2>(a, k, kc, b, bias, flags, c, n, masks),
                        _ => tile::<1>(a, k, kc, b, bias, flags, c, n, masks),
                    }
                }
                r += rows;
            }
        }
    }
}

/// `y[i] (+)= sum_e vals[e] * xt[cols[e] - base][i]` for the 32 lanes of a transposed row
/// block (added to `y` if `accumulate`), with two independent pairs of accumulators.
///
/// # Safety
/// AVX-512F; every index in `cols` must be in `base..base + xt.len()`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn sparse_block_row(
    xt: &[[f32; 32]],
    base: u32,
    cols: &[u32],
    vals: &[f32],
    accumulate: bool,
    y: &mut [f32; 32],
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; 2];
    if accumulate {
        // SAFETY: `y` holds 32 values.
        unsafe {
            acc[0] = [
                _mm512_loadu_ps(y.as_ptr()),
                _mm512_loadu_ps(y.as_ptr().add(16)),
            ];
        }
    }
    let base = xt.as_ptr().cast::<f32>().wrapping_sub(base as usize * 32);
    let step = |acc: &mut [__m512; 2], c: u32, v: f32| {
        let vb = _mm512_set1_ps(v);
        // `c - base` is a valid row of `xt` (32 values).
        let p = base.wrapping_add(c as usize * 32);
        // SAFETY: as above.
        let (lo, hi) = unsafe { (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))) };
        acc[0] = _mm512_fmadd_ps(vb, lo, acc[0]);
        acc[1] = _mm512_fmadd_ps(vb, hi, acc[1]);
    };
    let (cc, vc) = (cols.as_chunks::<2>(), vals.as_chunks::<2>());
    for (c, v) in cc.0.iter().zip(vc.0) {
        step(&mut acc[0], c[0], v[0]);
        step(&mut acc[1], c[1], v[1]);
    }
    for (&c, &v) in cc.1.iter().zip(vc.1) {
        step(&mut acc[0], c, v);
    }
    // SAFETY: `y` holds 32 values.
    unsafe {
        _mm512_storeu_ps(y.as_mut_ptr(), _mm512_add_ps(acc[0][0], acc[1][0]));
        _mm512_storeu_ps(y.as_mut_ptr().add(16), _mm512_add_ps(acc[0][1], acc[1][1]));
    }
}

/// `sum_e vals[e] * x[cols[e]]`, 16 entries per gather.
///
/// # Safety
/// AVX-512F; every index in `cols` must be below `x.len()`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn sparse_dot(x: &[f32], cols: &[u32], vals: &[f32]) -> f32 {
    let len = cols.len().min(vals.len());
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut e = 0;
    while e + 16 <= len {
        // SAFETY: `e + 16 <= len`; the indices are inside `x` (the caller vouches).
        unsafe {
            let idx = _mm512_loadu_si512(cols.as_ptr().add(e).cast::<__m512i>());
            let g = _mm512_i32gather_ps::<4>(idx, x.as_ptr());
            let h = (e / 16) % 2;
            acc[h] = _mm512_fmadd_ps(g, _mm512_loadu_ps(vals.as_ptr().add(e)), acc[h]);
        }
        e += 16;
    }
    let tail: f32 = cols[e..len]
        .iter()
        .zip(&vals[e..len])
        .map(|(&c, &v)| v * x[c as usize])
        .sum();
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + tail
}

/// Transposes a 16 x 16 block: `dst[j * lds + i] = src[i * lda + j]`.
///
/// # Safety
/// AVX-512F; `src` readable for 16 rows of 16 values at stride `lda`, `dst` writable for 16
/// rows of 16 at stride `lds`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16(src: *const f32, lda: usize, dst: *mut f32, lds: usize) {
    let mut r = [_mm512_setzero_ps(); 16];
    for (i, v) in r.iter_mut().enumerate() {
        // SAFETY: row `i` of the block is readable.
        *v = unsafe { _mm512_loadu_ps(src.add(i * lda)) };
    }
    for (j, &v) in transpose16_regs(r).iter().enumerate() {
        // SAFETY: row `j` of the destination block is writable.
        unsafe { _mm512_storeu_ps(dst.add(j * lds), v) };
    }
}

/// The transpose of a 16 x 16 block held in registers: lane `i` of result `j` is lane `j`
/// of input `i`.
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose16_regs(mut r: [__m512; 16]) -> [__m512; 16] {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        r[4 * i] = _mm512_shuffle_ps::<0x44>(a, c);
        r[4 * i + 1] = _mm512_shuffle_ps::<0xee>(a, c);
        r[4 * i + 2] = _mm512_shuffle_ps::<0x44>(b, d);
        r[4 * i + 3] = _mm512_shuffle_ps::<0xee>(b, d);
    }
    for h in 0..2 {
        for i in 0..4 {
            t[8 * h + i] = _mm512_shuffle_f32x4::<0x88>(r[8 * h + i], r[8 * h + i + 4]);
            t[8 * h + i + 4] = _mm512_shuffle_f32x4::<0xdd>(r[8 * h + i], r[8 * h + i + 4]);
        }
    }
    for i in 0..8 {
        r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[i + 8]);
        r[i + 8] = _mm512_shuffle_f32x4::<0xdd>(t[i], t[i + 8]);
    }
    r
}

/// The mask of the first `len` lanes (all 16 from 16 on).
fn lanes(len: usize) -> __mmask16 {
    if len >= 16 {
        u16::MAX
    } else {
        (1u16 << len) - 1
    }
}

/// Transposes one NHWC image (`height x width x channels`) into zero-padded planes of
/// `plane` values, rows of `wp`: `planar[c * plane + (y + p) * wp + x + p]` gets channel `c`
/// of pixel `(y, x)`, the padding gets zeros.
///
/// # Safety
/// AVX-512F (the lengths are asserted here).
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn sparse_conv_planes(
    x: &[f32],
    g: &ConvGeometry,
    wp: usize,
    plane: usize,
    planar: &mut [f32],
) {
    let (c, h, w, p) = (g.channels, g.height, g.width, g.padding);
    assert!(x.len() >= h * w * c && planar.len() >= c * plane);
    assert!(wp == w + 2 * p && plane >= (h + 2 * p) * wp);
    if p > 0 {
        planar[..c * plane].fill(0.0);
    }
    // Without padding the image is one run of `h * w` pixels, with it one run per row.
    let (runs, run) = if p == 0 { (1, h * w) } else { (h, w) };
    for r in 0..runs {
        let (src, dst) = if p == 0 {
            (0, 0)
        } else {
            (r * w, (r + p) * wp + p)
        };
        for x0 in (0..run).step_by(16) {
            let count = (run - x0).min(16);
            for c0 in (0..c).step_by(16) {
                let cc = (c - c0).min(16);
                let mut rows = [_mm512_setzero_ps(); 16];
                for (i, v) in rows.iter_mut().enumerate().take(count) {
                    // SAFETY: pixel `src + x0 + i` is below `h * w`, and channels
                    // `c0..c0 + cc` of it are inside `x` (asserted above).
                    *v = unsafe {
                        _mm512_maskz_loadu_ps(lanes(cc), x.as_ptr().add((src + x0 + i) * c + c0))
                    };
                }
                for (jj, &v) in transpose16_regs(rows).iter().enumerate().take(cc) {
                    // SAFETY: positions `dst + x0..dst + x0 + count` are inside plane
                    // `c0 + jj` (`dst + run <= plane`), which is inside `planar`.
                    unsafe {
                        _mm512_mask_storeu_ps(
                            planar.as_mut_ptr().add((c0 + jj) * plane + dst + x0),
                            lanes(count),
                            v,
                        );
                    }
                }
            }
        }
    }
}

/// `y[q] = sum_e values[e] * src[offsets[e] + q]` for the `16 * VB` positions `q`.
///
/// # Safety
/// AVX-512F; `src` readable at `offsets[e] + q` for every entry `e` and position `q`; `y`
/// writable for `16 * VB` values.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn sparse_conv_accumulate<const VB: usize>(
    src: *const f32,
    offsets: &[u32],
    values: &[f32],
    y: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); VB]; 2];
    let step = |acc: &mut [__m512; VB], o: u32, v: f32| {
        let w = _mm512_set1_ps(v);
        // SAFETY: the caller vouches for `o + q` over the chunk's positions.
        let s = unsafe { src.add(o as usize) };
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            *a = _mm512_fmadd_ps(w, unsafe { _mm512_loadu_ps(s.add(16 * i)) }, *a);
        }
    };
    let len = offsets.len().min(values.len());
    let (offsets, values) = (&offsets[..len], &values[..len]);
    if VB <= 4 {
        // Two sets of accumulators: a few chains alone would wait on the multiply-add latency.
        let (oc, vc) = (offsets.as_chunks::<2>(), values.as_chunks::<2>());
        for (o, v) in oc.0.iter().zip(vc.0) {
            step(&mut acc[0], o[0], v[0]);
            step(&mut acc[1], o[1], v[1]);
        }
        for (&o, &v) in oc.1.iter().zip(vc.1) {
            step(&mut acc[0], o, v);
        }
    } else {
        for (&o, &v) in offsets.iter().zip(values) {
            step(&mut acc[0], o, v);
        }
    }
    for (i, (&a, &b)) in acc[0].iter().zip(&acc[1]).enumerate() {
        // SAFETY: `y` is writable for `16 * VB` values.
        unsafe { _mm512_storeu_ps(y.add(16 * i), _mm512_add_ps(a, b)) };
    }
}

/// Writes a chunk of outputs of up to 16 channels into NHWC rows: `yt` holds 16 rows (one
/// per channel; those past `bias.len()` are read and ignored) of `ld` values, of which the
/// first `16 * vectors` positions are written; position `l` goes to the row of `out` that
/// the `l`-th item of `pixels` names (`n` channels per row; `None`: the position is
/// dropped), channels `j0..j0 + bias.len()`, plus the bias and through ReLU if asked.
///
/// # Safety
/// AVX-512F (the lengths and every row are checked here).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sparse_conv_write(
    yt: &[f32],
    ld: usize,
    vectors: usize,
    mut pixels: impl Iterator<Item = Option<usize>>,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
    n: usize,
    j0: usize,
) {
    let group = bias.len();
    assert!(group <= 16 && j0 + group <= n);
    assert!(16 * vectors <= ld && yt.len() >= 16 * ld);
    let mask = lanes(group);
    // SAFETY: `bias` holds the masked lanes.
    let b = unsafe { _mm512_maskz_loadu_ps(mask, bias.as_ptr()) };
    let zero = _mm512_setzero_ps();
    for v in 0..vectors {
        let mut rows = [zero; 16];
        for (jj, r) in rows.iter_mut().enumerate() {
            // SAFETY: `jj * ld + 16 * v + 16 <= 15 * ld + 16 * vectors <= 16 * ld`, inside
            // `yt` (asserted above).
            *r = unsafe { _mm512_loadu_ps(yt.as_ptr().add(jj * ld + 16 * v)) };
        }
        for &y in &transpose16_regs(rows) {
            let Some(pixel) = pixels.next().flatten() else {
                continue;
            };
            let at = pixel * n + j0;
            assert!(at + group <= out.len(), "pixel outside the output");
            let mut y = _mm512_add_ps(y, b);
            if relu {
                y = _mm512_max_ps(y, zero);
            }
            // SAFETY: the masked lanes `at..at + group` are inside `out` (asserted above).
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(at), mask, y) };
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose16_transposes() {
        if !super::available() {
            return;
        }
        let src: Vec<f32> = (0..16 * 20).map(|i| i as f32).collect();
        let mut dst = vec![0.0f32; 16 * 24];
        // SAFETY: AVX-512F is available; 16 rows of 20 and of 24 are inside the buffers.
        unsafe { super::transpose16(src.as_ptr(), 20, dst.as_mut_ptr(), 24) };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(dst[j * 24 + i], src[i * 20 + j], "({i}, {j})");
            }
        }
    }
}
