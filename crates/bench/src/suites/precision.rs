//! The `precision` suite: training throughput of our precision policies (`models::Network`
//! with `Network::with_policy`, `loss_scaling` on float16) against PyTorch's autocast
//! (`peers/precision.py`), on the same networks, batch size, optimizer and step counts.
//!
//! Cases are `<network>/<policy>`: float32 and the device's mixed policy (bfloat16 on the
//! CPU, float16 with dynamic loss scaling on CUDA) for the teacher CNN and a 784-1024-1024-10
//! MLP. Ours and the peer alternate, repeat by repeat, and each side's median counts, so
//! that a change in the machine's load hits both. Besides the shared table the suite prints
//! each side's speed-up of the mixed policy over float32.

use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use loss_scaling::{DynamicConfig, LossScaler};
use models::{LayerSpec, Network, NetworkSpec, Policy};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Cuda, Device, Kind, Tensor};

use crate::peer;
use crate::report::{BenchReport, CaseResult, Measurement, median};

/// Batch size of every case: the experiment's.
const BATCH: usize = 128;
/// Adam's learning rate: the experiment's peak rate (constant here, on both sides).
const LEARNING_RATE: f64 = 3e-3;
/// Distinct synthetic batches cycled through (the peer uses the same number).
const POOL_BATCHES: usize = 8;

/// Steps, warm-up steps (not timed: first calls pick kernels and allocate) and repeats.
#[derive(Debug, Clone, Copy)]
struct Plan {
    steps: usize,
    warmup: usize,
    repeats: usize,
}

const FULL: Plan = Plan {
    steps: 60,
    warmup: 5,
    repeats: 3,
};
const QUICK: Plan = Plan {
    steps: 8,
    warmup: 2,
    repeats: 1,
};

/// The MLP of the suite: 784-1024-1024-10 (1.9M parameters), dense layers only.
fn mlp1024() -> NetworkSpec {
    NetworkSpec {
        name: "mlp1024".into(),
        input: [1, 28, 28],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 784,
                out_features: 1024,
            },
            LayerSpec::Relu,
            LayerSpec::Linear {
                in_features: 1024,
                out_features: 1024,
            },
            LayerSpec::Relu,
            LayerSpec::Linear {
                in_features: 1024,
                out_features: 10,
            },
        ],
    }
}

/// The mixed policy measured on `device`: what PyTorch's autocast does there.
fn mixed_policy(device: Device) -> Policy {
    if device.is_cuda() {
        Policy::MixedFloat16
    } else {
        Policy::MixedBfloat16
    }
}

pub fn run(quick: bool) -> Result<BenchReport> {
    let plan = if quick { QUICK } else { FULL };
    let device = if Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let threads = tch::get_num_threads();
    let networks = [NetworkSpec::teacher_cnn(), mlp1024()];
    let policies = [Policy::Float32, mixed_policy(device)];
    let cases: Vec<(NetworkSpec, Policy)> = networks
        .iter()
        .flat_map(|spec| policies.map(|policy| (spec.clone(), policy)))
        .collect();
    let names: Vec<String> = cases
        .iter()
        .map(|(spec, policy)| format!("{}/{policy}", spec.name))
        .collect();

    let mut ours = vec![Vec::new(); cases.len()];
    let mut peers = vec![Vec::new(); cases.len()];
    let mut torch_version = String::new();
    for repeat in 0..plan.repeats {
        eprintln!("repeat {}/{}: ours", repeat + 1, plan.repeats);
        for (i, (spec, policy)) in cases.iter().enumerate() {
            let rate = measure_ours(spec, *policy, device, plan)
                .with_context(|| format!("training {} in ours", names[i]))?;
            eprintln!("  {}: {rate:.0} samples/s", names[i]);
            ours[i].push(rate);
        }
        eprintln!("repeat {}/{}: PyTorch", repeat + 1, plan.repeats);
        let answer = peer::run(
            "precision.py",
            &[
                format!("--device={}", if device.is_cuda() { "cuda" } else { "cpu" }),
                format!("--threads={threads}"),
                format!("--batch={BATCH}"),
                format!("--steps={}", plan.steps),
                format!("--warmup={}", plan.warmup),
                format!("--lr={LEARNING_RATE}"),
                format!("--cases={}", names.join(",")),
            ],
        )?;
        torch_version = answer["torch"].as_str().unwrap_or("?").to_string();
        for (i, name) in names.iter().enumerate() {
            let Some(rate) = answer["results"][name].as_f64() else {
                bail!("the PyTorch peer gave no result for {name}: {answer}");
            };
            eprintln!("  {name}: {rate:.0} samples/s");
            peers[i].push(rate);
        }
    }

    let results: Vec<CaseResult> = names
        .iter()
        .zip(ours.iter_mut().zip(peers.iter_mut()))
        .map(|(name, (ours, peer))| {
            CaseResult::new(
                name.clone(),
                Measurement {
                    engine: "tch-mot (libtorch)".into(),
                    samples_per_second: median(ours),
                },
                Measurement {
                    engine: format!("pytorch {torch_version} autocast"),
                    samples_per_second: median(peer),
                },
            )
        })
        .collect();
    print!("{}", speedups(&results, mixed_policy(device)));
    let machine = if device.is_cuda() {
        format!("CUDA device 0, host {}", peer::machine())
    } else {
        format!("{}, {threads} threads", peer::machine())
    };
    Ok(BenchReport::new("precision", machine, results))
}

/// Each side's training speed-up of `mixed` over float32, per network, as a Markdown table.
fn speedups(results: &[CaseResult], mixed: Policy) -> String {
    let mut out = format!(
        "speed-up of {mixed} over float32 (training samples/s)\n\n| network | ours | PyTorch autocast |\n|---|---:|---:|\n"
    );
    let find = |name: &str| results.iter().find(|r| r.case == name);
    let mut networks: Vec<&str> = results
        .iter()
        .filter_map(|r| r.case.split_once('/').map(|(net, _)| net))
        .collect();
    networks.dedup();
    for net in networks {
        if let (Some(base), Some(mixed)) = (
            find(&format!("{net}/float32")),
            find(&format!("{net}/{mixed}")),
        ) {
            out.push_str(&format!(
                "| {net} | {:.2}x | {:.2}x |\n",
                mixed.ours.samples_per_second / base.ours.samples_per_second,
                mixed.peer.samples_per_second / base.peer.samples_per_second,
            ));
        }
    }
    out.push('\n');
    out
}

/// Our training throughput (samples/s) of `spec` under `policy`: the loop of the
/// experiment (Adam, cross-entropy, training mode) on synthetic data, float16 with
/// PyTorch's `GradScaler` defaults as the peer.
fn measure_ours(spec: &NetworkSpec, policy: Policy, device: Device, plan: Plan) -> Result<f64> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let net = Network::with_policy(&vs.root(), spec, policy)?;
    let mut optimizer = nn::Adam::default().build(&vs, LEARNING_RATE)?;
    let mut scaler = policy
        .needs_loss_scaling()
        .then(|| LossScaler::dynamic(DynamicConfig::pytorch()))
        .transpose()?;
    let pool = (POOL_BATCHES * BATCH) as i64;
    let images = Tensor::randn([pool, 1, 28, 28], (Kind::Float, device));
    let labels = Tensor::randint(10, [pool], (Kind::Int64, device));
    let mut start = Instant::now();
    let mut last_loss = None;
    for step in 0..plan.warmup + plan.steps {
        if step == plan.warmup {
            synchronize(device);
            start = Instant::now();
        }
        let offset = ((step % POOL_BATCHES) * BATCH) as i64;
        let xs = images.narrow(0, offset, BATCH as i64);
        let ys = labels.narrow(0, offset, BATCH as i64);
        let loss = net.forward_t(&xs, true).cross_entropy_for_logits(&ys);
        match scaler.as_mut() {
            None => optimizer.backward_step(&loss),
            Some(scaler) => {
                optimizer.zero_grad();
                scaler.scale(&loss).backward();
                scaler.step(&mut optimizer)?;
            }
        }
        last_loss = Some(loss);
    }
    // Waits for the last step, as the peer does.
    if let Some(loss) = last_loss {
        let _ = loss.f_double_value(&[])?;
    }
    synchronize(device);
    Ok((plan.steps * BATCH) as f64 / start.elapsed().as_secs_f64())
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        Cuda::synchronize(index as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mlp_is_valid_and_has_two_1024_wide_hidden_layers() {
        let spec = mlp1024();
        assert_eq!(spec.validate().unwrap(), vec![10]);
        assert_eq!(
            spec.param_count(),
            784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
        );
    }

    #[test]
    fn speedups_divide_mixed_by_float32_on_each_side() {
        let m = |engine: &str, rate: f64| Measurement {
            engine: engine.into(),
            samples_per_second: rate,
        };
        let results = vec![
            CaseResult::new("mlp/float32", m("ours", 100.0), m("torch", 200.0)),
            CaseResult::new("mlp/mixed_bfloat16", m("ours", 250.0), m("torch", 300.0)),
        ];
        let table = speedups(&results, Policy::MixedBfloat16);
        assert!(table.contains("| mlp | 2.50x | 1.50x |"), "{table}");
    }

    /// A few real steps of each policy of the CPU (seconds, no peer): the loop runs and
    /// measures something.
    #[test]
    fn our_loop_measures_a_positive_rate() {
        let plan = Plan {
            steps: 2,
            warmup: 1,
            repeats: 1,
        };
        for policy in [Policy::Float32, Policy::MixedBfloat16] {
            let rate = measure_ours(&mlp1024(), policy, Device::Cpu, plan).unwrap();
            assert!(rate > 0.0, "{policy}: {rate}");
        }
    }
}
