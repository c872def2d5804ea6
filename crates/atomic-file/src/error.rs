//! The crate's error type.

use std::path::{Path, PathBuf};

/// Why a file could not be written. Every variant names the target file, never the
/// temporary one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The path names no file: it is empty, a root, or ends in `..`.
    #[error("cannot write {}: the path names no file", path.display())]
    NoFileName {
        /// The path given as the target.
        path: PathBuf,
    },
    /// A file-system call failed; the temporary file is gone and the target is as it was
    /// (unless `step` is [`Step::SyncFolder`], which comes after the replacement).
    #[error("cannot write {} ({step}): {source}", path.display())]
    Io {
        /// The target file.
        path: PathBuf,
        /// What was being done.
        step: Step,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The target file.
    pub fn path(&self) -> &Path {
        match self {
            Self::NoFileName { path } | Self::Io { path, .. } => path,
        }
    }

    /// The underlying I/O error, without the target's name: for callers whose own error
    /// type records the path already. [`Error::NoFileName`] becomes
    /// [`std::io::ErrorKind::InvalidInput`].
    pub fn into_io_error(self) -> std::io::Error {
        match self {
            Self::NoFileName { .. } => {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
            }
            Self::Io { source, .. } => source,
        }
    }
}

/// The whole error, the target's name included, as an [`std::io::Error`] of the same kind.
impl From<Error> for std::io::Error {
    fn from(err: Error) -> Self {
        let kind = match &err {
            Error::NoFileName { .. } => std::io::ErrorKind::InvalidInput,
            Error::Io { source, .. } => source.kind(),
        };
        Self::new(kind, err)
    }
}

/// The step of an atomic write that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Creating the temporary file next to the target.
    CreateTemporary,
    /// Writing the contents into the temporary file.
    Write,
    /// Flushing the temporary file to the disk.
    SyncFile,
    /// Renaming the temporary file over the target.
    Replace,
    /// Flushing the folder, so that the rename itself survives a crash (Unix).
    SyncFolder,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::CreateTemporary => "creating a temporary file next to it",
            Self::Write => "writing the temporary file",
            Self::SyncFile => "flushing the temporary file to disk",
            Self::Replace => "renaming the temporary file over it",
            Self::SyncFolder => "flushing its folder to disk",
        })
    }
}
