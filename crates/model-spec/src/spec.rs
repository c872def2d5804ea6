use serde::{Deserialize, Serialize};

/// A network description that does not hold together.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A layer does not fit the shape it receives, or has a nonsensical hyperparameter.
    #[error("layer {index} ({layer}) of network `{network}`: {reason}")]
    InvalidLayer {
        /// Name of the network.
        network: String,
        /// Position of the layer in the sequence.
        index: usize,
        /// The layer's operation name.
        layer: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A node of a graph does not fit its inputs, takes a node that does not come before
    /// it, or has a nonsensical hyperparameter.
    #[error("node `{node}` ({op}) of network `{network}`: {reason}")]
    InvalidNode {
        /// Name of the network.
        network: String,
        /// Name of the node.
        node: String,
        /// The node's operation name.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An input normalisation with unusable values.
    #[error("input normalisation: {reason}")]
    InvalidInput {
        /// What is wrong.
        reason: String,
    },
    /// The network description itself is unusable (no layers, empty input, ...).
    #[error("network `{network}`: {reason}")]
    InvalidNetwork {
        /// Name of the network.
        network: String,
        /// What is wrong.
        reason: String,
    },
}

/// One layer of a sequential network, with all its hyperparameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LayerSpec {
    /// 2-D convolution over NCHW input, square kernel, with bias.
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel side.
        kernel: usize,
        /// Stride in both directions.
        stride: usize,
        /// Zero padding on every side.
        padding: usize,
    },
    /// Fully connected layer `y = x W^T + b`.
    Linear {
        /// Input features.
        in_features: usize,
        /// Output features.
        out_features: usize,
    },
    /// Batch normalisation over the channels of (C, H, W) input: batch statistics while
    /// training (running estimates updated with momentum 0.1, as in PyTorch), the running
    /// estimates at inference. Exporters fold it into the preceding convolution, so
    /// deployed networks do not contain it (see [`NetworkSpec::without_batch_norm`]).
    BatchNorm2d {
        /// Channels.
        features: usize,
        /// Added to the variance for stability; positive.
        eps: f64,
    },
    /// Rectified linear unit.
    Relu,
    /// Max pooling with a square window, no padding.
    MaxPool2d {
        /// Window side.
        kernel: usize,
        /// Stride in both directions.
        stride: usize,
    },
    /// Flattens everything but the batch dimension.
    Flatten,
    /// Dropout while training, identity at inference.
    Dropout {
        /// Probability of zeroing an element, in [0, 1).
        p: f64,
    },
}

impl LayerSpec {
    /// The operation's name, as serialised.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Conv2d { .. } => "conv2d",
            Self::Linear { .. } => "linear",
            Self::BatchNorm2d { .. } => "batch_norm2d",
            Self::Relu => "relu",
            Self::MaxPool2d { .. } => "max_pool2d",
            Self::Flatten => "flatten",
            Self::Dropout { .. } => "dropout",
        }
    }

    /// The weight shape (PyTorch's layout: `[out, in, k, k]` or `[out, in]`) and the bias
    /// length of a layer with parameters that deployment keeps (conv2d and linear); `None`
    /// for the others, batch norm included (it is folded into its convolution).
    ///
    /// ```
    /// use model_spec::LayerSpec;
    ///
    /// let fc = LayerSpec::Linear { in_features: 784, out_features: 10 };
    /// assert_eq!(fc.weight_shape(), Some((vec![10, 784], 10)));
    /// assert_eq!(LayerSpec::Relu.weight_shape(), None);
    /// ```
    pub fn weight_shape(&self) -> Option<(Vec<usize>, usize)> {
        match *self {
            Self::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => Some((
                vec![out_channels, in_channels, kernel, kernel],
                out_channels,
            )),
            Self::Linear {
                in_features,
                out_features,
            } => Some((vec![out_features, in_features], out_features)),
            _ => None,
        }
    }

    /// Number of trainable parameters (weights and biases).
    pub fn param_count(&self) -> usize {
        match *self {
            Self::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => out_channels * in_channels * kernel * kernel + out_channels,
            Self::Linear {
                in_features,
                out_features,
            } => out_features * in_features + out_features,
            Self::BatchNorm2d { features, .. } => 2 * features,
            _ => 0,
        }
    }

    /// The output shape (without the batch dimension) for an input shape, or why it does not fit.
    pub(crate) fn output_shape(&self, input: &[usize]) -> std::result::Result<Vec<usize>, String> {
        match *self {
            Self::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            } => {
                let [c, h, w] = *input else {
                    return Err(format!("expects a (C, H, W) input, got {input:?}"));
                };
                if in_channels != c {
                    return Err(format!("expects {in_channels} input channels, got {c}"));
                }
                if out_channels == 0 || kernel == 0 || stride == 0 {
                    return Err("channels, kernel and stride must be positive".into());
                }
                Ok(vec![
                    out_channels,
                    crate::graph::window(h, kernel, stride, padding)?,
                    crate::graph::window(w, kernel, stride, padding)?,
                ])
            }
            Self::Linear {
                in_features,
                out_features,
            } => {
                if input != [in_features] {
                    return Err(format!("expects {in_features} features, got {input:?}"));
                }
                if out_features == 0 {
                    return Err("out_features must be positive".into());
                }
                Ok(vec![out_features])
            }
            Self::MaxPool2d { kernel, stride } => {
                let [c, h, w] = *input else {
                    return Err(format!("expects a (C, H, W) input, got {input:?}"));
                };
                if kernel == 0 || stride == 0 || kernel > h || kernel > w {
                    return Err(format!(
                        "window {kernel} / stride {stride} do not fit {h}x{w}"
                    ));
                }
                Ok(vec![
                    c,
                    (h - kernel) / stride + 1,
                    (w - kernel) / stride + 1,
                ])
            }
            Self::BatchNorm2d { features, eps } => {
                let [c, _, _] = *input else {
                    return Err(format!("expects a (C, H, W) input, got {input:?}"));
                };
                if c != features {
                    return Err(format!("expects {features} channels, got {c}"));
                }
                if !(eps > 0.0 && eps.is_finite()) {
                    return Err(format!("eps {eps} must be positive and finite"));
                }
                Ok(input.to_vec())
            }
            Self::Flatten => input
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .map(|n| vec![n])
                .ok_or_else(|| format!("{input:?} has more elements than fit in usize")),
            Self::Relu => Ok(input.to_vec()),
            Self::Dropout { p } => {
                if (0.0..1.0).contains(&p) {
                    Ok(input.to_vec())
                } else {
                    Err(format!("probability {p} is outside [0, 1)"))
                }
            }
        }
    }
}

/// A sequential network: a name, the input shape and the layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Name of the architecture, for reports.
    pub name: String,
    /// Input shape without the batch dimension: (channels, height, width).
    pub input: [usize; 3],
    /// The layers, applied in order.
    pub layers: Vec<LayerSpec>,
}

impl NetworkSpec {
    /// The teacher: two convolutions with batch norm and max pooling, then two dense
    /// layers (about 225k parameters): the classic MNIST convnet with a hidden dense
    /// layer. Batch norm makes it reach 99.2% test accuracy in a few epochs.
    pub fn teacher_cnn() -> Self {
        Self {
            name: "teacher_cnn".into(),
            input: [1, 28, 28],
            layers: vec![
                LayerSpec::Conv2d {
                    in_channels: 1,
                    out_channels: 32,
                    kernel: 3,
                    stride: 1,
                    padding: 0,
                },
                LayerSpec::BatchNorm2d {
                    features: 32,
                    eps: 1e-5,
                },
                LayerSpec::Relu,
                LayerSpec::MaxPool2d {
                    kernel: 2,
                    stride: 2,
                },
                LayerSpec::Conv2d {
                    in_channels: 32,
                    out_channels: 64,
                    kernel: 3,
                    stride: 1,
                    padding: 0,
                },
                LayerSpec::BatchNorm2d {
                    features: 64,
                    eps: 1e-5,
                },
                LayerSpec::Relu,
                LayerSpec::MaxPool2d {
                    kernel: 2,
                    stride: 2,
                },
                LayerSpec::Flatten,
                LayerSpec::Dropout { p: 0.1 },
                LayerSpec::Linear {
                    in_features: 64 * 5 * 5,
                    out_features: 128,
                },
                LayerSpec::Relu,
                LayerSpec::Dropout { p: 0.25 },
                LayerSpec::Linear {
                    in_features: 128,
                    out_features: 10,
                },
            ],
        }
    }

    /// The student: the teacher's shape at an eighth of its width (8 and 16 channels, a
    /// dense layer of 32): about 14.5k parameters, over 15x fewer than the teacher.
    pub fn student_cnn() -> Self {
        let conv = |in_channels, out_channels| LayerSpec::Conv2d {
            in_channels,
            out_channels,
            kernel: 3,
            stride: 1,
            padding: 0,
        };
        let pool = LayerSpec::MaxPool2d {
            kernel: 2,
            stride: 2,
        };
        Self {
            name: "student_cnn".into(),
            input: [1, 28, 28],
            layers: vec![
                conv(1, 8),
                LayerSpec::BatchNorm2d {
                    features: 8,
                    eps: 1e-5,
                },
                LayerSpec::Relu,
                pool.clone(),
                conv(8, 16),
                LayerSpec::BatchNorm2d {
                    features: 16,
                    eps: 1e-5,
                },
                LayerSpec::Relu,
                pool,
                LayerSpec::Flatten,
                LayerSpec::Linear {
                    in_features: 16 * 5 * 5,
                    out_features: 32,
                },
                LayerSpec::Relu,
                LayerSpec::Linear {
                    in_features: 32,
                    out_features: 10,
                },
            ],
        }
    }

    /// The pipeline's student (17,098 parameters with batch norm, 16,938 folded): three 3x3 convolutions
    /// of 16, 32 and 32 channels (batch norm, ReLU; max pooling after the first two) and one
    /// linear layer from the 32 x 3 x 3 features to the 10 classes. Most of its parameters
    /// are convolution weights, which carry accuracy, rather than a wide first dense layer,
    /// which pruning would mostly remove anyway.
    pub fn compact_cnn() -> Self {
        let conv = |in_channels, out_channels| LayerSpec::Conv2d {
            in_channels,
            out_channels,
            kernel: 3,
            stride: 1,
            padding: 0,
        };
        let bn = |features| LayerSpec::BatchNorm2d {
            features,
            eps: 1e-5,
        };
        let pool = LayerSpec::MaxPool2d {
            kernel: 2,
            stride: 2,
        };
        Self {
            name: "compact_cnn".into(),
            input: [1, 28, 28],
            layers: vec![
                conv(1, 16),
                bn(16),
                LayerSpec::Relu,
                pool.clone(),
                conv(16, 32),
                bn(32),
                LayerSpec::Relu,
                pool,
                conv(32, 32),
                bn(32),
                LayerSpec::Relu,
                LayerSpec::Flatten,
                LayerSpec::Linear {
                    in_features: 32 * 3 * 3,
                    out_features: 10,
                },
            ],
        }
    }

    /// Checks that every layer fits the shape it receives; returns the output shape.
    pub fn validate(&self) -> Result<Vec<usize>, SpecError> {
        let mut shapes = self.shapes()?;
        Ok(shapes.pop().unwrap_or_default())
    }

    /// The shape inference of the network: the per-sample input shape of every layer, then
    /// the output shape (`layers.len() + 1` shapes), or the first layer that does not fit.
    ///
    /// All arithmetic is checked, so any description (one read from an untrusted file
    /// included) gives a shape list or an error, never an overflow.
    ///
    /// ```
    /// use model_spec::NetworkSpec;
    ///
    /// let shapes = NetworkSpec::student_cnn().shapes()?;
    /// assert_eq!(shapes[0], vec![1, 28, 28]);
    /// assert_eq!(shapes.last(), Some(&vec![10]));
    /// # Ok::<(), model_spec::SpecError>(())
    /// ```
    pub fn shapes(&self) -> Result<Vec<Vec<usize>>, SpecError> {
        if self.layers.is_empty() || self.input.contains(&0) {
            return Err(SpecError::InvalidNetwork {
                network: self.name.clone(),
                reason: format!(
                    "needs layers and a non-empty input, has {} layers and input {:?}",
                    self.layers.len(),
                    self.input
                ),
            });
        }
        let mut shapes = Vec::with_capacity(self.layers.len() + 1);
        shapes.push(self.input.to_vec());
        for (index, layer) in self.layers.iter().enumerate() {
            let shape =
                layer
                    .output_shape(&shapes[index])
                    .map_err(|reason| SpecError::InvalidLayer {
                        network: self.name.clone(),
                        index,
                        layer: layer.op(),
                        reason,
                    })?;
            shapes.push(shape);
        }
        Ok(shapes)
    }

    /// The network as deployed: every batch norm removed, as exporters fold each one into
    /// the convolution before it. Layer indices shift accordingly.
    pub fn without_batch_norm(&self) -> Self {
        Self {
            name: self.name.clone(),
            input: self.input,
            layers: self
                .layers
                .iter()
                .filter(|layer| !matches!(layer, LayerSpec::BatchNorm2d { .. }))
                .cloned()
                .collect(),
        }
    }

    /// Number of trainable parameters.
    pub fn param_count(&self) -> usize {
        self.layers.iter().map(LayerSpec::param_count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teacher_is_valid_and_has_the_expected_size() {
        let spec = NetworkSpec::teacher_cnn();
        assert_eq!(spec.validate().unwrap(), vec![10]);
        assert_eq!(
            spec.param_count(),
            320 + 64 + 18_496 + 128 + 204_928 + 1_290
        );
        let deployed = spec.without_batch_norm();
        assert_eq!(deployed.validate().unwrap(), vec![10]);
        assert_eq!(deployed.layers.len(), spec.layers.len() - 2);
        assert_eq!(deployed.param_count(), 320 + 18_496 + 204_928 + 1_290);
    }

    #[test]
    fn student_is_valid_and_over_ten_times_smaller() {
        let student = NetworkSpec::student_cnn();
        assert_eq!(student.validate().unwrap(), vec![10]);
        assert_eq!(student.param_count(), 80 + 16 + 1_168 + 32 + 12_832 + 330);
        assert!(student.param_count() * 10 <= NetworkSpec::teacher_cnn().param_count());
    }

    #[test]
    fn compact_student_is_valid_and_mostly_convolution() {
        let spec = NetworkSpec::compact_cnn();
        assert_eq!(spec.validate().unwrap(), vec![10]);
        assert_eq!(
            spec.param_count(),
            160 + 32 + 4_640 + 64 + 9_248 + 64 + 2_890
        );
        let deployed = spec.without_batch_norm();
        assert_eq!(deployed.param_count(), 16_938);
        assert!(spec.param_count() * 13 <= NetworkSpec::teacher_cnn().param_count());
    }

    #[test]
    fn mismatched_linear_is_an_error_naming_the_layer() {
        let mut spec = NetworkSpec::teacher_cnn();
        spec.layers[10] = LayerSpec::Linear {
            in_features: 1000,
            out_features: 128,
        };
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("layer 10 (linear)"), "{err}");
        assert!(err.contains("1600"), "{err}");
    }

    #[test]
    fn oversized_kernel_bad_dropout_and_bad_batch_norm_are_errors() {
        let mut spec = NetworkSpec::teacher_cnn();
        spec.input = [1, 2, 2];
        assert!(spec.validate().is_err());
        let mut spec = NetworkSpec::teacher_cnn();
        spec.layers[9] = LayerSpec::Dropout { p: 1.0 };
        assert!(spec.validate().is_err());
        let mut spec = NetworkSpec::teacher_cnn();
        spec.layers[1] = LayerSpec::BatchNorm2d {
            features: 32,
            eps: 0.0,
        };
        assert!(spec.validate().is_err());
        spec.layers[1] = LayerSpec::BatchNorm2d {
            features: 16,
            eps: 1e-5,
        };
        assert!(spec.validate().is_err());
        spec.layers.clear();
        assert!(spec.validate().is_err());
    }

    #[test]
    fn huge_hyperparameters_are_errors_not_overflows() {
        let conv = |padding| NetworkSpec {
            name: "huge".into(),
            input: [1, 4, 4],
            layers: vec![LayerSpec::Conv2d {
                in_channels: 1,
                out_channels: 1,
                kernel: 1,
                stride: 1,
                padding,
            }],
        };
        assert!(conv(usize::MAX / 2 + 1).validate().is_err());
        assert!(conv(usize::MAX).validate().is_err());
        let flat = NetworkSpec {
            name: "wide".into(),
            input: [usize::MAX, usize::MAX, 2],
            layers: vec![LayerSpec::Flatten],
        };
        let err = flat.validate().unwrap_err().to_string();
        assert!(err.contains("layer 0 (flatten)"), "{err}");
    }

    #[test]
    fn shapes_list_every_layer_input_then_the_output() {
        let spec = NetworkSpec::teacher_cnn().without_batch_norm();
        let shapes = spec.shapes().unwrap();
        assert_eq!(shapes.len(), spec.layers.len() + 1);
        assert_eq!(shapes[1], vec![32, 26, 26]);
        assert_eq!(shapes.last().unwrap(), &spec.validate().unwrap());
        for (layer, shape) in spec.layers.iter().zip(&shapes) {
            if let Some((weight, bias)) = layer.weight_shape() {
                assert_eq!(weight[0], bias);
                assert_eq!(weight[1], shape[0], "{layer:?}");
            }
        }
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = NetworkSpec::teacher_cnn();
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(r#""op":"conv2d""#), "{json}");
        let back: NetworkSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
    }
}
