//! f32 products: dense (an AVX-512 blocked kernel over weights packed at load time, else
//! `matrixmultiply`) and CSR-sparse, each with a bias and ReLU epilogue.

use rayon::prelude::*;

use super::{PARALLEL_MIN_MACS, scalar};

/// Below this many rows the dense product is a series of dot products (GEMV) over the
/// weights in place: `matrixmultiply` packs both operands on every call, which for one row
/// costs more than the product.
const GEMV_MAX_ROWS: usize = 4;

/// Weights (`n * k`) from which a GEMV is split over output columns across cores.
const GEMV_PARALLEL_MIN_WEIGHTS: usize = 1 << 17;

/// Output columns per parallel GEMV task.
const GEMV_COLUMNS: usize = 64;

/// The f32 dot product of the fastest path this CPU has.
fn dot_fn() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected just above.
        return |a, b| unsafe { super::avx2::dot(a, b) };
    }
    scalar::dot
}

/// Adds `bias` to every row of `out` (`n` columns) and applies ReLU if asked.
fn bias_relu(out: &mut [f32], bias: &[f32], relu: bool) {
    for row in out.chunks_exact_mut(bias.len()) {
        for (y, &b) in row.iter_mut().zip(bias) {
            let v = *y + b;
            *y = if relu { v.max(0.0) } else { v };
        }
    }
}

/// A dense f32 weight matrix (`n x k`, one row per output, PyTorch's layout) prepared once
/// for [`sgemm_packed`]: the rows as they are (for the few-row dot-product path) and, where
/// the CPU has AVX-512, the panels of the blocked kernel.
#[derive(Clone, Debug)]
pub struct PackedF32 {
    n: usize,
    k: usize,
    rows: Vec<f32>,
    /// Panels of the blocked kernel of `panel_isa`; empty where the portable path
    /// (`matrixmultiply`) runs instead.
    panels: Vec<f32>,
    panel_isa: PanelIsa,
}

/// The blocked f32 kernel a [`PackedF32`]'s panels are laid out for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PanelIsa {
    /// No panels: `matrixmultiply`.
    Portable,
    /// 32-column panels for the AVX-512 kernel.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
    /// 16-column panels for the AVX2 + FMA kernel.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
}

impl PackedF32 {
    /// Prepares `w` (`n` rows of `k`) for the fastest kernel of this CPU.
    ///
    /// # Panics
    /// If `w.len() != n * k`.
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        let mut packed = Self::portable(w, n, k);
        #[cfg(target_arch = "x86_64")]
        if k > 0 && super::sgemm512::available() {
            packed.panels = super::sgemm512::pack(w, n, k);
            packed.panel_isa = PanelIsa::Avx512;
        } else if k > 0 && super::sgemm256::available() {
            packed.panels = super::sgemm256::pack(w, n, k);
            packed.panel_isa = PanelIsa::Avx2;
        }
        packed
    }

    /// Like [`PackedF32::new`], for the portable kernel whatever the CPU.
    ///
    /// # Panics
    /// If `w.len() != n * k`.
    pub fn portable(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "w must be n x k");
        Self {
            n,
            k,
            rows: w.to_vec(),
            panels: Vec::new(),
            panel_isa: PanelIsa::Portable,
        }
    }

    /// Number of outputs.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Reduction length.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// Multiply-adds per parallel task of the blocked kernel, at least.
const TASK_MACS: usize = 1 << 20;

/// `out = a w^T + bias` (then ReLU if asked): `a` is `m x k`, `w` is `n x k` (one row per
/// output, PyTorch's layout), `out` is `m x n`, all row-major.
///
/// # Panics
/// If a slice does not have the length its shape gives.
pub fn sgemm_bias(
    a: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
) {
    let n = bias.len();
    assert_eq!(w.len(), n * k, "w must be n x k");
    let packed = if m < GEMV_MAX_ROWS {
        PackedF32::portable(w, n, k)
    } else {
        PackedF32::new(w, n, k)
    };
    sgemm_packed(a, m, &packed, bias, relu, out);
}

/// [`sgemm_bias`] with weights prepared by [`PackedF32`].
///
/// # Panics
/// If a slice does not have the length its shape gives.
pub fn sgemm_packed(a: &[f32], m: usize, w: &PackedF32, bias: &[f32], relu: bool, out: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert_eq!(bias.len(), n, "one bias per output");
    assert_eq!(a.len(), m * k, "a must be m x k");
    assert_eq!(out.len(), m * n, "out must be m x n");
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if k > 0 && m >= GEMV_MAX_ROWS && w.panel_isa != PanelIsa::Portable {
        let (mr, nr) = match w.panel_isa {
            PanelIsa::Avx512 => (super::sgemm512::MR, super::sgemm512::NR),
            _ => (super::sgemm256::MR, super::sgemm256::NR),
        };
        let panels = n.div_ceil(nr);
        // SAFETY (every call): the panels exist only where their kernel's features were
        // detected; the kernel checks the slice lengths; `out` is valid for `len` writes,
        // and the tasks below write disjoint rows or disjoint panels of it.
        let run = |a: &[f32], rows: usize, out: SharedOut, range: std::ops::Range<usize>| unsafe {
            let kernel = match w.panel_isa {
                PanelIsa::Avx512 => super::sgemm512::gemm,
                _ => super::sgemm256::gemm,
            };
            kernel(
                a,
                rows,
                k,
                &w.panels,
                n,
                bias,
                relu,
                out.ptr(),
                out.1,
                range,
            );
        };
        let task_rows = TASK_MACS.div_ceil(n * k).next_multiple_of(mr).max(4 * mr);
        if m * n * k < PARALLEL_MIN_MACS || !super::may_split() {
            run(a, m, SharedOut(out.as_mut_ptr(), out.len()), 0..panels);
        } else if m >= 2 * task_rows {
            a.par_chunks(task_rows * k)
                .zip(out.par_chunks_mut(task_rows * n))
                .for_each(|(a, out)| {
                    let rows = out.len() / n;
                    run(a, rows, SharedOut(out.as_mut_ptr(), out.len()), 0..panels);
                });
        } else {
            // Few rows of a wide layer: every task computes all rows for one panel.
            let shared = SharedOut(out.as_mut_ptr(), out.len());
            (0..panels)
                .into_par_iter()
                .for_each(|p| run(a, m, shared, p..p + 1));
        }
        return;
    }
    if k == 0 {
        out.fill(0.0);
    } else if m < GEMV_MAX_ROWS {
        let dot = dot_fn();
        let w = &w.rows;
        for (x, y) in a.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
            let columns = |y: &mut [f32], w: &[f32]| {
                for (y, w) in y.iter_mut().zip(w.chunks_exact(k)) {
                    *y = dot(x, w);
                }
            };
            if n * k < GEMV_PARALLEL_MIN_WEIGHTS || n < 2 * GEMV_COLUMNS {
                columns(y, w);
            } else {
                // Few rows: the work is split over the outputs, so that each core streams
                // its share of the weights (which then also stays in its own cache).
                y.par_chunks_mut(GEMV_COLUMNS)
                    .zip(w.par_chunks(GEMV_COLUMNS * k))
                    .for_each(|(y, w)| columns(y, w));
            }
        }
    } else {
        // SAFETY: the asserts above make every index the strides reach valid: `a` is m x k with
        // strides (k, 1), `w^T` is k x n with strides (1, k) over the n x k `w`, and `out` is
        // m x n with strides (n, 1). With beta = 0 the initial contents of `out` are not read.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                k as isize,
                1,
                w.rows.as_ptr(),
                1,
                k as isize,
                0.0,
                out.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    }
    bias_relu(out, bias, relu);
}

/// [`sgemm_packed`] of a convolution: `out = patches w^T + bias` (ReLU if asked), the im2col
/// rows taken from the images as the kernel needs them where it can (AVX2), else written out
/// first. With `group` above 1, each run of `group` consecutive rows is a pooling window
/// (see [`super::patch_pixels`]) and gives one row of `out`: the maxima of its rows.
///
/// # Panics
/// If the patches' rows are not `w.k()` long, `group` is 0 or does not divide the rows, or
/// `out` is not rows / group x n.
pub fn sgemm_patches(
    patches: &super::Patches<f32>,
    w: &PackedF32,
    bias: &[f32],
    relu: bool,
    group: usize,
    out: &mut [f32],
) {
    let (m, n, k) = (patches.rows(), w.n, w.k);
    assert_eq!(patches.geometry.patch_len(), k, "patches of k values");
    assert_eq!(bias.len(), n, "one bias per output");
    assert!(group > 0 && m.is_multiple_of(group), "rows in whole groups");
    assert_eq!(out.len(), m / group * n, "out must be m / group x n");
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if k > 0
        && m >= GEMV_MAX_ROWS
        && w.panel_isa == PanelIsa::Avx2
        && patches.geometry.padding == 0
        && group <= super::sgemm256::MR
        && let Some(pool) = (1..=group).find(|p| p * p == group)
    {
        // Without padding every window is inside its image: the kernel reads them in place.
        let g = patches.geometry;
        let windows = |first: usize, step: usize, out: &mut [usize]| {
            let inside = patches.windows_every(first, step, out);
            assert!(inside, "without padding every window is inside its image");
        };
        // A pooling window's rows, in raster order (see `patch_pixels`), from its first.
        let mut offsets = [0usize; super::sgemm256::MR];
        for (i, offset) in offsets.iter_mut().enumerate().take(group) {
            *offset = ((i / pool) * g.width + i % pool) * g.stride * g.channels;
        }
        let pooled = if group > 1 { &offsets[..group] } else { &[] };
        // SAFETY: AVX2 panels exist only where AVX2 and FMA were detected; `out` is valid
        // for its length; the kernel checks the rest.
        unsafe {
            super::sgemm256::gemm_windows(
                m,
                patches.images(),
                &windows,
                (g.kernel, g.kernel * g.channels, g.width * g.channels),
                &w.panels,
                (n, pooled),
                bias,
                relu,
                out.as_mut_ptr(),
                out.len(),
            )
        };
        return;
    }
    if group > 1 {
        let mut full = vec![0.0f32; m * n];
        sgemm_patches(patches, w, bias, relu, 1, &mut full);
        super::max_rows(&full, group, n, out);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if k > 0 && m >= GEMV_MAX_ROWS && w.panel_isa == PanelIsa::Avx2 {
        let fill = |first: usize, count: usize, dst: &mut [f32]| {
            patches.fill(first, count, dst, k);
        };
        // SAFETY: AVX2 panels exist only where AVX2 and FMA were detected; `out` is valid
        // for its length; the kernel checks the rest.
        unsafe {
            super::sgemm256::gemm_rows(
                m,
                k,
                &w.panels,
                n,
                bias,
                relu,
                out.as_mut_ptr(),
                out.len(),
                &fill,
            )
        };
        return;
    }
    let mut cols = vec![0.0f32; m * k];
    patches.fill(0, m, &mut cols, k.max(1));
    sgemm_packed(&cols, m, w, bias, relu, out);
}

/// One row's product for the outputs `first..first + out.len()` only:
/// `out[i] = x . w[first + i] + bias[first + i]` (then ReLU if asked), so that the outputs of
/// a one-row product can be shared out between threads.
///
/// # Panics
/// If `x` is not `k` long or the outputs run past `n`.
pub fn gemv_columns(
    x: &[f32],
    w: &PackedF32,
    bias: &[f32],
    relu: bool,
    first: usize,
    out: &mut [f32],
) {
    let k = w.k;
    assert_eq!(x.len(), k, "one row of k values");
    assert!(first + out.len() <= w.n && bias.len() == w.n);
    let dot = dot_fn();
    let rows = &w.rows[first * k..(first + out.len()) * k];
    for ((y, row), &b) in out
        .iter_mut()
        .zip(rows.chunks_exact(k.max(1)))
        .zip(&bias[first..])
    {
        let v = if k == 0 { 0.0 } else { dot(x, row) } + b;
        *y = if relu { v.max(0.0) } else { v };
    }
}

/// The output of a GEMM whose parallel tasks write disjoint columns.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct SharedOut(*mut f32, usize);

// SAFETY: only used where the tasks write disjoint elements (see `sgemm_packed`).
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// A sparse `rows x cols` matrix in compressed sparse row form: row `i` holds the entries
/// `row_ptr[i]..row_ptr[i + 1]` of `col_idx` and `values`.
#[derive(Clone, Debug, PartialEq)]
pub struct CsrMatrix {
    rows: usize,
    cols: usize,
    row_ptr: Vec<usize>,
    col_idx: Vec<u32>,
    values: Vec<f32>,
    /// Where the reduction is longer than [`CSR_PANEL`] (and the index stays small next to
    /// the entries): the panel width (a multiple of 16; else `cols`) and, panel by panel,
    /// the first entry of each row in the panel: `panel_ptr[p * rows + i]` for row `i` and
    /// panel `p`, then the row ends (entries are sorted by column within a row). Empty for a
    /// single panel.
    panel: usize,
    panel_ptr: Vec<usize>,
}

impl CsrMatrix {
    /// Checks and wraps CSR arrays: `row_ptr` has `rows + 1` entries, starts at 0, never
    /// decreases and ends at the number of values; every column index is below `cols`.
    pub fn new(
        rows: usize,
        cols: usize,
        row_ptr: Vec<usize>,
        col_idx: Vec<u32>,
        values: Vec<f32>,
    ) -> Result<Self, String> {
        if row_ptr.len() != rows + 1 {
            return Err(format!(
                "row_ptr has {} entries, expected {}",
                row_ptr.len(),
                rows + 1
            ));
        }
        if col_idx.len() != values.len() {
            return Err(format!(
                "{} column indices for {} values",
                col_idx.len(),
                values.len()
            ));
        }
        if row_ptr[0] != 0 {
            return Err(format!("row_ptr starts at {}, expected 0", row_ptr[0]));
        }
        if let Some(i) = row_ptr.windows(2).position(|w| w[1] < w[0]) {
            return Err(format!(
                "row_ptr is not monotone: entry {} is {} after {}",
                i + 1,
                row_ptr[i + 1],
                row_ptr[i]
            ));
        }
        if row_ptr[rows] != values.len() {
            return Err(format!(
                "row_ptr ends at {}, but there are {} values",
                row_ptr[rows],
                values.len()
            ));
        }
        if let Some(i) = col_idx.iter().position(|&c| c as usize >= cols) {
            return Err(format!(
                "column index {} at entry {i} is out of range for {cols} columns",
                col_idx[i]
            ));
        }
        Ok(Self::indexed(rows, cols, row_ptr, col_idx, values))
    }

    /// Wraps valid CSR arrays, sorting each row by column and indexing its panels.
    fn indexed(
        rows: usize,
        cols: usize,
        row_ptr: Vec<usize>,
        mut col_idx: Vec<u32>,
        mut values: Vec<f32>,
    ) -> Self {
        let mut pairs = Vec::new();
        for r in 0..rows {
            let (lo, hi) = (row_ptr[r], row_ptr[r + 1]);
            if col_idx[lo..hi].is_sorted() {
                continue;
            }
            pairs.clear();
            pairs.extend(
                col_idx[lo..hi]
                    .iter()
                    .copied()
                    .zip(values[lo..hi].iter().copied()),
            );
            pairs.sort_by_key(|&(c, _)| c);
            for (i, &(c, v)) in pairs.iter().enumerate() {
                (col_idx[lo + i], values[lo + i]) = (c, v);
            }
        }
        let panels = cols.div_ceil(CSR_PANEL);
        let panel = cols.div_ceil(panels.max(1)).next_multiple_of(16);
        let panels = cols.div_ceil(panel.max(1));
        // The index is kept within a small multiple of the arrays it indexes, so that a
        // matrix declared huge with few entries cannot make it large; without it the
        // product runs as one panel (slower for long rows, never wrong).
        let index_len = rows.saturating_mul(panels + 1);
        let (panel, panel_ptr) = if cols > CSR_PANEL && index_len <= 4 * (values.len() + rows + 1) {
            let mut ptr = Vec::with_capacity(rows * (panels + 1));
            for p in 0..panels {
                ptr.extend((0..rows).map(|r| {
                    let (lo, hi) = (row_ptr[r], row_ptr[r + 1]);
                    lo + col_idx[lo..hi].partition_point(|&c| (c as usize) < p * panel)
                }));
            }
            ptr.extend_from_slice(&row_ptr[1..]);
            (panel, ptr)
        } else {
            (cols, Vec::new())
        };
        Self {
            rows,
            cols,
            row_ptr,
            col_idx,
            values,
            panel,
            panel_ptr,
        }
    }

    /// The non-zero entries of a dense row-major `rows x cols` matrix.
    ///
    /// # Panics
    /// If `dense.len() != rows * cols` or `cols` does not fit a `u32`.
    pub fn from_dense(dense: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(dense.len(), rows * cols);
        let cols32 = u32::try_from(cols).expect("columns fit u32");
        let mut row_ptr = Vec::with_capacity(rows + 1);
        let (mut col_idx, mut values) = (Vec::new(), Vec::new());
        row_ptr.push(0);
        for row in dense.chunks_exact(cols.max(1)).take(rows) {
            for (c, &v) in (0..cols32).zip(row) {
                if v != 0.0 {
                    col_idx.push(c);
                    values.push(v);
                }
            }
            row_ptr.push(values.len());
        }
        row_ptr.resize(rows + 1, 0);
        Self::indexed(rows, cols, row_ptr, col_idx, values)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of stored entries.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// Row pointers (`rows + 1` entries).
    pub fn row_ptr(&self) -> &[usize] {
        &self.row_ptr
    }

    /// Column index of each stored entry.
    pub fn col_idx(&self) -> &[u32] {
        &self.col_idx
    }

    /// The same matrix with its columns renumbered: entry `(r, c)` moves to
    /// `(r, permutation[c])`.
    ///
    /// # Panics
    /// If `permutation` has fewer than `cols` entries or maps a column to `cols` or beyond.
    pub fn permute_columns(&self, permutation: &[usize]) -> Self {
        assert!(permutation.len() >= self.cols);
        let col_idx = self
            .col_idx
            .iter()
            .map(|&c| {
                let p = permutation[c as usize];
                assert!(p < self.cols, "permutation leaves the matrix");
                p as u32
            })
            .collect();
        Self::indexed(
            self.rows,
            self.cols,
            self.row_ptr.clone(),
            col_idx,
            self.values.clone(),
        )
    }

    /// Value of each stored entry.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The dense row-major matrix.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            for e in self.row_ptr[r]..self.row_ptr[r + 1] {
                out[r * self.cols + self.col_idx[e] as usize] = self.values[e];
            }
        }
        out
    }
}

/// Rows of `x` per block of the batched sparse product: the block is transposed so that one
/// sparse weight meets this many activations in one contiguous load.
const CSR_BLOCK: usize = 32;

/// Reduction length per panel of the batched sparse product, at most: a panel of transposed
/// activations (`CSR_PANEL x 32` f32, 32 KiB) stays in L1 while every output's entries in
/// it are accumulated; longer reductions are split into equal panels.
const CSR_PANEL: usize = 256;

/// Below this many rows each row is a series of sparse dot products over `x` in place.
const CSR_DOT_MAX_ROWS: usize = 4;

/// Stored weights from which a few-row sparse product is split over outputs across cores.
const CSR_PARALLEL_MIN_NNZ: usize = 1 << 15;

/// Output rows per task of a parallel few-row sparse product.
const CSR_TASK_OUTPUTS: usize = 32;

/// Proof that this CPU has AVX-512F: only [`Avx512::detect`] makes one, so a kernel handed
/// `Some` may run AVX-512 code (the tests hand `None` to run the portable code).
#[derive(Clone, Copy, Debug)]
struct Avx512(());

impl Avx512 {
    fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            return Some(Self(()));
        }
        None
    }
}

thread_local! {
    /// One block of transposed activations and one of transposed outputs, kept by each
    /// thread between blocks and calls.
    static CSR_SCRATCH: std::cell::Cell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// `out = x w^T + bias` (then ReLU if asked) for a CSR `w` (`n x k`, one row per output):
/// `x` is `m x k`, `out` is `m x n`, row-major.
///
/// Batches run in blocks of 32 rows: the block of `x` is transposed (`k x 32`), so that each
/// stored weight is one broadcast and two 16-wide multiply-adds over contiguous activations;
/// the outputs are gathered transposed and written back row by row with the bias. One to
/// three rows are sparse dot products (split over outputs across cores for large layers).
///
/// Long reductions are split into panels of at most 256 columns, whose transposed block
/// stays in L1; every output accumulates over the panels.
///
/// # Panics
/// If a slice does not have the length its shape gives.
pub fn csr_gemm_bias(
    x: &[f32],
    m: usize,
    w: &CsrMatrix,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
) {
    csr_gemm(x, m, w, bias, relu, out, Avx512::detect());
}

/// [`csr_gemm_bias`] with the AVX-512 kernels if `isa` is given, else the portable ones.
fn csr_gemm(
    x: &[f32],
    m: usize,
    w: &CsrMatrix,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
    isa: Option<Avx512>,
) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "x must be m x k");
    assert_eq!(bias.len(), n, "one bias per output");
    assert_eq!(out.len(), m * n, "out must be m x n");
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        bias_relu(out, bias, relu);
        return;
    }
    if m < CSR_DOT_MAX_ROWS {
        for (x, y) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
            if w.nnz() < CSR_PARALLEL_MIN_NNZ || n < 2 * CSR_TASK_OUTPUTS {
                csr_dots(x, w, 0, bias, relu, y, isa);
            } else {
                y.par_chunks_mut(CSR_TASK_OUTPUTS)
                    .enumerate()
                    .for_each(|(t, y)| {
                        csr_dots(x, w, t * CSR_TASK_OUTPUTS, bias, relu, y, isa);
                    });
            }
        }
        return;
    }
    let block = |x: &[f32], out: &mut [f32]| {
        let mut scratch = CSR_SCRATCH.with(std::cell::Cell::take);
        for (x, out) in x.chunks(CSR_BLOCK * k).zip(out.chunks_mut(CSR_BLOCK * n)) {
            csr_block_dispatch(x, w, bias, relu, out, &mut scratch, isa);
        }
        CSR_SCRATCH.with(|cell| cell.set(scratch));
    };
    // Enough blocks per task that a task is worth a wake-up.
    let per_task = PARALLEL_MIN_MACS
        .div_ceil(CSR_BLOCK * w.nnz().max(1))
        .clamp(1, m.div_ceil(CSR_BLOCK));
    let rows = per_task * CSR_BLOCK;
    if m * w.nnz() < PARALLEL_MIN_MACS || m <= rows {
        block(x, out);
    } else {
        x.par_chunks(rows * k)
            .zip(out.par_chunks_mut(rows * n))
            .for_each(|(x, out)| block(x, out));
    }
}

/// Outputs `first..first + y.len()` of one row: sparse dot products over `x`.
fn csr_dots(
    x: &[f32],
    w: &CsrMatrix,
    first: usize,
    bias: &[f32],
    relu: bool,
    y: &mut [f32],
    isa: Option<Avx512>,
) {
    let _ = isa;
    for (j, y) in (first..).zip(y.iter_mut()) {
        let (lo, hi) = (w.row_ptr[j], w.row_ptr[j + 1]);
        let (cols, vals) = (&w.col_idx[lo..hi], &w.values[lo..hi]);
        #[cfg(target_arch = "x86_64")]
        if isa.is_some() {
            // SAFETY: the token proves AVX-512F; `CsrMatrix` guarantees every
            // column index is below `cols`, and `x` holds `cols` values (checked by the
            // caller's shape asserts).
            let v = unsafe { super::sgemm512::sparse_dot(x, cols, vals) } + bias[j];
            *y = if relu { v.max(0.0) } else { v };
            continue;
        }
        let mut acc = [0.0f32; 4];
        let (cc, vc) = (cols.chunks_exact(4), vals.chunks_exact(4));
        let tail: f32 = cc
            .remainder()
            .iter()
            .zip(vc.remainder())
            .map(|(&c, &v)| v * x[c as usize])
            .sum();
        for (c, v) in cc.zip(vc) {
            for i in 0..4 {
                acc[i] += v[i] * x[c[i] as usize];
            }
        }
        let v = (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail + bias[j];
        *y = if relu { v.max(0.0) } else { v };
    }
}

/// Transposes whole 16 x 16 tiles of columns `c0..c0 + xt.len()` of the `rows x k` block `x`
/// into `xt` (one row of 32 lanes per column) where the CPU has AVX-512; returns how many
/// rows and columns that covered.
fn transpose_tiles(
    x: &[f32],
    k: usize,
    c0: usize,
    rows: usize,
    xt: &mut [[f32; CSR_BLOCK]],
    isa: Option<Avx512>,
) -> (usize, usize) {
    #[cfg(target_arch = "x86_64")]
    if isa.is_some() {
        let (tr, tc) = (rows / 16 * 16, xt.len() / 16 * 16);
        assert!(c0 + xt.len() <= k && x.len() >= rows * k && rows <= CSR_BLOCK);
        for r0 in (0..tr).step_by(16) {
            for c in (0..tc).step_by(16) {
                // SAFETY: the token proves AVX-512F; rows `r0..r0 + 16` and columns
                // `c0 + c..c0 + c + 16` are inside `x` (`rows x k`), and columns
                // `c..c + 16`, lanes `r0..r0 + 16` inside `xt` (asserted above).
                unsafe {
                    super::sgemm512::transpose16(
                        x.as_ptr().add(r0 * k + c0 + c),
                        k,
                        xt.as_mut_ptr().add(c).cast::<f32>().add(r0),
                        CSR_BLOCK,
                    )
                };
            }
        }
        return (tr, tc);
    }
    let _ = (x, k, c0, rows, xt, isa);
    (0, 0)
}

/// [`csr_block`] compiled for AVX-512 where the CPU has it.
fn csr_block_dispatch(
    x: &[f32],
    w: &CsrMatrix,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
    scratch: &mut (Vec<f32>, Vec<f32>),
    isa: Option<Avx512>,
) {
    #[cfg(target_arch = "x86_64")]
    if isa.is_some() {
        // SAFETY: the token proves AVX-512F.
        unsafe { csr_block_avx512(x, w, bias, relu, out, scratch, isa) };
        return;
    }
    csr_block(x, w, bias, relu, out, scratch, isa);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn csr_block_avx512(
    x: &[f32],
    w: &CsrMatrix,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
    scratch: &mut (Vec<f32>, Vec<f32>),
    isa: Option<Avx512>,
) {
    csr_block(x, w, bias, relu, out, scratch, isa);
}

/// `len` values of `v` starting on a 64-byte boundary (`v` grows as needed; stale contents
/// are kept): a row of a transposed block is then two whole cache lines, and no load
/// straddles two.
fn aligned(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    const LINE: usize = 16;
    if v.len() < len + LINE {
        v.resize(len + LINE, 0.0);
    }
    let skip = v.as_ptr().align_offset(64).min(LINE - 1);
    &mut v[skip..skip + len]
}

/// Up to [`CSR_BLOCK`] rows: for each panel of the reduction, transposes its columns of `x`
/// into `panel x 32` and accumulates every output over its stored weights in the panel, 32
/// rows at a time; then writes the rows of `out` with the bias.
#[inline(always)]
fn csr_block(
    x: &[f32],
    w: &CsrMatrix,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
    (xt, yt): &mut (Vec<f32>, Vec<f32>),
    isa: Option<Avx512>,
) {
    let (n, k) = (w.rows, w.cols);
    let rows = x.len() / k;
    let panels = k.div_ceil(w.panel);
    // Stale contents are fine: every used entry is written below, and the lanes of missing
    // rows only reach outputs that are never written back.
    let xt = aligned(xt, w.panel * CSR_BLOCK);
    let yt: &mut [[f32; CSR_BLOCK]] = &mut aligned(yt, n * CSR_BLOCK).as_chunks_mut().0[..n];
    for p in 0..panels {
        let c0 = p * w.panel;
        let xt: &mut [[f32; CSR_BLOCK]] = &mut xt.as_chunks_mut().0[..w.panel.min(k - c0)];
        let (done_rows, done_cols) = transpose_tiles(x, k, c0, rows, xt, isa);
        // The rest column by column: contiguous writes, each row's cache line serves 16
        // columns.
        for (c, column) in xt.iter_mut().enumerate() {
            let from = if c < done_cols { done_rows } else { 0 };
            for (r, v) in column.iter_mut().enumerate().take(rows).skip(from) {
                *v = x[r * k + c0 + c];
            }
        }
        let xt: &[[f32; CSR_BLOCK]] = xt;
        let accumulate = p > 0;
        for (j, y) in yt.iter_mut().enumerate() {
            let (lo, hi) = if panels == 1 {
                (w.row_ptr[j], w.row_ptr[j + 1])
            } else {
                (w.panel_ptr[p * n + j], w.panel_ptr[(p + 1) * n + j])
            };
            let (cols, vals) = (&w.col_idx[lo..hi], &w.values[lo..hi]);
            #[cfg(target_arch = "x86_64")]
            if isa.is_some() {
                // SAFETY: the token proves AVX-512F; the entries of panel `p` have
                // columns `c0..c0 + xt.len()`, the columns transposed into `xt`.
                unsafe {
                    super::sgemm512::sparse_block_row(xt, c0 as u32, cols, vals, accumulate, y)
                };
                continue;
            }
            let mut acc = if accumulate { *y } else { [0.0f32; CSR_BLOCK] };
            for (&c, &v) in cols.iter().zip(vals) {
                let column = &xt[c as usize - c0];
                for i in 0..CSR_BLOCK {
                    acc[i] += v * column[i];
                }
            }
            *y = acc;
        }
    }
    let (done_rows, done_cols) = transpose_back(yt, n, rows, out, isa);
    for (r, row) in out.chunks_exact_mut(n).take(rows).enumerate() {
        let from = if r < done_rows { done_cols } else { 0 };
        for (j, o) in row.iter_mut().enumerate().skip(from) {
            *o = yt[j][r];
        }
        bias_relu(row, bias, relu);
    }
}

/// Transposes whole 16 x 16 tiles of the `n x 32` block outputs `yt` into the rows of `out`
/// (`rows x n`) where the CPU has AVX-512; returns how many rows and columns that covered.
fn transpose_back(
    yt: &[[f32; CSR_BLOCK]],
    n: usize,
    rows: usize,
    out: &mut [f32],
    isa: Option<Avx512>,
) -> (usize, usize) {
    #[cfg(target_arch = "x86_64")]
    if isa.is_some() {
        let (tr, tc) = (rows / 16 * 16, n / 16 * 16);
        assert!(yt.len() >= n && out.len() >= rows * n);
        for r0 in (0..tr).step_by(16) {
            for c0 in (0..tc).step_by(16) {
                // SAFETY: the token proves AVX-512F; outputs `c0..c0 + 16`, lanes
                // `r0..r0 + 16` are inside `yt`, rows `r0..r0 + 16` and columns
                // `c0..c0 + 16` inside `out` (asserted above).
                unsafe {
                    super::sgemm512::transpose16(
                        yt.as_ptr().add(c0).cast::<f32>().add(r0),
                        CSR_BLOCK,
                        out.as_mut_ptr().add(r0 * n + c0),
                        n,
                    )
                };
            }
        }
        return (tr, tc);
    }
    let _ = (yt, n, rows, out, isa);
    (0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Relative error allowed per unit of `k` between an f32 kernel and the f64 reference:
    /// a length-`k` dot product accumulates at most about `k` roundings of `2^-24` each,
    /// relative to the sum of absolute products.
    const F32_DOT_REL_TOL_PER_K: f64 = 2.0 * f32::EPSILON as f64;

    fn reference(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        bias: &[f32],
        relu: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let n = bias.len();
        let (mut out, mut mag) = (vec![0.0; m * n], vec![0.0; m * n]);
        for r in 0..m {
            for j in 0..n {
                let (mut s, mut a) = (f64::from(bias[j]), f64::from(bias[j]).abs());
                for kk in 0..k {
                    let p = f64::from(x[r * k + kk]) * f64::from(w[j * k + kk]);
                    s += p;
                    a += p.abs();
                }
                out[r * n + j] = if relu { s.max(0.0) } else { s };
                mag[r * n + j] = a;
            }
        }
        (out, mag)
    }

    fn close(got: &[f32], expected: &[f64], mag: &[f64], k: usize) -> Result<(), TestCaseError> {
        for (i, ((&g, &e), &a)) in got.iter().zip(expected).zip(mag).enumerate() {
            let tol = F32_DOT_REL_TOL_PER_K * (k as f64 + 1.0) * a + f64::from(f32::MIN_POSITIVE);
            prop_assert!(
                (f64::from(g) - e).abs() <= tol,
                "entry {i}: {g} vs {e} (tol {tol})"
            );
        }
        Ok(())
    }

    fn matrix(len: usize, sparsity: f64, seed: u64) -> Vec<f32> {
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn sgemm_matches_the_reference(m in 1usize..40, n in 1usize..40, k in 1usize..130, seed in any::<u64>(), relu in any::<bool>()) {
            let x = matrix(m * k, 0.0, seed);
            let w = matrix(n * k, 0.0, !seed);
            let bias = matrix(n, 0.0, seed ^ 5);
            let mut out = vec![0.0; m * n];
            sgemm_bias(&x, m, k, &w, &bias, relu, &mut out);
            let (e, mag) = reference(&x, m, k, &w, &bias, relu);
            close(&out, &e, &mag, k)?;
        }

        #[test]
        fn packed_and_portable_sgemm_match_the_reference(m in 1usize..60, n in 1usize..80, k in 1usize..600, seed in any::<u64>(), relu in any::<bool>()) {
            let x = matrix(m * k, 0.0, seed);
            let w = matrix(n * k, 0.0, !seed);
            let bias = matrix(n, 0.0, seed ^ 5);
            let (e, mag) = reference(&x, m, k, &w, &bias, relu);
            for packed in [PackedF32::new(&w, n, k), PackedF32::portable(&w, n, k)] {
                let mut out = vec![f32::NAN; m * n];
                sgemm_packed(&x, m, &packed, &bias, relu, &mut out);
                close(&out, &e, &mag, k)?;
            }
        }

        #[test]
        fn csr_matches_the_dense_reference(m in 1usize..80, n in 1usize..40, k in 1usize..700, sparsity in 0.0f64..1.0, seed in any::<u64>(), relu in any::<bool>()) {
            let x = matrix(m * k, 0.0, seed);
            let w = matrix(n * k, sparsity, !seed);
            let bias = matrix(n, 0.0, seed ^ 5);
            let csr = CsrMatrix::from_dense(&w, n, k);
            prop_assert_eq!(csr.to_dense(), w.clone());
            let (e, mag) = reference(&x, m, k, &w, &bias, relu);
            // The portable kernels, the AVX-512 ones where the CPU has them, and the entry
            // point.
            for isa in [None, Avx512::detect()] {
                let mut out = vec![f32::NAN; m * n];
                csr_gemm(&x, m, &csr, &bias, relu, &mut out, isa);
                close(&out, &e, &mag, k)?;
            }
            let mut out = vec![f32::NAN; m * n];
            csr_gemm_bias(&x, m, &csr, &bias, relu, &mut out);
            close(&out, &e, &mag, k)?;
        }
    }

    proptest! {
        #[test]
        fn every_dot_product_matches_the_reference(len in 0usize..300, seed in any::<u64>()) {
            let (a, b) = (matrix(len, 0.0, seed), matrix(len, 0.0, !seed));
            let (e, mag) = reference(&a, 1, len, &b, &[0.0], false);
            close(&[scalar::dot(&a, &b)], &e, &mag, len)?;
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: the features were detected just above.
                let got = unsafe { crate::kernels::avx2::dot(&a, &b) };
                close(&[got], &e, &mag, len)?;
            }
        }
    }

    #[test]
    fn csr_rejects_bad_arrays() {
        let ok = CsrMatrix::new(2, 3, vec![0, 1, 2], vec![0, 2], vec![1.0, 2.0]);
        assert!(ok.is_ok());
        let err = CsrMatrix::new(2, 3, vec![0, 2, 1], vec![0, 2], vec![1.0, 2.0]).unwrap_err();
        assert!(err.contains("not monotone"), "{err}");
        let err = CsrMatrix::new(2, 3, vec![0, 1, 2], vec![0, 3], vec![1.0, 2.0]).unwrap_err();
        assert!(err.contains("out of range"), "{err}");
        let err = CsrMatrix::new(2, 3, vec![0, 1], vec![0], vec![1.0]).unwrap_err();
        assert!(err.contains("row_ptr has 2 entries"), "{err}");
        let err = CsrMatrix::new(1, 3, vec![0, 3], vec![0], vec![1.0]).unwrap_err();
        assert!(err.contains("ends at 3"), "{err}");
    }

    #[test]
    fn wide_single_rows_take_the_parallel_gemv_and_agree() {
        let (m, n, k) = (1, 300, 512);
        assert!(n * k >= GEMV_PARALLEL_MIN_WEIGHTS && n >= 2 * GEMV_COLUMNS);
        let x = matrix(m * k, 0.0, 7);
        let w = matrix(n * k, 0.0, 8);
        let bias = matrix(n, 0.0, 9);
        let mut out = vec![0.0; m * n];
        sgemm_bias(&x, m, k, &w, &bias, true, &mut out);
        let (e, mag) = reference(&x, m, k, &w, &bias, true);
        close(&out, &e, &mag, k).unwrap();
    }

    #[test]
    fn permuting_columns_moves_the_dense_entries() {
        let w = matrix(3 * 5, 0.5, 3);
        let perm = [4, 0, 3, 1, 2];
        let csr = CsrMatrix::from_dense(&w, 3, 5).permute_columns(&perm);
        let dense = csr.to_dense();
        for r in 0..3 {
            for (c, &p) in perm.iter().enumerate() {
                assert_eq!(dense[r * 5 + p], w[r * 5 + c]);
            }
        }
    }

    #[test]
    fn panels_split_long_rows_and_keep_unsorted_entries_equal() {
        // Rows that end before the last panel, rows in one panel only, empty rows and a
        // row whose entries arrive unsorted.
        let (n, k) = (6, 3 * CSR_PANEL + 37);
        let mut w = vec![0.0f32; n * k];
        w[..40].fill(1.5); // row 0: the first panel only
        w[k + k - 5..2 * k].fill(-2.0); // row 1: the last panel only
        for c in (0..k).step_by(7) {
            w[3 * k + c] = c as f32 / 100.0; // row 3: every panel; rows 2 and 5 empty
        }
        w[4 * k + CSR_PANEL] = 3.0;
        w[4 * k + 1] = -1.0;
        let sorted = CsrMatrix::from_dense(&w, n, k);
        assert!(sorted.panel < k && sorted.panel.is_multiple_of(16) && sorted.panel <= CSR_PANEL);
        assert_eq!(sorted.panel_ptr.len(), n * (k.div_ceil(sorted.panel) + 1));
        let (lo, hi) = (sorted.row_ptr[4], sorted.row_ptr[5]);
        let mut col_idx = sorted.col_idx.clone();
        let mut values = sorted.values.clone();
        col_idx[lo..hi].reverse();
        values[lo..hi].reverse();
        let unsorted =
            CsrMatrix::new(n, k, sorted.row_ptr.clone(), col_idx, values).expect("valid");
        assert_eq!(unsorted, sorted);
        let bias = matrix(n, 0.0, 3);
        for m in [4, 31, 33, 70] {
            let x = matrix(m * k, 0.0, m as u64);
            let (e, mag) = reference(&x, m, k, &w, &bias, false);
            for isa in [None, Avx512::detect()] {
                let mut out = vec![f32::NAN; m * n];
                csr_gemm(&x, m, &sorted, &bias, false, &mut out, isa);
                close(&out, &e, &mag, k).unwrap();
            }
        }
    }

    #[test]
    fn all_zero_weights_give_the_bias() {
        for (m, k) in [(1, 5), (5, 300), (40, 1000)] {
            let n = 7;
            let csr = CsrMatrix::from_dense(&vec![0.0; n * k], n, k);
            assert_eq!(csr.nnz(), 0);
            // 300 columns: two empty panels per row; 1000: an index larger than the matrix
            // justifies, so one panel.
            assert_eq!(csr.panel_ptr.is_empty(), k != 300);
            let x = matrix(m * k, 0.0, 1);
            let bias = matrix(n, 0.0, 2);
            for isa in [None, Avx512::detect()] {
                let mut out = vec![f32::NAN; m * n];
                csr_gemm(&x, m, &csr, &bias, true, &mut out, isa);
                for row in out.chunks(n) {
                    for (o, b) in row.iter().zip(&bias) {
                        assert_eq!(*o, b.max(0.0));
                    }
                }
            }
        }
    }

    #[test]
    fn the_panel_index_stays_small_next_to_the_entries() {
        // A declared 2^20 x 2^20 matrix with one entry per row: no index.
        let (rows, cols) = (1 << 20, 1 << 20);
        let row_ptr: Vec<usize> = (0..=rows).collect();
        let col_idx: Vec<u32> = (0..rows as u32).collect();
        let csr = CsrMatrix::new(rows, cols, row_ptr, col_idx, vec![1.0; rows]).expect("valid");
        assert!(csr.panel_ptr.is_empty() && csr.panel == cols);
        // The teacher's dense layer at 90% sparsity: indexed.
        let w = matrix(128 * 1600, 0.9, 4);
        let csr = CsrMatrix::from_dense(&w, 128, 1600);
        assert_eq!((csr.panel, csr.panel_ptr.len()), (240, 128 * 8));
    }

    #[test]
    fn large_sparse_batches_take_the_parallel_path_and_agree() {
        let (m, n, k) = (300, 64, 300);
        let x = matrix(m * k, 0.0, 1);
        let w = matrix(n * k, 0.5, 2);
        let csr = CsrMatrix::from_dense(&w, n, k);
        assert!(m * csr.nnz() >= PARALLEL_MIN_MACS);
        let bias = vec![0.5; n];
        let mut out = vec![0.0; m * n];
        csr_gemm_bias(&x, m, &csr, &bias, true, &mut out);
        let (e, mag) = reference(&x, m, k, &w, &bias, true);
        close(&out, &e, &mag, k).unwrap();
    }
}
