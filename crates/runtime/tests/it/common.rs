//! Shared helpers: seeded parameters, artifact construction and an f64 reference forward pass.

use std::collections::{BTreeMap, HashMap};

use model_spec::{LayerSpec, NetworkSpec};
use ndarray::{Array2, Array4};
use runtime::{ArtifactBuilder, Granularity, Storage};
use safetensors::SafeTensors;

/// A small deterministic generator (xorshift64*), uniform in [-1, 1).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform() * scale).collect()
    }
}

/// Weight (PyTorch layout) and bias of one layer.
#[derive(Clone, Debug)]
pub struct Param {
    pub shape: Vec<usize>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Seeded parameters for every conv2d and linear layer, scaled by `1 / sqrt(fan_in)`.
pub fn params(spec: &NetworkSpec, seed: u64) -> BTreeMap<usize, Param> {
    let mut rng = Rng::new(seed);
    let mut out = BTreeMap::new();
    for (i, layer) in spec.layers.iter().enumerate() {
        let shape = match *layer {
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => vec![out_channels, in_channels, kernel, kernel],
            LayerSpec::Linear {
                in_features,
                out_features,
            } => vec![out_features, in_features],
            _ => continue,
        };
        let fan_in: usize = shape[1..].iter().product();
        let scale = (3.0 / fan_in as f32).sqrt();
        let weight = rng.vec(shape.iter().product(), scale);
        let bias = rng.vec(shape[0], 0.1);
        out.insert(
            i,
            Param {
                shape,
                weight,
                bias,
            },
        );
    }
    out
}

/// How the tests store a layer's weight.
#[derive(Clone, Copy, Debug)]
pub enum Store {
    F32,
    F16,
    Int8(Granularity),
    /// Int8 codes in whichever of `int8` and `int8_sparse` is smaller.
    Int8Compact(Granularity),
    Csr,
}

pub fn artifact(
    spec: &NetworkSpec,
    params: &BTreeMap<usize, Param>,
    store: impl Fn(usize) -> Store,
) -> ArtifactBuilder {
    let mut b = ArtifactBuilder::new(spec.clone());
    for (&i, p) in params {
        let name = format!("{i}.weight");
        match store(i) {
            Store::F32 => b.add(&name, &p.weight, &p.shape, Storage::F32),
            Store::F16 => b.add(&name, &p.weight, &p.shape, Storage::F16),
            Store::Int8(g) => b.add(&name, &p.weight, &p.shape, Storage::Int8(g)),
            Store::Int8Compact(g) => b.add(&name, &p.weight, &p.shape, Storage::Int8Smallest(g)),
            Store::Csr => b.add(&name, &p.weight, &p.shape, Storage::Csr),
        }
        .unwrap();
        b.add(&format!("{i}.bias"), &p.bias, &[p.shape[0]], Storage::F32)
            .unwrap();
    }
    b
}

/// The MLP the benchmarks use: 784-512-512-10.
pub fn mlp() -> NetworkSpec {
    NetworkSpec {
        name: "mlp".into(),
        input: [1, 28, 28],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 784,
                out_features: 512,
            },
            LayerSpec::Relu,
            LayerSpec::Dropout { p: 0.2 },
            LayerSpec::Linear {
                in_features: 512,
                out_features: 512,
            },
            LayerSpec::Relu,
            LayerSpec::Linear {
                in_features: 512,
                out_features: 10,
            },
        ],
    }
}

/// Seeded inputs in [0, 1), like normalised pixels.
pub fn images(batch: usize, spec: &NetworkSpec, seed: u64) -> Array4<f32> {
    let [c, h, w] = spec.input;
    let mut rng = Rng::new(seed);
    let data = (0..batch * c * h * w)
        .map(|_| 0.5 + 0.5 * rng.uniform())
        .collect();
    Array4::from_shape_vec((batch, c, h, w), data).unwrap()
}

/// Straightforward f64 forward pass, the definition the engine must reproduce. Returns the
/// outputs and every layer's input (for calibration).
pub fn reference(
    spec: &NetworkSpec,
    params: &BTreeMap<usize, Param>,
    x: &Array4<f32>,
) -> (Array2<f64>, Vec<Vec<f64>>) {
    let batch = x.shape()[0];
    let mut shape = spec.input.to_vec();
    let mut data: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let mut inputs = Vec::new();
    for (i, layer) in spec.layers.iter().enumerate() {
        inputs.push(data.clone());
        let per: usize = shape.iter().product();
        match *layer {
            LayerSpec::Conv2d {
                out_channels,
                kernel,
                stride,
                padding,
                ..
            } => {
                let p = &params[&i];
                let (c, h, w) = (shape[0], shape[1], shape[2]);
                let oh = (h + 2 * padding - kernel) / stride + 1;
                let ow = (w + 2 * padding - kernel) / stride + 1;
                let mut out = vec![0.0; batch * out_channels * oh * ow];
                for b in 0..batch {
                    for o in 0..out_channels {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let mut s = f64::from(p.bias[o]);
                                for ci in 0..c {
                                    for ky in 0..kernel {
                                        for kx in 0..kernel {
                                            let iy = (oy * stride + ky) as isize - padding as isize;
                                            let ix = (ox * stride + kx) as isize - padding as isize;
                                            if iy < 0
                                                || ix < 0
                                                || iy >= h as isize
                                                || ix >= w as isize
                                            {
                                                continue;
                                            }
                                            let xv = data[b * per
                                                + (ci * h + iy as usize) * w
                                                + ix as usize];
                                            let wv = p.weight
                                                [((o * c + ci) * kernel + ky) * kernel + kx];
                                            s += xv * f64::from(wv);
                                        }
                                    }
                                }
                                out[((b * out_channels + o) * oh + oy) * ow + ox] = s;
                            }
                        }
                    }
                }
                data = out;
                shape = vec![out_channels, oh, ow];
            }
            LayerSpec::Linear {
                in_features,
                out_features,
            } => {
                let p = &params[&i];
                let mut out = vec![0.0; batch * out_features];
                for b in 0..batch {
                    for o in 0..out_features {
                        out[b * out_features + o] = f64::from(p.bias[o])
                            + (0..in_features)
                                .map(|k| {
                                    data[b * in_features + k]
                                        * f64::from(p.weight[o * in_features + k])
                                })
                                .sum::<f64>();
                    }
                }
                data = out;
                shape = vec![out_features];
            }
            LayerSpec::Relu => data.iter_mut().for_each(|v| *v = v.max(0.0)),
            LayerSpec::BatchNorm2d { .. } => {
                unreachable!("deployed networks have their batch norm folded")
            }
            LayerSpec::MaxPool2d { kernel, stride } => {
                let (c, h, w) = (shape[0], shape[1], shape[2]);
                let (oh, ow) = ((h - kernel) / stride + 1, (w - kernel) / stride + 1);
                let mut out = vec![f64::NEG_INFINITY; batch * c * oh * ow];
                for (plane, o) in out.chunks_mut(oh * ow).enumerate() {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            for ky in 0..kernel {
                                for kx in 0..kernel {
                                    let v = data
                                        [plane * h * w + (oy * stride + ky) * w + ox * stride + kx];
                                    o[oy * ow + ox] = o[oy * ow + ox].max(v);
                                }
                            }
                        }
                    }
                }
                data = out;
                shape = vec![c, oh, ow];
            }
            LayerSpec::Flatten => shape = vec![per],
            LayerSpec::Dropout { .. } => {}
        }
    }
    let out_len: usize = shape.iter().product();
    (
        Array2::from_shape_vec((batch, out_len), data).unwrap(),
        inputs,
    )
}

/// Largest absolute difference, relative to the largest absolute reference value.
pub fn relative_error(got: &Array2<f32>, expected: &Array2<f64>) -> f64 {
    assert_eq!(got.shape(), expected.shape());
    let scale = expected
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-12);
    got.iter()
        .zip(expected)
        .map(|(&g, &e)| (f64::from(g) - e).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Re-serialises an artifact with its `__metadata__` changed by `edit` (tensors untouched).
pub fn edit_metadata(bytes: &[u8], edit: impl FnOnce(&mut HashMap<String, String>)) -> Vec<u8> {
    edit_file(bytes, |metadata, _| edit(metadata))
}

/// Re-serialises an artifact after `edit` changed its metadata or tensors (as raw
/// `(dtype, shape, bytes)`).
pub fn edit_file(
    bytes: &[u8],
    edit: impl FnOnce(
        &mut HashMap<String, String>,
        &mut BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    ),
) -> Vec<u8> {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    let mut metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut tensors: BTreeMap<_, _> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            )
        })
        .collect();
    edit(&mut metadata, &mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, Some(metadata)).unwrap()
}
