//! Export of a trained [`Network`] to the runtime's artifact format (`docs/FORMAT.md`).
//!
//! The deployed network is [`NetworkSpec::without_batch_norm`]: every `BatchNorm2d` is folded
//! into the `Conv2d` right before it, with its running statistics (inference mode):
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
//! assert_eq!(model.network(), &NetworkSpec::teacher_cnn().without_batch_norm());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::Path;

use runtime::{ArtifactBuilder, Granularity};
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
}

/// One parameter of the deployed network: batch norm folded, named by its deployed index.
#[derive(Clone, Debug, PartialEq)]
pub struct DeployedParameter {
    /// `"<deployed layer index>.weight"` or `".bias"`.
    pub name: String,
    /// PyTorch's shape: `[out, in, k, k]`, `[out, in]` or `[out]`.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f32>,
}

fn variable(
    vars: &std::collections::HashMap<String, Tensor>,
    name: &str,
) -> Result<(Vec<usize>, Vec<f64>), ExportError> {
    let tensor = vars
        .get(name)
        .ok_or_else(|| ExportError::MissingVariable { name: name.into() })?;
    let shape = tensor
        .size()
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .collect();
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
    let vars = vs.variables();
    let layers = &net.spec().layers;
    let mut out = Vec::new();
    let mut removed = 0;
    for (index, layer) in layers.iter().enumerate() {
        match layer {
            LayerSpec::BatchNorm2d { .. } => {
                if index == 0 || !matches!(layers[index - 1], LayerSpec::Conv2d { .. }) {
                    return Err(ExportError::Unfoldable { index });
                }
                removed += 1;
                continue;
            }
            LayerSpec::Conv2d { .. } | LayerSpec::Linear { .. } => {}
            _ => continue,
        }
        let (shape, mut weight) = variable(&vars, &format!("{index}.weight"))?;
        let (_, mut bias) = variable(&vars, &format!("{index}.bias"))?;
        if let Some(&LayerSpec::BatchNorm2d { eps, .. }) = layers.get(index + 1) {
            let bn = index + 1;
            let (_, gamma) = variable(&vars, &format!("{bn}.weight"))?;
            let (_, beta) = variable(&vars, &format!("{bn}.bias"))?;
            let (_, mean) = variable(&vars, &format!("{bn}.running_mean"))?;
            let (_, var) = variable(&vars, &format!("{bn}.running_var"))?;
            let per_channel = weight.len() / bias.len().max(1);
            for (c, row) in weight.chunks_exact_mut(per_channel.max(1)).enumerate() {
                let s = gamma[c] / (var[c] + eps).sqrt();
                row.iter_mut().for_each(|w| *w *= s);
                bias[c] = (bias[c] - mean[c]) * s + beta[c];
            }
        }
        let deployed = index - removed;
        for (suffix, shape, data) in [("weight", shape, weight), ("bias", vec![bias.len()], bias)] {
            let name = format!("{deployed}.{suffix}");
            let data = to_f32(&name, &data)?;
            out.push(DeployedParameter { name, shape, data });
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
    for p in params {
        let is_weight = p.name.ends_with(".weight");
        match format {
            WeightFormat::Int8DynamicRange if is_weight => {
                builder.add_int8_quantized(&p.name, &p.data, &p.shape, Granularity::PerChannel)?
            }
            WeightFormat::Int8Compact if is_weight => builder.add_int8_quantized_compact(
                &p.name,
                &p.data,
                &p.shape,
                Granularity::PerChannel,
            )?,
            WeightFormat::Int8PerTensor if is_weight => {
                builder.add_int8_quantized(&p.name, &p.data, &p.shape, Granularity::PerTensor)?
            }
            WeightFormat::F16 => builder.add_f16(&p.name, &p.data, &p.shape)?,
            _ => builder.add_f32(&p.name, &p.data, &p.shape)?,
        };
    }
    Ok(builder)
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
            &NetworkSpec::teacher_cnn().without_batch_norm()
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
