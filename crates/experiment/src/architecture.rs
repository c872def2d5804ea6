//! The architectures a run trains and deploys: the project's sequential networks and the
//! graph presets (`--teacher resnet|mobilenet`), behind one interface, so that every stage
//! treats a teacher alike whatever its form. A sequential network keeps `models::Network`
//! and its artifacts (format version 2); a graph goes through `models::GraphNetwork` and
//! graph artifacts (version 3).

use anyhow::{Result, bail};
use clap::ValueEnum;
use models::export::{self, DeployedParameter, WeightFormat};
use models::{
    ActivationRange, Calibrator, FakeQuantConfig, GraphNetwork, GraphSpec, Initializer, Network,
    NetworkSpec, Policy,
};
use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::{self, ModuleT};

/// The teacher a run starts from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherChoice {
    /// The sequential CNN (`NetworkSpec::teacher_cnn`).
    #[default]
    Cnn,
    /// The residual network (`GraphSpec::resnet`).
    Resnet,
    /// The depthwise-separable network (`GraphSpec::mobilenet`).
    Mobilenet,
}

impl TeacherChoice {
    /// The option's value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cnn => "cnn",
            Self::Resnet => "resnet",
            Self::Mobilenet => "mobilenet",
        }
    }

    /// The architecture it names.
    pub fn architecture(self) -> Architecture {
        match self {
            Self::Cnn => Architecture::Network(NetworkSpec::teacher_cnn()),
            Self::Resnet => Architecture::Graph(GraphSpec::resnet()),
            Self::Mobilenet => Architecture::Graph(GraphSpec::mobilenet()),
        }
    }
}

/// A sequential network or a graph.
#[derive(Clone, Debug, PartialEq)]
pub enum Architecture {
    Network(NetworkSpec),
    Graph(GraphSpec),
}

impl From<NetworkSpec> for Architecture {
    fn from(spec: NetworkSpec) -> Self {
        Self::Network(spec)
    }
}

impl Architecture {
    pub fn name(&self) -> &str {
        match self {
            Self::Network(spec) => &spec.name,
            Self::Graph(spec) => &spec.name,
        }
    }

    /// The trainable model under `path`, computing under `policy` (tch's default
    /// initialisation).
    pub fn build(&self, path: &nn::Path, policy: Policy) -> Result<Net> {
        Ok(match self {
            Self::Network(spec) => Net::Network(Network::with_policy(path, spec, policy)?),
            Self::Graph(spec) => Net::Graph(GraphNetwork::with_init(
                path,
                spec,
                policy,
                Initializer::default(),
            )?),
        })
    }

    /// The deployed form: batch norm folded where the architecture allows.
    pub fn deployed(&self) -> Self {
        match self {
            Self::Network(spec) => Self::Network(spec.without_batch_norm()),
            Self::Graph(spec) => Self::Graph(spec.without_batch_norm()),
        }
    }

    /// An artifact builder of this (deployed) architecture, empty.
    pub fn builder(&self) -> runtime::ArtifactBuilder {
        match self {
            Self::Network(spec) => runtime::ArtifactBuilder::new(spec.clone()),
            Self::Graph(spec) => runtime::ArtifactBuilder::for_graph(spec.clone()),
        }
    }

    /// An artifact builder of this (deployed) architecture holding `params` in `format`.
    pub fn artifact(
        &self,
        params: &[DeployedParameter],
        format: WeightFormat,
    ) -> Result<runtime::ArtifactBuilder> {
        Ok(match self {
            Self::Network(spec) => export::artifact_from_parameters(spec.clone(), params, format)?,
            Self::Graph(spec) => {
                export::graph_artifact_from_parameters(spec.clone(), params, format)?
            }
        })
    }

    /// The weight of the first convolution or dense layer, which pruning leaves dense (its
    /// few weights each matter).
    pub fn first_weight(&self) -> Option<String> {
        match self {
            Self::Network(spec) => spec
                .layers
                .iter()
                .position(|l| l.weight_shape().is_some())
                .map(runtime::weight_name),
            Self::Graph(spec) => spec
                .nodes
                .iter()
                .find(|n| n.op.weight_shape().is_some())
                .map(|n| format!("{}.weight", n.name)),
        }
    }

    /// The index of the layer or node a calibration tap is named after.
    pub fn tapped(&self, tap: &str) -> Result<usize> {
        let index = match self {
            Self::Network(_) => tap.parse::<usize>().ok(),
            Self::Graph(spec) => spec.nodes.iter().position(|n| n.name == tap),
        };
        match index {
            Some(index) => Ok(index),
            None => bail!("tap `{tap}` names no layer of {}", self.name()),
        }
    }

    /// The sequential description, when the architecture is one.
    pub fn network(&self) -> Option<&NetworkSpec> {
        match self {
            Self::Network(spec) => Some(spec),
            Self::Graph(_) => None,
        }
    }
}

/// What the training loop needs of a model.
pub trait Trainable: ModuleT {
    /// The precision policy it computes under.
    fn policy(&self) -> Policy;

    /// The logits and the input of every conv2d and linear layer by index, with gradients
    /// (hint distillation); sequential networks only.
    fn forward_with_inputs(
        &self,
        xs: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Vec<(usize, Tensor)>)>;
}

impl Trainable for Network {
    fn policy(&self) -> Policy {
        Network::policy(self)
    }

    fn forward_with_inputs(
        &self,
        xs: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Vec<(usize, Tensor)>)> {
        Ok(Network::forward_with_inputs(self, xs, train)?)
    }
}

/// A trainable sequential network or graph.
#[derive(Debug)]
pub enum Net {
    Network(Network),
    Graph(GraphNetwork),
}

impl Net {
    /// The deployed parameters (batch norm folded) of the model, built in `vs` at its root.
    pub fn deployed_parameters(&self, vs: &nn::VarStore) -> Result<Vec<DeployedParameter>> {
        Ok(match self {
            Self::Network(net) => export::deployed_parameters(net, vs)?,
            Self::Graph(net) => export::graph_parameters(net.spec(), vs)?,
        })
    }

    pub fn enable_fake_quant(&mut self, config: FakeQuantConfig) -> Result<()> {
        match self {
            Self::Network(net) => net.enable_fake_quant(config)?,
            Self::Graph(net) => net.enable_fake_quant(config)?,
        }
        Ok(())
    }

    /// The observed input ranges of fake quantization, by layer or node index.
    pub fn activation_ranges(&self) -> Vec<ActivationRange> {
        match self {
            Self::Network(net) => net.activation_ranges(),
            Self::Graph(net) => net.activation_ranges(),
        }
    }

    /// Taps every quantized input of a batch on `calibrator`.
    pub fn calibrate(&self, xs: &Tensor, calibrator: &mut Calibrator) -> Result<()> {
        match self {
            Self::Network(net) => net.calibrate(xs, calibrator)?,
            Self::Graph(net) => net.calibrate(xs, calibrator)?,
        }
        Ok(())
    }

    pub fn param_count(&self) -> usize {
        match self {
            Self::Network(net) => net.param_count(),
            Self::Graph(net) => net.param_count(),
        }
    }

    pub fn nonzero_param_count(&self) -> usize {
        match self {
            Self::Network(net) => net.nonzero_param_count(),
            Self::Graph(net) => net.nonzero_param_count(),
        }
    }

    /// The sequential network, when the model is one.
    pub fn network(&self) -> Option<&Network> {
        match self {
            Self::Network(net) => Some(net),
            Self::Graph(_) => None,
        }
    }
}

impl ModuleT for Net {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Self::Network(net) => net.forward_t(xs, train),
            Self::Graph(net) => net.forward_t(xs, train),
        }
    }
}

impl Trainable for Net {
    fn policy(&self) -> Policy {
        match self {
            Self::Network(net) => net.policy(),
            Self::Graph(net) => net.policy(),
        }
    }

    fn forward_with_inputs(
        &self,
        xs: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Vec<(usize, Tensor)>)> {
        match self {
            Self::Network(net) => Trainable::forward_with_inputs(net, xs, train),
            Self::Graph(net) => bail!(
                "hint distillation reads a sequential network's layers; {} is a graph",
                net.spec().name
            ),
        }
    }
}
