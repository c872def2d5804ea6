//! The scaler in real tch loops: invariants under random finite and non-finite steps,
//! agreement with LibTorch's own scale update, resumption from JSON, clipping, errors,
//! and a float16 model that only learns with loss scaling.

use loss_scaling::{DynamicConfig, Error, LossScaleConfig, LossScaler, ScalePoint};
use models::{LayerSpec, Network, NetworkSpec, Policy};
use proptest::prelude::*;
use tch::nn::{self, Module, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

/// The bits of every variable, for bit-for-bit comparisons.
fn weight_bits(vs: &nn::VarStore) -> Vec<(String, Vec<i32>)> {
    let mut vars: Vec<_> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| {
            let bits = Vec::<i32>::try_from(t.detach().view_dtype(Kind::Int).view([-1])).unwrap();
            (name, bits)
        })
        .collect();
    vars.sort();
    vars
}

/// Input of step `index`: deterministic, or with an infinity when `poisoned`.
fn step_input(index: usize, poisoned: bool) -> Tensor {
    let values: Vec<f32> = (0..12)
        .map(|i| ((index * 12 + i) as f32 * 0.7).sin())
        .collect();
    let xs = Tensor::from_slice(&values).view([4, 3]);
    if poisoned {
        let _ = xs.get(0).get(0).fill_(f64::INFINITY);
    }
    xs
}

struct Run {
    vs: nn::VarStore,
    model: nn::Linear,
    optimizer: nn::Optimizer,
    scaler: LossScaler,
}

impl Run {
    /// A run whose weights are copied from `weights` when given (not re-seeded: tests
    /// running in parallel share LibTorch's global generator).
    fn new(config: DynamicConfig, adam: bool, weights: Option<&nn::VarStore>) -> Self {
        let mut vs = nn::VarStore::new(CPU);
        let model = nn::linear(vs.root(), 3, 2, Default::default());
        if let Some(weights) = weights {
            vs.copy(weights).unwrap();
        }
        let optimizer = if adam {
            nn::Adam::default().build(&vs, 1e-2).unwrap()
        } else {
            nn::Sgd {
                momentum: 0.9,
                ..Default::default()
            }
            .build(&vs, 1e-2)
            .unwrap()
        };
        Self {
            vs,
            model,
            optimizer,
            scaler: LossScaler::dynamic(config).unwrap(),
        }
    }

    fn step(&mut self, xs: &Tensor) -> loss_scaling::StepOutcome {
        self.optimizer.zero_grad();
        let loss = self.model.forward(xs).square().mean(Kind::Float);
        self.scaler.scale(&loss).backward();
        self.scaler.step(&mut self.optimizer).unwrap()
    }
}

fn small_config() -> impl Strategy<Value = DynamicConfig> {
    (0i32..=12, 1u32..=4, -2i32..=4, 8i32..=16).prop_map(|(initial, interval, lo, hi)| {
        let min_scale = 2f32.powi(lo);
        let max_scale = 2f32.powi(hi);
        DynamicConfig {
            initial_scale: 2f32.powi(initial).clamp(min_scale, max_scale),
            growth_interval: interval,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            min_scale,
            max_scale,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Scale within bounds, backoff on every non-finite step, growth exactly after the
    /// interval, counters, and weights untouched bit for bit on skipped steps. The
    /// optimizer state is checked through a twin run that only sees the finite steps:
    /// with power-of-two scales unscaling is exact, so if a skipped step touched Adam's
    /// moments or step count (or SGD's momentum), the twins' weights would differ.
    #[test]
    fn dynamic_scaler_invariants_hold_on_random_step_sequences(
        config in small_config(),
        finite in prop::collection::vec(prop::bool::weighted(0.7), 1..30),
        adam in any::<bool>(),
    ) {
        let mut run = Run::new(config, adam, None);
        let mut twin = Run::new(config, adam, Some(&run.vs));
        let (mut expected_scale, mut tracker) = (config.initial_scale, 0u32);
        for (index, &is_finite) in finite.iter().enumerate() {
            let before = weight_bits(&run.vs);
            let xs = step_input(index, !is_finite);
            let outcome = run.step(&xs);
            prop_assert_eq!(outcome.skipped, !is_finite);
            prop_assert_eq!(outcome.scale, expected_scale);
            if is_finite {
                twin.step(&xs);
                tracker += 1;
                if tracker == config.growth_interval {
                    expected_scale = (expected_scale * 2.0).min(config.max_scale);
                    tracker = 0;
                }
            } else {
                prop_assert_eq!(weight_bits(&run.vs), before, "a skipped step changed a weight");
                expected_scale = (expected_scale / 2.0).max(config.min_scale);
                tracker = 0;
            }
            // Exact: powers of two, clamped to powers of two.
            let scale = run.scaler.current_scale();
            prop_assert_eq!(scale, expected_scale);
            prop_assert!(config.min_scale <= scale && scale <= config.max_scale);
            prop_assert_eq!(run.scaler.growth_tracker(), tracker);
        }
        let skipped = finite.iter().filter(|f| !**f).count() as u64;
        prop_assert_eq!(run.scaler.steps(), finite.len() as u64);
        prop_assert_eq!(run.scaler.skipped_steps(), skipped);
        prop_assert_eq!(weight_bits(&run.vs), weight_bits(&twin.vs));
        // The history starts at the initial scale and records each change.
        let history = run.scaler.history();
        prop_assert_eq!(history[0], ScalePoint { step: 0, scale: config.initial_scale });
        prop_assert_eq!(history.last().unwrap().scale, run.scaler.current_scale());
        prop_assert!(history.windows(2).all(|w| w[0].step < w[1].step && w[0].scale != w[1].scale));
    }

    /// Without bounds in the way, the scale follows LibTorch's own `_amp_update_scale_`
    /// (the kernel behind PyTorch's `GradScaler.update`) step for step.
    #[test]
    fn scale_updates_match_libtorch_amp_update_scale(
        interval in 1u32..=5,
        finite in prop::collection::vec(prop::bool::weighted(0.8), 1..40),
    ) {
        let config = DynamicConfig { growth_interval: interval, ..DynamicConfig::pytorch() };
        let mut scaler = LossScaler::dynamic(config).unwrap();
        let mut torch_scale = Tensor::from_slice(&[config.initial_scale]);
        let tracker = Tensor::zeros([1], (Kind::Int, CPU));
        let var = Tensor::ones([3], (Kind::Float, CPU)).set_requires_grad(true);
        for &is_finite in &finite {
            let _ = var.grad().defined().then(|| var.grad().zero_());
            let g = if is_finite { 1.0 } else { f64::NAN };
            (&var * g).sum(Kind::Float).backward();
            let outcome = scaler.step_with(std::slice::from_ref(&var), || ()).unwrap();
            let found_inf = Tensor::from_slice(&[if outcome.skipped { 1f32 } else { 0.0 }]);
            let _ = torch_scale.internal_amp_update_scale_(
                &tracker, &found_inf, config.growth_factor, config.backoff_factor,
                i64::from(interval),
            );
            prop_assert_eq!(outcome.skipped, !is_finite);
            prop_assert_eq!(scaler.current_scale(), torch_scale.double_value(&[0]) as f32);
            prop_assert_eq!(i64::from(scaler.growth_tracker()), tracker.int64_value(&[0]));
        }
    }
}

#[test]
fn a_resumed_scaler_continues_exactly_where_it_stopped() {
    let config = DynamicConfig {
        growth_interval: 3,
        ..DynamicConfig::keras()
    };
    let mut run = Run::new(config, true, None);
    run.scaler = run.scaler.clone().with_grad_clipping(10.0).unwrap();
    let pattern = [true, true, false, true, true, true, true, false, true];
    for (index, &finite) in pattern.iter().enumerate() {
        run.step(&step_input(index, !finite));
    }
    let json = run.scaler.to_json().unwrap();
    let mut resumed = LossScaler::from_json(&json).unwrap();
    assert_eq!(resumed, run.scaler);
    assert_eq!(resumed.steps(), 9);
    assert_eq!(resumed.skipped_steps(), 2);
    assert_eq!(resumed.growth_tracker(), 1);
    // Both continue identically.
    let var = Tensor::ones([2], (Kind::Float, CPU)).set_requires_grad(true);
    for &finite in &[true, true, false, true] {
        for scaler in [&mut run.scaler, &mut resumed] {
            let _ = var.grad().defined().then(|| var.grad().zero_());
            let g = if finite { 1.0 } else { f64::INFINITY };
            (&var * g).sum(Kind::Float).backward();
            scaler.step_with(std::slice::from_ref(&var), || ()).unwrap();
        }
        assert_eq!(resumed, run.scaler);
    }
}

#[test]
fn corrupt_or_inconsistent_states_are_rejected() {
    let scaler = LossScaler::dynamic(DynamicConfig {
        growth_interval: 4,
        ..DynamicConfig::keras()
    })
    .unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&scaler.to_json().unwrap()).unwrap();
    json["scale"] = serde_json::json!(0.25);
    let err = LossScaler::from_json(&json.to_string()).unwrap_err();
    assert!(
        err.to_string()
            .contains("scale 0.25 lies outside [1, 340282350000000000000000000000000000000]"),
        "{err}"
    );
    json["scale"] = serde_json::json!(1024.0);
    json["growth_tracker"] = serde_json::json!(4);
    let err = LossScaler::from_json(&json.to_string()).unwrap_err();
    assert!(
        err.to_string()
            .contains("growth counter 4 must be below the growth interval 4"),
        "{err}"
    );
    json["growth_tracker"] = serde_json::json!(0);
    json["config"]["backoff_factor"] = serde_json::json!(2.0);
    assert!(matches!(
        LossScaler::from_json(&json.to_string()),
        Err(Error::Json(_))
    ));
}

/// Tolerance of the clipped norm: the clip coefficient divides by norm + 1e-6.
const CLIPPED_NORM_TOLERANCE: f64 = 1e-4;

#[test]
fn clipping_acts_on_the_unscaled_gradients() {
    let mut scaler = LossScaler::fixed(1024.0)
        .unwrap()
        .with_grad_clipping(1.0)
        .unwrap();
    let var = Tensor::ones([4], (Kind::Float, CPU)).set_requires_grad(true);
    // Unscaled gradient: 3 per element, norm 6; scaled by 1024 before unscaling.
    scaler.scale(&(&var * 3.0).sum(Kind::Float)).backward();
    let outcome = scaler.step_with(std::slice::from_ref(&var), || ()).unwrap();
    let norm = outcome.grad_norm.unwrap();
    assert!((norm - 6.0).abs() < CLIPPED_NORM_TOLERANCE, "{norm}");
    let clipped = var.grad().norm().double_value(&[]);
    assert!((clipped - 1.0).abs() < CLIPPED_NORM_TOLERANCE, "{clipped}");
    // A fixed scale never changes, but non-finite steps are still skipped.
    assert_eq!(outcome.next_scale, 1024.0);
    assert!(matches!(
        LossScaler::default().with_grad_clipping(0.0),
        Err(Error::InvalidClipNorm(_))
    ));
}

#[test]
fn half_precision_gradients_and_integer_losses_are_errors() {
    let scaler = LossScaler::default();
    let var = Tensor::ones([2], (Kind::Half, CPU)).set_requires_grad(true);
    (&var * 2.0).sum(Kind::Half).backward();
    let before = var.grad().copy();
    let err = loss_scaling::unscale_grads(std::slice::from_ref(&var), 4.0).unwrap_err();
    assert!(matches!(
        err,
        Error::UnsupportedGradient { kind: Kind::Half }
    ));
    assert!(
        var.grad().equal(&before),
        "an error must leave the gradients alone"
    );
    let err = scaler.f_scale(&Tensor::from_slice(&[1i64])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot scale a loss of kind Int64: expected a floating-point tensor"
    );
    // A float16 loss is widened before scaling, so that 2^15 * loss cannot overflow.
    let loss = Tensor::from_slice(&[4.0f32]).to_kind(Kind::Half);
    let scaled = scaler.scale(&loss);
    assert_eq!(scaled.kind(), Kind::Float);
    assert_eq!(scaled.double_value(&[0]), 4.0 * 32768.0);
}

/// Weight of the loss in the float16 underflow test: small enough that every gradient
/// reaching the float16 matrix product is below 2^-25 and rounds to zero.
const TINY_LOSS_WEIGHT: f64 = 1e-7;
/// Weight of the loss in the overflow test: at Keras's initial scale 2^15 the output
/// gradients exceed float16's 65504.
const LARGE_LOSS_WEIGHT: f64 = 1e3;
/// Plain SGD learning rate, divided by the loss weight so that a correct gradient makes
/// normal-sized steps.
const BASE_LEARNING_RATE: f64 = 0.1;
/// A scaled run must bring the loss below this fraction of where it started (measured:
/// 15.2 -> 0.097 in 60 steps for the tiny weight).
const REQUIRED_LOSS_REDUCTION: f64 = 0.1;

/// Trains a float16 linear regression (float32 variables, `mixed_float16` policy) for 60
/// SGD steps on a loss multiplied by `loss_weight`; returns the unweighted loss before
/// and after, the variables and the scaler.
fn f16_regression_run(
    loss_weight: f64,
    scaler: Option<LossScaler>,
) -> (f64, f64, nn::VarStore, Option<LossScaler>) {
    tch::manual_seed(11);
    let spec = NetworkSpec {
        name: "f16_regression".into(),
        input: [1, 1, 8],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 8,
                out_features: 4,
            },
        ],
    };
    let vs = nn::VarStore::new(CPU);
    let net = Network::with_policy(&vs.root(), &spec, Policy::MixedFloat16).unwrap();
    let xs = Tensor::randn([64, 1, 1, 8], (Kind::Float, CPU));
    let target_weights = Tensor::randn([4, 8], (Kind::Float, CPU));
    let ys = xs.view([64, 8]).matmul(&target_weights.tr());
    let mse = |net: &Network| {
        let pred = net.forward_t(&xs, true);
        assert_eq!(pred.kind(), Kind::Float);
        (pred - &ys).square().mean(Kind::Float)
    };
    let initial = mse(&net).double_value(&[]);
    let mut optimizer = nn::Sgd::default()
        .build(&vs, BASE_LEARNING_RATE / loss_weight)
        .unwrap();
    let mut scaler = scaler;
    for _ in 0..60 {
        optimizer.zero_grad();
        let loss = mse(&net) * loss_weight;
        match scaler.as_mut() {
            Some(scaler) => {
                scaler.scale(&loss).backward();
                scaler.step(&mut optimizer).unwrap();
            }
            None => {
                loss.backward();
                let grad_sum: f64 = vs
                    .trainable_variables()
                    .iter()
                    .map(|v| v.grad().abs().sum(Kind::Float).double_value(&[]))
                    .sum();
                assert_eq!(grad_sum, 0.0, "the unscaled gradients did not underflow");
                optimizer.step();
            }
        }
    }
    let last = mse(&net).double_value(&[]);
    (initial, last, vs, scaler)
}

#[test]
fn a_float16_model_learns_with_dynamic_loss_scaling_and_not_without() {
    let (initial, unscaled_last, _, _) = f16_regression_run(TINY_LOSS_WEIGHT, None);
    assert_eq!(
        unscaled_last, initial,
        "without scaling every gradient is zero, so nothing moves"
    );

    let (initial, scaled_last, vs, scaler) =
        f16_regression_run(TINY_LOSS_WEIGHT, Some(LossScaler::default()));
    let scaler = scaler.unwrap();
    assert!(
        scaled_last < initial * REQUIRED_LOSS_REDUCTION,
        "loss {initial} -> {scaled_last}"
    );
    assert_eq!(scaler.skipped_steps(), 0);
    for (name, var) in vs.variables() {
        assert_eq!(var.kind(), Kind::Float, "{name}");
    }
}

#[test]
fn a_float16_overflow_backs_off_until_the_gradients_fit() {
    let (initial, last, _, scaler) =
        f16_regression_run(LARGE_LOSS_WEIGHT, Some(LossScaler::default()));
    let scaler = scaler.unwrap();
    assert!(scaler.skipped_steps() > 0);
    assert!(scaler.current_scale() < DynamicConfig::keras().initial_scale);
    // Every change was a halving, one per skipped step (60 steps < 2000: no growth).
    assert_eq!(scaler.history().len() as u64, 1 + scaler.skipped_steps());
    assert!(
        last < initial * REQUIRED_LOSS_REDUCTION,
        "loss {initial} -> {last}"
    );
}

#[test]
fn an_unchanged_config_is_reported() {
    let scaler = LossScaler::fixed(8.0).unwrap();
    assert_eq!(scaler.config(), &LossScaleConfig::Fixed { scale: 8.0 });
    assert_eq!(
        scaler.history(),
        [ScalePoint {
            step: 0,
            scale: 8.0
        }]
    );
}

/// CUDA variant of the fused unscaling, run only where a GPU is present (tests never
/// need one).
#[test]
fn unscaling_works_on_cuda_when_available() {
    if !tch::Cuda::is_available() {
        return;
    }
    let device = Device::Cuda(0);
    let var = Tensor::ones([3], (Kind::Float, device)).set_requires_grad(true);
    (&var * 8.0).sum(Kind::Float).backward();
    assert!(!loss_scaling::unscale_grads(std::slice::from_ref(&var), 4.0).unwrap());
    assert_eq!(
        Vec::<f32>::try_from(var.grad().to_device(CPU)).unwrap(),
        [2.0; 3]
    );
    let _ = var.grad().get(1).fill_(f64::NAN);
    assert!(loss_scaling::unscale_grads(std::slice::from_ref(&var), 4.0).unwrap());
}
