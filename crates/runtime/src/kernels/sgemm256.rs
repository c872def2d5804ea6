//! AVX2 + FMA f32 GEMM over weights packed once at load time, with the bias and ReLU epilogue
//! fused into the stores: the dense path of CPUs without AVX-512.
//!
//! Packed layout: panels of 16 output columns; inside a panel, for every `k`, the 16 weights
//! of its columns (`[n / 16][k][16]`, zero padded to whole panels), so the micro-kernel
//! streams each panel front to back with two 32-byte loads per `k`. The micro-kernel keeps a
//! `ROWS x 16` block of `C` in 2 * `ROWS` registers (`ROWS` up to 6: 12 accumulators, two
//! weight vectors and one broadcast, 15 of the 16 registers) and broadcasts one activation
//! per row and `k` from the row-major input (no packing of the activations).

use std::arch::x86_64::{
    __m256, __m256i, _mm256_add_ps, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps,
    _mm256_maskload_ps, _mm256_maskstore_ps, _mm256_max_ps, _mm256_set_epi32, _mm256_set1_epi32,
    _mm256_setzero_ps, _mm256_storeu_ps, _mm256_sub_epi32,
};

/// Columns per panel.
pub(crate) const NR: usize = 16;
/// Rows per micro-tile.
pub(crate) const MR: usize = 6;

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
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

/// Lane masks (all bits set in a lane that is written) of the panel that starts at column
/// `start` of `n`: the valid columns of its two halves.
#[target_feature(enable = "avx2")]
fn masks(start: usize, n: usize) -> [__m256i; 2] {
    let valid = (n - start).min(NR) as i32;
    let lanes = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    // `lane < valid` as all ones: `lane - valid` is negative exactly there.
    let below = |v: i32| _mm256_sub_epi32(lanes, _mm256_set1_epi32(v));
    [below(valid), below(valid - 8)]
}

/// `k` per cache block: a panel's block of weights (`KC x 16` f32, 16 KiB) stays in L1
/// while every row tile of the task passes over it.
const KC: usize = 256;

/// One `ROWS x 16` tile over `k` values of the reduction: `c (+)= a b`; on the last block
/// of `k` the bias and ReLU are applied. `full` says that all 16 columns are valid (plain
/// loads and stores instead of masked ones).
///
/// # Safety
/// AVX2 and FMA; `a` readable for `ROWS` rows of `k` values at stride `lda`; `b` for `k * 16`
/// values; `bias` for the columns in `masks`; `c` readable (unless `first`) and writable
/// for `ROWS` rows of those columns at stride `ldc`.
#[target_feature(enable = "avx2,fma")]
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
    (full, masks): (bool, [__m256i; 2]),
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
    if !first {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (h, acc) in acc.iter_mut().enumerate() {
                // SAFETY: the caller vouches for the masked columns of row `r`.
                *acc = unsafe {
                    let p = c.add(r * ldc + 8 * h);
                    if full {
                        _mm256_loadu_ps(p)
                    } else {
                        _mm256_maskload_ps(p, masks[h])
                    }
                };
            }
        }
    }
    for kk in 0..k {
        // SAFETY: `kk < k`: inside the panel and inside every row.
        let (b0, b1) = unsafe {
            (
                _mm256_loadu_ps(b.add(kk * NR)),
                _mm256_loadu_ps(b.add(kk * NR + 8)),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let x = unsafe { _mm256_broadcast_ss(&*a.add(r * lda + kk)) };
            acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
        }
    }
    // SAFETY: masked loads and stores touch only the columns the caller vouches for.
    unsafe {
        let bias: [__m256; 2] = if last {
            [
                _mm256_maskload_ps(bias, masks[0]),
                _mm256_maskload_ps(bias.add(8), masks[1]),
            ]
        } else {
            [_mm256_setzero_ps(); 2]
        };
        let zero = _mm256_setzero_ps();
        for (r, acc) in acc.iter().enumerate() {
            for h in 0..2 {
                let mut v = acc[h];
                if last {
                    v = _mm256_add_ps(v, bias[h]);
                    if relu {
                        v = _mm256_max_ps(v, zero);
                    }
                }
                let p = c.add(r * ldc + 8 * h);
                if full {
                    _mm256_storeu_ps(p, v);
                } else {
                    _mm256_maskstore_ps(p, masks[h], v);
                }
            }
        }
    }
}

/// [`tile`] for `rows` rows (1 to [`MR`]).
///
/// # Safety
/// As for [`tile`] with `ROWS = rows`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_of(
    rows: usize,
    a: *const f32,
    lda: usize,
    k: usize,
    b: *const f32,
    bias: *const f32,
    flags: (bool, bool, bool),
    c: *mut f32,
    ldc: usize,
    columns: (bool, [__m256i; 2]),
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match rows {
            6 => tile::<6>(a, lda, k, b, bias, flags, c, ldc, columns),
            5 => tile::<5>(a, lda, k, b, bias, flags, c, ldc, columns),
            4 => tile::<4>(a, lda, k, b, bias, flags, c, ldc, columns),
            3 => tile::<3>(a, lda, k, b, bias, flags, c, ldc, columns),
            2 => tile::<2>(a, lda, k, b, bias, flags, c, ldc, columns),
            _ => tile::<1>(a, lda, k, b, bias, flags, c, ldc, columns),
        }
    }
}

/// `out = a w^T + bias` (ReLU if asked) for `m` rows of `a` (`m x k`, row-major) and the
/// packed `w`, over the panels `panels` (a range of panel indices): only the columns of
/// those panels of `out` (`m x n`, row-major) are written.
///
/// # Safety
/// AVX2 and FMA; `out` must be valid for reads and writes of `out_len` values, and no one
/// else may access the columns of `panels` during the call. Slice lengths are checked here.
#[target_feature(enable = "avx2,fma")]
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
            let columns = (start + NR <= n, masks(start, n));
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
                    tile_of(rows, a, k, kc, b, bias, flags, c, n, columns)
                }
                r += rows;
            }
        }
    }
}

thread_local! {
    /// A row tile's activations, kept by each thread between calls.
    static ROWS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// [`gemm`] with the activations produced row tile by row tile by `fill(first, count, dst)`,
/// which writes rows `first..first + count`, `k` values each, one after the other into `dst`
/// (an im2col that never leaves the L1 cache). All panels are written.
///
/// # Safety
/// AVX2 and FMA; `out` must be valid for reads and writes of `out_len` values. Slice lengths
/// are checked here.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows(
    m: usize,
    k: usize,
    packed: &[f32],
    n: usize,
    bias: &[f32],
    relu: bool,
    out: *mut f32,
    out_len: usize,
    fill: &dyn Fn(usize, usize, &mut [f32]),
) {
    assert!(k > 0 && out_len >= m * n && bias.len() >= n);
    let panels = n.div_ceil(NR);
    assert!(packed.len() == panels * k * NR);
    let block = k.div_ceil(k.div_ceil(KC));
    let mut rows = ROWS.with(std::cell::Cell::take);
    rows.clear();
    rows.resize(MR * k, 0.0);
    let mut r = 0;
    while r < m {
        let count = (m - r).min(MR);
        fill(r, count, &mut rows[..count * k]);
        for k0 in (0..k).step_by(block) {
            let kc = (k - k0).min(block);
            let flags = (k0 == 0, k0 + kc == k, relu);
            for p in 0..panels {
                let start = p * NR;
                let columns = (start + NR <= n, masks(start, n));
                // SAFETY: the tile's rows are in `rows` (`count` rows of `k`); panel `p`'s
                // block `k0..` is inside `packed`; rows `r..r + count` of `out` are inside
                // `out_len`; the masks keep the columns below `n`.
                unsafe {
                    let a = rows.as_ptr().add(k0);
                    let b = packed.as_ptr().add(p * k * NR + k0 * NR);
                    let (bias, c) = (bias.as_ptr().add(start), out.add(r * n + start));
                    tile_of(count, a, k, kc, b, bias, flags, c, n, columns)
                }
            }
        }
        r += count;
    }
    ROWS.with(|cell| cell.set(rows));
}
