//! A distillation training step for a user's own loop, and a cache of teacher logits.

use tch::nn::{ModuleT, Optimizer};
use tch::{Kind, Tensor};

use crate::{DistillationConfig, Result, distillation_loss};

/// Pairs a teacher and a student: computes the distillation loss of a batch and, if
/// wanted, takes the optimizer step. Any model that maps a batch to logits will do.
///
/// For mixed precision, build the student under a precision policy; for loss scaling,
/// take the loss from [`Distiller::loss`], scale it, and step through the scaler.
#[derive(Debug)]
pub struct Distiller<'a, T, S> {
    teacher: &'a T,
    student: &'a S,
    config: DistillationConfig,
}

impl<'a, T: ModuleT, S: ModuleT> Distiller<'a, T, S> {
    /// A distiller with the given settings.
    pub fn new(teacher: &'a T, student: &'a S, config: DistillationConfig) -> Self {
        Self {
            teacher,
            student,
            config,
        }
    }

    /// The settings.
    pub fn config(&self) -> DistillationConfig {
        self.config
    }

    /// The teacher's logits for `xs`: eval mode, no gradient.
    pub fn teacher_logits(&self, xs: &Tensor) -> Tensor {
        tch::no_grad(|| self.teacher.forward_t(xs, false))
    }

    /// The loss of a batch (student in training mode), ready for `backward`.
    pub fn loss(&self, xs: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let teacher = self.teacher_logits(xs);
        self.loss_with_teacher_logits(xs, &teacher, labels)
    }

    /// The loss of a batch against precomputed teacher logits (see [`TeacherCache`]).
    pub fn loss_with_teacher_logits(
        &self,
        xs: &Tensor,
        teacher_logits: &Tensor,
        labels: &Tensor,
    ) -> Result<Tensor> {
        let student = self.student.forward_t(xs, true);
        distillation_loss(&student, teacher_logits, labels, &self.config)
    }

    /// One training step: loss, backward, optimizer step. Returns the loss value.
    pub fn step(&self, optimizer: &mut Optimizer, xs: &Tensor, labels: &Tensor) -> Result<f64> {
        let loss = self.loss(xs, labels)?;
        optimizer.backward_step(&loss);
        Ok(loss.double_value(&[]))
    }
}

/// The teacher's logits for a fixed training set, computed once and reused every epoch
/// (the teacher does not change while the student trains).
#[derive(Debug)]
pub struct TeacherCache {
    logits: Tensor,
}

impl TeacherCache {
    /// Runs `teacher` (eval mode, no gradient) over `images` in batches of `batch_size`.
    pub fn compute(teacher: &impl ModuleT, images: &Tensor, batch_size: i64) -> Self {
        let n = images.size().first().copied().unwrap_or(0);
        let batch_size = batch_size.max(1);
        let logits = tch::no_grad(|| {
            let parts: Vec<Tensor> = (0..n)
                .step_by(batch_size as usize)
                .map(|start| {
                    let len = batch_size.min(n - start);
                    teacher
                        .forward_t(&images.narrow(0, start, len), false)
                        .to_kind(Kind::Float)
                })
                .collect();
            if parts.is_empty() {
                Tensor::zeros([0, 0], (Kind::Float, images.device()))
            } else {
                Tensor::cat(&parts, 0)
            }
        });
        Self { logits }
    }

    /// All cached logits, `[samples, classes]`, in the order of the images.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// The cached logits of the samples at `index` (an int64 tensor of positions).
    pub fn select(&self, index: &Tensor) -> Tensor {
        self.logits.index_select(0, index)
    }

    /// Number of cached samples.
    pub fn len(&self) -> usize {
        self.logits.size().first().map_or(0, |&n| n as usize)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
