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
/// Rows per micro-tile.
const MR: usize = 4;

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

/// One `ROWS x (8 * NB)` tile of `C`, written to `out` (row stride `8 * NB`).
///
/// # Safety
/// The CPU must support AVX2; `a` must be readable for `ROWS` rows of `2 * kh` bytes at
/// stride `lda`; `b` for `NB * kh * 16` values.
#[target_feature(enable = "avx2")]
unsafe fn tile<const ROWS: usize, const NB: usize>(
    a: *const u8,
    lda: usize,
    b: *const i16,
    kh: usize,
    out: &mut [[[i32; NR]; NB]; ROWS],
) {
    let mut acc = [[_mm256_setzero_si256(); NB]; ROWS];
    for p in 0..kh {
        let mut bv = [_mm256_setzero_si256(); NB];
        for (j, v) in bv.iter_mut().enumerate() {
            // SAFETY: block `j`, pair `p` lies inside the `NB * kh * 16` readable values.
            *v = unsafe { _mm256_loadu_si256(b.add((j * kh + p) * 16).cast::<__m256i>()) };
        }
        for (r, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: row `r < ROWS` has `2 * kh` readable bytes; the read is unaligned.
            let pair = unsafe { a.add(r * lda + p * 2).cast::<u16>().read_unaligned() };
            // Two zero-extended activations as the low and high `i16` of each lane.
            let pair = i32::from(pair & 0xff) | (i32::from(pair >> 8) << 16);
            let av = _mm256_set1_epi32(pair);
            for (acc, &bv) in acc_row.iter_mut().zip(&bv) {
                *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(av, bv));
            }
        }
    }
    for (dst, acc_row) in out.iter_mut().zip(&acc) {
        for (dst, &v) in dst.iter_mut().zip(acc_row) {
            // SAFETY: `dst` is an `[i32; 8]`, exactly 32 writable bytes.
            unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast::<__m256i>(), v) };
        }
    }
}

/// Computes rows `r..r + ROWS` of one panel and copies the valid columns into `c`.
///
/// # Safety
/// As for [`tile`], with `a` pointing at row `r`.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows<const ROWS: usize, const NB: usize>(
    a: *const u8,
    lda: usize,
    b: *const i16,
    kh: usize,
    c: &mut [i32],
    n: usize,
    r: usize,
    start: usize,
) {
    let mut out = [[[0i32; NR]; NB]; ROWS];
    // SAFETY: forwarded from the caller.
    unsafe { tile::<ROWS, NB>(a, lda, b, kh, &mut out) };
    let width = (n - start).min(NR * NB);
    for (i, tile_row) in out.iter().enumerate() {
        let dst = &mut c[(r + i) * n + start..(r + i) * n + start + width];
        for (d, &v) in dst.iter_mut().zip(tile_row.as_flattened()) {
            *d = v;
        }
    }
}

/// All rows of one panel of `NB` column blocks starting at column `start`.
///
/// # Safety
/// The CPU must support AVX2; `a` readable for rows `0..m` of `2 * kh` bytes at stride
/// `lda`; `b` readable for `NB * kh * 16` values.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn panel<const NB: usize>(
    a: *const u8,
    lda: usize,
    m: usize,
    b: *const i16,
    kh: usize,
    c: &mut [i32],
    n: usize,
    start: usize,
) {
    let mut r = 0;
    while r + MR <= m {
        // SAFETY: rows `r..r + MR` are below `m`; the caller vouches for rows `0..m`.
        unsafe { rows::<MR, NB>(a.add(r * lda), lda, b, kh, c, n, r, start) };
        r += MR;
    }
    // SAFETY: as above, for the last `m - r < MR` rows.
    unsafe {
        let ar = a.add(r * lda);
        match m - r {
            1 => rows::<1, NB>(ar, lda, b, kh, c, n, r, start),
            2 => rows::<2, NB>(ar, lda, b, kh, c, n, r, start),
            3 => rows::<3, NB>(ar, lda, b, kh, c, n, r, start),
            _ => {}
        }
    }
}

/// `c[r * n + j] = sum_kk a[r * lda + kk] * w[j][kk]` for the packed weights `b`.
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
    let kh = kp / 2;
    let blocks = n.div_ceil(NR);
    assert!(kp.is_multiple_of(2) && lda >= kp && b.len() == blocks * kh * NR * 2);
    assert!(m == 0 || a.len() >= (m - 1) * lda + kp);
    assert!(c.len() >= m * n);
    let ap = a.as_ptr();
    let mut block = 0;
    while block < blocks {
        // SAFETY: the asserts make rows `0..m` of `a` readable for `kp` bytes and blocks
        // `block..block + NB` of `b` readable; `c` is written through bounds-checked slices.
        unsafe {
            let bp = b.as_ptr().add(block * kh * NR * 2);
            if block + 1 < blocks {
                panel::<2>(ap, lda, m, bp, kh, c, n, block * NR);
            } else {
                panel::<1>(ap, lda, m, bp, kh, c, n, block * NR);
            }
        }
        block += 2;
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
