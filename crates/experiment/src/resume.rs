//! `--resume`: which stages of an earlier run in the same folder can be kept.
//!
//! Every stage gets a key: a SHA-256 of what its results depend on (the toolkit's version
//! and commit, the data, the settings that stage reads, and the keys of the stages whose
//! outputs it loads). The report records the key of every completed stage; a resumed run
//! keeps a stage when the earlier report shows it completed under the same key and none of
//! the stages it loads from ran again in this invocation.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest, Sha256};

use crate::cli::Args;
use crate::report::Report;
use crate::settings::Settings;
use crate::stage::Stage;
use crate::stages;

/// What the stages of this invocation depend on, and the earlier report (with `--resume`).
pub struct Resume {
    common: serde_json::Value,
    settings: Settings,
    /// The stages this invocation runs.
    stages: Vec<Stage>,
    previous: Option<Report>,
    keys: HashMap<Stage, String>,
    ran: HashSet<Stage>,
}

impl Resume {
    /// `data_dir` is hashed (its files' contents) so a changed dataset reruns everything.
    pub fn new(
        args: &Args,
        settings: &Settings,
        device_kind: &str,
        data_dir: &Path,
        out: &Path,
    ) -> Result<Self> {
        let previous = if args.resume {
            read_previous(out)?
        } else {
            None
        };
        let mut common = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "commit": crate::device::git_commit(),
            "data": data_digest(data_dir)?,
            "device": device_kind,
            "threads": tch::get_num_threads(),
            "seed": args.seed,
            "quick": args.quick,
        });
        // The default teacher leaves the keys of earlier runs as they were.
        if args.teacher != crate::architecture::TeacherChoice::default() {
            common["teacher"] = args.teacher.name().into();
        }
        Ok(Self {
            common,
            settings: settings.clone(),
            stages: args.stages.clone(),
            previous,
            keys: HashMap::new(),
            ran: HashSet::new(),
        })
    }

    /// The key of `stage` in this invocation.
    pub fn key(&mut self, stage: Stage) -> String {
        if let Some(key) = self.keys.get(&stage) {
            return key.clone();
        }
        let dependencies: Vec<(String, Option<String>)> = stages::dependencies(stage)
            .into_iter()
            .map(|d| (d.name().to_string(), self.dependency_key(d)))
            .collect();
        let description = serde_json::json!({
            "stage": stage.name(),
            "common": self.common,
            "settings": self.settings.of(stage),
            "inputs": dependencies,
        });
        let key = hex(&Sha256::digest(description.to_string().as_bytes()));
        self.keys.insert(stage, key.clone());
        key
    }

    /// The key a stage's input was produced under: this invocation's when it runs here, the
    /// earlier report's otherwise (`None`: no record of it, the files are used as found).
    fn dependency_key(&mut self, stage: Stage) -> Option<String> {
        if self.stages.contains(&stage) {
            return Some(self.key(stage));
        }
        self.previous
            .as_ref()?
            .stages
            .get(stage.name())
            .filter(|o| o.status == "ok")
            .and_then(|o| o.config_hash.clone())
    }

    /// The earlier report of this folder, if `stage` can be kept from it.
    pub fn reusable(&mut self, stage: Stage) -> Option<&Report> {
        let key = self.key(stage);
        if stages::dependencies(stage)
            .iter()
            .any(|d| self.ran.contains(d))
        {
            return None;
        }
        let previous = self.previous.as_ref()?;
        let outcome = previous.stages.get(stage.name())?;
        (outcome.status == "ok" && outcome.config_hash.as_deref() == Some(key.as_str()))
            .then_some(previous)
    }

    /// Records that `stage` ran in this invocation (its dependents must run too).
    pub fn ran(&mut self, stage: Stage) {
        self.ran.insert(stage);
    }
}

/// The earlier report of `out`; `None` when there is none, an error when it is damaged.
fn read_previous(out: &Path) -> Result<Option<Report>> {
    let path = out.join("report.json");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("--resume: reading {}", path.display())),
    };
    let report: Report = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "--resume: {} is damaged or not an experiment report; move it away to start afresh",
            path.display()
        )
    })?;
    if report.schema_version != crate::report::SCHEMA_VERSION {
        bail!(
            "--resume: {} has report schema {}, this version writes {}; use another --out",
            path.display(),
            report.schema_version,
            crate::report::SCHEMA_VERSION
        );
    }
    Ok(Some(report))
}

/// SHA-256 over the names and contents of the regular files of `dir`, in name order.
fn data_digest(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    for file in files {
        let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        hasher.update(file.file_name().unwrap_or_default().as_encoded_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes the temporary files an interrupted run may have left in `out` and its
/// subfolders (those [`atomic_file::is_temporary`] recognises: every file of a run is
/// written through it); the files they were to replace are intact.
pub fn remove_leftovers(out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() && !path.is_symlink() {
            remove_leftovers(&path)?;
        } else if atomic_file::is_temporary(&name) {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the leftover {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("plots");
        std::fs::create_dir(&sub).unwrap();
        for name in [".tmp-a1B2c3-report.json", "report.json", ".tmp"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::write(sub.join(".tmp-x1Y2z3-a.svg"), b"x").unwrap();
        std::fs::write(sub.join("a.svg"), b"x").unwrap();
        remove_leftovers(dir.path()).unwrap();
        let mut left: Vec<String> = walk(dir.path());
        left.sort();
        assert_eq!(left, [".tmp", "a.svg", "report.json"]);
    }

    fn walk(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flat_map(|e| {
                let e = e.unwrap();
                if e.path().is_dir() {
                    walk(&e.path())
                } else {
                    vec![e.file_name().to_string_lossy().into_owned()]
                }
            })
            .collect()
    }

    #[test]
    fn a_damaged_report_is_an_error_and_a_missing_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_previous(dir.path()).unwrap().is_none());
        std::fs::write(dir.path().join("report.json"), b"{\"schema_ver").unwrap();
        let err = format!("{:#}", read_previous(dir.path()).unwrap_err());
        assert!(
            err.contains("damaged") && err.contains("report.json"),
            "{err}"
        );
    }
}
