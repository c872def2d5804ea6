//! A model of one's own (a plain-tch two-layer MLP, no `Network`) trained with the public
//! building blocks: under mixed_bfloat16, and quantization-aware with the fake quantizers.

use models::fake_quant::{self, ActivationFakeQuant};
use models::{Calibrator, FakeQuantConfig};
use quantization::{BitWidth, Method};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tensor_precision::{Policy, layers};

/// Largest distance of a fake-quantized weight from `scale * code`, in units of its scale:
/// LibTorch rounds `w * (1 / scale)` and multiplies back, so the value it returns can differ
/// from `scale * code` by float rounding of that product.
const MAX_GRID_DISTANCE: f64 = 1e-4;

/// The user's own model: `fc0.weight`, `fc0.bias`, `fc1.weight`, `fc1.bias`.
struct Mlp {
    fc0: nn::Linear,
    fc1: nn::Linear,
    /// One input quantizer per layer, present when training quantization-aware.
    inputs: Option<[ActivationFakeQuant; 2]>,
}

impl Mlp {
    fn new(vs: &nn::VarStore) -> Self {
        let root = vs.root();
        Self {
            fc0: nn::linear(&root / "fc0", 20, 32, Default::default()),
            fc1: nn::linear(&root / "fc1", 32, 4, Default::default()),
            inputs: None,
        }
    }

    fn layers(&self) -> [&nn::Linear; 2] {
        [&self.fc0, &self.fc1]
    }

    /// The logits under `policy`, fake-quantized when the quantizers are on; taps each
    /// layer's input when calibrating.
    fn forward(
        &self,
        xs: &Tensor,
        policy: Policy,
        train: bool,
        mut taps: Option<&mut Calibrator>,
    ) -> models::Result<Tensor> {
        let mut x = xs.shallow_clone();
        for (i, layer) in self.layers().into_iter().enumerate() {
            if let Some(taps) = taps.as_deref_mut() {
                taps.tap(&format!("fc{i}"), &x);
            }
            let (input, weight) = match &self.inputs {
                None => (x.shallow_clone(), layer.ws.shallow_clone()),
                Some(quantizers) => (
                    quantizers[i].forward_t(&x, train)?,
                    fake_quant::weight(&layer.ws)?,
                ),
            };
            x = layers::linear(policy, &input, &weight, layer.bs.as_ref())?;
            if i == 0 {
                x = x.relu();
            }
        }
        Ok(layers::output(policy, &x)?)
    }
}

fn data(seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let xs = Tensor::randn([64, 20], (Kind::Float, Device::Cpu));
    // A learnable target: the sign pattern of two coordinates.
    let ys = (xs.select(1, 0).gt(0.0).to_kind(Kind::Int64) * 2)
        + xs.select(1, 1).gt(0.0).to_kind(Kind::Int64);
    (xs, ys)
}

fn train_steps(mlp: &Mlp, vs: &nn::VarStore, policy: Policy, steps: usize) -> Vec<f64> {
    let (xs, ys) = data(7);
    let mut opt = nn::Adam::default().build(vs, 1e-2).unwrap();
    (0..steps)
        .map(|_| {
            let logits = mlp.forward(&xs, policy, true, None).unwrap();
            assert_eq!(logits.kind(), Kind::Float);
            let loss = logits.cross_entropy_for_logits(&ys);
            opt.zero_grad();
            loss.backward();
            for (name, var) in vs.variables() {
                let grad = var.grad();
                assert_eq!(var.kind(), Kind::Float, "{name}");
                assert_eq!(grad.kind(), Kind::Float, "{name}");
                assert!(
                    grad.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                    "{name}: zero gradient"
                );
            }
            opt.step();
            loss.double_value(&[])
        })
        .collect()
}

#[test]
fn a_plain_mlp_trains_under_mixed_bfloat16_with_float32_variables_and_gradients() {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = Mlp::new(&vs);
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    assert_eq!(names, ["fc0.bias", "fc0.weight", "fc1.bias", "fc1.weight"]);
    // Casting only the input would make LibTorch refuse the float32 weight: an error here.
    let (xs, _) = data(7);
    let bf16 = xs.to_kind(Kind::BFloat16);
    assert!(layers::linear(Policy::Float32, &bf16, &mlp.fc0.ws, mlp.fc0.bs.as_ref()).is_err());

    let losses = train_steps(&mlp, &vs, Policy::MixedBfloat16, 30);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(
        losses.last().unwrap() < &(losses[0] * 0.8),
        "the loss did not fall: {losses:?}"
    );
}

#[test]
fn a_plain_mlp_trains_quantization_aware_on_the_int8_grids() {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut mlp = Mlp::new(&vs);

    // Calibration of the user's forward pass: one observer per tap.
    let mut taps = Calibrator::new();
    tch::no_grad(|| {
        for seed in 0..3 {
            let (xs, _) = data(seed);
            let _logits = mlp
                .forward(&xs, Policy::Float32, false, Some(&mut taps))
                .unwrap();
        }
    });
    let calibrated = taps.into_qparams(Method::MinMax, BitWidth::INT8).unwrap();
    let names: Vec<&str> = calibrated.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["fc0", "fc1"]);
    assert_eq!(calibrated[1].1.zero_point, 0, "ReLU output: non-negative");

    let config = FakeQuantConfig {
        observer_steps: 3,
        averaging: 0.1,
    };
    mlp.inputs = Some([
        ActivationFakeQuant::new(config).unwrap(),
        ActivationFakeQuant::new(config).unwrap(),
    ]);
    let losses = train_steps(&mlp, &vs, Policy::Float32, 6);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let quantizers = mlp.inputs.as_ref().unwrap();
    for q in quantizers {
        assert!(q.frozen());
        assert_eq!(q.steps(), 6);
    }
    // Frozen: more training leaves the grids where they are.
    let grids: Vec<_> = quantizers.iter().map(|q| q.qparams().unwrap()).collect();
    let _ = train_steps(&mlp, &vs, Policy::Float32, 2);
    let after: Vec<_> = quantizers.iter().map(|q| q.qparams().unwrap()).collect();
    assert_eq!(grids, after);

    // Every fake-quantized weight is scale * code for an integer code in -127..=127.
    for layer in mlp.layers() {
        let params = fake_quant::weight_qparams(&layer.ws).unwrap();
        let fq = fake_quant::weight(&layer.ws).unwrap();
        let rows = Vec::<Vec<f32>>::try_from(&fq).unwrap();
        assert_eq!(rows.len(), params.len());
        for (row, p) in rows.iter().zip(&params) {
            assert_eq!(p.zero_point, 0);
            for &value in row {
                let code = f64::from(value) / f64::from(p.scale);
                let rounded = code.round();
                assert!((-127.0..=127.0).contains(&rounded), "code {code}");
                assert!(
                    (code - rounded).abs() < MAX_GRID_DISTANCE,
                    "{value} is not on the grid of scale {}",
                    p.scale
                );
            }
            // The largest weight of the row sits at the end of the grid.
            let top = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!((f64::from(top / p.scale) - 127.0).abs() < MAX_GRID_DISTANCE);
        }
    }
}
