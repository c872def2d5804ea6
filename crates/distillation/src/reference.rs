//! A plain f64 implementation of the distillation loss on `ndarray` data: the
//! reference the tch implementation is tested against.
//!
//! ```
//! use distillation::{Alpha, DistillationConfig, Temperature, distillation_loss, reference};
//! use ndarray::array;
//! use tch::Tensor;
//!
//! let student = array![[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]];
//! let teacher = array![[2.0, -1.0, 0.0], [0.5, 2.5, -2.0]];
//! let expected = reference::loss(student.view(), teacher.view(), &[0, 1], 4.0, 0.3);
//!
//! let tensor = |a: &ndarray::Array2<f64>| Tensor::from_slice(a.as_slice().unwrap()).view([2, 3]);
//! let config = DistillationConfig::new(Temperature::new(4.0)?, Alpha::new(0.3)?);
//! let labels = Tensor::from_slice(&[0i64, 1]);
//! let loss = distillation_loss(&tensor(&student), &tensor(&teacher), &labels, &config)?;
//! assert!((loss.double_value(&[]) - expected).abs() < 1e-12);
//! # Ok::<(), distillation::Error>(())
//! ```

use ndarray::{ArrayView1, ArrayView2};

fn log_softmax(row: ArrayView1<f64>, temperature: f64) -> Vec<f64> {
    let scaled: Vec<f64> = row.iter().map(|&z| z / temperature).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = scaled.iter().map(|&z| (z - max).exp()).sum::<f64>().ln() + max;
    scaled.iter().map(|&z| z - log_sum).collect()
}

/// `alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)`, both batch means.
///
/// # Panics
/// When the shapes disagree or a label is out of range: it is a test reference.
pub fn loss(
    student: ArrayView2<f64>,
    teacher: ArrayView2<f64>,
    labels: &[usize],
    temperature: f64,
    alpha: f64,
) -> f64 {
    assert_eq!(student.dim(), teacher.dim());
    assert_eq!(student.nrows(), labels.len());
    let n = student.nrows() as f64;
    let mut hard = 0.0;
    let mut soft = 0.0;
    for ((s, t), &label) in student.rows().into_iter().zip(teacher.rows()).zip(labels) {
        hard -= log_softmax(s, 1.0)[label];
        let log_ps = log_softmax(s, temperature);
        let log_pt = log_softmax(t, temperature);
        soft += log_pt
            .iter()
            .zip(&log_ps)
            .map(|(&lt, &ls)| lt.exp() * (lt - ls))
            .sum::<f64>();
    }
    alpha * hard / n + (1.0 - alpha) * temperature * temperature * soft / n
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn identical_logits_leave_only_the_hard_term() {
        let z = array![[1.0, 2.0, 3.0]];
        let hard = -log_softmax(z.row(0), 1.0)[2];
        let value = loss(z.view(), z.view(), &[2], 4.0, 0.3);
        assert!((value - 0.3 * hard).abs() < 1e-12);
    }
}
