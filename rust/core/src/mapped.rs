//! A regular input file opened read-only through a memory map: the one place inputs are mapped.
//!
//! GGUF files, the shards of a split model and legacy GGML/GGJT models are all read this way: opening costs no
//! memory for the tensor data, which is paged in on demand and can be dropped again ([`MappedFile::release_pages`])
//! so that streaming through a model larger than RAM keeps the resident set flat.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

/// An input file and its read-only memory map.
pub struct MappedFile {
    path: PathBuf,
    file: File,
    map: Mmap,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile").field("path", &self.path).field("len", &self.map.len()).finish()
    }
}

impl MappedFile {
    /// Opens and maps `path`. A FIFO, device, socket or directory is refused without blocking (see
    /// [`crate::paths::open_input`]).
    pub fn open(path: impl AsRef<Path>) -> Result<MappedFile> {
        let path = path.as_ref().to_path_buf();
        let file = crate::paths::open_input(&path)?;
        // SAFETY: the map is read-only and private to this process. Like every mmap reader (ggml, gguf-py,
        // safetensors) we accept that another process truncating or rewriting the file while it is mapped
        // is outside our control; this crate never writes to a file it has mapped (outputs go to a new
        // temporary file that is renamed into place).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        Ok(MappedFile { path, file, map })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file handle (the same file as the map), e.g. for kernel-side copies of tensor data.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Tells the kernel this process is done with the pages of `range` (absolute bytes) for now, so they leave
    /// its resident set; they stay in the page cache and are read again transparently if touched later.
    pub fn release_pages(&self, range: std::ops::Range<usize>) {
        let end = range.end.min(self.map.len());
        if range.start >= end {
            return;
        }
        // SAFETY: the map is a read-only file mapping, for which MADV_DONTNEED only drops this process's
        // page-table entries: later reads fault the same file contents back in, so no reference into the map
        // can observe a change. (It is only unsafe for private *writable* maps, where it discards changes.)
        let _ = unsafe {
            self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, end - range.start)
        };
    }
}
