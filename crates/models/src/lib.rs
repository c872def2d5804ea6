//! Network definitions shared by every technique.
//!
//! A network is described by a [`NetworkSpec`] (from the `model-spec` crate, re-exported
//! here): a serialisable sequence of layers with every hyperparameter spelled out, so
//! that the same description can be trained here with tch, stored next to exported
//! weights, and executed later by an engine that knows nothing of tch. [`Network`] builds the
//! tch implementation of a spec inside a [`tch::nn::Path`]; its variables are named
//! like a PyTorch `nn.Sequential` (`"0.weight"`, `"0.bias"`, `"3.weight"`, ...).
//!
//! A [`GraphSpec`] (named nodes on earlier nodes: residual and concatenating networks, the
//! `resnet` and `mobilenet` presets) is trained through [`GraphNetwork`], the same way and
//! under the same policies; its variables are named after the nodes
//! (`"layer1.0.conv1.weight"`, ...).
//!
//! Convolutions and dense layers start from tch's default initialisation, or from Keras's
//! (`glorot_uniform` weights, zero biases, batch-norm scales 1) with [`Network::with_init`] and
//! [`Initializer::GlorotUniform`].
//!
//! A network computes under a precision [`Policy`] (Keras's names: `float32`,
//! `mixed_float16`, `mixed_bfloat16`; [`Network::new`] means float32): the variables stay
//! float32, convolutions and dense layers compute in the policy's 16-bit type, and the
//! logits come back as float32.
//!
//! ```
//! use models::NetworkSpec;
//! use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
//!
//! let spec = NetworkSpec::teacher_cnn();
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = models::Network::new(&vs.root(), &spec)?;
//! let logits = net.forward_t(&Tensor::zeros([2, 1, 28, 28], (Kind::Float, Device::Cpu)), false);
//! assert_eq!(logits.size(), [2, 10]);
//! assert_eq!(spec.param_count(), net.param_count());
//!
//! // The same architecture computing in bfloat16, with float32 variables and logits.
//! let vs16 = nn::VarStore::new(Device::Cpu);
//! let net16 = models::Network::with_policy(&vs16.root(), &spec, models::Policy::MixedBfloat16)?;
//! let logits = net16.forward_t(&Tensor::zeros([2, 1, 28, 28], (Kind::Float, Device::Cpu)), false);
//! assert_eq!(logits.kind(), Kind::Float);
//! # Ok::<(), models::Error>(())
//! ```
#![warn(missing_docs)]

pub mod calibrate;
pub mod data;
mod error;
pub mod export;
pub mod fake_quant;
mod graph;
mod network;

pub use calibrate::{Calibrator, calibrate};
pub use error::{Error, Result};
pub use export::{ExportError, WeightFormat, export_f32, export_int8_dynamic};
pub use fake_quant::{ActivationFakeQuant, ActivationRange, FakeQuantConfig};
pub use graph::GraphNetwork;
pub use model_spec::{GraphSpec, INPUT, LayerSpec, NetworkSpec, Node, Op, SpecError};
pub use network::{Initializer, Network};
pub use tensor_precision::Policy;
