//! Output files that appear only when complete.
//!
//! Data is written to a temporary file in the target's folder (same filesystem, so the final `rename` is
//! atomic). Until [`AtomicFile::commit`] succeeds, an existing file at the target path is untouched; if the
//! writer is dropped or the process dies, no partial file sits at the target path. A temporary left behind by
//! a killed process is recognisable by its name: `.<target name>.ggml-lora-tmp.<pid>.<n>`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Marker that appears in the name of every temporary file this crate creates.
pub const TEMP_MARKER: &str = ".ggml-lora-tmp.";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file being written at a temporary path, renamed to its target on [`commit`](AtomicFile::commit).
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    /// Creates the temporary file next to `target`. Fails if the folder does not exist or is not writable.
    pub fn create(target: impl AsRef<Path>) -> Result<AtomicFile> {
        let target = target.as_ref().to_path_buf();
        let file_name = target
            .file_name()
            .ok_or_else(|| Error::io(&target, io::Error::new(io::ErrorKind::InvalidInput, "not a file path")))?;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if target.is_dir() {
            return Err(Error::io(&target, io::Error::new(io::ErrorKind::IsADirectory, "output path is a directory")));
        }
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp_name = format!(".{}{}{}.{}", file_name.to_string_lossy(), TEMP_MARKER, std::process::id(), n);
        let temp = dir.join(temp_name);
        let file = OpenOptions::new().write(true).create_new(true).open(&temp).map_err(|e| Error::io(&temp, e))?;
        Ok(AtomicFile { target, temp, file: Some(file) })
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("AtomicFile used after commit")
    }

    /// Flushes, optionally `fsync`s (data and folder), and renames the temporary file onto the target,
    /// replacing any existing file there in one step.
    pub fn commit(mut self, sync: bool) -> Result<PathBuf> {
        let mut file = self.file.take().expect("AtomicFile committed twice");
        file.flush().map_err(|e| Error::io(&self.temp, e))?;
        if sync {
            file.sync_all().map_err(|e| Error::io(&self.temp, e))?;
        }
        drop(file);
        std::fs::rename(&self.temp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        if sync {
            if let Some(dir) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
                // Persist the rename itself; failure here cannot corrupt anything, so it is not an error.
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
        }
        Ok(std::mem::take(&mut self.target))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ggml-lora-atomic-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn dropped_writer_leaves_existing_target_and_no_temp() {
        let dir = scratch_dir("drop");
        let target = dir.join("out.gguf");
        std::fs::write(&target, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&target).unwrap();
            f.file().write_all(b"partial").unwrap();
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn commit_replaces_target() {
        let dir = scratch_dir("commit");
        let target = dir.join("out.gguf");
        std::fs::write(&target, b"old").unwrap();
        let mut f = AtomicFile::create(&target).unwrap();
        f.file().write_all(b"new").unwrap();
        assert!(f.temp_path().to_string_lossy().contains(TEMP_MARKER));
        f.commit(true).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn missing_folder_is_an_io_error_naming_the_path() {
        let err = AtomicFile::create("/nonexistent-ggml-lora-dir/out.gguf").err().unwrap();
        assert!(err.to_string().contains("nonexistent-ggml-lora-dir"), "{err}");
    }
}
