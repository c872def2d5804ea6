use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};
use tensor_precision::{Conv2dOptions, layers};

use crate::calibrate::Calibrator;
use crate::fake_quant::{ActivationRange, FakeQuantConfig, NetworkFakeQuant};
use crate::network::{Initializer, batch_norm};
use crate::{GraphSpec, INPUT, Op, Policy, Result};

/// The tch implementation of a [`GraphSpec`], computing under a precision [`Policy`] as
/// [`Network`](crate::Network) does: float32 variables, convolutions and dense layers in
/// the policy's compute type through [`tensor_precision::layers`], float32 logits.
///
/// The variables of node `name` are `<name>.weight` and `<name>.bias` (batch norm also
/// `<name>.running_mean` and `<name>.running_var`), so a node named `layer1.0.conv1` has
/// the variable a PyTorch user expects, `layer1.0.conv1.weight`. A graph converted from a
/// [`NetworkSpec`](crate::NetworkSpec) has the same variables as its `Network`, and computes
/// the same logits from them.
///
/// ```
/// use models::{GraphNetwork, GraphSpec};
/// use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let net = GraphNetwork::new(&vs.root(), &GraphSpec::resnet())?;
/// let logits = net.forward_t(&Tensor::zeros([2, 1, 28, 28], (Kind::Float, Device::Cpu)), false);
/// assert_eq!(logits.size(), [2, 10]);
/// assert!(vs.variables().contains_key("layer2.0.downsample.0.weight"));
/// assert_eq!(net.param_count(), GraphSpec::resnet().param_count());
/// # Ok::<(), models::Error>(())
/// ```
#[derive(Debug)]
pub struct GraphNetwork {
    spec: GraphSpec,
    nodes: Vec<NodeImpl>,
    /// For every node, where each of its inputs comes from: `None` for the network's
    /// input, else an earlier node's index.
    sources: Vec<Vec<Option<usize>>>,
    policy: Policy,
    fake_quant: Option<NetworkFakeQuant>,
}

#[derive(Debug)]
enum NodeImpl {
    Conv2d {
        weight: Tensor,
        bias: Tensor,
        options: Conv2dOptions,
    },
    Linear {
        weight: Tensor,
        bias: Tensor,
    },
    BatchNorm2d {
        bn: nn::BatchNorm,
        eps: f64,
    },
    /// Every operation without variables, computed from its spec.
    Stateless(Op),
}

fn dim(value: usize) -> i64 {
    i64::try_from(value).expect("sizes of a validated graph fit in i64")
}

fn dims(values: [usize; 2]) -> [i64; 2] {
    values.map(dim)
}

/// What sees a tapped tensor: the node's name and the tensor.
type Tap<'a> = dyn FnMut(&str, &Tensor) + 'a;

/// The tch path of node `name`: one level per dot-separated part.
fn node_path<'a>(root: &nn::Path<'a>, name: &str) -> nn::Path<'a> {
    name.split('.').fold(root.clone(), |path, part| path / part)
}

impl GraphNetwork {
    /// Creates the variables of `spec` under `path` (tch's default initialisation,
    /// [`Initializer::Torch`]) after validating the graph; computes in float32.
    pub fn new(path: &nn::Path, spec: &GraphSpec) -> Result<Self> {
        Self::with_init(path, spec, Policy::Float32, Initializer::default())
    }

    /// Like [`GraphNetwork::new`], computing under `policy`, with the variables initialised
    /// by `init` (fans as PyTorch counts them: a grouped convolution's `fan_in` is its
    /// input channels per group times its window).
    pub fn with_init(
        path: &nn::Path,
        spec: &GraphSpec,
        policy: Policy,
        init: Initializer,
    ) -> Result<Self> {
        spec.validate()?;
        let position = |name: &str| spec.nodes.iter().position(|n| n.name == name);
        let sources = spec
            .nodes
            .iter()
            .map(|node| {
                node.inputs
                    .iter()
                    .map(|input| (input != INPUT).then(|| position(input)).flatten())
                    .collect()
            })
            .collect();
        let nodes = spec
            .nodes
            .iter()
            .map(|node| {
                let path = node_path(path, &node.name);
                match node.op {
                    Op::Conv2d {
                        in_channels,
                        out_channels,
                        kernel,
                        stride,
                        padding,
                        groups,
                    } => {
                        let window = kernel[0] * kernel[1];
                        let (ws_init, bs_init) =
                            init.inits(in_channels / groups * window, out_channels * window);
                        let defaults = nn::ConvConfigND::<[i64; 2]>::default();
                        let conv = nn::conv(
                            &path,
                            dim(in_channels),
                            dim(out_channels),
                            dims(kernel),
                            nn::ConvConfigND {
                                groups: dim(groups),
                                ws_init,
                                bs_init: bs_init.unwrap_or(defaults.bs_init),
                                ..defaults
                            },
                        );
                        NodeImpl::Conv2d {
                            weight: conv.ws,
                            bias: conv.bs.expect("conv2d is created with a bias"),
                            options: Conv2dOptions {
                                stride: dims(stride),
                                padding: dims(padding),
                                groups: dim(groups),
                                channels_last: true,
                                ..Conv2dOptions::default()
                            },
                        }
                    }
                    Op::Linear {
                        in_features,
                        out_features,
                    } => {
                        let (ws_init, bs_init) = init.inits(in_features, out_features);
                        let linear = nn::linear(
                            &path,
                            dim(in_features),
                            dim(out_features),
                            nn::LinearConfig {
                                ws_init,
                                bs_init,
                                ..Default::default()
                            },
                        );
                        NodeImpl::Linear {
                            weight: linear.ws,
                            bias: linear.bs.expect("linear is created with a bias"),
                        }
                    }
                    Op::BatchNorm2d { features, eps } => NodeImpl::BatchNorm2d {
                        bn: init.batch_norm(&path, features, eps),
                        eps,
                    },
                    ref op => NodeImpl::Stateless(op.clone()),
                }
            })
            .collect();
        Ok(Self {
            spec: spec.clone(),
            nodes,
            sources,
            policy,
            fake_quant: None,
        })
    }

    /// The graph this network implements.
    pub fn spec(&self) -> &GraphSpec {
        &self.spec
    }

    /// The precision policy of the forward pass.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Changes the precision policy of the forward pass; the variables are untouched.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Turns on fake quantization of every `conv2d` and `linear` node, as
    /// [`Network::enable_fake_quant`](crate::Network::enable_fake_quant) does for layers: the
    /// weights per channel, each node's input per tensor through its own observer, keyed by
    /// the node's index; and of the inputs of every `add` and `concat` node, together (one
    /// observer sees them stacked), on the one grid the runtime's full-integer sum takes.
    /// Meant for a float32 graph in its deployed form.
    ///
    /// ```
    /// use models::{Calibrator, FakeQuantConfig, GraphNetwork, GraphSpec};
    /// use tch::{nn, Device, Kind, Tensor};
    ///
    /// let deployed = GraphSpec::mobilenet().without_batch_norm();
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let mut net = GraphNetwork::new(&vs.root(), &deployed)?;
    /// let xs = Tensor::rand([4, 1, 28, 28], (Kind::Float, Device::Cpu));
    /// // Calibration taps every convolution and dense node's input by name.
    /// let mut calibrator = Calibrator::new();
    /// net.calibrate(&xs, &mut calibrator)?;
    /// assert!(calibrator.observer("blocks.0.dw").is_some());
    /// // Quantization-aware training observes the same inputs, by node index.
    /// net.enable_fake_quant(FakeQuantConfig::default())?;
    /// let _logits = net.f_forward_t(&xs, true)?;
    /// assert_eq!(net.activation_ranges().len(), 12);
    /// # Ok::<(), models::Error>(())
    /// ```
    pub fn enable_fake_quant(&mut self, config: FakeQuantConfig) -> Result<()> {
        let nodes = self
            .spec
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                matches!(
                    n.op,
                    Op::Conv2d { .. } | Op::Linear { .. } | Op::Add | Op::Concat
                )
            })
            .map(|(i, _)| i);
        self.fake_quant = Some(NetworkFakeQuant::new(config, nodes)?);
        Ok(())
    }

    /// Turns fake quantization off (the observed ranges are dropped).
    pub fn disable_fake_quant(&mut self) {
        self.fake_quant = None;
    }

    /// The input ranges the fake-quantization observers hold, by node index (`layer` is the
    /// node's position in the graph); empty when fake quantization is off.
    pub fn activation_ranges(&self) -> Vec<ActivationRange> {
        self.fake_quant
            .as_ref()
            .map_or_else(Vec::new, NetworkFakeQuant::ranges)
    }

    /// Number of trainable parameters.
    pub fn param_count(&self) -> usize {
        self.parameters().map(Tensor::numel).sum()
    }

    /// Number of parameters that are not exactly zero.
    pub fn nonzero_param_count(&self) -> usize {
        self.parameters()
            .map(|t| usize::try_from(t.count_nonzero(None::<i64>).int64_value(&[])).unwrap_or(0))
            .sum()
    }

    fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.nodes.iter().flat_map(|node| match node {
            NodeImpl::Conv2d { weight, bias, .. } | NodeImpl::Linear { weight, bias } => {
                vec![weight, bias]
            }
            NodeImpl::BatchNorm2d { bn, .. } => bn.ws.iter().chain(&bn.bs).collect(),
            NodeImpl::Stateless(_) => Vec::new(),
        })
    }

    /// The forward pass, with an error where LibTorch or a building block refuses the input
    /// (wrong shape or element type, another device).
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_inner(xs, train, None)
    }

    /// Runs `xs` through the graph in eval mode, without gradients, and taps the input of
    /// every `conv2d` and `linear` node on `calibrator`, named after the node (the prefix
    /// of its variables), as [`Network::calibrate`](crate::Network::calibrate) does for
    /// layers, and the inputs of every `add` (stacked) and `concat` (concatenated) node
    /// under its name. Calibration of a graph is this, batch after batch, then
    /// [`Calibrator::into_qparams`].
    pub fn calibrate(&self, xs: &Tensor, calibrator: &mut Calibrator) -> Result<()> {
        let _logits = tch::no_grad(|| {
            self.forward_inner(xs, false, Some(&mut |name, x| calibrator.tap(name, x)))
        })?;
        Ok(())
    }

    /// The forward pass; `record` sees the input of every `conv2d` and `linear` node with
    /// the node's name, and the inputs of every `add` (stacked) and `concat` (concatenated)
    /// node.
    fn forward_inner(
        &self,
        xs: &Tensor,
        train: bool,
        mut record: Option<&mut Tap>,
    ) -> Result<Tensor> {
        let policy = self.policy;
        let quantized = |index: usize, xs: &Tensor, w: &Tensor| {
            NetworkFakeQuant::operands(self.fake_quant.as_ref(), index, xs, w, train)
        };
        let mut outputs: Vec<Tensor> = Vec::with_capacity(self.nodes.len());
        for (index, (node, sources)) in self.nodes.iter().zip(&self.sources).enumerate() {
            let inputs: Vec<&Tensor> = sources
                .iter()
                .map(|source| source.map_or(xs, |i| &outputs[i]))
                .collect();
            let x = inputs[0];
            if let (NodeImpl::Conv2d { .. } | NodeImpl::Linear { .. }, Some(record)) =
                (node, record.as_mut())
            {
                record(&self.spec.nodes[index].name, x);
            }
            // The inputs of a sum or a concatenation share one grid: observed, calibrated
            // and fake-quantized together (stacked, or concatenated).
            if let NodeImpl::Stateless(op @ (Op::Add | Op::Concat)) = node
                && (record.is_some() || self.fake_quant.is_some())
            {
                let joined = match op {
                    Op::Add => Tensor::f_stack(&inputs, 0)?,
                    _ => Tensor::f_cat(&inputs, 1)?,
                };
                if let Some(record) = record.as_mut() {
                    record(&self.spec.nodes[index].name, &joined);
                }
                let out = match self.fake_quant.as_ref() {
                    None => stateless(op, &inputs, train)?,
                    Some(fq) => {
                        let joined = fq.input(index, &joined, train)?;
                        match op {
                            Op::Add => {
                                joined.f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?
                            }
                            _ => joined,
                        }
                    }
                };
                outputs.push(out);
                continue;
            }
            let out = match node {
                NodeImpl::Conv2d {
                    weight,
                    bias,
                    options,
                } => {
                    let (x, w) = quantized(index, x, weight)?;
                    layers::conv2d(policy, &x, &w, Some(bias), *options)?
                }
                NodeImpl::Linear { weight, bias } => {
                    let (x, w) = quantized(index, x, weight)?;
                    layers::linear(policy, &x, &w, Some(bias))?
                }
                NodeImpl::BatchNorm2d { bn, eps } => batch_norm(bn, *eps, x, train)?,
                NodeImpl::Stateless(op) => stateless(op, &inputs, train)?,
            };
            outputs.push(out);
        }
        let logits = outputs.pop().expect("a validated graph has nodes");
        Ok(layers::output(policy, &logits)?)
    }
}

/// The operations without variables, on their inputs.
fn stateless(op: &Op, inputs: &[&Tensor], train: bool) -> Result<Tensor> {
    let x = inputs[0];
    Ok(match *op {
        Op::Relu => x.f_relu()?,
        Op::Relu6 => x.f_clamp(0.0, 6.0)?,
        Op::Sigmoid => x.f_sigmoid()?,
        Op::Tanh => x.f_tanh()?,
        Op::Gelu => x.f_gelu("none")?,
        Op::Silu => x.f_silu()?,
        Op::HardSwish => x.f_hardswish()?,
        Op::MaxPool2d {
            kernel,
            stride,
            padding,
        } => x.f_max_pool2d(dims(kernel), dims(stride), dims(padding), [1, 1], false)?,
        Op::AvgPool2d { kernel, stride } => {
            x.f_avg_pool2d(dims(kernel), dims(stride), [0, 0], false, true, None)?
        }
        Op::GlobalAvgPool => x.f_mean_dim([2i64, 3].as_slice(), false, None::<Kind>)?,
        Op::Flatten => x.f_flatten(1, -1)?,
        Op::Dropout { p } => x.f_dropout(p, train)?,
        Op::Add => inputs[1..]
            .iter()
            .try_fold(x.shallow_clone(), |sum, y| sum.f_add(y))?,
        Op::Concat => Tensor::f_cat(inputs, 1)?,
        Op::Conv2d { .. } | Op::Linear { .. } | Op::BatchNorm2d { .. } => {
            unreachable!("operations with variables have their own node kinds")
        }
    })
}

impl ModuleT for GraphNetwork {
    /// [`GraphNetwork::f_forward_t`], panicking on its errors.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.f_forward_t(xs, train)
            .unwrap_or_else(|err| panic!("forward pass of {}: {err}", self.spec.name))
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::{Network, NetworkSpec, Node};

    fn input(shape: [i64; 4], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 2.0
    }

    #[test]
    fn a_sequential_network_as_a_graph_computes_what_the_network_does() {
        for policy in [Policy::Float32, Policy::MixedBfloat16] {
            let spec = NetworkSpec::teacher_cnn();
            let vs = nn::VarStore::new(Device::Cpu);
            let mut net = Network::new(&vs.root(), &spec).unwrap();
            net.set_policy(policy);
            let mut graph_vs = nn::VarStore::new(Device::Cpu);
            let graph = GraphNetwork::with_init(
                &graph_vs.root(),
                &GraphSpec::from(&spec),
                policy,
                Initializer::Torch,
            )
            .unwrap();
            let mut names: Vec<String> = vs.variables().into_keys().collect();
            let mut graph_names: Vec<String> = graph_vs.variables().into_keys().collect();
            names.sort();
            graph_names.sort();
            assert_eq!(names, graph_names);
            graph_vs.copy(&vs).unwrap();
            let xs = input([3, 1, 28, 28], 1);
            let expected = net.f_forward_t(&xs, false).unwrap();
            let got = graph.f_forward_t(&xs, false).unwrap();
            assert_eq!(got.kind(), Kind::Float);
            assert!(got.equal(&expected), "{policy:?}");
            assert_eq!(graph.param_count(), net.param_count());
        }
    }

    #[test]
    fn fake_quantization_of_a_sequential_graph_is_the_networks() {
        let spec = NetworkSpec::compact_cnn().without_batch_norm();
        let config = FakeQuantConfig {
            observer_steps: 3,
            ..FakeQuantConfig::default()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let mut net = Network::new(&vs.root(), &spec).unwrap();
        let mut graph_vs = nn::VarStore::new(Device::Cpu);
        let mut graph = GraphNetwork::new(&graph_vs.root(), &GraphSpec::from(&spec)).unwrap();
        graph_vs.copy(&vs).unwrap();
        net.enable_fake_quant(config).unwrap();
        graph.enable_fake_quant(config).unwrap();
        for seed in 0..4 {
            let xs = input([8, 1, 28, 28], seed);
            let expected = net.f_forward_t(&xs, true).unwrap();
            let got = graph.f_forward_t(&xs, true).unwrap();
            assert!(got.equal(&expected), "step {seed}");
        }
        let xs = input([5, 1, 28, 28], 9);
        let expected = net.f_forward_t(&xs, false).unwrap();
        assert!(graph.f_forward_t(&xs, false).unwrap().equal(&expected));
        assert_eq!(graph.activation_ranges(), net.activation_ranges());
        assert_eq!(graph.activation_ranges().len(), 4);
        graph.disable_fake_quant();
        assert!(graph.activation_ranges().is_empty());
    }

    #[test]
    fn calibrating_a_graph_taps_every_convolution_dense_and_sum_node_by_name() {
        use quantization::{BitWidth, Method};
        let spec = NetworkSpec::compact_cnn().without_batch_norm();
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::new(&vs.root(), &spec).unwrap();
        let mut graph_vs = nn::VarStore::new(Device::Cpu);
        let graph = GraphNetwork::new(&graph_vs.root(), &GraphSpec::from(&spec)).unwrap();
        graph_vs.copy(&vs).unwrap();
        let (mut ours, mut theirs) = (Calibrator::new(), Calibrator::new());
        for seed in 0..3 {
            let xs = input([16, 1, 28, 28], seed);
            graph.calibrate(&xs, &mut ours).unwrap();
            net.calibrate(&xs, &mut theirs).unwrap();
        }
        let ours = ours.into_qparams(Method::MinMax, BitWidth::INT8).unwrap();
        let theirs = theirs.into_qparams(Method::MinMax, BitWidth::INT8).unwrap();
        assert_eq!(ours.len(), 4);
        assert_eq!(ours, theirs);
        // A residual graph's taps are its node names.
        let resnet = GraphSpec::resnet();
        let vs = nn::VarStore::new(Device::Cpu);
        let graph = GraphNetwork::new(&vs.root(), &resnet).unwrap();
        let mut calibrator = Calibrator::new();
        graph
            .calibrate(&input([4, 1, 28, 28], 1), &mut calibrator)
            .unwrap();
        let names: Vec<&str> = calibrator.observers().map(|(n, _)| n).collect();
        assert!(names.contains(&"layer2.0.downsample.0"), "{names:?}");
        assert!(names.contains(&"layer2.0.add"), "{names:?}");
        // The stem, twelve block convolutions, two projections, the head and six sums.
        assert_eq!(names.len(), 1 + 12 + 2 + 1 + 6);
    }

    #[test]
    fn residual_grouped_and_concatenating_nodes_compute_their_definitions() {
        let spec = GraphSpec {
            name: "residual".into(),
            input: [4, 6, 6],
            nodes: vec![
                Node::new(
                    "block.conv",
                    Op::Conv2d {
                        in_channels: 4,
                        out_channels: 4,
                        kernel: [3, 1],
                        stride: [1, 1],
                        padding: [1, 0],
                        groups: 2,
                    },
                    &[INPUT],
                ),
                Node::new("block.act", Op::Relu6, &["block.conv"]),
                Node::new("sum", Op::Add, &["block.act", INPUT]),
                Node::new("both", Op::Concat, &["sum", INPUT]),
                Node::new("pool", Op::GlobalAvgPool, &["both"]),
                Node::new(
                    "fc",
                    Op::Linear {
                        in_features: 8,
                        out_features: 3,
                    },
                    &["pool"],
                ),
            ],
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let net = GraphNetwork::with_init(
            &vs.root(),
            &spec,
            Policy::Float32,
            Initializer::GlorotUniform,
        )
        .unwrap();
        let vars = vs.variables();
        assert_eq!(vars["block.conv.weight"].size(), [4, 2, 3, 1]);
        // Glorot over PyTorch's fans: 2 x 3 in, 4 x 3 out.
        let bound = (6.0f64 / (6.0 + 12.0)).sqrt();
        assert!(vars["block.conv.weight"].abs().max().double_value(&[]) <= bound);
        let xs = input([2, 4, 6, 6], 2);
        let conv = xs.conv2d(
            &vars["block.conv.weight"],
            Some(&vars["block.conv.bias"]),
            [1, 1],
            [1, 0],
            [1, 1],
            2,
        );
        let sum = conv.clamp(0.0, 6.0) + &xs;
        let pooled = Tensor::cat(&[sum, xs.shallow_clone()], 1).mean_dim(
            [2i64, 3].as_slice(),
            false,
            None::<Kind>,
        );
        let expected = pooled.linear(&vars["fc.weight"], Some(&vars["fc.bias"]));
        let got = net.f_forward_t(&xs, false).unwrap();
        let difference = (&got - &expected).abs().max().double_value(&[]);
        assert!(difference < 1e-6, "{difference}");
        // Gradients reach every variable.
        got.sum(None::<Kind>).backward();
        for (name, var) in vars {
            assert!(var.grad().defined(), "{name}");
        }
    }

    #[test]
    fn activations_compute_their_formulas() {
        let xs = Tensor::linspace(-8.0, 8.0, 64, (Kind::Float, Device::Cpu)).reshape([1, 1, 8, 8]);
        let sigmoid = |x: &Tensor| (x.neg().exp() + 1.0).reciprocal();
        let relu6 = |x: &Tensor| x.clamp(0.0, 6.0);
        let cases: [(Op, Tensor); 6] = [
            (Op::Relu6, relu6(&xs)),
            (Op::Sigmoid, sigmoid(&xs)),
            (
                Op::Tanh,
                (xs.exp() - xs.neg().exp()) / (xs.exp() + xs.neg().exp()),
            ),
            (Op::Silu, &xs * sigmoid(&xs)),
            (Op::HardSwish, &xs * relu6(&(&xs + 3.0)) / 6.0),
            (Op::Gelu, &xs * 0.5 * ((&xs / 2f64.sqrt()).erf() + 1.0)),
        ];
        for (op, expected) in cases {
            let spec = GraphSpec {
                name: "act".into(),
                input: [1, 8, 8],
                nodes: vec![Node::new("act", op.clone(), &[INPUT])],
            };
            let vs = nn::VarStore::new(Device::Cpu);
            let net = GraphNetwork::new(&vs.root(), &spec).unwrap();
            let got = net.f_forward_t(&xs, false).unwrap();
            let difference = (&got - &expected).abs().max().double_value(&[]);
            assert!(difference < 1e-5, "{op:?}: {difference}");
        }
    }

    #[test]
    fn an_invalid_graph_or_input_is_an_error() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut spec = GraphSpec::mobilenet();
        spec.nodes[1].inputs = vec!["classifier".into()];
        let err = GraphNetwork::new(&vs.root(), &spec)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("takes `classifier`, which is not an earlier node"),
            "{err}"
        );
        let net = GraphNetwork::new(&vs.root(), &GraphSpec::mobilenet()).unwrap();
        let wrong = Tensor::zeros([2, 3, 28, 28], (Kind::Float, Device::Cpu));
        assert!(net.f_forward_t(&wrong, false).is_err());
    }
}
