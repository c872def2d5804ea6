//! The quantization that ships, against PyTorch's (with the Python of the LibTorch
//! environment).
//!
//! Weights: the int8 codes and scales the runtime's `ArtifactBuilder` writes (through
//! `quantization::quantize_weights`, the only weight quantizer), read back from the
//! artifact, against `torch.quantize_per_channel` / `torch.quantize_per_tensor` given our
//! scales, and our scales against `PerChannelMinMaxObserver` / `MinMaxObserver` (symmetric,
//! qint8, restricted to -127..=127, the TFLite convention).
//!
//! Activations: the dynamic-range rule (`QParams::dynamic`, which the runtime applies to
//! every batch of a dynamic-range layer, and the rule of calibrated ranges) against
//! `MinMaxObserver` (quint8, per-tensor affine), and its codes (`QParams::quantize`, the
//! reference the runtime's vectorised quantizers are tested against exactly) against
//! `torch.quantize_per_tensor`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use models::{LayerSpec, NetworkSpec};
use quantization::{BitWidth, Granularity, QParams, quantize_weights};
use runtime::{Artifact, ArtifactBuilder, Storage, WeightValues};
use serde_json::{Value, json};

/// Scales are computed in f32 on both sides (`max / 127`, `(max - min) / 255`); they may
/// differ by float rounding of the division order only.
const SCALE_RELATIVE_TOLERANCE: f64 = 1e-6;

const SCRIPT: &str = r#"
import json, sys, torch
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver
out = []
for case in json.load(sys.stdin):
    w = torch.tensor(case["values"], dtype=torch.float32).reshape(case["shape"])
    ours = torch.tensor(case["scales"], dtype=torch.float32)
    if case["granularity"] == "per_channel":
        obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8,
                                       qscheme=torch.per_channel_symmetric,
                                       quant_min=-127, quant_max=127)
        obs(w)
        scale, zero_point = obs.calculate_qparams()
        q = torch.quantize_per_channel(w, ours.double(), torch.zeros(len(ours), dtype=torch.int64),
                                       0, torch.qint8)
    else:
        obs = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                             quant_min=-127, quant_max=127)
        obs(w)
        scale, zero_point = obs.calculate_qparams()
        q = torch.quantize_per_tensor(w, ours.item(), 0, torch.qint8)
    act = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    act(w)
    a_scale, a_zero_point = act.calculate_qparams()
    a = case["activation"]
    a_codes = torch.quantize_per_tensor(w, a["scale"], a["zero_point"], torch.quint8)
    out.append({
        "observer_scales": scale.reshape(-1).tolist(),
        "observer_zero_points": zero_point.reshape(-1).tolist(),
        "codes": q.int_repr().flatten().tolist(),
        "activation_scale": a_scale.item(),
        "activation_zero_point": a_zero_point.item(),
        "activation_codes": a_codes.int_repr().flatten().tolist(),
    })
print(json.dumps(out))
"#;

fn python() -> Result<PathBuf> {
    std::env::var_os("TCH_MOT_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .context(
            "this test compares with PyTorch and needs TCH_MOT_PYTHON (the Python of the \
             LibTorch environment): run the tests with `cargo xtask test`, which sets it",
        )
}

/// Deterministic pseudo-random values: channels of very different magnitudes, some values
/// shifted so channels are not centred.
fn weights(shape: &[usize], seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let per_channel: usize = shape[1..].iter().product();
    (0..shape[0] * per_channel)
        .map(|i| {
            let channel_scale = 0.01 * 10f64.powi((i / per_channel % 4) as i32);
            ((next() - 0.4) * channel_scale) as f32
        })
        .collect()
}

/// Values on exact ties of both grids: every channel spans [-127, 0.5], a symmetric weight
/// step of 127 / 127 = 1 and an activation step of 127.5 / 255 = 0.5 (zero point 254), and
/// the other values lie halfway between the levels of one grid or the other (`k + 1/2` or
/// `k / 2 + 1/4`), where rounding half to even decides.
fn ties(shape: &[usize]) -> Vec<f32> {
    let per_channel: usize = shape[1..].iter().product();
    (0..shape[0] * per_channel)
        .map(|i| match i % per_channel {
            0 => -127.0,
            1 => 0.5,
            j if j % 2 == 0 => -((j / 2) as f32) - 0.5,
            j => -((j / 2) as f32) * 0.5 - 0.25,
        })
        .collect()
}

/// A network of one conv2d or linear layer with a weight of `shape`, for the builder.
fn one_layer(shape: &[usize]) -> (NetworkSpec, usize) {
    match *shape {
        [out_channels, in_channels, kernel, _] => (
            NetworkSpec {
                name: "conv".into(),
                input: [in_channels, kernel, kernel],
                layers: vec![LayerSpec::Conv2d {
                    in_channels,
                    out_channels,
                    kernel,
                    stride: 1,
                    padding: 0,
                }],
            },
            0,
        ),
        [out_features, in_features] => (
            NetworkSpec {
                name: "linear".into(),
                input: [in_features, 1, 1],
                layers: vec![
                    LayerSpec::Flatten,
                    LayerSpec::Linear {
                        in_features,
                        out_features,
                    },
                ],
            },
            1,
        ),
        _ => panic!("a weight shape is 2-D or 4-D, got {shape:?}"),
    }
}

/// The int8 codes and scales the artifact builder stores for `values`.
fn shipped(
    values: &[f32],
    shape: &[usize],
    granularity: Granularity,
) -> Result<(Vec<i8>, Vec<f32>)> {
    let (spec, layer) = one_layer(shape);
    let mut builder = ArtifactBuilder::new(spec);
    builder
        .add(
            &format!("{layer}.weight"),
            values,
            shape,
            Storage::Int8(granularity),
        )?
        .add(
            &format!("{layer}.bias"),
            &vec![0.0; shape[0]],
            &shape[..1],
            Storage::F32,
        )?;
    let artifact = Artifact::from_bytes(&builder.to_bytes()?)?;
    match &artifact
        .layer(layer)
        .context("the layer's parameters")?
        .weight
    {
        WeightValues::Int8 { codes, scales, .. } => {
            let groups = match granularity {
                Granularity::PerChannel => shape[0],
                Granularity::PerTensor => 1,
            };
            // The view repeats a per-tensor scale for every channel.
            Ok((codes.clone(), scales[..groups].to_vec()))
        }
        WeightValues::Float(_) => bail!("{shape:?}: the builder stored floats"),
    }
}

fn assert_close(what: &str, ours: f32, theirs: f64) {
    let relative = (theirs - f64::from(ours)).abs() / theirs.abs();
    assert!(
        relative <= SCALE_RELATIVE_TOLERANCE,
        "{what}: {ours} vs PyTorch {theirs}"
    );
}

#[test]
fn shipped_int8_weights_and_the_dynamic_rule_match_pytorch() -> Result<()> {
    let shapes: [&[usize]; 4] = [&[32, 1, 3, 3], &[64, 32, 3, 3], &[128, 1600], &[10, 128]];
    let mut inputs: Vec<(String, Vec<usize>, Vec<f32>, Granularity)> = Vec::new();
    for (k, shape) in shapes.iter().enumerate() {
        for granularity in [Granularity::PerChannel, Granularity::PerTensor] {
            let label = format!("{shape:?} {granularity:?}");
            inputs.push((
                label,
                shape.to_vec(),
                weights(shape, k as u64 + 1),
                granularity,
            ));
        }
    }
    for (shape, granularity) in [
        (vec![4, 80], Granularity::PerChannel),
        (vec![1, 80], Granularity::PerTensor),
    ] {
        let label = format!("ties {shape:?} {granularity:?}");
        let values = ties(&shape);
        inputs.push((label, shape, values, granularity));
    }
    // Post-ReLU activations: all non-negative, zero point 0.
    inputs.push((
        "non-negative".into(),
        vec![8, 40],
        weights(&[8, 40], 9).iter().map(|v| v.abs()).collect(),
        Granularity::PerChannel,
    ));

    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for (label, shape, values, granularity) in &inputs {
        let (codes, scales) = shipped(values, shape, *granularity)?;
        // The builder's weights are the shared quantizer's.
        let q = quantize_weights(values, shape[0], *granularity, BitWidth::INT8)?;
        assert_eq!((&q.values, &q.scales), (&codes, &scales), "{label}");
        let activation = QParams::dynamic(values);
        if label.starts_with("ties") {
            assert!(scales.iter().all(|&s| s == 1.0), "{label}: {scales:?}");
            assert_eq!(activation, QParams::u8(0.5, 254), "{label}");
        }
        cases.push(json!({
            "shape": shape,
            "values": values,
            "granularity": granularity,
            "scales": scales,
            "activation": {"scale": activation.scale, "zero_point": activation.zero_point},
        }));
        ours.push((codes, scales, activation));
    }
    let mut child = Command::new(python()?)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting Python")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(serde_json::to_string(&cases)?.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("python failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let theirs: Vec<Value> = serde_json::from_slice(&output.stdout)?;
    assert_eq!(theirs.len(), ours.len());
    for (((label, _, values, _), (codes, scales, activation)), t) in
        inputs.iter().zip(&ours).zip(&theirs)
    {
        let their_codes: Vec<i64> = serde_json::from_value(t["codes"].clone())?;
        let our_codes: Vec<i64> = codes.iter().map(|&c| i64::from(c)).collect();
        assert_eq!(their_codes.len(), our_codes.len(), "{label}");
        let mismatches = their_codes
            .iter()
            .zip(&our_codes)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(mismatches, 0, "{label}: {mismatches} weight codes differ");
        let observer_scales: Vec<f64> = serde_json::from_value(t["observer_scales"].clone())?;
        assert_eq!(observer_scales.len(), scales.len(), "{label}");
        for (&theirs, &ours) in observer_scales.iter().zip(scales) {
            assert_close(&format!("{label}: weight scale"), ours, theirs);
        }
        let zero_points: Vec<i64> = serde_json::from_value(t["observer_zero_points"].clone())?;
        assert!(zero_points.iter().all(|&z| z == 0), "{label}");

        let a_scale = t["activation_scale"].as_f64().context("activation scale")?;
        assert_close(
            &format!("{label}: activation scale"),
            activation.scale,
            a_scale,
        );
        assert_eq!(
            t["activation_zero_point"].as_i64(),
            Some(i64::from(activation.zero_point)),
            "{label}"
        );
        let their_codes: Vec<i64> = serde_json::from_value(t["activation_codes"].clone())?;
        let our_codes: Vec<i64> = values
            .iter()
            .map(|&v| i64::from(activation.quantize(v)))
            .collect();
        assert_eq!(their_codes, our_codes, "{label}: activation codes");
    }
    Ok(())
}
