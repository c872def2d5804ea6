//! Networks as graphs: named nodes, each an operation on the outputs of earlier nodes.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{LayerSpec, NetworkSpec, SpecError};

/// The name by which a node takes the network's input.
pub const INPUT: &str = "input";

/// One operation of a graph, with all its hyperparameters. Shapes are per sample, without
/// the batch dimension: `(C, H, W)` for images, `(F)` for features.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// 2-D convolution with bias, as PyTorch's `Conv2d`: `[height, width]` kernel, stride
    /// and zero padding, and `groups` (1: dense; `in_channels`: depthwise).
    Conv2d {
        /// Input channels, a multiple of `groups`.
        in_channels: usize,
        /// Output channels, a multiple of `groups`.
        out_channels: usize,
        /// Kernel height and width.
        kernel: [usize; 2],
        /// Vertical and horizontal stride.
        stride: [usize; 2],
        /// Zero padding above and below, and left and right.
        padding: [usize; 2],
        /// Channel groups: each output channel sees `in_channels / groups` inputs.
        groups: usize,
    },
    /// Batch normalisation over the channels of `(C, H, W)` input (see
    /// [`LayerSpec::BatchNorm2d`]).
    BatchNorm2d {
        /// Channels.
        features: usize,
        /// Added to the variance for stability; positive.
        eps: f64,
    },
    /// Fully connected layer `y = x W^T + b` over `(F)` input.
    Linear {
        /// Input features.
        in_features: usize,
        /// Output features.
        out_features: usize,
    },
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `tanh(x)`.
    Tanh,
    /// `x * Phi(x)`, with the exact normal CDF (PyTorch's default `GELU`).
    Gelu,
    /// `x * sigmoid(x)` (swish).
    Silu,
    /// `x * relu6(x + 3) / 6`.
    HardSwish,
    /// Max pooling; padded positions never win.
    MaxPool2d {
        /// Window height and width.
        kernel: [usize; 2],
        /// Vertical and horizontal stride.
        stride: [usize; 2],
        /// Padding above and below, and left and right; at most half the window.
        padding: [usize; 2],
    },
    /// Average pooling over windows inside the input (no padding).
    AvgPool2d {
        /// Window height and width.
        kernel: [usize; 2],
        /// Vertical and horizontal stride.
        stride: [usize; 2],
    },
    /// The mean of each channel: `(C, H, W)` to `(C)`.
    GlobalAvgPool,
    /// Everything but the batch dimension into one: `(C, H, W)` to `(C * H * W)`.
    Flatten,
    /// Dropout while training, identity at inference.
    Dropout {
        /// Probability of zeroing an element, in [0, 1).
        p: f64,
    },
    /// The elementwise sum of two or more inputs of one shape (a residual connection).
    Add,
    /// Two or more `(C_i, H, W)` inputs stacked along the channels.
    Concat,
}

impl Op {
    /// The operation's name, as serialised.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Conv2d { .. } => "conv2d",
            Self::BatchNorm2d { .. } => "batch_norm2d",
            Self::Linear { .. } => "linear",
            Self::Relu => "relu",
            Self::Relu6 => "relu6",
            Self::Sigmoid => "sigmoid",
            Self::Tanh => "tanh",
            Self::Gelu => "gelu",
            Self::Silu => "silu",
            Self::HardSwish => "hard_swish",
            Self::MaxPool2d { .. } => "max_pool2d",
            Self::AvgPool2d { .. } => "avg_pool2d",
            Self::GlobalAvgPool => "global_avg_pool",
            Self::Flatten => "flatten",
            Self::Dropout { .. } => "dropout",
            Self::Add => "add",
            Self::Concat => "concat",
        }
    }

    /// The weight shape (PyTorch's layout: `[out, in / groups, kh, kw]` or `[out, in]`) and
    /// the bias length of an operation whose parameters deployment keeps (conv2d and
    /// linear); `None` for the others.
    pub fn weight_shape(&self) -> Option<(Vec<usize>, usize)> {
        match *self {
            Self::Conv2d {
                in_channels,
                out_channels,
                kernel,
                groups,
                ..
            } => Some((
                vec![
                    out_channels,
                    in_channels.checked_div(groups).unwrap_or(0),
                    kernel[0],
                    kernel[1],
                ],
                out_channels,
            )),
            Self::Linear {
                in_features,
                out_features,
            } => Some((vec![out_features, in_features], out_features)),
            _ => None,
        }
    }

    /// How many inputs the operation takes: exactly one, or (`None`) two or more.
    fn arity(&self) -> Option<usize> {
        match self {
            Self::Add | Self::Concat => None,
            _ => Some(1),
        }
    }

    /// The output shape for the shapes of the inputs (as many as [`Op::arity`] allows),
    /// with checked arithmetic, or why they do not fit.
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>, String> {
        let image = |shape: &[usize]| match *shape {
            [c, h, w] => Ok((c, h, w)),
            _ => Err(format!("expects a (C, H, W) input, got {shape:?}")),
        };
        match (self, inputs) {
            (Self::Add, [first, rest @ ..]) => match rest.iter().find(|s| *s != first) {
                Some(other) => Err(format!(
                    "adds inputs of different shapes: {first:?} and {other:?}"
                )),
                None => Ok(first.to_vec()),
            },
            (Self::Concat, [first, ..]) => {
                let (_, h, w) = image(first)?;
                let mut channels = 0usize;
                for shape in inputs {
                    let (c, hi, wi) = image(shape)?;
                    if (hi, wi) != (h, w) {
                        return Err(format!("concatenates {h}x{w} and {hi}x{wi} inputs"));
                    }
                    channels = channels
                        .checked_add(c)
                        .ok_or("the channels overflow usize")?;
                }
                Ok(vec![channels, h, w])
            }
            (op, [input]) => op.unary_output_shape(input, image),
            _ => Err(format!("takes one input, got {}", inputs.len())),
        }
    }

    fn unary_output_shape(
        &self,
        input: &[usize],
        image: impl Fn(&[usize]) -> Result<(usize, usize, usize), String>,
    ) -> Result<Vec<usize>, String> {
        match *self {
            Self::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                groups,
            } => {
                let (c, h, w) = image(input)?;
                if in_channels != c {
                    return Err(format!("expects {in_channels} input channels, got {c}"));
                }
                if out_channels == 0 || groups == 0 {
                    return Err("channels and groups must be positive".into());
                }
                if in_channels % groups != 0 || out_channels % groups != 0 {
                    return Err(format!(
                        "{groups} groups do not divide {in_channels} input and {out_channels} output channels"
                    ));
                }
                Ok(vec![
                    out_channels,
                    window(h, kernel[0], stride[0], padding[0])?,
                    window(w, kernel[1], stride[1], padding[1])?,
                ])
            }
            Self::MaxPool2d {
                kernel,
                stride,
                padding,
            } => {
                let (c, h, w) = image(input)?;
                if padding[0] * 2 > kernel[0] || padding[1] * 2 > kernel[1] {
                    return Err(format!(
                        "padding {padding:?} exceeds half the window {kernel:?}"
                    ));
                }
                Ok(vec![
                    c,
                    window(h, kernel[0], stride[0], padding[0])?,
                    window(w, kernel[1], stride[1], padding[1])?,
                ])
            }
            Self::AvgPool2d { kernel, stride } => {
                let (c, h, w) = image(input)?;
                Ok(vec![
                    c,
                    window(h, kernel[0], stride[0], 0)?,
                    window(w, kernel[1], stride[1], 0)?,
                ])
            }
            Self::GlobalAvgPool => {
                let (c, h, w) = image(input)?;
                if h == 0 || w == 0 {
                    return Err(format!("averages an empty {h}x{w} input"));
                }
                Ok(vec![c])
            }
            Self::BatchNorm2d { features, eps } => {
                LayerSpec::BatchNorm2d { features, eps }.output_shape(input)
            }
            Self::Linear {
                in_features,
                out_features,
            } => LayerSpec::Linear {
                in_features,
                out_features,
            }
            .output_shape(input),
            Self::Flatten => LayerSpec::Flatten.output_shape(input),
            Self::Dropout { p } => LayerSpec::Dropout { p }.output_shape(input),
            Self::Relu
            | Self::Relu6
            | Self::Sigmoid
            | Self::Tanh
            | Self::Gelu
            | Self::Silu
            | Self::HardSwish => Ok(input.to_vec()),
            Self::Add | Self::Concat => Err("takes two or more inputs".into()),
        }
    }
}

/// The output length of a sliding window over `side` elements padded by `padding` on both
/// ends, or why it does not fit.
pub(crate) fn window(
    side: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<usize, String> {
    if kernel == 0 || stride == 0 {
        return Err("kernel and stride must be positive".into());
    }
    padding
        .checked_mul(2)
        .and_then(|p| p.checked_add(side))
        .ok_or_else(|| format!("padding {padding} overflows the input size"))?
        .checked_sub(kernel)
        .map(|s| s / stride + 1)
        .ok_or_else(|| format!("window {kernel} is larger than the padded input of {side}"))
}

impl From<&LayerSpec> for Op {
    fn from(layer: &LayerSpec) -> Self {
        match *layer {
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            } => Self::Conv2d {
                in_channels,
                out_channels,
                kernel: [kernel; 2],
                stride: [stride; 2],
                padding: [padding; 2],
                groups: 1,
            },
            LayerSpec::Linear {
                in_features,
                out_features,
            } => Self::Linear {
                in_features,
                out_features,
            },
            LayerSpec::BatchNorm2d { features, eps } => Self::BatchNorm2d { features, eps },
            LayerSpec::Relu => Self::Relu,
            LayerSpec::MaxPool2d { kernel, stride } => Self::MaxPool2d {
                kernel: [kernel; 2],
                stride: [stride; 2],
                padding: [0; 2],
            },
            LayerSpec::Flatten => Self::Flatten,
            LayerSpec::Dropout { p } => Self::Dropout { p },
        }
    }
}

/// One node of a [`GraphSpec`]: a name, an operation, and the names of the nodes (or
/// [`INPUT`]) it takes, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Unique within the graph, not [`INPUT`], non-empty parts separated by single dots
    /// (`layer1.0.conv1`); the variables of a node with parameters are `<name>.weight` and
    /// `<name>.bias`.
    pub name: String,
    /// What the node computes.
    #[serde(flatten)]
    pub op: Op,
    /// Earlier nodes or [`INPUT`].
    pub inputs: Vec<String>,
}

impl Node {
    /// Node `name` computing `op` on `inputs` (earlier nodes' names or [`INPUT`]).
    ///
    /// ```
    /// use model_spec::{INPUT, Node, Op};
    ///
    /// let relu = Node::new("act", Op::Relu, &[INPUT]);
    /// assert_eq!(relu.inputs, ["input"]);
    /// ```
    pub fn new(name: &str, op: Op, inputs: &[&str]) -> Self {
        Self {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// A network as a directed acyclic graph: the nodes in an order where every node comes
/// after the nodes it takes; the last node is the output, and every other node feeds a
/// later one.
///
/// ```
/// use model_spec::{GraphSpec, INPUT, Node, Op};
///
/// let conv = |c| Op::Conv2d {
///     in_channels: c,
///     out_channels: 8,
///     kernel: [3, 3],
///     stride: [1, 1],
///     padding: [1, 1],
///     groups: 1,
/// };
/// // A residual block: the input of the block added to two convolutions of it.
/// let graph = GraphSpec {
///     name: "residual".into(),
///     input: [1, 28, 28],
///     nodes: vec![
///         Node::new("stem", conv(1), &[INPUT]),
///         Node::new("a", conv(8), &["stem"]),
///         Node::new("a_relu", Op::Relu, &["a"]),
///         Node::new("b", conv(8), &["a_relu"]),
///         Node::new("sum", Op::Add, &["b", "stem"]),
///         Node::new("pool", Op::GlobalAvgPool, &["sum"]),
///         Node::new("head", Op::Linear { in_features: 8, out_features: 10 }, &["pool"]),
///     ],
/// };
/// assert_eq!(graph.validate()?, vec![10]);
/// assert_eq!(graph.shapes()?[4], vec![8, 28, 28]);
/// # Ok::<(), model_spec::SpecError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GraphSpec {
    /// Name of the architecture, for reports.
    pub name: String,
    /// Input shape without the batch dimension: (channels, height, width).
    pub input: [usize; 3],
    /// The nodes, every one after those it takes.
    pub nodes: Vec<Node>,
}

impl GraphSpec {
    /// Checks that the graph holds together and returns the output shape.
    pub fn validate(&self) -> Result<Vec<usize>, SpecError> {
        let mut shapes = self.shapes()?;
        Ok(shapes.pop().unwrap_or_default())
    }

    /// The output shape of every node, in order, with checked arithmetic: an error, never
    /// a panic or an overflow, for any graph.
    pub fn shapes(&self) -> Result<Vec<Vec<usize>>, SpecError> {
        let network_error = |reason: String| SpecError::InvalidNetwork {
            network: self.name.clone(),
            reason,
        };
        if self.nodes.is_empty() {
            return Err(network_error("has no nodes".into()));
        }
        if self.input.contains(&0) {
            return Err(network_error(format!(
                "has an empty input {:?}",
                self.input
            )));
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut used = vec![false; self.nodes.len()];
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            let node_error = |reason: String| SpecError::InvalidNode {
                network: self.name.clone(),
                node: node.name.clone(),
                op: node.op.name(),
                reason,
            };
            if node.name == INPUT || node.name.split('.').any(str::is_empty) {
                return Err(node_error(format!(
                    "`{}` is not a node name: parts separated by single dots, not `{INPUT}`",
                    node.name
                )));
            }
            if index.insert(&node.name, i).is_some() {
                return Err(node_error("the name is used twice".into()));
            }
            match node.op.arity() {
                Some(n) if node.inputs.len() != n => {
                    return Err(node_error(format!(
                        "takes {n} input, got {}",
                        node.inputs.len()
                    )));
                }
                None if node.inputs.len() < 2 => {
                    return Err(node_error(format!(
                        "takes two or more inputs, got {}",
                        node.inputs.len()
                    )));
                }
                _ => {}
            }
            let mut inputs: Vec<&[usize]> = Vec::with_capacity(node.inputs.len());
            for name in &node.inputs {
                if name == INPUT {
                    inputs.push(&self.input);
                    continue;
                }
                match index.get(name.as_str()) {
                    Some(&j) if j < i => {
                        used[j] = true;
                        inputs.push(&shapes[j]);
                    }
                    _ => {
                        return Err(node_error(format!(
                            "takes `{name}`, which is not an earlier node"
                        )));
                    }
                }
            }
            let shape = node.op.output_shape(&inputs).map_err(node_error)?;
            shapes.push(shape);
        }
        if let Some(unused) = used[..used.len() - 1].iter().position(|u| !u) {
            return Err(network_error(format!(
                "node `{}` feeds no later node: the last node is the only output",
                self.nodes[unused].name
            )));
        }
        Ok(shapes)
    }

    /// The batch norms that deployment folds into the convolution before them, as pairs of
    /// node indices (convolution, batch norm): those whose input is a convolution that
    /// feeds nothing else. Other batch norms (after an `add`, or after a convolution whose
    /// output is also used elsewhere) cannot be folded and stay a scale and shift.
    pub fn foldable_batch_norms(&self) -> Vec<(usize, usize)> {
        let index = |name: &str| self.nodes.iter().position(|n| n.name == name);
        let uses = |j: usize| {
            self.nodes
                .iter()
                .flat_map(|n| &n.inputs)
                .filter(|input| **input == self.nodes[j].name)
                .count()
        };
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| matches!(node.op, Op::BatchNorm2d { .. }))
            .filter_map(|(i, node)| {
                let j = index(node.inputs.first()?)?;
                let folds = matches!(self.nodes[j].op, Op::Conv2d { .. }) && uses(j) == 1;
                folds.then_some((j, i))
            })
            .collect()
    }

    /// The graph as deployed: every batch norm of [`GraphSpec::foldable_batch_norms`]
    /// removed, its consumers taking its convolution instead (to which exporters give the
    /// folded weights, under the convolution's name); the other batch norms stay.
    ///
    /// ```
    /// use model_spec::{GraphSpec, INPUT, Node, Op};
    ///
    /// let conv = Op::Conv2d {
    ///     in_channels: 1,
    ///     out_channels: 4,
    ///     kernel: [3, 3],
    ///     stride: [1, 1],
    ///     padding: [1, 1],
    ///     groups: 1,
    /// };
    /// let bn = Op::BatchNorm2d { features: 4, eps: 1e-5 };
    /// let graph = GraphSpec {
    ///     name: "mine".into(),
    ///     input: [1, 8, 8],
    ///     nodes: vec![
    ///         Node::new("conv", conv, &[INPUT]),
    ///         Node::new("conv_bn", bn.clone(), &["conv"]),
    ///         Node::new("act", Op::Relu, &["conv_bn"]),
    ///         Node::new("sum", Op::Add, &["act", "conv_bn"]),
    ///         // After an add: no convolution to fold into.
    ///         Node::new("sum_bn", bn, &["sum"]),
    ///     ],
    /// };
    /// assert_eq!(graph.foldable_batch_norms(), [(0, 1)]);
    /// let deployed = graph.without_batch_norm();
    /// assert_eq!(deployed.nodes[1].inputs, ["conv"]);
    /// assert_eq!(deployed.nodes.len(), 4);
    /// assert_eq!(deployed.validate()?, graph.validate()?);
    /// # Ok::<(), model_spec::SpecError>(())
    /// ```
    pub fn without_batch_norm(&self) -> Self {
        let folded: HashMap<&str, &str> = self
            .foldable_batch_norms()
            .into_iter()
            .map(|(conv, bn)| (self.nodes[bn].name.as_str(), self.nodes[conv].name.as_str()))
            .collect();
        let nodes = self
            .nodes
            .iter()
            .filter(|node| !folded.contains_key(node.name.as_str()))
            .map(|node| Node {
                inputs: node
                    .inputs
                    .iter()
                    .map(|input| {
                        folded
                            .get(input.as_str())
                            .map_or(input.clone(), |c| c.to_string())
                    })
                    .collect(),
                ..node.clone()
            })
            .collect();
        Self {
            name: self.name.clone(),
            input: self.input,
            nodes,
        }
    }

    /// Number of trainable parameters (weights, biases, batch-norm scales and shifts).
    pub fn param_count(&self) -> usize {
        self.nodes
            .iter()
            .map(|node| match node.op {
                Op::BatchNorm2d { features, .. } => 2 * features,
                ref op => op
                    .weight_shape()
                    .map_or(0, |(shape, bias)| shape.iter().product::<usize>() + bias),
            })
            .sum()
    }
}

/// Builds a graph node by node, each taking the previous one unless told otherwise.
struct Chain {
    nodes: Vec<Node>,
    last: String,
}

impl Chain {
    fn new() -> Self {
        Self {
            nodes: Vec::new(),
            last: INPUT.into(),
        }
    }

    /// Appends `name` computing `op` on `inputs` (the previous node when empty).
    fn push(&mut self, name: impl Into<String>, op: Op, inputs: &[&str]) -> &mut Self {
        let name = name.into();
        let last = self.last.clone();
        let inputs = if inputs.is_empty() {
            &[last.as_str()][..]
        } else {
            inputs
        };
        self.nodes.push(Node::new(&name, op, inputs));
        self.last = name;
        self
    }

    /// A square convolution padded to keep the size at stride 1, then batch norm.
    fn conv_bn(
        &mut self,
        prefix: &str,
        names: [&str; 2],
        conv: Square,
        inputs: &[&str],
    ) -> &mut Self {
        let Square {
            channels: (cin, cout),
            kernel,
            stride,
            groups,
        } = conv;
        self.push(
            format!("{prefix}{}", names[0]),
            Op::Conv2d {
                in_channels: cin,
                out_channels: cout,
                kernel: [kernel; 2],
                stride: [stride; 2],
                padding: [kernel / 2; 2],
                groups,
            },
            inputs,
        )
        .push(
            format!("{prefix}{}", names[1]),
            Op::BatchNorm2d {
                features: cout,
                eps: 1e-5,
            },
            &[],
        )
    }
}

/// A square convolution of a preset: input and output channels, kernel side, stride and
/// groups.
#[derive(Clone, Copy)]
struct Square {
    channels: (usize, usize),
    kernel: usize,
    stride: usize,
    groups: usize,
}

fn square(channels: (usize, usize), kernel: usize, stride: usize, groups: usize) -> Square {
    Square {
        channels,
        kernel,
        stride,
        groups,
    }
}

impl GraphSpec {
    /// A small residual network for 28x28 images, named as torchvision's ResNets are: a
    /// 3x3 stem of 16 channels at stride 2 (14x14), then three stages (`layer1` to
    /// `layer3`, 16, 32 and 64 channels, the last two halving the resolution to 7x7 and
    /// 4x4) of two basic blocks each (two 3x3 convolutions with batch norm, added to the
    /// block's input, through a 1x1 projection with batch norm, `downsample`, where the
    /// shape changes), global average pooling and a dense layer (`fc`): about 175k
    /// parameters and 5.5 million multiply-adds per image, twice the teacher's.
    pub fn resnet() -> Self {
        let mut g = Chain::new();
        g.conv_bn("", ["conv1", "bn1"], square((1, 16), 3, 2, 1), &[INPUT])
            .push("relu", Op::Relu, &[]);
        let mut channels = 16;
        for (stage, width) in [(1, 16), (2, 32), (3, 64)] {
            for block in 0..2 {
                let p = format!("layer{stage}.{block}.");
                let stride = if stage > 1 && block == 0 { 2 } else { 1 };
                let input = g.last.clone();
                g.conv_bn(
                    &p,
                    ["conv1", "bn1"],
                    square((channels, width), 3, stride, 1),
                    &[],
                )
                .push(format!("{p}relu1"), Op::Relu, &[])
                .conv_bn(
                    &p,
                    ["conv2", "bn2"],
                    square((width, width), 3, 1, 1),
                    &[],
                );
                let residual = g.last.clone();
                let shortcut = if stride != 1 || channels != width {
                    g.conv_bn(
                        &p,
                        ["downsample.0", "downsample.1"],
                        square((channels, width), 1, stride, 1),
                        &[&input],
                    );
                    g.last.clone()
                } else {
                    input
                };
                g.push(format!("{p}add"), Op::Add, &[&residual, &shortcut])
                    .push(format!("{p}relu2"), Op::Relu, &[]);
                channels = width;
            }
        }
        g.push("avgpool", Op::GlobalAvgPool, &[]).push(
            "fc",
            Op::Linear {
                in_features: channels,
                out_features: 10,
            },
            &[],
        );
        Self {
            name: "resnet".into(),
            input: [1, 28, 28],
            nodes: g.nodes,
        }
    }

    /// A small MobileNet for 28x28 images: a 3x3 stem of 16 channels, then five
    /// depthwise-separable blocks (a 3x3 depthwise convolution, `dw`, and a 1x1 pointwise
    /// one, `pw`, each with batch norm and ReLU6) to 32, 32, 64, 64 and 128 channels, the
    /// first and third halving the resolution, then global average pooling, dropout and
    /// a dense layer (`classifier`): about 21k parameters and 1.3 million multiply-adds
    /// per image, half the teacher's.
    pub fn mobilenet() -> Self {
        let mut g = Chain::new();
        g.conv_bn("stem.", ["conv", "bn"], square((1, 16), 3, 1, 1), &[INPUT])
            .push("stem.relu", Op::Relu6, &[]);
        let mut channels = 16;
        for (i, (width, stride)) in [(32, 2), (32, 1), (64, 2), (64, 1), (128, 1)]
            .into_iter()
            .enumerate()
        {
            let p = format!("blocks.{i}.");
            g.conv_bn(
                &p,
                ["dw", "dw_bn"],
                square((channels, channels), 3, stride, channels),
                &[],
            )
            .push(format!("{p}dw_relu"), Op::Relu6, &[])
            .conv_bn(&p, ["pw", "pw_bn"], square((channels, width), 1, 1, 1), &[])
            .push(format!("{p}pw_relu"), Op::Relu6, &[]);
            channels = width;
        }
        g.push("pool", Op::GlobalAvgPool, &[])
            .push("dropout", Op::Dropout { p: 0.2 }, &[])
            .push(
                "classifier",
                Op::Linear {
                    in_features: channels,
                    out_features: 10,
                },
                &[],
            );
        Self {
            name: "mobilenet".into(),
            input: [1, 28, 28],
            nodes: g.nodes,
        }
    }

    /// Multiply-accumulates of one sample's forward pass through the convolutions and dense
    /// layers (what their cost is); `None` when the graph does not hold together.
    ///
    /// ```
    /// use model_spec::{GraphSpec, NetworkSpec};
    ///
    /// let teacher = GraphSpec::from(&NetworkSpec::teacher_cnn());
    /// let resnet = GraphSpec::resnet();
    /// assert!(resnet.multiply_adds() > teacher.multiply_adds());
    /// assert!(GraphSpec::mobilenet().multiply_adds() < teacher.multiply_adds());
    /// ```
    pub fn multiply_adds(&self) -> Option<usize> {
        let shapes = self.shapes().ok()?;
        self.nodes
            .iter()
            .zip(&shapes)
            .try_fold(0usize, |total, (node, out)| {
                let per_output = match node.op.weight_shape() {
                    Some((weight, _)) => weight[1..].iter().product::<usize>(),
                    None => return Some(total),
                };
                let outputs = out.iter().product::<usize>();
                total.checked_add(outputs.checked_mul(per_output)?)
            })
    }
}

impl From<&NetworkSpec> for GraphSpec {
    /// The sequential network as a chain whose nodes are named by layer index, so that
    /// layer `i`'s variables keep their names `i.weight` and `i.bias`.
    fn from(network: &NetworkSpec) -> Self {
        let nodes = network
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| Node {
                name: i.to_string(),
                op: Op::from(layer),
                inputs: vec![if i == 0 {
                    INPUT.to_string()
                } else {
                    (i - 1).to_string()
                }],
            })
            .collect();
        Self {
            name: network.name.clone(),
            input: network.input,
            nodes,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn conv(in_channels: usize, out_channels: usize, groups: usize) -> Op {
        Op::Conv2d {
            in_channels,
            out_channels,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1],
            groups,
        }
    }

    fn graph(nodes: Vec<Node>) -> GraphSpec {
        GraphSpec {
            name: "g".into(),
            input: [4, 8, 8],
            nodes,
        }
    }

    fn reason(graph: &GraphSpec) -> String {
        graph.shapes().unwrap_err().to_string()
    }

    #[test]
    fn every_preset_is_the_same_network_as_a_graph() {
        for network in [
            NetworkSpec::teacher_cnn(),
            NetworkSpec::student_cnn(),
            NetworkSpec::compact_cnn(),
        ] {
            let graph = GraphSpec::from(&network);
            assert_eq!(graph.shapes().unwrap(), network.shapes().unwrap()[1..]);
            assert_eq!(graph.param_count(), network.param_count());
            for (layer, node) in network.layers.iter().zip(&graph.nodes) {
                assert_eq!(node.op.weight_shape(), layer.weight_shape());
            }
        }
    }

    #[test]
    fn residual_depthwise_and_concatenating_graphs_hold_together() {
        let g = graph(vec![
            Node::new("stem", conv(4, 8, 1), &[INPUT]),
            Node::new("depthwise", conv(8, 8, 8), &["stem"]),
            Node::new("act", Op::Relu6, &["depthwise"]),
            Node::new("sum", Op::Add, &["act", "stem"]),
            Node::new("both", Op::Concat, &["sum", "stem", INPUT]),
            Node::new(
                "pool",
                Op::MaxPool2d {
                    kernel: [3, 3],
                    stride: [2, 2],
                    padding: [1, 1],
                },
                &["both"],
            ),
            Node::new(
                "avg",
                Op::AvgPool2d {
                    kernel: [2, 1],
                    stride: [2, 1],
                },
                &["pool"],
            ),
            Node::new("gap", Op::GlobalAvgPool, &["avg"]),
            Node::new(
                "head",
                Op::Linear {
                    in_features: 20,
                    out_features: 10,
                },
                &["gap"],
            ),
        ]);
        let shapes = g.shapes().unwrap();
        assert_eq!(shapes[3], [8, 8, 8]);
        assert_eq!(shapes[4], [20, 8, 8]);
        assert_eq!(shapes[5], [20, 4, 4]);
        assert_eq!(shapes[6], [20, 2, 4]);
        assert_eq!(shapes[7], [20]);
        assert_eq!(g.validate().unwrap(), [10]);
        // Depthwise: one input channel per output channel.
        assert_eq!(g.nodes[1].op.weight_shape(), Some((vec![8, 1, 3, 3], 8)));
        let convs = 8 * 4 * 9 + 8 + 8 * 9 + 8;
        assert_eq!(g.param_count(), convs + 20 * 10 + 10);
    }

    #[test]
    fn a_graph_that_does_not_hold_together_says_where() {
        let stem = || Node::new("stem", conv(4, 8, 1), &[INPUT]);
        let cases = [
            (
                graph(vec![
                    Node::new("a", Op::Relu, &["b"]),
                    Node::new("b", Op::Relu, &["a"]),
                ]),
                "node `a` (relu) of network `g`: takes `b`, which is not an earlier node",
            ),
            (
                graph(vec![stem(), Node::new("x", Op::Relu, &["missing"])]),
                "takes `missing`, which is not an earlier node",
            ),
            (
                graph(vec![stem(), Node::new("stem", Op::Relu, &["stem"])]),
                "node `stem` (relu) of network `g`: the name is used twice",
            ),
            (
                graph(vec![Node::new(INPUT, Op::Relu, &[INPUT])]),
                "`input` is not a node name",
            ),
            (
                graph(vec![Node::new("layer1..conv", Op::Relu, &[INPUT])]),
                "`layer1..conv` is not a node name",
            ),
            (
                graph(vec![Node::new(".conv", Op::Relu, &[INPUT])]),
                "`.conv` is not a node name",
            ),
            (
                graph(vec![stem(), Node::new("r", Op::Relu, &[INPUT])]),
                "node `stem` feeds no later node",
            ),
            (
                graph(vec![stem(), Node::new("sum", Op::Add, &["stem", INPUT])]),
                "adds inputs of different shapes: [8, 8, 8] and [4, 8, 8]",
            ),
            (
                graph(vec![stem(), Node::new("one", Op::Add, &["stem"])]),
                "takes two or more inputs, got 1",
            ),
            (
                graph(vec![stem(), Node::new("two", Op::Relu, &["stem", "stem"])]),
                "takes 1 input, got 2",
            ),
            (
                graph(vec![Node::new("grouped", conv(4, 6, 4), &[INPUT])]),
                "4 groups do not divide 4 input and 6 output channels",
            ),
            (
                graph(vec![
                    stem(),
                    Node::new(
                        "small",
                        Op::AvgPool2d {
                            kernel: [2, 2],
                            stride: [2, 2],
                        },
                        &["stem"],
                    ),
                    Node::new("cat", Op::Concat, &["small", "stem"]),
                ]),
                "concatenates 4x4 and 8x8 inputs",
            ),
            (
                graph(vec![Node::new(
                    "wide",
                    Op::MaxPool2d {
                        kernel: [2, 2],
                        stride: [1, 1],
                        padding: [2, 0],
                    },
                    &[INPUT],
                )]),
                "padding [2, 0] exceeds half the window [2, 2]",
            ),
            (
                graph(vec![Node::new(
                    "huge",
                    Op::Conv2d {
                        in_channels: 4,
                        out_channels: 4,
                        kernel: [1, 1],
                        stride: [1, 1],
                        padding: [usize::MAX, 0],
                        groups: 1,
                    },
                    &[INPUT],
                )]),
                "overflows the input size",
            ),
            (graph(Vec::new()), "network `g`: has no nodes"),
        ];
        for (g, expected) in cases {
            let got = reason(&g);
            assert!(got.contains(expected), "{got}\nexpected: {expected}");
        }
    }

    #[test]
    fn the_graph_presets_hold_together_at_their_sizes() {
        let resnet = GraphSpec::resnet();
        let shapes = resnet.shapes().unwrap();
        assert_eq!(resnet.validate().unwrap(), [10]);
        let shape_of = |g: &GraphSpec, shapes: &[Vec<usize>], name: &str| {
            let i = g.nodes.iter().position(|n| n.name == name).unwrap();
            shapes[i].clone()
        };
        assert_eq!(shape_of(&resnet, &shapes, "layer1.1.relu2"), [16, 14, 14]);
        assert_eq!(shape_of(&resnet, &shapes, "layer2.0.add"), [32, 7, 7]);
        assert_eq!(shape_of(&resnet, &shapes, "layer3.1.relu2"), [64, 4, 4]);
        let count =
            |g: &GraphSpec, name: &str| g.nodes.iter().filter(|n| n.op.name() == name).count();
        assert_eq!(count(&resnet, "add"), 6);
        // Projections where the shape changes only: the first blocks of stages 2 and 3.
        assert_eq!(count(&resnet, "conv2d"), 1 + 12 + 2);
        assert!(
            resnet
                .nodes
                .iter()
                .any(|n| n.name == "layer2.0.downsample.0")
        );
        assert!(
            !resnet
                .nodes
                .iter()
                .any(|n| n.name.starts_with("layer1.0.downsample"))
        );
        assert!(
            (150_000..200_000).contains(&resnet.param_count()),
            "{}",
            resnet.param_count()
        );

        let mobilenet = GraphSpec::mobilenet();
        let shapes = mobilenet.shapes().unwrap();
        assert_eq!(mobilenet.validate().unwrap(), [10]);
        assert_eq!(
            shape_of(&mobilenet, &shapes, "blocks.4.pw_relu"),
            [128, 7, 7]
        );
        assert_eq!(
            mobilenet
                .nodes
                .iter()
                .find(|n| n.name == "blocks.2.dw")
                .unwrap()
                .op
                .weight_shape(),
            Some((vec![32, 1, 3, 3], 32))
        );
        assert_eq!(count(&mobilenet, "relu6"), 11);
        assert!(
            (10_000..25_000).contains(&mobilenet.param_count()),
            "{}",
            mobilenet.param_count()
        );
        // Their cost against the sequential teacher's 2.63 million multiply-adds.
        let teacher = GraphSpec::from(&NetworkSpec::teacher_cnn())
            .multiply_adds()
            .unwrap();
        // 32 x 26 x 26 x 9 + 64 x 11 x 11 x 288 + 1600 x 128 + 128 x 10.
        assert_eq!(teacher, 194_688 + 2_230_272 + 204_800 + 1_280);
        let resnet_cost = resnet.multiply_adds().unwrap();
        let mobilenet_cost = mobilenet.multiply_adds().unwrap();
        // Both sized to train on a CPU: the residual network at about twice the teacher's
        // cost, the MobileNet at about half.
        assert!(
            (4_000_000..7_000_000).contains(&resnet_cost)
                && (1_000_000..1_500_000).contains(&mobilenet_cost),
            "{resnet_cost} {mobilenet_cost}"
        );
    }

    #[test]
    fn batch_norm_folds_into_a_convolution_that_feeds_it_alone() {
        let resnet = GraphSpec::resnet();
        let norms = resnet
            .nodes
            .iter()
            .filter(|n| n.op.name() == "batch_norm2d")
            .count();
        assert_eq!(resnet.foldable_batch_norms().len(), norms);
        let deployed = resnet.without_batch_norm();
        assert_eq!(deployed.nodes.len(), resnet.nodes.len() - norms);
        assert!(deployed.nodes.iter().all(|n| n.op.name() != "batch_norm2d"));
        assert_eq!(deployed.validate().unwrap(), [10]);
        let add = deployed
            .nodes
            .iter()
            .find(|n| n.name == "layer2.0.add")
            .unwrap();
        assert_eq!(add.inputs, ["layer2.0.conv2", "layer2.0.downsample.0"]);
        // A sequential network's graph loses its batch norms as the network does.
        let teacher = NetworkSpec::teacher_cnn();
        let folded = GraphSpec::from(&teacher).without_batch_norm();
        let sequential = GraphSpec::from(&teacher.without_batch_norm());
        assert_eq!(folded.shapes().unwrap(), sequential.shapes().unwrap());
        assert_eq!(folded.param_count(), sequential.param_count());

        // After an add, or after a convolution that also feeds another node: kept.
        let bn = |features| Op::BatchNorm2d {
            features,
            eps: 1e-5,
        };
        let g = graph(vec![
            Node::new("conv", conv(4, 4, 1), &[INPUT]),
            Node::new("conv_bn", bn(4), &["conv"]),
            Node::new("sum", Op::Add, &["conv_bn", "conv"]),
            Node::new("sum_bn", bn(4), &["sum"]),
            Node::new("other", conv(4, 4, 1), &["sum_bn"]),
            Node::new("other_bn", bn(4), &["other"]),
        ]);
        assert_eq!(g.foldable_batch_norms(), [(4, 5)]);
        let deployed = g.without_batch_norm();
        let names: Vec<&str> = deployed.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["conv", "conv_bn", "sum", "sum_bn", "other"]);
        assert_eq!(deployed.validate().unwrap(), [4, 8, 8]);
    }

    #[test]
    fn graphs_serialise_with_the_op_beside_the_name() {
        let g = graph(vec![
            Node::new("stem", conv(4, 8, 2), &[INPUT]),
            Node::new("sum", Op::Add, &["stem", "stem"]),
            Node::new("gap", Op::GlobalAvgPool, &["sum"]),
        ]);
        let json = serde_json::to_string(&g).unwrap();
        assert!(
            json.contains(r#"{"name":"gap","op":"global_avg_pool","inputs":["sum"]}"#),
            "{json}"
        );
        assert!(json.contains(r#""kernel":[3,3]"#), "{json}");
        let back: GraphSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, g);
        assert!(
            serde_json::from_str::<GraphSpec>(&json.replace("global_avg_pool", "pool")).is_err()
        );
    }

    /// A random sequential layer, plausible or not.
    fn layer() -> impl Strategy<Value = LayerSpec> {
        prop_oneof![
            (0usize..6, 0usize..6, 0usize..5, 0usize..3, 0usize..3).prop_map(
                |(in_channels, out_channels, kernel, stride, padding)| LayerSpec::Conv2d {
                    in_channels,
                    out_channels,
                    kernel,
                    stride,
                    padding,
                }
            ),
            (0usize..4, 0usize..3)
                .prop_map(|(kernel, stride)| LayerSpec::MaxPool2d { kernel, stride }),
            (0usize..6, 1e-6f64..1.0)
                .prop_map(|(features, eps)| LayerSpec::BatchNorm2d { features, eps }),
            (0usize..200, 0usize..12).prop_map(|(in_features, out_features)| {
                LayerSpec::Linear {
                    in_features,
                    out_features,
                }
            }),
            Just(LayerSpec::Relu),
            Just(LayerSpec::Flatten),
            (0.0f64..1.2).prop_map(|p| LayerSpec::Dropout { p }),
        ]
    }

    proptest! {
        #[test]
        fn a_sequential_network_and_its_graph_agree(
            input in (1usize..6, 1usize..10, 1usize..10),
            layers in proptest::collection::vec(layer(), 1..6),
        ) {
            let network = NetworkSpec {
                name: "n".into(),
                input: [input.0, input.1, input.2],
                layers,
            };
            let graph = GraphSpec::from(&network);
            match (network.shapes(), graph.shapes()) {
                (Ok(sequential), Ok(nodes)) => {
                    prop_assert_eq!(&sequential[1..], &nodes[..]);
                    prop_assert_eq!(network.param_count(), graph.param_count());
                }
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "sequential {:?}, graph {:?}", a, b),
            }
        }
    }
}
