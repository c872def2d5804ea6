//! Quantization-aware training: fake quantization inside a [`Network`]'s forward pass.
//!
//! With fake quantization on ([`Network::enable_fake_quant`]), every `conv2d` and `linear`
//! layer computes with
//!
//! - its **weight** rounded to the int8 grid the exporter will use: per output channel,
//!   symmetric, `scale = max |w| / 127`, codes in `-127..=127`
//!   (`fake_quantize_per_channel_affine`);
//! - its **input** rounded to a per-tensor, asymmetric `u8` grid over the observed range
//!   `[min(lo, 0), max(hi, 0)]` (`fake_quantize_per_tensor_affine`, codes `0..=255`), exactly
//!   the parameters [`quantization::QParams::asymmetric`] gives and the runtime's static mode
//!   uses.
//!
//! Both LibTorch ops pass the gradient straight through inside the grid's range (the
//! straight-through estimator) and block it outside, so training learns weights that survive
//! the rounding. The input ranges come from observers: during the first
//! [`FakeQuantConfig::observer_steps`] training-mode forward passes each one tracks an
//! exponential moving average of its batch minimum and maximum (the first batch sets them);
//! then they freeze, and the grid no longer moves while the weights settle. In eval mode the
//! observers never change. A layer whose observer has seen nothing yet passes its input
//! through unrounded.
//!
//! Fake quantization acts on the deployed form of a network: fold batch norm first
//! (`export::deployed_parameters` into a network built from
//! [`NetworkSpec::without_batch_norm`](crate::NetworkSpec::without_batch_norm)), since the
//! runtime executes the folded convolution.
//!
//! ```
//! use models::{FakeQuantConfig, Network, NetworkSpec};
//! use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let spec = NetworkSpec::student_cnn().without_batch_norm();
//! let mut net = Network::new(&vs.root(), &spec)?;
//! net.enable_fake_quant(FakeQuantConfig { observer_steps: 1, averaging: 0.01 });
//! let xs = Tensor::randn([4, 1, 28, 28], (Kind::Float, Device::Cpu));
//! let _ = net.forward_t(&xs, true); // observes, then freezes
//! let ranges = net.activation_ranges();
//! assert_eq!(ranges.len(), 4); // the student's two convolutions and two linear layers
//! assert!(ranges.iter().all(|r| r.min <= 0.0 && r.max > 0.0));
//! # Ok::<(), models::Error>(())
//! ```

use std::cell::Cell;

use quantization::{BitWidth, QParams};
use tch::{Kind, Tensor};

/// How fake quantization observes activation ranges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FakeQuantConfig {
    /// Training-mode forward passes during which the observers update; they freeze after.
    pub observer_steps: usize,
    /// Weight of a new batch in the moving average of the minimum and maximum, in (0, 1].
    pub averaging: f64,
}

impl Default for FakeQuantConfig {
    /// PyTorch's `MovingAverageMinMaxObserver` averaging (0.01), frozen after 200 steps.
    fn default() -> Self {
        Self {
            observer_steps: 200,
            averaging: 0.01,
        }
    }
}

/// The observed input range of one quantized layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActivationRange {
    /// The layer's index in the network.
    pub layer: usize,
    /// The smallest input value, averaged (never above 0 once read through
    /// [`ActivationRange::qparams`]).
    pub min: f32,
    /// The largest input value, averaged.
    pub max: f32,
}

impl ActivationRange {
    /// The asymmetric `u8` parameters of this range, as exported.
    pub fn qparams(&self) -> QParams {
        QParams::asymmetric(self.min, self.max, BitWidth::INT8)
    }
}

#[derive(Debug)]
struct Observer {
    layer: usize,
    range: Cell<Option<(f32, f32)>>,
}

/// The fake-quantization state of a network.
#[derive(Debug)]
pub(crate) struct FakeQuant {
    config: FakeQuantConfig,
    observers: Vec<Observer>,
    steps: Cell<usize>,
}

impl FakeQuant {
    pub(crate) fn new(config: FakeQuantConfig, layers: impl IntoIterator<Item = usize>) -> Self {
        Self {
            config,
            observers: layers
                .into_iter()
                .map(|layer| Observer {
                    layer,
                    range: Cell::new(None),
                })
                .collect(),
            steps: Cell::new(0),
        }
    }

    /// Counts a training-mode forward pass (call once per pass, before the layers).
    pub(crate) fn begin_pass(&self, train: bool) {
        if train {
            self.steps.set(self.steps.get() + 1);
        }
    }

    fn observing(&self, train: bool) -> bool {
        train && self.steps.get() <= self.config.observer_steps
    }

    /// Whether the observers still move.
    pub(crate) fn frozen(&self) -> bool {
        self.steps.get() >= self.config.observer_steps
    }

    pub(crate) fn ranges(&self) -> Vec<ActivationRange> {
        self.observers
            .iter()
            .filter_map(|o| {
                o.range.get().map(|(min, max)| ActivationRange {
                    layer: o.layer,
                    min,
                    max,
                })
            })
            .collect()
    }

    /// Fake-quantizes the input of `layer`, updating its observer when observing.
    pub(crate) fn input(&self, layer: usize, xs: &Tensor, train: bool) -> Tensor {
        let Some(observer) = self.observers.iter().find(|o| o.layer == layer) else {
            return xs.shallow_clone();
        };
        if self.observing(train) {
            let (lo, hi) = tch::no_grad(|| {
                let x = xs.detach().to_kind(Kind::Float);
                (x.min().double_value(&[]), x.max().double_value(&[]))
            });
            let (lo, hi) = (lo as f32, hi as f32);
            if lo.is_finite() && hi.is_finite() {
                let a = self.config.averaging as f32;
                let updated = match observer.range.get() {
                    None => (lo, hi),
                    Some((min, max)) => (min + a * (lo - min), max + a * (hi - max)),
                };
                observer.range.set(Some(updated));
            }
        }
        match observer.range.get() {
            None => xs.shallow_clone(),
            Some((min, max)) => {
                let p = QParams::asymmetric(min, max, BitWidth::INT8);
                xs.fake_quantize_per_tensor_affine(
                    f64::from(p.scale),
                    i64::from(p.zero_point),
                    i64::from(p.qmin),
                    i64::from(p.qmax),
                )
            }
        }
    }
}

/// Rounds a weight (`[out, ...]`) to the exporter's per-channel symmetric int8 grid
/// (`max |w| / 127` per output channel; an all-zero channel gets scale 1, like the
/// exporter), with the straight-through gradient.
pub fn weight(weight: &Tensor) -> Tensor {
    let qmax = BitWidth::INT8.symmetric_max();
    let dims: Vec<i64> = (1..weight.dim() as i64).collect();
    let scale = tch::no_grad(|| {
        let max_abs = weight.detach().abs().amax(dims.as_slice(), false);
        let scale = &max_abs / f64::from(qmax);
        // A zero channel: any positive scale gives zeros back.
        scale.where_self(&max_abs.gt(0.0), &scale.ones_like())
    });
    let zero_point = scale.zeros_like().to_kind(Kind::Int);
    weight.fake_quantize_per_channel_affine(
        &scale,
        &zero_point,
        0,
        i64::from(-qmax),
        i64::from(qmax),
    )
}
