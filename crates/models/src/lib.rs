//! Network definitions shared by every technique.
//!
//! A network is described by a [`NetworkSpec`] (from the `model-spec` crate, re-exported
//! here): a serialisable sequence of layers with every hyperparameter spelled out, so
//! that the same description can be trained here with tch, stored next to exported
//! weights, and executed later by an engine that knows nothing of tch. [`Network`] builds the
//! tch implementation of a spec inside a [`tch::nn::Path`]; its variables are named
//! like a PyTorch `nn.Sequential` (`"0.weight"`, `"0.bias"`, `"3.weight"`, ...).
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
//! # Ok::<(), models::Error>(())
//! ```
#![warn(missing_docs)]

mod error;
mod network;

pub use error::{Error, Result};
pub use model_spec::{LayerSpec, NetworkSpec, SpecError};
pub use network::Network;
