//! The clusterer a training loop drives.

use std::collections::HashSet;

use rand::Rng;
use tch::nn::{self, OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

use crate::assignment::{centroid_gradients, nearest};
use crate::centroids::initial_centroids;
use crate::rng;
use crate::{CentroidOptimizer, ClusteringConfig, Error, Granularity, Result, Variables};

/// What a clustered variable looks like, from its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterReport {
    /// Variable name.
    pub name: String,
    /// Groups with their own centroids: 1 per tensor, or the output channels.
    pub groups: usize,
    /// Clusters per group, as configured.
    pub clusters: usize,
    /// The most non-empty clusters in any one group.
    pub clusters_used: usize,
    /// The most distinct values in any one group: at most `clusters`, or `clusters + 1`
    /// when zeros are preserved.
    pub distinct_values: usize,
    /// Weights that are exactly zero, in the whole variable.
    pub zeros: usize,
    /// Weights in the whole variable.
    pub total: usize,
}

/// One clustered variable as an exporter stores it: a codebook per group and, for every
/// weight, the index of its value in its group's codebook.
#[derive(Debug)]
pub struct Codebook {
    /// Variable name.
    pub name: String,
    /// The variable's shape.
    pub shape: Vec<i64>,
    /// Whether there is one codebook or one per output channel (axis 0).
    pub granularity: Granularity,
    /// `[groups, entries]` in the variable's kind: the centroids, followed, when zeros
    /// are preserved, by one entry 0 that the kept zeros point to
    /// (`entries = clusters + 1`).
    pub values: Tensor,
    /// Int64 in the variable's shape: each weight's entry in the codebook of its group
    /// (its output channel, per channel).
    pub indices: Tensor,
}

impl Codebook {
    /// The weights the codebook encodes: every index replaced by its entry. Equal,
    /// bit for bit, to the variable right after [`Clusterer::apply`] or
    /// [`Clusterer::strip`].
    pub fn decode(&self) -> Result<Tensor> {
        let groups = self.values.size()[0];
        let indices = self.indices.f_reshape([groups, -1])?;
        Ok(self
            .values
            .f_gather(1, &indices, false)?
            .f_reshape(self.shape.as_slice())?)
    }
}

/// One clustered variable and its state.
#[derive(Debug)]
struct Clustered {
    name: String,
    /// The store's variable (shared storage): what the model computes with.
    variable: Tensor,
    shape: Vec<i64>,
    groups: i64,
    per_group: i64,
    /// The weights the clustered values are pulled from (TF-MOT's original weights),
    /// `[groups, per_group]` in the working kind.
    latent: Tensor,
    /// `[groups, clusters]`, a trainable variable of the clusterer's own store.
    centroids: Tensor,
    /// `[groups, per_group]` Int64: each weight's centroid.
    indices: Tensor,
    /// `[groups, per_group]` bool, with preserved sparsity: the weights in clusters
    /// (those not zero when clustering started).
    in_clusters: Option<Tensor>,
    /// What the variable held after the last write, `[groups, per_group]` in the working
    /// kind: the difference from it is the update the user's optimizer made.
    written: Tensor,
}

/// The kind the latent weights and centroids are kept in: double for a double variable,
/// float otherwise (a half or bfloat16 variable is trained in float and rounded on write).
/// The initial centroids are computed in float for every kind, as TF-MOT computes them.
fn working_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

impl Clustered {
    /// Starts clustering a variable that [`check`] accepted, split into `groups` of
    /// `per_group` weights.
    fn new(
        name: String,
        variable: Tensor,
        (groups, per_group): (i64, i64),
        config: &ClusteringConfig,
        store: &nn::Path<'_>,
        index: usize,
    ) -> Result<Self> {
        let shape = variable.size();
        let work = working_kind(variable.kind());
        let latent = tch::no_grad(|| -> Result<Tensor> {
            Ok(variable
                .f_detach()?
                .f_to_kind(work)?
                .f_reshape([groups, per_group])?
                .f_detach_copy()?)
        })?;
        let values = Vec::<f32>::try_from(
            latent
                .f_to_kind(Kind::Float)?
                .f_to_device(Device::Cpu)?
                .f_flatten(0, -1)?,
        )?;
        let initial: Vec<f32> = values
            .chunks(per_group as usize)
            .enumerate()
            .flat_map(|(group, weights)| {
                let seed = rng::for_group(config.seed, &name, group).random::<u64>();
                initial_centroids(
                    weights,
                    config.clusters,
                    config.init,
                    config.preserve_sparsity,
                    seed,
                )
            })
            .collect();
        let centroids = Tensor::f_from_slice(&initial)?
            .f_view([groups, config.clusters as i64])?
            .f_to_kind(work)?
            .f_to_device(variable.device())?;
        let centroids = store.add(&format!("c{index}"), centroids, true);
        let in_clusters = if config.preserve_sparsity {
            Some(latent.f_ne(0.0)?)
        } else {
            None
        };
        let mut clustered = Self {
            name,
            variable,
            shape,
            groups,
            per_group,
            written: latent.f_zeros_like()?,
            indices: latent.f_zeros_like()?.f_to_kind(Kind::Int64)?,
            latent,
            centroids,
            in_clusters,
        };
        clustered.assign_and_write()?;
        Ok(clustered)
    }

    /// The gradient of the centroids from the gradient the variable received, or `None`
    /// when it has none (no backward pass reached it).
    fn centroid_gradient(&self, config: &ClusteringConfig) -> Result<Option<Tensor>> {
        let grad = self.variable.grad();
        if !grad.defined() {
            return Ok(None);
        }
        let grad = grad
            .f_detach()?
            .f_to_kind(self.latent.kind())?
            .f_reshape([self.groups, self.per_group])?;
        Ok(Some(centroid_gradients(
            &grad,
            &self.indices,
            self.in_clusters.as_ref(),
            config.clusters as i64,
            config.aggregation,
        )?))
    }

    /// Straight-through: the latent weights take the update the user's optimizer made to
    /// the variable since the last write; kept zeros stay zero.
    fn fold_update(&mut self) -> Result<()> {
        tch::no_grad(|| {
            let now = self
                .variable
                .f_detach()?
                .f_to_kind(self.latent.kind())?
                .f_reshape([self.groups, self.per_group])?;
            let _ = self.latent.f_add_(&now.f_sub(&self.written)?)?;
            if let Some(in_clusters) = &self.in_clusters {
                let _ = self
                    .latent
                    .f_masked_fill_(&in_clusters.f_logical_not()?, 0.0)?;
            }
            Ok(())
        })
    }

    /// New pulling indices from the latent weights and the centroids, and the clustered
    /// weights written into the variable.
    fn assign_and_write(&mut self) -> Result<()> {
        tch::no_grad(|| {
            let centroids = self.centroids.f_detach()?;
            self.indices = nearest(&self.latent, &centroids)?;
            let mut clustered = centroids.f_gather(1, &self.indices, false)?;
            if let Some(in_clusters) = &self.in_clusters {
                // `masked_fill` writes +0.0, where multiplying by a mask could give -0.0.
                clustered = clustered.f_masked_fill(&in_clusters.f_logical_not()?, 0.0)?;
            }
            self.variable
                .shallow_clone()
                .f_copy_(&clustered.f_reshape(self.shape.as_slice())?)?;
            // Read back: for a half variable this is the rounded value the model sees.
            self.written = self
                .variable
                .f_detach()?
                .f_to_kind(self.latent.kind())?
                .f_reshape([self.groups, self.per_group])?
                .f_detach_copy()?;
            Ok(())
        })
    }

    fn codebook(&self, config: &ClusteringConfig) -> Result<Codebook> {
        tch::no_grad(|| {
            let kind = self.variable.kind();
            let mut values = self.centroids.f_detach()?.f_to_kind(kind)?;
            let mut indices = self.indices.f_detach_copy()?;
            if let Some(in_clusters) = &self.in_clusters {
                let zero = Tensor::f_zeros([self.groups, 1], (kind, values.device()))?;
                values = Tensor::f_cat(&[values, zero], 1)?;
                indices =
                    indices.f_masked_fill(&in_clusters.f_logical_not()?, config.clusters as i64)?;
            }
            Ok(Codebook {
                name: self.name.clone(),
                shape: self.shape.clone(),
                granularity: config.granularity,
                values: values.f_detach_copy()?,
                indices: indices.f_reshape(self.shape.as_slice())?,
            })
        })
    }

    fn report(&self, clusters: usize) -> Result<ClusterReport> {
        let per_group = self.per_group.max(1) as usize;
        let values = Vec::<f64>::try_from(
            self.variable
                .f_detach()?
                .f_to_kind(Kind::Double)?
                .f_to_device(Device::Cpu)?
                .f_flatten(0, -1)?,
        )?;
        let indices =
            Vec::<i64>::try_from(self.indices.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
        let in_clusters = match &self.in_clusters {
            Some(mask) => Vec::<bool>::try_from(mask.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?,
            None => vec![true; indices.len()],
        };
        let mut distinct_values = 0;
        let mut clusters_used = 0;
        for ((group, group_indices), group_members) in values
            .chunks(per_group)
            .zip(indices.chunks(per_group))
            .zip(in_clusters.chunks(per_group))
        {
            let mut group = group.to_vec();
            group.sort_by(f64::total_cmp);
            // `==` rather than bits: -0.0 and 0.0 are one value.
            group.dedup_by(|a, b| a == b);
            distinct_values = distinct_values.max(group.len());
            let used: HashSet<i64> = group_indices
                .iter()
                .zip(group_members)
                .filter(|(_, member)| **member)
                .map(|(index, _)| *index)
                .collect();
            clusters_used = clusters_used.max(used.len());
        }
        Ok(ClusterReport {
            name: self.name.clone(),
            groups: self.groups as usize,
            clusters,
            clusters_used,
            distinct_values,
            zeros: values.iter().filter(|v| **v == 0.0).count(),
            total: values.len(),
        })
    }
}

/// The variables `selection` names in `vs`, each checked to exist and be named once.
fn select(vs: &VarStore, selection: &Variables) -> Result<Vec<(String, Tensor)>> {
    let variables = vs.variables();
    match selection {
        Variables::Weights => {
            let mut chosen: Vec<(String, Tensor)> = variables
                .into_iter()
                .filter(|(name, t)| (name == "weight" || name.ends_with(".weight")) && t.dim() >= 2)
                .collect();
            chosen.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(chosen)
        }
        Variables::Named(names) => {
            let mut seen = HashSet::new();
            names
                .iter()
                .map(|name| {
                    let variable = variables
                        .get(name)
                        .ok_or_else(|| Error::UnknownVariable { name: name.clone() })?;
                    if !seen.insert(name.as_str()) {
                        return Err(Error::DuplicateVariable { name: name.clone() });
                    }
                    Ok((name.clone(), variable.shallow_clone()))
                })
                .collect()
        }
    }
}

/// Weight clustering driven from a user's loop, TF-MOT's `cluster_weights` for any tch
/// model: every clustered variable holds at most `clusters` distinct values per group
/// (plus zero when zeros are preserved), and the centroids are trained.
///
/// Call [`Clusterer::apply`] once after every optimizer step, while the gradients of the
/// step are still in the variables: after `optimizer.backward_step(&loss)` (which zeroes
/// the gradients *before* its backward pass, so they are there after the step), or after
/// `backward` and `step` in a loop that zeroes them at the start of the next step. Each
/// call
///
/// 1. gives every centroid the sum (or mean, [`GradientAggregation`](crate::GradientAggregation))
///    of the gradients of the weights pulled from it, and steps the centroids' optimizer
///    ([`CentroidOptimizer`]);
/// 2. adds the update the user's optimizer made to each variable to its latent weights
///    (TF-MOT's original weights): the straight-through estimator, with whatever tch
///    optimizer the user runs;
/// 3. pulls every latent weight to its nearest centroid (TF-MOT recomputes these
///    indices before every forward pass, from the same two);
/// 4. writes the clustered weights into the variables, kept zeros exactly zero.
///
/// The gradients the user's optimizer saw are those of the clustered weights, as in
/// TF-MOT, where they reach the original weights through the same estimator. Decoupled
/// weight decay, the one update that depends on the weights themselves, sees the
/// clustered values instead of the latent ones.
#[derive(Debug)]
pub struct Clusterer {
    config: ClusteringConfig,
    variables: Vec<Clustered>,
    /// The centroids' own store, trained by `optimizer`.
    centroid_store: VarStore,
    optimizer: nn::Optimizer,
}

impl Clusterer {
    /// Clusters the variables of `vs` that `config.variables` selects: initial centroids
    /// for every group, the clustered weights written into the variables.
    ///
    /// Errors, before anything is written: those of [`ClusteringConfig::validate`];
    /// [`Error::NothingToCluster`] for an empty selection (an empty store, say);
    /// [`Error::UnknownVariable`], [`Error::DuplicateVariable`] for names that do not fit
    /// the store; [`Error::ScalarVariable`], [`Error::UnsupportedKind`],
    /// [`Error::NonFiniteWeights`] for variables that cannot be clustered; and
    /// [`Error::TooManyClusters`] when a group has no more weights than clusters.
    ///
    /// ```
    /// use clustering::{Clusterer, ClusteringConfig, Error, Granularity, Variables};
    /// use tch::{Device, nn};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let _fc = nn::linear(vs.root() / "fc", 6, 4, Default::default());
    /// let per_channel = |clusters| ClusteringConfig {
    ///     granularity: Granularity::PerChannel,
    ///     ..ClusteringConfig::new(clusters)
    /// };
    /// assert!(Clusterer::new(&vs, per_channel(4)).is_ok());
    /// // Each output channel holds 6 weights: 6 clusters would share nothing.
    /// let err = Clusterer::new(&vs, per_channel(6)).unwrap_err();
    /// assert!(matches!(err, Error::TooManyClusters { weights: 6, .. }));
    /// let named = ClusteringConfig {
    ///     variables: Variables::Named(vec!["fc.wieght".into()]),
    ///     ..ClusteringConfig::new(4)
    /// };
    /// let err = Clusterer::new(&vs, named).unwrap_err();
    /// assert!(matches!(err, Error::UnknownVariable { name } if name == "fc.wieght"));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn new(vs: &VarStore, config: ClusteringConfig) -> Result<Self> {
        config.validate()?;
        let selected = select(vs, &config.variables)?;
        if selected.is_empty() {
            return Err(Error::NothingToCluster);
        }
        // Check every variable before writing into any.
        let layouts = selected
            .iter()
            .map(|(name, variable)| check(name, variable, &config))
            .collect::<Result<Vec<_>>>()?;
        let centroid_store = VarStore::new(vs.device());
        let mut prepared = Vec::with_capacity(selected.len());
        for (index, ((name, variable), layout)) in selected.into_iter().zip(layouts).enumerate() {
            prepared.push(Clustered::new(
                name,
                variable,
                layout,
                &config,
                &centroid_store.root(),
                index,
            )?);
        }
        let optimizer = build_optimizer(&centroid_store, config.optimizer)?;
        Ok(Self {
            config,
            variables: prepared,
            centroid_store,
            optimizer,
        })
    }

    /// One clustering step after an optimizer step: trains the centroids on the
    /// gradients in the variables, moves the latent weights by the optimizer's update,
    /// reassigns them and writes the clustered weights (see [`Clusterer`]). A variable
    /// without a gradient leaves its centroids as they are. Call it once per step: a
    /// second call would train the centroids on the same gradients again.
    pub fn apply(&mut self) -> Result<()> {
        let gradients = self
            .variables
            .iter()
            .map(|v| v.centroid_gradient(&self.config))
            .collect::<Result<Vec<_>>>()?;
        if gradients.iter().any(Option::is_some) {
            self.optimizer.zero_grad();
            tch::with_grad(|| -> Result<()> {
                for (variable, gradient) in self.variables.iter().zip(&gradients) {
                    if let Some(gradient) = gradient {
                        // The gradient of sum(c * g) with respect to c is g: the optimizer
                        // steps the centroids with exactly the aggregated gradient.
                        variable
                            .centroids
                            .f_mul(gradient)?
                            .f_sum(gradient.kind())?
                            .f_backward()?;
                    }
                }
                Ok(())
            })?;
            self.optimizer.step();
        }
        for variable in &mut self.variables {
            variable.fold_update()?;
            variable.assign_and_write()?;
        }
        Ok(())
    }

    /// Sets the centroids' learning rate (to follow the model's schedule);
    /// [`Error::InvalidOptimizer`] unless it is finite and > 0.
    pub fn set_centroid_learning_rate(&mut self, learning_rate: f64) -> Result<()> {
        let optimizer = match self.config.optimizer {
            CentroidOptimizer::Sgd { momentum, .. } => CentroidOptimizer::Sgd {
                learning_rate,
                momentum,
            },
            CentroidOptimizer::Adam { .. } => CentroidOptimizer::Adam { learning_rate },
        };
        optimizer.validate()?;
        self.optimizer.set_lr(learning_rate);
        self.config.optimizer = optimizer;
        Ok(())
    }

    /// The settings the clusterer runs with.
    pub fn config(&self) -> &ClusteringConfig {
        &self.config
    }

    /// Every clustered variable's codebook and indices as of the last write (creation,
    /// [`Clusterer::apply`]): what an artifact writer stores instead of the weights.
    ///
    /// ```
    /// use clustering::{Clusterer, ClusteringConfig};
    /// use tch::{Device, nn};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let fc = nn::linear(vs.root() / "fc", 8, 4, Default::default());
    /// let clusterer = Clusterer::new(&vs, ClusteringConfig::new(4))?;
    /// let codebook = &clusterer.codebooks()?[0];
    /// assert_eq!(codebook.values.size(), [1, 4]); // one group, four entries
    /// assert!(codebook.decode()?.equal(&fc.ws));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn codebooks(&self) -> Result<Vec<Codebook>> {
        self.variables
            .iter()
            .map(|v| v.codebook(&self.config))
            .collect()
    }

    /// The current state of every clustered variable, from its values.
    pub fn report(&self) -> Result<Vec<ClusterReport>> {
        self.variables
            .iter()
            .map(|v| v.report(self.config.clusters))
            .collect()
    }

    /// Ends clustering: any update made to the variables since the last write is folded
    /// in and the clustered weights written once more (without training the centroids:
    /// right after [`Clusterer::apply`] this changes no value), then the report. The
    /// variables are ordinary variables from here on, holding the shared values; the
    /// centroids and latent weights are dropped. Take [`Clusterer::codebooks`] after
    /// `apply` and before this if an exporter needs them.
    pub fn strip(mut self) -> Result<Vec<ClusterReport>> {
        for variable in &mut self.variables {
            variable.fold_update()?;
            variable.assign_and_write()?;
        }
        let report = self.report();
        drop(self.centroid_store);
        report
    }
}

/// Whether a variable can be clustered as `config` says, checked for every variable
/// before any is written; its layout as `(groups, weights per group)`.
fn check(name: &str, variable: &Tensor, config: &ClusteringConfig) -> Result<(i64, i64)> {
    let kind = variable.kind();
    if !matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        return Err(Error::UnsupportedKind {
            name: name.to_owned(),
            kind,
        });
    }
    let shape = variable.size();
    let Some(&out) = shape.first() else {
        return Err(Error::ScalarVariable {
            name: name.to_owned(),
        });
    };
    let numel = shape.iter().product::<i64>();
    let (groups, per_group) = match config.granularity {
        Granularity::PerTensor => (1, numel),
        Granularity::PerChannel if out == 0 => (0, 0),
        Granularity::PerChannel => (out, numel / out),
    };
    if per_group <= config.clusters as i64 {
        return Err(Error::TooManyClusters {
            name: name.to_owned(),
            clusters: config.clusters,
            weights: per_group as usize,
            group: config.granularity.group(),
        });
    }
    let finite = tch::no_grad(|| variable.f_isfinite()?.f_all()?.f_int64_value(&[]))?;
    if finite == 0 {
        return Err(Error::NonFiniteWeights {
            name: name.to_owned(),
        });
    }
    Ok((groups, per_group))
}

fn build_optimizer(store: &VarStore, optimizer: CentroidOptimizer) -> Result<nn::Optimizer> {
    Ok(match optimizer {
        CentroidOptimizer::Sgd {
            learning_rate,
            momentum,
        } => nn::Sgd {
            momentum,
            ..Default::default()
        }
        .build(store, learning_rate)?,
        CentroidOptimizer::Adam { learning_rate } => {
            nn::Adam::default().build(store, learning_rate)?
        }
    })
}
