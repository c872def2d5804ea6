use thiserror::Error;

/// Errors of pruning settings and of the layers they are applied to.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A sparsity outside [0, 1).
    #[error("sparsity must be in [0, 1), got {0}")]
    InvalidSparsity(f64),
    /// A schedule whose steps or power do not make sense.
    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),
    /// A polynomial decay whose `end_step` is not a pruning step: the masks would never be
    /// recomputed at the final sparsity. `earlier` and `later` are the nearest end steps
    /// that the frequency reaches.
    #[error(
        "end_step {end_step} is not a pruning step of a schedule beginning at step \
         {begin_step} with frequency {frequency}, so the final sparsity would never be \
         reached: use end_step {earlier} or {later}"
    )]
    UnreachableEndStep {
        /// The schedule's first pruning step.
        begin_step: u64,
        /// The end step asked for.
        end_step: u64,
        /// Steps between pruning steps.
        frequency: u64,
        /// The nearest valid end step before `end_step`.
        earlier: u64,
        /// The nearest valid end step after `end_step`.
        later: u64,
    },
    /// A granularity that does not fit a layer or the scope, or is nonsensical.
    #[error("invalid granularity: {0}")]
    InvalidGranularity(String),
    /// A variable name the variable store does not hold.
    #[error("the variable store has no variable named `{name}`")]
    UnknownVariable {
        /// The name asked for.
        name: String,
    },
    /// A variable named twice in the list of layers to prune.
    #[error("the variable `{name}` is listed more than once")]
    DuplicateVariable {
        /// The repeated name.
        name: String,
    },
    /// A variable that cannot be pruned: a scalar has no output dimension to group by.
    #[error("the variable `{name}` of shape {shape:?} cannot be pruned: it is a scalar")]
    UnprunableVariable {
        /// The variable's name.
        name: String,
        /// Its shape.
        shape: Vec<i64>,
    },
    /// A weight handed to the mask functions that has no dimension to prune along.
    #[error("cannot compute a mask for a scalar weight")]
    ScalarWeight,
    /// An error from LibTorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result with this crate's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;
