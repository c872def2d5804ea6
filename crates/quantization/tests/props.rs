//! Properties of the quantizers and calibrators.

use proptest::prelude::*;
use quantization::{
    BitWidth, Error, Granularity, Method, Observer, ObserverConfig, QParams, quantize_weights,
};

/// Float slack on "at most half a step" (the division and the rounding each round once).
const HALF_STEP_SLACK: f32 = 1e-5;

fn bits() -> impl Strategy<Value = BitWidth> {
    (2u32..=8).prop_map(|b| BitWidth::new(b).unwrap())
}

proptest! {
    #[test]
    fn round_trip_error_is_at_most_half_a_step_inside_the_range(
        lo in -100.0f32..0.0, hi in 0.0f32..100.0, t in 0.0f32..=1.0, bits in bits(), symmetric in any::<bool>(),
    ) {
        let p = if symmetric { QParams::symmetric(lo.abs().max(hi), bits) } else { QParams::asymmetric(lo, hi, bits) };
        prop_assert!(p.scale > 0.0 && p.scale.is_finite());
        let (min, max) = p.range();
        let x = min + t * (max - min);
        let err = (p.dequantize(p.quantize(x)) - x).abs();
        prop_assert!(err <= p.scale * (0.5 + HALF_STEP_SLACK), "x {x} err {err} scale {}", p.scale);
        // Zero is exact.
        prop_assert_eq!(p.dequantize(p.quantize(0.0)), 0.0);
    }

    #[test]
    fn requantizing_dequantized_values_gives_the_same_levels(
        lo in -50.0f32..0.0, hi in 0.0f32..50.0, q in 0i32..=255, bits in bits(),
    ) {
        let p = QParams::asymmetric(lo, hi, bits);
        let q = q.clamp(p.qmin, p.qmax);
        prop_assert_eq!(p.quantize(p.dequantize(q)), q);
        let s = QParams::symmetric(hi.max(1e-3), bits);
        let q = q.clamp(s.qmin, s.qmax);
        prop_assert_eq!(s.quantize(s.dequantize(q)), q);
    }

    #[test]
    fn per_channel_error_never_exceeds_per_tensor_error(
        rows in 1usize..8, cols in 1usize..16, seed in prop::collection::vec(-10.0f32..10.0, 128), scale_rows in prop::collection::vec(0.01f32..10.0, 8),
    ) {
        let w: Vec<f32> = (0..rows * cols).map(|i| seed[i % seed.len()] * scale_rows[i / cols]).collect();
        // Realised errors depend on where values fall between levels; the guarantee is on
        // the steps: no channel's step exceeds the tensor's, so every per-channel error is
        // within half of the per-tensor step.
        let pc = quantize_weights(&w, rows, Granularity::PerChannel, BitWidth::INT8).unwrap();
        let pt = quantize_weights(&w, rows, Granularity::PerTensor, BitWidth::INT8).unwrap();
        let tensor_step = pt.scales[0];
        prop_assert!(pc.scales.iter().all(|&s| s <= tensor_step));
        for (i, &x) in w.iter().enumerate() {
            let err = (f32::from(pc.values[i]) * pc.scales[i / cols] - x).abs();
            prop_assert!(err <= tensor_step * (0.5 + HALF_STEP_SLACK), "element {i}: {err}");
        }
    }

}

proptest! {
    // Each case runs the entropy and MSE searches over a 2048-bin histogram.
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn calibrated_ranges_are_ordered_and_scales_valid(
        values in prop::collection::vec(-20.0f32..20.0, 1..400), p in 90.0f64..=100.0,
    ) {
        let mut observer = Observer::new();
        observer.observe(&values).unwrap();
        for method in [Method::MinMax, Method::Percentile(p), Method::Entropy, Method::Mse] {
            let (lo, hi) = observer.range(method, BitWidth::INT8).unwrap();
            prop_assert!(lo <= hi, "{method:?}: {lo} > {hi}");
            let q = observer.qparams(method, BitWidth::INT8).unwrap();
            prop_assert!(q.scale > 0.0 && q.scale.is_finite());
            prop_assert!((q.qmin..=q.qmax).contains(&q.zero_point));
        }
    }
}

#[test]
fn clipping_calibrators_ignore_a_far_outlier() {
    // Mostly uniform in [0, 1] with one value at 100: min-max keeps the outlier, the
    // clipping calibrators cut it and so resolve the bulk far better (MSE rightly keeps a
    // single outlier: clipping it costs more squared error than coarse steps). (The histogram
    // calibrators search thresholds from 256 of their 2048 bins up, as TensorRT's does, so
    // an outlier beyond 2048 / 256 times the bulk would be out of their reach.)
    let mut values: Vec<f32> = (0..100_000).map(|i| (i % 1000) as f32 / 1000.0).collect();
    values.push(100.0);
    let mut observer = Observer::new();
    observer.observe(&values).unwrap();
    let (_, minmax) = observer.range(Method::MinMax, BitWidth::INT8).unwrap();
    assert_eq!(minmax, 100.0);
    for method in [Method::Percentile(99.99), Method::Entropy] {
        let (_, hi) = observer.range(method, BitWidth::INT8).unwrap();
        assert!(hi < 50.0, "{method:?} kept {hi}");
        assert!(hi >= 0.9, "{method:?} clipped the bulk at {hi}");
    }
}

#[test]
fn entropy_and_mse_keep_the_bulk_of_a_relu_like_distribution() {
    // Exponentially distributed values (as after a ReLU): the 99th percentile is ln 100.
    let n = 100_000;
    let mut values: Vec<f32> = (0..n)
        .map(|i| -(1.0 - (i as f64 + 0.5) / n as f64).ln() as f32)
        .collect();
    // The ReLU's zeros: as many as the positive values.
    values.extend(std::iter::repeat_n(0.0, n));
    let mut observer = Observer::new();
    observer.observe(&values).unwrap();
    let p99 = 100f32.ln();
    for method in [Method::Entropy, Method::Mse] {
        let (lo, hi) = observer.range(method, BitWidth::INT8).unwrap();
        assert_eq!(lo, 0.0, "{method:?}");
        assert!(
            hi >= p99,
            "{method:?} clipped at {hi}, below the 99th percentile {p99}"
        );
        assert!(hi <= values[n - 1], "{method:?}: {hi}");
        let _ = lo;
    }
}

#[test]
fn entropy_keeps_the_full_range_of_a_discrete_input() {
    // Normalised 8-bit pixels: mostly background, some ink, a few grey levels.
    let pixel = |p: u8| (f32::from(p) / 255.0 - 0.1307) / 0.3081;
    let values: Vec<f32> = (0..50_000u32)
        .map(|i| match i % 10 {
            0..=7 => pixel(0),
            8 => pixel(255),
            _ => pixel((i % 256) as u8),
        })
        .collect();
    let mut observer = Observer::new();
    observer.observe(&values).unwrap();
    assert_eq!(
        observer.range(Method::Entropy, BitWidth::INT8).unwrap(),
        observer.range(Method::MinMax, BitWidth::INT8).unwrap()
    );
}

#[test]
fn mse_calibration_has_no_more_error_than_min_max() {
    // A long-tailed distribution: MSE trades clipping the tail against resolution.
    let values: Vec<f32> = (1..20_000).map(|i| 1.0 / (i as f32 / 1000.0)).collect();
    let mut observer = Observer::new();
    observer.observe(&values).unwrap();
    let squared_error = |p: QParams| -> f64 {
        values
            .iter()
            .map(|&x| f64::from(p.dequantize(p.quantize(x)) - x).powi(2))
            .sum()
    };
    let mse = squared_error(observer.qparams(Method::Mse, BitWidth::INT8).unwrap());
    let minmax = squared_error(observer.qparams(Method::MinMax, BitWidth::INT8).unwrap());
    assert!(mse <= minmax, "mse {mse} vs min-max {minmax}");
    let (_, hi) = observer.range(Method::Mse, BitWidth::INT8).unwrap();
    assert!(hi < 1000.0, "the tail is clipped: {hi}");
}

#[test]
fn invalid_settings_and_inputs_are_errors() {
    for b in [0, 1, 9, 32] {
        assert!(matches!(BitWidth::new(b), Err(Error::InvalidBitWidth(_))));
    }
    let mut observer = Observer::new();
    assert!(matches!(
        observer.range(Method::MinMax, BitWidth::INT8),
        Err(Error::EmptyCalibration)
    ));
    for p in [0.0, -1.0, 100.5, f64::NAN] {
        observer.observe(&[1.0]).unwrap();
        assert!(matches!(
            observer.range(Method::Percentile(p), BitWidth::INT8),
            Err(Error::InvalidPercentile(_))
        ));
    }
    assert!(matches!(
        Observer::with_config(ObserverConfig {
            capacity: 0,
            seed: 0
        }),
        Err(Error::InvalidCapacity)
    ));
    let err = observer.observe(&[1.0, f32::NAN]).unwrap_err();
    assert!(err.to_string().contains("index 1"), "{err}");
    assert!(matches!(
        quantize_weights(
            &[1.0, f32::INFINITY],
            1,
            Granularity::PerChannel,
            BitWidth::INT8
        ),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        quantize_weights(&[1.0, 2.0, 3.0], 2, Granularity::PerChannel, BitWidth::INT8),
        Err(Error::Shape(_))
    ));
}

#[test]
fn constant_tensors_quantize_without_nan() {
    let q = quantize_weights(&[0.0; 6], 2, Granularity::PerChannel, BitWidth::INT8).unwrap();
    assert!(q.scales.iter().all(|s| s.is_finite() && *s > 0.0));
    assert!(q.values.iter().all(|&v| v == 0));
    let mut observer = Observer::new();
    observer.observe(&[3.0; 10]).unwrap();
    for method in [
        Method::MinMax,
        Method::Percentile(99.99),
        Method::Entropy,
        Method::Mse,
    ] {
        let p = observer.qparams(method, BitWidth::INT8).unwrap();
        assert!(p.scale.is_finite() && p.scale > 0.0, "{method:?}");
    }
}

/// Kept values per batch when an observer samples: with a capacity of 4096, a batch's share
/// of the sample has a standard deviation of at most `sqrt(0.25 / 4096)`, about 0.008
/// (hypergeometric, below the binomial's); 0.05 is over six of them from the batch's share
/// of the data.
const MAX_SHARE_DEVIATION: f64 = 0.05;

/// The capacity of the sampling observers below.
const SAMPLE_CAPACITY: usize = 4096;

fn sampling_observer(seed: u64) -> Observer {
    Observer::with_config(ObserverConfig {
        capacity: SAMPLE_CAPACITY,
        seed,
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn every_batch_keeps_its_share_of_the_sample(
        sizes in prop::collection::vec(1usize..6000, 2..12), seed in any::<u64>(),
    ) {
        // Batch `b` holds values in [b, b + 1): the sample tells which batch each came from.
        let mut observer = sampling_observer(seed);
        for (b, &n) in sizes.iter().enumerate() {
            let batch: Vec<f32> = (0..n).map(|i| b as f32 + i as f32 / n as f32).collect();
            observer.observe(&batch).unwrap();
        }
        let total: usize = sizes.iter().sum();
        prop_assert_eq!(observer.seen(), total);
        let sample = observer.sample();
        prop_assert_eq!(sample.len(), total.min(SAMPLE_CAPACITY));
        for (b, &n) in sizes.iter().enumerate() {
            let kept = sample.iter().filter(|&&v| v.floor() as usize == b).count();
            let share = kept as f64 / sample.len() as f64;
            let expected = n as f64 / total as f64;
            prop_assert!(
                (share - expected).abs() <= MAX_SHARE_DEVIATION,
                "batch {b} of {sizes:?}: {share:.4} of the sample, {expected:.4} of the data"
            );
        }
    }

    #[test]
    fn sampling_depends_on_the_seed_and_values_not_on_batch_boundaries(
        len in (SAMPLE_CAPACITY + 1)..3 * SAMPLE_CAPACITY, cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8), seed in any::<u64>(),
    ) {
        let values: Vec<f32> = (0..len).map(|i| i as f32).collect();
        let mut whole = sampling_observer(seed);
        whole.observe(&values).unwrap();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(len)).collect();
        cuts.sort_unstable();
        let mut pieces = sampling_observer(seed);
        let mut start = 0;
        for &cut in cuts.iter().chain([&len]) {
            pieces.observe(&values[start..cut]).unwrap();
            start = cut;
        }
        prop_assert_eq!(whole.sample(), pieces.sample());
        let mut other = sampling_observer(seed ^ 1);
        other.observe(&values).unwrap();
        prop_assert_ne!(whole.sample(), other.sample());
    }
}

#[test]
fn an_early_batch_is_not_forgotten() {
    // A first batch of large values, then many of small ones: a sample that favoured
    // recent batches would lose the first batch's tail, which the percentile keeps.
    let mut observer = sampling_observer(3);
    observer
        .observe(
            &(0..SAMPLE_CAPACITY)
                .map(|i| 100.0 + i as f32 / 1000.0)
                .collect::<Vec<_>>(),
        )
        .unwrap();
    for _ in 0..7 {
        observer.observe(&vec![1.0; SAMPLE_CAPACITY]).unwrap();
    }
    let large = observer.sample().iter().filter(|&&v| v >= 100.0).count();
    let share = large as f64 / SAMPLE_CAPACITY as f64;
    assert!((share - 0.125).abs() <= MAX_SHARE_DEVIATION, "{share}");
    // The 95th percentile is a value of the first batch (1/8 of the data lies above it).
    let (_, hi) = observer
        .range(Method::Percentile(95.0), BitWidth::INT8)
        .unwrap();
    assert!(hi >= 100.0, "{hi}");
}

#[test]
fn entropy_keeps_point_masses_in_range() {
    // After a convolution and ReLU6 over images that are mostly background: every channel
    // gives one exact value wherever its window sees only background (eight such values,
    // most of the tensor), a continuous bulk elsewhere, zeros, and the clamp's ceiling.
    let n = 100_000;
    let constants: Vec<f32> = (1..=8).map(|c| c as f32 * 0.35).collect();
    let mut values: Vec<f32> = (0..n)
        .map(|i| (-(1.0 - (i as f64 + 0.5) / n as f64).ln() as f32).min(6.0))
        .collect();
    let p99 = 100f32.ln();
    for &c in &constants {
        values.extend(std::iter::repeat_n(c, 4 * n / constants.len()));
    }
    values.extend(std::iter::repeat_n(0.0, n));
    let mut observer = Observer::new();
    observer.observe(&values).unwrap();
    let (lo, hi) = observer.range(Method::Entropy, BitWidth::INT8).unwrap();
    assert_eq!(lo, 0.0);
    assert!(hi >= constants[7], "clipped a point mass at {hi}");
    assert!(
        hi >= p99,
        "clipped at {hi}, below the bulk's 99th percentile {p99}"
    );
    assert!(hi <= 6.0);
}
