//! Data on the device, the training loop and evaluation.

use std::time::Instant;

use anyhow::{Context, Result};
use loss_scaling::{LossScaler, ScalePoint};
use mnist_data::{Batcher, Normalization, Split};
use models::Policy;
use models::data::{SplitTensors, ToTensors};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tensor_precision::GradientAuditor;

use crate::architecture::Trainable;
use crate::progress::Progress;
use crate::report::Row;

/// Batch size for evaluation and for the inference-speed figure of the report.
pub const INFER_BATCH: usize = 256;
/// Steps between progress updates (each one reads values back from the device).
const PROGRESS_EVERY: usize = 20;

/// Images (N, 1, H, W), normalised, and labels (N) as int64, on a device.
#[derive(Debug)]
pub struct DeviceSplit {
    pub images: Tensor,
    pub labels: Tensor,
}

impl DeviceSplit {
    pub fn new(split: &Split, norm: Normalization, device: Device) -> Result<Self> {
        let SplitTensors { images, labels } = split.to_tensors(norm, device)?;
        Ok(Self { images, labels })
    }

    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    /// Consecutive batches of at most `size` images with their labels, in order: views,
    /// nothing copied. The one batched pass over a split that evaluation, calibration and
    /// the teacher's features share.
    pub fn batches(&self, size: usize) -> impl Iterator<Item = (Tensor, Tensor)> {
        let size = i64::try_from(size.max(1)).unwrap_or(i64::MAX);
        self.images
            .split(size, 0)
            .into_iter()
            .zip(self.labels.split(size, 0))
    }
}

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate of Adam; decays along a cosine to 1% of it by the last step.
    pub learning_rate: f64,
    pub seed: u64,
}

/// What a training run adds to the recipe of [`TrainConfig`]: loss scaling, a bound on
/// the steps and a gradient audit. The default adds nothing (plain float32 training when
/// the network computes in float32).
#[derive(Debug, Default)]
pub struct TrainOptions<'a> {
    /// Scales the loss before `backward` and unscales, checks and steps through the
    /// scaler (which skips steps with non-finite gradients); `None`: a plain step.
    pub scaler: Option<&'a mut LossScaler>,
    /// Stops after this many optimizer steps (skipped ones included); the cosine
    /// schedule then spans these steps instead of all epochs.
    pub max_steps: Option<usize>,
    /// Records the float32 gradients of some steps for a float16 underflow audit.
    pub audit: Option<GradientSampling<'a>>,
    /// Trains against a teacher's logits (distillation) instead of the labels alone.
    pub distill: Option<Distill<'a>>,
    /// Prunes while training: after every optimizer step the pruner recomputes its masks
    /// when the step is on its schedule and re-applies them otherwise, so pruned weights
    /// stay exactly zero whatever the optimizer's momentum does.
    pub pruner: Option<&'a mut pruning::Pruner>,
    /// Clusters while training: after every optimizer step the clusterer trains its
    /// centroids on the step's gradients, reassigns the weights and writes the clustered
    /// values back (after the pruner, when both are set).
    pub clusterer: Option<&'a mut clustering::Clusterer>,
}

/// Distillation targets for [`TrainOptions::distill`]: the teacher's logits for every
/// training sample, in the order of the training data.
#[derive(Debug)]
pub struct Distill<'a> {
    pub teacher_logits: &'a Tensor,
    pub config: distillation::DistillationConfig,
    /// Hint (feature) distillation on top, when set.
    pub hint: Option<Hint<'a>>,
}

/// FitNets' hint: the input of the student's layer `layer` (a flattened `[C, H, W]`
/// feature map), mapped by `adapter` (a 1x1 convolution to the teacher's channels, whose
/// variables live in the student's store so the optimizer trains them) and compared with
/// the teacher's features at the same depth, weighted by `weight`.
#[derive(Debug)]
pub struct Hint<'a> {
    pub teacher_features: &'a Tensor,
    pub layer: usize,
    /// The student's feature map shape `[C, H, W]` at `layer`.
    pub shape: [i64; 3],
    pub adapter: &'a nn::Conv2D,
    pub weight: f64,
}

/// Which gradients [`TrainOptions::audit`] records: those of step 0 and of every
/// `every`-th step after it, read after the optimizer step (so unscaled when a scaler
/// runs). The time this takes is not counted as training time.
#[derive(Debug)]
pub struct GradientSampling<'a> {
    pub auditor: &'a mut GradientAuditor,
    pub every: usize,
}

/// What a training run measured.
#[derive(Debug, Clone)]
pub struct TrainStats {
    /// The precision policy the network computed under.
    pub policy: Policy,
    /// Optimizer steps, skipped ones included.
    pub steps: usize,
    pub seconds: f64,
    pub samples_per_second: f64,
    /// Mean training loss of each epoch.
    pub epoch_losses: Vec<f64>,
    /// `(step, mean loss of the steps since the previous point)`, every few steps: the
    /// training curve.
    pub loss_curve: Vec<(usize, f64)>,
    /// Steps the loss scaler skipped because of non-finite gradients (0 without one).
    pub skipped_steps: u64,
    /// The scale after the last step, `None` without a scaler.
    pub final_loss_scale: Option<f32>,
    /// The scaler's initial scale and every change of it (empty without a scaler).
    pub scale_history: Vec<ScalePoint>,
    /// Steps whose gradients went into the audit of [`TrainOptions::audit`].
    pub audited_steps: usize,
}

/// Trains `net` (its variables live in `vs`) with Adam and cross-entropy, with loss
/// scaling, a step bound, a gradient audit, distillation or pruning (see [`TrainOptions`]).
/// Seed, data order, schedule and optimizer come from `config`;
/// the precision policy is the network's ([`Trainable::policy`]).
pub fn train_with(
    net: &impl Trainable,
    vs: &nn::VarStore,
    data: &DeviceSplit,
    config: &TrainConfig,
    options: TrainOptions<'_>,
    progress: &Progress,
    label: &str,
) -> Result<TrainStats> {
    let TrainOptions {
        mut scaler,
        max_steps,
        mut audit,
        distill,
        pruner,
        clusterer,
    } = options;
    let mut hooks: Vec<&mut dyn StepHook> = Vec::new();
    if let Some(pruner) = pruner {
        hooks.push(pruner);
    }
    if let Some(clusterer) = clusterer {
        hooks.push(clusterer);
    }
    if let Some(sampling) = audit.as_mut() {
        hooks.push(sampling);
    }
    let batcher = Batcher::new(data.len(), config.batch_size, config.seed)?;
    let mut optimizer = nn::Adam::default().build(vs, config.learning_rate)?;
    let planned_steps = config.epochs * batcher.batches_per_epoch();
    let planned_steps = max_steps.map_or(planned_steps, |max| max.min(planned_steps));
    let total_steps = planned_steps.max(1);
    let skipped_before = scaler.as_ref().map_or(0, |s| s.skipped_steps());
    let device = data.images.device();
    let mut step = 0;
    let mut samples = 0;
    let mut epoch_losses = Vec::with_capacity(config.epochs);
    let mut loss_curve = Vec::new();
    let mut excluded_seconds = 0.0;
    let start = Instant::now();
    for epoch in 0..config.epochs {
        if step >= planned_steps {
            break;
        }
        let batches = batcher.epoch(epoch as u64);
        let batches = &batches[..batches.len().min(planned_steps - step)];
        let mut bar = progress.epoch(label, epoch, config.epochs, batches.len());
        let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
        let mut correct = Tensor::zeros([], (Kind::Int64, device));
        let mut seen = 0;
        let (mut curve_sum, mut curve_seen) = (0.0, 0);
        for (i, batch) in batches.iter().enumerate() {
            let progress_fraction = step as f64 / total_steps as f64;
            let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress_fraction).cos());
            optimizer.set_lr(config.learning_rate * (0.01 + 0.99 * cosine));
            let index: Vec<i64> = batch.iter().map(|&i| i as i64).collect();
            let index = Tensor::from_slice(&index).to(device);
            let xs = data.images.index_select(0, &index);
            let ys = data.labels.index_select(0, &index);
            let (logits, loss) = batch_loss(net, &xs, &ys, &index, distill.as_ref())?;
            match scaler.as_deref_mut() {
                None => optimizer.backward_step(&loss),
                Some(scaler) => {
                    optimizer.zero_grad();
                    scaler.scale(&loss).backward();
                    scaler
                        .step(&mut optimizer)
                        .with_context(|| format!("loss scaling at step {step}"))?;
                }
            }
            for hook in &mut hooks {
                excluded_seconds += hook.after_step(step, vs)?;
            }
            tch::no_grad(|| {
                loss_sum += loss.detach() * batch.len() as f64;
                correct += logits.argmax(-1, false).eq_tensor(&ys).sum(Kind::Int64);
            });
            seen += batch.len();
            samples += batch.len();
            step += 1;
            if (i + 1) % PROGRESS_EVERY == 0 || i + 1 == batches.len() {
                let total = loss_sum.double_value(&[]);
                loss_curve.push((
                    step,
                    (total - curve_sum) / (seen - curve_seen).max(1) as f64,
                ));
                (curve_sum, curve_seen) = (total, seen);
                let loss = total / seen as f64;
                let accuracy = correct.int64_value(&[]) as f64 / seen as f64;
                let rate = samples as f64 / (start.elapsed().as_secs_f64() - excluded_seconds);
                bar.update(i + 1, loss, accuracy, rate);
            }
        }
        let loss = loss_sum.double_value(&[]) / seen.max(1) as f64;
        let accuracy = correct.int64_value(&[]) as f64 / seen.max(1) as f64;
        bar.finish(&format!(
            "loss {loss:.4}, train accuracy {:.2}%",
            accuracy * 100.0
        ));
        epoch_losses.push(loss);
    }
    drop(hooks);
    let seconds = start.elapsed().as_secs_f64() - excluded_seconds;
    let scaler = scaler.as_deref();
    // Steps 0, every, 2 every, ... of those that ran.
    let audited_steps = audit.map_or(0, |a| step.div_ceil(a.every.max(1)));
    Ok(TrainStats {
        policy: net.policy(),
        steps: step,
        seconds,
        samples_per_second: samples as f64 / seconds,
        epoch_losses,
        loss_curve,
        skipped_steps: scaler.map_or(0, |s| s.skipped_steps() - skipped_before),
        final_loss_scale: scaler.map(LossScaler::current_scale),
        scale_history: scaler.map_or_else(Vec::new, |s| s.history().to_vec()),
        audited_steps,
    })
}

/// The loss of one batch (cross-entropy, or the distillation loss with the hint on top when
/// `distill` says so) and the student's logits.
fn batch_loss(
    net: &impl Trainable,
    xs: &Tensor,
    ys: &Tensor,
    index: &Tensor,
    distill: Option<&Distill<'_>>,
) -> Result<(Tensor, Tensor)> {
    let Some(d) = distill else {
        let logits = net.forward_t(xs, true);
        let loss = logits.cross_entropy_for_logits(ys);
        return Ok((logits, loss));
    };
    let (logits, features) = match &d.hint {
        None => (net.forward_t(xs, true), None),
        Some(h) => {
            let (logits, inputs) = net.forward_with_inputs(xs, true)?;
            let feature = inputs
                .into_iter()
                .find(|(i, _)| *i == h.layer)
                .map(|(_, x)| x)
                .with_context(|| format!("layer {} has no input to hint", h.layer))?;
            (logits, Some((h, feature)))
        }
    };
    let teacher = d.teacher_logits.index_select(0, index);
    let loss = distillation::distillation_loss(&logits, &teacher, ys, &d.config)?;
    let Some((h, feature)) = features else {
        return Ok((logits, loss));
    };
    let [c, height, width] = h.shape;
    let adapted = feature
        .view([-1, c, height, width])
        .apply(h.adapter)
        .flatten(1, -1);
    let target = h.teacher_features.index_select(0, index);
    let hint = distillation::hint_loss(&adapted, &target)? * h.weight;
    Ok((logits, loss + hint))
}

/// What the loop runs after every optimizer step: pruning, the gradient audit. Returns the
/// seconds it took that do not count as training time.
trait StepHook {
    fn after_step(&mut self, step: usize, vs: &nn::VarStore) -> Result<f64>;
}

impl StepHook for pruning::Pruner {
    /// New masks on schedule steps, the masks re-applied after every other step.
    fn after_step(&mut self, step: usize, _: &nn::VarStore) -> Result<f64> {
        let updated = self
            .update(step as u64)
            .with_context(|| format!("pruning at step {step}"))?;
        if !updated {
            self.apply();
        }
        Ok(0.0)
    }
}

impl StepHook for clustering::Clusterer {
    /// Runs while the step's gradients are still in the variables.
    fn after_step(&mut self, step: usize, _: &nn::VarStore) -> Result<f64> {
        self.apply()
            .with_context(|| format!("clustering at step {step}"))?;
        Ok(0.0)
    }
}

impl StepHook for GradientSampling<'_> {
    /// Records the gradients of the sampled steps; its time is not training time.
    fn after_step(&mut self, step: usize, vs: &nn::VarStore) -> Result<f64> {
        if !step.is_multiple_of(self.every.max(1)) {
            return Ok(0.0);
        }
        // Queued device work belongs to the training time, not to the audit's.
        if let Device::Cuda(index) = vs.device() {
            tch::Cuda::synchronize(index as i64);
        }
        let start = Instant::now();
        self.auditor
            .record_variable_grads(&vs.trainable_variables())
            .context("recording gradients for the underflow audit")?;
        Ok(start.elapsed().as_secs_f64())
    }
}

impl TrainStats {
    /// Records the run in `row`: training time, throughput and curve.
    pub fn record(&self, row: &mut Row) {
        row.train_seconds = Some(self.seconds);
        row.train_samples_per_second = Some(self.samples_per_second);
        row.loss_curve.clone_from(&self.loss_curve);
    }
}

/// The step a pruning ramp over `share` of `steps` ends on: a multiple of `frequency` (so the
/// last mask update happens at the ramp's end and the final masks have the final sparsity),
/// at least one `frequency` in.
pub fn ramp_end(steps: usize, share: f64, frequency: u64) -> u64 {
    ((steps as f64 * share) as u64 / frequency).max(1) * frequency
}

/// Accuracy on a split and the inference throughput, batch [`INFER_BATCH`], eval mode.
#[derive(Debug, Clone, Copy)]
pub struct Evaluation {
    pub accuracy: f64,
    pub samples_per_second: f64,
}

/// Evaluates under the network's precision policy.
pub fn evaluate(net: &impl ModuleT, data: &DeviceSplit) -> Evaluation {
    tch::no_grad(|| {
        let n = data.len();
        // One warm-up batch: first calls allocate and pick kernels.
        if let Some((images, _)) = data.batches(INFER_BATCH).next() {
            let _ = net.forward_t(&images, false);
        }
        let mut correct = Tensor::zeros([], (Kind::Int64, data.images.device()));
        let start = Instant::now();
        for (images, labels) in data.batches(INFER_BATCH) {
            let logits = net.forward_t(&images, false);
            correct += logits.argmax(-1, false).eq_tensor(&labels).sum(Kind::Int64);
        }
        let correct = correct.int64_value(&[]);
        let seconds = start.elapsed().as_secs_f64();
        Evaluation {
            accuracy: correct as f64 / n.max(1) as f64,
            samples_per_second: n as f64 / seconds,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use loss_scaling::DynamicConfig;
    use models::{LayerSpec, Network, NetworkSpec};

    /// A dynamic scale far above what float16 can hold: the first steps must overflow.
    const OVERFLOWING_SCALE: f32 = 16_777_216.0;

    fn tiny_split() -> DeviceSplit {
        tch::manual_seed(11);
        DeviceSplit {
            images: Tensor::randn([64, 1, 28, 28], (Kind::Float, Device::Cpu)),
            labels: Tensor::randint(10, [64], (Kind::Int64, Device::Cpu)),
        }
    }

    fn config() -> TrainConfig {
        TrainConfig {
            epochs: 3,
            batch_size: 16,
            learning_rate: 1e-3,
            seed: 5,
        }
    }

    /// 784-16-10: small enough for float16 on the CPU in milliseconds.
    fn mlp() -> NetworkSpec {
        NetworkSpec {
            name: "mlp".into(),
            input: [1, 28, 28],
            layers: vec![
                LayerSpec::Flatten,
                LayerSpec::Linear {
                    in_features: 784,
                    out_features: 16,
                },
                LayerSpec::Relu,
                LayerSpec::Linear {
                    in_features: 16,
                    out_features: 10,
                },
            ],
        }
    }

    fn network(vs: &nn::VarStore, policy: Policy) -> Network {
        Network::with_policy(&vs.root(), &mlp(), policy).unwrap()
    }

    #[test]
    fn plain_training_runs_every_epoch_without_scaler_fields() {
        let data = tiny_split();
        let vs = nn::VarStore::new(Device::Cpu);
        let net = network(&vs, Policy::Float32);
        let options = TrainOptions::default();
        let stats = train_with(
            &net,
            &vs,
            &data,
            &config(),
            options,
            &Progress::new(true),
            "t",
        )
        .unwrap();
        assert_eq!(stats.policy, Policy::Float32);
        assert_eq!(stats.steps, 3 * 4);
        assert_eq!(stats.epoch_losses.len(), 3);
        assert_eq!(stats.skipped_steps, 0);
        assert_eq!(stats.final_loss_scale, None);
        assert!(stats.scale_history.is_empty());
        assert_eq!(stats.audited_steps, 0);
        assert!(stats.samples_per_second > 0.0);
    }

    #[test]
    fn pruned_weights_stay_zero_through_adam_momentum() {
        let data = tiny_split();
        let vs = nn::VarStore::new(Device::Cpu);
        let net = network(&vs, Policy::Float32);
        // Masks are computed at step 0 only; Adam's momentum would revive them otherwise.
        let schedule = pruning::Schedule::constant(0.5, 0, Some(0), 1).unwrap();
        let mut pruner = pruning::Pruner::new(
            &vs,
            pruning::PruningConfig {
                schedule,
                granularity: pruning::Granularity::Unstructured,
                scope: pruning::Scope::PerLayer,
            },
        )
        .unwrap();
        let options = TrainOptions {
            pruner: Some(&mut pruner),
            ..TrainOptions::default()
        };
        let stats = train_with(
            &net,
            &vs,
            &data,
            &config(),
            options,
            &Progress::new(true),
            "p",
        )
        .unwrap();
        assert_eq!(stats.steps, 12);
        for layer in pruner.report() {
            assert_eq!(layer.zeros, layer.total / 2, "{}", layer.name);
        }
    }

    #[test]
    fn max_steps_bounds_the_run_and_the_audit_samples_steps() {
        let data = tiny_split();
        let vs = nn::VarStore::new(Device::Cpu);
        let net = network(&vs, Policy::Float32);
        let mut auditor = GradientAuditor::new();
        let options = TrainOptions {
            scaler: None,
            max_steps: Some(5),
            audit: Some(GradientSampling {
                auditor: &mut auditor,
                every: 2,
            }),
            distill: None,
            pruner: None,
            clusterer: None,
        };
        let stats = train_with(
            &net,
            &vs,
            &data,
            &config(),
            options,
            &Progress::new(true),
            "t",
        )
        .unwrap();
        // Four batches an epoch: one full epoch and one step of the second.
        assert_eq!(stats.steps, 5);
        assert_eq!(stats.epoch_losses.len(), 2);
        // Steps 0, 2 and 4, each with every parameter of the network.
        assert_eq!(stats.audited_steps, 3);
        let params = mlp().param_count() as u64;
        assert_eq!(auditor.finish().values, 3 * params);
    }

    #[test]
    fn a_loss_scaler_skips_overflowing_steps_and_reports_its_trace() {
        let data = tiny_split();
        let vs = nn::VarStore::new(Device::Cpu);
        let net = network(&vs, Policy::MixedFloat16);
        let mut scaler = LossScaler::dynamic(DynamicConfig {
            initial_scale: OVERFLOWING_SCALE,
            ..DynamicConfig::keras()
        })
        .unwrap();
        let options = TrainOptions {
            scaler: Some(&mut scaler),
            max_steps: Some(8),
            audit: None,
            distill: None,
            pruner: None,
            clusterer: None,
        };
        let stats = train_with(
            &net,
            &vs,
            &data,
            &config(),
            options,
            &Progress::new(true),
            "t",
        )
        .unwrap();
        assert_eq!(stats.policy, Policy::MixedFloat16);
        assert_eq!(stats.steps, 8);
        assert!(stats.skipped_steps >= 1, "{stats:?}");
        assert_eq!(stats.skipped_steps, scaler.skipped_steps());
        assert_eq!(stats.final_loss_scale, Some(scaler.current_scale()));
        assert!(scaler.current_scale() < OVERFLOWING_SCALE);
        assert_eq!(stats.scale_history[0].scale, OVERFLOWING_SCALE);
        assert_eq!(stats.scale_history.len(), 1 + stats.skipped_steps as usize);
        assert!(stats.epoch_losses.iter().all(|loss| loss.is_finite()));
    }
}
