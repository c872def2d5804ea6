//! Our quantization math against PyTorch's, with the Python of the LibTorch environment:
//! per-channel int8 codes against `torch.quantize_per_channel` given our scales, our
//! min-max weight scales against `PerChannelMinMaxObserver` (symmetric, qint8, restricted
//! to -127..=127, the TFLite convention), and our asymmetric u8 activation parameters
//! against `MinMaxObserver` (quint8, per-tensor affine).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use quantization::{BitWidth, QParams, quantize_weights};
use serde_json::{Value, json};

/// Scales are computed in f32 on both sides (`max / 127`); they may differ by float
/// rounding of the division order only.
const SCALE_RELATIVE_TOLERANCE: f64 = 1e-6;

const SCRIPT: &str = r#"
import json, sys, torch
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver
out = []
for case in json.load(sys.stdin):
    w = torch.tensor(case["values"], dtype=torch.float32).reshape(case["shape"])
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8,
                                   qscheme=torch.per_channel_symmetric,
                                   quant_min=-127, quant_max=127)
    obs(w)
    scale, zero_point = obs.calculate_qparams()
    ours = torch.tensor(case["scales"], dtype=torch.float32)
    q = torch.quantize_per_channel(w, ours.double(), torch.zeros(len(ours), dtype=torch.int64),
                                   0, torch.qint8)
    act = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    act(w)
    a_scale, a_zero_point = act.calculate_qparams()
    out.append({
        "observer_scales": scale.tolist(),
        "observer_zero_points": zero_point.tolist(),
        "codes": q.int_repr().flatten().tolist(),
        "activation_scale": a_scale.item(),
        "activation_zero_point": a_zero_point.item(),
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

#[test]
fn int8_weights_and_scales_match_pytorch() -> Result<()> {
    let shapes: [&[usize]; 4] = [&[32, 1, 3, 3], &[64, 32, 3, 3], &[128, 1600], &[10, 128]];
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for (k, shape) in shapes.iter().enumerate() {
        let values = weights(shape, k as u64 + 1);
        let q = quantize_weights(&values, shape[0], true, BitWidth::INT8)?;
        cases.push(json!({"shape": shape, "values": values, "scales": q.scales}));
        let activation = {
            let (lo, hi) = values
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            QParams::asymmetric(lo, hi, BitWidth::INT8)
        };
        ours.push((q, activation));
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
    for ((shape, (q, activation)), t) in shapes.iter().zip(&ours).zip(&theirs) {
        let codes: Vec<i64> = serde_json::from_value(t["codes"].clone())?;
        let our_codes: Vec<i64> = q.values.iter().map(|&c| i64::from(c)).collect();
        let mismatches = codes.iter().zip(&our_codes).filter(|(a, b)| a != b).count();
        assert_eq!(mismatches, 0, "{shape:?}: {mismatches} codes differ");
        let scales: Vec<f64> = serde_json::from_value(t["observer_scales"].clone())?;
        assert_eq!(scales.len(), q.scales.len());
        for (theirs, &ours) in scales.iter().zip(&q.scales) {
            let relative = (theirs - f64::from(ours)).abs() / theirs;
            assert!(
                relative <= SCALE_RELATIVE_TOLERANCE,
                "{shape:?}: scale {ours} vs PyTorch {theirs}"
            );
        }
        let zero_points: Vec<i64> = serde_json::from_value(t["observer_zero_points"].clone())?;
        assert!(zero_points.iter().all(|&z| z == 0), "{shape:?}");
        let a_scale = t["activation_scale"].as_f64().context("activation scale")?;
        let relative = (a_scale - f64::from(activation.scale)).abs() / a_scale;
        assert!(
            relative <= SCALE_RELATIVE_TOLERANCE,
            "{shape:?}: {a_scale} vs {activation:?}"
        );
        assert_eq!(
            t["activation_zero_point"].as_i64(),
            Some(i64::from(activation.zero_point)),
            "{shape:?}"
        );
    }
    Ok(())
}
