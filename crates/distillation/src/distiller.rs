//! A distillation training step for a user's own loop, with the teacher's logits from a
//! live teacher or from a [`TeacherCache`].

use tch::nn::{ModuleT, Optimizer};
use tch::{Device, Kind, Tensor};

use crate::{DistillationConfig, Error, Result, distillation_loss, is_floating};

/// Where a [`Distiller`] gets the teacher's logits of a batch.
#[derive(Debug, Clone, Copy)]
pub enum TeacherSource<'a> {
    /// A teacher run on every batch, in eval mode and without gradient.
    Live(&'a dyn ModuleT),
    /// Logits computed once for a fixed training set, looked up by the positions of the
    /// batch's samples in that set ([`Batch::with_indices`]).
    Cached(&'a TeacherCache),
}

impl<'a> From<&'a TeacherCache> for TeacherSource<'a> {
    fn from(cache: &'a TeacherCache) -> Self {
        Self::Cached(cache)
    }
}

/// One training batch: the student's inputs `[N, ...]`, integer labels `[N]`, and the
/// positions of its samples in the training set, which a cached teacher needs (the
/// batches `mnist_data::Batcher::epoch` yields are exactly these positions).
#[derive(Debug, Clone, Copy)]
pub struct Batch<'b> {
    /// The student's (and a live teacher's) inputs, `[N, ...]`.
    pub inputs: &'b Tensor,
    /// Class labels, `[N]`, of an integer kind.
    pub labels: &'b Tensor,
    /// The samples' positions in the cached training set, `N` of them.
    pub indices: Option<&'b [usize]>,
}

impl<'b> Batch<'b> {
    /// A batch without sample positions (enough for a live teacher).
    pub fn new(inputs: &'b Tensor, labels: &'b Tensor) -> Self {
        Self {
            inputs,
            labels,
            indices: None,
        }
    }

    /// The same batch with the positions of its samples in the training set.
    pub fn with_indices(self, indices: &'b [usize]) -> Self {
        Self {
            indices: Some(indices),
            ..self
        }
    }
}

/// Pairs a teacher (live or cached) and a student: computes the distillation loss of a
/// batch and, if wanted, takes the optimizer step. Any model that maps a batch to logits
/// will do.
///
/// For mixed precision, build the student under a precision policy; for loss scaling,
/// take the loss from [`Distiller::loss`], scale it, and step through the scaler.
///
/// A student's or live teacher's own forward pass may still panic on inputs it cannot
/// take (tch's layers do on a wrong input shape); everything this crate checks is an
/// [`Error`].
///
/// ```
/// use distillation::{Batch, DistillationConfig, Distiller, TeacherCache, TeacherSource};
/// use tch::nn::{self, Module, OptimizerConfig};
/// use tch::{Device, Kind, Tensor};
///
/// tch::manual_seed(0);
/// let teacher_vs = nn::VarStore::new(Device::Cpu);
/// let teacher = nn::linear(teacher_vs.root(), 6, 3, Default::default());
/// let student_vs = nn::VarStore::new(Device::Cpu);
/// let student = nn::linear(student_vs.root(), 6, 3, Default::default());
/// let mut optimizer = nn::Adam::default().build(&student_vs, 1e-2)?;
///
/// let images = Tensor::randn([20, 6], (Kind::Float, Device::Cpu));
/// let labels = teacher.forward(&images).argmax(-1, false);
/// // The teacher runs once over the training set; each step looks its logits up.
/// let cache = TeacherCache::compute(&teacher, &images, 8)?;
/// let distiller = Distiller::new(&cache, &student, DistillationConfig::default());
/// let indices = [3usize, 7, 11, 19];
/// let index = Tensor::from_slice(&indices.map(|i| i as i64));
/// let (xs, ys) = (images.index_select(0, &index), labels.index_select(0, &index));
/// let loss = distiller.step(&mut optimizer, Batch::new(&xs, &ys).with_indices(&indices))?;
/// assert!(loss.is_finite());
///
/// // The same step with the teacher run on the batch.
/// let live = Distiller::new(TeacherSource::Live(&teacher), &student, DistillationConfig::default());
/// live.step(&mut optimizer, Batch::new(&xs, &ys))?;
/// // A cached teacher needs the positions, and they must be in the cached set.
/// assert!(distiller.step(&mut optimizer, Batch::new(&xs, &ys)).is_err());
/// let outside = [3usize, 7, 11, 20];
/// assert!(distiller.loss(Batch::new(&xs, &ys).with_indices(&outside)).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Distiller<'a, S> {
    teacher: TeacherSource<'a>,
    student: &'a S,
    config: DistillationConfig,
}

impl<'a, S: ModuleT> Distiller<'a, S> {
    /// A distiller with the given teacher, student and settings; a `&TeacherCache` converts
    /// into a [`TeacherSource`], a live teacher is `TeacherSource::Live(&teacher)`.
    pub fn new(
        teacher: impl Into<TeacherSource<'a>>,
        student: &'a S,
        config: DistillationConfig,
    ) -> Self {
        Self {
            teacher: teacher.into(),
            student,
            config,
        }
    }

    /// The settings.
    pub fn config(&self) -> DistillationConfig {
        self.config
    }

    /// Where the teacher's logits come from.
    pub fn teacher(&self) -> TeacherSource<'a> {
        self.teacher
    }

    /// The teacher's logits for `batch`, on the inputs' device, without gradient: the live
    /// teacher's in eval mode, or the cached rows of the batch's indices
    /// ([`Error::MissingIndices`] without them, [`Error::ShapeMismatch`] when their number
    /// is not the batch size, [`Error::IndexOutOfRange`] for one outside the cache).
    pub fn teacher_logits(&self, batch: Batch<'_>) -> Result<Tensor> {
        match self.teacher {
            TeacherSource::Live(teacher) => {
                Ok(tch::no_grad(|| teacher.forward_t(batch.inputs, false)))
            }
            TeacherSource::Cached(cache) => {
                let indices = batch.indices.ok_or(Error::MissingIndices)?;
                let rows = batch_size(batch.inputs)?;
                if indices.len() as i64 != rows {
                    return Err(Error::ShapeMismatch(format!(
                        "{} sample indices for a batch of {rows} inputs",
                        indices.len()
                    )));
                }
                Ok(cache.select(indices)?.f_to(batch.inputs.device())?)
            }
        }
    }

    /// The loss of a batch (student in training mode), ready for `backward`.
    pub fn loss(&self, batch: Batch<'_>) -> Result<Tensor> {
        let teacher = self.teacher_logits(batch)?;
        self.loss_with_teacher_logits(batch.inputs, &teacher, batch.labels)
    }

    /// The loss of a batch against teacher logits `[N, C]` from anywhere (kept by the
    /// caller, computed by another process...), whatever this distiller's teacher is.
    pub fn loss_with_teacher_logits(
        &self,
        inputs: &Tensor,
        teacher_logits: &Tensor,
        labels: &Tensor,
    ) -> Result<Tensor> {
        batch_size(inputs)?;
        let student = self.student.forward_t(inputs, true);
        distillation_loss(&student, teacher_logits, labels, &self.config)
    }

    /// One training step: loss, backward, optimizer step. Returns the loss value (which
    /// reads it back from the device).
    pub fn step(&self, optimizer: &mut Optimizer, batch: Batch<'_>) -> Result<f64> {
        let loss = self.loss(batch)?;
        backward_step(optimizer, &loss)
    }

    /// [`Distiller::step`] against teacher logits from anywhere, as in
    /// [`Distiller::loss_with_teacher_logits`].
    pub fn step_with_teacher_logits(
        &self,
        optimizer: &mut Optimizer,
        inputs: &Tensor,
        teacher_logits: &Tensor,
        labels: &Tensor,
    ) -> Result<f64> {
        let loss = self.loss_with_teacher_logits(inputs, teacher_logits, labels)?;
        backward_step(optimizer, &loss)
    }
}

/// The number of samples of `inputs`, which must have a batch dimension.
fn batch_size(inputs: &Tensor) -> Result<i64> {
    inputs.size().first().copied().ok_or_else(|| {
        Error::ShapeMismatch("inputs must have a batch dimension, got a scalar".into())
    })
}

fn backward_step(optimizer: &mut Optimizer, loss: &Tensor) -> Result<f64> {
    optimizer.zero_grad();
    // Fails (rather than panics) when nothing in the loss is trainable.
    loss.f_backward()?;
    optimizer.step();
    Ok(loss.f_double_value(&[])?)
}

/// The teacher's logits for a fixed training set, computed once and reused every epoch
/// (the teacher does not change while the student trains), looked up by sample position.
///
/// ```
/// use distillation::TeacherCache;
/// use tch::nn::{self, Module};
/// use tch::{Device, Kind, Tensor};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let teacher = nn::linear(vs.root(), 4, 3, Default::default());
/// let images = Tensor::randn([10, 4], (Kind::Float, Device::Cpu));
/// let cache = TeacherCache::compute(&teacher, &images, 4)?;
/// assert_eq!((cache.len(), cache.classes()), (10, 3));
/// // The rows of a batch, by the positions a batcher hands out.
/// let rows = cache.select(&[9, 0, 9])?;
/// let expected = teacher.forward(&images).index_select(0, &Tensor::from_slice(&[9i64, 0, 9]));
/// assert!(rows.allclose(&expected, 1e-6, 1e-6, false));
/// assert!(cache.select(&[10]).is_err());
/// assert!(TeacherCache::compute(&teacher, &images, 0).is_err());
/// # Ok::<(), distillation::Error>(())
/// ```
#[derive(Debug)]
pub struct TeacherCache {
    logits: Tensor,
}

impl TeacherCache {
    /// Runs `teacher` (eval mode, no gradient) over `inputs` (`[N, ...]`) in batches of
    /// `batch_size` and keeps its logits as f32 `[N, C]` on the inputs' device.
    /// [`Error::InvalidBatchSize`] for a batch size of 0; [`Error::ShapeMismatch`] for
    /// scalar inputs or when the teacher does not give one `[batch, C]` row per input;
    /// [`Error::WrongKind`] when its logits are not floating point. No inputs give an
    /// empty cache of shape `[0, 0]`.
    pub fn compute(
        teacher: &(impl ModuleT + ?Sized),
        inputs: &Tensor,
        batch_size: usize,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::InvalidBatchSize);
        }
        let n = self::batch_size(inputs)?;
        let batch = i64::try_from(batch_size).unwrap_or(i64::MAX);
        let logits = tch::no_grad(|| -> Result<Tensor> {
            let mut parts: Vec<Tensor> = Vec::new();
            let mut start = 0;
            while start < n {
                let len = batch.min(n - start);
                let part = teacher.forward_t(&inputs.f_narrow(0, start, len)?, false);
                let shape = part.size();
                let classes = parts.first().map(|p| p.size()[1]);
                if shape.len() != 2 || shape[0] != len || classes.is_some_and(|c| c != shape[1]) {
                    return Err(Error::ShapeMismatch(format!(
                        "the teacher gave logits of shape {shape:?} for inputs {start}..{} \
                         ({} expected)",
                        start + len,
                        classes.map_or_else(
                            || format!("[{len}, classes]"),
                            |c| format!("[{len}, {c}]")
                        )
                    )));
                }
                check_floating("teacher logits", part.kind())?;
                parts.push(part.f_to_kind(Kind::Float)?);
                start += len;
            }
            if parts.is_empty() {
                Ok(Tensor::f_zeros([0, 0], (Kind::Float, inputs.device()))?)
            } else {
                Ok(Tensor::f_cat(&parts, 0)?)
            }
        })?;
        Ok(Self { logits })
    }

    /// A cache of logits computed elsewhere: `[N, C]`, floating point (kept as f32).
    pub fn from_logits(logits: &Tensor) -> Result<Self> {
        let shape = logits.size();
        if shape.len() != 2 {
            return Err(Error::ShapeMismatch(format!(
                "cached logits must be [samples, classes], got {shape:?}"
            )));
        }
        check_floating("cached logits", logits.kind())?;
        Ok(Self {
            logits: logits.f_detach()?.f_to_kind(Kind::Float)?,
        })
    }

    /// All cached logits, `[samples, classes]`, in the order of the inputs.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// The cached logits of the samples at `indices` (positions in the cached set, in any
    /// order, repeats allowed), `[indices.len(), classes]` on the cache's device;
    /// [`Error::IndexOutOfRange`] for the first position outside the cache.
    pub fn select(&self, indices: &[usize]) -> Result<Tensor> {
        let len = self.len();
        let positions = indices
            .iter()
            .map(|&index| {
                if index < len {
                    Ok(index as i64)
                } else {
                    Err(Error::IndexOutOfRange { index, len })
                }
            })
            .collect::<Result<Vec<i64>>>()?;
        let index = Tensor::f_from_slice(&positions)?.f_to(self.device())?;
        Ok(self.logits.f_index_select(0, &index)?)
    }

    /// Number of cached samples.
    pub fn len(&self) -> usize {
        self.logits.size().first().map_or(0, |&n| n as usize)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of classes (logits per sample).
    pub fn classes(&self) -> usize {
        self.logits.size().get(1).map_or(0, |&c| c as usize)
    }

    /// Where the logits live.
    pub fn device(&self) -> Device {
        self.logits.device()
    }
}

fn check_floating(what: &'static str, kind: Kind) -> Result<()> {
    if is_floating(kind) {
        Ok(())
    } else {
        Err(Error::WrongKind {
            what,
            expected: "floating point",
            actual: kind,
        })
    }
}
