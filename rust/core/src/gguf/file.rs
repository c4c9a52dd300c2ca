//! A GGUF file opened through a read-only memory map.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::header::{GgufHeader, TensorInfo};
use crate::error::{Error, Result};

/// An open, validated GGUF file. Opening maps the file and parses only the header; tensor bytes are read
/// from the map on demand, so opening a 10 GB model costs no 10 GB of memory.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    map: Mmap,
    header: GgufHeader,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates `path`. Errors name the file and, for malformed files, the byte offset.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        // A FIFO, device, socket or directory is refused without blocking (see `paths::open_input`).
        let file = crate::paths::open_input(&path)?;
        // SAFETY: the map is read-only and private to this process. Like every mmap reader (ggml, gguf-py,
        // safetensors) we accept that another process truncating or rewriting the file while it is mapped
        // is outside our control; this crate never writes to a file it has mapped (outputs go to a new
        // temporary file that is renamed into place).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let header = GgufHeader::parse(&map).map_err(|e| e.in_file(&path))?;
        let index = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile { path, file, map, header, index })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header.
    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// Index (file order) and info of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<(usize, &TensorInfo)> {
        self.index.get(name).map(|&i| (i, &self.header.tensors[i]))
    }

    /// The raw bytes of tensor `index` (no padding), straight from the map.
    ///
    /// Panics if `index` is out of range; ranges were validated against the file length on open.
    pub fn tensor_data(&self, index: usize) -> &[u8] {
        let range = self.header.tensor_range(index);
        &self.map[range.start as usize..range.end as usize]
    }

    /// The open file handle (the same file as the map), e.g. for kernel-side copies of tensor data.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Tells the kernel this process is done with the pages of `range` (absolute bytes) for now, so they leave
    /// its resident set; they stay in the page cache and are read again transparently if touched later.
    /// Keeps memory flat when streaming through files larger than RAM.
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

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}
