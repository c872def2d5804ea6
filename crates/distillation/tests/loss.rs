//! The tch loss against the f64 reference: values, gradients, and its invariants.

use distillation::{
    Alpha, Batch, DistillationConfig, Distiller, Error, TeacherCache, TeacherSource, Temperature,
    distillation_loss, reference,
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
    let cache = TeacherCache::compute(&teacher, &xs, 10).unwrap();
    assert_eq!((cache.len(), cache.classes()), (64, 4));
    let all: Vec<usize> = (0..64).collect();
    assert!(
        cache
            .select(&all)
            .unwrap()
            .allclose(&teacher.forward(&xs), 1e-6, 1e-6, false)
    );

    let live = Distiller::new(TeacherSource::Live(&teacher), &student, cfg);
    let cached = Distiller::new(&cache, &student, cfg);
    let mut opt = nn::Adam::default().build(&student_vs, 0.05).unwrap();
    let batch = Batch::new(&xs, &ys).with_indices(&all);
    let first = live.step(&mut opt, batch).unwrap();
    let mut last = first;
    for step in 0..200 {
        // Alternate the sources: both train the same student.
        last = if step % 2 == 0 {
            cached.step(&mut opt, batch).unwrap()
        } else {
            live.step(&mut opt, batch).unwrap()
        };
    }
    assert!(last < first * 0.1, "loss {first} -> {last}");
    // The cached path gives the same loss as recomputing the teacher.
    let fresh = live.loss(batch).unwrap().double_value(&[]);
    let from_cache = cached.loss(batch).unwrap().double_value(&[]);
    let given = live
        .loss_with_teacher_logits(&xs, &cache.select(&all).unwrap(), &ys)
        .unwrap()
        .double_value(&[]);
    assert!((fresh - from_cache).abs() < CACHED_LOSS_TOLERANCE);
    assert!((fresh - given).abs() < CACHED_LOSS_TOLERANCE);
    let stepped = cached
        .step_with_teacher_logits(&mut opt, &xs, cache.logits(), &ys)
        .unwrap();
    assert!((stepped - from_cache).abs() < CACHED_LOSS_TOLERANCE);
}

/// Agreement between losses against cached and freshly computed teacher logits (the same
/// f32 computation, batched differently).
const CACHED_LOSS_TOLERANCE: f64 = 1e-6;

/// A cache of `n x c` logits from an identity teacher, and the logits themselves.
fn identity_cache(n: usize, c: usize, seed: i64) -> (TeacherCache, Tensor) {
    tch::manual_seed(seed);
    let logits = Tensor::randn([n as i64, c as i64], (Kind::Float, Device::Cpu));
    let identity = nn::func(|x| x.shallow_clone());
    (
        TeacherCache::compute(&identity, &logits, 7).unwrap(),
        logits,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn selection_by_indices_is_the_cache_rows(
        (n, indices) in (1usize..40).prop_flat_map(|n| (Just(n), prop::collection::vec(0..n, 0..60))),
        c in 1usize..12, seed in 0i64..1000,
    ) {
        let (cache, logits) = identity_cache(n, c, seed);
        prop_assert!(cache.logits().equal(&logits));
        let rows = cache.select(&indices).unwrap();
        prop_assert_eq!(rows.size(), [indices.len() as i64, c as i64]);
        for (row, &index) in indices.iter().enumerate() {
            prop_assert!(rows.get(row as i64).equal(&logits.get(index as i64)));
        }
    }

    #[test]
    fn an_index_outside_the_cache_is_named(
        n in 1usize..40, beyond in 0usize..100, position in 0usize..5, seed in 0i64..1000,
    ) {
        let (cache, _) = identity_cache(n, 3, seed);
        let mut indices = vec![0; 5];
        indices[position] = n + beyond;
        let err = cache.select(&indices).unwrap_err();
        prop_assert!(
            matches!(err, Error::IndexOutOfRange { index, len } if index == n + beyond && len == n),
            "{}", err
        );
    }

    #[test]
    fn cached_and_live_teachers_give_the_same_loss(
        (n, indices) in (1usize..40).prop_flat_map(|n| (Just(n), prop::collection::vec(0..n, 1..20))),
        seed in 0i64..1000, temperature in 0.5f64..20.0, alpha in 0.0f64..=1.0,
    ) {
        tch::manual_seed(seed);
        let teacher_vs = nn::VarStore::new(Device::Cpu);
        let teacher = nn::linear(teacher_vs.root(), 5, 3, Default::default());
        let student_vs = nn::VarStore::new(Device::Cpu);
        let student = nn::linear(student_vs.root(), 5, 3, Default::default());
        let xs = Tensor::randn([n as i64, 5], (Kind::Float, Device::Cpu));
        let cache = TeacherCache::compute(&teacher, &xs, 4).unwrap();
        let index = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let batch_xs = xs.index_select(0, &index);
        let batch_ys = Tensor::randint(3, [indices.len() as i64], (Kind::Int64, Device::Cpu));
        let cfg = config(temperature, alpha);
        let batch = Batch::new(&batch_xs, &batch_ys).with_indices(&indices);
        let cached = Distiller::new(&cache, &student, cfg).loss(batch).unwrap().double_value(&[]);
        let live = Distiller::new(TeacherSource::Live(&teacher), &student, cfg)
            .loss(batch)
            .unwrap()
            .double_value(&[]);
        prop_assert!((cached - live).abs() <= CACHED_LOSS_TOLERANCE * live.abs().max(1.0),
            "{} vs {}", cached, live);
    }
}

#[test]
fn callers_mistakes_are_errors() {
    let opts = (Kind::Float, Device::Cpu);
    let cfg = DistillationConfig::default();
    let l = Tensor::from_slice(&[0i64, 1]);
    let z = Tensor::zeros([2, 10], opts);
    // Kinds: integer logits, float labels.
    let err = distillation_loss(&z.to_kind(Kind::Int64), &z, &l, &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongKind {
                what: "student logits",
                ..
            }
        ),
        "{err}"
    );
    let err = distillation_loss(&z, &z.to_kind(Kind::Int), &l, &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongKind {
                what: "teacher logits",
                ..
            }
        ),
        "{err}"
    );
    let err = distillation_loss(&z, &z, &l.to_kind(Kind::Float), &cfg).unwrap_err();
    assert!(
        matches!(err, Error::WrongKind { what: "labels", .. }),
        "{err}"
    );
    // Labels of any integer kind are taken (MNIST's are bytes).
    let bytes = distillation_loss(&z, &z, &l.to_kind(Kind::Uint8), &cfg).unwrap();
    let longs = distillation_loss(&z, &z, &l, &cfg).unwrap();
    assert!(bytes.equal(&longs));
    // Empty batches and empty class lists.
    let empty = Tensor::zeros([0, 10], opts);
    let no_labels = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        distillation_loss(&empty, &empty, &no_labels, &cfg),
        Err(Error::EmptyBatch)
    ));
    let classless = Tensor::zeros([2, 0], opts);
    assert!(matches!(
        distillation_loss(&classless, &classless, &l, &cfg),
        Err(Error::ShapeMismatch(_))
    ));

    // The cache: batch size, teacher output, logits from elsewhere.
    let identity = nn::func(|x| x.shallow_clone());
    assert!(matches!(
        TeacherCache::compute(&identity, &z, 0),
        Err(Error::InvalidBatchSize)
    ));
    assert!(matches!(
        TeacherCache::compute(&identity, &Tensor::from(1.0f32), 4),
        Err(Error::ShapeMismatch(_))
    ));
    let flat = nn::func(|x| x.sum_dim_intlist(-1, false, Kind::Float));
    let err = TeacherCache::compute(&flat, &z, 4).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch(_)), "{err}");
    let integer = nn::func(|x| x.to_kind(Kind::Int64));
    assert!(matches!(
        TeacherCache::compute(&integer, &z, 4),
        Err(Error::WrongKind { .. })
    ));
    let nothing = TeacherCache::compute(&identity, &empty, 4).unwrap();
    assert!(nothing.is_empty());
    assert!(matches!(
        nothing.select(&[0]),
        Err(Error::IndexOutOfRange { index: 0, len: 0 })
    ));
    assert!(matches!(
        TeacherCache::from_logits(&Tensor::zeros([4], opts)),
        Err(Error::ShapeMismatch(_))
    ));
    assert!(matches!(
        TeacherCache::from_logits(&Tensor::zeros([4, 2], (Kind::Int64, Device::Cpu))),
        Err(Error::WrongKind { .. })
    ));
    let cache = TeacherCache::from_logits(&z.to_kind(Kind::Double)).unwrap();
    assert_eq!(cache.logits().kind(), Kind::Float);

    // The distiller: indices missing, too few, out of range; a student with nothing to train.
    let mut vs = nn::VarStore::new(Device::Cpu);
    let student = nn::linear(vs.root(), 10, 10, Default::default());
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let distiller = Distiller::new(&cache, &student, cfg);
    assert!(matches!(
        distiller.loss(Batch::new(&z, &l)),
        Err(Error::MissingIndices)
    ));
    assert!(matches!(
        distiller.loss(Batch::new(&z, &l).with_indices(&[0])),
        Err(Error::ShapeMismatch(_))
    ));
    assert!(matches!(
        distiller.step(&mut opt, Batch::new(&z, &l).with_indices(&[0, 2])),
        Err(Error::IndexOutOfRange { index: 2, len: 2 })
    ));
    assert!(
        distiller
            .step(&mut opt, Batch::new(&z, &l).with_indices(&[1, 0]))
            .is_ok()
    );
    vs.freeze();
    let err = distiller
        .step(&mut opt, Batch::new(&z, &l).with_indices(&[1, 0]))
        .unwrap_err();
    assert!(matches!(err, Error::Torch(_)), "{err}");
}
