//! The tch loss against the f64 reference: values, gradients, and its invariants.

use distillation::{
    Alpha, DistillationConfig, Distiller, Error, TeacherCache, Temperature, distillation_loss,
    reference,
};
use ndarray::Array2;
use proptest::prelude::*;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Relative agreement between the f64 tch loss and the f64 reference.
const VALUE_TOLERANCE: f64 = 1e-9;
/// Agreement between autograd and central finite differences of the reference.
const GRADIENT_TOLERANCE: f64 = 1e-5;
/// Step of the central finite differences.
const FD_STEP: f64 = 1e-5;

fn config(t: f64, alpha: f64) -> DistillationConfig {
    DistillationConfig::new(Temperature::new(t).unwrap(), Alpha::new(alpha).unwrap())
}

fn tensor(a: &Array2<f64>) -> Tensor {
    let (n, c) = a.dim();
    Tensor::from_slice(a.as_slice().unwrap()).view([n as i64, c as i64])
}

fn labels(l: &[usize]) -> Tensor {
    Tensor::from_slice(&l.iter().map(|&x| x as i64).collect::<Vec<_>>())
}

fn case() -> impl Strategy<Value = (Array2<f64>, Array2<f64>, Vec<usize>, f64, f64)> {
    (1usize..6, 2usize..8).prop_flat_map(|(n, c)| {
        (
            prop::collection::vec(-8.0f64..8.0, n * c),
            prop::collection::vec(-8.0f64..8.0, n * c),
            prop::collection::vec(0..c, n),
            0.5f64..20.0,
            0.0f64..=1.0,
        )
            .prop_map(move |(s, t, l, temp, alpha)| {
                (
                    Array2::from_shape_vec((n, c), s).unwrap(),
                    Array2::from_shape_vec((n, c), t).unwrap(),
                    l,
                    temp,
                    alpha,
                )
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn value_and_gradient_match_the_reference((s, t, l, temp, alpha) in case()) {
        let cfg = config(temp, alpha);
        let student = tensor(&s).set_requires_grad(true);
        let loss = distillation_loss(&student, &tensor(&t), &labels(&l), &cfg).unwrap();
        let expected = reference::loss(s.view(), t.view(), &l, temp, alpha);
        let value = loss.double_value(&[]);
        prop_assert!(value >= 0.0, "loss {value}");
        prop_assert!((value - expected).abs() <= VALUE_TOLERANCE * expected.abs().max(1.0),
            "{value} vs {expected}");

        loss.backward();
        let grad = student.grad();
        for ((i, j), _) in s.indexed_iter() {
            let mut plus = s.clone();
            plus[[i, j]] += FD_STEP;
            let mut minus = s.clone();
            minus[[i, j]] -= FD_STEP;
            let fd = (reference::loss(plus.view(), t.view(), &l, temp, alpha)
                - reference::loss(minus.view(), t.view(), &l, temp, alpha))
                / (2.0 * FD_STEP);
            let g = grad.double_value(&[i as i64, j as i64]);
            prop_assert!((g - fd).abs() <= GRADIENT_TOLERANCE * fd.abs().max(1.0),
                "d/d[{i},{j}]: autograd {g} vs finite differences {fd}");
        }
    }

    #[test]
    fn alpha_one_is_cross_entropy((s, t, l, temp, _) in case()) {
        let loss = distillation_loss(&tensor(&s), &tensor(&t), &labels(&l), &config(temp, 1.0))
            .unwrap()
            .double_value(&[]);
        let ce = tensor(&s).log_softmax(-1, Kind::Double).nll_loss(&labels(&l)).double_value(&[]);
        prop_assert!((loss - ce).abs() <= VALUE_TOLERANCE * ce.abs().max(1.0));
    }
}

#[test]
fn float32_logits_agree_with_the_reference() {
    tch::manual_seed(0);
    let s = Tensor::randn([16, 10], (Kind::Double, Device::Cpu));
    let t = Tensor::randn([16, 10], (Kind::Double, Device::Cpu)) * 3.0;
    let l = Tensor::randint(10, [16], (Kind::Int64, Device::Cpu));
    let cfg = DistillationConfig::default();
    let exact = distillation_loss(&s, &t, &l, &cfg)
        .unwrap()
        .double_value(&[]);
    let single =
        distillation_loss(&s.to_kind(Kind::Float), &t.to_kind(Kind::Float), &l, &cfg).unwrap();
    assert_eq!(single.kind(), Kind::Float);
    assert!((single.double_value(&[]) - exact).abs() < 1e-4 * exact.max(1.0));
}

#[test]
fn settings_and_shapes_are_checked() {
    for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            Temperature::new(t),
            Err(Error::InvalidTemperature(_))
        ));
    }
    for a in [-0.1, 1.1, f64::NAN] {
        assert!(matches!(Alpha::new(a), Err(Error::InvalidAlpha(_))));
    }
    let cfg = DistillationConfig::default();
    assert_eq!(cfg.temperature.get(), 10.0);
    assert_eq!(cfg.alpha.get(), 0.1);
    let opts = (Kind::Float, Device::Cpu);
    let l = Tensor::from_slice(&[0i64, 1]);
    let err = distillation_loss(
        &Tensor::zeros([2, 10], opts),
        &Tensor::zeros([2, 5], opts),
        &l,
        &cfg,
    )
    .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch(_)), "{err}");
    assert!(err.to_string().contains("[2, 5]"), "{err}");
    let err = distillation_loss(
        &Tensor::zeros([2, 10], opts),
        &Tensor::zeros([2, 10], opts),
        &Tensor::from_slice(&[0i64]),
        &cfg,
    )
    .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch(_)), "{err}");
    // A label outside the classes is LibTorch's error, returned rather than a panic.
    let err = distillation_loss(
        &Tensor::zeros([2, 10], opts),
        &Tensor::zeros([2, 10], opts),
        &Tensor::from_slice(&[0i64, 12]),
        &cfg,
    );
    assert!(matches!(err, Err(Error::Torch(_))));
}

#[test]
fn distiller_moves_the_student_towards_the_teacher() {
    tch::manual_seed(1);
    let device = Device::Cpu;
    let teacher_vs = nn::VarStore::new(device);
    let teacher = nn::linear(teacher_vs.root(), 6, 4, Default::default());
    let student_vs = nn::VarStore::new(device);
    let student = nn::linear(student_vs.root(), 6, 4, Default::default());
    let xs = Tensor::randn([64, 6], (Kind::Float, device));
    let ys = teacher.forward(&xs).argmax(-1, false);
    let cfg = config(2.0, 0.0);
    let distiller = Distiller::new(&teacher, &student, cfg);
    let mut opt = nn::Adam::default().build(&student_vs, 0.05).unwrap();

    let cache = TeacherCache::compute(&teacher, &xs, 10);
    assert_eq!(cache.len(), 64);
    let all = Tensor::arange(64, (Kind::Int64, device));
    assert!(
        cache
            .select(&all)
            .allclose(&teacher.forward(&xs), 1e-6, 1e-6, false)
    );

    let first = distiller.step(&mut opt, &xs, &ys).unwrap();
    let mut last = first;
    for _ in 0..200 {
        last = distiller.step(&mut opt, &xs, &ys).unwrap();
    }
    assert!(last < first * 0.1, "loss {first} -> {last}");
    // The cached path gives the same loss as recomputing the teacher.
    let fresh = distiller.loss(&xs, &ys).unwrap().double_value(&[]);
    let cached = distiller
        .loss_with_teacher_logits(&xs, &cache.select(&all), &ys)
        .unwrap()
        .double_value(&[]);
    assert!((fresh - cached).abs() < 1e-6);
}
