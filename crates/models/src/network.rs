use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};
use tensor_precision::{Conv2dOptions, layers};

use crate::calibrate::Calibrator;
use crate::fake_quant::{ActivationRange, FakeQuantConfig, NetworkFakeQuant};
use crate::{LayerSpec, NetworkSpec, Policy, Result};

/// The tch implementation of a [`NetworkSpec`], computing under a precision [`Policy`].
///
/// The variables are float32 in the `VarStore` whatever the policy. Under a mixed policy
/// every convolution and dense layer casts its input, weight and bias to the policy's
/// compute type on the forward pass (a differentiable cast, so the gradients reach the
/// float32 variables as float32), pooling, ReLU and dropout run on the 16-bit tensors,
/// and the logits are cast back to float32 for the loss and the softmax, as Keras
/// advises. The casts are the public building blocks of [`tensor_precision::layers`], which
/// a model of one's own calls the same way. Unlike `tch::autocast`, which only acts on CUDA,
/// this works on every device.
///
/// [`Network::f_forward_t`] is the forward pass with errors (an input of the wrong shape or
/// element type); the [`ModuleT`] implementation panics on them, as tch's own modules do.
#[derive(Debug)]
pub struct Network {
    spec: NetworkSpec,
    layers: Vec<Layer>,
    policy: Policy,
    fake_quant: Option<NetworkFakeQuant>,
}

#[derive(Debug)]
enum Layer {
    Conv2d {
        weight: Tensor,
        bias: Tensor,
        stride: i64,
        padding: i64,
    },
    Linear {
        weight: Tensor,
        bias: Tensor,
    },
    BatchNorm2d {
        bn: nn::BatchNorm,
        eps: f64,
    },
    Relu,
    MaxPool2d {
        kernel: i64,
        stride: i64,
    },
    Flatten,
    Dropout {
        p: f64,
    },
}

/// How [`Network`] initialises its variables. Batch-norm shifts always start at 0 and the
/// running statistics at mean 0 and variance 1. The fans of a convolution count its window: `fan_in = in_channels * k * k`,
/// `fan_out = out_channels * k * k`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Initializer {
    /// tch's defaults: weights Kaiming-uniform with the ReLU gain (uniform in
    /// `±sqrt(6 / fan_in)`), convolution biases zero, dense biases uniform in
    /// `±1 / sqrt(fan_in)`, batch-norm scales uniform in `[0, 1)`.
    #[default]
    Torch,
    /// Keras's defaults (`glorot_uniform` kernels, `zeros` biases, `ones` batch-norm
    /// scales): weights uniform in `±sqrt(6 / (fan_in + fan_out))`, every bias zero,
    /// batch-norm scales 1 (as PyTorch's, too). Smaller convolution weights than
    /// [`Initializer::Torch`], so batch norm after them lets Adam turn them faster, no
    /// random offsets in the dense layers and no channel that starts nearly switched off.
    GlorotUniform,
}

impl Initializer {
    /// The weight and bias initialisation of a layer with these fans; `None` for the bias:
    /// tch's own default of the layer.
    pub(crate) fn inits(self, fan_in: usize, fan_out: usize) -> (nn::Init, Option<nn::Init>) {
        match self {
            Self::Torch => (nn::init::DEFAULT_KAIMING_UNIFORM, None),
            Self::GlorotUniform => {
                // Fans of validated layers are small; f64 holds them exactly.
                let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                (
                    nn::Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                    Some(nn::Init::Const(0.0)),
                )
            }
        }
    }
}

impl Initializer {
    /// The variables of a batch norm over `features` channels under `path`: shifts 0,
    /// scales as the initialiser says, running mean 0 and variance 1.
    pub(crate) fn batch_norm(self, path: &nn::Path, features: usize, eps: f64) -> nn::BatchNorm {
        let defaults = nn::BatchNormConfig::default();
        let ws_init = match self {
            Self::Torch => defaults.ws_init,
            Self::GlorotUniform => nn::Init::Const(1.0),
        };
        nn::batch_norm2d(
            path,
            dim(features),
            nn::BatchNormConfig {
                eps,
                momentum: BATCH_NORM_MOMENTUM,
                ws_init,
                ..defaults
            },
        )
    }
}

/// PyTorch's batch-norm momentum (weight of a new batch in the running statistics).
const BATCH_NORM_MOMENTUM: f64 = 0.1;

/// Batch norm of `xs` with `bn`'s variables: batch statistics while training (the running
/// ones updated with [`BATCH_NORM_MOMENTUM`]), the running ones otherwise. LibTorch's batch
/// norm takes 16-bit input with float32 parameters and statistics and keeps its arithmetic
/// in float32 (as autocast does); casting around it would double the activation traffic.
pub(crate) fn batch_norm(bn: &nn::BatchNorm, eps: f64, xs: &Tensor, train: bool) -> Result<Tensor> {
    Ok(Tensor::f_batch_norm(
        xs,
        bn.ws.as_ref(),
        bn.bs.as_ref(),
        Some(&bn.running_mean),
        Some(&bn.running_var),
        train,
        BATCH_NORM_MOMENTUM,
        eps,
        true,
    )?)
}

fn dim(value: usize) -> i64 {
    i64::try_from(value).expect("layer sizes validated by NetworkSpec fit in i64")
}

impl Network {
    /// Creates the variables of `spec` under `path` (tch's default initialisation,
    /// [`Initializer::Torch`]) after validating the spec; computes in float32.
    pub fn new(path: &nn::Path, spec: &NetworkSpec) -> Result<Self> {
        Self::with_policy(path, spec, Policy::Float32)
    }

    /// Like [`Network::new`], computing under `policy`; the variables are float32.
    pub fn with_policy(path: &nn::Path, spec: &NetworkSpec, policy: Policy) -> Result<Self> {
        Self::with_init(path, spec, policy, Initializer::default())
    }

    /// Like [`Network::with_policy`], with the variables initialised by `init` (the same
    /// variables and names whatever `init` is).
    ///
    /// ```
    /// use models::{Initializer, Network, NetworkSpec, Policy};
    /// use tch::{nn, Device};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let spec = NetworkSpec::student_cnn();
    /// let net = Network::with_init(&vs.root(), &spec, Policy::Float32, Initializer::GlorotUniform)?;
    /// assert_eq!(net.param_count(), spec.param_count());
    /// // Keras's zero biases, where tch draws those of dense layers at random.
    /// let bias = &vs.variables()["9.bias"];
    /// assert_eq!(bias.abs().max().double_value(&[]), 0.0);
    /// # Ok::<(), models::Error>(())
    /// ```
    pub fn with_init(
        path: &nn::Path,
        spec: &NetworkSpec,
        policy: Policy,
        init: Initializer,
    ) -> Result<Self> {
        spec.validate()?;
        let layers = spec
            .layers
            .iter()
            .enumerate()
            .map(|(index, layer)| {
                let path = path / index;
                match *layer {
                    LayerSpec::Conv2d {
                        in_channels,
                        out_channels,
                        kernel,
                        stride,
                        padding,
                    } => {
                        let window = kernel * kernel;
                        let (ws_init, bs_init) =
                            init.inits(in_channels * window, out_channels * window);
                        let defaults = nn::ConvConfig::default();
                        let config = nn::ConvConfig {
                            ws_init,
                            bs_init: bs_init.unwrap_or(defaults.bs_init),
                            ..defaults
                        };
                        let conv = nn::conv2d(
                            &path,
                            dim(in_channels),
                            dim(out_channels),
                            dim(kernel),
                            config,
                        );
                        Layer::Conv2d {
                            weight: conv.ws,
                            bias: conv.bs.expect("conv2d is created with a bias"),
                            stride: dim(stride),
                            padding: dim(padding),
                        }
                    }
                    LayerSpec::Linear {
                        in_features,
                        out_features,
                    } => {
                        let (ws_init, bs_init) = init.inits(in_features, out_features);
                        let config = nn::LinearConfig {
                            ws_init,
                            bs_init,
                            ..Default::default()
                        };
                        let linear = nn::linear(&path, dim(in_features), dim(out_features), config);
                        Layer::Linear {
                            weight: linear.ws,
                            bias: linear.bs.expect("linear is created with a bias"),
                        }
                    }
                    LayerSpec::BatchNorm2d { features, eps } => Layer::BatchNorm2d {
                        bn: init.batch_norm(&path, features, eps),
                        eps,
                    },
                    LayerSpec::Relu => Layer::Relu,
                    LayerSpec::MaxPool2d { kernel, stride } => Layer::MaxPool2d {
                        kernel: dim(kernel),
                        stride: dim(stride),
                    },
                    LayerSpec::Flatten => Layer::Flatten,
                    LayerSpec::Dropout { p } => Layer::Dropout { p },
                }
            })
            .collect();
        Ok(Self {
            spec: spec.clone(),
            layers,
            policy,
            fake_quant: None,
        })
    }

    /// The precision policy of the forward pass.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Changes the precision policy of the forward pass; the variables are untouched.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Turns on fake quantization of every `conv2d` and `linear` layer (weights per channel
    /// through [`fake_quant::weight`](crate::fake_quant::weight), inputs per tensor through
    /// one [`ActivationFakeQuant`](crate::ActivationFakeQuant) each), with fresh observers; see
    /// [`crate::fake_quant`]. Meant for a float32 network in its deployed form (no batch
    /// norm). [`Error::InvalidAveraging`](crate::Error::InvalidAveraging) for an averaging
    /// outside (0, 1].
    pub fn enable_fake_quant(&mut self, config: FakeQuantConfig) -> Result<()> {
        let layers = self
            .spec
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| matches!(l, LayerSpec::Conv2d { .. } | LayerSpec::Linear { .. }))
            .map(|(i, _)| i);
        self.fake_quant = Some(NetworkFakeQuant::new(config, layers)?);
        Ok(())
    }

    /// Turns fake quantization off (the observed ranges are dropped).
    pub fn disable_fake_quant(&mut self) {
        self.fake_quant = None;
    }

    /// The input ranges the fake-quantization observers hold, by layer index (empty when
    /// fake quantization is off or nothing was observed yet).
    pub fn activation_ranges(&self) -> Vec<ActivationRange> {
        self.fake_quant
            .as_ref()
            .map_or_else(Vec::new, NetworkFakeQuant::ranges)
    }

    /// Whether fake quantization is on and its observers have frozen.
    pub fn observers_frozen(&self) -> bool {
        self.fake_quant
            .as_ref()
            .is_some_and(NetworkFakeQuant::frozen)
    }

    /// The forward pass, with an error where LibTorch or a building block refuses the input
    /// (wrong shape or element type, another device).
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_inner(xs, train, &mut |_, _| {})
    }

    /// The logits of `xs` and the input of every `conv2d` and `linear` layer with the layer's
    /// index, with gradients: what hint (feature) distillation reads. Fails where
    /// [`Network::f_forward_t`] does.
    pub fn forward_with_inputs(
        &self,
        xs: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Vec<(usize, Tensor)>)> {
        let mut inputs = Vec::new();
        let logits = self.forward_inner(xs, train, &mut |index, x| {
            inputs.push((index, x.shallow_clone()));
        })?;
        Ok((logits, inputs))
    }

    /// Runs `xs` through the network in eval mode, without gradients, and taps the input of
    /// every `conv2d` and `linear` layer on `calibrator`, named by the layer's index (`"0"`,
    /// `"3"`, ...: the prefix of its variables). Calibration of a network is this, batch after
    /// batch, then [`Calibrator::into_qparams`].
    pub fn calibrate(&self, xs: &Tensor, calibrator: &mut Calibrator) -> Result<()> {
        let _logits = tch::no_grad(|| {
            self.forward_inner(xs, false, &mut |index, x| {
                calibrator.tap(&index.to_string(), x);
            })
        })?;
        Ok(())
    }

    /// Runs `xs` through the network in eval mode, without gradients, and returns the input
    /// of every `conv2d` and `linear` layer (as float32) with the layer's index: the tensors
    /// [`Network::calibrate`] taps. Fails where [`Network::f_forward_t`] does.
    pub fn layer_inputs(&self, xs: &Tensor) -> Result<Vec<(usize, Tensor)>> {
        let mut inputs = Vec::new();
        let mut failed = None;
        let _logits = tch::no_grad(|| {
            self.forward_inner(xs, false, &mut |index, x| match x.f_to_kind(Kind::Float) {
                Ok(x) => inputs.push((index, x)),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            })
        })?;
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(inputs),
        }
    }

    /// The description this network was built from.
    pub fn spec(&self) -> &NetworkSpec {
        &self.spec
    }

    /// Number of trainable parameters, counted from the tensors.
    pub fn param_count(&self) -> usize {
        self.parameters().map(Tensor::numel).sum()
    }

    /// Number of parameters that are not exactly zero.
    pub fn nonzero_param_count(&self) -> usize {
        self.parameters()
            .map(|t| usize::try_from(t.count_nonzero(None::<i64>).int64_value(&[])).unwrap_or(0))
            .sum()
    }

    fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.layers.iter().flat_map(|layer| match layer {
            Layer::Conv2d { weight, bias, .. } | Layer::Linear { weight, bias } => {
                vec![weight, bias]
            }
            Layer::BatchNorm2d { bn, .. } => bn.ws.iter().chain(&bn.bs).collect(),
            _ => vec![],
        })
    }
}

impl Network {
    fn forward_inner(
        &self,
        xs: &Tensor,
        train: bool,
        record: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        let policy = self.policy;
        let quantized = |index: usize, xs: &Tensor, w: &Tensor| {
            NetworkFakeQuant::operands(self.fake_quant.as_ref(), index, xs, w, train)
        };
        let mut xs = xs.shallow_clone();
        for (index, layer) in self.layers.iter().enumerate() {
            if matches!(layer, Layer::Conv2d { .. } | Layer::Linear { .. }) {
                record(index, &xs);
            }
            xs = match layer {
                Layer::Conv2d {
                    weight,
                    bias,
                    stride,
                    padding,
                } => {
                    let (x, w) = quantized(index, &xs, weight)?;
                    let options = Conv2dOptions {
                        channels_last: true,
                        ..Conv2dOptions::square(*stride, *padding)
                    };
                    layers::conv2d(policy, &x, &w, Some(bias), options)?
                }
                Layer::Linear { weight, bias } => {
                    let (x, w) = quantized(index, &xs, weight)?;
                    layers::linear(policy, &x, &w, Some(bias))?
                }
                Layer::BatchNorm2d { bn, eps } => batch_norm(bn, *eps, &xs, train)?,
                Layer::Relu => xs.f_relu()?,
                Layer::MaxPool2d { kernel, stride } => {
                    xs.f_max_pool2d([*kernel], [*stride], [0], [1], false)?
                }
                Layer::Flatten => xs.f_flatten(1, -1)?,
                Layer::Dropout { p } => xs.f_dropout(*p, train)?,
            };
        }
        Ok(layers::output(policy, &xs)?)
    }
}

impl ModuleT for Network {
    /// [`Network::f_forward_t`], panicking on its errors.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.f_forward_t(xs, train)
            .unwrap_or_else(|err| panic!("forward pass of {}: {err}", self.spec.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Largest difference between bfloat16-computed and float32 logits, relative to the
    /// largest float32 logit. bfloat16 keeps 8 significant bits (unit roundoff 2^-8 =
    /// 0.4%); the test below measures 0.47% (seed 1), six times below this.
    const BF16_LOGIT_TOLERANCE: f64 = 0.03;
    /// The same for float16 (unit roundoff 2^-11): measured 0.049%, ten times below.
    const F16_LOGIT_TOLERANCE: f64 = 0.005;

    fn relative_logit_difference(a: &Tensor, b: &Tensor) -> f64 {
        let diff = (a - b).abs().max().double_value(&[]);
        diff / b.abs().max().double_value(&[])
    }

    #[test]
    fn variables_are_named_like_a_pytorch_sequential() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::new(&vs.root(), &NetworkSpec::teacher_cnn()).unwrap();
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "0.bias",
                "0.weight",
                "1.bias",
                "1.running_mean",
                "1.running_var",
                "1.weight",
                "10.bias",
                "10.weight",
                "13.bias",
                "13.weight",
                "4.bias",
                "4.weight",
                "5.bias",
                "5.running_mean",
                "5.running_var",
                "5.weight",
            ]
        );
        assert_eq!(net.param_count(), NetworkSpec::teacher_cnn().param_count());
    }

    #[test]
    fn glorot_uniform_draws_within_keras_bounds_and_zeroes_biases() {
        tch::manual_seed(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let spec = NetworkSpec::student_cnn();
        let net = Network::with_init(
            &vs.root(),
            &spec,
            Policy::Float32,
            Initializer::GlorotUniform,
        )
        .unwrap();
        assert_eq!(net.param_count(), spec.param_count());
        let variables = vs.variables();
        // (layer, fan_in, fan_out) of the student's convolutions and dense layers.
        for (layer, fan_in, fan_out) in [
            (0, 9, 8 * 9),
            (4, 8 * 9, 16 * 9),
            (9, 400, 32),
            (11, 32, 10),
        ] {
            let bound = (6.0 / f64::from(fan_in + fan_out)).sqrt();
            let largest = variables[&format!("{layer}.weight")]
                .abs()
                .max()
                .double_value(&[]);
            // At least 72 uniform draws per layer: the largest stays below 0.8 of the
            // bound with probability 0.8^72 < 1e-6.
            assert!(largest <= bound, "{layer}: {largest} > {bound}");
            assert!(largest > 0.8 * bound, "{layer}: {largest} <= 0.8 * {bound}");
            let bias = &variables[&format!("{layer}.bias")];
            assert_eq!(bias.abs().max().double_value(&[]), 0.0, "{layer}");
        }
        // Batch norm starts as the identity.
        assert_eq!(variables["1.weight"].min().double_value(&[]), 1.0);
        assert_eq!(variables["5.weight"].min().double_value(&[]), 1.0);
        assert_eq!(variables["1.bias"].abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn the_default_initializer_is_torch() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _net = Network::new(&vs.root(), &NetworkSpec::student_cnn()).unwrap();
        let variables = vs.variables();
        // Kaiming-uniform with the ReLU gain: the first convolution (fan_in 9) draws in
        // ±sqrt(6/9), three times Glorot's bound; all 72 within a third has odds 3^-72.
        let largest = variables["0.weight"].abs().max().double_value(&[]);
        let bound = (6.0f64 / 9.0).sqrt();
        assert!(largest <= bound && largest > bound / 3.0, "{largest}");
        assert_eq!(variables["0.bias"].abs().max().double_value(&[]), 0.0);
        // tch draws dense biases in ±1/sqrt(fan_in), fan_in 400 here.
        let largest = variables["9.bias"].abs().max().double_value(&[]);
        assert!(largest > 0.0 && largest <= 1.0 / 20.0, "{largest}");
        // And batch-norm scales in [0, 1).
        let scale = &variables["5.weight"];
        assert!(scale.min().double_value(&[]) >= 0.0);
        assert!(scale.max().double_value(&[]) < 1.0);
    }

    #[test]
    fn dropout_only_acts_in_training() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::new(&vs.root(), &NetworkSpec::teacher_cnn()).unwrap();
        let xs = Tensor::randn([4, 1, 28, 28], (Kind::Float, Device::Cpu));
        let a = net.forward_t(&xs, false);
        let b = net.forward_t(&xs, false);
        assert!(a.equal(&b));
        let c = net.forward_t(&xs, true);
        assert!(!a.equal(&c));
    }

    #[test]
    fn zeroed_weights_are_not_counted_as_nonzero() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::new(&vs.root(), &NetworkSpec::teacher_cnn()).unwrap();
        // tch initialises convolution biases to zero, so count before zeroing.
        let before = net.nonzero_param_count();
        assert!(before < net.param_count());
        tch::no_grad(|| {
            let mut weight = vs.variables()["10.weight"].shallow_clone();
            let _ = weight.zero_();
        });
        assert_eq!(net.nonzero_param_count(), before - 1600 * 128);
    }

    #[test]
    fn mixed_policies_match_float32_within_tolerance_and_return_float32() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut net = Network::new(&vs.root(), &NetworkSpec::teacher_cnn()).unwrap();
        assert_eq!(net.policy(), Policy::Float32);
        let xs = Tensor::randn([8, 1, 28, 28], (Kind::Float, Device::Cpu));
        let reference = net.forward_t(&xs, false);
        for (policy, tolerance) in [
            (Policy::MixedBfloat16, BF16_LOGIT_TOLERANCE),
            (Policy::MixedFloat16, F16_LOGIT_TOLERANCE),
        ] {
            net.set_policy(policy);
            let logits = net.forward_t(&xs, false);
            assert_eq!(logits.kind(), Kind::Float, "{policy}");
            let difference = relative_logit_difference(&logits, &reference);
            assert!(difference > 0.0, "{policy} computed in float32");
            assert!(difference < tolerance, "{policy}: {difference}");
        }
        net.set_policy(Policy::Float32);
        assert!(net.forward_t(&xs, false).equal(&reference));
    }

    #[test]
    fn with_policy_float32_is_new() {
        let a = nn::VarStore::new(Device::Cpu);
        let net_a = Network::new(&a.root(), &NetworkSpec::teacher_cnn()).unwrap();
        let mut b = nn::VarStore::new(Device::Cpu);
        let net_b =
            Network::with_policy(&b.root(), &NetworkSpec::teacher_cnn(), Policy::Float32).unwrap();
        // Same weights (copying rather than re-seeding: tests share the global generator).
        b.copy(&a).unwrap();
        let xs = Tensor::randn([2, 1, 28, 28], (Kind::Float, Device::Cpu));
        assert!(
            net_a
                .forward_t(&xs, false)
                .equal(&net_b.forward_t(&xs, false))
        );
    }

    #[test]
    fn mixed_training_keeps_float32_variables_and_gradients() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::with_policy(
            &vs.root(),
            &NetworkSpec::teacher_cnn(),
            Policy::MixedBfloat16,
        )
        .unwrap();
        let xs = Tensor::randn([4, 1, 28, 28], (Kind::Float, Device::Cpu));
        let ys = Tensor::from_slice(&[0i64, 1, 2, 3]);
        // Training mode: dropout runs on the bfloat16 activations.
        let loss = net.forward_t(&xs, true).cross_entropy_for_logits(&ys);
        assert_eq!(loss.kind(), Kind::Float);
        loss.backward();
        for (name, var) in vs.variables() {
            assert_eq!(var.kind(), Kind::Float, "{name}");
            if name.contains("running_") {
                // Batch-norm statistics are buffers, not trained.
                assert!(!var.requires_grad(), "{name}");
                continue;
            }
            let grad = var.grad();
            assert!(grad.defined(), "{name} has no gradient");
            assert_eq!(grad.kind(), Kind::Float, "{name}");
            assert!(
                grad.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{name}"
            );
        }
    }

    /// The casts are ordinary tensor operations, so the policy works on CUDA as on the
    /// CPU; run only where a GPU is present (tests never need one).
    #[test]
    fn mixed_policy_runs_on_cuda_when_available() {
        if !tch::Cuda::is_available() {
            return;
        }
        let vs = nn::VarStore::new(Device::Cuda(0));
        let net = Network::with_policy(
            &vs.root(),
            &NetworkSpec::teacher_cnn(),
            Policy::MixedFloat16,
        )
        .unwrap();
        let xs = Tensor::randn([2, 1, 28, 28], (Kind::Float, Device::Cuda(0)));
        let logits = net.forward_t(&xs, true);
        assert_eq!(logits.kind(), Kind::Float);
        logits.sum(Kind::Float).backward();
        for (name, var) in vs.variables() {
            assert_eq!(var.grad().kind(), Kind::Float, "{name}");
        }
    }
}
