//! Knowledge distillation: train a small student to mimic a large teacher, using the
//! teacher's logits softened by a temperature as targets alongside the labels
//! (Hinton et al., 2015; the Keras distillation example).
//!
//! The loss is
//!
//! ```text
//! alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
//! ```
//!
//! with both terms computed from log-softmax for stability. **Reduction:** the KL term is
//! summed over classes and averaged over the batch ("batchmean", what Keras's
//! `KLDivergence` does and what PyTorch's `kl_div(..., reduction="batchmean")` does), and
//! the cross-entropy is averaged over the batch. PyTorch's default `reduction="mean"`
//! would also divide the KL term by the number of classes: compare numbers with that in
//! mind. The `T^2` factor keeps the soft term's gradients at the scale of the hard term's
//! as `T` changes.
//!
//! ```
//! use distillation::{Alpha, DistillationConfig, Temperature, distillation_loss};
//! use tch::{Device, Kind, Tensor};
//!
//! let config = DistillationConfig::new(Temperature::new(4.0)?, Alpha::new(0.5)?);
//! let student = Tensor::randn([8, 10], (Kind::Float, Device::Cpu)).set_requires_grad(true);
//! let teacher = Tensor::randn([8, 10], (Kind::Float, Device::Cpu));
//! let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
//! let loss = distillation_loss(&student, &teacher, &labels, &config)?;
//! loss.backward();
//! assert!(loss.double_value(&[]) >= 0.0);
//! assert_eq!(student.grad().size(), [8, 10]);
//!
//! // Nonsense is refused, not clamped.
//! assert!(Temperature::new(0.0).is_err());
//! assert!(Alpha::new(1.5).is_err());
//! // So are logits that do not fit together.
//! let err = distillation_loss(&student, &teacher.narrow(1, 0, 5), &labels, &config);
//! assert!(matches!(err, Err(distillation::Error::ShapeMismatch(_))));
//! # Ok::<(), distillation::Error>(())
//! ```
//!
//! In a training loop, a [`Distiller`] pairs the student with a teacher that runs on every
//! batch or with a [`TeacherCache`] of its logits for a fixed training set, looked up by the
//! positions of the batch's samples (what a shuffling batcher hands out).
#![warn(missing_docs)]

mod distiller;
mod error;
pub mod reference;

pub use distiller::{Batch, Distiller, TeacherCache, TeacherSource};
pub use error::{Error, Result};

use tch::{Kind, Tensor};

/// The softening temperature: positive and finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Temperature(f64);

impl Temperature {
    /// A temperature, or [`Error::InvalidTemperature`] unless `t` is positive and finite.
    pub fn new(t: f64) -> Result<Self> {
        if t > 0.0 && t.is_finite() {
            Ok(Self(t))
        } else {
            Err(Error::InvalidTemperature(t))
        }
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// The weight of the hard-label term, in [0, 1]; the soft term gets `1 - alpha`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Alpha(f64);

impl Alpha {
    /// A weight, or [`Error::InvalidAlpha`] unless `alpha` is in [0, 1].
    pub fn new(alpha: f64) -> Result<Self> {
        if (0.0..=1.0).contains(&alpha) {
            Ok(Self(alpha))
        } else {
            Err(Error::InvalidAlpha(alpha))
        }
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// Distillation settings. The default is the Keras example's: `alpha = 0.1`, `T = 10`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistillationConfig {
    /// Softening temperature of both logit sets.
    pub temperature: Temperature,
    /// Weight of the hard-label cross-entropy.
    pub alpha: Alpha,
}

impl DistillationConfig {
    /// Settings from already validated parts.
    pub fn new(temperature: Temperature, alpha: Alpha) -> Self {
        Self { temperature, alpha }
    }
}

impl Default for DistillationConfig {
    fn default() -> Self {
        Self {
            temperature: Temperature(10.0),
            alpha: Alpha(0.1),
        }
    }
}

/// Whether `kind` is a real floating-point kind.
pub(crate) fn is_floating(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
    )
}

/// The distillation loss (a scalar tensor) of `student` logits `[N, C]` against `teacher`
/// logits `[N, C]` and integer `labels` `[N]`; see the crate docs for the formula and the
/// reduction. The teacher logits are treated as constants (no gradient flows to them).
///
/// Errors: [`Error::ShapeMismatch`] unless the shapes fit (`N, C > 0`),
/// [`Error::WrongKind`] for non-floating logits or non-integer labels,
/// [`Error::DeviceMismatch`] when the three are not on one device. A label outside
/// `0..C` is LibTorch's error on the CPU; on CUDA it is a device-side assertion, since
/// checking it here would read the labels back on every step: check labels once, where
/// the data is loaded.
pub fn distillation_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    config: &DistillationConfig,
) -> Result<Tensor> {
    let (s, t, l) = (student.size(), teacher.size(), labels.size());
    if s.len() != 2 || s != t {
        return Err(Error::ShapeMismatch(format!(
            "student logits {s:?} and teacher logits {t:?} must both be [batch, classes]"
        )));
    }
    if l != [s[0]] {
        return Err(Error::ShapeMismatch(format!(
            "labels {l:?} must be [batch] = [{}]",
            s[0]
        )));
    }
    if s[0] == 0 {
        return Err(Error::EmptyBatch);
    }
    if s[1] == 0 {
        return Err(Error::ShapeMismatch(format!(
            "logits {s:?} have no classes"
        )));
    }
    for (what, kind) in [
        ("student logits", student.kind()),
        ("teacher logits", teacher.kind()),
    ] {
        if !is_floating(kind) {
            return Err(Error::WrongKind {
                what,
                expected: "floating point",
                actual: kind,
            });
        }
    }
    if !matches!(
        labels.kind(),
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64
    ) {
        return Err(Error::WrongKind {
            what: "labels",
            expected: "an integer kind",
            actual: labels.kind(),
        });
    }
    let device = student.device();
    for (what, other) in [
        ("teacher logits", teacher.device()),
        ("labels", labels.device()),
    ] {
        if other != device {
            return Err(Error::DeviceMismatch {
                what,
                expected: device,
                actual: other,
            });
        }
    }
    let labels = labels.f_to_kind(Kind::Int64)?;
    let labels = &labels;
    let temperature = config.temperature.get();
    let alpha = config.alpha.get();
    let kind = match student.kind() {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    };
    let student = student.f_to_kind(kind)?;
    let hard =
        student.f_cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Mean, -100, 0.0)?;
    let log_p_student = (&student / temperature).f_log_softmax(-1, kind)?;
    let log_p_teacher =
        (teacher.f_to_kind(kind)?.detach() / temperature).f_log_softmax(-1, kind)?;
    let kl = (log_p_teacher.exp() * (&log_p_teacher - &log_p_student))
        .f_sum_dim_intlist(-1, false, kind)?
        .f_mean(kind)?;
    Ok(hard * alpha + kl * ((1.0 - alpha) * temperature * temperature))
}

/// The hint (feature) loss of FitNets: the mean squared difference between the student's
/// intermediate features, mapped to the teacher's width by a trainable adapter, and the
/// teacher's features at the corresponding layer (`[N, ...]`, the same shape). The teacher
/// features are constants. Added to [`distillation_loss`] with a weight, it makes the
/// student imitate how the teacher represents an image, not only what it answers.
///
/// ```
/// use tch::{Device, Kind, Tensor};
///
/// let teacher = Tensor::ones([2, 8], (Kind::Float, Device::Cpu));
/// let adapted = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
/// let loss = distillation::hint_loss(&adapted, &teacher)?;
/// assert!((loss.double_value(&[]) - 1.0).abs() < 1e-12);
/// assert!(distillation::hint_loss(&adapted, &teacher.view([4, 4])).is_err());
/// # Ok::<(), distillation::Error>(())
/// ```
pub fn hint_loss(adapted_student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let (s, t) = (adapted_student.size(), teacher.size());
    if s != t || s.is_empty() {
        return Err(Error::ShapeMismatch(format!(
            "adapted student features {s:?} and teacher features {t:?} must have one shape"
        )));
    }
    Ok(adapted_student.f_to_kind(Kind::Float)?.f_mse_loss(
        &teacher.f_to_kind(Kind::Float)?.detach(),
        tch::Reduction::Mean,
    )?)
}
