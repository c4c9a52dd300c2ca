//! A GGUF file opened through a read-only memory map.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use super::header::{GgufHeader, TensorInfo};
use crate::error::Result;
use crate::mapped::MappedFile;

/// An open, validated GGUF file. Opening maps the file and parses only the header; tensor bytes are read
/// from the map on demand, so opening a 10 GB model costs no 10 GB of memory.
pub struct GgufFile {
    mapped: MappedFile,
    header: GgufHeader,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.mapped.path())
            .field("len", &self.mapped.bytes().len())
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates `path`. Errors name the file and, for malformed files, the byte offset.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        Self::from_mapped(MappedFile::open(path)?)
    }

    /// Parses and validates the header of an already mapped file.
    pub fn from_mapped(mapped: MappedFile) -> Result<GgufFile> {
        let header = GgufHeader::parse(mapped.bytes()).map_err(|e| e.in_file(mapped.path()))?;
        let index = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile { mapped, header, index })
    }

    /// The mapped file and its parsed header.
    pub fn into_parts(self) -> (MappedFile, GgufHeader) {
        (self.mapped, self.header)
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        self.mapped.path()
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
        &self.mapped.bytes()[range.start as usize..range.end as usize]
    }

    /// The open file handle (the same file as the map), e.g. for kernel-side copies of tensor data.
    pub fn file(&self) -> &File {
        self.mapped.file()
    }

    /// Drops this process's pages of `range` (absolute bytes); see [`MappedFile::release_pages`].
    pub fn release_pages(&self, range: std::ops::Range<usize>) {
        self.mapped.release_pages(range)
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        self.mapped.bytes()
    }
}
