//! The artifact round trip: a briefly trained teacher exported by `models::export` (and, with
//! its weights clustered, by `runtime::ArtifactBuilder` as palettes), read by the Python
//! reader printed in `docs/FORMAT.md` (taken from the document itself, so the two cannot
//! drift), gives the Rust runtime's logits on raw MNIST images, normalised by both as the
//! artifact records.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, Result, bail};
use integration_tests::bundled_mnist;
use mnist_data::{Batcher, Dataset, Normalization};
use model_spec::InputNormalization;
use models::export::DeployedParameter;
use models::{Network, NetworkSpec, WeightFormat};
use ndarray::{Array4, Axis};
use runtime::{Artifact, ArtifactBuilder, Granularity, Scheme, Storage, WeightValues};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// The format document; the test runs the Python block of its last section.
const FORMAT_DOC: &str = include_str!("../../docs/FORMAT.md");
/// The heading of the section whose code block is the reader.
const READER_HEADING: &str = "## Reading an artifact in Python";

/// Largest difference between PyTorch's and the runtime's logits for an f32 artifact,
/// relative to the largest logit: both compute in f32 with different summation orders
/// (k <= 1600); measured 2e-7, fifty times below this.
const F32_LOGIT_TOLERANCE: f32 = 1e-5;
/// The same for the dynamic-range int8 artifacts: the reader quantizes every int8 layer's
/// input with the rule the document states and computes in f32 on the dequantized codes,
/// the runtime in exact integer arithmetic; an activation that lies within rounding of a
/// tie between two codes may land on either (one step of 1/255 of the layer's range).
/// Whether any does depends on the trained weights, which vary with LibTorch's thread
/// scheduling (one run measured 1.2e-3, others stayed below 1e-3). The tolerance admits a
/// few such one-step flips on the test images.
const INT8_LOGIT_TOLERANCE: f32 = 1e-2;
/// Test images sent through both engines.
const IMAGES: usize = 32;
/// Clusters per group of the palettized weights.
const CLUSTERS: usize = 16;

/// The Python code block under [`READER_HEADING`] in `docs/FORMAT.md`.
fn python_reader() -> Result<&'static str> {
    let section = FORMAT_DOC
        .split_once(READER_HEADING)
        .context("docs/FORMAT.md has no Python reader section")?
        .1;
    let code = section
        .split_once("```python\n")
        .context("the reader section has no ```python block")?
        .1;
    let (code, _) = code
        .split_once("\n```")
        .context("the ```python block is not closed")?;
    Ok(code)
}

fn python() -> Result<PathBuf> {
    std::env::var_os("TCH_MOT_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .context(
            "this test runs the PyTorch reader of docs/FORMAT.md and needs TCH_MOT_PYTHON (the \
         Python of the LibTorch environment): run the tests with `cargo xtask test`, which sets it",
        )
}

/// A teacher trained for a few dozen steps on 2% of MNIST: realistic weights and batch-norm
/// statistics.
fn trained_teacher(data: &Dataset) -> Result<(nn::VarStore, Network)> {
    let train = data.train.stratified_subset(0.02, 3)?;
    let images = train.normalized(Normalization::default());
    let xs = Tensor::from_slice(images.as_slice().context("standard layout")?).view([
        train.len() as i64,
        1,
        28,
        28,
    ]);
    let ys = Tensor::from_slice(train.labels.as_slice().context("standard layout")?)
        .to_kind(Kind::Int64);
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Network::new(&vs.root(), &NetworkSpec::teacher_cnn())?;
    let mut opt = nn::Adam::default().build(&vs, 2e-3)?;
    for batch in Batcher::new(train.len(), 32, 3)?.epoch(0).iter().take(20) {
        let index = Tensor::from_slice(&batch.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let loss = net
            .forward_t(&xs.index_select(0, &index), true)
            .cross_entropy_for_logits(&ys.index_select(0, &index));
        opt.backward_step(&loss);
    }
    Ok((vs, net))
}

/// Starts the reader (saved as `dir/load.py`) on `model` with the raw inputs in `input`.
fn start_reader(python: &Path, dir: &Path, model: &Path, input: &Path) -> Result<Child> {
    Command::new(python)
        .arg(dir.join("load.py"))
        .arg(model)
        .arg(input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the Python reader")
}

/// The logits the reader printed.
fn reader_logits(child: Child) -> Result<Vec<f32>> {
    let output = child
        .wait_with_output()
        .context("waiting for the Python reader")?;
    if !output.status.success() {
        bail!(
            "the Python reader failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let rows: Vec<Vec<f32>> =
        serde_json::from_slice(&output.stdout).context("reading the reader's JSON logits")?;
    Ok(rows.into_iter().flatten().collect())
}

/// Weight clustering as a deployment tool hands it over: every non-zero weight moved to the
/// nearest of [`CLUSTERS`] evenly spaced values between the extremes of its group's non-zero
/// weights (per output channel or per tensor); zeros stay zero, biases are left as they are.
fn clustered(params: &[DeployedParameter], granularity: Granularity) -> Vec<DeployedParameter> {
    let mut params = params.to_vec();
    for p in params.iter_mut().filter(|p| p.name.ends_with(".weight")) {
        let group = match granularity {
            Granularity::PerChannel => p.data.len() / p.shape[0],
            Granularity::PerTensor => p.data.len(),
        };
        for values in p.data.chunks_mut(group) {
            let nonzero = values.iter().filter(|&&w| w != 0.0);
            let lo = nonzero.clone().fold(f32::INFINITY, |m, &w| m.min(w));
            let hi = nonzero.fold(f32::NEG_INFINITY, |m, &w| m.max(w));
            let step = (hi - lo) / (CLUSTERS - 1) as f32;
            for w in values.iter_mut().filter(|w| **w != 0.0) {
                let level = if step > 0.0 {
                    ((*w - lo) / step).round()
                } else {
                    0.0
                };
                *w = lo + level * step;
            }
        }
    }
    params
}

/// An artifact of `params` with every weight in [`Storage::Palette`], biases in f32; with
/// `half`, in [`Storage::PaletteHalf`] with f16 biases.
fn palette_artifact(
    network: NetworkSpec,
    params: &[DeployedParameter],
    granularity: Granularity,
    half: bool,
) -> Result<ArtifactBuilder> {
    let mut builder = ArtifactBuilder::new(network);
    for p in params {
        let storage = match (p.name.ends_with(".weight"), half) {
            (true, false) => Storage::Palette(granularity),
            (true, true) => Storage::PaletteHalf(granularity),
            (false, false) => Storage::F32,
            (false, true) => Storage::F16,
        };
        builder.add(&p.name, &p.data, &p.shape, storage)?;
    }
    Ok(builder)
}

/// Checks that `bytes` stores every weight in `scheme` and decodes to `params` exactly;
/// returns the weights' schemes.
fn check_palette(bytes: &[u8], params: &[DeployedParameter], scheme: &str) -> Result<Vec<Scheme>> {
    let artifact = Artifact::from_bytes(bytes)?;
    let mut schemes = Vec::new();
    for p in params.iter().filter(|p| p.name.ends_with(".weight")) {
        let index: usize = p.name.trim_end_matches(".weight").parse()?;
        let layer = artifact.layer(index).context("a layer with parameters")?;
        assert_eq!(layer.weight_scheme.name(), scheme, "{}", p.name);
        let WeightValues::Float(values) = &layer.weight else {
            bail!("{}: a palette decodes to real values", p.name);
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(values), bits(&p.data), "{}", p.name);
        schemes.push(layer.weight_scheme.clone());
    }
    Ok(schemes)
}

fn relative_difference(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

#[test]
fn python_reader_of_the_format_doc_matches_the_runtime() -> Result<()> {
    // Fails (never skips) without the Python, with the message saying how to run.
    let python = python()?;
    let data = Dataset::load(&bundled_mnist())?;
    let (vs, net) = trained_teacher(&data)?;
    let test = data.test.select(&(0..IMAGES).collect::<Vec<_>>());
    let raw: Array4<u8> = test.images.clone().insert_axis(Axis(1));
    assert_eq!(raw.len_of(Axis(0)), IMAGES);
    let norm = Normalization::default();
    let recorded = InputNormalization::new(255.0, vec![norm.mean], vec![norm.std])?;

    let dir = std::env::temp_dir().join(format!("tch-mot-round-trip-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let input = dir.join("input.u8");
    std::fs::write(&input, raw.iter().copied().collect::<Vec<u8>>())?;

    std::fs::write(dir.join("load.py"), python_reader()?).context("writing load.py")?;

    // The sparse int8 scheme needs pruned weights: keep the largest fifth of each weight.
    let mut pruned = models::export::deployed_parameters(&net, &vs)?;
    for p in pruned.iter_mut().filter(|p| p.name.ends_with(".weight")) {
        let mut cut: Vec<f32> = p.data.iter().map(|w| w.abs()).collect();
        cut.sort_by(f32::total_cmp);
        let threshold = cut[cut.len() * 4 / 5];
        p.data
            .iter_mut()
            .filter(|w| w.abs() < threshold)
            .for_each(|w| *w = 0.0);
    }
    let deployed = models::export::deployed_parameters(&net, &vs)?;
    let spec = net.spec().without_batch_norm();
    let compact =
        models::export::artifact_from_parameters(spec.clone(), &pruned, WeightFormat::Int8Compact)?;
    assert!(String::from_utf8_lossy(&compact.to_bytes()?).contains("int8_sparse"));
    // Clustered weights: dense, per channel; pruned, per tensor, without their zeros.
    let clustered_dense = clustered(&deployed, Granularity::PerChannel);
    let palette = palette_artifact(
        spec.clone(),
        &clustered_dense,
        Granularity::PerChannel,
        false,
    )?;
    check_palette(&palette.to_bytes()?, &clustered_dense, "palette")?;
    let clustered_pruned = clustered(&pruned, Granularity::PerTensor);
    let palette_sparse = palette_artifact(
        spec.clone(),
        &clustered_pruned,
        Granularity::PerTensor,
        false,
    )?;
    let palette_half = palette_artifact(spec, &clustered_pruned, Granularity::PerTensor, true)?;
    let schemes = check_palette(
        &palette_sparse.to_bytes()?,
        &clustered_pruned,
        "palette_sparse",
    )?;
    // Four in five weights are zero: the Rice code beats the bitmask.
    assert!(
        schemes.iter().all(|s| matches!(
            s,
            Scheme::PaletteSparse {
                positions: runtime::PositionCode::Rice { .. },
                ..
            }
        )),
        "{schemes:?}"
    );
    let cases = [
        (
            "f32",
            models::export::artifact(&net, &vs, WeightFormat::F32)?,
            F32_LOGIT_TOLERANCE,
        ),
        (
            "int8",
            models::export::artifact(&net, &vs, WeightFormat::Int8DynamicRange)?,
            INT8_LOGIT_TOLERANCE,
        ),
        ("int8_sparse", compact, INT8_LOGIT_TOLERANCE),
        // Palettes decode to f32 weights: the f32 tolerance.
        ("palette", palette, F32_LOGIT_TOLERANCE),
        ("palette_sparse", palette_sparse, F32_LOGIT_TOLERANCE),
        // F16 codebooks and biases: the reader must widen them as the runtime does.
        ("palette_half", palette_half, F32_LOGIT_TOLERANCE),
    ];
    // The readers run at once: importing torch is most of their time.
    let mut runs = Vec::new();
    for (format, mut builder, tolerance) in cases {
        let path = dir.join(format!("{format}.safetensors"));
        builder.set_input_normalization(recorded.clone());
        builder.write(&path)?;
        let model = runtime::Model::load(&path)?;
        let ours = model.run_raw(raw.view())?;
        // Raw input through the recorded normalisation is what training fed the network.
        assert_eq!(ours, model.run(test.normalized(norm).view())?);
        let reader = start_reader(&python, &dir, &path, &input)?;
        runs.push((format, tolerance, ours, reader));
    }
    for (format, tolerance, ours, reader) in runs {
        let theirs = reader_logits(reader)?;
        let ours = ours.as_slice().context("standard layout")?;
        assert_eq!(theirs.len(), ours.len(), "{format}");
        let difference = relative_difference(ours, &theirs);
        assert!(
            difference < tolerance,
            "{format}: relative difference {difference}"
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
