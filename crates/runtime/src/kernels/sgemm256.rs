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
/// Rows of the largest tile: two 2 x 2 pooling windows on one half of a panel.
const POOLED_ROWS: usize = 8;

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

/// Where a tile's activations are: row `r`'s `k` values of the reduction are `runs` runs of
/// `run` contiguous values, the first at `a[r]` and each `stride` values after the one
/// before (one run for a matrix row; for a convolution window, one run per kernel row).
#[derive(Clone, Copy)]
struct Rows<const ROWS: usize> {
    a: [*const f32; ROWS],
    runs: usize,
    run: usize,
    stride: usize,
}

/// The columns of a panel that a tile writes: the first `valid` of its 16 (at least one),
/// and the lane masks of its two halves ([`masks`]).
#[derive(Clone, Copy)]
struct Columns {
    valid: usize,
    masks: [__m256i; 2],
}

impl Columns {
    /// The columns of the panel that starts at column `start` of `n`.
    #[target_feature(enable = "avx2")]
    fn of(start: usize, n: usize) -> Self {
        Self {
            valid: (n - start).min(NR),
            masks: masks(start, n),
        }
    }
}

/// One `ROWS x 8 HALVES` tile over the `runs * run` values of the reduction that `a`
/// describes: `c (+)= a b`; on the last block of the reduction the bias and ReLU are
/// applied. With one half, only the first 8 columns of the panel are computed (a panel of
/// at most 8 valid columns). Halves whose columns are all valid are loaded and stored
/// plainly, the others masked.
///
/// With `pooled` (only on a whole reduction: `first` and `last`), the `ROWS` rows are
/// `WINDOWS` pooling windows of `ROWS / WINDOWS` consecutive rows: the column maxima of
/// each window's results are stored as one row.
///
/// # Safety
/// AVX2 and FMA; `a` readable where it says; `b` for `runs * run * 16` values; `bias` for
/// the columns in `columns`; `c` readable (unless `first`) and writable for `ROWS` rows
/// (`WINDOWS` if `pooled`) of those columns at stride `ldc`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const ROWS: usize, const HALVES: usize, const WINDOWS: usize>(
    a: Rows<ROWS>,
    b: *const f32,
    bias: *const f32,
    (first, last, relu, pooled): (bool, bool, bool, bool),
    c: *mut f32,
    ldc: usize,
    columns: Columns,
) {
    let whole = |h: usize| columns.valid >= 8 * (h + 1);
    let mut acc = [[_mm256_setzero_ps(); HALVES]; ROWS];
    if !first {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (h, acc) in acc.iter_mut().enumerate() {
                // SAFETY: the caller vouches for the columns of row `r`.
                *acc = unsafe {
                    let p = c.add(r * ldc + 8 * h);
                    if whole(h) {
                        _mm256_loadu_ps(p)
                    } else {
                        _mm256_maskload_ps(p, columns.masks[h])
                    }
                };
            }
        }
    }
    let mut b = b;
    for run in 0..a.runs {
        let rows: [*const f32; ROWS] = std::array::from_fn(|r| a.a[r].wrapping_add(run * a.stride));
        for e in 0..a.run {
            // SAFETY: `run * run_len + e` is inside the panel's block and `e` inside the
            // rows' run.
            let w: [__m256; HALVES] =
                std::array::from_fn(|h| unsafe { _mm256_loadu_ps(b.add(8 * h)) });
            for (acc, row) in acc.iter_mut().zip(rows) {
                // SAFETY: as above.
                let x = unsafe { _mm256_broadcast_ss(&*row.add(e)) };
                for (acc, &w) in acc.iter_mut().zip(&w) {
                    *acc = _mm256_fmadd_ps(x, w, *acc);
                }
            }
            // SAFETY: at most one past the block.
            b = unsafe { b.add(NR) };
        }
    }
    // SAFETY: masked loads and stores touch only the columns the caller vouches for.
    unsafe {
        let bias: [__m256; HALVES] = std::array::from_fn(|h| {
            if last {
                _mm256_maskload_ps(bias.add(8 * h), columns.masks[h])
            } else {
                _mm256_setzero_ps()
            }
        });
        let zero = _mm256_setzero_ps();
        // Bias and ReLU (on the last block of the reduction), then the store of half `h` of
        // output row `row`.
        macro_rules! emit {
            ($v:expr, $row:expr, $h:expr) => {{
                let (mut v, h) = ($v, $h);
                if last {
                    v = _mm256_add_ps(v, bias[h]);
                    if relu {
                        v = _mm256_max_ps(v, zero);
                    }
                }
                let p = c.add($row * ldc + 8 * h);
                if whole(h) {
                    _mm256_storeu_ps(p, v);
                } else {
                    _mm256_maskstore_ps(p, columns.masks[h], v);
                }
            }};
        }
        if pooled {
            // Bias and ReLU are the same for every row of a column and non-decreasing: the
            // maximum first, then the epilogue.
            let size = ROWS / WINDOWS;
            for (w, window) in acc.chunks_exact(size).enumerate().take(WINDOWS) {
                for (h, &v) in window[0].iter().enumerate() {
                    let v = window[1..]
                        .iter()
                        .fold(v, |best, row| _mm256_max_ps(best, row[h]));
                    emit!(v, w, h);
                }
            }
            return;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (h, &v) in acc.iter().enumerate() {
                emit!(v, r, h);
            }
        }
    }
}

/// [`tile`] for `rows` rows (1 to [`MR`]) and the halves that `columns` needs, each pooled
/// tile one window; or 8 rows, pooled as two windows of 4 on one half.
///
/// # Safety
/// As for [`tile`] with `ROWS = rows`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_any(
    rows: usize,
    a: impl Fn(usize) -> *const f32,
    (runs, run, stride): (usize, usize, usize),
    b: *const f32,
    bias: *const f32,
    flags: (bool, bool, bool, bool),
    (c, ldc): (*mut f32, usize),
    columns: Columns,
) {
    macro_rules! go {
        ($rows:literal) => {{
            let a = Rows::<$rows> {
                a: std::array::from_fn(|r| a(r)),
                runs,
                run,
                stride,
            };
            // SAFETY: forwarded from the caller.
            unsafe {
                if columns.valid <= 8 {
                    tile::<$rows, 1, 1>(a, b, bias, flags, c, ldc, columns)
                } else {
                    tile::<$rows, 2, 1>(a, b, bias, flags, c, ldc, columns)
                }
            }
        }};
    }
    match rows {
        // Two pooling windows of 2 x 2 on one half of a panel: eight accumulators.
        POOLED_ROWS => {
            let a = Rows::<POOLED_ROWS> {
                a: std::array::from_fn(a),
                runs,
                run,
                stride,
            };
            // SAFETY: forwarded from the caller, who passes 8 rows only pooled, in two
            // windows, on a panel of at most 8 columns.
            unsafe { tile::<POOLED_ROWS, 1, 2>(a, b, bias, flags, c, ldc, columns) }
        }
        6 => go!(6),
        5 => go!(5),
        4 => go!(4),
        3 => go!(3),
        2 => go!(2),
        _ => go!(1),
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
        let flags = (k0 == 0, k0 + kc == k, relu, false);
        for p in panels.clone() {
            let start = p * NR;
            let columns = Columns::of(start, n);
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
                    let a = |i: usize| a.wrapping_add(i * k);
                    tile_any(rows, a, (1, kc, 0), b, bias, flags, (c, n), columns)
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
            let flags = (k0 == 0, k0 + kc == k, relu, false);
            for p in 0..panels {
                let start = p * NR;
                let columns = Columns::of(start, n);
                // SAFETY: the tile's rows are in `rows` (`count` rows of `k`); panel `p`'s
                // block `k0..` is inside `packed`; rows `r..r + count` of `out` are inside
                // `out_len`; the masks keep the columns below `n`.
                unsafe {
                    let a = rows.as_ptr().add(k0);
                    let b = packed.as_ptr().add(p * k * NR + k0 * NR);
                    let (bias, c) = (bias.as_ptr().add(start), out.add(r * n + start));
                    let a = |i: usize| a.wrapping_add(i * k);
                    tile_any(count, a, (1, kc, 0), b, bias, flags, (c, n), columns)
                }
            }
        }
        r += count;
    }
    ROWS.with(|cell| cell.set(rows));
}

/// [`gemm`] over convolution windows read in place: row `i` of the activations is the window
/// that starts at `input[at]`, where `windows(first, step, out)` writes the starts of rows
/// `first`, `first + step`, ... into `out`; a window is `runs` runs of `run` values (the
/// reduction is `runs * run` long, in the packed weights' order), each `stride` values
/// after the one before. No im2col row is written. All panels are written. With more than
/// one entry in `pooled`, each run of `pooled.len()` consecutive rows (at most [`MR`]) is a
/// pooling window whose rows start `pooled[i]` values after its first row's, and gives one
/// output row, the column maxima.
///
/// # Panics
/// If a window runs past `input`, a pooling window has more than [`MR`] rows or the rows
/// do not come in whole windows, or a slice is shorter than its shape.
///
/// # Safety
/// AVX2 and FMA; `out` must be valid for reads and writes of `out_len` values.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_windows(
    m: usize,
    input: &[f32],
    windows: &dyn Fn(usize, usize, &mut [usize]),
    (runs, run, stride): (usize, usize, usize),
    packed: &[f32],
    (n, pooled): (usize, &[usize]),
    bias: &[f32],
    relu: bool,
    out: *mut f32,
    out_len: usize,
) {
    let k = runs * run;
    let group = pooled.len().max(1);
    assert!(group <= MR && m.is_multiple_of(group));
    assert!(k > 0 && out_len >= m / group * n && bias.len() >= n);
    let panels = n.div_ceil(NR);
    assert!(packed.len() == panels * k * NR);
    let pooling = group > 1;
    // Blocks of whole runs, about `KC` values each; a pooled tile takes the whole reduction
    // (its rows' partial sums have nowhere to wait).
    let per_block = if pooling {
        runs
    } else {
        runs.div_ceil(runs.div_ceil((KC / run).max(1)))
    };
    // Rows per tile: two windows of 2 x 2 where one half of a panel suffices.
    let two = pooling && 2 * group == POOLED_ROWS && n <= 8;
    let tile_rows = match (pooling, two) {
        (false, _) => MR,
        (true, false) => group,
        (true, true) => 2 * group,
    };
    // The row offsets inside a tile: from the first row of each window.
    let mut offsets = [0usize; POOLED_ROWS];
    if pooling {
        for (i, offset) in offsets.iter_mut().enumerate().take(tile_rows) {
            *offset = pooled[i % group];
        }
    }
    let span = (runs - 1) * stride + run;
    let columns: Vec<Columns> = (0..panels).map(|p| Columns::of(p * NR, n)).collect();
    // The windows of many tiles at a time: every row's, or every pooling window's first.
    const LOOKUP: usize = 96;
    let mut at = [0usize; LOOKUP];
    let lookup = LOOKUP / tile_rows * tile_rows;
    let mut out_row = 0;
    let mut r = 0;
    while r < m {
        let rows_now = (m - r).min(lookup);
        let starts = if pooling { rows_now / group } else { rows_now };
        windows(r, if pooling { group } else { 1 }, &mut at[..starts]);
        let per_tile = if pooling {
            tile_rows / group
        } else {
            tile_rows
        };
        for at in at[..starts].chunks(per_tile) {
            let count = if pooling { at.len() * group } else { at.len() };
            let mut first = [input.as_ptr(); POOLED_ROWS];
            for (i, first) in first.iter_mut().enumerate().take(count) {
                let start = if pooling {
                    at[i / group] + offsets[i]
                } else {
                    at[i]
                };
                assert!(start + span <= input.len(), "windows inside the input");
                // SAFETY: just checked.
                *first = unsafe { input.as_ptr().add(start) };
            }
            for run0 in (0..runs).step_by(per_block) {
                let block = (runs - run0).min(per_block);
                let flags = (run0 == 0, run0 + block == runs, relu, pooling);
                let rows: [*const f32; POOLED_ROWS] =
                    std::array::from_fn(|i| first[i].wrapping_add(run0 * stride));
                for (p, &columns) in columns.iter().enumerate() {
                    let start = p * NR;
                    // SAFETY: the windows were checked; panel `p`'s block of runs `run0..` is
                    // inside `packed`; output row `out_row` (and the ones after it that the
                    // tile writes) of `out` is inside `out_len`; the masks keep the columns
                    // below `n`.
                    unsafe {
                        let b = packed.as_ptr().add(p * k * NR + run0 * run * NR);
                        let (bias, c) = (bias.as_ptr().add(start), out.add(out_row * n + start));
                        let a = |i: usize| rows[i];
                        tile_any(
                            count,
                            a,
                            (block, run, stride),
                            b,
                            bias,
                            flags,
                            (c, n),
                            columns,
                        )
                    }
                }
            }
            out_row += count / group;
        }
        r += rows_now;
    }
}
