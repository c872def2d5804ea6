//! File helpers: atomic writes and artifact sizes.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use flate2::Compression;
use flate2::write::GzEncoder;

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename,
/// so readers see either the old file or the complete new one, never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = temporary_path(path);
    std::fs::write(&temporary, bytes)
        .and_then(|()| std::fs::rename(&temporary, path))
        .with_context(|| format!("writing {}", path.display()))
}

/// Creates `path` by letting `write` produce a temporary file, then renaming it.
pub fn create_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let temporary = temporary_path(path);
    write(&temporary).with_context(|| format!("writing {}", path.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
}

fn temporary_path(path: &Path) -> std::path::PathBuf {
    // A prefix, not a suffix: writers that pick the format from the extension
    // (safetensors, for one) must see the real one.
    let mut name = std::ffi::OsString::from(".tmp-");
    name.push(path.file_name().unwrap_or_default());
    path.with_file_name(name)
}

/// Size of a file and of its gzip (level 9) compression.
pub fn sizes(path: &Path) -> Result<(u64, u64)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((bytes.len() as u64, gzip_len(&bytes)?))
}

/// Length of the gzip (level 9) compression of `bytes`.
pub fn gzip_len(bytes: &[u8]) -> Result<u64> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn repetitive_files_gzip_smaller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zeros");
        std::fs::write(&path, vec![0u8; 10_000]).unwrap();
        let (size, gzip) = sizes(&path).unwrap();
        assert_eq!(size, 10_000);
        assert!(gzip < 200, "{gzip}");
    }

    #[test]
    fn writing_into_a_missing_folder_is_an_error_naming_the_file() {
        let err = write_atomic(Path::new("/nonexistent-folder/x.json"), b"x").unwrap_err();
        assert!(format!("{err:#}").contains("x.json"));
    }
}
