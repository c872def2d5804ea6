//! The `runtime` suite: inference throughput of the pure-Rust runtime against libtorch
//! (in process, through tch) and PyTorch (`peers/runtime.py`), on the same trained weights.
//!
//! Two models, an MLP 784-512-512-10 and the teacher CNN (batch norm folded by
//! `models::export`), are trained briefly with tch on MNIST and exported twice: f32, and int8
//! with per-channel symmetric weights (dynamic-range activations). Every engine gets the same
//! artifact and the same test images, batch 1 and 256, all cores:
//!
//! - ours f32 against libtorch f32 (the deployed network with the folded weights, eval mode,
//!   `no_grad`) and against PyTorch f32 (the peer's `nn.Sequential` built by the reader of
//!   `docs/FORMAT.md`);
//! - ours int8 against PyTorch's `quantize_dynamic` int8 (x86/fbgemm): PyTorch quantizes
//!   `nn.Linear` only, so on the CNN its convolutions stay f32 while ours run int8.
//!
//! Each repeat measures all our cases, then runs the peer once for all of its cases; the
//! report gives the median over repeats.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use mnist_data::{Batcher, Dataset, Normalization};
use model_spec::{LayerSpec, NetworkSpec};
use models::{Network, WeightFormat};
use ndarray::{Array4, s};
use serde_json::Value;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::peer;
use crate::report::{BenchReport, CaseResult, Measurement, median};

const BATCHES: [usize; 2] = [1, 256];
const OURS_F32: &str = "tch-mot runtime f32";
const OURS_INT8: &str = "tch-mot runtime int8 (dynamic)";
const LIBTORCH_F32: &str = "libtorch-f32 (tch)";
const PYTORCH_F32: &str = "pytorch-f32";
const PYTORCH_INT8: &str = "pytorch-dynamic-int8";

struct Settings {
    repeats: usize,
    /// Seconds each throughput measurement runs at least.
    min_seconds: f64,
    /// Fraction of the MNIST training set each model trains on, for one epoch.
    train_fraction: f64,
}

impl Settings {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                repeats: 2,
                min_seconds: 0.2,
                train_fraction: 0.02,
            }
        } else {
            Self {
                repeats: 5,
                min_seconds: 1.0,
                train_fraction: 0.1,
            }
        }
    }
}

/// The MLP 784-512-512-10 of the issue.
pub(crate) fn mlp() -> NetworkSpec {
    NetworkSpec {
        name: "mlp_784_512_512_10".into(),
        input: [1, 28, 28],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 784,
                out_features: 512,
            },
            LayerSpec::Relu,
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

/// One model under test: its artifacts, the runtime models and libtorch's deployed network.
struct Subject {
    name: String,
    /// Whether PyTorch's dynamic quantization leaves part of the model (the convolutions) f32.
    has_conv: bool,
    f32_path: PathBuf,
    ours_f32: runtime::Model,
    ours_int8: runtime::Model,
    _libtorch_vs: nn::VarStore,
    libtorch: Network,
}

fn images_tensor(images: &Array4<f32>) -> Result<Tensor> {
    let shape: Vec<i64> = images.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_slice(images.as_slice().context("standard layout")?).view(shape.as_slice()))
}

/// Trains `spec` for one epoch on a stratified subset, exports it and builds every engine.
fn prepare(
    spec: &NetworkSpec,
    data: &Dataset,
    dir: &Path,
    settings: &Settings,
    test: &Array4<f32>,
    test_labels: &[u8],
) -> Result<Subject> {
    let train = data.train.stratified_subset(settings.train_fraction, 1)?;
    let xs = images_tensor(&train.normalized(Normalization::default()))?;
    let ys = Tensor::from_slice(train.labels.as_slice().context("standard layout")?)
        .to_kind(Kind::Int64);
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Network::new(&vs.root(), spec)?;
    let mut opt = nn::Adam::default().build(&vs, 1e-3)?;
    for batch in Batcher::new(train.len(), 64, 1)?.epoch(0) {
        let index = Tensor::from_slice(&batch.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let loss = net
            .forward_t(&xs.index_select(0, &index), true)
            .cross_entropy_for_logits(&ys.index_select(0, &index));
        opt.backward_step(&loss);
    }

    let f32_path = dir.join(format!("{}-f32.safetensors", spec.name));
    let int8_path = dir.join(format!("{}-int8.safetensors", spec.name));
    models::export::artifact(&net, &vs, WeightFormat::F32)?.write(&f32_path)?;
    models::export::artifact(&net, &vs, WeightFormat::Int8DynamicRange)?.write(&int8_path)?;
    let ours_f32 = runtime::Model::load(&f32_path)?;
    let ours_int8 = runtime::Model::load(&int8_path)?;

    // libtorch runs the deployed network too (batch norm folded), with the same weights.
    let libtorch_vs = nn::VarStore::new(Device::Cpu);
    let libtorch = Network::new(&libtorch_vs.root(), &spec.without_batch_norm())?;
    let vars = libtorch_vs.variables();
    tch::no_grad(|| -> Result<()> {
        for p in models::export::deployed_parameters(&net, &vs)? {
            let shape: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
            let mut var = vars[&p.name].shallow_clone();
            var.f_copy_(&Tensor::from_slice(&p.data).view(shape.as_slice()))?;
        }
        Ok(())
    })?;

    for (engine, model) in [(OURS_F32, &ours_f32), (OURS_INT8, &ours_int8)] {
        let logits = model.run(test.view())?;
        let correct = logits
            .rows()
            .into_iter()
            .zip(test_labels)
            .filter(|(row, label)| {
                let best = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i);
                best == Some(usize::from(**label))
            })
            .count();
        eprintln!(
            "{}: {engine} test accuracy {:.1}% on {} images",
            spec.name,
            100.0 * correct as f64 / test_labels.len() as f64,
            test_labels.len()
        );
    }
    Ok(Subject {
        name: spec.name.clone(),
        has_conv: spec
            .layers
            .iter()
            .any(|l| matches!(l, LayerSpec::Conv2d { .. })),
        f32_path,
        ours_f32,
        ours_int8,
        _libtorch_vs: libtorch_vs,
        libtorch,
    })
}

/// Samples per second of `f` (which processes `batch` samples), after a warm-up call, over
/// at least `min_seconds` and three calls.
fn throughput(batch: usize, min_seconds: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let start = Instant::now();
    let mut calls = 0usize;
    while calls < 3 || start.elapsed().as_secs_f64() < min_seconds {
        f()?;
        calls += 1;
    }
    Ok((batch * calls) as f64 / start.elapsed().as_secs_f64())
}

/// Which measurement: (model, batch, engine).
type Key = (String, usize, &'static str);

/// Every measurement of one repeat.
type Round = Vec<(Key, f64)>;

fn measure_ours(subjects: &[Subject], images: &Array4<f32>, settings: &Settings) -> Result<Round> {
    let mut round = Round::new();
    for subject in subjects {
        for batch in BATCHES {
            let x = images.slice(s![..batch, .., .., ..]);
            let xt = images_tensor(&x.to_owned())?;
            let key = |engine| (subject.name.clone(), batch, engine);
            let ours_f32 = throughput(batch, settings.min_seconds, || {
                subject.ours_f32.run(x).map(drop).map_err(Into::into)
            })?;
            round.push((key(OURS_F32), ours_f32));
            let ours_int8 = throughput(batch, settings.min_seconds, || {
                subject.ours_int8.run(x).map(drop).map_err(Into::into)
            })?;
            round.push((key(OURS_INT8), ours_int8));
            let libtorch = tch::no_grad(|| {
                throughput(batch, settings.min_seconds, || {
                    drop(subject.libtorch.forward_t(&xt, false));
                    Ok(())
                })
            })?;
            round.push((key(LIBTORCH_F32), libtorch));
        }
    }
    Ok(round)
}

fn measure_peer(
    subjects: &[Subject],
    input: &Path,
    threads: usize,
    settings: &Settings,
) -> Result<Round> {
    let batches: Vec<String> = BATCHES.iter().map(usize::to_string).collect();
    let mut args = vec![
        "--input".into(),
        input.display().to_string(),
        "--threads".into(),
        threads.to_string(),
        "--min-seconds".into(),
        settings.min_seconds.to_string(),
        "--batches".into(),
        batches.join(","),
    ];
    args.extend(
        subjects
            .iter()
            .map(|s| format!("{}={}", s.name, s.f32_path.display())),
    );
    let answer = peer::run("runtime.py", &args)?;
    let mut round = Round::new();
    for r in answer["results"].as_array().context("peer results")? {
        let model = r["model"].as_str().context("peer model")?.to_string();
        let batch = r["batch"].as_u64().context("peer batch")? as usize;
        for (field, engine) in [("f32", PYTORCH_F32), ("int8", PYTORCH_INT8)] {
            let value = r[field].as_f64().context("peer throughput")?;
            round.push(((model.clone(), batch, engine), value));
        }
    }
    if let Some(torch) = answer.get("torch").and_then(Value::as_str) {
        eprintln!(
            "peer: torch {torch}, {} threads, quantized engine {}",
            answer["threads"], answer["engine"]
        );
    }
    Ok(round)
}

pub fn run(quick: bool, threads: Option<usize>) -> Result<BenchReport> {
    let settings = Settings::new(quick);
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = threads.unwrap_or(all);
    tch::set_num_threads(i32::try_from(threads).unwrap_or(1));
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist");
    let data = Dataset::load(&data_dir).context("loading the bundled MNIST")?;
    let rows = BATCHES.iter().copied().max().unwrap_or(1);
    let test = data.test.select(&(0..rows).collect::<Vec<_>>());
    let images = test.normalized(Normalization::default());
    let labels = test.labels.to_vec();

    let dir = std::env::temp_dir().join(format!("tch-mot-bench-runtime-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let input = dir.join("input.f32");
    let bytes: Vec<u8> = images.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&input, bytes).context("writing the bench input")?;

    let mut subjects = Vec::new();
    for spec in [mlp(), NetworkSpec::teacher_cnn()] {
        eprintln!("training {} for one epoch", spec.name);
        subjects.push(prepare(&spec, &data, &dir, &settings, &images, &labels)?);
    }

    let mut samples: Vec<(Key, Vec<f64>)> = Vec::new();
    for repeat in 0..settings.repeats {
        eprintln!("repeat {}/{}", repeat + 1, settings.repeats);
        let mut round = measure_ours(&subjects, &images, &settings)?;
        round.extend(measure_peer(&subjects, &input, threads, &settings)?);
        for (key, value) in round {
            match samples.iter_mut().find(|(k, _)| *k == key) {
                Some((_, values)) => values.push(value),
                None => samples.push((key, vec![value])),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    let medians: Vec<_> = samples
        .into_iter()
        .map(|(key, mut values)| (key, median(&mut values)))
        .collect();
    let get = |model: &str, batch: usize, engine: &'static str| -> Result<Measurement> {
        let value = medians
            .iter()
            .find(|((m, b, e), _)| m == model && *b == batch && *e == engine)
            .map(|(_, v)| *v);
        match value {
            Some(samples_per_second) => Ok(Measurement {
                engine: engine.into(),
                samples_per_second,
            }),
            None => bail!("no measurement of {engine} on {model} at batch {batch}"),
        }
    };
    let mut results = Vec::new();
    for subject in &subjects {
        for batch in BATCHES {
            let case = format!("{} batch {batch}", subject.name);
            let name = subject.name.as_str();
            for (ours, peer) in [
                (OURS_F32, LIBTORCH_F32),
                (OURS_F32, PYTORCH_F32),
                (OURS_INT8, PYTORCH_INT8),
            ] {
                let mut peer = get(name, batch, peer)?;
                if peer.engine == PYTORCH_INT8 && subject.has_conv {
                    peer.engine.push_str(" (linear only, convs f32)");
                }
                results.push(CaseResult::new(case.clone(), get(name, batch, ours)?, peer));
            }
        }
    }
    let machine = if threads == all {
        peer::machine()
    } else {
        format!("{}, {threads} threads", peer::machine())
    };
    Ok(BenchReport::new("runtime", machine, results))
}
