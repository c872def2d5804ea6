//! A model of one's own, taken through every technique of the toolkit with the crates alone.
//!
//! The model is a plain tch MLP (`Mlp`: its own `fc1` and `fc2` layers, no `NetworkSpec`
//! preset, no `models::Network`) and [`run`] takes it through what a user's training code
//! would do:
//!
//! 1. **mixed_bfloat16 training** with `tensor_precision::layers` in the forward pass, and the
//!    gradient-underflow audit on its float32 gradients;
//! 2. **float16 with loss scaling**: a few fine-tuning steps under mixed_float16 with a
//!    dynamic `loss_scaling::LossScaler`;
//! 3. **distillation** of a smaller MLP from the teacher's cached logits
//!    (`distillation::Distiller` over a `TeacherCache`);
//! 4. **pruning** of the student with a TF-MOT polynomial-decay schedule (`pruning::Pruner`);
//! 5. **quantization-aware training** with the public fake quantizers
//!    (`models::fake_quant`), the zeros kept by the pruner;
//! 6. **export** from the model's `NetworkSpec` and a name map of its variables
//!    (`models::export::parameters_of`) to a full-integer int8 artifact that records its input
//!    normalisation, run by the pure-Rust `runtime` on raw test images;
//! 7. **clustering** of a copy of the pruned float32 student to 16 shared values per weight
//!    tensor, its zeros kept (`clustering::Clusterer`), fine-tuned while distilling and
//!    exported palettized: each kept weight a 4-bit index into its tensor's codebook.
//!
//! Every step's numbers come back in a [`Report`] (and are printed as they are measured).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, ensure};
use clustering::{CentroidOptimizer, Clusterer, ClusteringConfig};
use distillation::{Alpha, Batch, DistillationConfig, Distiller, TeacherCache, Temperature};
use loss_scaling::LossScaler;
use mnist_data::{Batcher, Dataset, Normalization, Split};
use model_spec::{InputNormalization, LayerSpec, NetworkSpec};
use models::export::{self, NameMap, WeightFormat};
use models::fake_quant::{self, ActivationFakeQuant, FakeQuantConfig};
use pruning::{Granularity, Pruner, PruningConfig, Schedule, Scope};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tensor_precision::{GradientAuditor, Policy, layers};

/// How much data and training [`run`] uses.
#[derive(Clone, Debug)]
pub struct Options {
    /// A folder of MNIST-layout IDX files.
    pub data_dir: PathBuf,
    /// The share of each class of the training split that is trained on, in (0, 1].
    pub train_fraction: f64,
    /// Test images scored (the first ones of the test split); 0 for all.
    pub test_images: usize,
    /// Epochs of each training phase.
    pub epochs: usize,
    /// Optimizer steps of the float16 phase.
    pub float16_steps: usize,
    /// Samples per batch.
    pub batch: usize,
    /// Seeds the initialisation and the shuffling.
    pub seed: u64,
    /// Where the int8 artifact is written (kept in memory only when `None`).
    pub artifact: Option<PathBuf>,
}

impl Options {
    /// The whole training split, three epochs per phase, every test image.
    pub fn full(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            train_fraction: 1.0,
            test_images: 0,
            epochs: 3,
            float16_steps: 100,
            batch: 128,
            seed: 7,
            artifact: None,
        }
    }

    /// A sixth of the training split, three epochs per phase, 2000 test images: about a
    /// minute on two cores.
    pub fn quick(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            train_fraction: 1.0 / 6.0,
            test_images: 2000,
            epochs: 3,
            float16_steps: 20,
            ..Self::full(data_dir)
        }
    }
}

/// What each step measured; accuracies are shares of the scored test images, in [0, 1].
#[derive(Clone, Debug)]
pub struct Report {
    /// Test images scored.
    pub test_images: usize,
    /// The teacher after mixed_bfloat16 training.
    pub teacher_accuracy: f64,
    /// The loss scale the gradient audit recommends for float16 (`None`: no scale keeps
    /// underflow low without overflow).
    pub recommended_scale: Option<f32>,
    /// The teacher after the float16 steps.
    pub float16_accuracy: f64,
    /// The dynamic loss scale after the float16 steps.
    pub float16_scale: f32,
    /// Float16 steps skipped for an infinite or NaN gradient.
    pub float16_skipped: u64,
    /// The student distilled from the teacher.
    pub student_accuracy: f64,
    /// The student after pruning, in float32: the float model the int8 artifact comes from.
    pub pruned_accuracy: f64,
    /// The share of the student's weights that are zero after pruning.
    pub sparsity: f64,
    /// The student after quantization-aware training, fake-quantized in tch.
    pub qat_accuracy: f64,
    /// The int8 artifact run by the runtime on raw test images.
    pub runtime_accuracy: f64,
    /// The artifact's size in bytes.
    pub artifact_bytes: usize,
    /// How the runtime executes each layer (`Debug` of `runtime::Execution`).
    pub execution: Vec<String>,
    /// The clustered student's most distinct weight values in one tensor, zero included.
    pub clustered_values: usize,
    /// The clustered student's palettized artifact run by the runtime on raw test images.
    pub clustered_accuracy: f64,
    /// That artifact's size in bytes.
    pub clustered_bytes: usize,
}

/// A plain tch MLP of one's own: `fc1` (784 to `hidden`), ReLU, `fc2` (to 10), computing
/// under a precision policy, optionally fake-quantized for QAT.
#[derive(Debug)]
pub struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
    policy: Policy,
    qat: Option<[ActivationFakeQuant; 2]>,
}

impl Mlp {
    /// The variables `fc1.weight`, `fc1.bias`, `fc2.weight`, `fc2.bias` under `path`.
    pub fn new(path: &nn::Path, hidden: i64, policy: Policy) -> Self {
        Self {
            fc1: nn::linear(path / "fc1", 784, hidden, Default::default()),
            fc2: nn::linear(path / "fc2", hidden, 10, Default::default()),
            policy,
            qat: None,
        }
    }

    /// Its architecture for export, and where each layer's variables are.
    pub fn spec(hidden: usize) -> (NetworkSpec, NameMap) {
        let spec = NetworkSpec {
            name: format!("own_mlp_{hidden}"),
            input: [1, 28, 28],
            layers: vec![
                LayerSpec::Flatten,
                LayerSpec::Linear {
                    in_features: 784,
                    out_features: hidden,
                },
                LayerSpec::Relu,
                LayerSpec::Linear {
                    in_features: hidden,
                    out_features: 10,
                },
            ],
        };
        (spec, NameMap::new().layer(1, "fc1").layer(3, "fc2"))
    }

    /// The logits (float32) of images `[n, 1, 28, 28]`.
    pub fn try_forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let x = xs.f_flatten(1, -1)?;
        let hidden = self.layer(0, &x, train)?.f_relu()?;
        let logits = self.layer(1, &hidden, train)?;
        Ok(layers::output(self.policy, &logits)?)
    }

    fn layer(&self, index: usize, x: &Tensor, train: bool) -> Result<Tensor> {
        let layer = [&self.fc1, &self.fc2][index];
        match &self.qat {
            None => Ok(layers::linear(
                self.policy,
                x,
                &layer.ws,
                layer.bs.as_ref(),
            )?),
            Some(inputs) => {
                let x = inputs[index].forward_t(x, train)?;
                let w = fake_quant::weight(&layer.ws)?;
                Ok(layers::linear(self.policy, &x, &w, layer.bs.as_ref())?)
            }
        }
    }
}

impl ModuleT for Mlp {
    /// [`Mlp::try_forward`]; the trait has no room for an error, and the shapes of every
    /// input the example feeds are fixed.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.try_forward(xs, train)
            .unwrap_or_else(|e| panic!("the MLP's forward pass failed: {e:#}"))
    }
}

/// A split as tensors: normalised images `[n, 1, 28, 28]` and int64 labels.
fn tensors(split: &Split, norm: Normalization) -> Result<(Tensor, Tensor)> {
    let images = split.normalized(norm);
    let n = i64::try_from(split.len())?;
    let xs = Tensor::f_from_slice(images.as_slice().context("standard layout")?)?
        .f_view([n, 1, 28, 28])?;
    let ys = Tensor::f_from_slice(split.labels.as_slice().context("standard layout")?)?
        .f_to_kind(Kind::Int64)?;
    Ok((xs, ys))
}

/// The share of `xs` that `model` classifies as `ys`, in eval mode, in batches.
fn accuracy(model: &Mlp, xs: &Tensor, ys: &Tensor) -> Result<f64> {
    let n = xs.size()[0];
    let mut correct = 0i64;
    tch::no_grad(|| -> Result<()> {
        for start in (0..n).step_by(1000) {
            let len = 1000.min(n - start);
            let logits = model.try_forward(&xs.f_narrow(0, start, len)?, false)?;
            let hits = logits
                .f_argmax(-1, false)?
                .f_eq_tensor(&ys.f_narrow(0, start, len)?)?;
            correct += hits.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        }
        Ok(())
    })?;
    Ok(correct as f64 / n.max(1) as f64)
}

/// The mean cross-entropy of `logits` against integer `labels`.
fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(logits.f_cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Mean, -100, 0.0)?)
}

/// The share of the weights (not biases) in `vs` that are exactly zero.
fn weight_sparsity(vs: &nn::VarStore) -> Result<f64> {
    let (mut zeros, mut total) = (0i64, 0i64);
    for (name, weight) in vs.variables() {
        if name.ends_with(".weight") {
            zeros += weight.f_eq(0.0)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
            total += weight.numel() as i64;
        }
    }
    Ok(zeros as f64 / total.max(1) as f64)
}

fn rows(xs: &Tensor, batch: &[usize]) -> Result<Tensor> {
    let index: Vec<i64> = batch.iter().map(|&i| i as i64).collect();
    Ok(xs.f_index_select(0, &Tensor::f_from_slice(&index)?)?)
}

/// Takes the example's own MLP through every technique, printing each step's numbers.
pub fn run(options: &Options) -> Result<Report> {
    ensure!(
        options.train_fraction > 0.0 && options.train_fraction <= 1.0,
        "the training fraction {} is outside (0, 1]",
        options.train_fraction
    );
    ensure!(options.batch > 0, "the batch size must be positive");
    tch::manual_seed(options.seed as i64);
    let data = Dataset::load(&options.data_dir)
        .with_context(|| format!("loading MNIST from {}", options.data_dir.display()))?;
    let train = if options.train_fraction < 1.0 {
        data.train
            .stratified_subset(options.train_fraction, options.seed)?
    } else {
        data.train.clone()
    };
    let test = match options.test_images {
        0 => data.test.clone(),
        n => data
            .test
            .select(&(0..n.min(data.test.len())).collect::<Vec<_>>()),
    };
    let norm = Normalization::default();
    let (train_x, train_y) = tensors(&train, norm)?;
    let (test_x, test_y) = tensors(&test, norm)?;
    let batcher = Batcher::new(train.len(), options.batch, options.seed)?;
    let epochs = options.epochs as u64;
    println!(
        "data: {} training images, {} test images",
        train.len(),
        test.len()
    );

    // 1. The teacher, trained under mixed_bfloat16 with float32 master weights; the
    //    gradients of every tenth step go through the underflow audit.
    let teacher_vs = nn::VarStore::new(Device::Cpu);
    let mut teacher = Mlp::new(&teacher_vs.root(), 256, Policy::MixedBfloat16);
    let mut optimizer = nn::Adam::default().build(&teacher_vs, 2e-3)?;
    let mut auditor = GradientAuditor::new();
    for epoch in 0..epochs {
        for (step, batch) in batcher.epoch(epoch).iter().enumerate() {
            let logits = teacher.try_forward(&rows(&train_x, batch)?, true)?;
            let loss = cross_entropy(&logits, &rows(&train_y, batch)?)?;
            optimizer.zero_grad();
            loss.f_backward()?;
            if step % 10 == 0 {
                auditor.record_variable_grads(&teacher_vs.trainable_variables())?;
            }
            optimizer.step();
        }
    }
    let audit = auditor.finish();
    let teacher_accuracy = accuracy(&teacher, &test_x, &test_y)?;
    println!(
        "1. teacher (784-256-10) trained under mixed_bfloat16: {:.2}% test accuracy; \
         audit of {} gradient values recommends a float16 loss scale of {}",
        100.0 * teacher_accuracy,
        audit.values,
        audit
            .recommended_scale
            .map_or("none".into(), |s| s.to_string())
    );

    // 2. A few steps under mixed_float16 with a dynamic loss scale.
    teacher = Mlp {
        policy: Policy::MixedFloat16,
        ..teacher
    };
    let mut scaler = LossScaler::default();
    let mut optimizer = nn::Adam::default().build(&teacher_vs, 1e-4)?;
    let order = batcher.epoch(epochs);
    for batch in order.iter().cycle().take(options.float16_steps) {
        let logits = teacher.try_forward(&rows(&train_x, batch)?, true)?;
        let loss = cross_entropy(&logits, &rows(&train_y, batch)?)?;
        optimizer.zero_grad();
        scaler.scale(&loss).f_backward()?;
        scaler.step(&mut optimizer)?;
    }
    teacher = Mlp {
        policy: Policy::Float32,
        ..teacher
    };
    let float16_accuracy = accuracy(&teacher, &test_x, &test_y)?;
    println!(
        "2. {} float16 steps with dynamic loss scaling: {:.2}%; scale now {}, {} steps skipped",
        scaler.steps(),
        100.0 * float16_accuracy,
        scaler.current_scale(),
        scaler.skipped_steps()
    );

    // 3. A 4x smaller student distilled from the teacher's cached logits.
    let cache = TeacherCache::compute(&teacher, &train_x, 1000)?;
    let student_vs = nn::VarStore::new(Device::Cpu);
    let mut student = Mlp::new(&student_vs.root(), 64, Policy::Float32);
    let config = DistillationConfig::new(Temperature::new(4.0)?, Alpha::new(0.3)?);
    let mut optimizer = nn::Adam::default().build(&student_vs, 2e-3)?;
    for epoch in 0..epochs {
        for batch in batcher.epoch(epoch + 100) {
            let (xs, ys) = (rows(&train_x, &batch)?, rows(&train_y, &batch)?);
            let distiller = Distiller::new(&cache, &student, config);
            distiller.step(&mut optimizer, Batch::new(&xs, &ys).with_indices(&batch))?;
        }
    }
    let student_accuracy = accuracy(&student, &test_x, &test_y)?;
    println!(
        "3. student (784-64-10) distilled at T = 4, alpha = 0.3: {:.2}%",
        100.0 * student_accuracy
    );

    // 4. The student pruned to 75% sparsity over one epoch, then fine-tuned with the masks
    //    kept.
    let steps_per_epoch = batcher.epoch(0).len() as u64;
    let frequency = 10;
    let end = (steps_per_epoch / frequency).max(1) * frequency;
    let mut pruner = Pruner::new(
        &student_vs,
        PruningConfig {
            schedule: Schedule::polynomial_decay(0.0, 0.75, 0, end, frequency)?,
            granularity: Granularity::Unstructured,
            scope: Scope::PerLayer,
        },
    )?;
    let mut optimizer = nn::Adam::default().build(&student_vs, 1e-3)?;
    let mut step = 0;
    for epoch in 0..epochs {
        for batch in batcher.epoch(epoch + 200) {
            pruner.update(step)?;
            let (xs, ys) = (rows(&train_x, &batch)?, rows(&train_y, &batch)?);
            let distiller = Distiller::new(&cache, &student, config);
            distiller.step(&mut optimizer, Batch::new(&xs, &ys).with_indices(&batch))?;
            pruner.apply();
            step += 1;
        }
    }
    let pruned_accuracy = accuracy(&student, &test_x, &test_y)?;
    let sparsity = weight_sparsity(&student_vs)?;
    // A copy of the pruned float32 student, clustered in step 7.
    let mut clustered_vs = nn::VarStore::new(Device::Cpu);
    let clustered = Mlp::new(&clustered_vs.root(), 64, Policy::Float32);
    clustered_vs.copy(&student_vs)?;
    println!(
        "4. student pruned to {:.0}% sparsity while distilling: {:.2}%",
        100.0 * sparsity,
        100.0 * pruned_accuracy
    );

    // 5. Quantization-aware training: weights on the per-channel int8 grid, each layer's
    //    input on a u8 grid whose range the observers learn and then freeze. The pruner
    //    keeps the zeros.
    let qat = FakeQuantConfig {
        observer_steps: (steps_per_epoch as usize / 2).max(1),
        ..FakeQuantConfig::default()
    };
    student.qat = Some([
        ActivationFakeQuant::new(qat)?,
        ActivationFakeQuant::new(qat)?,
    ]);
    let mut optimizer = nn::Adam::default().build(&student_vs, 2e-4)?;
    for batch in batcher.epoch(300) {
        let (xs, ys) = (rows(&train_x, &batch)?, rows(&train_y, &batch)?);
        let distiller = Distiller::new(&cache, &student, config);
        distiller.step(&mut optimizer, Batch::new(&xs, &ys).with_indices(&batch))?;
        pruner.apply();
    }
    let qat_accuracy = accuracy(&student, &test_x, &test_y)?;
    println!(
        "5. one epoch of quantization-aware training: {:.2}% (fake-quantized in tch)",
        100.0 * qat_accuracy
    );

    // 6. Export: the model's architecture and the names of its variables; full-integer int8
    //    with the observed input grids, weights stored sparsely where that is smaller, and
    //    the input normalisation recorded.
    let (spec, names) = Mlp::spec(64);
    let params = export::parameters_of(&spec, &student_vs, &names)?;
    let mut builder = export::artifact_from_parameters(spec, &params, WeightFormat::Int8Compact)?;
    let grids = student
        .qat
        .as_ref()
        .context("quantization-aware training ran")?;
    for (layer, observer) in [1, 3].into_iter().zip(grids) {
        let grid = observer
            .qparams()
            .context("the activation observers saw the training batches")?;
        builder.set_input_quantization(layer, grid);
    }
    builder.set_input_normalization(InputNormalization::new(
        255.0,
        vec![norm.mean],
        vec![norm.std],
    )?);
    let bytes = builder.to_bytes()?;
    if let Some(path) = &options.artifact {
        builder.write(path)?;
    }
    let model = runtime::Model::from_bytes(&bytes)?;
    let runtime_accuracy = runtime_accuracy(&model, &test)?;
    let execution: Vec<String> = model
        .execution()
        .iter()
        .map(|(layer, e)| format!("{layer}: {e:?}"))
        .collect();
    println!(
        "6. int8 artifact, {} bytes ({}), run by the runtime on raw pixels: {:.2}% \
         ({:+.2} points against the pruned float model)",
        bytes.len(),
        execution.join(", "),
        100.0 * runtime_accuracy,
        100.0 * (runtime_accuracy - pruned_accuracy)
    );
    // 7. Clustering, sparsity preserved: every weight tensor of the pruned copy shares 16
    //    values besides its zeros; an epoch of distillation trains the centroids (on their
    //    weights' summed gradients) and the weights behind them. Exported palettized.
    let mut clusterer = Clusterer::new(
        &clustered_vs,
        ClusteringConfig {
            preserve_sparsity: true,
            optimizer: CentroidOptimizer::Adam {
                learning_rate: 1e-4,
            },
            seed: options.seed,
            ..ClusteringConfig::new(16)
        },
    )?;
    let mut optimizer = nn::Adam::default().build(&clustered_vs, 2e-4)?;
    for batch in batcher.epoch(400) {
        let (xs, ys) = (rows(&train_x, &batch)?, rows(&train_y, &batch)?);
        let distiller = Distiller::new(&cache, &clustered, config);
        distiller.step(&mut optimizer, Batch::new(&xs, &ys).with_indices(&batch))?;
        clusterer.apply()?; // the step's gradients are still in the variables
    }
    let clustered_values = clusterer
        .strip()?
        .iter()
        .map(|layer| layer.distinct_values)
        .max()
        .unwrap_or(0);
    let (spec, names) = Mlp::spec(64);
    let params = export::parameters_of(&spec, &clustered_vs, &names)?;
    let mut builder = export::artifact_from_parameters(spec, &params, WeightFormat::Palette)?;
    builder.set_input_normalization(InputNormalization::new(
        255.0,
        vec![norm.mean],
        vec![norm.std],
    )?);
    let palette = builder.to_bytes()?;
    let clustered_accuracy = self::runtime_accuracy(&runtime::Model::from_bytes(&palette)?, &test)?;
    println!(
        "7. clustered to 16 values per tensor, zeros kept: palettized artifact of {} bytes \
         ({:.1}x smaller than the int8 one), {:.2}% in the runtime",
        palette.len(),
        bytes.len() as f64 / palette.len() as f64,
        100.0 * clustered_accuracy
    );
    Ok(Report {
        test_images: test.len(),
        teacher_accuracy,
        recommended_scale: audit.recommended_scale,
        float16_accuracy,
        float16_scale: scaler.current_scale(),
        float16_skipped: scaler.skipped_steps(),
        student_accuracy,
        pruned_accuracy,
        sparsity,
        qat_accuracy,
        runtime_accuracy,
        artifact_bytes: bytes.len(),
        execution,
        clustered_values,
        clustered_accuracy,
        clustered_bytes: palette.len(),
    })
}

/// The runtime's accuracy on the raw test images, normalised as the artifact records.
fn runtime_accuracy(model: &runtime::Model, test: &Split) -> Result<f64> {
    let raw = test.images.clone().insert_axis(ndarray::Axis(1));
    let logits = model.run_raw(raw.view())?;
    let correct = logits
        .outer_iter()
        .zip(test.labels.iter())
        .filter(|(row, label)| {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                );
            best.0 == usize::from(**label)
        })
        .count();
    Ok(correct as f64 / test.len().max(1) as f64)
}

/// The bundled MNIST copy of this repository.
pub fn bundled_mnist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets/mnist")
}

/// The README's code blocks, compiled (and those not marked `no_run`, run) as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
