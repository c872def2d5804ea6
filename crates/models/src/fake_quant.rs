//! Quantization-aware training: fake quantizers for any tch forward pass, and the fake
//! quantization of a [`Network`](crate::Network).
//!
//! Two public pieces round what a layer computes with to the grids the runtime's full-integer
//! mode executes, so that a model trained with them computes, once exported, what it was
//! trained to compute:
//!
//! - [`weight`] rounds a **weight** (`[out, ...]`) to the exporter's int8 grid: per output
//!   channel, symmetric, codes in `-127..=127`, `scale = max |w| / 127` (an all-zero channel
//!   gets scale 1); the scales are [`quantization::QParams::symmetric`]'s
//!   ([`weight_qparams`]), LibTorch's `fake_quantize_per_channel_affine` does the rounding;
//! - [`ActivationFakeQuant`] rounds a layer's **input** to a per-tensor, asymmetric `u8` grid
//!   over the range its own observer tracks, `[min(lo, 0), max(hi, 0)]`: the parameters of
//!   [`quantization::QParams::asymmetric`], applied by `fake_quantize_per_tensor_affine`.
//!
//! Both LibTorch ops pass the gradient straight through inside the grid's range (the
//! straight-through estimator) and block it outside, so training learns weights that survive
//! the rounding. An activation observer tracks, during its first
//! [`FakeQuantConfig::observer_steps`] training-mode calls, an exponential moving average of
//! the batch minimum and maximum (the first batch sets them); then it freezes, and the grid no
//! longer moves while the weights settle. In eval mode it never changes. A quantizer that has
//! seen nothing yet passes its input through unrounded.
//!
//! A model of one's own calls them in its forward pass (one [`ActivationFakeQuant`] per
//! quantized layer, called once per pass):
//!
//! ```
//! use models::fake_quant::{self, ActivationFakeQuant};
//! use models::FakeQuantConfig;
//! use tch::{nn, Device, Kind, Tensor};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let fc0 = nn::linear(vs.root() / "fc0", 16, 8, Default::default());
//! let input_quant = ActivationFakeQuant::new(FakeQuantConfig { observer_steps: 2, averaging: 0.1 })?;
//!
//! for _ in 0..3 {
//!     let xs = Tensor::randn([4, 16], (Kind::Float, Device::Cpu));
//!     let x = input_quant.forward_t(&xs, true)?;
//!     let w = fake_quant::weight(&fc0.ws)?;
//!     let _ = x.linear(&w, fc0.bs.as_ref());
//! }
//! assert!(input_quant.frozen());
//! let grid = input_quant.qparams().expect("observed");
//! assert_eq!((grid.qmin, grid.qmax), (0, 255));
//! # Ok::<(), models::Error>(())
//! ```
//!
//! A [`Network`](crate::Network) uses exactly these pieces when fake quantization is on
//! ([`Network::enable_fake_quant`](crate::Network::enable_fake_quant)): every `conv2d` and
//! `linear` layer gets its weight through [`weight`] and its input through its own
//! [`ActivationFakeQuant`]. Fake quantization acts on the deployed form of a network: fold
//! batch norm first (`export::deployed_parameters` into a network built from
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
//! net.enable_fake_quant(FakeQuantConfig { observer_steps: 1, averaging: 0.01 })?;
//! let xs = Tensor::randn([4, 1, 28, 28], (Kind::Float, Device::Cpu));
//! let _ = net.forward_t(&xs, true); // observes, then freezes
//! let ranges = net.activation_ranges();
//! assert_eq!(ranges.len(), 4); // the student's two convolutions and two linear layers
//! assert!(ranges.iter().all(|r| r.min <= 0.0 && r.max > 0.0));
//! # Ok::<(), models::Error>(())
//! ```

use std::sync::{Mutex, MutexGuard, PoisonError};

use quantization::{BitWidth, QParams};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// How fake quantization observes activation ranges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FakeQuantConfig {
    /// Training-mode calls during which an observer updates; it freezes after.
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

impl FakeQuantConfig {
    /// Checks that [`FakeQuantConfig::averaging`] lies in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if self.averaging > 0.0 && self.averaging <= 1.0 {
            Ok(())
        } else {
            Err(Error::InvalidAveraging(self.averaging))
        }
    }
}

/// The observed input range of one quantized layer of a [`Network`](crate::Network).
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

fn float_kind(tensor: &Tensor) -> Result<Kind> {
    let kind = tensor.f_kind()?;
    match kind {
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double => Ok(kind),
        _ => Err(Error::NotFloatingPoint { kind }),
    }
}

/// The per-output-channel int8 parameters of a weight (`[out, ...]`; a 1-D weight has one
/// channel per element): [`QParams::symmetric`] of each channel's `max |w|`, so `scale =
/// max |w| / 127`, codes in `-127..=127`, scale 1 for an all-zero channel.
pub fn weight_qparams(weight: &Tensor) -> Result<Vec<QParams>> {
    float_kind(weight)?;
    let rank = weight.dim();
    if rank == 0 {
        return Err(Error::Shape(
            "a weight needs an output-channel dimension, got a scalar".into(),
        ));
    }
    let max_abs = tch::no_grad(|| -> Result<Tensor> {
        let abs = weight.detach().f_abs()?;
        let dims: Vec<i64> = (1..rank as i64).collect();
        let max_abs = if dims.is_empty() {
            abs
        } else {
            abs.f_amax(dims.as_slice(), false)?
        };
        Ok(max_abs.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?)
    })?;
    let max_abs = Vec::<f32>::try_from(&max_abs)?;
    Ok(max_abs
        .into_iter()
        .map(|m| QParams::symmetric(m, BitWidth::INT8))
        .collect())
}

/// Rounds a weight (`[out, ...]`) to the exporter's per-channel symmetric int8 grid (the
/// parameters of [`weight_qparams`]), with the straight-through gradient: every value of the
/// result is `scale * code` for its channel's scale and an integer code in `-127..=127`.
pub fn weight(weight: &Tensor) -> Result<Tensor> {
    let params = weight_qparams(weight)?;
    let device = weight.device();
    let scales: Vec<f32> = params.iter().map(|p| p.scale).collect();
    let scale = Tensor::f_from_slice(&scales)?.f_to_device(device)?;
    let zero_point = Tensor::f_zeros([scales.len() as i64], (Kind::Int, device))?;
    let qmax = BitWidth::INT8.symmetric_max();
    Ok(weight.f_fake_quantize_per_channel_affine(
        &scale,
        &zero_point,
        0,
        i64::from(-qmax),
        i64::from(qmax),
    )?)
}

#[derive(Debug, Default)]
struct ObserverState {
    range: Option<(f32, f32)>,
    steps: usize,
}

/// A per-tensor asymmetric `u8` fake quantizer of a layer's input, with its own
/// moving-average min/max observer (see the [module](self) documentation).
///
/// It holds its state behind a lock, so a model's `forward_t(&self, ...)` can drive it and
/// the model stays `Send` and `Sync`.
#[derive(Debug)]
pub struct ActivationFakeQuant {
    config: FakeQuantConfig,
    state: Mutex<ObserverState>,
}

impl ActivationFakeQuant {
    /// A quantizer whose observer has seen nothing; [`Error::InvalidAveraging`] unless
    /// `config.averaging` lies in (0, 1].
    pub fn new(config: FakeQuantConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            state: Mutex::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, ObserverState> {
        // The lock is never held across anything that can panic; a poisoned one still holds
        // a consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The configuration it was built with.
    pub fn config(&self) -> FakeQuantConfig {
        self.config
    }

    /// Fake-quantizes `xs`. In training mode the call counts a step, and during the first
    /// [`FakeQuantConfig::observer_steps`] steps it first updates the observer with the batch's
    /// minimum and maximum (non-finite extremes are skipped). Before anything was observed the
    /// input passes through unchanged.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        float_kind(xs)?;
        let mut state = self.state();
        if train {
            state.steps += 1;
            if state.steps <= self.config.observer_steps {
                let (lo, hi) = tch::no_grad(|| -> Result<(f64, f64)> {
                    let (lo, hi) = xs.detach().f_aminmax(None, false)?;
                    Ok((lo.f_double_value(&[])?, hi.f_double_value(&[])?))
                })?;
                let (lo, hi) = (lo as f32, hi as f32);
                if lo.is_finite() && hi.is_finite() {
                    let a = self.config.averaging as f32;
                    state.range = Some(match state.range {
                        None => (lo, hi),
                        Some((min, max)) => (min + a * (lo - min), max + a * (hi - max)),
                    });
                }
            }
        }
        let range = state.range;
        drop(state);
        match range {
            None => Ok(xs.shallow_clone()),
            Some((min, max)) => {
                let p = QParams::asymmetric(min, max, BitWidth::INT8);
                Ok(xs.f_fake_quantize_per_tensor_affine(
                    f64::from(p.scale),
                    i64::from(p.zero_point),
                    i64::from(p.qmin),
                    i64::from(p.qmax),
                )?)
            }
        }
    }

    /// The observed `(min, max)`, `None` before the first training-mode call.
    pub fn range(&self) -> Option<(f32, f32)> {
        self.state().range
    }

    /// The `u8` grid inputs are rounded to ([`QParams::asymmetric`] of the observed range),
    /// `None` before the first training-mode call.
    pub fn qparams(&self) -> Option<QParams> {
        self.range()
            .map(|(min, max)| QParams::asymmetric(min, max, BitWidth::INT8))
    }

    /// Training-mode calls so far.
    pub fn steps(&self) -> usize {
        self.state().steps
    }

    /// Whether the observer no longer moves.
    pub fn frozen(&self) -> bool {
        self.steps() >= self.config.observer_steps
    }
}

/// The fake-quantization state of a network: one activation quantizer per quantized layer.
#[derive(Debug)]
pub(crate) struct NetworkFakeQuant {
    inputs: Vec<(usize, ActivationFakeQuant)>,
}

impl NetworkFakeQuant {
    pub(crate) fn new(
        config: FakeQuantConfig,
        layers: impl IntoIterator<Item = usize>,
    ) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            inputs: layers
                .into_iter()
                .map(|layer| Ok((layer, ActivationFakeQuant::new(config)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// Whether every observer has frozen.
    pub(crate) fn frozen(&self) -> bool {
        self.inputs.iter().all(|(_, q)| q.frozen())
    }

    pub(crate) fn ranges(&self) -> Vec<ActivationRange> {
        self.inputs
            .iter()
            .filter_map(|(layer, q)| {
                q.range().map(|(min, max)| ActivationRange {
                    layer: *layer,
                    min,
                    max,
                })
            })
            .collect()
    }

    /// The input and weight of layer `layer` as the forward pass uses them: fake-quantized
    /// (the input by the layer's quantizer, the weight per channel) when `fake_quant` is on,
    /// as they are otherwise.
    pub(crate) fn operands(
        fake_quant: Option<&Self>,
        layer: usize,
        xs: &Tensor,
        weight: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        Ok(match fake_quant {
            None => (xs.shallow_clone(), weight.shallow_clone()),
            Some(fq) => (fq.input(layer, xs, train)?, self::weight(weight)?),
        })
    }

    /// Fake-quantizes the input of `layer` (unchanged for a layer without a quantizer).
    pub(crate) fn input(&self, layer: usize, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self.inputs.iter().find(|(l, _)| *l == layer) {
            None => Ok(xs.shallow_clone()),
            Some((_, q)) => q.forward_t(xs, train),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_scales_come_from_the_quantization_crate() {
        let w = Tensor::from_slice(&[0.5f32, -1.27, 0.0, 0.0, 2.54, 1.0]).view([3, 2]);
        let params = weight_qparams(&w).unwrap();
        assert_eq!(
            params,
            [
                QParams::symmetric(1.27, BitWidth::INT8),
                QParams::symmetric(0.0, BitWidth::INT8),
                QParams::symmetric(2.54, BitWidth::INT8),
            ]
        );
        assert_eq!(params[1].scale, 1.0);
        // A 1-D weight: one channel per element.
        assert_eq!(weight_qparams(&w.view([6])).unwrap().len(), 6);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let ints = Tensor::from_slice(&[1i64, 2]);
        assert!(matches!(
            weight(&ints),
            Err(Error::NotFloatingPoint { kind: Kind::Int64 })
        ));
        assert!(matches!(
            weight(&Tensor::from(1.0f32)),
            Err(Error::Shape(_))
        ));
        for averaging in [0.0, -0.5, 1.5, f64::NAN] {
            let config = FakeQuantConfig {
                observer_steps: 1,
                averaging,
            };
            assert!(matches!(
                ActivationFakeQuant::new(config),
                Err(Error::InvalidAveraging(_))
            ));
        }
        let q = ActivationFakeQuant::new(FakeQuantConfig::default()).unwrap();
        let empty = Tensor::zeros([0], (Kind::Float, Device::Cpu));
        assert!(q.forward_t(&empty, true).is_err());
        assert!(matches!(
            q.forward_t(&ints, false),
            Err(Error::NotFloatingPoint { .. })
        ));
    }

    #[test]
    fn the_first_batch_sets_the_range_then_it_averages_and_freezes() {
        let q = ActivationFakeQuant::new(FakeQuantConfig {
            observer_steps: 2,
            averaging: 0.5,
        })
        .unwrap();
        let batch = |lo: f32, hi: f32| Tensor::from_slice(&[lo, 0.5, hi]);
        let untouched = q.forward_t(&batch(-1.0, 3.0), false).unwrap();
        assert!(untouched.equal(&batch(-1.0, 3.0)), "nothing observed yet");
        assert_eq!(q.range(), None);
        let _ = q.forward_t(&batch(-1.0, 3.0), true).unwrap();
        assert_eq!(q.range(), Some((-1.0, 3.0)));
        let _ = q.forward_t(&batch(-3.0, 5.0), true).unwrap();
        assert_eq!(q.range(), Some((-2.0, 4.0)));
        assert!(q.frozen());
        let _ = q.forward_t(&batch(-100.0, 100.0), true).unwrap();
        assert_eq!(q.range(), Some((-2.0, 4.0)));
        assert_eq!(q.steps(), 3);
        let p = q.qparams().unwrap();
        assert_eq!(p, QParams::asymmetric(-2.0, 4.0, BitWidth::INT8));
        // Outside the range values clip to its ends.
        let out = q.forward_t(&batch(-100.0, 100.0), false).unwrap();
        let out = Vec::<f32>::try_from(&out).unwrap();
        let (lo, hi) = p.range();
        assert_eq!((out[0], out[2]), (lo, hi));
    }
}
