//! The pruner a training loop drives.

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::mask::{global_masks, layer_mask};
use crate::{Error, Granularity, Result, Schedule};

/// The variables of `vs` named in `names`, in that order, each checked to exist, to be
/// named once and to have at least one dimension.
fn named_weights(vs: &VarStore, names: &[&str]) -> Result<Vec<(String, Tensor)>> {
    let variables = vs.variables();
    let mut seen = std::collections::HashSet::new();
    names
        .iter()
        .map(|&name| {
            let weight = variables.get(name).ok_or_else(|| Error::UnknownVariable {
                name: name.to_owned(),
            })?;
            if !seen.insert(name) {
                return Err(Error::DuplicateVariable {
                    name: name.to_owned(),
                });
            }
            if weight.dim() == 0 {
                return Err(Error::UnprunableVariable {
                    name: name.to_owned(),
                    shape: weight.size(),
                });
            }
            Ok((name.to_owned(), weight.shallow_clone()))
        })
        .collect()
}

/// Whether each layer gets its own threshold or all share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// Each layer pruned to the target sparsity by its own magnitudes.
    #[default]
    PerLayer,
    /// One magnitude threshold across all prunable layers (unstructured only).
    Global,
}

/// What to prune, how and when.
#[derive(Debug, Clone, PartialEq)]
pub struct PruningConfig {
    /// When masks are recomputed and to which sparsity.
    pub schedule: Schedule,
    /// What is pruned together.
    pub granularity: Granularity,
    /// Per-layer or global thresholds.
    pub scope: Scope,
}

/// Sparsity of one pruned layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSparsity {
    /// Variable name.
    pub name: String,
    /// Number of weights.
    pub total: usize,
    /// Number of weights that are exactly zero.
    pub zeros: usize,
}

impl LayerSparsity {
    /// `zeros / total`.
    pub fn sparsity(&self) -> f64 {
        self.zeros as f64 / self.total.max(1) as f64
    }
}

#[derive(Debug)]
struct Layer {
    name: String,
    weight: Tensor,
    mask: Tensor,
}

/// Magnitude pruning driven from a user's loop: call [`Pruner::update`] with the step
/// number before each optimizer step (it recomputes masks on schedule steps) and
/// [`Pruner::apply`] after it, so pruned weights stay exactly zero whatever the
/// optimizer's momentum does.
#[derive(Debug)]
pub struct Pruner {
    /// `None` for a pruner that only keeps the zeros it found ([`Pruner::preserving`]).
    config: Option<PruningConfig>,
    layers: Vec<Layer>,
}

impl Pruner {
    /// Prunes the default layers of `vs`: every variable named `*.weight` with at least two
    /// dimensions (convolution and dense weights; never biases or batch-norm scales).
    pub fn new(vs: &VarStore, config: PruningConfig) -> Result<Self> {
        let mut names: Vec<String> = vs
            .variables()
            .into_iter()
            .filter(|(name, t)| name.ends_with(".weight") && t.dim() >= 2)
            .map(|(name, _)| name)
            .collect();
        names.sort();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Self::with_layers(vs, &names, config)
    }

    /// Prunes exactly the named variables of `vs`: [`Error::UnknownVariable`] for a name
    /// the store does not hold, [`Error::DuplicateVariable`] for a name listed twice,
    /// [`Error::UnprunableVariable`] for a scalar, [`Error::InvalidGranularity`] when the
    /// granularity does not fit a layer (the message names it) or the scope.
    ///
    /// ```
    /// use pruning::{Error, Granularity, Pruner, PruningConfig, Schedule, Scope};
    /// use tch::{Device, nn};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let _layer = nn::linear(vs.root() / "fc", 8, 4, Default::default());
    /// let config = PruningConfig {
    ///     schedule: Schedule::constant(0.5, 0, None, 10)?,
    ///     granularity: Granularity::Unstructured,
    ///     scope: Scope::PerLayer,
    /// };
    /// assert!(Pruner::with_layers(&vs, &["fc.weight"], config.clone()).is_ok());
    /// let err = Pruner::with_layers(&vs, &["fc.wieght"], config).unwrap_err();
    /// assert!(matches!(err, Error::UnknownVariable { name } if name == "fc.wieght"));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn with_layers(vs: &VarStore, names: &[&str], config: PruningConfig) -> Result<Self> {
        config.schedule.validate()?;
        if config.scope == Scope::Global && config.granularity != Granularity::Unstructured {
            return Err(Error::InvalidGranularity(
                "global scope supports unstructured pruning only".into(),
            ));
        }
        let layers = named_weights(vs, names)?
            .into_iter()
            .map(|(name, weight)| {
                // Check the granularity fits now rather than at the first pruning step.
                let _ = layer_mask(&weight, 0.0, config.granularity).map_err(|e| match e {
                    Error::InvalidGranularity(reason) => {
                        Error::InvalidGranularity(format!("`{name}`: {reason}"))
                    }
                    other => other,
                })?;
                let mask = weight.f_ones_like()?;
                Ok(Layer { name, weight, mask })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: Some(config),
            layers,
        })
    }

    /// Keeps the named variables' current zeros zero and never prunes further: the masks
    /// are the weights' non-zero pattern now. The names are checked as in
    /// [`Pruner::with_layers`]. This is what pruning-preserving fine-tuning
    /// (quantization-aware training of a pruned model, say) needs: call [`Pruner::apply`]
    /// after every optimizer step ([`Pruner::update`] never changes the masks), and the
    /// sparsity survives the optimizer.
    ///
    /// ```
    /// use pruning::Pruner;
    /// use tch::{Device, Tensor, nn};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let weights = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 2.0]).view([2, 2]);
    /// let w = (vs.root() / "fc").var_copy("weight", &weights);
    /// let mut keeper = Pruner::preserving(&vs, &["fc.weight"])?;
    /// tch::no_grad(|| { let _ = w.shallow_clone().fill_(3.0); }); // what an optimizer step might do
    /// assert!(!keeper.update(0)?);
    /// keeper.apply();
    /// assert_eq!(Vec::<f32>::try_from(w.flatten(0, -1))?, [0.0, 3.0, 0.0, 3.0]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn preserving(vs: &VarStore, names: &[&str]) -> Result<Self> {
        let layers = named_weights(vs, names)?
            .into_iter()
            .map(|(name, weight)| {
                let mask = tch::no_grad(|| weight.f_ne(0.0)?.f_to_kind(weight.kind()))?;
                Ok(Layer { name, weight, mask })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: None,
            layers,
        })
    }

    /// Recomputes the masks if `step` is a pruning step, then applies them; returns whether
    /// the masks changed.
    pub fn update(&mut self, step: u64) -> Result<bool> {
        let Some(config) = self
            .config
            .as_ref()
            .filter(|c| c.schedule.should_prune(step))
        else {
            return Ok(false);
        };
        let sparsity = config.schedule.sparsity(step);
        let (scope, granularity) = (config.scope, config.granularity);
        tch::no_grad(|| -> Result<()> {
            match scope {
                Scope::Global => {
                    let weights: Vec<&Tensor> = self.layers.iter().map(|l| &l.weight).collect();
                    let masks = global_masks(&weights, sparsity)?;
                    for (layer, mask) in self.layers.iter_mut().zip(masks) {
                        layer.mask = mask;
                    }
                }
                Scope::PerLayer => {
                    for layer in &mut self.layers {
                        layer.mask = layer_mask(&layer.weight, sparsity, granularity)?;
                    }
                }
            }
            Ok(())
        })?;
        self.apply();
        Ok(true)
    }

    /// Multiplies every pruned weight by its mask (call after each optimizer step).
    pub fn apply(&self) {
        tch::no_grad(|| {
            for layer in &self.layers {
                let mut weight = layer.weight.shallow_clone();
                let weight = &mut weight;
                *weight *= &layer.mask;
            }
        });
    }

    /// Bakes the zeros into the weights for good and reports the sparsity; the pruner is
    /// consumed, so the masks are no longer enforced.
    pub fn strip(self) -> Vec<LayerSparsity> {
        self.apply();
        self.report()
    }

    /// The current sparsity of every pruned layer.
    pub fn report(&self) -> Vec<LayerSparsity> {
        self.layers
            .iter()
            .map(|layer| {
                let total = layer.weight.numel();
                let nonzero = layer
                    .weight
                    .count_nonzero(None::<i64>)
                    .to_kind(Kind::Int64)
                    .int64_value(&[]) as usize;
                LayerSparsity {
                    name: layer.name.clone(),
                    total,
                    zeros: total - nonzero,
                }
            })
            .collect()
    }
}
