use tch::Tensor;
use tch::nn::{self, ModuleT};

use crate::{LayerSpec, NetworkSpec, Result};

/// The tch implementation of a [`NetworkSpec`].
#[derive(Debug)]
pub struct Network {
    spec: NetworkSpec,
    layers: Vec<Layer>,
}

#[derive(Debug)]
enum Layer {
    Conv2d {
        weight: Tensor,
        bias: Tensor,
        stride: i64,
        padding: i64,
    },
    Linear {
        weight: Tensor,
        bias: Tensor,
    },
    Relu,
    MaxPool2d {
        kernel: i64,
        stride: i64,
    },
    Flatten,
    Dropout {
        p: f64,
    },
}

fn dim(value: usize) -> i64 {
    i64::try_from(value).expect("layer sizes validated by NetworkSpec fit in i64")
}

impl Network {
    /// Creates the variables of `spec` under `path` (PyTorch's default initialisation)
    /// after validating the spec.
    pub fn new(path: &nn::Path, spec: &NetworkSpec) -> Result<Self> {
        spec.validate()?;
        let layers = spec
            .layers
            .iter()
            .enumerate()
            .map(|(index, layer)| {
                let path = path / index;
                match *layer {
                    LayerSpec::Conv2d {
                        in_channels,
                        out_channels,
                        kernel,
                        stride,
                        padding,
                    } => {
                        let conv = nn::conv2d(
                            &path,
                            dim(in_channels),
                            dim(out_channels),
                            dim(kernel),
                            Default::default(),
                        );
                        Layer::Conv2d {
                            weight: conv.ws,
                            bias: conv.bs.expect("conv2d is created with a bias"),
                            stride: dim(stride),
                            padding: dim(padding),
                        }
                    }
                    LayerSpec::Linear {
                        in_features,
                        out_features,
                    } => {
                        let linear = nn::linear(
                            &path,
                            dim(in_features),
                            dim(out_features),
                            Default::default(),
                        );
                        Layer::Linear {
                            weight: linear.ws,
                            bias: linear.bs.expect("linear is created with a bias"),
                        }
                    }
                    LayerSpec::Relu => Layer::Relu,
                    LayerSpec::MaxPool2d { kernel, stride } => Layer::MaxPool2d {
                        kernel: dim(kernel),
                        stride: dim(stride),
                    },
                    LayerSpec::Flatten => Layer::Flatten,
                    LayerSpec::Dropout { p } => Layer::Dropout { p },
                }
            })
            .collect();
        Ok(Self {
            spec: spec.clone(),
            layers,
        })
    }

    /// The description this network was built from.
    pub fn spec(&self) -> &NetworkSpec {
        &self.spec
    }

    /// Number of trainable parameters, counted from the tensors.
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
        self.layers.iter().flat_map(|layer| match layer {
            Layer::Conv2d { weight, bias, .. } | Layer::Linear { weight, bias } => {
                vec![weight, bias]
            }
            _ => vec![],
        })
    }
}

impl ModuleT for Network {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut xs = xs.shallow_clone();
        for layer in &self.layers {
            xs = match layer {
                Layer::Conv2d {
                    weight,
                    bias,
                    stride,
                    padding,
                } => xs.conv2d(weight, Some(bias), [*stride], [*padding], [1], 1),
                Layer::Linear { weight, bias } => xs.linear(weight, Some(bias)),
                Layer::Relu => xs.relu(),
                Layer::MaxPool2d { kernel, stride } => {
                    xs.max_pool2d([*kernel], [*stride], [0], [1], false)
                }
                Layer::Flatten => xs.flatten(1, -1),
                Layer::Dropout { p } => xs.dropout(*p, train),
            };
        }
        xs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn variables_are_named_like_a_pytorch_sequential() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::new(&vs.root(), &NetworkSpec::teacher_cnn()).unwrap();
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "0.bias",
                "0.weight",
                "11.bias",
                "11.weight",
                "3.bias",
                "3.weight",
                "8.bias",
                "8.weight"
            ]
        );
        assert_eq!(net.param_count(), NetworkSpec::teacher_cnn().param_count());
    }

    #[test]
    fn dropout_only_acts_in_training() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::new(&vs.root(), &NetworkSpec::teacher_cnn()).unwrap();
        let xs = Tensor::randn([4, 1, 28, 28], (Kind::Float, Device::Cpu));
        let a = net.forward_t(&xs, false);
        let b = net.forward_t(&xs, false);
        assert!(a.equal(&b));
        let c = net.forward_t(&xs, true);
        assert!(!a.equal(&c));
    }

    #[test]
    fn zeroed_weights_are_not_counted_as_nonzero() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::new(&vs.root(), &NetworkSpec::teacher_cnn()).unwrap();
        // tch initialises convolution biases to zero, so count before zeroing.
        let before = net.nonzero_param_count();
        assert!(before < net.param_count());
        tch::no_grad(|| {
            let mut weight = vs.variables()["8.weight"].shallow_clone();
            let _ = weight.zero_();
        });
        assert_eq!(net.nonzero_param_count(), before - 1600 * 128);
    }
}
