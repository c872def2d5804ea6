use thiserror::Error;

/// Errors of clustering settings and of the variables they are applied to.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// Fewer than two clusters: one shared value per group is not clustering.
    #[error("the number of clusters must be at least 2, got {clusters}")]
    TooFewClusters {
        /// The number asked for.
        clusters: usize,
    },
    /// At least as many clusters as a group has weights: nothing would be shared.
    #[error(
        "`{name}` cannot be clustered into {clusters} clusters: {group} holds only {weights} \
         weights, and the number of clusters must be smaller"
    )]
    TooManyClusters {
        /// The variable's name.
        name: String,
        /// The number of clusters asked for.
        clusters: usize,
        /// The weights of one group (the whole tensor, or one output channel).
        weights: usize,
        /// What a group is: "the tensor" or "each output channel".
        group: &'static str,
    },
    /// A variable name the variable store does not hold.
    #[error("the variable store has no variable named `{name}`")]
    UnknownVariable {
        /// The name asked for.
        name: String,
    },
    /// A variable named twice in the list of variables to cluster.
    #[error("the variable `{name}` is listed more than once")]
    DuplicateVariable {
        /// The repeated name.
        name: String,
    },
    /// A variable without a dimension: a scalar has nothing to cluster.
    #[error("the variable `{name}` is a scalar and cannot be clustered")]
    ScalarVariable {
        /// The variable's name.
        name: String,
    },
    /// A variable that does not hold floating-point values.
    #[error(
        "the variable `{name}` holds {kind:?} values; only floating-point variables can be clustered"
    )]
    UnsupportedKind {
        /// The variable's name.
        name: String,
        /// Its element type.
        kind: tch::Kind,
    },
    /// A variable holding NaN or an infinity: its centroids would be meaningless.
    #[error("the variable `{name}` holds NaN or infinite values")]
    NonFiniteWeights {
        /// The variable's name.
        name: String,
    },
    /// Nothing selected: an empty store, no default variable, or an empty list of names.
    #[error(
        "no variable to cluster: the selection is empty (by default, variables named \
         `weight` or `*.weight` with at least two dimensions are clustered)"
    )]
    NothingToCluster,
    /// Settings of the centroids' optimizer that make no sense.
    #[error("invalid centroid optimizer: {0}")]
    InvalidOptimizer(String),
    /// Tensors handed to the [`assignment`](crate::assignment) functions whose shapes do
    /// not fit together.
    #[error("invalid shape: {0}")]
    InvalidShape(String),
    /// An error from LibTorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result with this crate's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;
