//! Activation-range calibration: min-max, percentile, entropy (KL) and MSE.

use serde::{Deserialize, Serialize};

use crate::sample::Reservoir;
use crate::{BitWidth, Error, QParams, Result, check_finite};

/// Bins of the histogram the entropy and MSE calibrators search over.
const BINS: usize = 2048;
/// Values an observer keeps by default; beyond this it keeps a uniform sample.
const DEFAULT_CAPACITY: usize = 1 << 22;
/// The default seed of an observer's sampling.
const DEFAULT_SEED: u64 = 0x7463_682d_6d6f_7401;
/// The share of the non-zero kept values that one exact value must hold to count as a point
/// mass for the entropy calibrator. A continuous activation repeats an exact `f32` value
/// far more rarely; a constant region of the input (an image's background) or a clamp's
/// ceiling (ReLU6) repeats one in every image. Measured on MNIST's depthwise network: 1%
/// still let the calibrator clip a ReLU6 ceiling (98.53% against 98.80% at 0.2%).
const POINT_MASS_SHARE: f64 = 0.002;

/// How a calibrated range is chosen from the observed values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Method {
    /// The observed minimum and maximum.
    MinMax,
    /// The given percentile of the values at the top (and its mirror at the bottom): outliers
    /// are clipped. 99.99 is the usual choice.
    Percentile(f64),
    /// The clipping threshold whose quantized histogram is closest in KL divergence to the
    /// observed one (TensorRT's entropy calibration).
    Entropy,
    /// The clipping threshold with the smallest mean squared quantization error.
    Mse,
}

impl Default for Method {
    fn default() -> Self {
        Self::Percentile(99.99)
    }
}

impl Method {
    /// Checks the method's own parameter.
    pub fn validate(self) -> Result<()> {
        match self {
            Self::Percentile(p) if !(p > 0.0 && p <= 100.0) => Err(Error::InvalidPercentile(p)),
            _ => Ok(()),
        }
    }
}

/// How much an [`Observer`] keeps, and the seed of its sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObserverConfig {
    /// The most values kept for the percentile and histogram calibrators; beyond it the
    /// observer keeps a uniform sample of everything observed. Positive.
    pub capacity: usize,
    /// Seed of the sampling: the same batches give the same sample.
    pub seed: u64,
}

impl Default for ObserverConfig {
    /// 2^22 values (16 MiB), a fixed seed.
    fn default() -> Self {
        Self {
            capacity: DEFAULT_CAPACITY,
            seed: DEFAULT_SEED,
        }
    }
}

/// Collects activation values over calibration batches, then chooses a range.
///
/// The exact minimum and maximum of every observed value are kept; the values themselves,
/// for the percentile and histogram calibrators, up to [`ObserverConfig::capacity`], then
/// as a uniform sample (reservoir sampling, seeded): every observed value has the same
/// chance of being kept, whichever batch it came in and however the stream was split into
/// batches.
///
/// ```
/// use quantization::{BitWidth, Method, Observer, ObserverConfig};
///
/// let mut observer = Observer::with_config(ObserverConfig { capacity: 1000, seed: 1 })?;
/// for batch in 0..10 {
///     let values: Vec<f32> = (0..500).map(|i| (batch * 500 + i) as f32).collect();
///     observer.observe(&values)?;
/// }
/// assert_eq!(observer.seen(), 5000);
/// assert_eq!(observer.sample().len(), 1000);
/// // Min-max is exact whatever was sampled.
/// assert_eq!(observer.range(Method::MinMax, BitWidth::INT8)?, (0.0, 4999.0));
/// # Ok::<(), quantization::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Observer {
    sample: Reservoir,
    seen: usize,
    min: f32,
    max: f32,
}

impl Default for Observer {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer {
    /// An empty observer with the default [`ObserverConfig`].
    pub fn new() -> Self {
        let config = ObserverConfig::default();
        Self {
            sample: Reservoir::new(config.capacity, config.seed),
            seen: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }

    /// An empty observer keeping at most `config.capacity` values, or
    /// [`Error::InvalidCapacity`] for a capacity of 0.
    pub fn with_config(config: ObserverConfig) -> Result<Self> {
        if config.capacity == 0 {
            return Err(Error::InvalidCapacity);
        }
        Ok(Self {
            sample: Reservoir::new(config.capacity, config.seed),
            ..Self::new()
        })
    }

    /// Records a batch of values; non-finite values are an error (and nothing of the batch
    /// is recorded).
    pub fn observe(&mut self, batch: &[f32]) -> Result<()> {
        check_finite(batch, "the calibration activations")?;
        self.seen += batch.len();
        (self.min, self.max) = batch
            .iter()
            .fold((self.min, self.max), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        self.sample.extend(batch);
        Ok(())
    }

    /// The values kept for the percentile and histogram calibrators: all of them while at
    /// most the capacity were observed, in order; a uniform sample of them afterwards.
    pub fn sample(&self) -> &[f32] {
        self.sample.values()
    }

    /// Number of values observed (sampled or not).
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// The calibrated `[min, max]` range by `method`.
    pub fn range(&self, method: Method, bits: BitWidth) -> Result<(f32, f32)> {
        method.validate()?;
        if self.seen == 0 {
            return Err(Error::EmptyCalibration);
        }
        let (min, max) = (self.min, self.max);
        Ok(match method {
            Method::MinMax => (min, max),
            Method::Percentile(p) => {
                let mut sorted = self.sample().to_vec();
                sorted.sort_by(f32::total_cmp);
                let at = |q: f64| {
                    let i = ((q / 100.0) * (sorted.len() - 1) as f64).round() as usize;
                    sorted[i.min(sorted.len() - 1)]
                };
                (at(100.0 - p), at(p))
            }
            // A histogram of a discrete input (an 8-bit image, say) is a comb of spikes,
            // against which Q's even spreading makes the divergence meaningless: with no more
            // distinct values than the grid has levels, entropy keeps the full range.
            Method::Entropy if self.distinct_at_most(bits.unsigned_max() as usize + 1) => {
                (min, max)
            }
            Method::Entropy | Method::Mse => {
                let threshold_fraction = self.best_threshold(method, min, max, bits);
                (
                    min.min(0.0) * threshold_fraction,
                    max.max(0.0) * threshold_fraction,
                )
            }
        })
    }

    /// The calibrated quantization parameters (asymmetric, unsigned).
    pub fn qparams(&self, method: Method, bits: BitWidth) -> Result<QParams> {
        let (min, max) = self.range(method, bits)?;
        Ok(QParams::asymmetric(min, max, bits))
    }

    /// Whether the kept values take at most `n` distinct values.
    fn distinct_at_most(&self, n: usize) -> bool {
        let mut seen: Vec<u32> = Vec::with_capacity(n + 1);
        for v in self.sample() {
            let bits = v.to_bits();
            if let Err(at) = seen.binary_search(&bits) {
                if seen.len() == n {
                    return false;
                }
                seen.insert(at, bits);
            }
        }
        true
    }

    /// The fraction of the observed magnitude range to keep, searched on a histogram of
    /// the kept values' magnitudes.
    fn best_threshold(&self, method: Method, min: f32, max: f32, bits: BitWidth) -> f32 {
        let top = min.abs().max(max.abs());
        if top == 0.0 {
            return 1.0;
        }
        let width = top / BINS as f32;
        // Zero is exact on every grid (the zero point), so exact zeros (half of a tensor
        // after a ReLU) cost nothing whatever the threshold; left in, their spike in the
        // first bin would dominate the divergence and drag the threshold to its minimum.
        let nonzero = self.sample().iter().copied().filter(|&v| v != 0.0);
        // Point masses do the same to the divergence, which only sees a histogram's shape:
        // a spike costs it the spreading over its level at every threshold but the
        // smallest, where each level is one bin. Inside the range a point mass moves by at
        // most half a step, so the entropy calibrator keeps every one inside the range and
        // searches the threshold on the rest.
        let masses = match method {
            Method::Entropy => point_masses(nonzero.clone()),
            _ => Vec::new(),
        };
        let mut hist = vec![0f64; BINS];
        for v in nonzero.filter(|v| masses.binary_search(&v.to_bits()).is_err()) {
            let bin = ((v.abs() / width) as usize).min(BINS - 1);
            hist[bin] += 1.0;
        }
        // Quantization levels on the side of zero the histogram covers: a non-negative input
        // (after a ReLU) gets the whole unsigned grid, a signed one about half of it.
        let levels = if min >= 0.0 {
            bits.unsigned_max() as usize
        } else {
            1usize << (bits.get() - 1)
        };
        // The smallest threshold that keeps every point mass.
        let covering = masses
            .iter()
            .map(|&m| ((f32::from_bits(m).abs() / width).ceil() as usize).min(BINS))
            .max()
            .unwrap_or(0);
        let start = levels.min(BINS).max(covering);
        let mut best = (f64::INFINITY, BINS);
        for end in start..=BINS {
            let cost = match method {
                Method::Entropy => kl_cost(&hist, end, levels),
                _ => mse_cost(&hist, end, levels, width as f64),
            };
            if cost < best.0 {
                best = (cost, end);
            }
        }
        best.1 as f32 / BINS as f32
    }
}

/// The bit patterns, sorted, of the values that each hold at least [`POINT_MASS_SHARE`] of
/// `values`.
fn point_masses(values: impl Iterator<Item = f32>) -> Vec<u32> {
    let mut bits: Vec<u32> = values.map(f32::to_bits).collect();
    bits.sort_unstable();
    let least = ((bits.len() as f64 * POINT_MASS_SHARE).ceil() as usize).max(2);
    bits.chunk_by(|a, b| a == b)
        .filter(|run| run.len() >= least)
        .map(|run| run[0])
        .collect()
}

/// KL(P || Q) of the histogram clipped at `end` bins (outliers folded into the last bin)
/// against its quantization to `levels` levels.
fn kl_cost(hist: &[f64], end: usize, levels: usize) -> f64 {
    // TensorRT's entropy calibration: P is the histogram clipped at `end` with the clipped
    // mass added to its last bin; Q quantizes the unclipped bins into `levels` levels (each
    // level's mass spread evenly over its non-empty bins), so clipping costs divergence.
    let mut p: Vec<f64> = hist[..end].to_vec();
    p[end - 1] += hist[end..].iter().sum::<f64>();
    let total: f64 = p.iter().sum();
    if total == 0.0 {
        return 0.0;
    }
    let kept = &hist[..end];
    let mut q = vec![0f64; end];
    for level in 0..levels {
        let lo = level * end / levels;
        let hi = ((level + 1) * end / levels).max(lo + 1).min(end);
        if lo >= end {
            break;
        }
        let mass: f64 = kept[lo..hi].iter().sum();
        let nonzero = kept[lo..hi].iter().filter(|&&x| x > 0.0).count();
        if nonzero > 0 {
            for i in lo..hi {
                if kept[i] > 0.0 {
                    q[i] = mass / nonzero as f64;
                }
            }
        }
    }
    let q_total: f64 = q.iter().sum();
    p.iter()
        .zip(&q)
        .filter(|(pi, _)| **pi > 0.0)
        .map(|(pi, qi)| {
            let (pn, qn) = (pi / total, (qi / q_total).max(1e-12));
            pn * (pn / qn).ln()
        })
        .sum()
}

/// Mean squared error of quantizing the histogram's bin centres with a clip at `end` bins
/// and `levels` levels.
fn mse_cost(hist: &[f64], end: usize, levels: usize, width: f64) -> f64 {
    let clip = end as f64 * width;
    let step = clip / levels as f64;
    hist.iter()
        .enumerate()
        .filter(|(_, count)| **count > 0.0)
        .map(|(i, count)| {
            let x = (i as f64 + 0.5) * width;
            let q = (x / step).round().min(levels as f64) * step;
            count * (x - q).powi(2)
        })
        .sum()
}
