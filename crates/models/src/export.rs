//! Export of a trained [`Network`] to the runtime's artifact format (`docs/FORMAT.md`).
//!
//! The deployed network is
//! [`NetworkSpec::without_batch_norm`](crate::NetworkSpec::without_batch_norm): every
//! `BatchNorm2d` is folded into the `Conv2d` right before it, with its running statistics
//! (inference mode):
//!
//! ```text
//! s  = gamma / sqrt(running_var + eps)          (per output channel)
//! w' = w * s
//! b' = (b - running_mean) * s + beta
//! ```
//!
//! Parameters are named by their index in the deployed network (`"4.weight"` for the second
//! convolution of the teacher, which is layer 5 in the training network), as the format
//! requires. The folding is computed in f64 and rounded once to f32.
//!
//! [`WeightFormat::Int8DynamicRange`] is the minimal quantizer: each weight matrix is quantized
//! symmetrically per output channel (`scale = max |w| / 127`, codes in `-127..=127`), biases
//! stay f32, and the runtime quantizes activations per batch at run time (dynamic range). No
//! calibration, no static activation scales, no quantization-aware training: those belong to
//! the quantization technique, which writes through the same `runtime::ArtifactBuilder`.
//!
//! ```
//! use models::{Network, NetworkSpec, export};
//! use tch::{Device, nn};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = Network::new(&vs.root(), &NetworkSpec::teacher_cnn())?;
//! let artifact = export::artifact(&net, &vs, export::WeightFormat::F32)?;
//! let model = runtime::Model::from_bytes(&artifact.to_bytes()?)?;
//! assert_eq!(model.network(), Some(&NetworkSpec::teacher_cnn().without_batch_norm()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use runtime::{ArtifactBuilder, Granularity, Storage};
use tch::{Device, Kind, Tensor, nn};

use crate::{LayerSpec, Network};

/// Why a network could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A variable the network needs is not in the `VarStore` (the network must be built at
    /// the store's root, `vs.root()`, so that its variables are named `"<index>.weight"`).
    #[error("variable `{name}` is not in the VarStore (build the network at `vs.root()`)")]
    MissingVariable {
        /// The variable's name.
        name: String,
    },
    /// A layer with parameters that the [`NameMap`] does not name.
    #[error("layer {index} has parameters but no name in the name map")]
    UnnamedLayer {
        /// Its index in the network.
        index: usize,
    },
    /// The network description does not hold together.
    #[error(transparent)]
    Spec(#[from] crate::SpecError),
    /// A batch norm that does not directly follow a convolution cannot be folded.
    #[error("batch norm at layer {index} does not follow a conv2d and cannot be folded")]
    Unfoldable {
        /// Its index in the training network.
        index: usize,
    },
    /// A variable holds a value that cannot be deployed (a non-finite folded weight, ...).
    #[error("variable `{name}`: {reason}")]
    BadValue {
        /// The variable's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// LibTorch failed reading a variable.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// The runtime's builder refused the artifact, or writing it failed.
    #[error(transparent)]
    Runtime(#[from] runtime::Error),
}

/// How the exported weights are stored (biases are always f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// Dense f32 weights.
    #[default]
    F32,
    /// The minimal quantizer: per-channel symmetric int8 weights; the runtime runs these
    /// layers in dynamic-range mode (activations quantized per batch at run time). Add
    /// input quantization ([`ArtifactBuilder::set_input_quantization`]) for full-integer
    /// (static) execution.
    Int8DynamicRange,
    /// Per-tensor symmetric int8 weights (one scale per weight tensor).
    Int8PerTensor,
    /// [`WeightFormat::Int8DynamicRange`]'s codes, each weight stored in the `int8` or the
    /// bitmask-sparse `int8_sparse` scheme, whichever is smaller (pruned weights: sparse).
    Int8Compact,
    /// Weights and biases stored as IEEE half precision, computed in f32.
    F16,
    /// Weights that take few values per tensor (clustered) as indices into each tensor's
    /// codebook, the zeros left out where that is smaller (`runtime::Storage::Palette` per
    /// tensor); decoded to f32 at load. More than 256 distinct values in a tensor is an
    /// error: cluster first.
    Palette,
    /// As [`WeightFormat::Palette`], with the codebooks and the biases in IEEE half precision
    /// (`runtime::Storage::PaletteHalf`): the smallest form of a clustered network, at
    /// [`WeightFormat::F16`]'s rounding of the centroids and biases.
    PaletteHalf,
}

/// One parameter of the deployed network: batch norm folded, named by its deployed index.
#[derive(Clone, Debug, PartialEq)]
pub struct DeployedParameter {
    /// `"<deployed layer index>.weight"` or `".bias"`; for a graph ([`graph_parameters`]),
    /// `"<node name>.weight"` and so on.
    pub name: String,
    /// PyTorch's shape: `[out, in, k, k]`, `[out, in]` or `[out]`.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f32>,
}

fn variable(
    vars: &std::collections::HashMap<String, Tensor>,
    name: &str,
    expected: &[usize],
) -> Result<(Vec<usize>, Vec<f64>), ExportError> {
    let tensor = vars
        .get(name)
        .ok_or_else(|| ExportError::MissingVariable { name: name.into() })?;
    let shape: Vec<usize> = tensor
        .size()
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .collect();
    if shape != expected {
        return Err(ExportError::BadValue {
            name: name.into(),
            reason: format!("shape {shape:?}, but the network description needs {expected:?}"),
        });
    }
    let flat = tensor
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Double)?
        .f_contiguous()?
        .f_view([-1])?;
    let data = Vec::<f64>::try_from(&flat)?;
    Ok((shape, data))
}

fn to_f32(name: &str, data: &[f64]) -> Result<Vec<f32>, ExportError> {
    data.iter()
        .map(|&v| {
            let x = v as f32;
            if x.is_finite() {
                Ok(x)
            } else {
                Err(ExportError::BadValue {
                    name: name.into(),
                    reason: format!("value {v} is not a finite f32"),
                })
            }
        })
        .collect()
}

/// Where the variables of each layer of a network live in a `VarStore`: the layer's index
/// in the network (the training network, batch norm included) mapped to the prefix of its
/// variables. A conv2d or linear layer at prefix `p` has `p.weight` (PyTorch's layout:
/// `[out, in, k, k]` or `[out, in]`) and `p.bias` (`[out]`); a batch norm has `p.weight`,
/// `p.bias`, `p.running_mean` and `p.running_var` (`[channels]` each), as tch's `nn::conv2d`,
/// `nn::linear` and `nn::batch_norm2d` name them.
///
/// [`NameMap::sequential`] is how [`Network`] names its variables (`"0.weight"`, ...); a
/// model of one's own names its layers with [`NameMap::layer`].
///
/// ```
/// use models::export::NameMap;
///
/// let names = NameMap::new().layer(1, "fc1").layer(3, "fc2");
/// assert_eq!(names.prefix(1).as_deref(), Some("fc1"));
/// assert_eq!(names.prefix(2), None);
/// assert_eq!(NameMap::sequential().prefix(7).as_deref(), Some("7"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameMap {
    sequential: bool,
    prefixes: BTreeMap<usize, String>,
}

impl NameMap {
    /// No layer named yet: every layer with parameters must get a [`NameMap::layer`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Every layer at its index (`"<index>.weight"`), as in a PyTorch `nn.Sequential` and a
    /// [`Network`] built at the store's root; [`NameMap::layer`] overrides single layers.
    pub fn sequential() -> Self {
        Self {
            sequential: true,
            prefixes: BTreeMap::new(),
        }
    }

    /// Layer `index`'s variables are `"<prefix>.weight"`, `"<prefix>.bias"`, ... (a prefix of
    /// a nested path is written with dots: `"encoder.fc1"`).
    pub fn layer(mut self, index: usize, prefix: impl Into<String>) -> Self {
        self.prefixes.insert(index, prefix.into());
        self
    }

    /// The prefix of layer `index`'s variables, when it has one.
    pub fn prefix(&self, index: usize) -> Option<Cow<'_, str>> {
        match self.prefixes.get(&index) {
            Some(prefix) => Some(Cow::Borrowed(prefix)),
            None if self.sequential => Some(Cow::Owned(index.to_string())),
            None => None,
        }
    }
}

/// The parameters of the deployed network ([`NetworkSpec::without_batch_norm`] of
/// `net.spec()`), every batch norm folded into the convolution before it, in layer order
/// (weight, then bias).
///
/// `vs` is the store `net` was built in, at its root.
///
/// [`NetworkSpec::without_batch_norm`]: crate::NetworkSpec::without_batch_norm
pub fn deployed_parameters(
    net: &Network,
    vs: &nn::VarStore,
) -> Result<Vec<DeployedParameter>, ExportError> {
    parameters_of(net.spec(), vs, &NameMap::sequential())
}

/// The parameters of any model whose architecture `spec` describes, read from `vs` where
/// `names` says each layer's variables are, checked against the shapes of `spec`, every
/// batch norm folded into the convolution before it: the deployed network's parameters
/// ([`NetworkSpec::without_batch_norm`]), named by their deployed index, in layer order.
///
/// ```
/// use models::export::{self, NameMap, WeightFormat};
/// use models::{LayerSpec, NetworkSpec};
/// use tch::{nn, Device};
///
/// // A model of one's own: two tch linear layers named `fc1` and `fc2`.
/// let vs = nn::VarStore::new(Device::Cpu);
/// let fc1 = nn::linear(vs.root() / "fc1", 784, 32, Default::default());
/// let fc2 = nn::linear(vs.root() / "fc2", 32, 10, Default::default());
/// # let _ = (fc1, fc2);
///
/// // Its architecture, and where each layer's variables are.
/// let spec = NetworkSpec {
///     name: "my_mlp".into(),
///     input: [1, 28, 28],
///     layers: vec![
///         LayerSpec::Flatten,
///         LayerSpec::Linear { in_features: 784, out_features: 32 },
///         LayerSpec::Relu,
///         LayerSpec::Linear { in_features: 32, out_features: 10 },
///     ],
/// };
/// let names = NameMap::new().layer(1, "fc1").layer(3, "fc2");
/// let params = export::parameters_of(&spec, &vs, &names)?;
/// assert_eq!(params[0].name, "1.weight");
/// let artifact = export::artifact_from_parameters(spec, &params, WeightFormat::Int8DynamicRange)?;
/// let model = runtime::Model::from_bytes(&artifact.to_bytes()?)?;
/// assert_eq!(model.output_shape(), [10]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// [`NetworkSpec::without_batch_norm`]: crate::NetworkSpec::without_batch_norm
pub fn parameters_of(
    spec: &crate::NetworkSpec,
    vs: &nn::VarStore,
    names: &NameMap,
) -> Result<Vec<DeployedParameter>, ExportError> {
    spec.validate()?;
    let vars = vs.variables();
    let layers = &spec.layers;
    let prefix = |index: usize| {
        names
            .prefix(index)
            .ok_or(ExportError::UnnamedLayer { index })
    };
    let mut out = Vec::new();
    let mut removed = 0;
    for (index, layer) in layers.iter().enumerate() {
        let Some((weight_shape, out_channels)) = layer.weight_shape() else {
            if let LayerSpec::BatchNorm2d { .. } = layer {
                if index == 0 || !matches!(layers[index - 1], LayerSpec::Conv2d { .. }) {
                    return Err(ExportError::Unfoldable { index });
                }
                removed += 1;
            }
            continue;
        };
        let p = prefix(index)?;
        let (_, mut weight) = variable(&vars, &format!("{p}.weight"), &weight_shape)?;
        let (_, mut bias) = variable(&vars, &format!("{p}.bias"), &[out_channels])?;
        if let Some(&LayerSpec::BatchNorm2d { eps, .. }) = layers.get(index + 1) {
            fold_batch_norm(&vars, &prefix(index + 1)?, eps, &mut weight, &mut bias)?;
        }
        let deployed = index - removed;
        for (name, shape, data) in [
            (runtime::weight_name(deployed), weight_shape, weight),
            (runtime::bias_name(deployed), vec![out_channels], bias),
        ] {
            let data = to_f32(&name, &data)?;
            out.push(DeployedParameter { name, shape, data });
        }
    }
    Ok(out)
}

/// Folds the batch norm whose variables are under `bn` into the weight and bias of the
/// convolution before it, in f64: `w * s` and `(b - mean) * s + beta` per output channel,
/// with `s = gamma / sqrt(var + eps)`.
fn fold_batch_norm(
    vars: &std::collections::HashMap<String, Tensor>,
    bn: &str,
    eps: f64,
    weight: &mut [f64],
    bias: &mut [f64],
) -> Result<(), ExportError> {
    let channels = [bias.len()];
    let (_, gamma) = variable(vars, &format!("{bn}.weight"), &channels)?;
    let (_, beta) = variable(vars, &format!("{bn}.bias"), &channels)?;
    let (_, mean) = variable(vars, &format!("{bn}.running_mean"), &channels)?;
    let (_, var) = variable(vars, &format!("{bn}.running_var"), &channels)?;
    let per_channel = weight.len() / bias.len().max(1);
    for (c, row) in weight.chunks_exact_mut(per_channel.max(1)).enumerate() {
        let s = gamma[c] / (var[c] + eps).sqrt();
        row.iter_mut().for_each(|w| *w *= s);
        bias[c] = (bias[c] - mean[c]) * s + beta[c];
    }
    Ok(())
}

/// The parameters of a graph's deployed form ([`GraphSpec::without_batch_norm`]) from the
/// variables of its [`GraphNetwork`](crate::GraphNetwork) in `vs` (at the store's root),
/// in node order: every convolution and dense layer's `<node>.weight` and `<node>.bias`,
/// a foldable batch norm folded into its convolution (in f64, rounded once to f32), and a
/// batch norm that cannot be folded kept as its four tensors (`weight`, `bias`,
/// `running_mean`, `running_var`). Loaded with [`load_parameters`] into a network of the
/// deployed graph, they compute what the trained network computes in eval mode.
///
/// ```
/// use models::export;
/// use models::{GraphNetwork, GraphSpec, INPUT, Node, Op};
/// use tch::{nn, Device};
///
/// // A graph of one's own: a convolution with batch norm, a residual sum, a head.
/// let conv = Op::Conv2d {
///     in_channels: 1, out_channels: 4, kernel: [3, 3], stride: [2, 2], padding: [1, 1], groups: 1,
/// };
/// let spec = GraphSpec {
///     name: "mine".into(),
///     input: [1, 28, 28],
///     nodes: vec![
///         Node::new("conv", conv, &[INPUT]),
///         Node::new("bn", Op::BatchNorm2d { features: 4, eps: 1e-5 }, &["conv"]),
///         Node::new("act", Op::Silu, &["bn"]),
///         Node::new("sum", Op::Add, &["act", "bn"]),
///         Node::new("gap", Op::GlobalAvgPool, &["sum"]),
///         Node::new("fc", Op::Linear { in_features: 4, out_features: 10 }, &["gap"]),
///     ],
/// };
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _net = GraphNetwork::new(&vs.root(), &spec)?;
/// let params = export::graph_parameters(&spec, &vs)?;
/// let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
/// // The batch norm is folded into `conv`.
/// assert_eq!(names, ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]);
/// // The deployed graph takes them as they are.
/// let deployed_vs = nn::VarStore::new(Device::Cpu);
/// let _deployed = GraphNetwork::new(&deployed_vs.root(), &spec.without_batch_norm())?;
/// export::load_parameters(&deployed_vs, &params)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// [`GraphSpec::without_batch_norm`]: crate::GraphSpec::without_batch_norm
pub fn graph_parameters(
    spec: &crate::GraphSpec,
    vs: &nn::VarStore,
) -> Result<Vec<DeployedParameter>, ExportError> {
    spec.validate()?;
    let vars = vs.variables();
    let folds: std::collections::HashMap<usize, usize> =
        spec.foldable_batch_norms().into_iter().collect();
    let folded: std::collections::HashSet<usize> = folds.values().copied().collect();
    let mut out = Vec::new();
    for (index, node) in spec.nodes.iter().enumerate() {
        let name = &node.name;
        let mut push = |suffix: &str, shape: Vec<usize>, data: &[f64]| -> Result<(), ExportError> {
            let name = format!("{name}.{suffix}");
            let data = to_f32(&name, data)?;
            out.push(DeployedParameter { name, shape, data });
            Ok(())
        };
        match node.op {
            crate::Op::BatchNorm2d { features, .. } if !folded.contains(&index) => {
                for suffix in ["weight", "bias", "running_mean", "running_var"] {
                    let (shape, data) = variable(&vars, &format!("{name}.{suffix}"), &[features])?;
                    push(suffix, shape, &data)?;
                }
            }
            ref op => {
                let Some((weight_shape, out_channels)) = op.weight_shape() else {
                    continue;
                };
                let (_, mut weight) = variable(&vars, &format!("{name}.weight"), &weight_shape)?;
                let (_, mut bias) = variable(&vars, &format!("{name}.bias"), &[out_channels])?;
                if let Some(&bn) = folds.get(&index)
                    && let crate::Op::BatchNorm2d { eps, .. } = spec.nodes[bn].op
                {
                    fold_batch_norm(&vars, &spec.nodes[bn].name, eps, &mut weight, &mut bias)?;
                }
                push("weight", weight_shape, &weight)?;
                push("bias", vec![out_channels], &bias)?;
            }
        }
    }
    Ok(out)
}

/// An artifact builder holding the deployed network and its parameters in `format`; add
/// more (activation quantization) or write it with `to_bytes`/`write`.
pub fn artifact(
    net: &Network,
    vs: &nn::VarStore,
    format: WeightFormat,
) -> Result<ArtifactBuilder, ExportError> {
    artifact_from_parameters(
        net.spec().without_batch_norm(),
        &deployed_parameters(net, vs)?,
        format,
    )
}

/// An artifact builder for `network` (a deployed network: no batch norm) holding `params`
/// (as [`deployed_parameters`] returns them, possibly modified) in `format`.
pub fn artifact_from_parameters(
    network: crate::NetworkSpec,
    params: &[DeployedParameter],
    format: WeightFormat,
) -> Result<ArtifactBuilder, ExportError> {
    let mut builder = ArtifactBuilder::new(network);
    add_parameters(&mut builder, params, format)?;
    Ok(builder)
}

/// An artifact builder for the graph `net` (built in `vs` at its root) in `format`: its
/// deployed graph ([`GraphSpec::without_batch_norm`]) and parameters
/// ([`graph_parameters`]: batch norm folded where the graph allows, kept as its four vectors
/// where it does not). The artifact is format version 3, which the runtime runs node by
/// node.
///
/// ```
/// use models::export::{self, WeightFormat};
/// use models::{GraphNetwork, GraphSpec};
/// use tch::{nn, Device, Kind, Tensor};
///
/// let spec = GraphSpec::mobilenet();
/// let vs = nn::VarStore::new(Device::Cpu);
/// let net = GraphNetwork::new(&vs.root(), &spec)?;
/// let bytes = export::graph_artifact(&net, &vs, WeightFormat::F32)?.to_bytes()?;
/// let model = runtime::Model::from_bytes(&bytes)?;
/// assert_eq!(model.graph(), &spec.without_batch_norm());
///
/// // The runtime computes what LibTorch does in eval mode.
/// let xs = Tensor::randn([2, 1, 28, 28], (Kind::Float, Device::Cpu));
/// let expected = Vec::<f32>::try_from(tch::no_grad(|| net.f_forward_t(&xs, false))?.flatten(0, -1))?;
/// let input = Vec::<f32>::try_from(xs.flatten(0, -1))?;
/// let input = ndarray::Array4::from_shape_vec((2, 1, 28, 28), input)?;
/// let logits = model.run(input.view())?;
/// for (a, b) in logits.iter().zip(&expected) {
///     assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "{a} against {b}");
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// [`GraphSpec::without_batch_norm`]: crate::GraphSpec::without_batch_norm
pub fn graph_artifact(
    net: &crate::GraphNetwork,
    vs: &nn::VarStore,
    format: WeightFormat,
) -> Result<ArtifactBuilder, ExportError> {
    let params = graph_parameters(net.spec(), vs)?;
    graph_artifact_from_parameters(net.spec().without_batch_norm(), &params, format)
}

/// An artifact builder for `graph` (a deployed graph) holding `params` (as
/// [`graph_parameters`] returns them, possibly modified) in `format`: conv2d and linear
/// weights in the format's scheme, biases and batch-norm vectors as f32 (f16 for the
/// half-precision formats).
pub fn graph_artifact_from_parameters(
    graph: crate::GraphSpec,
    params: &[DeployedParameter],
    format: WeightFormat,
) -> Result<ArtifactBuilder, ExportError> {
    let mut builder = ArtifactBuilder::for_graph(graph);
    add_parameters(&mut builder, params, format)?;
    Ok(builder)
}

/// Adds `params` to `builder`: weights (`*.weight` of two or more dimensions) in `format`'s
/// scheme, every vector as f32, or f16 for the half-precision formats.
fn add_parameters(
    builder: &mut ArtifactBuilder,
    params: &[DeployedParameter],
    format: WeightFormat,
) -> Result<(), ExportError> {
    for p in params {
        let is_weight = p.name.ends_with(".weight") && p.shape.len() > 1;
        let storage = match format {
            WeightFormat::Int8DynamicRange if is_weight => Storage::Int8(Granularity::PerChannel),
            WeightFormat::Int8Compact if is_weight => {
                Storage::Int8Smallest(Granularity::PerChannel)
            }
            WeightFormat::Int8PerTensor if is_weight => Storage::Int8(Granularity::PerTensor),
            WeightFormat::F16 => Storage::F16,
            WeightFormat::Palette if is_weight => Storage::Palette(Granularity::PerTensor),
            WeightFormat::PaletteHalf if is_weight => Storage::PaletteHalf(Granularity::PerTensor),
            WeightFormat::PaletteHalf => Storage::F16,
            _ => Storage::F32,
        };
        builder.add(&p.name, &p.data, &p.shape, storage)?;
    }
    Ok(())
}

/// Copies `params` into the variables of the same names in `vs` (a network built from the
/// deployed spec at the store's root): how a folded network becomes trainable again, for
/// quantization-aware training or pruning of the deployed form.
pub fn load_parameters(vs: &nn::VarStore, params: &[DeployedParameter]) -> Result<(), ExportError> {
    let vars = vs.variables();
    tch::no_grad(|| {
        for p in params {
            let mut var = vars
                .get(&p.name)
                .ok_or_else(|| ExportError::MissingVariable {
                    name: p.name.clone(),
                })?
                .shallow_clone();
            let shape: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
            if var.size() != shape {
                return Err(ExportError::BadValue {
                    name: p.name.clone(),
                    reason: format!(
                        "shape {:?} does not match the variable's {:?}",
                        p.shape,
                        var.size()
                    ),
                });
            }
            let value = Tensor::from_slice(&p.data)
                .view(shape.as_slice())
                .to_device(var.device());
            var.f_copy_(&value)?;
        }
        Ok(())
    })
}

/// Writes `net` (built in `vs` at its root) as an f32 artifact at `path`, batch norm folded.
/// The file appears atomically.
pub fn export_f32(
    net: &Network,
    vs: &nn::VarStore,
    path: impl AsRef<Path>,
) -> Result<(), ExportError> {
    artifact(net, vs, WeightFormat::F32)?.write(path)?;
    Ok(())
}

/// Like [`export_f32`] with per-channel symmetric int8 weights
/// ([`WeightFormat::Int8DynamicRange`]).
pub fn export_int8_dynamic(
    net: &Network,
    vs: &nn::VarStore,
    path: impl AsRef<Path>,
) -> Result<(), ExportError> {
    artifact(net, vs, WeightFormat::Int8DynamicRange)?.write(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetworkSpec;
    use ndarray::Array4;
    use tch::nn::ModuleT;

    /// Largest difference between the runtime's logits (BN folded, f32) and tch's eval-mode
    /// logits (BN applied), relative to the largest logit: the fold rounds each weight once
    /// and the two engines sum in different orders; f32 rounding over k <= 1600 terms is
    /// about 1e-5 of the magnitude, this leaves ten times that.
    const FOLDED_LOGIT_TOLERANCE: f32 = 1e-4;
    /// The same for int8 weights and dynamically quantized activations: each weight and
    /// activation moves by at most half a step (1/254 of its range); the Python round trip
    /// measures 0.45% on a briefly trained teacher.
    const INT8_LOGIT_TOLERANCE: f32 = 0.05;

    fn trained_statistics(seed: i64) -> (nn::VarStore, Network) {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::new(&vs.root(), &NetworkSpec::teacher_cnn()).unwrap();
        // Training-mode passes on shifted, scaled inputs move the running statistics far
        // from (0, 1), so that a wrong fold would show.
        tch::no_grad(|| {
            for _ in 0..5 {
                let xs = Tensor::randn([16, 1, 28, 28], (Kind::Float, Device::Cpu)) * 3.0 + 0.7;
                let _ = net.forward_t(&xs, true);
            }
            // Non-trivial affine parameters too.
            let vars = vs.variables();
            for name in ["1.weight", "1.bias", "5.weight", "5.bias"] {
                let mut v = vars[name].shallow_clone();
                let noise = Tensor::rand(v.size(), (Kind::Float, Device::Cpu)) + 0.5;
                v.copy_(&(&v * noise + 0.1));
            }
        });
        (vs, net)
    }

    fn relative_difference(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    fn compare(format: WeightFormat, tolerance: f32) {
        let (vs, net) = trained_statistics(7);
        let bytes = artifact(&net, &vs, format).unwrap().to_bytes().unwrap();
        let model = runtime::Model::from_bytes(&bytes).unwrap();
        assert_eq!(
            model.network(),
            Some(&NetworkSpec::teacher_cnn().without_batch_norm())
        );
        let xs = Tensor::randn([8, 1, 28, 28], (Kind::Float, Device::Cpu));
        let expected = tch::no_grad(|| net.forward_t(&xs, false));
        let expected = Vec::<f32>::try_from(&expected.view([-1])).unwrap();
        let input = Vec::<f32>::try_from(&xs.view([-1])).unwrap();
        let input = Array4::from_shape_vec((8, 1, 28, 28), input).unwrap();
        let got = model.run(input.view()).unwrap();
        let difference = relative_difference(got.as_slice().unwrap(), &expected);
        assert!(difference < tolerance, "{format:?}: {difference}");
    }

    #[test]
    fn folded_f32_artifact_matches_tch_in_eval_mode() {
        compare(WeightFormat::F32, FOLDED_LOGIT_TOLERANCE);
    }

    #[test]
    fn int8_artifact_is_close_to_tch_in_eval_mode() {
        compare(WeightFormat::Int8DynamicRange, INT8_LOGIT_TOLERANCE);
    }

    #[test]
    fn deployed_names_follow_the_deployed_indices() {
        let (vs, net) = trained_statistics(1);
        let names: Vec<String> = deployed_parameters(&net, &vs)
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names,
            [
                "0.weight",
                "0.bias",
                "3.weight",
                "3.bias",
                "8.weight",
                "8.bias",
                "11.weight",
                "11.bias"
            ]
        );
    }

    #[test]
    fn batch_norm_after_anything_but_a_convolution_is_an_error() {
        let mut spec = NetworkSpec::teacher_cnn();
        // conv, relu, bn: the ReLU sits between, so the fold would be wrong.
        spec.layers.swap(1, 2);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::new(&vs.root(), &spec).unwrap();
        let err = artifact(&net, &vs, WeightFormat::F32).unwrap_err();
        assert!(matches!(err, ExportError::Unfoldable { index: 2 }), "{err}");
    }

    #[test]
    fn a_network_under_a_prefix_names_the_missing_variable() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::new(&(vs.root() / "teacher"), &NetworkSpec::teacher_cnn()).unwrap();
        let err = artifact(&net, &vs, WeightFormat::F32).unwrap_err();
        assert!(err.to_string().contains("`0.weight`"), "{err}");
    }

    /// A model of one's own: tch layers under their own names, batch norm included.
    struct OwnModel {
        conv: nn::Conv2D,
        bn: nn::BatchNorm,
        head: nn::Linear,
    }

    impl OwnModel {
        fn spec() -> NetworkSpec {
            NetworkSpec {
                name: "own".into(),
                input: [1, 8, 8],
                layers: vec![
                    LayerSpec::Conv2d {
                        in_channels: 1,
                        out_channels: 4,
                        kernel: 3,
                        stride: 1,
                        padding: 1,
                    },
                    LayerSpec::BatchNorm2d {
                        features: 4,
                        eps: 1e-5,
                    },
                    LayerSpec::Relu,
                    LayerSpec::Flatten,
                    LayerSpec::Linear {
                        in_features: 256,
                        out_features: 3,
                    },
                ],
            }
        }

        fn names() -> NameMap {
            NameMap::new()
                .layer(0, "features.conv")
                .layer(1, "features.bn")
                .layer(4, "head")
        }

        fn new(vs: &nn::VarStore) -> Self {
            let features = vs.root() / "features";
            let conv_config = nn::ConvConfig {
                padding: 1,
                ..Default::default()
            };
            Self {
                conv: nn::conv2d(&features / "conv", 1, 4, 3, conv_config),
                bn: nn::batch_norm2d(&features / "bn", 4, Default::default()),
                head: nn::linear(vs.root() / "head", 256, 3, Default::default()),
            }
        }

        fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
            xs.apply(&self.conv)
                .apply_t(&self.bn, train)
                .relu()
                .flatten(1, -1)
                .apply(&self.head)
        }
    }

    #[test]
    fn a_model_of_ones_own_exports_through_a_name_map() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = OwnModel::new(&vs);
        tch::no_grad(|| {
            for _ in 0..3 {
                let xs = Tensor::randn([16, 1, 8, 8], (Kind::Float, Device::Cpu)) * 2.0 + 0.5;
                let _ = model.forward(&xs, true);
            }
        });
        let params = parameters_of(&OwnModel::spec(), &vs, &OwnModel::names()).unwrap();
        let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["0.weight", "0.bias", "3.weight", "3.bias"]);
        let deployed = OwnModel::spec().without_batch_norm();
        let bytes = artifact_from_parameters(deployed, &params, WeightFormat::F32)
            .unwrap()
            .to_bytes()
            .unwrap();
        let runtime_model = runtime::Model::from_bytes(&bytes).unwrap();
        let xs = Tensor::randn([5, 1, 8, 8], (Kind::Float, Device::Cpu));
        let expected = tch::no_grad(|| model.forward(&xs, false));
        let expected = Vec::<f32>::try_from(&expected.view([-1])).unwrap();
        let input = Vec::<f32>::try_from(&xs.view([-1])).unwrap();
        let input = Array4::from_shape_vec((5, 1, 8, 8), input).unwrap();
        let got = runtime_model.run(input.view()).unwrap();
        let difference = relative_difference(got.as_slice().unwrap(), &expected);
        assert!(difference < FOLDED_LOGIT_TOLERANCE, "{difference}");
    }

    #[test]
    fn a_graph_deploys_with_its_batch_norms_folded_where_they_fold() {
        use crate::{GraphNetwork, GraphSpec, INPUT, Node, Op};
        let node = Node::new;
        let conv = |in_channels, stride| Op::Conv2d {
            in_channels,
            out_channels: 4,
            kernel: [3, 3],
            stride: [stride; 2],
            padding: [1, 1],
            groups: 1,
        };
        let bn = Op::BatchNorm2d {
            features: 4,
            eps: 1e-3,
        };
        // A residual block whose sum goes through a batch norm, which cannot be folded.
        let mut nodes = vec![
            node("stem.conv", conv(1, 2), &[INPUT]),
            node("stem.bn", bn.clone(), &["stem.conv"]),
            node("block.conv", conv(4, 1), &["stem.bn"]),
            node("block.bn", bn.clone(), &["block.conv"]),
            node("block.add", Op::Add, &["block.bn", "stem.bn"]),
            node("block.add_bn", bn, &["block.add"]),
            node("pool", Op::GlobalAvgPool, &["block.add_bn"]),
        ];
        nodes.push(node(
            "fc",
            Op::Linear {
                in_features: 4,
                out_features: 3,
            },
            &["pool"],
        ));
        let spec = GraphSpec {
            name: "folded".into(),
            input: [1, 12, 12],
            nodes,
        };
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = GraphNetwork::new(&vs.root(), &spec).unwrap();
        tch::no_grad(|| {
            for _ in 0..5 {
                let xs = Tensor::randn([8, 1, 12, 12], (Kind::Float, Device::Cpu)) * 3.0 + 0.7;
                let _ = net.f_forward_t(&xs, true).unwrap();
            }
            for (name, mut v) in vs.variables() {
                if name.contains("bn.") && !name.contains("running") {
                    let noise = Tensor::rand(v.size(), (Kind::Float, Device::Cpu)) + 0.5;
                    v.copy_(&(&v * noise + 0.1));
                }
            }
        });
        let params = graph_parameters(&spec, &vs).unwrap();
        let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "stem.conv.weight",
                "stem.conv.bias",
                "block.conv.weight",
                "block.conv.bias",
                "block.add_bn.weight",
                "block.add_bn.bias",
                "block.add_bn.running_mean",
                "block.add_bn.running_var",
                "fc.weight",
                "fc.bias",
            ]
        );
        let deployed = spec.without_batch_norm();
        let deployed_vs = nn::VarStore::new(Device::Cpu);
        let deployed_net = GraphNetwork::new(&deployed_vs.root(), &deployed).unwrap();
        load_parameters(&deployed_vs, &params).unwrap();
        let xs = Tensor::randn([6, 1, 12, 12], (Kind::Float, Device::Cpu)) * 2.0;
        let expected = net.f_forward_t(&xs, false).unwrap();
        let got = deployed_net.f_forward_t(&xs, false).unwrap();
        let flat = |t: &Tensor| Vec::<f32>::try_from(&t.view([-1])).unwrap();
        let difference = relative_difference(&flat(&got), &flat(&expected));
        assert!(difference < FOLDED_LOGIT_TOLERANCE, "{difference}");
        // Without the fold (the deployed graph with the trained, unfolded convolutions), the
        // logits differ: the test sees a missing fold.
        let unfolded_vs = nn::VarStore::new(Device::Cpu);
        let unfolded = GraphNetwork::new(&unfolded_vs.root(), &deployed).unwrap();
        let raw: Vec<DeployedParameter> = ["stem.conv", "block.conv"]
            .iter()
            .flat_map(|n| ["weight", "bias"].map(|s| format!("{n}.{s}")))
            .chain(params[4..].iter().map(|p| p.name.clone()))
            .map(|name| {
                let t = &vs.variables()[&name];
                DeployedParameter {
                    shape: t.size().iter().map(|&d| d as usize).collect(),
                    data: Vec::<f32>::try_from(&t.view([-1])).unwrap(),
                    name,
                }
            })
            .collect();
        load_parameters(&unfolded_vs, &raw).unwrap();
        let wrong = unfolded.f_forward_t(&xs, false).unwrap();
        assert!(relative_difference(&flat(&wrong), &flat(&expected)) > 0.01);
    }

    #[test]
    fn palette_formats_store_clustered_weights_as_indices() {
        // The own model's weights clustered to four values per tensor, a third of them zero.
        let params: Vec<DeployedParameter> = [("0.weight", vec![4, 1, 3, 3]), ("0.bias", vec![4])]
            .into_iter()
            .chain([("3.weight", vec![3, 256]), ("3.bias", vec![3])])
            .map(|(name, shape)| {
                let len = shape.iter().product::<usize>();
                let data = (0..len)
                    .map(|i| match i % 6 {
                        0 | 1 => 0.0,
                        2 => -0.4321,
                        3 => 0.1111,
                        4 => 0.3333,
                        _ => 0.6543,
                    })
                    .collect();
                DeployedParameter {
                    name: name.into(),
                    shape,
                    data,
                }
            })
            .collect();
        let deployed = OwnModel::spec().without_batch_norm();
        let bytes = |format| {
            artifact_from_parameters(deployed.clone(), &params, format)
                .unwrap()
                .to_bytes()
                .unwrap()
        };
        let (full, half) = (
            bytes(WeightFormat::Palette),
            bytes(WeightFormat::PaletteHalf),
        );
        let view = runtime::Artifact::from_bytes(&full).unwrap();
        let half_view = runtime::Artifact::from_bytes(&half).unwrap();
        for layer in [0, 3] {
            let (l, h) = (view.layer(layer).unwrap(), half_view.layer(layer).unwrap());
            assert!(
                l.weight_scheme.name().starts_with("palette"),
                "{:?}",
                l.weight_scheme
            );
            assert_eq!(l.weight_scheme, h.weight_scheme);
            assert_eq!(l.bias_scheme.name(), "f32");
            assert_eq!(h.bias_scheme.name(), "f16");
        }
        // Two bytes fewer per centroid and per bias value: 4 + 4 centroids, 4 + 3 biases.
        assert_eq!(full.len() - half.len(), 2 * (8 + 7));
        // Palette is exact; the half form holds the centroids rounded to f16.
        let runtime::WeightValues::Float(exact) = &view.layer(3).unwrap().weight else {
            panic!("palette weights decode to real values");
        };
        assert_eq!(exact, &params[2].data);
        let runtime::WeightValues::Float(rounded) = &half_view.layer(3).unwrap().weight else {
            panic!("palette weights decode to real values");
        };
        for (r, e) in rounded.iter().zip(exact) {
            assert_eq!(*r, half::f16::from_f32(*e).to_f32());
        }
    }

    #[test]
    fn a_name_map_that_misses_a_layer_or_a_shape_is_an_error() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = OwnModel::new(&vs);
        let spec = OwnModel::spec();
        let unnamed = NameMap::new()
            .layer(0, "features.conv")
            .layer(1, "features.bn");
        let err = parameters_of(&spec, &vs, &unnamed).unwrap_err();
        assert!(
            matches!(err, ExportError::UnnamedLayer { index: 4 }),
            "{err}"
        );
        let wrong = OwnModel::names().layer(4, "features.conv");
        let err = parameters_of(&spec, &vs, &wrong).unwrap_err().to_string();
        assert!(
            err.contains("`features.conv.weight`: shape [4, 1, 3, 3]"),
            "{err}"
        );
        let misspelt = OwnModel::names().layer(4, "heads");
        let err = parameters_of(&spec, &vs, &misspelt).unwrap_err();
        assert!(
            matches!(err, ExportError::MissingVariable { ref name } if name == "heads.weight"),
            "{err}"
        );
    }

    #[test]
    fn export_writes_a_loadable_file() {
        let (vs, net) = trained_statistics(2);
        let dir = std::env::temp_dir().join(format!("models-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (f32_path, int8_path) = (dir.join("f32.safetensors"), dir.join("int8.safetensors"));
        export_f32(&net, &vs, &f32_path).unwrap();
        export_int8_dynamic(&net, &vs, &int8_path).unwrap();
        let f32_model = runtime::Model::load(&f32_path).unwrap();
        let int8_model = runtime::Model::load(&int8_path).unwrap();
        assert!(
            f32_model
                .execution()
                .iter()
                .all(|(_, e)| *e == runtime::Execution::F32)
        );
        assert!(
            int8_model
                .execution()
                .iter()
                .all(|(_, e)| *e == runtime::Execution::Int8Dynamic)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
