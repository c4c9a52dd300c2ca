//! A model as it is distributed — one GGUF file, a set of gguf-split shards, or a legacy GGML/GGMF/GGJT file —
//! presented as one GGUF model: metadata, tensors in model order, and each tensor's bytes in its own file's map.
//!
//! This is the seam between the formats and the patch engine: the engine asks for a tensor's bytes, the file
//! they live in (for kernel-side copies) and releases pages per tensor, and never needs to know which file or
//! container a tensor came from. Split keys (`split.*`) are not part of the model's metadata here: the set's
//! shape is given by [`ModelFile::shards`] and [`ModelFile::shard_of`], and outputs write their own.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::gguf::split::{self, is_split_key, ShardedWriter, SplitRule};
use crate::gguf::{GgufFile, TensorInfo, TensorSpec, Value, WriteOptions};
use crate::legacy::{self, LegacyModel};
use crate::mapped::MappedFile;

/// The container a model was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Container {
    /// One GGUF file of this version.
    Gguf {
        /// GGUF version (2 or 3).
        version: u32,
    },
    /// A set of gguf-split shards (of the first shard's GGUF version).
    Split {
        /// GGUF version of the first shard.
        version: u32,
        /// Number of shards.
        shards: u16,
    },
    /// A legacy pre-GGUF file.
    Legacy {
        /// "ggml", "ggmf" or "ggjt".
        format: &'static str,
        /// Container version (1 for the unversioned `ggml`).
        version: u32,
    },
}

impl std::fmt::Display for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Container::Gguf { version } => write!(f, "GGUF v{version}"),
            Container::Split { version, shards } => write!(f, "GGUF v{version}, split into {shards} shards"),
            Container::Legacy { format, version } => write!(f, "legacy {format} v{version}"),
        }
    }
}

/// One file of a model: its map, and for GGUF files the data section's offset and alignment.
struct Part {
    mapped: MappedFile,
    data_offset: u64,
    alignment: u64,
    n_tensors: usize,
}

/// A model opened from any of its files; see the module documentation.
pub struct ModelFile {
    container: Container,
    parts: Vec<Part>,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    /// Per tensor: (part index, absolute byte offset of its data in that part).
    places: Vec<(u16, u64)>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile")
            .field("path", &self.path())
            .field("container", &self.container)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl ModelFile {
    /// Opens `path`: a GGUF file (the whole set when it is a shard of a split model; any shard will do) or a
    /// legacy GGML/GGMF/GGJT model (recognised by its magic). Errors name the file at fault.
    pub fn open(path: impl AsRef<Path>) -> Result<ModelFile> {
        let mapped = MappedFile::open(path)?;
        if legacy::is_legacy(mapped.bytes()) {
            let name = mapped.path().file_name().map(|n| n.to_string_lossy().into_owned());
            let model = LegacyModel::parse(mapped.bytes(), name.as_deref()).map_err(|e| e.in_file(mapped.path()))?;
            return Ok(Self::from_legacy(mapped, model));
        }
        let file = GgufFile::from_mapped(mapped)?;
        Self::from_shards(split::open_set(file)?)
    }

    /// A model of one GGUF file, as it is (a shard alone is not completed into its set).
    pub fn from_gguf(file: GgufFile) -> ModelFile {
        Self::assemble(vec![file], false)
    }

    fn from_shards(shards: Vec<GgufFile>) -> Result<ModelFile> {
        let is_set = shards.len() > 1;
        Ok(Self::assemble(shards, is_set))
    }

    fn assemble(shards: Vec<GgufFile>, is_set: bool) -> ModelFile {
        let version = shards[0].header().version;
        let container = if is_set {
            Container::Split { version, shards: shards.len() as u16 }
        } else {
            Container::Gguf { version }
        };
        let mut parts = Vec::with_capacity(shards.len());
        let mut metadata = Vec::new();
        let mut tensors = Vec::new();
        let mut places = Vec::new();
        for (k, shard) in shards.into_iter().enumerate() {
            let (mapped, header) = shard.into_parts();
            if k == 0 {
                metadata = header.metadata.into_iter().filter(|(key, _)| !(is_set && is_split_key(key))).collect();
            }
            for t in &header.tensors {
                places.push((k as u16, header.data_offset + t.relative_offset));
            }
            let n_tensors = header.tensors.len();
            tensors.extend(header.tensors);
            parts.push(Part { mapped, data_offset: header.data_offset, alignment: header.alignment, n_tensors });
        }
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        ModelFile { container, parts, metadata, tensors, places, index }
    }

    fn from_legacy(mapped: MappedFile, model: LegacyModel) -> ModelFile {
        let container = Container::Legacy { format: model.format.name(), version: model.version };
        let (metadata, renamed) = model.into_gguf();
        let places = renamed.iter().map(|(_, start)| (0u16, *start)).collect();
        let tensors: Vec<TensorInfo> = renamed.into_iter().map(|(t, _)| t).collect();
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let part = Part { mapped, data_offset: 0, alignment: 1, n_tensors: tensors.len() };
        ModelFile { container, parts: vec![part], metadata, tensors, places, index }
    }

    /// The path the model was opened from (for a split model, the first shard's).
    pub fn path(&self) -> &Path {
        self.parts[0].mapped.path()
    }

    /// The container it came in.
    pub fn container(&self) -> &Container {
        &self.container
    }

    /// GGUF version of the (first) file, or the legacy container's version.
    pub fn version(&self) -> u32 {
        match self.container {
            Container::Gguf { version } | Container::Split { version, .. } | Container::Legacy { version, .. } => {
                version
            }
        }
    }

    /// Data alignment of the first file (1 for legacy files, whose tensors are read where they are).
    pub fn alignment(&self) -> u64 {
        self.parts[0].alignment
    }

    /// Absolute offset of the first file's data section (0 for legacy files).
    pub fn data_offset(&self) -> u64 {
        self.parts[0].data_offset
    }

    /// Bytes of all the model's files together.
    pub fn file_size(&self) -> u64 {
        self.parts.iter().map(|p| p.mapped.bytes().len() as u64).sum()
    }

    /// The files of the model, in shard order, with the number of tensors in each.
    pub fn shards(&self) -> Vec<(&Path, usize)> {
        self.parts.iter().map(|p| (p.mapped.path(), p.n_tensors)).collect()
    }

    /// The model's metadata (a split model's first shard's, without the split keys; a legacy file's converted).
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Tensor infos in model order (`offset` is relative to its own file's data section).
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Index (model order) and info of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<(usize, &TensorInfo)> {
        self.index.get(name).map(|&i| (i, &self.tensors[i]))
    }

    /// The shard (0-based) holding tensor `index`.
    pub fn shard_of(&self, index: usize) -> u16 {
        self.places[index].0
    }

    /// The shard of every tensor, in model order.
    pub fn assignment(&self) -> Vec<u16> {
        self.places.iter().map(|p| p.0).collect()
    }

    /// The file holding tensor `index` and the absolute byte range of its data in that file.
    pub fn tensor_source(&self, index: usize) -> (&File, std::ops::Range<u64>) {
        let (part, start) = self.places[index];
        (self.parts[part as usize].mapped.file(), start..start + self.tensors[index].nbytes)
    }

    /// The raw bytes of tensor `index` (no padding), straight from its file's map.
    ///
    /// Panics if `index` is out of range; ranges were validated against the file lengths on open.
    pub fn tensor_data(&self, index: usize) -> &[u8] {
        let (part, start) = self.places[index];
        let start = start as usize;
        &self.parts[part as usize].mapped.bytes()[start..start + self.tensors[index].nbytes as usize]
    }

    /// Drops this process's pages of bytes `range` of tensor `index`'s data (see [`MappedFile::release_pages`]).
    pub fn release_tensor_pages(&self, index: usize, range: std::ops::Range<usize>) {
        let (part, start) = self.places[index];
        let start = start as usize;
        self.parts[part as usize].mapped.release_pages(start + range.start..start + range.end);
    }

    /// Writes the model as GGUF, every tensor copied as it is, divided by `rule` (one file for a legacy model's
    /// conversion or [`SplitRule::Merge`]); `extra_metadata` adds or replaces keys. The output appears only when
    /// every file is complete. Returns the files written, in shard order.
    pub fn write_copy(
        &self,
        out: &Path,
        rule: SplitRule,
        extra_metadata: &[(String, Value)],
        options: WriteOptions,
    ) -> Result<Vec<PathBuf>> {
        let sizes: Vec<u64> = self.tensors.iter().map(|t| t.nbytes).collect();
        let assignment = split::assign_shards(&sizes, rule, &self.assignment())?;
        let count = assignment.last().map_or(1, |&s| s + 1);
        let paths = split::output_paths(out, count)?;
        for path in &paths {
            crate::paths::refuse_output_onto_inputs(path, self.parts.iter().map(|p| p.mapped.path()))?;
        }
        let mut metadata = self.metadata.clone();
        for (key, value) in extra_metadata {
            match metadata.iter_mut().find(|(k, _)| k == key) {
                Some((_, v)) => *v = value.clone(),
                None => metadata.push((key.clone(), value.clone())),
            }
        }
        let specs = self.tensors.iter().map(|t| TensorSpec { name: t.name.clone(), dims: t.dims.clone(), ty: t.ty });
        let mut writer = ShardedWriter::create(&paths, &metadata, specs.collect(), &assignment, options)?;
        for i in 0..self.tensors.len() {
            let (file, range) = self.tensor_source(i);
            writer.copy_from_file(file, range.start, range.end - range.start)?;
        }
        writer.finish()
    }
}
