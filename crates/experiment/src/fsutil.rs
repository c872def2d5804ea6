//! File helpers: atomic writes (through `atomic_file`, with the errors as `anyhow` context)
//! and artifact sizes.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use flate2::Compression;
use flate2::write::GzEncoder;

/// Writes `bytes` to `path` atomically ([`atomic_file::write`]): readers see either the old
/// file or the complete new one, never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(atomic_file::write(path, bytes)?)
}

/// Creates `path` atomically ([`atomic_file::create`]) by letting `write` fill a temporary
/// file in the same folder, whose name ends with `path`'s file name (writers that pick the
/// format from the extension see the real one). `write` should write the path it is given
/// directly, not through another temporary file.
pub fn create_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    atomic_file::create(path, write).with_context(|| format!("writing {}", path.display()))
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
    fn a_failed_creation_names_the_file_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let err = create_atomic(&path, |temporary| {
            std::fs::write(temporary, b"half")?;
            anyhow::bail!("the writer failed")
        })
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("model.safetensors") && text.contains("the writer failed"),
            "{text}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
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
