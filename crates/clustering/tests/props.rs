//! Properties of the clusterer: clustered values, kept zeros, stripping, initialisation,
//! centroid gradients, errors and training.

use clustering::assignment::centroid_gradients;
use clustering::{
    CentroidInit, CentroidOptimizer, Clusterer, ClusteringConfig, Error, GradientAggregation,
    Granularity, Variables,
};
use proptest::prelude::*;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Centroid values computed by the test in f32 against the clusterer's f32 arithmetic.
const CENTROID_TOLERANCE: f32 = 1e-6;

/// TF-MOT's own tests compare centroids to 4 decimal places.
const TF_MOT_TOLERANCE: f32 = 5e-5;

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.detach().to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

/// The most distinct values (by `==`, so -0.0 and 0.0 are one) in any group of `groups`.
fn most_distinct_per_group(t: &Tensor, groups: usize) -> usize {
    let all = values(t);
    all.chunks(all.len() / groups)
        .map(|group| {
            let mut group = group.to_vec();
            group.sort_by(f32::total_cmp);
            group.dedup_by(|a, b| a == b);
            group.len()
        })
        .max()
        .unwrap()
}

fn store_with(name_prefix: &str, weights: &Tensor) -> (nn::VarStore, Tensor) {
    let vs = nn::VarStore::new(Device::Cpu);
    // `add` keeps the tensor's kind (`var_copy` would make it the store's, float).
    let var = (vs.root() / name_prefix).add("weight", weights.detach_copy(), true);
    (vs, var)
}

fn config(clusters: usize) -> ClusteringConfig {
    ClusteringConfig::new(clusters)
}

/// A loss whose gradient with respect to `w` is `direction`.
fn linear_loss(w: &Tensor, direction: &Tensor) -> Tensor {
    (w * direction).sum(Kind::Float)
}

fn init_strategy() -> impl Strategy<Value = CentroidInit> {
    prop_oneof![
        Just(CentroidInit::Linear),
        Just(CentroidInit::Random),
        Just(CentroidInit::DensityBased),
        Just(CentroidInit::KMeansPlusPlus),
    ]
}

fn granularity_strategy() -> impl Strategy<Value = Granularity> {
    prop_oneof![Just(Granularity::PerTensor), Just(Granularity::PerChannel)]
}

fn aggregation_strategy() -> impl Strategy<Value = GradientAggregation> {
    prop_oneof![
        Just(GradientAggregation::Sum),
        Just(GradientAggregation::Avg)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn clustered_groups_hold_at_most_k_values_and_kept_zeros_stay_zero(
        out in 1i64..6, extra in 1i64..20, clusters in 2usize..9, seed in 0i64..1000,
        init in init_strategy(), granularity in granularity_strategy(),
        aggregation in aggregation_strategy(), preserve_sparsity: bool, zero_share in 0.0f64..0.8,
    ) {
        tch::manual_seed(seed);
        let inputs = clusters as i64 + extra;
        let mut weights = Tensor::randn([out, inputs], (Kind::Float, Device::Cpu));
        // A hand-made pruning pattern: these weights are exact zeros.
        let pruned = Tensor::rand([out, inputs], (Kind::Float, Device::Cpu)).lt(zero_share);
        weights = weights.masked_fill(&pruned, 0.0);
        let (vs, w) = store_with("0", &weights);
        let mut optimizer = nn::Adam::default().build(&vs, 0.05).unwrap();
        let config = ClusteringConfig {
            init, granularity, aggregation, preserve_sparsity, seed: seed as u64,
            optimizer: CentroidOptimizer::Adam { learning_rate: 0.05 },
            ..config(clusters)
        };
        let mut clusterer = Clusterer::new(&vs, config).unwrap();
        let groups = if granularity == Granularity::PerChannel { out as usize } else { 1 };
        let bound = clusters + usize::from(preserve_sparsity);
        let pruned_flags = values(&pruned.to_kind(Kind::Float));
        for step in 0..4 {
            prop_assert!(most_distinct_per_group(&w, groups) <= bound, "step {step}");
            if preserve_sparsity {
                for (v, flag) in values(&w).iter().zip(&pruned_flags) {
                    prop_assert!(*flag == 0.0 || *v == 0.0, "a kept zero became {v} at step {step}");
                }
            }
            let direction = Tensor::randn([out, inputs], (Kind::Float, Device::Cpu));
            optimizer.backward_step(&linear_loss(&w, &direction));
            clusterer.apply().unwrap();
        }
        let report = clusterer.report().unwrap();
        prop_assert!(report[0].distinct_values <= bound);
        prop_assert!(report[0].clusters_used <= clusters);
        prop_assert_eq!(report[0].groups, groups);
        if preserve_sparsity {
            let pruned_count = pruned_flags.iter().filter(|z| **z != 0.0).count();
            prop_assert!(report[0].zeros >= pruned_count);
        }
    }

    #[test]
    fn stripping_changes_no_value_and_the_codebook_decodes_to_the_weights(
        out in 1i64..5, extra in 1i64..12, clusters in 2usize..6, seed in 0i64..1000,
        granularity in granularity_strategy(), preserve_sparsity: bool, steps in 0usize..3,
    ) {
        tch::manual_seed(seed);
        let inputs = clusters as i64 + extra;
        let weights = Tensor::randn([out, inputs], (Kind::Float, Device::Cpu))
            .relu(); // about half exact zeros
        let (vs, w) = store_with("fc", &weights);
        let mut optimizer = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.1).unwrap();
        let config = ClusteringConfig { granularity, preserve_sparsity, ..config(clusters) };
        let mut clusterer = Clusterer::new(&vs, config).unwrap();
        for _ in 0..steps {
            let direction = Tensor::randn([out, inputs], (Kind::Float, Device::Cpu));
            optimizer.backward_step(&linear_loss(&w, &direction));
            clusterer.apply().unwrap();
        }
        let codebooks = clusterer.codebooks().unwrap();
        let before = w.detach().copy();
        prop_assert!(codebooks[0].decode().unwrap().equal(&before));
        let entries = clusters as i64 + i64::from(preserve_sparsity);
        let groups = if granularity == Granularity::PerChannel { out } else { 1 };
        prop_assert_eq!(codebooks[0].values.size(), vec![groups, entries]);
        prop_assert_eq!(codebooks[0].indices.size(), vec![out, inputs]);
        let report = clusterer.strip().unwrap();
        prop_assert!(w.equal(&before));
        prop_assert_eq!(report[0].total, (out * inputs) as usize);
    }

    #[test]
    fn seeded_initialisations_are_reproducible(
        seed in 0u64..1_000_000, weights_seed in 0i64..1000, clusters in 2usize..8,
        random in any::<bool>(), granularity in granularity_strategy(),
    ) {
        tch::manual_seed(weights_seed);
        let weights = Tensor::randn([4, 24], (Kind::Float, Device::Cpu));
        let init = if random { CentroidInit::Random } else { CentroidInit::KMeansPlusPlus };
        let codebook = || {
            let (vs, _) = store_with("0", &weights);
            let config = ClusteringConfig { init, granularity, seed, ..config(clusters) };
            let clusterer = Clusterer::new(&vs, config).unwrap();
            values(&clusterer.codebooks().unwrap()[0].values)
        };
        prop_assert_eq!(codebook(), codebook());
    }

    #[test]
    fn linear_initialisation_spans_each_group_s_range(
        out in 1i64..5, extra in 1i64..30, clusters in 2usize..10, seed in 0i64..1000,
        granularity in granularity_strategy(),
    ) {
        tch::manual_seed(seed);
        let inputs = clusters as i64 + extra;
        let weights = Tensor::randn([out, inputs], (Kind::Float, Device::Cpu));
        let (vs, w) = store_with("0", &weights);
        let config = ClusteringConfig { init: CentroidInit::Linear, granularity, ..config(clusters) };
        let clusterer = Clusterer::new(&vs, config).unwrap();
        let codebook = &clusterer.codebooks().unwrap()[0];
        let groups = if granularity == Granularity::PerChannel { out as usize } else { 1 };
        let centroids = values(&codebook.values);
        let original = values(&weights);
        for (group, row) in centroids.chunks(clusters).enumerate() {
            let members = &original[group * original.len() / groups..(group + 1) * original.len() / groups];
            let min = members.iter().copied().fold(f32::INFINITY, f32::min);
            let max = members.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // The ends are the extreme weights themselves, copied, not computed.
            prop_assert_eq!(row[0], min);
            prop_assert_eq!(row[clusters - 1], max);
            prop_assert!(row.windows(2).all(|p| p[0] <= p[1]));
            // The extremes are centroids, so they keep their exact values.
            prop_assert!(values(&w).contains(&min) && values(&w).contains(&max));
        }
    }
}

#[test]
fn kmeans_plus_plus_and_random_differ_across_seeds() {
    tch::manual_seed(11);
    let weights = Tensor::randn([64, 32], (Kind::Float, Device::Cpu));
    for init in [CentroidInit::KMeansPlusPlus, CentroidInit::Random] {
        let codebook = |seed| {
            let (vs, _) = store_with("0", &weights);
            let config = ClusteringConfig {
                init,
                seed,
                ..config(8)
            };
            values(&Clusterer::new(&vs, config).unwrap().codebooks().unwrap()[0].values)
        };
        assert_eq!(codebook(1), codebook(1), "{init}");
        assert_ne!(codebook(1), codebook(2), "{init}");
        assert_ne!(codebook(2), codebook(3), "{init}");
    }
}

#[test]
fn density_based_centroids_are_tf_mot_s() {
    // TF-MOT's `testDensityBasedClusterCentroids` case: weights 0..9, three clusters.
    let weights = Tensor::arange(10, (Kind::Float, Device::Cpu)).view([2, 5]);
    let (vs, w) = store_with("0", &weights);
    let config = ClusteringConfig {
        init: CentroidInit::DensityBased,
        ..config(3)
    };
    let clusterer = Clusterer::new(&vs, config).unwrap();
    let centroids = values(&clusterer.codebooks().unwrap()[0].values);
    for (c, expected) in centroids.iter().zip([0.3010345f32, 5.2775865, 9.01]) {
        assert!((c - expected).abs() < TF_MOT_TOLERANCE, "{centroids:?}");
    }
    // 0, 1, 2 are nearest 0.301, 3 to 7 nearest 5.278, 8 and 9 nearest 9.01.
    let indices =
        Vec::<i64>::try_from(clusterer.codebooks().unwrap()[0].indices.flatten(0, -1)).unwrap();
    assert_eq!(indices, [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]);
    assert_eq!(most_distinct_per_group(&w, 1), 3);
}

/// Weights 0, 1, 2 and 9, 10 with linear centroids 0 and 10: the first three are pulled
/// from centroid 0, the last two from centroid 1. The loss's gradient is `[1, 2, 3, 4, 6]`.
fn hand_example(aggregation: GradientAggregation) -> Vec<f32> {
    let weights = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 9.0, 10.0]).view([1, 5]);
    let (vs, w) = store_with("0", &weights);
    let config = ClusteringConfig {
        init: CentroidInit::Linear,
        aggregation,
        optimizer: CentroidOptimizer::Sgd {
            learning_rate: 0.5,
            momentum: 0.0,
        },
        ..config(2)
    };
    let mut clusterer = Clusterer::new(&vs, config).unwrap();
    assert_eq!(values(&w), [0.0, 0.0, 0.0, 10.0, 10.0]);
    let direction = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 6.0]).view([1, 5]);
    // Gradients only, no optimizer step: the variable keeps its values.
    linear_loss(&w, &direction).backward();
    clusterer.apply().unwrap();
    values(&clusterer.codebooks().unwrap()[0].values)
}

#[test]
fn sum_and_avg_centroid_gradients_match_a_hand_computation() {
    // Sum: [1 + 2 + 3, 4 + 6] = [6, 10]; SGD at 0.5 moves [0, 10] to [-3, 5].
    let sum = hand_example(GradientAggregation::Sum);
    // Avg: [6 / 3, 10 / 2] = [2, 5]; [0, 10] moves to [-1, 7.5].
    let avg = hand_example(GradientAggregation::Avg);
    for (actual, expected) in [(sum, [-3.0f32, 5.0]), (avg, [-1.0, 7.5])] {
        for (a, e) in actual.iter().zip(expected) {
            assert!(
                (a - e).abs() < CENTROID_TOLERANCE,
                "{actual:?} vs {expected:?}"
            );
        }
    }
}

#[test]
fn centroid_gradients_skip_kept_zeros_and_give_empty_clusters_nothing() {
    // Two channels, three clusters each; the third weight of each row is a kept zero.
    let grad = Tensor::from_slice(&[1.0f32, 3.0, 100.0, 2.0, 5.0, 7.0, 100.0, 1.0]).view([2, 4]);
    let indices = Tensor::from_slice(&[0i64, 0, 2, 1, 2, 2, 0, 2]).view([2, 4]);
    let in_clusters =
        Tensor::from_slice(&[true, true, false, true, true, true, false, true]).view([2, 4]);
    let sum = centroid_gradients(
        &grad,
        &indices,
        Some(&in_clusters),
        3,
        GradientAggregation::Sum,
    )
    .unwrap();
    assert_eq!(values(&sum), [4.0, 2.0, 0.0, 0.0, 0.0, 13.0]);
    let avg = centroid_gradients(
        &grad,
        &indices,
        Some(&in_clusters),
        3,
        GradientAggregation::Avg,
    )
    .unwrap();
    let expected = [2.0f32, 2.0, 0.0, 0.0, 0.0, 13.0 / 3.0];
    for (a, e) in values(&avg).iter().zip(expected) {
        assert!((a - e).abs() < CENTROID_TOLERANCE, "{avg:?}");
    }
}

#[test]
fn latent_weights_follow_the_user_s_optimizer_straight_through() {
    // Weight 4 is pulled from centroid 0 (4 < 6 away from 10). A gradient of -2 on it
    // alone and SGD at 1 move its latent value to 6, now nearer centroid 10, although
    // the variable held 0 (its centroid) when the optimizer stepped.
    let weights = Tensor::from_slice(&[0.0f32, 1.0, 4.0, 9.0, 10.0]).view([1, 5]);
    let (vs, w) = store_with("0", &weights);
    let mut optimizer = nn::Sgd::default().build(&vs, 1.0).unwrap();
    let config = ClusteringConfig {
        init: CentroidInit::Linear,
        optimizer: CentroidOptimizer::Sgd {
            learning_rate: 1e-9,
            momentum: 0.0,
        },
        ..config(2)
    };
    let mut clusterer = Clusterer::new(&vs, config).unwrap();
    assert_eq!(values(&w), [0.0, 0.0, 0.0, 10.0, 10.0]);
    let direction = Tensor::from_slice(&[0.0f32, 0.0, -2.0, 0.0, 0.0]).view([1, 5]);
    optimizer.backward_step(&linear_loss(&w, &direction));
    assert_eq!(values(&w)[2], 2.0);
    clusterer.apply().unwrap();
    let after = values(&w);
    assert!((after[2] - 10.0).abs() < CENTROID_TOLERANCE, "{after:?}");
    assert!(after[0].abs() < CENTROID_TOLERANCE, "{after:?}");
}

#[test]
fn invalid_settings_are_errors() {
    let empty = nn::VarStore::new(Device::Cpu);
    assert!(matches!(
        Clusterer::new(&empty, config(4)),
        Err(Error::NothingToCluster)
    ));

    let vs = nn::VarStore::new(Device::Cpu);
    let _conv = nn::conv2d(vs.root() / "0", 2, 3, 3, Default::default()); // [3, 2, 3, 3]
    let _fc = nn::linear(vs.root() / "1", 27, 4, Default::default()); // [4, 27]
    let _scale = vs.root().var("scale", &[], nn::Init::Const(1.0));
    for k in [0, 1] {
        assert!(matches!(
            Clusterer::new(&vs, config(k)),
            Err(Error::TooFewClusters { clusters }) if clusters == k
        ));
    }
    // The convolution holds 54 weights: 54 clusters are too many, and the error says where.
    let err = Clusterer::new(&vs, config(54)).unwrap_err();
    let Error::TooManyClusters {
        ref name,
        clusters: 54,
        weights: 54,
        ..
    } = err
    else {
        panic!("{err}");
    };
    assert_eq!(name, "0.weight");
    assert!(err.to_string().contains("`0.weight`") && err.to_string().contains("54"));
    // Per channel, each output channel of the convolution holds 18.
    let per_channel = ClusteringConfig {
        granularity: Granularity::PerChannel,
        ..config(18)
    };
    let err = Clusterer::new(&vs, per_channel).unwrap_err();
    assert!(
        matches!(err, Error::TooManyClusters { weights: 18, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("each output channel"));

    let named = |names: &[&str]| ClusteringConfig {
        variables: Variables::Named(names.iter().map(|n| n.to_string()).collect()),
        ..config(4)
    };
    let err = Clusterer::new(&vs, named(&["1.weight", "1.wieght"])).unwrap_err();
    assert!(matches!(err, Error::UnknownVariable { ref name } if name == "1.wieght"));
    let err = Clusterer::new(&vs, named(&["1.weight", "1.weight"])).unwrap_err();
    assert!(matches!(err, Error::DuplicateVariable { ref name } if name == "1.weight"));
    let err = Clusterer::new(&vs, named(&["scale"])).unwrap_err();
    assert!(matches!(err, Error::ScalarVariable { ref name } if name == "scale"));
    assert!(matches!(
        Clusterer::new(&vs, named(&[])),
        Err(Error::NothingToCluster)
    ));
    // A bias of 4 values cannot hold 4 clusters.
    let err = Clusterer::new(&vs, named(&["1.bias"])).unwrap_err();
    assert!(matches!(err, Error::TooManyClusters { weights: 4, .. }));

    let int_store = nn::VarStore::new(Device::Cpu);
    let _ = int_store.root().add(
        "weight",
        Tensor::zeros([4, 4], (Kind::Int64, Device::Cpu)),
        false,
    );
    let err = Clusterer::new(&int_store, config(4)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedKind {
                kind: Kind::Int64,
                ..
            }
        ),
        "{err}"
    );

    let nan = Tensor::from_slice(&[1.0f32, f32::NAN, 2.0, 3.0, 4.0, 5.0]).view([2, 3]);
    let (nan_store, _) = store_with("0", &nan);
    let err = Clusterer::new(&nan_store, config(2)).unwrap_err();
    assert!(matches!(err, Error::NonFiniteWeights { ref name } if name == "0.weight"));

    let bad_optimizer = ClusteringConfig {
        optimizer: CentroidOptimizer::Adam {
            learning_rate: -1.0,
        },
        ..config(4)
    };
    assert!(matches!(
        Clusterer::new(&vs, bad_optimizer),
        Err(Error::InvalidOptimizer(_))
    ));
}

#[test]
fn nothing_is_written_when_a_later_variable_is_refused() {
    let vs = nn::VarStore::new(Device::Cpu);
    let big = nn::linear(vs.root() / "a", 16, 4, Default::default());
    let _small = nn::linear(vs.root() / "b", 1, 3, Default::default()); // 3 weights
    let before = big.ws.detach().copy();
    let err = Clusterer::new(&vs, config(3)).unwrap_err();
    assert!(matches!(err, Error::TooManyClusters { ref name, .. } if name == "b.weight"));
    assert!(big.ws.equal(&before));
}

#[test]
fn the_default_selection_is_conv_and_dense_weights() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _conv = nn::conv2d(vs.root() / "0", 1, 4, 3, Default::default());
    let _bn = nn::batch_norm2d(vs.root() / "1", 4, Default::default());
    let _fc = nn::linear(vs.root() / "3", 36, 10, Default::default());
    let clusterer = Clusterer::new(&vs, config(4)).unwrap();
    let names: Vec<String> = clusterer
        .report()
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["0.weight", "3.weight"]);
}

#[test]
fn preserved_zeros_stay_zero_and_point_to_the_codebook_s_zero_entry() {
    // A pruned layer: every other weight is an exact zero (what `pruning` leaves after
    // `strip`), under momentum that would move them.
    tch::manual_seed(3);
    let weights = Tensor::randn([6, 10], (Kind::Float, Device::Cpu));
    let pattern = Tensor::arange(60, (Kind::Int64, Device::Cpu))
        .remainder(2)
        .eq(0)
        .view([6, 10]);
    let (vs, w) = store_with("0", &weights.masked_fill(&pattern, 0.0));
    let mut optimizer = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&vs, 0.1)
    .unwrap();
    let config = ClusteringConfig {
        preserve_sparsity: true,
        granularity: Granularity::PerChannel,
        ..config(3)
    };
    let mut clusterer = Clusterer::new(&vs, config).unwrap();
    for _ in 0..10 {
        let direction = Tensor::randn([6, 10], (Kind::Float, Device::Cpu));
        optimizer.backward_step(&linear_loss(&w, &direction));
        clusterer.apply().unwrap();
        let kept = w.masked_select(&pattern);
        assert_eq!(kept.count_nonzero(None::<i64>).int64_value(&[]), 0);
        assert!(most_distinct_per_group(&w, 6) <= 4);
    }
    let codebook = &clusterer.codebooks().unwrap()[0];
    assert_eq!(codebook.values.size(), [6, 4]);
    assert!(
        values(&codebook.values.narrow(1, 3, 1))
            .iter()
            .all(|v| *v == 0.0)
    );
    let zero_entries = codebook.indices.masked_select(&pattern);
    assert!(zero_entries.eq(3).all().int64_value(&[]) == 1);
    assert!(codebook.decode().unwrap().equal(&w));
    let report = clusterer.strip().unwrap();
    assert_eq!(report[0].zeros, 30);
    assert!(report[0].distinct_values <= 4);
}

#[test]
fn fake_quantizing_a_clustered_weight_keeps_at_most_k_codes_per_group() {
    tch::manual_seed(5);
    let weights = Tensor::randn([8, 40], (Kind::Float, Device::Cpu));
    for granularity in [Granularity::PerTensor, Granularity::PerChannel] {
        let (vs, w) = store_with("0", &weights);
        let config = ClusteringConfig {
            granularity,
            ..config(5)
        };
        let _clusterer = Clusterer::new(&vs, config).unwrap();
        // Symmetric int8 grids as the quantization crate's weight rule: max |w| / 127.
        let per_tensor = w.fake_quantize_per_tensor_affine(
            w.abs().max().double_value(&[]) / 127.0,
            0,
            -127,
            127,
        );
        let scales = w.detach().abs().amax([1i64].as_slice(), false) / 127.0;
        let zero_points = Tensor::zeros([8], (Kind::Int, Device::Cpu));
        let per_channel = w.fake_quantize_per_channel_affine(&scales, &zero_points, 0, -127, 127);
        // Each group keeps at most k codes: per tensor, a clustering group's k values
        // map to at most k codes; per channel, a row holds at most k values whichever
        // the clustering granularity.
        let groups = if granularity == Granularity::PerChannel {
            8
        } else {
            1
        };
        assert!(most_distinct_per_group(&per_tensor, groups) <= 5);
        assert!(most_distinct_per_group(&per_channel, 8) <= 5);
        // The grid is fine enough that the codes are the clustered values, one for one.
        assert_eq!(
            most_distinct_per_group(&per_channel, 8),
            most_distinct_per_group(&w, 8)
        );
    }
}

/// Share of what clustering cost (the loss just after clustering less the trained loss)
/// that fine-tuning recovers, for a small MLP regressing a random teacher MLP, trained,
/// clustered to 4 values per output channel and fine-tuned. Every number comes from a
/// local generator seeded with `seed`, not LibTorch's global one, which tests running
/// beside this one draw from too. Also checks that the weights stay clustered.
fn fine_tuning_recovery(seed: u64) -> f64 {
    let mut draw = uniform(seed);
    let teacher_vs = nn::VarStore::new(Device::Cpu);
    let teacher = mlp(&teacher_vs.root());
    redraw(&teacher_vs, &mut draw);
    let xs: Vec<f32> = (0..256 * 8).map(|_| 2.0 * draw()).collect();
    let xs = Tensor::from_slice(&xs).view([256, 8]);
    let ys = teacher.forward(&xs).detach();
    let vs = nn::VarStore::new(Device::Cpu);
    let student = mlp(&vs.root());
    redraw(&vs, &mut draw);
    let mut optimizer = nn::Adam::default().build(&vs, 1e-2).unwrap();
    let loss = |net: &nn::Sequential| (net.forward(&xs) - &ys).square().mean(Kind::Float);
    for _ in 0..100 {
        optimizer.backward_step(&loss(&student));
    }
    let trained = loss(&student).double_value(&[]);
    let config = ClusteringConfig {
        optimizer: CentroidOptimizer::Adam {
            learning_rate: 1e-2,
        },
        granularity: Granularity::PerChannel,
        ..config(4)
    };
    let mut clusterer = Clusterer::new(&vs, config).unwrap();
    let clustered_start = loss(&student).double_value(&[]);
    for _ in 0..150 {
        optimizer.backward_step(&loss(&student));
        clusterer.apply().unwrap();
    }
    let end = loss(&student).double_value(&[]);
    for report in clusterer.strip().unwrap() {
        assert!(report.distinct_values <= 4, "{report:?}");
    }
    (clustered_start - end) / (clustered_start - trained)
}

#[test]
fn training_lowers_the_loss_while_the_weights_stay_clustered() {
    // Fine-tuning a clustered network must recover a good part of what clustering cost.
    // One draw proves little either way: with weight and centroid steps of 1e-2 on a loss
    // near 0.01, a draw now and then ends above where it started (measured: 2 of 30). So:
    // over 16 draws, most recover and the mean share is well above zero (measured on these
    // 16: 14 recover, 46% on average).
    const DRAWS: u64 = 16;
    const LEAST_RECOVERING: usize = 12;
    const LEAST_MEAN_RECOVERY: f64 = 0.3;
    let recovery: Vec<f64> = (1..=DRAWS).map(fine_tuning_recovery).collect();
    let recovering = recovery.iter().filter(|&&r| r > 0.0).count();
    let mean = recovery.iter().sum::<f64>() / DRAWS as f64;
    assert!(
        recovering >= LEAST_RECOVERING && mean >= LEAST_MEAN_RECOVERY,
        "recovered shares {recovery:?}"
    );
}

/// Uniform values in [-1, 1) from a seeded xorshift generator.
fn uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Gives every variable of `vs`, in name order, values uniform in `+-1/sqrt(fan_in)`
/// (PyTorch's default bound for linear layers) from `draw`; a bias takes its weight's
/// fan-in.
fn redraw(vs: &nn::VarStore, draw: &mut impl FnMut() -> f32) {
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let fan_in = |name: &str| {
        let layer = name.rsplit_once('.').map_or("", |(layer, _)| layer);
        vs.variables()[&format!("{layer}.weight")].size()[1] as f32
    };
    tch::no_grad(|| {
        for (name, mut var) in variables {
            let bound = fan_in(&name).sqrt().recip();
            let values: Vec<f32> = (0..var.numel()).map(|_| draw() * bound).collect();
            var.copy_(&Tensor::from_slice(&values).view(var.size().as_slice()));
        }
    });
}

fn mlp(path: &nn::Path) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(path / "0", 8, 16, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(path / "2", 16, 4, Default::default()))
}

#[test]
fn double_and_half_variables_are_clustered_in_their_kind() {
    tch::manual_seed(9);
    for kind in [Kind::Double, Kind::Half] {
        let weights = Tensor::randn([4, 12], (Kind::Float, Device::Cpu)).to_kind(kind);
        let (vs, w) = store_with("0", &weights);
        let clusterer = Clusterer::new(&vs, config(3)).unwrap();
        assert_eq!(w.kind(), kind);
        assert!(most_distinct_per_group(&w, 1) <= 3);
        let codebook = &clusterer.codebooks().unwrap()[0];
        assert_eq!(codebook.values.kind(), kind);
        assert!(codebook.decode().unwrap().equal(&w));
    }
}

#[test]
fn the_centroid_learning_rate_can_follow_a_schedule() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _fc = nn::linear(vs.root() / "0", 8, 2, Default::default());
    let mut clusterer = Clusterer::new(&vs, config(3)).unwrap();
    clusterer.set_centroid_learning_rate(1e-4).unwrap();
    assert_eq!(clusterer.config().optimizer.learning_rate(), 1e-4);
    assert!(matches!(
        clusterer.set_centroid_learning_rate(0.0),
        Err(Error::InvalidOptimizer(_))
    ));
    assert_eq!(clusterer.config().optimizer.learning_rate(), 1e-4);
}
