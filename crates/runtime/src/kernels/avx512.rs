//! AVX-512 VNNI integer GEMM: `vpdpbusd` multiplies four unsigned activation bytes by four
//! signed weight bytes and adds the four products to an `i32` lane, exactly (no saturation).
//!
//! Packed weight layout: blocks of 16 output columns; inside a block, for every group of four
//! `k` values, 16 lanes of 4 bytes (`[n / 16][kp / 4][16][4]`), so that one 64-byte load
//! feeds one `vpdpbusd` for 16 outputs.

use std::arch::x86_64::{
    __m512i, __mmask16, _mm512_dpbusd_epi32, _mm512_loadu_si512, _mm512_mask_storeu_epi32,
    _mm512_set1_epi32, _mm512_setzero_si512,
};

/// Columns per block.
const NR: usize = 16;
/// Rows per micro-tile.
const MR: usize = 4;

/// Packs `w` (`n` rows of `k` weights) into the block layout, zero padded to `kp` (a multiple
/// of 4: each column block then holds `kp / 4` groups) and to a multiple of 16 columns.
pub(crate) fn pack(w: &[i8], n: usize, k: usize, kp: usize) -> Vec<i8> {
    let kq = kp / 4;
    let mut out = vec![0i8; n.div_ceil(NR) * kq * NR * 4];
    for (j, row) in w.chunks_exact(k).enumerate().take(n) {
        let (block, lane) = (j / NR, j % NR);
        for (kk, &v) in row.iter().enumerate() {
            out[((block * kq + kk / 4) * NR + lane) * 4 + kk % 4] = v;
        }
    }
    out
}

/// One `rows x (16 * NB)` tile of `C`.
///
/// # Safety
/// The CPU must support AVX-512F/BW/VNNI; `a` must be readable for `rows` rows of `4 * kq`
/// bytes at stride `lda`; `b` for `NB` blocks of `kq * 64` bytes, `bs * 64` bytes apart; `c`
/// writable for `rows` rows of the columns set in `masks`, at stride `ldc`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const ROWS: usize, const NB: usize>(
    a: *const u8,
    lda: usize,
    b: *const i8,
    kq: usize,
    bs: usize,
    c: *mut i32,
    ldc: usize,
    masks: [__mmask16; NB],
) {
    let mut acc = [[_mm512_setzero_si512(); NB]; ROWS];
    for q in 0..kq {
        let mut bv = [_mm512_setzero_si512(); NB];
        for (j, v) in bv.iter_mut().enumerate() {
            // SAFETY: block `j`, group `q` lies inside the readable blocks.
            *v = unsafe { _mm512_loadu_si512(b.add((j * bs + q) * 64).cast::<__m512i>()) };
        }
        for (r, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: row `r < rows` has `4 * kq` readable bytes; the read is unaligned.
            let group = unsafe { a.add(r * lda + q * 4).cast::<i32>().read_unaligned() };
            let av = _mm512_set1_epi32(group);
            for (acc, &bv) in acc_row.iter_mut().zip(&bv) {
                *acc = _mm512_dpbusd_epi32(*acc, av, bv);
            }
        }
    }
    for (r, acc_row) in acc.iter().enumerate() {
        for (j, &v) in acc_row.iter().enumerate() {
            // SAFETY: the mask only enables the columns the caller made writable.
            unsafe { _mm512_mask_storeu_epi32(c.add(r * ldc + j * NR), masks[j], v) };
        }
    }
}

/// Column mask of a block that starts at column `start` of `n`.
fn column_mask(start: usize, n: usize) -> __mmask16 {
    let valid = (n - start).min(NR);
    if valid == NR {
        u16::MAX
    } else {
        (1u16 << valid) - 1
    }
}

/// All rows of one panel of `NB` column blocks starting at column `start`.
///
/// # Safety
/// As for [`tile`], for rows `0..m`, with `c` pointing at row 0, column 0 of `C`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn panel<const NB: usize>(
    a: *const u8,
    lda: usize,
    m: usize,
    b: *const i8,
    kq: usize,
    bs: usize,
    c: *mut i32,
    n: usize,
    start: usize,
) {
    let mut masks = [0; NB];
    for (j, mask) in masks.iter_mut().enumerate() {
        *mask = column_mask(start + j * NR, n);
    }
    let mut r = 0;
    while r + MR <= m {
        // SAFETY: rows `r..r + MR` are below `m`; the caller vouches for rows `0..m`.
        unsafe {
            tile::<MR, NB>(
                a.add(r * lda),
                lda,
                b,
                kq,
                bs,
                c.add(r * n + start),
                n,
                masks,
            )
        };
        r += MR;
    }
    // SAFETY: as above, for the last `m - r < MR` rows.
    unsafe {
        let (a, c) = (a.add(r * lda), c.add(r * n + start));
        match m - r {
            1 => tile::<1, NB>(a, lda, b, kq, bs, c, n, masks),
            2 => tile::<2, NB>(a, lda, b, kq, bs, c, n, masks),
            3 => tile::<3, NB>(a, lda, b, kq, bs, c, n, masks),
            _ => {}
        }
    }
}

/// `c[r * n + j] = sum_kk a[r * lda + kk] * w[j][kk]` for the packed weights `b`, whose
/// column blocks hold `block_k >= kp` weights each (zero beyond `kp`).
///
/// # Safety
/// The CPU must support AVX-512F/BW/VNNI. Slice lengths are checked here.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    a: &[u8],
    lda: usize,
    m: usize,
    b: &[i8],
    n: usize,
    kp: usize,
    block_k: usize,
    c: &mut [i32],
) {
    let (kq, bs) = (kp / 4, block_k / 4);
    let blocks = n.div_ceil(NR);
    assert!(kp.is_multiple_of(4) && block_k.is_multiple_of(4) && block_k >= kp);
    assert!(lda >= kp && b.len() == blocks * bs * NR * 4);
    assert!(m == 0 || a.len() >= (m - 1) * lda + kp);
    assert!(c.len() >= m * n);
    let (ap, cp) = (a.as_ptr(), c.as_mut_ptr());
    let mut block = 0;
    while block < blocks {
        // SAFETY: the asserts make rows `0..m` of `a` readable for `kp` bytes, blocks
        // `block..block + NB` of `b` readable and rows `0..m` of `c` writable for `n` values;
        // the masks only enable columns below `n`.
        unsafe {
            let bp = b.as_ptr().add(block * bs * NR * 4);
            if block + 1 < blocks {
                panel::<2>(ap, lda, m, bp, kq, bs, cp, n, block * NR);
            } else {
                panel::<1>(ap, lda, m, bp, kq, bs, cp, n, block * NR);
            }
        }
        block += 2;
    }
}

/// Requantizes the first multiple of 16 columns of one row exactly like the scalar
/// [`requantize`](super::requantize) of `acc[j] + column[j]` (as `i64`) and returns how many
/// that was:
/// `clamp(round_half_even((acc[j] + column[j] + bias[j]) * multipliers[j]) + zero_point, lo, 255)`.
///
/// # Safety
/// The CPU must support AVX-512F/BW. Every `acc[j] + column[j] + bias[j]` (for the columns
/// done) must fit an `i32` (the caller proves it), so that the `i32` sum converts to the same
/// `f32` as the `i64` one. `lo` must be in `0..=255`.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
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
        _CMP_UNORD_Q, _mm_storeu_si128, _mm512_add_epi32, _mm512_add_ps, _mm512_cmp_ps_mask,
        _mm512_cvtepi32_ps, _mm512_cvtps_epi32, _mm512_cvtusepi32_epi8, _mm512_loadu_ps,
        _mm512_mask_mov_ps, _mm512_max_epi32, _mm512_max_ps, _mm512_min_epi32, _mm512_min_ps,
        _mm512_mul_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_sub_ps,
    };
    let len = out
        .len()
        .min(acc.len())
        .min(column.len())
        .min(bias.len())
        .min(multipliers.len());
    // The constants of `round_ties_even_saturating`.
    let magic = _mm512_set1_ps(12_582_912.0);
    let (limit, neg_limit) = (_mm512_set1_ps(4_194_304.0), _mm512_set1_ps(-4_194_304.0));
    let (z, low, high) = (
        _mm512_set1_epi32(zero_point),
        _mm512_set1_epi32(lo),
        _mm512_set1_epi32(255),
    );
    let mut i = 0;
    while i + NR <= len {
        // SAFETY: `i + 16 <= len`, inside every slice.
        let (a, c, b, m) = unsafe {
            (
                _mm512_loadu_si512(acc.as_ptr().add(i).cast()),
                _mm512_loadu_si512(column.as_ptr().add(i).cast()),
                _mm512_loadu_si512(bias.as_ptr().add(i).cast()),
                _mm512_loadu_ps(multipliers.as_ptr().add(i)),
            )
        };
        // Exact in `i32` (see the safety contract); the conversion rounds to nearest even,
        // as `i64 as f32` does.
        let x = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_add_epi32(a, c), b));
        let y = _mm512_mul_ps(x, m);
        // `f32::clamp`: `vmaxps` / `vminps` return their second operand when one is NaN, so
        // NaN passes through as it does in the scalar clamp.
        let y = _mm512_min_ps(limit, _mm512_max_ps(neg_limit, y));
        let r = _mm512_sub_ps(_mm512_add_ps(y, magic), magic);
        // NaN converts to 0, as `as i32` does; other lanes are integers within 2^22.
        let r = _mm512_mask_mov_ps(
            r,
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(r, r),
            _mm512_setzero_ps(),
        );
        let q = _mm512_add_epi32(_mm512_cvtps_epi32(r), z);
        let q = _mm512_min_epi32(_mm512_max_epi32(q, low), high);
        let bytes = _mm512_cvtusepi32_epi8(q);
        // SAFETY: 16 bytes at `i` are inside `out`.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().add(i).cast(), bytes) };
        i += NR;
    }
    i
}
