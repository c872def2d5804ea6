//! Properties of schedules, masks and the pruner.

use proptest::prelude::*;
use pruning::mask::{global_masks, layer_mask, zero_count};
use pruning::{Error, Granularity, Pruner, PruningConfig, Schedule, Scope, Sparsity};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Schedule values against the closed form, computed independently here.
const SCHEDULE_TOLERANCE: f64 = 1e-12;

fn zeros(t: &Tensor) -> usize {
    t.numel() - t.count_nonzero(None::<i64>).int64_value(&[]) as usize
}

fn random_weight(shape: &[i64], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn polynomial_decay_follows_the_closed_form(
        initial in 0.0f64..0.5, extra in 0.0f64..0.49, begin in 0u64..100, periods in 0u64..40,
        frequency in 1u64..50, step in 0u64..2000,
    ) {
        let final_ = initial + extra;
        let length = periods * frequency;
        let end = begin + length;
        let schedule = Schedule::polynomial_decay(initial, final_, begin, end, frequency).unwrap();
        let p = if length == 0 { if step >= begin { 1.0 } else { 0.0 } }
            else { ((step as f64 - begin as f64) / length as f64).clamp(0.0, 1.0) };
        let expected = final_ + (initial - final_) * (1.0 - p).powi(3);
        prop_assert!((schedule.sparsity(step) - expected).abs() < SCHEDULE_TOLERANCE);
        let expected_prune = step >= begin && step <= end && (step - begin) % frequency == 0;
        prop_assert_eq!(schedule.should_prune(step), expected_prune);
    }

    #[test]
    fn polynomial_decay_reaches_its_final_sparsity_exactly_at_the_end_step(
        initial in 0.0f64..0.99, final_ in 0.0f64..0.99, begin in 0u64..10_000,
        periods in 0u64..500, frequency in 1u64..1000, power in 0.1f64..10.0,
    ) {
        let end = begin + periods * frequency;
        let schedule = Schedule::PolynomialDecay {
            initial: Sparsity::new(initial).unwrap(),
            final_: Sparsity::new(final_).unwrap(),
            begin_step: begin,
            end_step: end,
            power,
            frequency,
        };
        prop_assert!(schedule.validate().is_ok());
        prop_assert_eq!(schedule.final_step(), Some(end));
        prop_assert!(schedule.should_prune(end));
        prop_assert!(!schedule.should_prune(end + 1));
        // At p = 1 the decay term is an exact zero, so the value is exactly `final_`.
        prop_assert_eq!(schedule.sparsity(end), final_);
        // The last pruning step at or before any step after the end is the end step.
        let last = (begin..=end + 3 * frequency).rev().find(|&s| schedule.should_prune(s));
        prop_assert_eq!(last, Some(end));
        // Every pruning step's sparsity lies between the initial and the final one.
        let (low, high) = (initial.min(final_), initial.max(final_));
        for step in (begin..=end).step_by(frequency as usize).take(50) {
            let s = schedule.sparsity(step);
            prop_assert!(low - SCHEDULE_TOLERANCE <= s && s <= high + SCHEDULE_TOLERANCE, "{s}");
        }
    }

    #[test]
    fn unreachable_end_steps_are_refused_with_the_nearest_valid_ones(
        begin in 0u64..10_000, periods in 0u64..500, frequency in 2u64..1000, past in 1u64..1000,
    ) {
        let past = 1 + past % (frequency - 1);
        let end = begin + periods * frequency + past;
        let err = Schedule::polynomial_decay(0.0, 0.8, begin, end, frequency).unwrap_err();
        let Error::UnreachableEndStep { earlier, later, .. } = err else {
            return Err(TestCaseError::fail(format!("{err}")));
        };
        prop_assert_eq!((earlier, later), (end - past, end - past + frequency));
        let suggestion = format!("{earlier} or {later}");
        prop_assert!(err_names(begin, end, frequency).contains(&suggestion));
        for valid in [earlier, later] {
            let schedule = Schedule::polynomial_decay(0.0, 0.8, begin, valid, frequency).unwrap();
            prop_assert!(schedule.should_prune(valid));
        }
        // A constant sparsity has its target on every pruning step: any end is accepted.
        prop_assert!(Schedule::constant(0.8, begin, Some(end), frequency).is_ok());
    }

    #[test]
    fn a_pruner_ends_at_the_final_sparsity(
        out in 1i64..12, inputs in 1i64..24, final_ in 0.0f64..0.99, periods in 0u64..6,
        frequency in 1u64..6, seed in 0i64..1000,
    ) {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let _layer = nn::linear(vs.root() / "0", inputs, out, Default::default());
        let end = periods * frequency;
        let config = PruningConfig {
            schedule: Schedule::polynomial_decay(0.0, final_, 0, end, frequency).unwrap(),
            granularity: Granularity::Unstructured,
            scope: Scope::PerLayer,
        };
        let mut pruner = Pruner::new(&vs, config).unwrap();
        for step in 0..=end {
            pruner.update(step).unwrap();
        }
        let layer = &pruner.report()[0];
        prop_assert_eq!(layer.zeros, zero_count(final_, layer.total));
    }

    #[test]
    fn constant_sparsity_without_end_prunes_forever(
        target in 0.0f64..0.99, begin in 0u64..100, frequency in 1u64..20, step in 0u64..100_000,
    ) {
        let schedule = Schedule::constant(target, begin, None, frequency).unwrap();
        prop_assert_eq!(schedule.sparsity(step), target);
        prop_assert_eq!(schedule.should_prune(step), step >= begin && (step - begin) % frequency == 0);
    }

    #[test]
    fn unstructured_and_global_masks_hit_their_target_exactly(
        out in 1i64..20, inputs in 1i64..40, sparsity in 0.0f64..0.99, seed in 0i64..1000,
    ) {
        let w = random_weight(&[out, inputs], seed);
        let mask = layer_mask(&w, sparsity, Granularity::Unstructured).unwrap();
        let expected = zero_count(sparsity, w.numel());
        prop_assert_eq!(zeros(&mask), expected);
        // The zeroed ones are the smallest: every kept magnitude >= every zeroed one.
        let kept = w.abs().masked_select(&mask.ne(0.0));
        let dropped = w.abs().masked_select(&mask.eq(0.0));
        if kept.numel() > 0 && dropped.numel() > 0 {
            prop_assert!(kept.min().double_value(&[]) >= dropped.max().double_value(&[]));
        }
        let v = random_weight(&[inputs, 3, 3], seed + 1);
        let masks = global_masks(&[&w, &v], sparsity).unwrap();
        prop_assert_eq!(zeros(&masks[0]) + zeros(&masks[1]), zero_count(sparsity, w.numel() + v.numel()));
        prop_assert_eq!(masks[1].size(), v.size());
    }

    #[test]
    fn block_masks_hit_their_target_within_one_block(
        out_blocks in 1i64..8, in_blocks in 1i64..8, sparsity in 0.0f64..0.99, seed in 0i64..1000,
    ) {
        let (rows, cols) = (2, 4);
        let w = random_weight(&[out_blocks * rows, in_blocks * cols], seed);
        let mask = layer_mask(&w, sparsity, Granularity::Block { rows: rows as usize, cols: cols as usize }).unwrap();
        let blocks = (out_blocks * in_blocks) as usize;
        prop_assert_eq!(zeros(&mask), zero_count(sparsity, blocks) * (rows * cols) as usize);
        // Whole blocks: each block is all zero or all one.
        let per_block = mask.reshape([out_blocks, rows, in_blocks, cols]).sum_dim_intlist([1i64, 3].as_slice(), false, Kind::Float);
        let ok = per_block.eq(0.0).logical_or(&per_block.eq((rows * cols) as f64)).all().int64_value(&[]);
        prop_assert_eq!(ok, 1);
    }

    #[test]
    fn n_out_of_m_keeps_exactly_n_in_every_group(
        out in 1i64..16, groups in 1i64..10, seed in 0i64..1000, conv in any::<bool>(),
    ) {
        let w = if conv {
            random_weight(&[out, 4 * groups, 1, 1], seed)
        } else {
            random_weight(&[out, 4 * groups], seed)
        };
        let mask = layer_mask(&w, 0.0, Granularity::NOutOfM { n: 2, m: 4 }).unwrap();
        let per_group = mask.reshape([-1, 4]).sum_dim_intlist(-1, false, Kind::Float);
        prop_assert_eq!(per_group.eq(2.0).all().int64_value(&[]), 1);
        // The kept two are the group's largest.
        let magnitudes = w.abs().reshape([-1, 4]);
        let grouped: Tensor = mask.reshape([-1, 4]);
        let dropped: Tensor = grouped.ones_like() - &grouped;
        let kept_min: Tensor = (&magnitudes * &grouped + &dropped * 1e9).min_dim(-1, false).0;
        let dropped_max: Tensor = (&magnitudes * &dropped).max_dim(-1, false).0;
        prop_assert_eq!(kept_min.ge_tensor(&dropped_max).all().int64_value(&[]), 1);
    }
}

/// The message of the error refusing an end step.
fn err_names(begin: u64, end: u64, frequency: u64) -> String {
    Schedule::polynomial_decay(0.0, 0.8, begin, end, frequency)
        .unwrap_err()
        .to_string()
}

fn linear_net(vs: &nn::VarStore) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(vs.root() / "0", 12, 16, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(vs.root() / "2", 16, 4, Default::default()))
}

#[test]
fn pruned_weights_stay_zero_under_momentum_and_strip_is_idempotent() {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = linear_net(&vs);
    let mut optimizer = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&vs, 0.05)
    .unwrap();
    let config = PruningConfig {
        schedule: Schedule::polynomial_decay(0.0, 0.8, 0, 20, 5).unwrap(),
        granularity: Granularity::Unstructured,
        scope: Scope::PerLayer,
    };
    let mut pruner = Pruner::new(&vs, config).unwrap();
    let xs = Tensor::randn([64, 12], (Kind::Float, Device::Cpu));
    let ys = Tensor::randn([64, 4], (Kind::Float, Device::Cpu));
    for step in 0..200 {
        pruner.update(step).unwrap();
        let loss = (net.forward(&xs) - &ys).square().mean(Kind::Float);
        optimizer.backward_step(&loss);
        pruner.apply();
        if step >= 20 {
            for layer in pruner.report() {
                assert_eq!(
                    layer.zeros,
                    zero_count(0.8, layer.total),
                    "step {step}: {layer:?}"
                );
            }
        }
    }
    let names: Vec<String> = pruner.report().into_iter().map(|l| l.name).collect();
    assert_eq!(names, ["0.weight", "2.weight"], "biases are never pruned");
    let report = pruner.strip();
    let snapshot: Vec<Tensor> = ["0.weight", "2.weight"]
        .iter()
        .map(|n| vs.variables()[*n].copy())
        .collect();
    // Stripping again changes nothing.
    let again = Pruner::new(
        &vs,
        PruningConfig {
            schedule: Schedule::constant(0.0, 0, None, 1).unwrap(),
            granularity: Granularity::Unstructured,
            scope: Scope::PerLayer,
        },
    )
    .unwrap()
    .strip();
    assert_eq!(report, again);
    for (name, before) in ["0.weight", "2.weight"].iter().zip(snapshot) {
        assert!(vs.variables()[*name].equal(&before), "{name}");
    }
}

#[test]
fn invalid_settings_are_errors() {
    assert!(matches!(Sparsity::new(1.0), Err(Error::InvalidSparsity(_))));
    assert!(matches!(
        Sparsity::new(-0.1),
        Err(Error::InvalidSparsity(_))
    ));
    assert!(matches!(
        Schedule::polynomial_decay(0.0, 0.5, 10, 5, 1),
        Err(Error::InvalidSchedule(_))
    ));
    assert!(matches!(
        Schedule::constant(0.5, 0, None, 0),
        Err(Error::InvalidSchedule(_))
    ));
    let w = Tensor::ones([4, 6], (Kind::Float, Device::Cpu));
    for granularity in [
        Granularity::NOutOfM { n: 2, m: 4 },
        Granularity::NOutOfM { n: 4, m: 4 },
        Granularity::Block { rows: 3, cols: 2 },
    ] {
        assert!(
            matches!(
                layer_mask(&w, 0.5, granularity),
                Err(Error::InvalidGranularity(_))
            ),
            "{granularity:?}"
        );
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = linear_net(&vs);
    let err = Pruner::new(
        &vs,
        PruningConfig {
            schedule: Schedule::constant(0.5, 0, None, 1).unwrap(),
            granularity: Granularity::Block { rows: 1, cols: 4 },
            scope: Scope::Global,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("global"), "{err}");
    for sparsity in [1.0, -0.1, f64::NAN] {
        assert!(matches!(
            layer_mask(&w, sparsity, Granularity::Unstructured),
            Err(Error::InvalidSparsity(_))
        ));
        assert!(matches!(
            global_masks(&[&w], sparsity),
            Err(Error::InvalidSparsity(_))
        ));
    }
    assert!(matches!(
        layer_mask(&Tensor::from(1.0f32), 0.5, Granularity::Unstructured),
        Err(Error::ScalarWeight)
    ));
}

#[test]
fn an_end_step_of_469_with_frequency_50_is_refused_and_450_reaches_80_percent() {
    // 469 batches per epoch, a mask update every 50 steps: the last update would be at
    // step 450, at 79.995% rather than 80%.
    let err = Schedule::polynomial_decay(0.0, 0.8, 0, 469, 50).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnreachableEndStep {
                begin_step: 0,
                end_step: 469,
                frequency: 50,
                earlier: 450,
                later: 500
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("450 or 500"), "{err}");
    let schedule = Schedule::polynomial_decay(0.0, 0.8, 0, 450, 50).unwrap();
    let last = (0..469).filter(|&s| schedule.should_prune(s)).max();
    assert_eq!(last, Some(450));
    assert_eq!(schedule.sparsity(450), 0.8);
}

#[test]
fn variables_are_named_precisely_in_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = linear_net(&vs);
    let _scalar = vs.root().var("scale", &[], nn::Init::Const(1.0));
    let config = PruningConfig {
        schedule: Schedule::constant(0.5, 0, None, 1).unwrap(),
        granularity: Granularity::Unstructured,
        scope: Scope::PerLayer,
    };
    let err = Pruner::with_layers(&vs, &["0.weight", "1.weight"], config.clone()).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownVariable { name } if name == "1.weight"),
        "{err}"
    );
    assert!(err.to_string().contains("`1.weight`"), "{err}");
    let err = Pruner::with_layers(&vs, &["0.weight", "0.weight"], config.clone()).unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateVariable { name } if name == "0.weight"),
        "{err}"
    );
    let err = Pruner::with_layers(&vs, &["scale"], config.clone()).unwrap_err();
    assert!(
        matches!(&err, Error::UnprunableVariable { name, .. } if name == "scale"),
        "{err}"
    );
    let err = Pruner::with_layers(
        &vs,
        &["2.weight"],
        PruningConfig {
            granularity: Granularity::NOutOfM { n: 2, m: 3 },
            ..config
        },
    )
    .unwrap_err();
    assert!(matches!(&err, Error::InvalidGranularity(_)), "{err}");
    assert!(err.to_string().contains("`2.weight`"), "{err}");
    assert!(matches!(
        Pruner::preserving(&vs, &["nope.weight"]),
        Err(Error::UnknownVariable { .. })
    ));
}

#[test]
fn deserialising_checks_sparsities_and_end_steps() {
    let valid = Schedule::polynomial_decay(0.0, 0.8, 0, 450, 50).unwrap();
    let json = serde_json::to_string(&valid).unwrap();
    assert_eq!(serde_json::from_str::<Schedule>(&json).unwrap(), valid);
    let out_of_range = json.replace("0.8", "1.5");
    assert!(serde_json::from_str::<Schedule>(&out_of_range).is_err());
    // The steps are only checked by `validate`, which the pruner calls.
    let unreachable: Schedule = serde_json::from_str(&json.replace("450", "469")).unwrap();
    assert!(matches!(
        unreachable.validate(),
        Err(Error::UnreachableEndStep { .. })
    ));
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = linear_net(&vs);
    let err = Pruner::new(
        &vs,
        PruningConfig {
            schedule: unreachable,
            granularity: Granularity::Unstructured,
            scope: Scope::PerLayer,
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::UnreachableEndStep { .. }), "{err}");
}

#[test]
fn constant_weights_prune_to_the_exact_count() {
    // All magnitudes tie: the count is still exact.
    let w = Tensor::ones([8, 8], (Kind::Float, Device::Cpu));
    let mask = layer_mask(&w, 0.5, Granularity::Unstructured).unwrap();
    assert_eq!(zeros(&mask), 32);
}

#[test]
fn a_preserving_pruner_keeps_exactly_the_zeros_it_found() {
    tch::manual_seed(6);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = linear_net(&vs);
    // Zero a scattered third of the first layer's weights by hand.
    tch::no_grad(|| {
        let mut w = vs.variables()["0.weight"].shallow_clone();
        let keep = Tensor::rand([16, 12], (Kind::Float, Device::Cpu)).ge(0.33);
        w *= keep.to_kind(Kind::Float);
    });
    let zeros_before = vs.variables()["0.weight"].eq(0.0);
    let mut keeper = Pruner::preserving(&vs, &["0.weight", "2.weight"]).unwrap();
    let mut optimizer = nn::Adam::default().build(&vs, 0.05).unwrap();
    let xs = Tensor::randn([64, 12], (Kind::Float, Device::Cpu));
    let ys = Tensor::randn([64, 4], (Kind::Float, Device::Cpu));
    for step in 0..50 {
        assert!(!keeper.update(step).unwrap(), "it never recomputes masks");
        let loss = (net.forward(&xs) - &ys).square().mean(Kind::Float);
        optimizer.backward_step(&loss);
        keeper.apply();
    }
    let after = vs.variables()["0.weight"].eq(0.0);
    assert!(
        after.equal(&zeros_before),
        "the same zeros, no more, no fewer"
    );
    assert_eq!(keeper.report()[1].zeros, 0, "a dense layer stays dense");
    assert!(matches!(
        Pruner::preserving(&vs, &["nope.weight"]),
        Err(Error::UnknownVariable { .. })
    ));
}
