//! Where a program finds its dataset when it is not told.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The environment variable that names the dataset folder when no `--data-dir` is given.
pub const DATA_DIR_VAR: &str = "TCH_MOT_MNIST_DIR";

/// The dataset folder looked for under the current folder when neither `--data-dir` nor
/// [`DATA_DIR_VAR`] names one: where the source tree keeps its MNIST copy, so that a
/// program run from the repository's root finds it.
pub const DEFAULT_DATA_DIR: &str = "datasets/mnist";

/// The dataset folder of a program with a `--data-dir` option, from the program's
/// environment: [`resolve_data_dir`] with the value of [`DATA_DIR_VAR`] and the current
/// folder. Nothing is baked in at build time, so an installed binary looks where it runs.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::path::Path;
///
/// // A folder given on the command line is used as it is (the loader reports its errors).
/// let given = Path::new("/srv/fashion-mnist");
/// assert_eq!(mnist_data::data_dir(Some(given))?, given);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// Those of [`resolve_data_dir`].
pub fn data_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let variable = std::env::var_os(DATA_DIR_VAR);
    // Without a current folder (it was deleted), the relative path still reads well in the
    // error.
    let current = std::env::current_dir().unwrap_or_default();
    resolve_data_dir(explicit, variable.as_deref(), &current)
}

/// The dataset folder, from the first source that names one:
///
/// 1. `explicit` (the program's `--data-dir`), returned as it is: [`crate::Dataset::load`]
///    reports a missing folder or file naming it;
/// 2. `variable`, the value of [`DATA_DIR_VAR`] when it is set and not empty, taken
///    relative to `current_dir`; it must be a folder;
/// 3. [`DEFAULT_DATA_DIR`] under `current_dir`, when it is a folder.
///
/// ```
/// use std::path::Path;
/// use mnist_data::{Error, resolve_data_dir};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let root = tempfile::tempdir()?;
/// std::fs::create_dir_all(root.path().join("datasets/mnist"))?;
/// let found = resolve_data_dir(None, None, root.path())?;
/// assert_eq!(found, root.path().join("datasets/mnist"));
///
/// // From anywhere else, nothing is found, and the error says where it looked.
/// let elsewhere = tempfile::tempdir()?;
/// let err = resolve_data_dir(None, None, elsewhere.path()).unwrap_err();
/// assert!(matches!(err, Error::NoDataDir { .. }));
/// assert!(err.to_string().contains("TCH_MOT_MNIST_DIR is not set"));
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`Error::NoDataDir`] when `explicit` is `None` and the source in charge names no folder:
/// `variable` when it is set, otherwise the default.
pub fn resolve_data_dir(
    explicit: Option<&Path>,
    variable: Option<&OsStr>,
    current_dir: &Path,
) -> Result<PathBuf> {
    if let Some(explicit) = explicit {
        return Ok(explicit.to_path_buf());
    }
    if let Some(value) = variable.filter(|v| !v.is_empty()) {
        let dir = current_dir.join(value);
        return if dir.is_dir() {
            Ok(dir)
        } else {
            Err(Error::NoDataDir {
                variable: Some(dir),
                default: None,
            })
        };
    }
    let dir = current_dir.join(DEFAULT_DATA_DIR);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(Error::NoDataDir {
            variable: None,
            default: Some(dir),
        })
    }
}

/// The message of [`Error::NoDataDir`]: every place looked at, and how to name the folder.
pub(crate) fn no_data_dir_message(variable: Option<&Path>, default: Option<&Path>) -> String {
    let mut tried = String::from("no --data-dir was given");
    match variable {
        Some(dir) => tried.push_str(&format!(
            ", and {DATA_DIR_VAR} names {}, which is not a folder",
            dir.display()
        )),
        None => tried.push_str(&format!(", {DATA_DIR_VAR} is not set")),
    }
    if let Some(dir) = default {
        tried.push_str(&format!(", and there is no folder {}", dir.display()));
    }
    format!(
        "no dataset folder found: {tried}; pass --data-dir DIR or set {DATA_DIR_VAR}=DIR, \
         DIR being a folder with the four MNIST-layout IDX files (the source repository \
         ships MNIST in {DEFAULT_DATA_DIR})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder with `datasets/mnist` in it, and an `other` data folder beside.
    fn root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(DEFAULT_DATA_DIR)).unwrap();
        std::fs::create_dir(root.path().join("other")).unwrap();
        root
    }

    #[test]
    fn the_flag_comes_first_then_the_variable_then_the_current_folder() {
        let root = root();
        let root = root.path();
        let given = Path::new("/anywhere/at/all");
        let other = OsStr::new("other");
        assert_eq!(
            resolve_data_dir(Some(given), Some(other), root).unwrap(),
            given
        );
        assert_eq!(
            resolve_data_dir(None, Some(other), root).unwrap(),
            root.join("other")
        );
        // An absolute value is taken as it is.
        let absolute = root.join("other");
        assert_eq!(
            resolve_data_dir(None, Some(absolute.as_os_str()), Path::new("/")).unwrap(),
            absolute
        );
        assert_eq!(
            resolve_data_dir(None, None, root).unwrap(),
            root.join(DEFAULT_DATA_DIR)
        );
        // An empty variable counts as not set.
        assert_eq!(
            resolve_data_dir(None, Some(OsStr::new("")), root).unwrap(),
            root.join(DEFAULT_DATA_DIR)
        );
    }

    #[test]
    fn a_variable_naming_no_folder_is_an_error_not_a_fallback() {
        let root = root();
        let err = resolve_data_dir(None, Some(OsStr::new("missing")), root.path()).unwrap_err();
        let text = err.to_string();
        let missing = root.path().join("missing");
        assert!(
            text.contains(&format!(
                "{DATA_DIR_VAR} names {}, which is not a folder",
                missing.display()
            )),
            "{text}"
        );
        assert!(!text.contains("there is no folder"), "{text}");
    }

    #[test]
    fn nothing_found_names_every_place_tried_and_the_way_out() {
        let empty = tempfile::tempdir().unwrap();
        let err = resolve_data_dir(None, None, empty.path()).unwrap_err();
        let default = empty.path().join(DEFAULT_DATA_DIR);
        assert_eq!(
            err.to_string(),
            format!(
                "no dataset folder found: no --data-dir was given, TCH_MOT_MNIST_DIR is not \
                 set, and there is no folder {}; pass --data-dir DIR or set TCH_MOT_MNIST_DIR=DIR, \
                 DIR being a folder with the four MNIST-layout IDX files (the source \
                 repository ships MNIST in datasets/mnist)",
                default.display()
            )
        );
    }

    #[test]
    fn a_file_where_the_default_folder_should_be_is_not_taken() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("datasets")).unwrap();
        std::fs::write(root.path().join(DEFAULT_DATA_DIR), b"x").unwrap();
        assert!(matches!(
            resolve_data_dir(None, None, root.path()),
            Err(Error::NoDataDir { .. })
        ));
    }
}
