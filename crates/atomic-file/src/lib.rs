//! Atomic file writes: a reader of the target sees the old file or the complete new one,
//! never a partial one, and a crash leaves at most a temporary file behind.
//!
//! Both forms go through the same steps: a temporary file is created in the target's folder
//! (a rename is atomic only within one file system), filled, flushed to disk, renamed over
//! the target, and on Unix the folder is flushed too so that the rename survives a crash.
//! When any step fails the temporary file is removed and the target is left as it was.
//!
//! - [`write`] writes bytes held in memory;
//! - [`create`] hands the temporary path to a closure, for writers that take a path and
//!   open the file themselves (`tch::nn::VarStore::save`, say).
//!
//! A temporary file is named `.tmp-<unique>-<file name>`: `<unique>` is
//! [`UNIQUE_LEN`] ASCII letters and digits, and the target's file name comes last, so its
//! extension is the temporary's too (writers that pick the format from the extension, as
//! safetensors' and tch's do, see the real one). The leading dot hides it from `ls`.
//! [`is_temporary`] tells whether a file name follows that rule: what a cleanup after an
//! interrupted program removes. New files get the permissions of [`std::fs::write`]
//! (read-write for everyone, less the umask).
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let report = dir.path().join("report.json");
//!
//! atomic_file::write(&report, b"{\"rows\": []}")?;
//! atomic_file::write(&report, b"{\"rows\": [1]}")?; // replaces it
//! assert_eq!(std::fs::read(&report)?, b"{\"rows\": [1]}");
//!
//! // A writer that takes a path gets the temporary one, with the real extension last.
//! atomic_file::create(dir.path().join("model.safetensors"), |temporary| {
//!     let name = temporary.file_name().unwrap_or_default();
//!     assert!(atomic_file::is_temporary(name));
//!     assert!(name.to_string_lossy().ends_with("-model.safetensors"));
//!     std::fs::write(temporary, b"weights")
//! })?;
//!
//! // A failure leaves the target as it was and no temporary file behind, and names the
//! // target.
//! let err = atomic_file::create(&report, |_| {
//!     Err::<(), _>(std::io::Error::other("the writer failed"))
//! })
//! .unwrap_err();
//! assert_eq!(err.to_string(), "the writer failed");
//! let err = atomic_file::write(dir.path().join("missing/x.json"), b"x").unwrap_err();
//! assert!(err.to_string().contains("x.json"));
//! assert_eq!(std::fs::read(&report)?, b"{\"rows\": [1]}");
//! assert_eq!(std::fs::read_dir(dir.path())?.count(), 2);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod error;

use std::ffi::{OsStr, OsString};
use std::io::Write as _;
use std::path::Path;

pub use error::{Error, Step};

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What every temporary file's name starts with.
pub const TEMPORARY_PREFIX: &str = ".tmp-";

/// How many letters and digits make a temporary file's name unique.
pub const UNIQUE_LEN: usize = 6;

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, flushed to disk
/// and renamed over `path` (which may or may not exist), then the folder flushed (Unix).
///
/// # Errors
/// [`Error::NoFileName`] when `path` names no file, and [`Error::Io`] naming `path` when a
/// step fails (a missing folder, no permission, a folder at `path`); `path` is then as it
/// was and no temporary file is left.
pub fn write(path: impl AsRef<Path>, bytes: impl AsRef<[u8]>) -> Result<()> {
    let path = path.as_ref();
    let mut temporary = temporary_for(path)?;
    let fail = |step| move |source| io_error(path, step, source);
    temporary
        .write_all(bytes.as_ref())
        .map_err(fail(Step::Write))?;
    temporary
        .as_file()
        .sync_all()
        .map_err(fail(Step::SyncFile))?;
    // On failure the temporary file is removed when the error drops it.
    temporary
        .persist(path)
        .map_err(|e| io_error(path, Step::Replace, e.error))?;
    sync_folder(path)
}

/// Creates `path` atomically through `write`, which is handed the path of a temporary file
/// in the same folder (empty, already created) and fills it; the file is then flushed to
/// disk, renamed over `path` and the folder flushed (Unix), as by [`write`].
///
/// `write` may replace the temporary file rather than write into it (create it anew,
/// rename another file onto it): only its path counts. Its error is returned unchanged;
/// this crate's own errors become `E` through `From`, as `anyhow::Error`,
/// [`std::io::Error`] and any error type with `#[from] atomic_file::Error` allow.
///
/// # Errors
/// `write`'s error, or [`Error::NoFileName`] or [`Error::Io`] (naming `path`) converted to
/// `E`; in every case `path` is as it was and no temporary file is left.
pub fn create<E, F>(path: impl AsRef<Path>, write: F) -> Result<(), E>
where
    E: From<Error>,
    F: FnOnce(&Path) -> Result<(), E>,
{
    let path = path.as_ref();
    // Closed before `write` opens it (some platforms refuse to open a file twice); the
    // temporary path is still removed when dropped.
    let temporary = temporary_for(path)?.into_temp_path();
    write(&temporary)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&temporary)
        .and_then(|file| file.sync_all())
        .map_err(|source| io_error(path, Step::SyncFile, source))?;
    temporary
        .persist(path)
        .map_err(|e| io_error(path, Step::Replace, e.error))?;
    Ok(sync_folder(path)?)
}

/// Whether `file_name` (a name, not a path) is one of this crate's temporary files:
/// [`TEMPORARY_PREFIX`], [`UNIQUE_LEN`] ASCII letters and digits, `-`, and a non-empty
/// target name.
///
/// ```
/// use atomic_file::is_temporary;
///
/// assert!(is_temporary(".tmp-a1B2c3-report.json"));
/// assert!(!is_temporary("report.json"));
/// assert!(!is_temporary(".tmp-report.json"));
/// assert!(!is_temporary(".tmp-a1B2c3-"));
/// ```
pub fn is_temporary(file_name: impl AsRef<OsStr>) -> bool {
    let name = file_name.as_ref().as_encoded_bytes();
    let Some(rest) = name.strip_prefix(TEMPORARY_PREFIX.as_bytes()) else {
        return false;
    };
    let unique = rest
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric())
        .count();
    unique == UNIQUE_LEN && rest.get(unique) == Some(&b'-') && rest.len() > unique + 1
}

/// A new, empty temporary file for `path`, named by the crate's rule, in `path`'s folder.
fn temporary_for(path: &Path) -> Result<tempfile::NamedTempFile> {
    let name = path.file_name().ok_or_else(|| Error::NoFileName {
        path: path.to_path_buf(),
    })?;
    let mut suffix = OsString::from("-");
    suffix.push(name);
    let mut builder = tempfile::Builder::new();
    builder
        .prefix(TEMPORARY_PREFIX)
        .rand_bytes(UNIQUE_LEN)
        .suffix(&suffix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        // tempfile's default is owner-only; the umask still applies.
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder
        .tempfile_in(folder(path))
        .map_err(|source| io_error(path, Step::CreateTemporary, without_temporary(source)))
}

/// `err` without the `at path "<temporary>"` that tempfile appends to its messages: the
/// crate's errors name the target, and the temporary file never came to be. (tempfile keeps
/// the original error private; its kind is kept.)
fn without_temporary(err: std::io::Error) -> std::io::Error {
    let text = err.to_string();
    match text.rsplit_once(" at path ") {
        Some((cause, _)) if err.get_ref().is_some() => std::io::Error::new(err.kind(), cause),
        _ => err,
    }
}

/// The folder `path` lies in: its parent, or the current folder for a bare file name.
fn folder(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Flushes the folder of `path` to disk, so that a completed rename survives a crash.
#[cfg(unix)]
fn sync_folder(path: &Path) -> Result<()> {
    std::fs::File::open(folder(path))
        .and_then(|folder| folder.sync_all())
        .map_err(|source| io_error(path, Step::SyncFolder, source))
}

/// Windows makes a rename durable without a handle on the folder, and offers none to flush.
#[cfg(not(unix))]
fn sync_folder(_path: &Path) -> Result<()> {
    Ok(())
}

fn io_error(path: &Path, step: Step, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        step,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_a_new_file_and_replaces_an_existing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write(&path, b"first").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        write(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        create(&path, |temporary| std::fs::write(temporary, b"third")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"third");
        assert_eq!(names(dir.path()), ["a.json"]);
    }

    #[test]
    fn a_bare_file_name_is_written_in_the_current_folder() {
        assert_eq!(folder(Path::new("report.json")), Path::new("."));
        assert_eq!(folder(Path::new("out/report.json")), Path::new("out"));
    }

    #[test]
    fn the_temporary_keeps_the_extension_and_passes_the_predicate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("teacher.safetensors");
        let mut seen = None;
        create(&path, |temporary| {
            seen = Some(temporary.to_path_buf());
            assert_eq!(temporary.parent(), Some(dir.path()));
            assert_eq!(temporary.extension(), Some(OsStr::new("safetensors")));
            std::fs::write(temporary, b"x")
        })
        .unwrap();
        let name = seen.unwrap().file_name().unwrap().to_os_string();
        assert!(is_temporary(&name), "{name:?}");
        let text = name.to_string_lossy();
        assert!(
            text.starts_with(TEMPORARY_PREFIX) && text.ends_with("-teacher.safetensors"),
            "{text}"
        );
    }

    #[test]
    fn the_predicate_accepts_the_rule_only() {
        for name in [
            ".tmp-abc123-x",
            ".tmp-ABCxyz-report.json",
            ".tmp-000000-.hidden",
        ] {
            assert!(is_temporary(name), "{name}");
        }
        for name in [
            "report.json",
            ".tmp-",
            ".tmp-abc123-",
            ".tmp-abc12-x",
            ".tmp-abc1234-x",
            ".tmp-abc_12-x",
            ".tmp-report.json",
            "report.json.tmp-1234",
            ".report.json.x1Y2z3.tmp",
            "tmp-abc123-x",
        ] {
            assert!(!is_temporary(name), "{name}");
        }
    }

    #[test]
    fn no_temporary_is_left_when_the_writer_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, b"old").unwrap();
        let err = create(&path, |temporary| {
            std::fs::write(temporary, b"half")?;
            Err(std::io::Error::other("out of memory"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "out of memory");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["model.safetensors"]);
    }

    #[test]
    fn no_temporary_is_left_when_the_rename_fails() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty folder where the file should go: the rename over it fails.
        let path = dir.path().join("report.json");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"x").unwrap();
        let err = write(&path, b"new").unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Io {
                    step: Step::Replace,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.path(), path);
        assert!(err.to_string().contains("report.json"), "{err}");
        let err = create(&path, |t| std::fs::write(t, b"new")).unwrap_err();
        assert!(err.to_string().contains("report.json"), "{err}");
        assert_eq!(names(dir.path()), ["report.json"]);
        assert_eq!(names(&path), ["inside"]);
    }

    #[test]
    fn errors_name_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-folder").join("x.json");
        let err = write(&missing, b"x").unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Io {
                    step: Step::CreateTemporary,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&*missing.to_string_lossy()), "{text}");
        assert!(!text.contains(TEMPORARY_PREFIX), "{text}");
        let io: std::io::Error = err.into();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        assert!(io.to_string().contains("x.json"), "{io}");

        let err = write(Path::new("/"), b"x").unwrap_err();
        assert!(matches!(&err, Error::NoFileName { .. }), "{err:?}");
        assert_eq!(err.into_io_error().kind(), std::io::ErrorKind::InvalidInput);
    }

    #[cfg(unix)]
    #[test]
    fn new_files_are_readable_like_those_of_fs_write() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (ours, plain) = (dir.path().join("ours"), dir.path().join("plain"));
        write(&ours, b"x").unwrap();
        std::fs::write(&plain, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ours), mode(&plain));
    }
}
