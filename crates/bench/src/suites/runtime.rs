//! The `runtime` suite: the pure-Rust runtime against the engines people deploy with, on the
//! artifacts of an experiment run (`--run`, default `results/latest`).
//!
//! Models: the teacher, the distilled student and the pipeline's final model, each in f32,
//! dynamic-range int8 and full int8 where the run has them (the pipeline model is full int8
//! only; the full-int8 teacher and student are the static int8 of the calibrator the run
//! selected). Batch 1 (latency) and 256 (throughput), on the same normalized MNIST test
//! images, every engine with the same thread count. Peers:
//!
//! - TensorFlow Lite with XNNPACK (`peers/tflite.py`): a Keras model holding the artifact's
//!   float weights, converted by the TFLite converter to f32, dynamic-range int8 and full int8
//!   (its own calibration on training images normalized like ours);
//! - ONNX Runtime (`peers/ort.py`) and tract (in process) on the ONNX export of the very
//!   artifact ours runs (`onnx.rs`);
//! - libtorch through tch, f32 only: the artifact's weights in the tch network.
//!
//! The Python peers are long-lived servers that keep their models built; each repeat
//! measures every engine on every case, the engines' order rotating from one repeat to the
//! next. The report gives medians and the range over the repeats, and each engine's accuracy
//! on the full test set next to ours.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use mnist_data::{Dataset, Normalization};
use models::Network;
use ndarray::{Array2, Array4, ArrayView4, Axis, s};
use serde_json::{Value, json};
use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};

use crate::onnx;
use crate::peer::{self, Server};
use crate::report::{BenchReport, CaseDetail, CaseResult, Measurement, median};

const BATCHES: [usize; 2] = [1, 256];
/// Images per call when scoring accuracy (every engine alike).
const ACCURACY_BATCH: usize = 500;
/// Training images the TFLite converter calibrates full int8 on.
const CALIBRATION_IMAGES: usize = 300;

/// Options of the suite.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub threads: Option<usize>,
    /// The experiment run whose artifacts are measured.
    pub run: PathBuf,
}

struct Settings {
    repeats: usize,
    /// Seconds each throughput measurement runs at least.
    min_seconds: f64,
}

impl Settings {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                repeats: 2,
                min_seconds: 0.2,
            }
        } else {
            Self {
                repeats: 5,
                min_seconds: 1.0,
            }
        }
    }
}

/// Which model of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Subject {
    Teacher,
    Student,
    Pipeline,
}

impl Subject {
    fn label(self) -> &'static str {
        match self {
            Self::Teacher => "teacher",
            Self::Student => "distilled student",
            Self::Pipeline => "pipeline (pruned, QAT)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Teacher => "teacher",
            Self::Student => "student",
            Self::Pipeline => "pipeline",
        }
    }
}

/// How the model computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scheme {
    F32,
    /// Int8 weights, activations quantized per batch at run time.
    DynamicInt8,
    /// Int8 weights and activations, calibrated ahead of time.
    Int8,
}

impl Scheme {
    fn label(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::DynamicInt8 => "dynamic int8",
            Self::Int8 => "full int8",
        }
    }

    /// The scheme's name in the peers' requests.
    fn key(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::DynamicInt8 => "dynamic_int8",
            Self::Int8 => "int8",
        }
    }
}

/// The engines, ours first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Engine {
    Ours,
    Libtorch,
    Tflite,
    OnnxRuntime,
    Tract,
}

const PEERS: [Engine; 4] = [
    Engine::Libtorch,
    Engine::Tflite,
    Engine::OnnxRuntime,
    Engine::Tract,
];

impl Engine {
    fn label(self) -> &'static str {
        match self {
            Self::Ours => "tch-mot runtime",
            Self::Libtorch => "libtorch (tch)",
            Self::Tflite => "TFLite XNNPACK",
            Self::OnnxRuntime => "ONNX Runtime",
            Self::Tract => "tract",
        }
    }
}

/// One model in one scheme: our runtime's model and what the peers need.
struct Case {
    subject: Subject,
    scheme: Scheme,
    artifact: PathBuf,
    /// The artifact whose (dequantized) float weights the TFLite converter starts from.
    float_weights: PathBuf,
    ours: runtime::Model,
    /// The ONNX export of `artifact`, or why there is none.
    onnx: std::result::Result<PathBuf, String>,
}

impl Case {
    fn key(&self) -> String {
        format!("{}/{}", self.subject.key(), self.scheme.key())
    }
}

/// The artifact files of the run, per subject and scheme.
fn discover(run: &Path) -> Result<Vec<(Subject, Scheme, PathBuf, PathBuf)>> {
    let teacher = run.join("teacher_float32.safetensors");
    if !teacher.is_file() {
        bail!(
            "{} holds no experiment run (no teacher_float32.safetensors): run \
             `cargo xtask experiment` (or `cargo xtask experiment --quick` for a quick one) \
             first, or pass --run <the run's folder>",
            run.display()
        );
    }
    let report: Option<Value> = std::fs::read(run.join("report.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let mut found = Vec::new();
    for (subject, f32_file) in [
        (Subject::Teacher, teacher),
        (
            Subject::Student,
            run.join("student_distilled_float32.safetensors"),
        ),
    ] {
        if !f32_file.is_file() {
            eprintln!(
                "{} has no {}: no {} cases",
                run.display(),
                f32_file.display(),
                subject.label()
            );
            continue;
        }
        let name = runtime::Model::load(&f32_file)?.graph().name.clone();
        let quantized = |variant: &str| {
            run.join("quantization")
                .join(format!("{name}_{variant}.safetensors"))
        };
        let calibrator = selected_calibrator(report.as_ref(), &name);
        found.push((subject, Scheme::F32, f32_file.clone(), f32_file.clone()));
        for (scheme, file) in [
            (Scheme::DynamicInt8, quantized("dynamic_int8")),
            (
                Scheme::Int8,
                quantized(&format!("static_int8_{calibrator}")),
            ),
        ] {
            if file.is_file() {
                found.push((subject, scheme, file, f32_file.clone()));
            } else {
                eprintln!(
                    "no {}: no {} {} case",
                    file.display(),
                    subject.label(),
                    scheme.label()
                );
            }
        }
    }
    let pipeline = run
        .join("pipeline")
        .join("distilled_pruned_int8.safetensors");
    if pipeline.is_file() {
        found.push((Subject::Pipeline, Scheme::Int8, pipeline.clone(), pipeline));
    } else {
        eprintln!("no {}: no pipeline case", pipeline.display());
    }
    Ok(found)
}

/// The calibrator the run's report marks as selected for `model`'s static int8 (the row
/// whose calibration is selected; a schema 1 report flagged the row itself), or the
/// experiment's default.
fn selected_calibrator(report: Option<&Value>, model: &str) -> String {
    let prefix = "static_int8_";
    let selected =
        |row: &Value| row["selected"] == true || row["detail"]["calibration"]["selected"] == true;
    report
        .and_then(|r| r["rows"].as_array())
        .into_iter()
        .flatten()
        .filter(|row| row["model"] == model && selected(row))
        .find_map(|row| {
            row["variant"]
                .as_str()?
                .strip_prefix(prefix)
                .map(String::from)
        })
        .unwrap_or_else(|| "percentile".into())
}

/// Test images and labels, in the files the Python peers read.
struct Data {
    test: Array4<f32>,
    labels: Vec<u8>,
    test_file: PathBuf,
    labels_file: PathBuf,
    calibration_file: PathBuf,
}

fn write_f32(path: &Path, values: &Array4<f32>) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn load_data(dir: &Path) -> Result<Data> {
    let data_dir = mnist_data::data_dir(None)?;
    let data = Dataset::load(&data_dir)
        .with_context(|| format!("loading the test images from {}", data_dir.display()))?;
    let norm = Normalization::default();
    let test = data.test.normalized(norm);
    let labels = data.test.labels.to_vec();
    let fraction = CALIBRATION_IMAGES as f64 / data.train.len() as f64;
    let calibration = data.train.stratified_subset(fraction, 1)?.normalized(norm);
    let out = Data {
        test_file: dir.join("test.f32"),
        labels_file: dir.join("labels.u8"),
        calibration_file: dir.join("calibration.f32"),
        test,
        labels,
    };
    write_f32(&out.test_file, &out.test)?;
    std::fs::write(&out.labels_file, &out.labels).context("writing the test labels")?;
    write_f32(&out.calibration_file, &calibration)?;
    Ok(out)
}

/// Share of rows whose largest logit is the label.
fn correct(logits: &Array2<f32>, labels: &[u8]) -> usize {
    logits
        .rows()
        .into_iter()
        .zip(labels)
        .filter(|(row, label)| {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i);
            best == Some(usize::from(**label))
        })
        .count()
}

/// Accuracy of `logits_of` on the test set, ACCURACY_BATCH images per call.
fn accuracy(
    data: &Data,
    mut logits_of: impl FnMut(ArrayView4<'_, f32>) -> Result<Array2<f32>>,
) -> Result<f64> {
    let mut right = 0;
    for (chunk, labels) in data
        .test
        .axis_chunks_iter(Axis(0), ACCURACY_BATCH)
        .zip(data.labels.chunks(ACCURACY_BATCH))
    {
        right += correct(&logits_of(chunk)?, labels);
    }
    Ok(right as f64 / data.labels.len() as f64)
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

fn tensor(images: ArrayView4<'_, f32>) -> Tensor {
    let shape: Vec<i64> = images.shape().iter().map(|&d| d as i64).collect();
    let owned = images.as_standard_layout();
    Tensor::from_slice(owned.as_slice().unwrap_or_default()).view(shape.as_slice())
}

/// libtorch running an f32 artifact: the deployed network with the artifact's tensors.
struct Libtorch {
    _vs: nn::VarStore,
    net: Network,
}

impl Libtorch {
    fn load(case: &Case) -> Result<Self> {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let network = case.ours.network().with_context(|| {
            format!(
                "{}: libtorch runs sequential networks here",
                case.artifact.display()
            )
        })?;
        let net = Network::new(&vs.root(), network)?;
        vs.load(&case.artifact)
            .with_context(|| format!("loading {} into libtorch", case.artifact.display()))?;
        Ok(Self { _vs: vs, net })
    }

    fn logits(&self, images: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        let out = tch::no_grad(|| self.net.forward_t(&tensor(images), false));
        let rows = out.size()[0] as usize;
        let values = Vec::<f32>::try_from(out.flatten(0, -1))?;
        Ok(Array2::from_shape_vec(
            (rows, values.len() / rows.max(1)),
            values,
        )?)
    }
}

/// Which measurement: (case index, batch, engine).
type Key = (usize, usize, Engine);

/// What the engines other than ours have to say: accuracy per case, or why they cannot run.
#[derive(Default)]
struct PeerState {
    accuracy: BTreeMap<(usize, Engine), f64>,
    unavailable: BTreeMap<Engine, String>,
    notes: Vec<String>,
}

/// A Python peer speaking `peers/serve.py`'s protocol, with the cases it prepared.
struct PythonPeer {
    engine: Engine,
    server: Server,
    /// The key it was given for each case it runs.
    keys: Vec<(usize, String)>,
}

impl PythonPeer {
    fn measure(&mut self, min_seconds: f64) -> Result<Vec<(Key, f64)>> {
        let answer = self
            .server
            .request(&json!({"op": "measure", "min_seconds": min_seconds}))?;
        let mut out = Vec::new();
        for r in answer["results"].as_array().context("peer results")? {
            let key = r["key"].as_str().context("peer key")?;
            let batch = r["batch"].as_u64().context("peer batch")? as usize;
            let value = r["samples_per_second"].as_f64().context("peer value")?;
            let (case, _) = self
                .keys
                .iter()
                .find(|(_, k)| k == key)
                .with_context(|| format!("the peer answered for an unknown case {key}"))?;
            out.push(((*case, batch, self.engine), value));
        }
        Ok(out)
    }
}

fn start_tflite(
    python: &Path,
    cases: &[Case],
    data: &Data,
    dir: &Path,
    threads: usize,
    state: &mut PeerState,
) -> Result<PythonPeer> {
    let mut keys = Vec::new();
    let mut models = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        keys.push((i, case.key()));
        models.push(json!({
            "key": case.key(),
            "artifact": case.float_weights,
            "scheme": case.scheme.key(),
        }));
    }
    eprintln!(
        "TFLite: converting {} models (once per bench run)",
        models.len()
    );
    let mut server = Server::start(python, "tflite.py")?;
    let answer = server.request(&json!({
        "op": "prepare",
        "threads": threads,
        "batches": BATCHES,
        "cache": dir,
        "test": data.test_file,
        "labels": data.labels_file,
        "calibration": data.calibration_file,
        "models": models,
    }))?;
    let peer = PythonPeer {
        engine: Engine::Tflite,
        server,
        keys,
    };
    record_accuracy(&peer, &answer, state)?;
    let undelegated: Vec<&String> = answer["delegated"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| **v != true)
        .map(|(k, _)| k)
        .collect();
    state.notes.push(format!(
        "TFLite: tensorflow {} (tf-keras {}), delegate {}, {} threads{}",
        answer["versions"]["tensorflow"].as_str().unwrap_or("?"),
        answer["versions"]["tf_keras"].as_str().unwrap_or("?"),
        answer["delegate"].as_str().unwrap_or("?"),
        answer["threads"],
        if undelegated.is_empty() {
            String::new()
        } else {
            format!("; no delegate node in {undelegated:?}")
        }
    ));
    Ok(peer)
}

fn start_ort(
    python: &Path,
    cases: &[Case],
    data: &Data,
    threads: usize,
    state: &mut PeerState,
) -> Result<PythonPeer> {
    let mut keys = Vec::new();
    let mut models = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        if let Ok(file) = &case.onnx {
            keys.push((i, case.key()));
            models.push(json!({"key": case.key(), "onnx": file}));
        }
    }
    if models.is_empty() {
        bail!("no ONNX export to run");
    }
    let mut server = Server::start(python, "ort.py")?;
    let answer = server.request(&json!({
        "op": "prepare",
        "threads": threads,
        "batches": BATCHES,
        "test": data.test_file,
        "labels": data.labels_file,
        "models": models,
    }))?;
    let peer = PythonPeer {
        engine: Engine::OnnxRuntime,
        server,
        keys,
    };
    record_accuracy(&peer, &answer, state)?;
    state.notes.push(format!(
        "ONNX Runtime {}: {}, graph optimization ORT_ENABLE_ALL, {} intra-op threads",
        answer["versions"]["onnxruntime"].as_str().unwrap_or("?"),
        answer["providers"],
        answer["threads"]
    ));
    Ok(peer)
}

fn record_accuracy(peer: &PythonPeer, answer: &Value, state: &mut PeerState) -> Result<()> {
    for (case, key) in &peer.keys {
        let accuracy = answer["accuracy"][key.as_str()]
            .as_f64()
            .with_context(|| format!("no accuracy of {key} from {}", peer.engine.label()))?;
        state.accuracy.insert((*case, peer.engine), accuracy);
    }
    Ok(())
}

pub fn run(options: &Options) -> Result<BenchReport> {
    let settings = Settings::new(options.quick);
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = options.threads.unwrap_or(all);
    tch::set_num_threads(i32::try_from(threads).unwrap_or(1));
    onnx::set_threads(threads);

    let found = discover(&options.run)?;
    let dir = std::env::temp_dir().join(format!("tch-mot-bench-runtime-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = measure_all(options, &settings, threads, found, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let (cases, samples, state) = result?;
    Ok(report(
        &cases, &samples, &state, threads, all, &settings, options,
    ))
}

type Samples = BTreeMap<Key, Vec<f64>>;

fn measure_all(
    options: &Options,
    settings: &Settings,
    threads: usize,
    found: Vec<(Subject, Scheme, PathBuf, PathBuf)>,
    dir: &Path,
) -> Result<(Vec<Case>, Samples, PeerState)> {
    let data = load_data(dir)?;
    let mut state = PeerState::default();
    let mut cases = Vec::new();
    for (subject, scheme, artifact, float_weights) in found {
        let ours = runtime::Model::load(&artifact)?;
        let bytes = std::fs::read(&artifact)?;
        let onnx = onnx::export(&bytes).and_then(|model| {
            let file = dir.join(format!("{}-{}.onnx", subject.key(), scheme.key()));
            std::fs::write(&file, model).map_err(|e| format!("writing {}: {e}", file.display()))?;
            Ok(file)
        });
        let case = Case {
            subject,
            scheme,
            artifact,
            float_weights,
            ours,
            onnx,
        };
        let index = cases.len();
        let ours_accuracy = accuracy(&data, |x| Ok(case.ours.run(x)?))?;
        state.accuracy.insert((index, Engine::Ours), ours_accuracy);
        eprintln!(
            "{} {} ({}): ours {:.2}% on {} test images",
            subject.label(),
            scheme.label(),
            case.artifact.display(),
            100.0 * ours_accuracy,
            data.labels.len()
        );
        cases.push(case);
    }
    if cases.is_empty() {
        bail!("{}: no artifact to measure", options.run.display());
    }

    // libtorch: the f32 cases.
    let mut libtorch = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        if case.scheme == Scheme::F32 {
            let net = Libtorch::load(case)?;
            let acc = accuracy(&data, |x| net.logits(x))?;
            state.accuracy.insert((i, Engine::Libtorch), acc);
            libtorch.push((i, net));
        }
    }
    state.notes.push(format!(
        "libtorch through tch, f32 only (the artifact's tensors in the tch network), \
         {threads} intra-op threads"
    ));

    // The Python peers.
    let python = peer::peer_python();
    let mut tflite = None;
    let mut ort = None;
    match &python {
        None => {
            let why = format!(
                "{} is not set: run through `cargo xtask bench runtime`, which installs the \
                 peers and sets it",
                peer::PEER_PYTHON_VAR
            );
            state.unavailable.insert(Engine::Tflite, why.clone());
            state.unavailable.insert(Engine::OnnxRuntime, why);
        }
        Some(python) => {
            match start_tflite(python, &cases, &data, dir, threads, &mut state) {
                Ok(p) => tflite = Some(p),
                Err(e) => {
                    state.unavailable.insert(Engine::Tflite, format!("{e:#}"));
                }
            }
            match start_ort(python, &cases, &data, threads, &mut state) {
                Ok(p) => ort = Some(p),
                Err(e) => {
                    state
                        .unavailable
                        .insert(Engine::OnnxRuntime, onnx_reason(&cases, e));
                }
            }
        }
    }

    // tract, in process.
    let mut tract = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let Ok(file) = &case.onnx else { continue };
        match onnx::Tract::load(file, &BATCHES, ACCURACY_BATCH) {
            Ok(model) => {
                let acc = accuracy(&data, |x| model.run(x))?;
                state.accuracy.insert((i, Engine::Tract), acc);
                tract.push((i, model));
            }
            Err(e) => {
                state
                    .unavailable
                    .insert(Engine::Tract, format!("{}: {e:#}", case.key()));
            }
        }
    }
    if tract.is_empty() && !state.unavailable.contains_key(&Engine::Tract) {
        state.unavailable.insert(
            Engine::Tract,
            onnx_reason(&cases, anyhow::anyhow!("no model")),
        );
    }
    if !tract.is_empty() {
        state.notes.push(format!("tract {}", onnx::TRACT_VERSION));
    }

    let mut samples = Samples::new();
    let engines = [
        Engine::Ours,
        Engine::Libtorch,
        Engine::Tflite,
        Engine::OnnxRuntime,
        Engine::Tract,
    ];
    for repeat in 0..settings.repeats {
        eprintln!("repeat {}/{}", repeat + 1, settings.repeats);
        let mut round: Vec<(Key, f64)> = Vec::new();
        // Every engine goes first in turn, so that none always runs on a fresh machine.
        for k in 0..engines.len() {
            match engines[(repeat + k) % engines.len()] {
                Engine::Ours => {
                    for (i, case) in cases.iter().enumerate() {
                        for batch in BATCHES {
                            let x = data.test.slice(s![..batch, .., .., ..]);
                            let v = throughput(batch, settings.min_seconds, || {
                                case.ours.run(x).map(drop).map_err(Into::into)
                            })?;
                            round.push(((i, batch, Engine::Ours), v));
                        }
                    }
                }
                Engine::Libtorch => {
                    for (i, net) in &libtorch {
                        for batch in BATCHES {
                            let x = tensor(data.test.slice(s![..batch, .., .., ..]));
                            let v = tch::no_grad(|| {
                                throughput(batch, settings.min_seconds, || {
                                    drop(net.net.forward_t(&x, false));
                                    Ok(())
                                })
                            })?;
                            round.push(((*i, batch, Engine::Libtorch), v));
                        }
                    }
                }
                Engine::Tflite => {
                    if let Some(p) = &mut tflite {
                        round.extend(p.measure(settings.min_seconds)?);
                    }
                }
                Engine::OnnxRuntime => {
                    if let Some(p) = &mut ort {
                        round.extend(p.measure(settings.min_seconds)?);
                    }
                }
                Engine::Tract => {
                    for (i, model) in &tract {
                        for batch in BATCHES {
                            let x = data.test.slice(s![..batch, .., .., ..]);
                            let v =
                                throughput(batch, settings.min_seconds, || model.run(x).map(drop))?;
                            round.push(((*i, batch, Engine::Tract), v));
                        }
                    }
                }
            }
        }
        for (key, value) in round {
            samples.entry(key).or_default().push(value);
        }
    }
    Ok((cases, samples, state))
}

/// Why the ONNX peers have nothing to run: the first case's export error, if any.
fn onnx_reason(cases: &[Case], fallback: anyhow::Error) -> String {
    cases
        .iter()
        .find_map(|c| c.onnx.as_ref().err())
        .map_or_else(
            || format!("{fallback:#}"),
            |why| format!("no ONNX export: {why}"),
        )
}

/// Median, lowest and highest.
fn stats(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    let m = median(&mut sorted);
    (m, sorted[0], sorted[sorted.len() - 1])
}

/// Batch 1 as latency per call, larger batches as images per second.
fn speed(batch: usize, samples_per_second: f64) -> String {
    if batch == 1 {
        format!("{:.0} us", 1e6 / samples_per_second)
    } else {
        format!("{samples_per_second:.0}/s")
    }
}

fn percent(accuracy: Option<&f64>) -> String {
    accuracy.map_or_else(|| "n/a".into(), |a| format!("{:.2}%", 100.0 * a))
}

fn report(
    cases: &[Case],
    samples: &Samples,
    state: &PeerState,
    threads: usize,
    all: usize,
    settings: &Settings,
    options: &Options,
) -> BenchReport {
    let mut results = Vec::new();
    let mut table = String::from(
        "| model | scheme | batch | ours | libtorch | TFLite XNNPACK | ONNX Runtime | tract |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut spread = String::from(
        "| model | scheme | batch | engine | median samples/s | min | max | spread |\n\
         |---|---|---:|---|---:|---:|---:|---:|\n",
    );
    for (i, case) in cases.iter().enumerate() {
        for batch in BATCHES {
            let Some(ours) = samples.get(&(i, batch, Engine::Ours)) else {
                continue;
            };
            let (ours_median, ours_min, ours_max) = stats(ours);
            let _ = write!(
                table,
                "| {} | {} | {batch} | {} |",
                case.subject.label(),
                case.scheme.label(),
                speed(batch, ours_median)
            );
            for engine in [Engine::Ours].into_iter().chain(PEERS) {
                let Some(values) = samples.get(&(i, batch, engine)) else {
                    if engine != Engine::Ours {
                        table.push_str(" n/a |");
                    }
                    continue;
                };
                let (m, lo, hi) = stats(values);
                let _ = writeln!(
                    spread,
                    "| {} | {} | {batch} | {} | {m:.0} | {lo:.0} | {hi:.0} | {:.1}% |",
                    case.subject.label(),
                    case.scheme.label(),
                    engine.label(),
                    100.0 * (hi - lo) / m,
                );
                if engine == Engine::Ours {
                    continue;
                }
                let _ = write!(table, " {} ({:.2}x) |", speed(batch, m), ours_median / m);
                let name = format!(
                    "{} {} batch {batch}",
                    case.subject.label(),
                    case.scheme.label()
                );
                let result = CaseResult::new(
                    name,
                    Measurement {
                        engine: format!("{} {}", Engine::Ours.label(), case.scheme.label()),
                        samples_per_second: ours_median,
                    },
                    Measurement {
                        engine: format!("{} {}", engine.label(), case.scheme.label()),
                        samples_per_second: m,
                    },
                )
                .with_detail(CaseDetail {
                    ours_accuracy: state.accuracy.get(&(i, Engine::Ours)).copied(),
                    peer_accuracy: state.accuracy.get(&(i, engine)).copied(),
                    ours_range: [ours_min, ours_max],
                    peer_range: [lo, hi],
                    repeats: values.len(),
                });
                results.push(result);
            }
            table.push('\n');
        }
    }
    let mut accuracy = String::from(
        "| model | scheme | ours | libtorch | TFLite XNNPACK | ONNX Runtime | tract |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    for (i, case) in cases.iter().enumerate() {
        let _ = write!(
            accuracy,
            "| {} | {} |",
            case.subject.label(),
            case.scheme.label()
        );
        for engine in [Engine::Ours].into_iter().chain(PEERS) {
            let _ = write!(accuracy, " {} |", percent(state.accuracy.get(&(i, engine))));
        }
        accuracy.push('\n');
    }
    let machine = format!(
        "{}{} ({})",
        peer::machine(),
        if threads == all {
            String::new()
        } else {
            format!(", {threads} threads")
        },
        peer::simd_flags()
    );
    let mut summary = format!(
        "runtime: {machine}\nrun {}, {} repeats of at least {} s each, engines alternating, \
         {threads} threads each\n\n\
         Batch 1: microseconds per call; batch 256: images per second; (ratio) = ours / \
         peer in throughput, above 1 means ours is faster.\n\n{table}\n\
         Test accuracy (10,000 MNIST test images, {ACCURACY_BATCH} per call):\n\n{accuracy}\n\
         Every engine's median and range over the repeats:\n\n{spread}\n",
        options.run.display(),
        settings.repeats,
        settings.min_seconds,
    );
    for note in &state.notes {
        let _ = writeln!(summary, "- {note}");
    }
    for (engine, why) in &state.unavailable {
        let _ = writeln!(summary, "- {} unavailable: {why}", engine.label());
    }
    let mut report = BenchReport::new("runtime", machine, results);
    report.summary = Some(summary);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_without_a_run_says_how_to_make_one() {
        let dir = std::env::temp_dir().join(format!("bench-no-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = discover(&dir).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("cargo xtask experiment"), "{err}");
        assert!(err.contains("--quick"), "{err}");
    }

    #[test]
    fn the_selected_calibrator_comes_from_the_report() {
        let report = json!({"rows": [
            {"model": "teacher_cnn", "variant": "static_int8_minmax", "selected": false},
            {"model": "student_cnn", "variant": "static_int8_mse", "selected": true},
            {"model": "teacher_cnn", "variant": "static_int8_entropy", "selected": true},
        ]});
        let schema_2 = json!({"rows": [
            {"model": "teacher_cnn", "variant": "static_int8_mse",
             "detail": {"kind": "quantization", "calibration": {"selected": true}}},
        ]});
        assert_eq!(selected_calibrator(Some(&schema_2), "teacher_cnn"), "mse");
        assert_eq!(selected_calibrator(Some(&report), "teacher_cnn"), "entropy");
        assert_eq!(selected_calibrator(Some(&report), "student_cnn"), "mse");
        assert_eq!(selected_calibrator(Some(&report), "other"), "percentile");
        assert_eq!(selected_calibrator(None, "teacher_cnn"), "percentile");
    }

    #[test]
    fn batch_one_reads_as_latency_and_larger_batches_as_throughput() {
        assert_eq!(speed(1, 4000.0), "250 us");
        assert_eq!(speed(256, 12345.4), "12345/s");
    }
}
