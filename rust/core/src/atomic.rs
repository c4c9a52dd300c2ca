//! Output files that appear only when complete.
//!
//! Data is written to a temporary file in the target's folder (same filesystem, so the final `rename` is
//! atomic). Until [`AtomicFile::commit`] succeeds, an existing file at the target path is untouched; if the
//! writer is dropped or the process dies, no partial file sits at the target path. A temporary left behind by
//! a killed process is recognisable by its name: `.<target name>.ggml-lora-tmp.<pid>.<n>`, with the target
//! name cut short when the whole would exceed `NAME_MAX` (255 bytes), so every legal output name works.
//!
//! The target must be a regular file or a new name: a device, FIFO, socket or directory there is refused
//! (see [`crate::paths`]) when the writer is created and checked again just before the rename, so it is
//! never replaced.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::paths::{self, NAME_MAX};

/// Marker that appears in the name of every temporary file this crate creates.
pub const TEMP_MARKER: &str = ".ggml-lora-tmp.";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file being written at a temporary path, renamed to its target on [`commit`](AtomicFile::commit).
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    /// True once the temporary file has been renamed onto the target (nothing left to clean up).
    renamed: bool,
}

/// The temporary file name for a target called `file_name`: `.<name>.ggml-lora-tmp.<pid>.<n>`, the name part
/// cut (at a character boundary when it is UTF-8) so that the whole stays within `NAME_MAX` bytes.
pub fn temp_name(file_name: &std::ffi::OsStr, pid: u32, n: u64) -> OsString {
    let suffix = format!("{TEMP_MARKER}{pid}.{n}");
    let budget = NAME_MAX - 1 - suffix.len();
    let bytes = file_name.as_encoded_bytes();
    let mut name = Vec::with_capacity(NAME_MAX);
    name.push(b'.');
    name.extend_from_slice(paths::truncate_name(bytes, budget));
    name.extend_from_slice(suffix.as_bytes());
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        OsString::from_vec(name)
    }
    #[cfg(not(unix))]
    {
        OsString::from(String::from_utf8_lossy(&name).into_owned())
    }
}

/// A fresh temporary path beside `target` (this process's id, the next counter value; see [`temp_name`]).
pub fn temp_path(target: &Path) -> Result<PathBuf> {
    let file_name = target.file_name().ok_or_else(|| Error::io(target, paths::not_a_file_path()))?;
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(temp_name(file_name, std::process::id(), n)))
}

impl AtomicFile {
    /// Creates the temporary file next to `target`. Fails if the folder does not exist or is not writable, or
    /// if `target` names a device, FIFO, socket or directory ([`Error::NotRegularFile`]).
    pub fn create(target: impl AsRef<Path>) -> Result<AtomicFile> {
        let target = target.as_ref().to_path_buf();
        let temp = temp_path(&target)?;
        paths::check_output(&target)?;
        let file = OpenOptions::new().write(true).create_new(true).open(&temp).map_err(|e| Error::io(&temp, e))?;
        Ok(AtomicFile { target, temp, file: Some(file), renamed: false })
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
    /// replacing any existing file there in one step. If the target has meanwhile become a device, FIFO,
    /// socket or directory, it is left alone and the temporary file removed.
    pub fn commit(self, sync: bool) -> Result<PathBuf> {
        let mut paths = commit_all(vec![self], sync)?;
        Ok(paths.remove(0))
    }

    /// Flushes and optionally `fsync`s the temporary file, which stays under its temporary name.
    fn prepare(&mut self, sync: bool) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(Error::WriterState("AtomicFile committed twice".into()));
        };
        file.flush().map_err(|e| Error::io(&self.temp, e))?;
        if sync {
            file.sync_all().map_err(|e| Error::io(&self.temp, e))?;
        }
        self.file = None;
        Ok(())
    }
}

/// Commits a set of files that belong together (the shards of a split model) so that the set appears only when
/// every file is complete: all are flushed (and `fsync`ed) under their temporary names first, every target is
/// checked, and only then are they renamed, the first file last (the one a reader opens to find the others).
/// If any step fails, no file of the set is left: temporaries are removed and targets already renamed are
/// deleted again (a file they replaced is not restored).
pub fn commit_all(mut files: Vec<AtomicFile>, sync: bool) -> Result<Vec<PathBuf>> {
    for f in files.iter_mut() {
        f.prepare(sync)?;
    }
    for f in &files {
        paths::check_output(&f.target)?;
    }
    let mut renamed: Vec<PathBuf> = Vec::with_capacity(files.len());
    for f in files.iter_mut().rev() {
        if let Err(e) = std::fs::rename(&f.temp, &f.target) {
            for done in &renamed {
                let _ = std::fs::remove_file(done);
            }
            return Err(Error::io(&f.target, e));
        }
        f.renamed = true;
        renamed.push(f.target.clone());
    }
    if sync {
        let mut dirs: Vec<&Path> = files.iter().filter_map(|f| f.target.parent()).collect();
        dirs.dedup();
        for dir in dirs.into_iter().filter(|p| !p.as_os_str().is_empty()) {
            // Persist the renames themselves; failure here cannot corrupt anything, so it is not an error.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
    }
    Ok(files.iter_mut().map(|f| std::mem::take(&mut f.target)).collect())
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // Whether dropped while writing or after a failed commit, the temporary file goes.
        if !self.renamed {
            self.file.take();
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
    fn temp_names_stay_within_name_max_and_keep_the_marker() {
        let short = temp_name(std::ffi::OsStr::new("out.gguf"), 123, 4);
        assert_eq!(short, ".out.gguf.ggml-lora-tmp.123.4");
        for len in [200, 230, 240, 241, 255] {
            let name = "x".repeat(len - 5) + ".gguf";
            let temp = temp_name(std::ffi::OsStr::new(&name), u32::MAX, u64::MAX);
            let temp = temp.to_str().unwrap();
            assert!(temp.len() <= NAME_MAX, "{len}: {} bytes", temp.len());
            assert!(temp.starts_with(".xxx") && temp.contains(TEMP_MARKER), "{temp}");
            assert!(temp.ends_with(&format!("{}.{}", u32::MAX, u64::MAX)), "{temp}");
        }
        // Multi-byte names are cut between characters, so the temporary name is still UTF-8.
        let name = "ä".repeat(127); // 254 bytes
        let temp = temp_name(std::ffi::OsStr::new(&name), 1, 2);
        assert!(temp.len() <= NAME_MAX && temp.to_str().is_some());
    }

    #[test]
    fn a_255_byte_target_name_works() {
        let dir = scratch_dir("long");
        let target = dir.join("y".repeat(250) + ".gguf");
        let mut f = AtomicFile::create(&target).unwrap();
        assert!(f.temp_path().file_name().unwrap().len() <= NAME_MAX);
        f.file().write_all(b"new").unwrap();
        f.commit(false).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn special_targets_are_refused_and_never_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let dir = scratch_dir("special");
        let fifo = dir.join("pipe.gguf");
        crate::paths::tests::mkfifo(&fifo);
        for target in [PathBuf::from("/dev/null"), fifo.clone(), dir.clone()] {
            let err = AtomicFile::create(&target).err().unwrap();
            assert!(matches!(err, Error::NotRegularFile { output: true, .. }), "{err}");
            assert!(err.to_string().starts_with(&format!("{} is ", target.display())), "{err}");
        }
        assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn a_target_that_becomes_special_before_commit_is_left_alone() {
        use std::os::unix::fs::FileTypeExt;
        let dir = scratch_dir("late");
        let target = dir.join("out.gguf");
        let mut f = AtomicFile::create(&target).unwrap();
        f.file().write_all(b"new").unwrap();
        crate::paths::tests::mkfifo(&target);
        let err = f.commit(false).err().unwrap();
        assert!(matches!(err, Error::NotRegularFile { output: true, .. }), "{err}");
        assert!(std::fs::metadata(&target).unwrap().file_type().is_fifo());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "the temporary file is removed");
    }

    #[test]
    fn missing_folder_is_an_io_error_naming_the_path() {
        let err = AtomicFile::create("/nonexistent-ggml-lora-dir/out.gguf").err().unwrap();
        assert!(err.to_string().contains("nonexistent-ggml-lora-dir"), "{err}");
    }
}
