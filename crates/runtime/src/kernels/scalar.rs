//! Portable integer GEMM: the reference that every SIMD path is tested against, and the
//! path taken on CPUs without AVX2.

/// Packs `w` (`n` rows of `k` weights) into rows of `kp` weights, zero padded.
pub(crate) fn pack(w: &[i8], n: usize, k: usize, kp: usize) -> Vec<i8> {
    let mut out = vec![0i8; n * kp];
    for (dst, src) in out.chunks_exact_mut(kp).zip(w.chunks_exact(k)) {
        dst[..k].copy_from_slice(src);
    }
    out
}

/// `c[r * n + j] = sum_kk a[r * lda + kk] * b[j * kp + kk]` over the first `k` columns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    a: &[u8],
    lda: usize,
    m: usize,
    b: &[i8],
    n: usize,
    k: usize,
    kp: usize,
    c: &mut [i32],
) {
    for r in 0..m {
        let row = &a[r * lda..r * lda + k];
        for (j, out) in c[r * n..(r + 1) * n].iter_mut().enumerate() {
            let w = &b[j * kp..j * kp + k];
            *out = row
                .iter()
                .zip(w)
                .map(|(&x, &y)| i32::from(x) * i32::from(y))
                .sum();
        }
    }
}

/// f32 dot product with eight independent accumulators (so the compiler can vectorise it).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
