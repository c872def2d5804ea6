//! Calibration of activation ranges from any forward pass.
//!
//! A model of one's own reports the input of each layer it will quantize to a [`Calibrator`]
//! by name (`calibrator.tap("fc1", &x)`), batch after batch; each tap feeds its own
//! [`quantization::Observer`], and [`Calibrator::into_qparams`] turns them into the `u8`
//! parameters of the runtime's full-integer mode with the calibration [`Method`] the caller
//! chooses. [`calibrate`] runs the whole loop without gradients. A failed tap (a non-finite
//! activation, an integer tensor) does not interrupt the forward pass: the calibrator keeps
//! the first error and returns it from [`Calibrator::into_qparams`].
//!
//! ```
//! use models::calibrate::{Calibrator, calibrate};
//! use quantization::{BitWidth, Method};
//! use tch::{nn, Device, Kind, Tensor};
//!
//! // A plain-tch MLP of one's own, whose forward pass taps the input of each layer.
//! struct Mlp {
//!     fc0: nn::Linear,
//!     fc1: nn::Linear,
//! }
//!
//! impl Mlp {
//!     fn forward(&self, xs: &Tensor, taps: &mut Calibrator) -> Tensor {
//!         taps.tap("fc0", xs);
//!         let hidden = xs.apply(&self.fc0).relu();
//!         taps.tap("fc1", &hidden);
//!         hidden.apply(&self.fc1)
//!     }
//! }
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let mlp = Mlp {
//!     fc0: nn::linear(vs.root() / "fc0", 16, 32, Default::default()),
//!     fc1: nn::linear(vs.root() / "fc1", 32, 10, Default::default()),
//! };
//! let batches: Vec<Tensor> = (0..4)
//!     .map(|_| Tensor::randn([8, 16], (Kind::Float, Device::Cpu)))
//!     .collect();
//! let params = calibrate(&batches, Method::MinMax, BitWidth::INT8, |xs, taps| {
//!     mlp.forward(xs, taps);
//! })?;
//! assert_eq!(params.len(), 2);
//! assert_eq!(params[0].0, "fc0");
//! assert_eq!(params[1].1.zero_point, 0); // after ReLU: non-negative inputs
//! # Ok::<(), models::Error>(())
//! ```

use std::borrow::Borrow;

use quantization::{BitWidth, Method, Observer, QParams};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// The observers of a model's layer inputs, one per tap name, in the order of their first
/// tap.
#[derive(Debug, Default)]
pub struct Calibrator {
    taps: Vec<(String, Observer)>,
    error: Option<Error>,
}

impl Calibrator {
    /// A calibrator that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Observes every value of `xs` as input of the layer `name` (read as float32 on the
    /// CPU, without gradients). After a failure (kept for [`Calibrator::into_qparams`]) further taps
    /// are ignored.
    pub fn tap(&mut self, name: &str, xs: &Tensor) {
        if self.error.is_some() {
            return;
        }
        if let Err(error) = self.observe(name, xs) {
            self.error = Some(Error::Tap {
                tap: name.to_owned(),
                source: Box::new(error),
            });
        }
    }

    fn observe(&mut self, name: &str, xs: &Tensor) -> Result<()> {
        let kind = xs.f_kind()?;
        if !matches!(
            kind,
            Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
        ) {
            return Err(Error::NotFloatingPoint { kind });
        }
        let values = tch::no_grad(|| -> Result<Vec<f32>> {
            let flat = xs
                .detach()
                .f_to_kind(Kind::Float)?
                .f_to_device(Device::Cpu)?
                .f_reshape([-1])?;
            Ok(Vec::<f32>::try_from(&flat)?)
        })?;
        let at = match self.taps.iter().position(|(n, _)| n == name) {
            Some(at) => at,
            None => {
                self.taps.push((name.to_owned(), Observer::new()));
                self.taps.len() - 1
            }
        };
        self.taps[at].1.observe(&values)?;
        Ok(())
    }

    /// The tap names and their observers, in the order of their first tap.
    pub fn observers(&self) -> impl Iterator<Item = (&str, &Observer)> {
        self.taps.iter().map(|(name, o)| (name.as_str(), o))
    }

    /// The observer of `name`, if it was tapped.
    pub fn observer(&self, name: &str) -> Option<&Observer> {
        self.observers().find(|(n, _)| *n == name).map(|(_, o)| o)
    }

    /// The observers by tap name, or the first failed tap's error, or
    /// [`Error::NothingTapped`].
    pub fn into_observers(self) -> Result<Vec<(String, Observer)>> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.taps.is_empty() {
            return Err(Error::NothingTapped);
        }
        Ok(self.taps)
    }

    /// The first failed tap's error, if any.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// Each tap's asymmetric `u8` parameters chosen by `method` (`Observer::qparams`), by tap
    /// name in the order of the first taps; the first failed tap's error, or
    /// [`Error::NothingTapped`]. To choose by several methods from one calibration, take the
    /// observers ([`Calibrator::into_observers`]).
    pub fn into_qparams(self, method: Method, bits: BitWidth) -> Result<Vec<(String, QParams)>> {
        self.into_observers()?
            .into_iter()
            .map(|(name, observer)| match observer.qparams(method, bits) {
                Ok(p) => Ok((name, p)),
                Err(e) => Err(Error::Tap {
                    tap: name,
                    source: Box::new(e.into()),
                }),
            })
            .collect()
    }
}

/// Runs `forward` on every batch without gradients, handing it a [`Calibrator`] to tap the
/// layer inputs on, and returns each tap's parameters chosen by `method`
/// ([`Calibrator::into_qparams`]).
pub fn calibrate<I, F, R>(
    batches: I,
    method: Method,
    bits: BitWidth,
    mut forward: F,
) -> Result<Vec<(String, QParams)>>
where
    I: IntoIterator,
    I::Item: Borrow<Tensor>,
    F: FnMut(&Tensor, &mut Calibrator) -> R,
{
    method.validate()?;
    let mut calibrator = Calibrator::new();
    tch::no_grad(|| {
        for batch in batches {
            let _ = forward(batch.borrow(), &mut calibrator);
        }
    });
    calibrator.into_qparams(method, bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_feed_one_observer_each_in_first_tap_order() {
        let mut calibrator = Calibrator::new();
        calibrator.tap("b", &Tensor::from_slice(&[0.0f32, 2.0]));
        calibrator.tap("a", &Tensor::from_slice(&[-1.0f32, 1.0]).view([1, 2]));
        calibrator.tap("b", &Tensor::from_slice(&[4.0f32]).to_kind(Kind::BFloat16));
        assert_eq!(calibrator.observer("b").unwrap().seen(), 3);
        let params = calibrator
            .into_qparams(Method::MinMax, BitWidth::INT8)
            .unwrap();
        assert_eq!(
            params,
            [
                (
                    "b".to_owned(),
                    QParams::asymmetric(0.0, 4.0, BitWidth::INT8)
                ),
                (
                    "a".to_owned(),
                    QParams::asymmetric(-1.0, 1.0, BitWidth::INT8)
                ),
            ]
        );
    }

    #[test]
    fn a_failed_tap_is_returned_with_its_name() {
        assert!(matches!(
            Calibrator::new().into_qparams(Method::MinMax, BitWidth::INT8),
            Err(Error::NothingTapped)
        ));
        let mut calibrator = Calibrator::new();
        calibrator.tap("ok", &Tensor::from_slice(&[1.0f32]));
        calibrator.tap("bad", &Tensor::from_slice(&[f32::NAN]));
        calibrator.tap("ints", &Tensor::from_slice(&[1i64]));
        assert!(calibrator.error().is_some());
        let err = calibrator
            .into_qparams(Method::MinMax, BitWidth::INT8)
            .unwrap_err();
        assert!(
            matches!(&err, Error::Tap { tap, source } if tap == "bad"
                && matches!(**source, Error::Quantization(_))),
            "{err}"
        );
    }

    #[test]
    fn an_invalid_method_is_an_error_before_any_forward_pass() {
        let mut calls = 0;
        let err = calibrate(
            [Tensor::from_slice(&[1.0f32])],
            Method::Percentile(101.0),
            BitWidth::INT8,
            |_, _| calls += 1,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Quantization(_)), "{err}");
        assert_eq!(calls, 0);
    }
}
