//! What every stage gets: the run's seed and mode, the device, the data, where to write, and
//! the one way to read what earlier stages wrote.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use mnist_data::{Dataset, Normalization};

use crate::device::RunDevice;
use crate::progress::Progress;
use crate::stage::{Product, Stage};
use crate::train::DeviceSplit;

/// The run as one stage sees it.
#[derive(Debug)]
pub struct Context {
    /// Seed for weight initialisation, data order and subsets.
    pub seed: u64,
    /// Small subsets and few steps: a smoke test, not results.
    pub quick: bool,
    /// The teacher every technique starts from.
    pub teacher: crate::architecture::TeacherChoice,
    pub device: RunDevice,
    pub progress: Progress,
    /// The run folder.
    pub out: PathBuf,
    pub dataset: Dataset,
    pub normalization: Normalization,
    /// The full test set on the device: every accuracy in the report is measured on it.
    pub test: DeviceSplit,
    /// The stage running now.
    pub stage: Stage,
    /// What it declared it reads.
    pub inputs: &'static [Product],
}

impl Context {
    /// The path of `product`, which the running stage needs: an error naming the stage to
    /// run first when it is missing.
    pub fn input(&self, product: Product) -> Result<PathBuf> {
        let path = self.declared(product)?;
        if !path.exists() {
            // Every stage whose files this one reads, in run order, then this one.
            let mut stages: Vec<Stage> = self.inputs.iter().map(|p| p.stage).collect();
            stages.sort_by_key(|s| *s as usize);
            stages.dedup();
            stages.push(self.stage);
            let names: Vec<&str> = stages.iter().map(|s| s.name()).collect();
            bail!(
                "the {} stage needs {} from the {} stage ({} is missing): run --stages {}",
                self.stage,
                product.file,
                product.stage,
                path.display(),
                names.join(",")
            );
        }
        Ok(path)
    }

    /// The path of `product` when an earlier stage wrote it; the running stage does without
    /// it otherwise.
    pub fn optional_input(&self, product: Product) -> Result<Option<PathBuf>> {
        let path = self.declared(product)?;
        Ok(path.exists().then_some(path))
    }

    fn declared(&self, product: Product) -> Result<PathBuf> {
        if !self.inputs.contains(&product) {
            bail!(
                "the {} stage reads {} without declaring it among its inputs",
                self.stage,
                product.file
            );
        }
        Ok(self.out.join(product.file))
    }

    /// The file `name` in `folder` of the run folder (the folder created if needed).
    pub fn file(&self, folder: &str, name: &str) -> Result<RunFile> {
        let path = self.folder(folder)?.join(name);
        Ok(RunFile {
            path,
            relative: format!("{folder}/{name}"),
        })
    }

    /// `folder` under the run folder, created if needed.
    pub fn folder(&self, folder: &str) -> Result<PathBuf> {
        let path = self.out.join(folder);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(path)
    }
}

/// A file in the run folder: where it is, and the path relative to the run folder that
/// report rows give.
#[derive(Clone, Debug)]
pub struct RunFile {
    pub path: PathBuf,
    pub relative: String,
}
