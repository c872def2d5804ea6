//! Finding or installing LibTorch.
//!
//! LibTorch comes from the PyTorch wheel: its `torch/` package folder has the
//! `include/` and `lib/` that the tch build needs, and the same environment gives
//! a Python PyTorch for benchmarks and cross-checks.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The PyTorch release that tch 0.24.0 is built against.
pub const TORCH_VERSION: &str = "2.11.0";
pub(crate) const PROJECT: &str = "tch-mot";
/// Written last, after pip succeeded: its absence means "install (again)".
const MARKER: &str = "install-complete";
/// The Python packages the tests use next to torch (the ONNX export's cross-check), pinned
/// exactly. Installed after torch, into the same environment.
pub const EXTRA_PYTHON_PACKAGES: [&str; 2] = ["onnx==1.23.2", "onnxruntime==1.31.1"];
/// Holds [`EXTRA_PYTHON_PACKAGES`] (one a line) once pip installed them: an environment
/// without it, or with another list, gets them installed on the next call.
const EXTRA_MARKER: &str = "extra-packages-complete";

/// A usable LibTorch, and the Python that came with it when we installed it.
#[derive(Debug)]
pub struct LibTorch {
    pub dir: PathBuf,
    pub python: Option<PathBuf>,
}

impl LibTorch {
    /// Uses `LIBTORCH` when set, otherwise the private environment (installing it once).
    pub fn ensure() -> Result<Self> {
        if let Some(dir) = std::env::var_os("LIBTORCH") {
            let dir = PathBuf::from(dir);
            check_layout(&dir).context("LIBTORCH is set but does not point at a LibTorch")?;
            let python = std::env::var_os("TCH_MOT_PYTHON")
                .map(PathBuf::from)
                .or_else(|| python_beside(&dir));
            return Ok(Self { dir, python });
        }
        let root = cache_dir()?
            .join(PROJECT)
            .join(format!("torch-{TORCH_VERSION}"));
        let found = match Self::installed(&root) {
            Some(found) => found,
            None => {
                install(&root)?;
                Self::installed(&root).with_context(|| {
                    format!(
                        "pip reported success but no usable torch/ folder was found under {}",
                        root.display()
                    )
                })?
            }
        };
        if let Some(python) = &found.python {
            ensure_extra_packages(&root, python)?;
        }
        Ok(found)
    }

    /// The environment a spawned cargo needs to build, test and run against LibTorch.
    pub fn env(&self) -> Vec<(&'static str, OsString)> {
        let lib = self.dir.join("lib");
        let mut paths = vec![lib];
        if let Some(old) = std::env::var_os(LIBRARY_PATH_VAR) {
            paths.extend(std::env::split_paths(&old));
        }
        let library_path = std::env::join_paths(paths).unwrap_or_default();
        let mut env = vec![
            ("LIBTORCH", self.dir.clone().into_os_string()),
            (LIBRARY_PATH_VAR, library_path),
        ];
        if let Some(python) = &self.python {
            env.push(("TCH_MOT_PYTHON", python.clone().into_os_string()));
        }
        env
    }

    /// Shell `export` lines for using plain cargo afterwards.
    pub fn shell_exports(&self) -> String {
        let lib = self.dir.join("lib");
        let mut out = format!(
            "export LIBTORCH={}\nexport {LIBRARY_PATH_VAR}={}\"${{{LIBRARY_PATH_VAR}:+:${LIBRARY_PATH_VAR}}}\"\n",
            quote(&self.dir),
            quote(&lib),
        );
        if let Some(python) = &self.python {
            out.push_str(&format!("export TCH_MOT_PYTHON={}\n", quote(python)));
        }
        out
    }

    fn installed(root: &Path) -> Option<Self> {
        let recorded = std::fs::read_to_string(root.join(MARKER)).ok()?;
        let dir = PathBuf::from(recorded.trim());
        check_layout(&dir).ok()?;
        let python = venv_python(&root.join("venv"));
        Some(Self {
            dir,
            python: python.exists().then_some(python),
        })
    }
}

#[cfg(target_os = "macos")]
const LIBRARY_PATH_VAR: &str = "DYLD_LIBRARY_PATH";
#[cfg(not(target_os = "macos"))]
const LIBRARY_PATH_VAR: &str = "LD_LIBRARY_PATH";

fn check_layout(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    for sub in ["lib", "include"] {
        if !dir.join(sub).is_dir() {
            bail!(
                "{} has no {sub}/ folder (expected a LibTorch distribution or the torch/ folder of a PyTorch install)",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The Python of the environment a `torch/` package folder belongs to, when `dir` is one
/// (`<env>/lib/python3.X/site-packages/torch` next to `<env>/bin/python`).
fn python_beside(torch: &Path) -> Option<PathBuf> {
    let env = torch.ancestors().nth(4)?;
    let python = venv_python(env);
    python.is_file().then_some(python)
}

pub(crate) fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither XDG_CACHE_HOME nor HOME is set: cannot choose where to install LibTorch (or set LIBTORCH)")?;
    Ok(PathBuf::from(home).join(".cache"))
}

pub(crate) fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

fn install(root: &Path) -> Result<()> {
    eprintln!(
        "LibTorch {TORCH_VERSION} is not installed yet: installing the PyTorch wheel into {}\n\
         (once; about 5 GB; set LIBTORCH to use an existing LibTorch instead)",
        root.display()
    );
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let venv = root.join("venv");
    let python = create_venv(&venv, "`cargo xtask setup`")?;
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            &format!("torch=={TORCH_VERSION}"),
        ])
        // pip's progress goes to stderr, so that `eval "$(cargo xtask env)"` stays clean.
        .stdout(std::io::stderr())
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!(
            "`pip install torch=={TORCH_VERSION}` failed ({status}); fix the cause above \
             and rerun `cargo xtask setup` (the install resumes)"
        );
    }
    let torch = find_torch(&venv)?;
    write_marker(&root.join(MARKER), &torch.to_string_lossy())?;
    eprintln!("LibTorch installed: {}", torch.display());
    Ok(())
}

/// The contents of [`EXTRA_MARKER`] for the current package list.
fn extra_marker_contents() -> String {
    EXTRA_PYTHON_PACKAGES.join("\n") + "\n"
}

/// Installs [`EXTRA_PYTHON_PACKAGES`] into the private environment unless its marker says
/// that exactly this list is there; the marker is written only after pip succeeded.
fn ensure_extra_packages(root: &Path, python: &Path) -> Result<()> {
    let marker = root.join(EXTRA_MARKER);
    let wanted = extra_marker_contents();
    if std::fs::read_to_string(&marker).is_ok_and(|found| found == wanted) {
        return Ok(());
    }
    let list = EXTRA_PYTHON_PACKAGES.join(" ");
    eprintln!(
        "installing {list} into the environment of {}",
        python.display()
    );
    let status = Command::new(python)
        .args(["-m", "pip", "install", "--disable-pip-version-check"])
        .args(EXTRA_PYTHON_PACKAGES)
        // As for torch: stdout stays clean for `eval "$(cargo xtask env)"`.
        .stdout(std::io::stderr())
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!(
            "`pip install {list}` failed ({status}); fix the cause above and rerun `cargo xtask setup`"
        );
    }
    write_marker(&marker, &wanted)
}

/// Creates the virtual environment `venv` unless it exists and checks that it has pip;
/// returns its Python. `rerun` names the command that resumes after a fix.
pub(crate) fn create_venv(venv: &Path, rerun: &str) -> Result<PathBuf> {
    let python = venv_python(venv);
    if !python.exists() {
        let system_python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
        let status = Command::new(&system_python)
            .arg("--version")
            .output()
            .map(|o| o.status.success());
        if !matches!(status, Ok(true)) {
            bail!(
                "{} was not found or does not run: install Python 3 (with its venv module), or set PYTHON, or set LIBTORCH",
                system_python.to_string_lossy()
            );
        }
        let out = Command::new(&system_python)
            .args(["-m", "venv"])
            .arg(venv)
            .output()
            .context("running python3 -m venv")?;
        if !out.status.success() {
            // A half-made venv would be mistaken for a good one next time.
            let _ = std::fs::remove_dir_all(venv);
            bail!(
                "creating a virtual environment failed; is Python's venv module installed \
                 (Debian/Ubuntu: apt install python3-venv)?\n{}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let pip_ok = Command::new(&python)
        .args(["-m", "pip", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !pip_ok {
        bail!(
            "the virtual environment at {} has no working pip \
             (Debian/Ubuntu: apt install python3-venv python3-pip), then rerun {rerun}",
            venv.display()
        );
    }
    Ok(python)
}

/// Writes `marker` (with `content`) atomically.
pub(crate) fn write_marker(marker: &Path, content: &str) -> Result<()> {
    atomic_file::write(marker, content).with_context(|| format!("writing {}", marker.display()))
}

/// The `torch/` package folder inside a virtual environment.
fn find_torch(venv: &Path) -> Result<PathBuf> {
    let lib = venv.join(if cfg!(windows) { "Lib" } else { "lib" });
    let mut candidates = vec![lib.join("site-packages").join("torch")];
    if let Ok(entries) = std::fs::read_dir(&lib) {
        for entry in entries.flatten() {
            candidates.push(entry.path().join("site-packages").join("torch"));
        }
    }
    candidates
        .into_iter()
        .find(|dir| check_layout(dir).is_ok())
        .with_context(|| {
            format!(
                "no torch/ package with lib/ and include/ under {}",
                lib.display()
            )
        })
}

fn quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }

    #[test]
    fn layout_check_names_the_missing_folder() {
        let dir = std::env::temp_dir().join(format!("xtask-layout-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        let err = check_layout(&dir).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("include/"), "{err}");
    }

    #[test]
    fn extra_packages_are_pinned_exactly() {
        for package in EXTRA_PYTHON_PACKAGES {
            let (name, version) = package.split_once("==").unwrap();
            assert!(
                !name.is_empty() && version.split('.').count() == 3,
                "{package}"
            );
        }
        assert!(extra_marker_contents().lines().eq(EXTRA_PYTHON_PACKAGES));
    }

    #[test]
    fn an_install_without_marker_is_not_used() {
        let root = std::env::temp_dir().join(format!("xtask-marker-{}", std::process::id()));
        let torch = root.join("torch");
        std::fs::create_dir_all(torch.join("lib")).unwrap();
        std::fs::create_dir_all(torch.join("include")).unwrap();
        assert!(LibTorch::installed(&root).is_none());
        std::fs::write(root.join(MARKER), torch.to_string_lossy().as_bytes()).unwrap();
        let found = LibTorch::installed(&root).map(|t| t.dir);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, Some(torch));
    }
}
