//! Fake quantization against the runtime's full-integer execution of the exported model.

use models::export::{self, WeightFormat};
use models::{FakeQuantConfig, Network, NetworkSpec};
use ndarray::Array4;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Largest difference between the fake-quantized tch logits and the runtime's full-integer
/// logits, relative to the largest logit. Both round the same values to the same grids; they
/// differ where a value sits within float rounding of a rounding boundary (LibTorch multiplies
/// by the inverse scale, the runtime requantizes the integer accumulator with an f32
/// multiplier) and by the runtime's i32 bias, so a few codes move by one step.
const STATIC_LOGIT_TOLERANCE: f32 = 0.02;

fn images(n: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    // Roughly MNIST-like: mostly background, positive strokes.
    (Tensor::rand([n, 1, 28, 28], (Kind::Float, Device::Cpu)) * 3.0 - 0.6).relu() - 0.42
}

fn deployed_student(seed: i64) -> (nn::VarStore, Network) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Network::new(&vs.root(), &NetworkSpec::student_cnn().without_batch_norm()).unwrap();
    (vs, net)
}

fn as_array(xs: &Tensor) -> Array4<f32> {
    let shape: Vec<usize> = xs.size().iter().map(|&d| d as usize).collect();
    let data = Vec::<f32>::try_from(&xs.contiguous().view([-1])).unwrap();
    Array4::from_shape_vec((shape[0], shape[1], shape[2], shape[3]), data).unwrap()
}

fn static_artifact(net: &Network, vs: &nn::VarStore) -> runtime::Model {
    let mut builder = export::artifact(net, vs, WeightFormat::Int8DynamicRange).unwrap();
    for range in net.activation_ranges() {
        builder.set_input_quantization(range.layer, range.qparams());
    }
    runtime::Model::from_bytes(&builder.to_bytes().unwrap()).unwrap()
}

#[test]
fn observers_average_then_freeze() {
    let (_vs, mut net) = deployed_student(1);
    net.enable_fake_quant(FakeQuantConfig {
        observer_steps: 3,
        averaging: 0.5,
    })
    .unwrap();
    assert!(net.activation_ranges().is_empty());
    let mut history = Vec::new();
    for step in 0..5 {
        let _ = net.forward_t(&(images(8, step) * (step + 1) as f64), true);
        history.push(net.activation_ranges()[0]);
    }
    // The first layer sees the images: the first batch sets the range, the next two move it.
    assert_ne!(history[0], history[1]);
    assert_ne!(history[1], history[2]);
    assert!(net.observers_frozen());
    assert_eq!(history[2], history[3]);
    assert_eq!(history[3], history[4]);
    // Eval passes never move an observer.
    let before = net.activation_ranges();
    let _ = net.forward_t(&(images(8, 9) * 100.0), false);
    assert_eq!(before, net.activation_ranges());
}

#[test]
fn gradients_pass_straight_through_the_rounding() {
    let (vs, mut net) = deployed_student(2);
    net.enable_fake_quant(FakeQuantConfig::default()).unwrap();
    let xs = images(16, 3);
    let ys = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5]);
    let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
    let loss = net.forward_t(&xs, true).cross_entropy_for_logits(&ys);
    opt.zero_grad();
    loss.backward();
    for (name, var) in vs.variables() {
        let grad = var.grad();
        assert!(grad.defined(), "{name} has no gradient");
        assert!(
            grad.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name}: zero gradient"
        );
    }
}

#[test]
fn the_exported_static_model_computes_what_fake_quantization_trained() {
    let (vs, mut net) = deployed_student(4);
    net.enable_fake_quant(FakeQuantConfig {
        observer_steps: 4,
        averaging: 0.1,
    })
    .unwrap();
    for step in 0..4 {
        let _ = net.forward_t(&images(32, 10 + step), true);
    }
    let model = static_artifact(&net, &vs);
    assert!(
        model
            .execution()
            .iter()
            .all(|(_, e)| matches!(e, runtime::Execution::Int8Static { .. })),
        "{:?}",
        model.execution()
    );
    let xs = images(64, 99);
    let expected = tch::no_grad(|| net.forward_t(&xs, false));
    let expected = Vec::<f32>::try_from(&expected.view([-1])).unwrap();
    let got = model.run(as_array(&xs).view()).unwrap();
    let got = got.as_slice().unwrap();
    let top = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&expected)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / top;
    assert!(
        worst < STATIC_LOGIT_TOLERANCE,
        "relative difference {worst}"
    );
    // And without fake quantization the float model differs by more than that: the test
    // would notice if the runtime ignored the quantization.
    net.disable_fake_quant();
    let float = tch::no_grad(|| net.forward_t(&xs, false));
    let float = Vec::<f32>::try_from(&float.view([-1])).unwrap();
    let float_gap = float
        .iter()
        .zip(&expected)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / top;
    assert!(float_gap > worst, "float {float_gap} vs static {worst}");
}

#[test]
fn fake_quantized_weights_are_the_exported_int8_weights() {
    let (vs, mut net) = deployed_student(5);
    net.enable_fake_quant(FakeQuantConfig::default()).unwrap();
    let params = export::deployed_parameters(&net, &vs).unwrap();
    let weight = &params[0];
    let rows = weight.shape[0];
    let exported = quantization::quantize_weights(
        &weight.data,
        rows,
        quantization::Granularity::PerChannel,
        quantization::BitWidth::INT8,
    )
    .unwrap();
    let dequantized = exported.dequantize();
    let w = vs.variables()["0.weight"].shallow_clone();
    let fq = models::fake_quant::weight(&w).unwrap();
    let fq = Vec::<f32>::try_from(&fq.view([-1])).unwrap();
    assert_eq!(fq, dequantized);
}

#[test]
fn layer_inputs_are_what_each_quantized_layer_receives() {
    let (_vs, net) = deployed_student(6);
    let xs = images(4, 1);
    let inputs = net.layer_inputs(&xs).unwrap();
    let layers: Vec<usize> = inputs.iter().map(|(i, _)| *i).collect();
    assert_eq!(layers, [0, 3, 7, 9]);
    assert!(inputs[0].1.equal(&xs));
    // After ReLU and pooling the later inputs are non-negative.
    for (_, x) in &inputs[1..] {
        assert!(x.min().double_value(&[]) >= 0.0);
    }
    assert_eq!(inputs[2].1.size(), [4, 16 * 5 * 5]);
    assert_eq!(inputs[3].1.size()[0], 4);
}
