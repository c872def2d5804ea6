//! Compute kernels: integer and float matrix products with fused epilogues, convolution
//! lowering, pooling and sparse products.
//!
//! The integer GEMM has one file per instruction set, in the candle style:
//! [`scalar`](Isa::Scalar) (the reference), [`avx2`](Isa::Avx2),
//! [`avx512`](Isa::Avx512Vnni) (VNNI) and [`amx`](Isa::Amx) (tile instructions, with the
//! VNNI kernel for the rows that do not fill a tile), chosen at run time. Every fast path is
//! property-tested to give exactly the scalar path's `i32` accumulators. The AVX2 kernel
//! widens a tile of 6 activation rows to `u16` once (a pair is then one broadcast load) and
//! passes it over every column block; a convolution's rows ([`Patches`]) are produced that
//! way straight from the images, so no im2col matrix is written.
//!
//! The f32 GEMM is a register-blocked kernel over weights packed at load time, with the bias
//! and ReLU fused into its stores: 12 x 32 tiles with AVX-512, 6 x 16 with AVX2 + FMA (which
//! also reads a convolution's windows in place, [`Patches::windows`]); elsewhere it is
//! `matrixmultiply::sgemm` followed by a bias and ReLU pass; one to three rows are dot
//! products over the weights in place.
//!
//! A max pooling of equal stride after a convolution is fused into it: the rows are ordered
//! window by window ([`im2col_nhwc_pooled`], [`patch_pixels`]) and each window's maximum is
//! taken before the integer epilogue (both epilogues are non-decreasing) or after the f32
//! one.
//!
//! Sparse (CSR) weights: [`csr_gemm_bias`] transposes blocks of 32 rows (in panels of at
//! most 256 columns) and spends one broadcast and two 16-wide multiply-adds per stored
//! weight; [`sparse_conv_nhwc`] runs a stride-1 convolution directly on NHWC images.
//!
//! The kernels are public for benchmarks and for engines built on them; every one computes
//! what its scalar reference computes:
//!
//! ```
//! use runtime::kernels::{Isa, PackedI8, gemm_u8i8, padded_k};
//!
//! // Two rows of u8 activations times three int8 weight rows (k = 5), exact in i32.
//! let (m, n, k) = (2, 3, 5);
//! let weights: Vec<i8> = (0..n * k).map(|i| (i as i8 - 7) * 9).collect();
//! let lda = padded_k(k);
//! let mut a = vec![0u8; m * lda];
//! for r in 0..m {
//!     for kk in 0..k {
//!         a[r * lda + kk] = (40 * r + 51 * kk) as u8;
//!     }
//! }
//! let fast = PackedI8::new(&weights, n, k, &[0; 3]); // the best instruction set here
//! let reference = PackedI8::new_for(Isa::Scalar, &weights, n, k, &[0; 3]).unwrap();
//! let (mut c, mut expected) = (vec![0i32; m * n], vec![0i32; m * n]);
//! gemm_u8i8(&a, lda, m, &fast, &mut c);
//! gemm_u8i8(&a, lda, m, &reference, &mut expected);
//! assert_eq!(c, expected);
//! let direct: i32 = (0..k).map(|kk| i32::from(a[lda + kk]) * i32::from(weights[2 * k + kk])).sum();
//! assert_eq!(c[n + 2], direct);
//! ```

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod dense;
mod grouped;
mod nodes;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod sgemm256;
#[cfg(target_arch = "x86_64")]
mod sgemm512;
mod sparse_conv;
mod spatial;

pub use dense::{
    CsrMatrix, PackedF32, csr_gemm_bias, gemv_columns, sgemm_bias, sgemm_packed, sgemm_patches,
};
pub use grouped::{Grouped, GroupedEpilogue, grouped_conv_f32, grouped_conv_int8};
pub use nodes::{
    Window, activation, avg_pool_nhwc, concat_channels, global_avg_pool_nhwc, max_pool_nhwc,
    scale_shift_nhwc,
};
pub use sparse_conv::{SparseConv, sparse_conv_nhwc};
pub use spatial::{
    ConvGeometry, Patches, im2col, im2col_nhwc, im2col_nhwc_pooled, max_pool2d, max_pool2d_nhwc,
    max_rows, nhwc_to_nchw, patch_pixels, patch_windows, pooled_rows,
};

use rayon::prelude::*;

/// Largest reduction length `k` of the integer GEMM: `k * 255 * 128` must fit an `i32`
/// accumulator (65 536 * 32 640 < 2^31).
pub const MAX_INT8_K: usize = 65_536;

/// Row stride granularity of integer GEMM activations: rows are read in groups of this many
/// bytes, so an activation row holds at least [`padded_k`] bytes (the padding may hold anything;
/// it meets zero weights).
pub const K_ALIGN: usize = 4;

/// Rows per block of the integer GEMM drivers: one block is computed and its epilogue applied
/// while the accumulators are still in cache; blocks are the unit of parallel work.
const ROW_BLOCK: usize = 64;

/// Below this many multiply-adds a product runs on the calling thread: batch-1 inference of
/// small layers would spend more time waking rayon workers than computing.
pub const PARALLEL_MIN_MACS: usize = 1 << 21;

/// Whether a kernel may split its work over threads: not when it already runs on one of
/// rayon's (the engine spreads a batch's images over the threads and runs each share's
/// kernels on its own thread, and a caller that parallelises over its own calls has done the
/// same) or as a share of the engine's own small-batch team, where splitting again would only
/// add hand-offs.
pub fn may_split() -> bool {
    rayon::current_thread_index().is_none() && !crate::team::in_team()
}

/// `k` rounded up to [`K_ALIGN`]: the smallest valid row stride for integer activations.
pub fn padded_k(k: usize) -> usize {
    k.next_multiple_of(K_ALIGN)
}

/// The instruction set an integer kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust: the reference.
    Scalar,
    /// AVX2, widening to `i16` and `vpmaddwd` (exact, no `vpmaddubsw` saturation).
    Avx2,
    /// AVX-512 with VNNI `vpdpbusd` (`u8 x i8` into `i32`).
    Avx512Vnni,
    /// AMX tiles (`tdpbusd`, 16 x 16 x 64 per instruction), with AVX-512 VNNI for the rows
    /// that do not fill a tile.
    Amx,
}

impl Isa {
    /// The fastest instruction set this CPU supports.
    pub fn detect() -> Self {
        [Self::Amx, Self::Avx512Vnni, Self::Avx2]
            .into_iter()
            .find(|isa| isa.is_available())
            .unwrap_or(Self::Scalar)
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Amx => amx::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every instruction set this CPU supports, the reference first.
    pub fn available() -> Vec<Self> {
        [Self::Scalar, Self::Avx2, Self::Avx512Vnni, Self::Amx]
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect()
    }

    /// A short lowercase name (`scalar`, `avx2`, `avx512vnni`, `amx`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512vnni",
            Self::Amx => "amx",
        }
    }
}

#[derive(Clone, Debug)]
enum PackedData {
    I8(Vec<i8>),
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    I16(Vec<i16>),
}

/// An `n x k` int8 weight matrix (one row per output), packed once for one kernel, with the
/// per-row sums and zero points its epilogue needs.
#[derive(Clone, Debug)]
pub struct PackedI8 {
    isa: Isa,
    n: usize,
    k: usize,
    kp: usize,
    /// Weights per packed column block (`kp`, or more where a kernel pads further).
    block_k: usize,
    data: PackedData,
    row_sums: Vec<i32>,
    zero_points: Vec<i32>,
}

impl PackedI8 {
    /// Packs `weights` (`n` rows of `k`) for the fastest kernel of this CPU.
    ///
    /// `zero_points` holds one zero point per row, or is empty for symmetric weights.
    ///
    /// # Panics
    /// If `weights.len() != n * k`, `k` exceeds [`MAX_INT8_K`] or `zero_points` has neither
    /// 0 nor `n` entries (the loader checks all of these first).
    pub fn new(weights: &[i8], n: usize, k: usize, zero_points: &[i32]) -> Self {
        Self::pack(Isa::detect(), weights, n, k, zero_points)
    }

    /// Like [`PackedI8::new`] for a chosen kernel; `None` if this CPU cannot run it.
    ///
    /// # Panics
    /// As [`PackedI8::new`].
    pub fn new_for(
        isa: Isa,
        weights: &[i8],
        n: usize,
        k: usize,
        zero_points: &[i32],
    ) -> Option<Self> {
        isa.is_available()
            .then(|| Self::pack(isa, weights, n, k, zero_points))
    }

    fn pack(isa: Isa, weights: &[i8], n: usize, k: usize, zero_points: &[i32]) -> Self {
        assert_eq!(weights.len(), n * k, "weights must hold n * k values");
        assert!(
            k > 0 && k <= MAX_INT8_K,
            "k = {k} is outside 1..={MAX_INT8_K}"
        );
        assert!(zero_points.is_empty() || zero_points.len() == n);
        let kp = padded_k(k);
        let block_k = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => amx::block_k(kp),
            _ => kp,
        };
        let data = match isa {
            Isa::Scalar => PackedData::I8(scalar::pack(weights, n, k, kp)),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => PackedData::I16(avx2::pack(weights, n, k, kp)),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Amx => PackedData::I8(avx512::pack(weights, n, k, block_k)),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only scalar kernels exist on this architecture"),
        };
        let row_sums = weights
            .chunks_exact(k)
            .map(|row| row.iter().map(|&w| i32::from(w)).sum())
            .collect();
        let zero_points = if zero_points.iter().all(|&z| z == 0) {
            Vec::new()
        } else {
            zero_points.to_vec()
        };
        Self {
            isa,
            n,
            k,
            kp,
            block_k,
            data,
            row_sums,
            zero_points,
        }
    }

    /// Number of rows (outputs).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Reduction length.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The kernel the weights are packed for.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    fn zero_point(&self, j: usize) -> i64 {
        self.zero_points.get(j).map_or(0, |&z| i64::from(z))
    }
}

/// Raw integer product: `c[r * n + j] = sum_kk a[r * lda + kk] * w[j][kk]` for `m` rows.
///
/// # Panics
/// If `lda < padded_k(k)`, `a` is shorter than `(m - 1) * lda + padded_k(k)` or `c` than
/// `m * n`.
pub fn gemm_u8i8(a: &[u8], lda: usize, m: usize, w: &PackedI8, c: &mut [i32]) {
    assert!(lda >= w.kp, "row stride {lda} is below padded k {}", w.kp);
    assert!(
        m == 0 || a.len() >= (m - 1) * lda + w.kp,
        "activations too short"
    );
    assert!(c.len() >= m * w.n, "output too short");
    match (&w.data, w.isa) {
        (PackedData::I8(b), Isa::Scalar) => scalar::gemm(a, lda, m, b, w.n, w.k, w.kp, c),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `PackedI8` for AVX-512 VNNI exists only where the CPU supports it
        // (`PackedI8::new` detects, `new_for` checks); the kernel checks slice lengths.
        (PackedData::I8(b), Isa::Avx512Vnni) => unsafe {
            avx512::gemm(a, lda, m, b, w.n, w.kp, w.block_k, c)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above: a `PackedI8` for AMX exists only where `amx::available()`.
        (PackedData::I8(b), Isa::Amx) => unsafe { amx::gemm(a, lda, m, b, w.n, w.k, w.kp, c) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2.
        (PackedData::I16(b), Isa::Avx2) => unsafe { avx2::gemm(a, lda, m, b, w.n, w.kp, c) },
        _ => unreachable!("packed data always matches its kernel"),
    }
}

/// Quantized activations for the integer GEMM: `rows` rows of `k` bytes at stride `lda`
/// (at least [`padded_k`]), all with the same zero point.
#[derive(Clone, Copy, Debug)]
pub struct U8Matrix<'a> {
    /// The bytes, row-major.
    pub data: &'a [u8],
    /// Row stride, at least `padded_k(k)`.
    pub lda: usize,
    /// Number of rows.
    pub rows: usize,
    /// The activation zero point (0..=255).
    pub zero_point: i32,
}

impl<'a> U8Matrix<'a> {
    /// The rows `range` of the matrix.
    ///
    /// # Panics
    /// If the range runs past the rows.
    pub fn rows_range(&self, range: std::ops::Range<usize>) -> U8Matrix<'a> {
        assert!(range.start <= range.end && range.end <= self.rows);
        let start = (range.start * self.lda).min(self.data.len());
        U8Matrix {
            data: &self.data[start..],
            rows: range.end - range.start,
            ..*self
        }
    }
}

/// An exact corrected accumulator `sum_k (a - za) * (w - zw)`: `i32` where it provably fits
/// (a loop the compiler vectorises), `i64` otherwise. Both convert to the same f32.
trait Corrected: Copy {
    fn wide(self) -> i64;
    fn to_f32(self) -> f32;
}

impl Corrected for i32 {
    fn wide(self) -> i64 {
        self.into()
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
}

impl Corrected for i64 {
    fn wide(self) -> i64 {
        self
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
}

/// What happens to a corrected accumulator of column `j`.
trait Epilogue<T>: Sync {
    fn apply<V: Corrected>(&self, j: usize, acc: V) -> T;

    /// One row of `i32`-exact accumulators: `out[j] = apply(j, acc[j] + column[j])`.
    #[inline(always)]
    fn apply_row(&self, acc: &[i32], column: &[i32], out: &mut [T]) {
        for (j, ((o, &v), &c)) in out.iter_mut().zip(acc).zip(column).enumerate() {
            *o = self.apply(j, v + c);
        }
    }
}

struct Dequantize<'a> {
    scales: &'a [f32],
    bias: &'a [f32],
    relu: bool,
}

impl Epilogue<f32> for Dequantize<'_> {
    #[inline(always)]
    fn apply<V: Corrected>(&self, j: usize, acc: V) -> f32 {
        let y = acc.to_f32() * self.scales[j] + self.bias[j];
        if self.relu { y.max(0.0) } else { y }
    }

    /// The same as [`Epilogue::apply`] per column, in a loop the compiler vectorises.
    #[inline(always)]
    fn apply_row(&self, acc: &[i32], column: &[i32], out: &mut [f32]) {
        let n = out.len();
        let (acc, column) = (&acc[..n], &column[..n]);
        let (scales, bias) = (&self.scales[..n], &self.bias[..n]);
        if self.relu {
            for j in 0..n {
                out[j] = ((acc[j] + column[j]) as f32 * scales[j] + bias[j]).max(0.0);
            }
        } else {
            for j in 0..n {
                out[j] = (acc[j] + column[j]) as f32 * scales[j] + bias[j];
            }
        }
    }
}

struct Requantize<'a> {
    bias: &'a [i32],
    multipliers: &'a [f32],
    zero_point: i32,
    lo: i32,
    /// The vector kernel [`Epilogue::apply_row`] may take (AVX-512 or AVX2, see
    /// [`Requantize::new`]), if any.
    vector: Option<Isa>,
}

impl Epilogue<u8> for Requantize<'_> {
    #[inline(always)]
    fn apply<V: Corrected>(&self, j: usize, acc: V) -> u8 {
        requantize(
            acc.wide(),
            self.bias[j],
            self.multipliers[j],
            self.zero_point,
            self.lo,
        )
    }

    /// The same as [`Epilogue::apply`] per column, 16 columns at a time where the sums fit an
    /// `i32` and the CPU has AVX-512.
    #[inline(always)]
    fn apply_row(&self, acc: &[i32], column: &[i32], out: &mut [u8]) {
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if self.vector == Some(Isa::Avx512Vnni) {
            // SAFETY: `vector` names a kernel only where the CPU has it, every bias is below
            // 2^30 in magnitude and the zero point is a code; `apply_row` is called only for
            // `i32`-exact accumulators, below 2^30 in magnitude (see `drive`), so every sum
            // fits an `i32`.
            done = unsafe {
                avx512::requantize_row(
                    acc,
                    column,
                    self.bias,
                    self.multipliers,
                    self.zero_point,
                    self.lo,
                    out,
                )
            };
        }
        #[cfg(target_arch = "x86_64")]
        if self.vector == Some(Isa::Avx2) {
            // SAFETY: as above, with AVX2 detected.
            done = unsafe {
                avx2::requantize_row(
                    acc,
                    column,
                    self.bias,
                    self.multipliers,
                    self.zero_point,
                    self.lo,
                    out,
                )
            };
        }
        for (j, ((o, &v), &c)) in out.iter_mut().zip(acc).zip(column).enumerate().skip(done) {
            *o = self.apply(j, v + c);
        }
    }
}

impl<'a> Requantize<'a> {
    /// The epilogue of a layer, with a following ReLU folded into the clamp (its lower end is
    /// then the output zero point).
    fn with_relu(bias: &'a [i32], multipliers: &'a [f32], zero_point: i32, relu: bool) -> Self {
        let lo = if relu { zero_point.clamp(0, 255) } else { 0 };
        Self::new(bias, multipliers, zero_point, lo)
    }

    fn new(bias: &'a [i32], multipliers: &'a [f32], zero_point: i32, lo: i32) -> Self {
        let bounded = (0..=255).contains(&zero_point)
            && (0..=255).contains(&lo)
            && bias.iter().all(|&b| b.unsigned_abs() < 1 << 30);
        #[cfg(target_arch = "x86_64")]
        let vector = if !bounded {
            None
        } else if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            Some(Isa::Avx512Vnni)
        } else if is_x86_feature_detected!("avx2") {
            Some(Isa::Avx2)
        } else {
            None
        };
        #[cfg(not(target_arch = "x86_64"))]
        let vector = None;
        let _ = bounded;
        Self {
            bias,
            multipliers,
            zero_point,
            lo,
            vector,
        }
    }
}

thread_local! {
    /// One block's `i32` accumulators, kept by each thread between blocks and calls.
    static ACCUMULATORS: std::cell::Cell<Vec<i32>> = const { std::cell::Cell::new(Vec::new()) };
    /// One block's im2col rows, where a kernel cannot take them row tile by row tile.
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Where the integer GEMM's activation rows come from.
#[derive(Clone, Copy, Debug)]
enum Source<'a> {
    Matrix(&'a U8Matrix<'a>),
    /// The im2col rows of images, and their zero point.
    Patches(&'a Patches<'a, u8>, i32),
}

/// Runs the integer GEMM block by block and applies the epilogue to each corrected
/// accumulator while the block is in cache.
///
/// With `group > 1`, each run of `group` consecutive rows (a pooling window) gives one output
/// row: the maximum of their corrected accumulators, per column, then the epilogue, which is
/// the maximum of the epilogues (both epilogues are non-decreasing in the accumulator).
fn drive<T: Send, E: Epilogue<T>>(
    source: Source,
    w: &PackedI8,
    out: &mut [T],
    finish: &E,
    group: usize,
) {
    let (m, zero_point) = match source {
        Source::Matrix(a) => {
            assert!(
                a.rows == 0 || a.data.len() >= (a.rows - 1) * a.lda + w.kp,
                "activations too short"
            );
            assert!(a.lda >= w.kp, "row stride below padded k");
            (a.rows, a.zero_point)
        }
        Source::Patches(p, zero_point) => {
            assert_eq!(p.geometry.patch_len(), w.k, "patches of k values");
            (p.rows(), zero_point)
        }
    };
    let (n, k) = (w.n, w.k);
    assert!(
        group > 0 && m.is_multiple_of(group),
        "rows come in whole groups"
    );
    assert!(out.len() >= m / group * n, "output too short");
    let za = i64::from(zero_point);
    // sum_k (a - za)(w - zw) = sum a w - za sum w - zw sum a + k za zw
    let column: Vec<i64> = (0..n)
        .map(|j| k as i64 * za * w.zero_point(j) - za * i64::from(w.row_sums[j]))
        .collect();
    // With symmetric weights and `k * 32_640 * 2 < 2^31` the corrected sum fits an `i32`:
    // the common case gets an `i32` loop the compiler vectorises (same values, so the same
    // results as the `i64` loop).
    let narrow = w.zero_points.is_empty() && k <= (i32::MAX as usize) / (2 * 255 * 128);
    let column32: Vec<i32> = if narrow {
        column.iter().map(|&c| c as i32).collect()
    } else {
        Vec::new()
    };
    // Rows per block: whole groups.
    let block_rows = (ROW_BLOCK / group).max(1) * group;
    // Windows of an even number of values per kernel row, inside their images: the AVX2
    // kernel reads them in place from the images widened to `u16` once, here.
    #[cfg(target_arch = "x86_64")]
    let widened: Option<(Vec<u16>, usize)> = match source {
        Source::Patches(p, _)
            if narrow
                && w.isa == Isa::Avx2
                && p.geometry.padding == 0
                && (p.geometry.kernel * p.geometry.channels).is_multiple_of(2) =>
        {
            let images = p.image_range();
            let len = p.geometry.image_len();
            let src = &p.images()[images.start * len..images.end * len];
            // Written once, without zeroing first: the loop vectorizes.
            let wide: Vec<u16> = src.iter().map(|&v| u16::from(v)).collect();
            Some((wide, images.start * len))
        }
        _ => None,
    };
    let block = |r0: usize, out: &mut [T]| {
        let rows = out.len() / n * group;
        let mut acc = ACCUMULATORS.with(std::cell::Cell::take);
        acc.resize(rows * n, 0);
        let mut scratch = SCRATCH.with(std::cell::Cell::take);
        // The block's rows as a matrix, where the product (or the row sums) needs one.
        let (data, lda, first): (&[u8], usize, usize) = match source {
            Source::Matrix(a) => (a.data, a.lda, r0),
            Source::Patches(p, _) if narrow && w.isa == Isa::Avx2 => {
                #[cfg(target_arch = "x86_64")]
                if let (PackedData::I16(b), Some((wide, base))) = (&w.data, &widened) {
                    let g = p.geometry;
                    let windows = |first: usize, out: &mut [usize]| {
                        let inside = p.windows(r0 + first, out);
                        assert!(inside, "without padding every window is inside its image");
                        out.iter_mut().for_each(|at| *at -= base);
                    };
                    let (span, stride) = (g.kernel * g.channels, g.width * g.channels);
                    let shape = (g.kernel, span / 2, stride);
                    // SAFETY: a `PackedI8` for AVX2 exists only where the CPU has it.
                    unsafe {
                        avx2::gemm_windows(rows, wide, &windows, shape, b, n, w.kp, &mut acc)
                    };
                } else if let PackedData::I16(b) = &w.data {
                    let fill = |first: usize, count: usize, dst: &mut [u16]| {
                        p.fill_u16(r0 + first, count, dst, w.kp);
                    };
                    // SAFETY: a `PackedI8` for AVX2 exists only where the CPU has it.
                    unsafe { avx2::gemm_rows(rows, b, n, w.kp, &mut acc, &fill) };
                }
                (&[], w.kp, 0)
            }
            Source::Patches(p, _) => {
                scratch.resize(rows * w.kp, 0);
                p.fill(r0, rows, &mut scratch, w.kp);
                (&scratch[..], w.kp, 0)
            }
        };
        if !data.is_empty() {
            gemm_u8i8(&data[first * lda..], lda, rows, w, &mut acc);
        }
        let corrected = |i: usize, acc_row: &[i32], j: usize| -> i64 {
            let row_sum: i64 = if w.zero_points.is_empty() {
                0
            } else {
                let row = &data[(first + i) * lda..(first + i) * lda + k];
                row.iter().map(|&x| i64::from(x)).sum()
            };
            i64::from(acc_row[j]) + column[j] - w.zero_point(j) * row_sum
        };
        let mut best = vec![0i32; if group > 1 && narrow { n } else { 0 }];
        for (g, out_row) in out.chunks_exact_mut(n).enumerate() {
            let first = g * group;
            if narrow {
                // The column term is the same for every row: the maximum of the raw
                // accumulators is the maximum of the corrected ones.
                let acc_row = if group == 1 {
                    &acc[first * n..(first + 1) * n]
                } else {
                    best.copy_from_slice(&acc[first * n..(first + 1) * n]);
                    for row in acc[(first + 1) * n..(first + group) * n].chunks_exact(n) {
                        for (b, &v) in best.iter_mut().zip(row) {
                            *b = (*b).max(v);
                        }
                    }
                    &best[..]
                };
                finish.apply_row(acc_row, &column32, out_row);
                continue;
            }
            for (j, o) in out_row.iter_mut().enumerate() {
                let v = (first..first + group)
                    .map(|i| corrected(i, &acc[i * n..(i + 1) * n], j))
                    .max()
                    .unwrap_or(0);
                *o = finish.apply(j, v);
            }
        }
        ACCUMULATORS.with(|cell| cell.set(acc));
        SCRATCH.with(|cell| cell.set(scratch));
    };
    let out = &mut out[..m / group * n];
    if n == 0 || m == 0 {
        return;
    }
    let chunk = block_rows / group * n;
    if m * n * k < PARALLEL_MIN_MACS || m <= block_rows || !may_split() {
        for (b, chunk) in out.chunks_mut(chunk).enumerate() {
            block(b * block_rows, chunk);
        }
    } else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(b, chunk)| block(b * block_rows, chunk));
    }
}

/// Integer GEMM with a dequantizing epilogue:
/// `out[r, j] = acc[r, j] * scales[j] + bias[j]`, then ReLU if asked, where `acc` is the exact
/// `sum_k (a - za) * (w - zw)` and `scales[j] = scale_a * scale_w[j]`.
///
/// # Panics
/// On slices shorter than the shapes need.
pub fn int8_gemm_f32(
    a: &U8Matrix,
    w: &PackedI8,
    scales: &[f32],
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
) {
    int8_gemm_f32_pooled(a, w, scales, bias, relu, 1, out);
}

/// [`int8_gemm_f32`] followed by a maximum over each run of `group` consecutive rows (the
/// pooling windows of [`im2col_nhwc_pooled`]): `a.rows / group` output rows. The maximum is
/// taken over the exact accumulators before the epilogue, which gives the same values as
/// pooling the epilogue's outputs (the scales are positive).
///
/// # Panics
/// On slices shorter than the shapes need, or rows that do not come in whole groups.
pub fn int8_gemm_f32_pooled(
    a: &U8Matrix,
    w: &PackedI8,
    scales: &[f32],
    bias: &[f32],
    relu: bool,
    group: usize,
    out: &mut [f32],
) {
    assert!(scales.len() == w.n && bias.len() == w.n);
    drive(
        Source::Matrix(a),
        w,
        out,
        &Dequantize { scales, bias, relu },
        group,
    );
}

/// Requantization of one corrected accumulator:
/// `round_half_even((acc + bias) * multiplier) + zero_point`, clamped to `lo..=255`
/// (`lo` is the output zero point when a ReLU is folded in, else 0).
pub fn requantize(acc: i64, bias: i32, multiplier: f32, zero_point: i32, lo: i32) -> u8 {
    let scaled =
        crate::quant::round_ties_even_saturating((acc + i64::from(bias)) as f32 * multiplier);
    // `as` saturates (NaN becomes 0), so the clamp below sees a finite i32.
    (scaled as i32).saturating_add(zero_point).clamp(lo, 255) as u8
}

/// Integer GEMM with a requantizing epilogue ([`requantize`]): activations stay `u8` between
/// layers. `multipliers[j] = scale_a * scale_w[j] / scale_out`; `bias` is in accumulator
/// units (`round(bias / (scale_a * scale_w[j]))`); `relu` folds a ReLU into the clamp.
///
/// # Panics
/// On slices shorter than the shapes need.
#[allow(clippy::too_many_arguments)]
pub fn int8_gemm_u8(
    a: &U8Matrix,
    w: &PackedI8,
    bias: &[i32],
    multipliers: &[f32],
    out_zero_point: i32,
    relu: bool,
    out: &mut [u8],
) {
    int8_gemm_u8_pooled(a, w, bias, multipliers, out_zero_point, relu, 1, out);
}

/// [`int8_gemm_u8`] followed by a maximum over each run of `group` consecutive rows, taken
/// over the exact accumulators before requantizing (which is non-decreasing in them, the
/// multipliers being positive): `a.rows / group` output rows.
///
/// # Panics
/// On slices shorter than the shapes need, or rows that do not come in whole groups.
#[allow(clippy::too_many_arguments)]
pub fn int8_gemm_u8_pooled(
    a: &U8Matrix,
    w: &PackedI8,
    bias: &[i32],
    multipliers: &[f32],
    out_zero_point: i32,
    relu: bool,
    group: usize,
    out: &mut [u8],
) {
    assert!(multipliers.len() == w.n && bias.len() == w.n);
    let epilogue = Requantize::with_relu(bias, multipliers, out_zero_point, relu);
    drive(Source::Matrix(a), w, out, &epilogue, group);
}

/// [`int8_gemm_f32_pooled`] of a convolution, with its im2col rows taken from the images as
/// the kernel needs them (`zero_point` is the images' zero point, also their padding): no
/// im2col matrix is written out.
///
/// # Panics
/// On slices shorter than the shapes need, or rows that do not come in whole groups.
#[allow(clippy::too_many_arguments)]
pub fn int8_conv_f32_pooled(
    patches: &Patches<u8>,
    zero_point: i32,
    w: &PackedI8,
    scales: &[f32],
    bias: &[f32],
    relu: bool,
    group: usize,
    out: &mut [f32],
) {
    assert!(scales.len() == w.n && bias.len() == w.n);
    let source = Source::Patches(patches, zero_point);
    drive(source, w, out, &Dequantize { scales, bias, relu }, group);
}

/// [`int8_gemm_u8_pooled`] of a convolution, with its im2col rows taken from the images as
/// the kernel needs them (see [`int8_conv_f32_pooled`]).
///
/// # Panics
/// On slices shorter than the shapes need, or rows that do not come in whole groups.
#[allow(clippy::too_many_arguments)]
pub fn int8_conv_u8_pooled(
    patches: &Patches<u8>,
    zero_point: i32,
    w: &PackedI8,
    bias: &[i32],
    multipliers: &[f32],
    out_zero_point: i32,
    relu: bool,
    group: usize,
    out: &mut [u8],
) {
    assert!(multipliers.len() == w.n && bias.len() == w.n);
    let epilogue = Requantize::with_relu(bias, multipliers, out_zero_point, relu);
    drive(
        Source::Patches(patches, zero_point),
        w,
        out,
        &epilogue,
        group,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Exact `sum_k (a - za) * (w - zw)` from unpacked data.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        a: &[u8],
        lda: usize,
        m: usize,
        za: i32,
        w: &[i8],
        zw: &[i32],
        n: usize,
        k: usize,
    ) -> Vec<i64> {
        let mut out = vec![0i64; m * n];
        for r in 0..m {
            for j in 0..n {
                let z = zw.get(j).copied().unwrap_or(0);
                out[r * n + j] = (0..k)
                    .map(|kk| {
                        i64::from(i32::from(a[r * lda + kk]) - za)
                            * i64::from(i32::from(w[j * k + kk]) - z)
                    })
                    .sum();
            }
        }
        out
    }

    fn case() -> impl Strategy<Value = (usize, usize, usize, usize, u64)> {
        // m, n, k, extra row padding, seed
        (1usize..80, 1usize..70, 1usize..300, 0usize..9, any::<u64>())
    }

    /// A cheap deterministic generator: proptest picks the seed, shrinking picks the shape.
    fn fill(seed: u64, len: usize) -> Vec<u8> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_kernel_matches_the_scalar_reference_exactly((m, n, k, pad, seed) in case()) {
            let lda = padded_k(k) + pad;
            let mut a = fill(seed, m * lda);
            // Exercise the extremes too: all-255 rows and -128 weights are where saturating
            // instructions would go wrong.
            a[..k.min(m * lda)].fill(255);
            let mut w: Vec<i8> = fill(seed.rotate_left(17), n * k).into_iter().map(|x| x as i8).collect();
            w[..k].fill(-128);
            for isa in Isa::available() {
                let packed = PackedI8::new_for(isa, &w, n, k, &[]).unwrap();
                let mut c = vec![0i32; m * n];
                gemm_u8i8(&a, lda, m, &packed, &mut c);
                let expected = reference(&a, lda, m, 0, &w, &[], n, k);
                let got: Vec<i64> = c.iter().map(|&v| i64::from(v)).collect();
                prop_assert_eq!(got, expected, "kernel {:?}", isa);
            }
        }

        #[test]
        fn zero_point_corrections_are_exact((m, n, k, pad, seed) in case(), za in 0i32..=255, asymmetric in any::<bool>()) {
            let lda = padded_k(k) + pad;
            let a = fill(seed, m * lda);
            let w: Vec<i8> = fill(!seed, n * k).into_iter().map(|x| x as i8).collect();
            let zw: Vec<i32> = if asymmetric { (0..n).map(|j| (j as i32 % 7) - 3).collect() } else { Vec::new() };
            let expected = reference(&a, lda, m, za, &w, &zw, n, k);
            for isa in Isa::available() {
                let packed = PackedI8::new_for(isa, &w, n, k, &zw).unwrap();
                let input = U8Matrix { data: &a, lda, rows: m, zero_point: za };
                // A multiplier of 1 with no bias and an offset-free output shows the raw value.
                let ones = vec![1.0f32; n];
                let zeros = vec![0.0f32; n];
                let mut out = vec![0f32; m * n];
                int8_gemm_f32(&input, &packed, &ones, &zeros, false, &mut out);
                for (o, &e) in out.iter().zip(&expected) {
                    prop_assert_eq!(*o, e as f32, "kernel {:?}", isa);
                }
                let bias: Vec<i32> = (0..n as i32).map(|j| j * 37 - 500).collect();
                let mult: Vec<f32> = (0..n).map(|j| 0.001 + j as f32 * 1e-4).collect();
                let mut q = vec![0u8; m * n];
                int8_gemm_u8(&input, &packed, &bias, &mult, 7, true, &mut q);
                for (idx, (&o, &e)) in q.iter().zip(&expected).enumerate() {
                    let j = idx % n;
                    prop_assert_eq!(o, requantize(e, bias[j], mult[j], 7, 7));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The row epilogue (vectorised where it can be) gives exactly the scalar
        /// `requantize` of every column, over odd lengths, ties, extreme accumulators and
        /// biases, and multipliers that overflow or are not numbers.
        #[test]
        fn requantize_rows_match_the_scalar_epilogue(
            n in 0usize..100,
            seed in any::<u64>(),
            zero_point in 0i32..=255,
            relu in any::<bool>(),
            wide_bias in any::<bool>(),
            odd in 0usize..8,
        ) {
            let bytes = fill(seed, 16 * n);
            let word = |j: usize, at: usize| i32::from_le_bytes(bytes[16 * j + at..16 * j + at + 4].try_into().unwrap());
            // `drive` passes `i32` accumulators with `|acc + column| < 2^30`.
            let acc: Vec<i32> = (0..n).map(|j| word(j, 0) >> (2 + (j % 24) as u32)).collect();
            let column: Vec<i32> = (0..n).map(|j| (word(j, 4) >> 3) >> (j % 31) as u32).collect();
            let column: Vec<i32> = column.iter().zip(&acc).map(|(&c, &a)| {
                let limit = (1 << 30) - 1 - a.abs();
                c.clamp(-limit, limit)
            }).collect();
            let bias: Vec<i32> = (0..n).map(|j| {
                let b = word(j, 8);
                if wide_bias { b } else { b >> (2 + (j % 30) as u32) }
            }).collect();
            let multipliers: Vec<f32> = (0..n).map(|j| match (j + odd) % 11 {
                0 => 0.5,
                1 => 1.0,
                2 => f32::INFINITY,
                3 => f32::NAN,
                4 => 1e-9,
                5 => 3e30,
                _ => f32::from(bytes[16 * j + 12]) * 1e-4 + f32::from(bytes[16 * j + 13]) * 1e-7,
            }).collect();
            let lo = if relu { zero_point } else { 0 };
            let epilogue = Requantize::new(&bias, &multipliers, zero_point, lo);
            let mut out = vec![0u8; n];
            epilogue.apply_row(&acc, &column, &mut out);
            for j in 0..n {
                let expected = requantize(i64::from(acc[j]) + i64::from(column[j]), bias[j], multipliers[j], zero_point, lo);
                prop_assert_eq!(out[j], expected, "column {}", j);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Pooling inside the product (the maximum of the exact accumulators of each group of
        /// rows, then the epilogue) gives exactly the unpooled product's epilogues, pooled.
        #[test]
        fn pooled_products_equal_pooling_the_epilogues(
            windows in 1usize..40,
            group in 1usize..10,
            n in 1usize..40,
            k in 1usize..200,
            seed in any::<u64>(),
            za in 0i32..=255,
            asymmetric in any::<bool>(),
            relu in any::<bool>(),
        ) {
            let m = windows * group;
            let lda = padded_k(k);
            let a = fill(seed, m * lda);
            let w: Vec<i8> = fill(!seed, n * k).into_iter().map(|x| x as i8).collect();
            let zw: Vec<i32> = if asymmetric { (0..n).map(|j| (j as i32 % 5) - 2).collect() } else { Vec::new() };
            let input = U8Matrix { data: &a, lda, rows: m, zero_point: za };
            let scales: Vec<f32> = (0..n).map(|j| 1e-3 + j as f32 * 1e-4).collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.0).collect();
            let ibias: Vec<i32> = (0..n as i32).map(|j| j * 91 - 700).collect();
            for isa in Isa::available() {
                let packed = PackedI8::new_for(isa, &w, n, k, &zw).unwrap();
                let mut full = vec![0f32; m * n];
                int8_gemm_f32(&input, &packed, &scales, &bias, relu, &mut full);
                let mut expected = vec![0f32; windows * n];
                max_rows(&full, group, n, &mut expected);
                let mut pooled = vec![0f32; windows * n];
                int8_gemm_f32_pooled(&input, &packed, &scales, &bias, relu, group, &mut pooled);
                prop_assert_eq!(&pooled, &expected, "f32 epilogue, kernel {:?}", isa);

                let mut full = vec![0u8; m * n];
                int8_gemm_u8(&input, &packed, &ibias, &scales, 9, relu, &mut full);
                let mut expected = vec![0u8; windows * n];
                max_rows(&full, group, n, &mut expected);
                let mut pooled = vec![0u8; windows * n];
                int8_gemm_u8_pooled(&input, &packed, &ibias, &scales, 9, relu, group, &mut pooled);
                prop_assert_eq!(&pooled, &expected, "u8 epilogue, kernel {:?}", isa);
            }
        }

        /// The pooled im2col order holds the raster rows of every whole window, window by
        /// window.
        #[test]
        fn pooled_im2col_rows_are_the_windows_pixels(
            channels in 1usize..5,
            height in 1usize..14,
            width in 1usize..14,
            kernel in 1usize..4,
            stride in 1usize..3,
            padding in 0usize..2,
            pool in 1usize..4,
            batch in 1usize..3,
        ) {
            let g = ConvGeometry { channels, height, width, kernel, stride, padding };
            prop_assume!(height + 2 * padding >= kernel && width + 2 * padding >= kernel);
            let k = g.patch_len();
            let x: Vec<u16> = (0..batch * g.image_len()).map(|i| i as u16).collect();
            let mut raster = vec![0u16; batch * g.pixels() * k];
            im2col_nhwc(&x, batch, &g, 9999, &mut raster, k);
            let rows = pooled_rows(&g, pool);
            let mut pooled = vec![0u16; batch * rows * k];
            im2col_nhwc_pooled(&x, batch, &g, pool, 9999, &mut pooled, k);
            let (ow, pw) = (g.out_width(), g.out_width() / pool);
            for b in 0..batch {
                for index in 0..rows {
                    let (window, at) = (index / (pool * pool), index % (pool * pool));
                    let oy = (window / pw) * pool + at / pool;
                    let ox = (window % pw) * pool + at % pool;
                    let got = &pooled[(b * rows + index) * k..(b * rows + index + 1) * k];
                    let src = (b * g.pixels() + oy * ow + ox) * k;
                    prop_assert_eq!(got, &raster[src..src + k]);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Patches give exactly the rows of the written-out im2col, in any range of rows, and
        /// the products over them equal the products over the written-out matrix.
        #[test]
        fn patches_equal_the_written_out_im2col(
            channels in 1usize..6,
            height in 1usize..12,
            width in 1usize..12,
            kernel in 1usize..4,
            stride in 1usize..3,
            padding in 0usize..2,
            pool in 1usize..3,
            batch in 1usize..4,
            n in 1usize..40,
            seed in any::<u64>(),
            cut in 0.0f64..1.0,
        ) {
            let g = ConvGeometry { channels, height, width, kernel, stride, padding };
            prop_assume!(height + 2 * padding >= kernel && width + 2 * padding >= kernel);
            let k = g.patch_len();
            let x = fill(seed, batch * g.image_len());
            let rows = batch * pooled_rows(&g, pool);
            let mut cols = vec![0u8; rows * k];
            im2col_nhwc_pooled(&x, batch, &g, pool, 7, &mut cols, k);
            let pixels = patch_pixels(&g, pool);
            let patches = Patches::new(&x, g, &pixels, 7u8);
            prop_assert_eq!(patches.rows(), rows);
            let split = (rows as f64 * cut) as usize;
            let mut got = vec![0u8; rows * k];
            let (head, tail) = got.split_at_mut(split * k);
            patches.rows_range(0..split).fill(0, split, head, k);
            patches.rows_range(split..rows).fill(0, rows - split, tail, k);
            prop_assert_eq!(&got, &cols);
            // Widened to u16 (the AVX2 integer kernel's rows): the same values.
            let lda = padded_k(k);
            let mut wide = vec![0u16; rows * lda];
            patches.fill_u16(0, rows, &mut wide, lda);
            for (wide, cols) in wide.chunks_exact(lda).zip(cols.chunks_exact(k.max(1))) {
                prop_assert!(wide[..k].iter().zip(cols).all(|(&w, &c)| w == u16::from(c)));
            }

            // int8 products: exact.
            let w: Vec<i8> = fill(!seed, n * k).into_iter().map(|v| v as i8).collect();
            let lda = padded_k(k);
            let mut padded = vec![0u8; rows * lda];
            im2col_nhwc_pooled(&x, batch, &g, pool, 7, &mut padded, lda);
            let matrix = U8Matrix { data: &padded, lda, rows, zero_point: 7 };
            let scales: Vec<f32> = (0..n).map(|j| 1e-3 * (j + 1) as f32).collect();
            let bias = vec![0.5f32; n];
            let group = pool * pool;
            for isa in Isa::available() {
                let packed = PackedI8::new_for(isa, &w, n, k, &[]).unwrap();
                let mut expected = vec![0f32; rows / group * n];
                int8_gemm_f32_pooled(&matrix, &packed, &scales, &bias, true, group, &mut expected);
                let mut out = vec![0f32; rows / group * n];
                int8_conv_f32_pooled(&patches, 7, &packed, &scales, &bias, true, group, &mut out);
                prop_assert_eq!(&out, &expected, "kernel {:?}", isa);
            }

            // f32 products: the same as over the written-out matrix.
            let xf: Vec<f32> = x.iter().map(|&v| f32::from(v) / 16.0 - 3.0).collect();
            let mut colsf = vec![0f32; rows * k];
            im2col_nhwc_pooled(&xf, batch, &g, pool, 0.0, &mut colsf, k);
            let wf: Vec<f32> = w.iter().map(|&v| f32::from(v) / 64.0).collect();
            let packed = PackedF32::new(&wf, n, k);
            let mut expected = vec![0f32; rows * n];
            sgemm_packed(&colsf, rows, &packed, &bias, false, &mut expected);
            let pixels = patch_pixels(&g, pool);
            let patches = Patches::new(&xf, g, &pixels, 0.0);
            let mut out = vec![0f32; rows * n];
            sgemm_patches(&patches, &packed, &bias, false, 1, &mut out);
            for (o, e) in out.iter().zip(&expected) {
                prop_assert!((o - e).abs() <= 1e-4 * (1.0 + e.abs()), "{} vs {}", o, e);
            }
            // With the windows looked up instead of computed: the same windows, the same
            // products.
            let windows = patch_windows(&g, &pixels);
            let looked_up = patches.with_windows(&windows);
            let (mut computed, mut table) = (vec![0usize; rows - split], vec![0usize; rows - split]);
            let inside = patches.windows(split, &mut computed);
            prop_assert_eq!(looked_up.windows(split, &mut table), inside);
            prop_assert!(inside || padding > 0, "without padding every window is inside");
            if inside {
                prop_assert_eq!(&computed, &table);
            }
            let mut again = vec![0f32; rows * n];
            sgemm_patches(&looked_up, &packed, &bias, false, 1, &mut again);
            prop_assert_eq!(&again, &out);
            // Pooled in the product: the maxima of the windows' rows, after bias and ReLU.
            let group = pool * pool;
            let mut unpooled = vec![0f32; rows * n];
            sgemm_patches(&looked_up, &packed, &bias, true, 1, &mut unpooled);
            let mut expected = vec![0f32; rows / group * n];
            max_rows(&unpooled, group, n, &mut expected);
            let mut pooled = vec![0f32; rows / group * n];
            sgemm_patches(&looked_up, &packed, &bias, true, group, &mut pooled);
            prop_assert_eq!(&pooled, &expected);
        }
    }

    #[test]
    fn pooled_convolutions_of_narrow_layers_take_every_window() {
        // 1 and 3 channels in, at most 8 out (two pooling windows per tile), an odd number
        // of windows per image (the last tile holds one), pooled in the product against
        // pooled after it.
        for (channels, n, side) in [(1, 8, 28), (1, 5, 16), (3, 8, 12), (2, 3, 8)] {
            let g = ConvGeometry {
                channels,
                height: side,
                width: side,
                kernel: 3,
                stride: 1,
                padding: 0,
            };
            let batch = 3;
            let x: Vec<f32> = fill(5, batch * g.image_len())
                .into_iter()
                .map(|v| f32::from(v) / 32.0 - 4.0)
                .collect();
            let k = g.patch_len();
            let w: Vec<f32> = fill(6, n * k)
                .into_iter()
                .map(|v| f32::from(v) / 128.0 - 1.0)
                .collect();
            let packed = PackedF32::new(&w, n, k);
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 1.0).collect();
            let pixels = patch_pixels(&g, 2);
            let windows = patch_windows(&g, &pixels);
            let patches = Patches::new(&x, g, &pixels, 0.0).with_windows(&windows);
            let rows = patches.rows();
            assert_eq!(rows % 8, 4, "an odd number of windows");
            let mut unpooled = vec![0f32; rows * n];
            sgemm_patches(&patches, &packed, &bias, true, 1, &mut unpooled);
            let mut expected = vec![0f32; rows / 4 * n];
            max_rows(&unpooled, 4, n, &mut expected);
            let mut pooled = vec![0f32; rows / 4 * n];
            sgemm_patches(&patches, &packed, &bias, true, 4, &mut pooled);
            assert_eq!(pooled, expected, "{channels} channels, {n} outputs");
        }
    }

    #[test]
    fn requantize_rows_round_ties_like_the_scalar_epilogue() {
        // Exact halves at every column, 16 at a time and in the tail.
        let n = 37;
        let acc: Vec<i32> = (0..n as i32).map(|j| 2 * j - 37).collect();
        let column = vec![0; n];
        let bias = vec![0; n];
        let multipliers = vec![0.5f32; n];
        for (zero_point, lo) in [(0, 0), (7, 7), (128, 0), (255, 255)] {
            let epilogue = Requantize::new(&bias, &multipliers, zero_point, lo);
            let mut out = vec![0u8; n];
            epilogue.apply_row(&acc, &column, &mut out);
            for j in 0..n {
                assert_eq!(
                    out[j],
                    requantize(i64::from(acc[j]), 0, 0.5, zero_point, lo)
                );
            }
        }
    }

    #[test]
    fn requantize_rounds_half_to_even_and_clamps() {
        assert_eq!(requantize(5, 0, 0.5, 0, 0), 2); // 2.5 -> 2
        assert_eq!(requantize(7, 0, 0.5, 0, 0), 4); // 3.5 -> 4
        assert_eq!(requantize(-100, 0, 1.0, 10, 0), 0);
        assert_eq!(requantize(-100, 0, 1.0, 10, 10), 10);
        assert_eq!(requantize(1 << 40, 0, 1.0, 10, 0), 255);
        assert_eq!(requantize(3, 4, 1.0, 0, 0), 7);
    }

    #[test]
    fn large_batches_take_the_parallel_path_and_agree() {
        let (m, n, k) = (300, 40, 200);
        let a = fill(3, m * padded_k(k));
        let w: Vec<i8> = fill(4, n * k).into_iter().map(|x| x as i8).collect();
        assert!(m * n * k >= PARALLEL_MIN_MACS);
        let packed = PackedI8::new(&w, n, k, &[]);
        let input = U8Matrix {
            data: &a,
            lda: padded_k(k),
            rows: m,
            zero_point: 3,
        };
        let mut out = vec![0f32; m * n];
        int8_gemm_f32(
            &input,
            &packed,
            &vec![1.0; n],
            &vec![0.0; n],
            false,
            &mut out,
        );
        let expected = reference(&a, padded_k(k), m, 3, &w, &[], n, k);
        assert!(out.iter().zip(&expected).all(|(&o, &e)| o == e as f32));
    }
}
