//! Network descriptions that need no deep-learning library.
//!
//! A [`NetworkSpec`] is a serialisable sequence of layers ([`LayerSpec`]) with every
//! hyperparameter spelled out. The `models` crate builds a trainable tch network from
//! it; an exported model carries it so that an engine without tch can rebuild the
//! network. A [`GraphSpec`] is the general form: named nodes ([`Node`]), each an operation
//! ([`Op`]) on the outputs of earlier nodes, for residual and concatenating networks; every
//! sequential network converts to one.
//!
//! ```
//! use model_spec::{LayerSpec, NetworkSpec};
//!
//! let spec = NetworkSpec::teacher_cnn();
//! assert_eq!(spec.validate()?, vec![10]);
//! let json = serde_json::to_string(&spec).unwrap();
//! assert!(json.contains(r#""op":"conv2d""#));
//! assert_eq!(spec.layers[2], LayerSpec::Relu);
//! # Ok::<(), model_spec::SpecError>(())
//! ```
#![warn(missing_docs)]

mod graph;
mod input;
mod spec;

pub use graph::{GraphSpec, INPUT, Node, Op};
pub use input::{InputLayout, InputNormalization};
pub use spec::{LayerSpec, NetworkSpec, SpecError};
