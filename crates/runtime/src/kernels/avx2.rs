//! AVX2 integer GEMM without saturation.
//!
//! `vpmaddubsw` (`_mm256_maddubs_epi16`) would add two `u8 x i8` products into an `i16` and
//! saturate (255 * 127 * 2 > 32767), so this path widens instead: weights are stored as `i16`
//! at load time and activation pairs are zero-extended to `i16`, then `vpmaddwd`
//! (`_mm256_madd_epi16`) adds two exact `i16 x i16` products into an `i32` lane. The result is
//! bit-for-bit the scalar reference for every `u8` activation.
//!
//! Packed weight layout: blocks of 8 output columns; inside a block, for every pair of `k`
//! values, 8 lanes of 2 `i16` (`[n / 8][kp / 2][8][2]`): one 32-byte load per `vpmaddwd`.

use std::arch::x86_64::{
    __m256, __m256i, _mm256_add_epi32, _mm256_add_ps, _mm256_fmadd_ps, _mm256_loadu_ps,
    _mm256_loadu_si256, _mm256_madd_epi16, _mm256_set1_epi32, _mm256_setzero_ps,
    _mm256_setzero_si256, _mm256_storeu_ps, _mm256_storeu_si256,
};

/// Columns per block.
const NR: usize = 8;

/// Packs `w` (`n` rows of `k` weights) into the block layout, widened to `i16` and zero
/// padded to `kp` (even) and to a multiple of 8 columns.
pub(crate) fn pack(w: &[i8], n: usize, k: usize, kp: usize) -> Vec<i16> {
    let kh = kp / 2;
    let mut out = vec![0i16; n.div_ceil(NR) * kh * NR * 2];
    for (j, row) in w.chunks_exact(k).enumerate().take(n) {
        let (block, lane) = (j / NR, j % NR);
        for (kk, &v) in row.iter().enumerate() {
            out[((block * kh + kk / 2) * NR + lane) * 2 + kk % 2] = i16::from(v);
        }
    }
    out
}

/// Where a tile's activations are, as `u16` (zero-extended `u8`): row `r`'s pairs are `runs`
/// runs of `pairs` pairs, the first at `a[r]` and each `stride` values after the one before
/// (one run for a matrix row; for a convolution window, one run per kernel row). A pair is
/// two consecutive values, read as one `u32`.
#[derive(Clone, Copy)]
struct Rows<const ROWS: usize> {
    a: [*const u16; ROWS],
    runs: usize,
    pairs: usize,
    stride: usize,
}

/// One `ROWS x (8 * NB)` tile of `C` over the `runs * pairs` pairs that `a` describes (the
/// first pairs of the packed weights, which hold `kh` per block), stored at `c` (row stride
/// `ldc`): all `8 * NB` columns when `width` is that many, else the first `width`.
///
/// # Safety
/// The CPU must support AVX2; `a` readable where it says; `b` for `NB * kh * 16` values,
/// `runs * pairs <= kh`; `c` writable for `ROWS` rows of `width` values at stride `ldc`.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const ROWS: usize, const NB: usize>(
    a: Rows<ROWS>,
    b: *const i16,
    kh: usize,
    c: *mut i32,
    ldc: usize,
    width: usize,
) {
    let mut acc = [[_mm256_setzero_si256(); NB]; ROWS];
    let mut p = 0;
    for run in 0..a.runs {
        let rows: [*const u16; ROWS] = std::array::from_fn(|r| a.a[r].wrapping_add(run * a.stride));
        for e in 0..a.pairs {
            let mut bv = [_mm256_setzero_si256(); NB];
            for (j, v) in bv.iter_mut().enumerate() {
                // SAFETY: block `j`, pair `p < kh` lies inside the `NB * kh * 16` readable
                // values.
                *v = unsafe { _mm256_loadu_si256(b.add((j * kh + p) * 16).cast::<__m256i>()) };
            }
            for (acc_row, row) in acc.iter_mut().zip(rows) {
                // SAFETY: pair `e` of the run is readable. Two zero-extended activations as
                // the low and high `i16` of each lane: one broadcast load.
                let pair = unsafe { row.add(2 * e).cast::<u32>().read_unaligned() };
                let av = _mm256_set1_epi32(pair as i32);
                for (acc, &bv) in acc_row.iter_mut().zip(&bv) {
                    *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(av, bv));
                }
            }
            p += 1;
        }
    }
    for (r, acc_row) in acc.iter().enumerate() {
        if width == NB * NR {
            for (j, &v) in acc_row.iter().enumerate() {
                // SAFETY: the caller vouches for `NB * 8` columns of row `r`.
                unsafe { _mm256_storeu_si256(c.add(r * ldc + j * NR).cast::<__m256i>(), v) };
            }
        } else {
            let mut row = [[0i32; NR]; NB];
            for (dst, &v) in row.iter_mut().zip(acc_row) {
                // SAFETY: `dst` is an `[i32; 8]`, exactly 32 writable bytes.
                unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast::<__m256i>(), v) };
            }
            for (i, &v) in row.as_flattened().iter().take(width).enumerate() {
                // SAFETY: `i < width`, which the caller vouches for.
                unsafe { *c.add(r * ldc + i) = v };
            }
        }
    }
}

/// Rows per micro-tile.
const MR: usize = 6;

/// Computes rows `r..r + ROWS` of every column (blocks of 16, the last one maybe 8) into `c`.
///
/// # Safety
/// As for [`tile`], with `a` describing rows `r..r + ROWS`, `b` holding every block and `c`
/// writable for rows `r..r + ROWS` of `n` values.
#[target_feature(enable = "avx2")]
unsafe fn rows<const ROWS: usize>(
    a: Rows<ROWS>,
    b: *const i16,
    kh: usize,
    c: *mut i32,
    n: usize,
    r: usize,
) {
    let blocks = n.div_ceil(NR);
    let mut block = 0;
    while block < blocks {
        let start = block * NR;
        let width = (n - start).min(2 * NR);
        // SAFETY: forwarded from the caller; blocks `block..block + 2` (or the last one)
        // are inside `b`, columns `start..start + width` inside each row of `c`.
        unsafe {
            let (bp, cp) = (b.add(block * kh * NR * 2), c.add(r * n + start));
            if block + 1 < blocks {
                tile::<ROWS, 2>(a, bp, kh, cp, n, width);
            } else {
                tile::<ROWS, 1>(a, bp, kh, cp, n, width);
            }
        }
        block += 2;
    }
}

/// [`rows`] for `count` rows (1 to [`MR`]) whose first values are at `first[..count]`.
///
/// # Safety
/// As for [`rows`].
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_at(
    count: usize,
    first: &[*const u16; MR],
    (runs, pairs, stride): (usize, usize, usize),
    b: *const i16,
    kh: usize,
    c: *mut i32,
    n: usize,
    r: usize,
) {
    macro_rules! go {
        ($rows:literal) => {{
            let a = Rows::<$rows> {
                a: std::array::from_fn(|i| first[i]),
                runs,
                pairs,
                stride,
            };
            // SAFETY: forwarded from the caller.
            unsafe { rows::<$rows>(a, b, kh, c, n, r) }
        }};
    }
    match count {
        6 => go!(6),
        5 => go!(5),
        4 => go!(4),
        3 => go!(3),
        2 => go!(2),
        _ => go!(1),
    }
}

thread_local! {
    /// A row tile's activations widened to `u16`, kept by each thread between calls.
    static WIDE: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `c[r * n + j] = sum_kk a[r * lda + kk] * w[j][kk]` for the packed weights `b`.
///
/// Row tile by row tile, the activations are first widened to `u16` (a pair of them is then
/// one broadcast load), and the tile passes over every column block.
///
/// # Safety
/// The CPU must support AVX2. Slice lengths are checked here.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn gemm(
    a: &[u8],
    lda: usize,
    m: usize,
    b: &[i16],
    n: usize,
    kp: usize,
    c: &mut [i32],
) {
    assert!(lda >= kp);
    assert!(m == 0 || a.len() >= (m - 1) * lda + kp);
    let fill = |first: usize, count: usize, dst: &mut [u16]| {
        for (i, dst) in dst.chunks_exact_mut(kp).take(count).enumerate() {
            let src = &a[(first + i) * lda..(first + i) * lda + kp];
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = u16::from(v);
            }
        }
    };
    // SAFETY: forwarded; `fill` writes every row it is asked for.
    unsafe { gemm_rows(m, b, n, kp, c, &fill) };
}

/// [`gemm`] with the activations produced row tile by row tile by `fill(first, count, dst)`,
/// which writes rows `first..first + count`, zero-extended to `u16`, `kp` values each, one
/// after the other into `dst` (an im2col that never leaves the L1 cache).
///
/// # Safety
/// The CPU must support AVX2. Slice lengths are checked here.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn gemm_rows(
    m: usize,
    b: &[i16],
    n: usize,
    kp: usize,
    c: &mut [i32],
    fill: &dyn Fn(usize, usize, &mut [u16]),
) {
    let kh = kp / 2;
    let blocks = n.div_ceil(NR);
    assert!(kp.is_multiple_of(2) && b.len() == blocks * kh * NR * 2);
    assert!(c.len() >= m * n);
    let mut wide = WIDE.with(std::cell::Cell::take);
    wide.clear();
    wide.resize(MR * kh, 0);
    let mut r = 0;
    while r < m {
        let count = (m - r).min(MR);
        // SAFETY: `u32` storage is aligned for `u16`, twice as many of them, any bits valid.
        let halves = unsafe {
            std::slice::from_raw_parts_mut(wide.as_mut_ptr().cast::<u16>(), wide.len() * 2)
        };
        fill(r, count, &mut halves[..count * kp]);
        let ap = wide.as_ptr().cast::<u16>();
        let first: [*const u16; MR] = std::array::from_fn(|i| ap.wrapping_add(i * kp));
        // SAFETY: `wide` holds `count` rows of `kh` pairs; `b` holds every block; rows
        // `r..r + count` of `c` are inside it (asserted above).
        unsafe {
            rows_at(
                count,
                &first,
                (1, kh, 0),
                b.as_ptr(),
                kh,
                c.as_mut_ptr(),
                n,
                r,
            )
        };
        r += count;
    }
    WIDE.with(|cell| cell.set(wide));
}

/// [`gemm_rows`] over convolution windows read in place from images widened to `u16`: row
/// `i`'s window starts at `images[at]`, where `windows(first, out)` writes the starts of
/// rows `first..first + out.len()`, and is `runs` runs of `2 * pairs` values, each
/// `stride` values after the one before (the reduction is `runs * 2 * pairs` long, at most
/// `kp`; the packed weights past it are zero).
///
/// # Panics
/// If a window runs past `images` or a slice is shorter than its shape.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_windows(
    m: usize,
    images: &[u16],
    windows: &dyn Fn(usize, &mut [usize]),
    (runs, pairs, stride): (usize, usize, usize),
    b: &[i16],
    n: usize,
    kp: usize,
    c: &mut [i32],
) {
    let kh = kp / 2;
    let blocks = n.div_ceil(NR);
    assert!(kp.is_multiple_of(2) && b.len() == blocks * kh * NR * 2);
    assert!(runs > 0 && runs * pairs <= kh && c.len() >= m * n);
    let span = (runs - 1) * stride + 2 * pairs;
    const LOOKUP: usize = 16 * MR;
    let mut at = [0usize; LOOKUP];
    let mut r = 0;
    while r < m {
        let looked_up = (m - r).min(LOOKUP);
        windows(r, &mut at[..looked_up]);
        for (tile, at) in at[..looked_up].chunks(MR).enumerate() {
            let mut first = [images.as_ptr(); MR];
            for (first, &at) in first.iter_mut().zip(at) {
                assert!(at + span <= images.len(), "windows inside the images");
                // SAFETY: just checked.
                *first = unsafe { images.as_ptr().add(at) };
            }
            // SAFETY: the windows were checked; `b` holds every block; rows of this tile
            // are inside `c` (asserted above).
            unsafe {
                let shape = (runs, pairs, stride);
                let row = r + tile * MR;
                rows_at(
                    at.len(),
                    &first,
                    shape,
                    b.as_ptr(),
                    kh,
                    c.as_mut_ptr(),
                    n,
                    row,
                )
            };
        }
        r += looked_up;
    }
}

/// f32 dot product with four 8-lane FMA accumulators: the batch-1 (GEMV) path of the dense
/// layers, where a packing GEMM would spend its time copying the weights.
///
/// # Safety
/// The CPU must support AVX2 and FMA. Slice lengths are handled here.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let len = a.len().min(b.len());
    let mut acc: [__m256; 4] = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= len {
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: `i + 32 <= len`, so lanes `i + 8j .. i + 8j + 8` are inside both slices.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr().add(i + 8 * j)),
                    _mm256_loadu_ps(b.as_ptr().add(i + 8 * j)),
                )
            };
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= len {
        // SAFETY: `i + 8 <= len`.
        let (x, y) = unsafe {
            (
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
            )
        };
        acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` is 8 writable f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    let tail: f32 = a[i..len].iter().zip(&b[i..len]).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Requantizes the first multiple of 8 columns of one row exactly like the scalar
/// [`requantize`](super::requantize) of `acc[j] + column[j]` (as `i64`) and returns how many
/// that was:
/// `clamp(round_half_even((acc[j] + column[j] + bias[j]) * multipliers[j]) + zero_point, lo, 255)`.
///
/// # Safety
/// The CPU must support AVX2. Every `acc[j] + column[j] + bias[j]` (for the columns done)
/// must fit an `i32` (the caller proves it), so that the `i32` sum converts to the same `f32`
/// as the `i64` one. `lo` must be in `0..=255`.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn requantize_row(
    acc: &[i32],
    column: &[i32],
    bias: &[i32],
    multipliers: &[f32],
    zero_point: i32,
    lo: i32,
    out: &mut [u8],
) -> usize {
    use std::arch::x86_64::{
        _CMP_UNORD_Q, _mm_packus_epi16, _mm_packus_epi32, _mm_storel_epi64, _mm256_add_epi32,
        _mm256_blendv_ps, _mm256_castsi256_si128, _mm256_cmp_ps, _mm256_cvtepi32_ps,
        _mm256_cvtps_epi32, _mm256_extracti128_si256, _mm256_max_epi32, _mm256_max_ps,
        _mm256_min_epi32, _mm256_min_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_sub_ps,
    };
    let len = out
        .len()
        .min(acc.len())
        .min(column.len())
        .min(bias.len())
        .min(multipliers.len());
    // The constants of `round_ties_even_saturating`.
    let magic = _mm256_set1_ps(12_582_912.0);
    let (limit, neg_limit) = (_mm256_set1_ps(4_194_304.0), _mm256_set1_ps(-4_194_304.0));
    let (z, low, high) = (
        _mm256_set1_epi32(zero_point),
        _mm256_set1_epi32(lo),
        _mm256_set1_epi32(255),
    );
    let mut i = 0;
    while i + NR <= len {
        // SAFETY: `i + 8 <= len`, inside every slice.
        let (a, c, b, m) = unsafe {
            (
                _mm256_loadu_si256(acc.as_ptr().add(i).cast()),
                _mm256_loadu_si256(column.as_ptr().add(i).cast()),
                _mm256_loadu_si256(bias.as_ptr().add(i).cast()),
                _mm256_loadu_ps(multipliers.as_ptr().add(i)),
            )
        };
        // Exact in `i32` (see the safety contract); the conversion rounds to nearest even,
        // as `i64 as f32` does.
        let x = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_add_epi32(a, c), b));
        let y = _mm256_mul_ps(x, m);
        // `f32::clamp`: `vmaxps` / `vminps` return their second operand when one is NaN, so
        // NaN passes through as it does in the scalar clamp.
        let y = _mm256_min_ps(limit, _mm256_max_ps(neg_limit, y));
        let r = _mm256_sub_ps(_mm256_add_ps(y, magic), magic);
        // NaN converts to 0, as `as i32` does; other lanes are integers within 2^22.
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(r, r);
        let r = _mm256_blendv_ps(r, _mm256_setzero_ps(), nan);
        let q = _mm256_add_epi32(_mm256_cvtps_epi32(r), z);
        let q = _mm256_min_epi32(_mm256_max_epi32(q, low), high);
        // Lanes are in 0..=255: the unsigned packs are exact.
        let words = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
        let bytes = _mm_packus_epi16(words, words);
        // SAFETY: 8 bytes at `i` are inside `out`.
        unsafe { _mm_storel_epi64(out.as_mut_ptr().add(i).cast(), bytes) };
        i += NR;
    }
    i
}
