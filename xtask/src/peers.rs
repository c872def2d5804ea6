//! The Python environment of the runtime bench's peers (TensorFlow Lite with XNNPACK, ONNX
//! Runtime): pinned packages in their own virtual environment, apart from LibTorch's, under
//! `$XDG_CACHE_HOME/tch-mot/peers-<hash of the pins>` (or `~/.cache/...`). Like the LibTorch
//! environment it is complete only once its marker is written, after pip succeeded; new pins
//! give a new folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::libtorch::{PROJECT, cache_dir, create_venv, write_marker};

/// The variable that hands the peers' Python to the bench.
pub const PYTHON_VAR: &str = "TCH_MOT_PEER_PYTHON";

/// Exact versions of the packages the peers import; pip resolves their dependencies.
pub const PINS: [&str; 2] = ["tensorflow-cpu==2.21.0", "onnxruntime==1.31.1"];

/// Installed after `PINS` without their dependencies: tf-keras asks for the `tensorflow`
/// package, which would install a second TensorFlow over `tensorflow-cpu`.
pub const PINS_WITHOUT_DEPS: [&str; 1] = ["tf-keras==2.21.0"];

/// Written last, after pip succeeded: its absence means "install (again)".
const MARKER: &str = "install-complete";

/// The peers' Python: `TCH_MOT_PEER_PYTHON` when set, otherwise the pinned environment,
/// installed on first use.
pub fn ensure() -> Result<PathBuf> {
    if let Some(python) = std::env::var_os(PYTHON_VAR) {
        return Ok(PathBuf::from(python));
    }
    let pins: Vec<&str> = PINS.iter().chain(&PINS_WITHOUT_DEPS).copied().collect();
    let root = cache_dir()?.join(PROJECT).join(folder_name(&pins));
    if let Some(python) = installed(&root) {
        return Ok(python);
    }
    install(&root, &pins)?;
    installed(&root)
        .with_context(|| format!("pip reported success but {} has no Python", root.display()))
}

/// `peers-` and a hash of the pins: a change of any pin gives a fresh environment.
fn folder_name(pins: &[&str]) -> String {
    format!("peers-{:016x}", fnv1a(pins.join("\n").as_bytes()))
}

/// 64-bit FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn installed(root: &Path) -> Option<PathBuf> {
    root.join(MARKER).is_file().then_some(())?;
    let python = crate::libtorch::venv_python(&root.join("venv"));
    python.is_file().then_some(python)
}

fn install(root: &Path, pins: &[&str]) -> Result<()> {
    eprintln!(
        "the runtime bench's peers are not installed yet: installing {} into {}\n\
         (once; about 1 GB)",
        pins.join(", "),
        root.display()
    );
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let python = create_venv(&root.join("venv"), "`cargo xtask bench runtime`")?;
    pip_install(&python, &[], &PINS)?;
    pip_install(&python, &["--no-deps"], &PINS_WITHOUT_DEPS)?;
    write_marker(&root.join(MARKER), &pins.join("\n"))?;
    eprintln!("peers installed: {}", root.display());
    Ok(())
}

fn pip_install(python: &Path, options: &[&str], packages: &[&str]) -> Result<()> {
    let status = Command::new(python)
        .args(["-m", "pip", "install", "--disable-pip-version-check"])
        .args(options)
        .args(packages)
        .stdout(std::io::stderr())
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!(
            "`pip install {}` failed ({status}); fix the cause above and rerun \
             `cargo xtask bench runtime` (the install resumes)",
            options
                .iter()
                .chain(packages)
                .copied()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folder_follows_the_pins() {
        let a = folder_name(&["a==1", "b==2"]);
        assert_eq!(a, folder_name(&["a==1", "b==2"]));
        assert_ne!(a, folder_name(&["a==1", "b==3"]));
        assert!(
            a.starts_with("peers-") && a.len() == "peers-".len() + 16,
            "{a}"
        );
    }

    #[test]
    fn fnv1a_matches_the_reference_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn an_install_without_marker_is_not_used() {
        let root = std::env::temp_dir().join(format!("xtask-peers-{}", std::process::id()));
        let python = crate::libtorch::venv_python(&root.join("venv"));
        std::fs::create_dir_all(python.parent().unwrap()).unwrap();
        std::fs::write(&python, "").unwrap();
        assert!(installed(&root).is_none());
        std::fs::write(root.join(MARKER), "pins").unwrap();
        let found = installed(&root);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, Some(python));
    }
}
