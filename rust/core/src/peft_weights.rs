//! The weights of a PEFT adapter folder: `adapter_model.safetensors` memory-mapped and validated by the
//! `safetensors` crate, or `adapter_model.bin` (a torch zip, materialised by [`crate::torch_bin`]).
//!
//! Opening reads only the header: tensor data stays in the map until [`PeftWeights::read_f32`] converts one
//! tensor to f32 and releases its pages, so an adapter of any size costs the memory of the tensor being read.
//!
//! The crate checks the header's length (at most 100 MB and within the file), UTF-8 and JSON syntax (nesting
//! and number sizes bounded by `serde_json`), each entry's fields and dtype name, that shape × dtype size equals
//! the entry's byte range without overflow, and that the ranges tile the data section exactly (from 0, end to
//! end, up to the end of the file). Added here, because the crate would accept them: a tensor name that appears
//! twice (the crate keeps the last), a dtype other than F32/F16/BF16/F64, more than [`MAX_DIMS`] dimensions;
//! and every refusal names the tensor when there is one.

use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype as StDtype, Metadata, TensorInfo as StInfo};
use safetensors::{SafeTensorError, SafeTensors};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{Error, Malformed, Result, SafetensorsProblem};
use crate::mapped::MappedFile;
use crate::quant::{bf16_bits_to_f32, f16_bits_to_f32};
use crate::torch_bin;

/// Most dimensions a tensor of the weights file may have (LoRA factors have 2, magnitudes 1).
pub const MAX_DIMS: usize = 8;

/// The element type of a weight tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// IEEE float32.
    F32,
    /// IEEE float16.
    F16,
    /// bfloat16 (`.bin` files hold it already widened to f32, exactly).
    BF16,
    /// IEEE float64 (converted to f32 with round-to-nearest, as numpy's `astype(float32)`).
    F64,
    /// A non-floating type of a torch `.bin` (its torch name): listed, refused as a LoRA factor.
    Other(&'static str),
}

impl WeightDtype {
    /// The safetensors name (`"F32"`, ...) or torch's name of a non-floating type.
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "F32",
            WeightDtype::F16 => "F16",
            WeightDtype::BF16 => "BF16",
            WeightDtype::F64 => "F64",
            WeightDtype::Other(name) => name,
        }
    }
}

/// One tensor of the weights file.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightInfo {
    /// The state-dict key, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub name: String,
    /// Element type.
    pub dtype: WeightDtype,
    /// Shape, numpy order.
    pub shape: Vec<u64>,
    /// Bytes of the data: absolute in the mapped file, or in the tensor's own buffer (`.bin`).
    range: Range<usize>,
}

enum Storage {
    /// The safetensors file, mapped; ranges are absolute.
    Mapped(MappedFile),
    /// Tensors materialised from a torch `.bin`, one buffer per tensor (in tensor order).
    Memory(Vec<Vec<u8>>),
}

/// An adapter's weights file, open: the tensor list, and their data read on demand.
pub struct PeftWeights {
    path: PathBuf,
    tensors: Vec<WeightInfo>,
    storage: Storage,
}

impl std::fmt::Debug for PeftWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeftWeights").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

fn refuse(offset: u64, problem: SafetensorsProblem) -> Error {
    Error::Malformed { format: "safetensors", offset, kind: Malformed::Safetensors(problem) }
}

impl PeftWeights {
    /// Maps and validates `adapter_model.safetensors` (see the module documentation). Errors name the file.
    pub fn open_safetensors(path: impl AsRef<Path>) -> Result<PeftWeights> {
        let path = path.as_ref();
        let mapped = MappedFile::open(path)?;
        let tensors = parse_safetensors(mapped.bytes()).map_err(|e| e.in_file(path))?;
        Ok(PeftWeights { path: path.to_path_buf(), tensors, storage: Storage::Mapped(mapped) })
    }

    /// Reads a torch `.bin` state dict (never executing anything, see [`crate::torch_bin`]); its tensors are
    /// materialised (adapters saved this way are small). Errors name the file.
    pub fn open_torch_bin(path: impl AsRef<Path>) -> Result<PeftWeights> {
        let path = path.as_ref();
        let mut tensors = Vec::new();
        let mut buffers = Vec::new();
        for t in torch_bin::read_torch_bin(path)? {
            let dtype = match t.dtype {
                torch_bin::Dtype::F32 => WeightDtype::F32,
                torch_bin::Dtype::F16 => WeightDtype::F16,
                torch_bin::Dtype::BF16 => WeightDtype::F32, // widened by the reader
                torch_bin::Dtype::F64 => WeightDtype::F64,
                other => WeightDtype::Other(other.torch_name()),
            };
            tensors.push(WeightInfo { name: t.name, dtype, shape: t.shape, range: 0..t.data.len() });
            buffers.push(t.data);
        }
        Ok(PeftWeights { path: path.to_path_buf(), tensors, storage: Storage::Memory(buffers) })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensors, in the file's data order (safetensors) or state-dict order (`.bin`).
    pub fn tensors(&self) -> &[WeightInfo] {
        &self.tensors
    }

    /// The index of the tensor `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.tensors.iter().position(|t| t.name == name)
    }

    /// Tensor `index` converted to f32 (row-major, numpy order); a floating type is required, and every value
    /// must be finite (NaN or ±inf, including f64 values beyond the f32 range, is an error naming the tensor).
    /// A mapped tensor's pages are released afterwards.
    pub fn read_f32(&self, index: usize) -> Result<Vec<f32>> {
        self.read_rows_f32(index, None)
    }

    /// [`PeftWeights::read_f32`] with the rows (along the first dimension) reordered as they are converted, in
    /// the same pass: output row `j` is source row `source_row(j)`, which must be a permutation.
    pub fn read_rows_f32(&self, index: usize, source_row: Option<&dyn Fn(usize) -> usize>) -> Result<Vec<f32>> {
        let t = &self.tensors[index];
        let bytes = match &self.storage {
            Storage::Mapped(m) => &m.bytes()[t.range.clone()],
            Storage::Memory(buffers) => &buffers[index][t.range.clone()],
        };
        let convert: fn(&[u8]) -> f32 = match t.dtype {
            WeightDtype::F32 => |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            WeightDtype::F16 => |c| f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])),
            WeightDtype::BF16 => |c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])),
            WeightDtype::F64 => |c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32,
            WeightDtype::Other(name) => {
                let reason = format!("dtype {name} is not a floating-point type");
                return Err(Error::InvalidTensor { name: t.name.clone(), reason }.in_file(&self.path));
            }
        };
        let size = match t.dtype {
            WeightDtype::F16 | WeightDtype::BF16 => 2,
            WeightDtype::F64 => 8,
            _ => 4,
        };
        let values: Vec<f32> = match source_row {
            None => bytes.chunks_exact(size).map(convert).collect(),
            Some(source_row) => {
                let rows = t.shape.first().map_or(1, |&r| r as usize).max(1);
                let row_bytes = bytes.len() / rows;
                (0..rows)
                    .flat_map(|j| {
                        let src = source_row(j) * row_bytes;
                        bytes[src..src + row_bytes].chunks_exact(size).map(convert)
                    })
                    .collect()
            }
        };
        if let Storage::Mapped(m) = &self.storage {
            m.release_pages(t.range.clone());
        }
        if values.iter().any(|v| !v.is_finite()) {
            let reason = "contains NaN or infinite values".into();
            return Err(Error::InvalidTensor { name: t.name.clone(), reason }.in_file(&self.path));
        }
        Ok(values)
    }
}

/// Validates a whole safetensors file (header and the tiling of its data) and lists its tensors.
fn parse_safetensors(bytes: &[u8]) -> Result<Vec<WeightInfo>> {
    let (n, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| explain(bytes, e))?;
    let data_start = 8 + n;
    // The crate keeps the last of two entries of one name: refuse the file instead.
    header_entries(&bytes[8..data_start])?;
    let mut tensors = Vec::with_capacity(metadata.offset_keys().len());
    for name in metadata.offset_keys() {
        let Some(info) = metadata.info(&name) else { continue };
        let dtype = match info.dtype {
            StDtype::F32 => WeightDtype::F32,
            StDtype::F16 => WeightDtype::F16,
            StDtype::BF16 => WeightDtype::BF16,
            StDtype::F64 => WeightDtype::F64,
            other => return Err(refuse(8, SafetensorsProblem::Dtype { name, dtype: format!("{other:?}") })),
        };
        if info.shape.len() > MAX_DIMS {
            return Err(refuse(8, SafetensorsProblem::TooManyDims { name, dims: info.shape.len() }));
        }
        let (begin, end) = info.data_offsets;
        tensors.push(WeightInfo {
            name,
            dtype,
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            range: data_start + begin..data_start + end,
        });
    }
    Ok(tensors)
}

/// The header's entries in file order, as raw JSON, `__metadata__` left out; a name given twice is an error.
/// Only called on a header the crate has parsed (or failed to explain).
fn header_entries(header: &[u8]) -> Result<Vec<(String, &RawValue)>> {
    struct Entries<'a>(Vec<(String, &'a RawValue)>, Option<String>);
    impl<'de> Deserialize<'de> for Entries<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Entries<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> std::result::Result<Self::Value, A::Error> {
                    let mut seen = std::collections::HashSet::new();
                    let mut out = Vec::new();
                    while let Some(key) = map.next_key::<String>()? {
                        let value: &'de RawValue = map.next_value()?;
                        if !seen.insert(key.clone()) {
                            return Ok(Entries(out, Some(key)));
                        }
                        if key != "__metadata__" {
                            out.push((key, value));
                        }
                    }
                    Ok(Entries(out, None))
                }
            }
            d.deserialize_map(V)
        }
    }
    let text = std::str::from_utf8(header)
        .map_err(|e| refuse(8, SafetensorsProblem::Header(format!("invalid UTF-8 in header: {e}"))))?;
    let entries: Entries<'_> = serde_json::from_str(text)
        .map_err(|e| refuse(8, SafetensorsProblem::Header(format!("invalid JSON in header: {e}"))))?;
    match entries.1 {
        Some(name) => Err(refuse(8, SafetensorsProblem::Duplicate { name })),
        None => Ok(entries.0),
    }
}

/// The crate's refusal as an error of ours, naming the tensor when the crate does not.
fn explain(bytes: &[u8], err: SafeTensorError) -> Error {
    use SafetensorsProblem as P;
    let file_len = bytes.len() as u64;
    let length = bytes.get(..8).map(|h| u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]));
    let header = bytes.get(8..).and_then(|rest| rest.get(..usize::try_from(length?).ok()?)).unwrap_or_default();
    // The entries that parse on their own, in data order, when the crate's error needs their offsets.
    let placed = || -> Vec<(String, StInfo)> {
        let mut placed: Vec<(String, StInfo)> = header_entries(header)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, raw)| serde_json::from_str::<StInfo>(raw.get()).ok().map(|info| (name, info)))
            .collect();
        placed.sort_by_key(|(_, info)| info.data_offsets);
        placed
    };
    match err {
        SafeTensorError::HeaderTooSmall | SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => {
            refuse(0, P::HeaderLength { length, file_len })
        }
        SafeTensorError::InvalidOffset(name) => {
            let placed = placed();
            let at = placed.iter().position(|(n, _)| *n == name).unwrap_or(0);
            let (previous, previous_end) = match at.checked_sub(1).and_then(|p| placed.get(p)) {
                Some((n, info)) => (Some(n.clone()), info.data_offsets.1 as u64),
                None => (None, 0),
            };
            let offsets = placed.get(at).map_or((0, 0), |(_, info)| info.data_offsets);
            let offsets = [offsets.0 as u64, offsets.1 as u64];
            refuse(8, P::Offsets { name, offsets, previous, previous_end })
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            let end = placed().last().map_or(0, |(_, info)| info.data_offsets.1 as u64);
            let data_start = 8 + header.len() as u64;
            refuse(data_start, P::DataEnd { end, data_len: file_len - data_start })
        }
        other => {
            // An entry's own problem (a field of the wrong type, an unknown dtype, a shape that overflows or
            // does not match its range) names the tensor; checked by the crate one entry at a time.
            let named = header_entries(header).ok().and_then(|entries| {
                entries.into_iter().find_map(|(name, raw)| entry_problem(&name, raw.get()).map(|reason| (name, reason)))
            });
            match named {
                Some((name, reason)) => refuse(8, P::Entry { name, reason }),
                None => refuse(8, P::Header(other.to_string())),
            }
        }
    }
}

/// What is wrong with one header entry on its own, in the crate's words, or `None`.
fn entry_problem(name: &str, raw: &str) -> Option<String> {
    let info: StInfo = match serde_json::from_str(raw) {
        Ok(info) => info,
        Err(e) => {
            return Some(format!(
                "malformed entry ({e}); expected {{\"dtype\": name, \"shape\": [dims], \"data_offsets\": [begin, end]}}"
            ))
        }
    };
    let (begin, end) = info.data_offsets;
    let describe = |e: SafeTensorError| {
        format!("shape {:?} of {:?} and data_offsets [{begin}, {end}]: {e}", info.shape, info.dtype)
    };
    if end < begin {
        return Some(describe(SafeTensorError::InvalidOffset(name.to_owned())));
    }
    // The same entry placed at the start of a data section: the crate's own shape/size arithmetic.
    let alone = StInfo { data_offsets: (0, end - begin), ..info.clone() };
    Metadata::new(None, vec![(name.to_owned(), alone)]).err().map(describe)
}
