//! The loss scaler: scale the loss, unscale and check the gradients, step or skip,
//! update the scale.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::config::{check_bounds, exact_f32};
use crate::{DynamicConfig, Error, LossScaleConfig, Result};

/// Added to the gradient norm before dividing by it, as PyTorch's `clip_grad_norm_` does.
const CLIP_EPSILON: f64 = 1e-6;

/// One point of the scale history: from step `step` on (0 = before the first step, n =
/// after the n-th step), the scale was `scale`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalePoint {
    /// Number of steps taken when the scale took this value.
    pub step: u64,
    /// The scale.
    #[serde(with = "exact_f32")]
    pub scale: f32,
}

/// What [`LossScaler::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Whether the optimizer step was skipped because a gradient was infinite or NaN.
    pub skipped: bool,
    /// The scale the gradients were computed with.
    pub scale: f32,
    /// The scale of the next step.
    pub next_scale: f32,
    /// The norm of the unscaled gradients before clipping, when clipping is on and the
    /// step was not skipped.
    pub grad_norm: Option<f64>,
}

/// Loss scaling for a tch training loop, fixed or dynamic (see [`DynamicConfig`]),
/// with optional gradient clipping by norm after unscaling.
///
/// The whole state (configuration, scale, growth counter, counters, history)
/// serialises with serde, so that a resumed run continues with the same scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ScalerState", into = "ScalerState")]
pub struct LossScaler {
    state: ScalerState,
}

/// The serialised form of a [`LossScaler`], validated when read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ScalerState {
    config: LossScaleConfig,
    clip_grad_norm: Option<f64>,
    #[serde(with = "exact_f32")]
    scale: f32,
    /// Consecutive finite steps since the last growth, backoff or start.
    growth_tracker: u32,
    steps: u64,
    skipped_steps: u64,
    history: Vec<ScalePoint>,
}

impl TryFrom<ScalerState> for LossScaler {
    type Error = Error;

    fn try_from(state: ScalerState) -> Result<Self> {
        state.config.validate()?;
        if let Some(max_norm) = state.clip_grad_norm {
            check_clip_norm(max_norm)?;
        }
        match state.config {
            LossScaleConfig::Fixed { scale } => check_bounds(state.scale, scale, scale)?,
            LossScaleConfig::Dynamic(config) => {
                check_bounds(state.scale, config.min_scale, config.max_scale)?;
                if state.growth_tracker >= config.growth_interval {
                    return Err(Error::TrackerBeyondInterval {
                        tracker: state.growth_tracker,
                        interval: config.growth_interval,
                    });
                }
            }
        }
        Ok(Self { state })
    }
}

impl From<LossScaler> for ScalerState {
    fn from(scaler: LossScaler) -> Self {
        scaler.state
    }
}

fn check_clip_norm(max_norm: f64) -> Result<()> {
    if max_norm.is_finite() && max_norm > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidClipNorm(max_norm))
    }
}

impl LossScaler {
    /// A scaler after validating `config`.
    pub fn new(config: LossScaleConfig) -> Result<Self> {
        config.validate()?;
        let scale = config.initial_scale();
        Ok(Self {
            state: ScalerState {
                config,
                clip_grad_norm: None,
                scale,
                growth_tracker: 0,
                steps: 0,
                skipped_steps: 0,
                history: vec![ScalePoint { step: 0, scale }],
            },
        })
    }

    /// A dynamic scaler; `DynamicConfig::default()` is Keras's behaviour.
    pub fn dynamic(config: DynamicConfig) -> Result<Self> {
        Self::new(LossScaleConfig::Dynamic(config))
    }

    /// A scaler that always uses `scale`. Unlike Keras's fixed scaling it still skips
    /// steps with non-finite gradients, which would otherwise corrupt the weights.
    pub fn fixed(scale: f32) -> Result<Self> {
        Self::new(LossScaleConfig::Fixed { scale })
    }

    /// Clips the unscaled gradients to a total L2 norm of at most `max_norm` before each
    /// optimizer step (like `clip_grad_norm_` after `GradScaler.unscale_` in PyTorch).
    pub fn with_grad_clipping(mut self, max_norm: f64) -> Result<Self> {
        check_clip_norm(max_norm)?;
        self.state.clip_grad_norm = Some(max_norm);
        Ok(self)
    }

    /// The configuration.
    pub fn config(&self) -> &LossScaleConfig {
        &self.state.config
    }

    /// The scale the next loss will be multiplied by.
    pub fn current_scale(&self) -> f32 {
        self.state.scale
    }

    /// Consecutive finite steps since the scale last changed (or since the start).
    pub fn growth_tracker(&self) -> u32 {
        self.state.growth_tracker
    }

    /// Steps taken, skipped ones included.
    pub fn steps(&self) -> u64 {
        self.state.steps
    }

    /// Steps skipped because of non-finite gradients.
    pub fn skipped_steps(&self) -> u64 {
        self.state.skipped_steps
    }

    /// The initial scale and every change of it, in order, for plots.
    pub fn history(&self) -> &[ScalePoint] {
        &self.state.history
    }

    /// The state as JSON.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// A scaler read back from [`LossScaler::to_json`], validated.
    pub fn from_json(json: &str) -> Result<Self> {
        Ok(serde_json::from_str(json)?)
    }

    /// `loss` multiplied by the current scale, in at least float32 (a float16 or bfloat16
    /// loss is widened first, so that the scaled loss cannot overflow).
    pub fn f_scale(&self, loss: &Tensor) -> Result<Tensor> {
        let loss = match loss.f_kind()? {
            Kind::Float | Kind::Double => loss.shallow_clone(),
            Kind::Half | Kind::BFloat16 => loss.f_to_kind(Kind::Float)?,
            kind => return Err(Error::UnsupportedLoss { kind }),
        };
        Ok(loss.f_mul_scalar(f64::from(self.state.scale))?)
    }

    /// Like [`LossScaler::f_scale`], panicking on a loss that is not floating point.
    pub fn scale(&self, loss: &Tensor) -> Tensor {
        self.f_scale(loss)
            .expect("the loss is a floating-point tensor")
    }

    /// Unscales the gradients of the optimizer's variables, checks them for infinities
    /// and NaNs, and either clips them (when configured) and runs `optimizer.step()`, or,
    /// when anything is non-finite, zeroes them and skips the step (the weights and the
    /// optimizer state stay untouched); then updates the scale.
    ///
    /// The variables of a `nn::Optimizer` are those of the `VarStore` it was built on.
    pub fn step(&mut self, optimizer: &mut nn::Optimizer) -> Result<StepOutcome> {
        let variables = optimizer.trainable_variables();
        self.step_with(&variables, || optimizer.step())
    }

    /// [`LossScaler::step`] for any optimizer: `variables` are the trained variables and
    /// `apply` performs the update from their (unscaled) gradients.
    pub fn step_with(&mut self, variables: &[Tensor], apply: impl FnOnce()) -> Result<StepOutcome> {
        let scale = self.state.scale;
        let found_non_finite = unscale_grads(variables, scale)?;
        let mut grad_norm = None;
        if found_non_finite {
            zero_grads(variables)?;
        } else {
            if let Some(max_norm) = self.state.clip_grad_norm {
                grad_norm = Some(clip_grad_norm(variables, max_norm)?);
            }
            apply();
        }
        self.update(found_non_finite);
        Ok(StepOutcome {
            skipped: found_non_finite,
            scale,
            next_scale: self.state.scale,
            grad_norm,
        })
    }

    /// Counts the step and updates the scale, with PyTorch's `_amp_update_scale_` rule
    /// plus the bounds: a non-finite step backs off and resets the counter; the
    /// `growth_interval`-th consecutive finite step grows the scale and resets it.
    fn update(&mut self, found_non_finite: bool) {
        let state = &mut self.state;
        state.steps += 1;
        if found_non_finite {
            state.skipped_steps += 1;
        }
        let LossScaleConfig::Dynamic(config) = state.config else {
            return;
        };
        let previous = state.scale;
        let multiply = |factor: f64| {
            ((f64::from(previous) * factor) as f32).clamp(config.min_scale, config.max_scale)
        };
        if found_non_finite {
            state.scale = multiply(config.backoff_factor);
            state.growth_tracker = 0;
        } else if state.growth_tracker + 1 >= config.growth_interval {
            state.scale = multiply(config.growth_factor);
            state.growth_tracker = 0;
        } else {
            state.growth_tracker += 1;
        }
        if state.scale != previous {
            state.history.push(ScalePoint {
                step: state.steps,
                scale: state.scale,
            });
        }
    }
}

impl Default for LossScaler {
    /// Keras's dynamic loss scaling, no clipping.
    fn default() -> Self {
        Self::dynamic(DynamicConfig::default()).expect("the Keras preset is valid")
    }
}

fn defined_grads(variables: &[Tensor]) -> Vec<Tensor> {
    variables
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect()
}

/// Divides the gradients of `variables` by `scale` in place and reports whether any of
/// them holds an infinity or a NaN, with LibTorch's fused AMP kernel
/// (`_amp_foreach_non_finite_check_and_unscale_`, CPU and CUDA): one pass over each
/// gradient, one flag per device, one read of the flags at the end. Variables without a
/// gradient are skipped. The gradients must be float32 or float64.
pub fn unscale_grads(variables: &[Tensor], scale: f32) -> Result<bool> {
    let mut grads = defined_grads(variables);
    // Checked before touching anything, so an error leaves every gradient as it was.
    for grad in &grads {
        let kind = grad.f_kind()?;
        if !matches!(kind, Kind::Float | Kind::Double) {
            return Err(Error::UnsupportedGradient { kind });
        }
    }
    // As PyTorch: the reciprocal in double precision, then rounded to float.
    let inv_scale = (1.0 / f64::from(scale)) as f32;
    let mut flags: Vec<(Device, Tensor, Tensor)> = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for grad in &mut grads {
            let device = grad.device();
            let index = match flags.iter().position(|(d, _, _)| *d == device) {
                Some(index) => index,
                None => {
                    let found = Tensor::f_zeros([1], (Kind::Float, device))?;
                    let inv = Tensor::f_full([1], f64::from(inv_scale), (Kind::Float, device))?;
                    flags.push((device, found, inv));
                    flags.len() - 1
                }
            };
            let (_, found, inv) = &mut flags[index];
            grad.f_internal_amp_non_finite_check_and_unscale(found, inv)?;
        }
        Ok(())
    })?;
    let mut found_non_finite = false;
    for (_, found, _) in &flags {
        found_non_finite |= found.f_double_value(&[0])? != 0.0;
    }
    Ok(found_non_finite)
}

fn zero_grads(variables: &[Tensor]) -> Result<()> {
    tch::no_grad(|| {
        for mut grad in defined_grads(variables) {
            let _ = grad.f_zero_()?;
        }
        Ok(())
    })
}

/// Scales the gradients of `variables` so that their total L2 norm is at most
/// `max_norm`; returns the norm before clipping.
fn clip_grad_norm(variables: &[Tensor], max_norm: f64) -> Result<f64> {
    let grads = defined_grads(variables);
    if grads.is_empty() {
        return Ok(0.0);
    }
    // Summed on the device of the first gradient: one read back to the host in all.
    let device = grads[0].device();
    tch::no_grad(|| {
        let mut squares = Vec::with_capacity(grads.len());
        for grad in &grads {
            let norm = grad.f_norm()?.f_to_kind(Kind::Double)?;
            squares.push(norm.f_square()?.f_to_device(device)?);
        }
        let total = Tensor::f_stack(&squares, 0)?
            .f_sum(Kind::Double)?
            .f_sqrt()?
            .f_double_value(&[])?;
        let coefficient = max_norm / (total + CLIP_EPSILON);
        if coefficient < 1.0 {
            for mut grad in grads {
                let _ = grad.f_mul_scalar_(coefficient)?;
            }
        }
        Ok(total)
    })
}
