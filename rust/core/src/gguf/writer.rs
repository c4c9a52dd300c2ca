//! Streaming GGUF v3 writer.
//!
//! The header (metadata and tensor infos with their final offsets) is written first; tensor data then
//! streams in, tensor by tensor in info order, in chunks of any size (a tensor's bytes may come straight
//! from another file's memory map). Everything goes to a temporary file that is renamed onto the target only
//! by [`GgufWriter::finish`], so a failure at any point leaves no partial output.
//!
//! What is written passes every check of ggml's loader: UINT32 power-of-two `general.alignment`, names
//! under 64 bytes, no nested arrays, no duplicate keys or tensors, 1-4 non-zero dims, dense offsets in info
//! order, every tensor (the last included) padded to the alignment with zeros.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::header::{
    align_up, tensor_nbytes, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_ELEMENTS, MAX_NAME_LENGTH,
    MAX_STRING_LENGTH,
};
use super::value::{encode_string, Value, ValueType};
use crate::atomic::AtomicFile;
use crate::error::{Error, Result};
use crate::types::GgmlType;

/// The GGUF version this writer produces.
pub const WRITE_VERSION: u32 = 3;
/// Data is handed to the OS in pieces of at least this size.
const BUFFER_BYTES: usize = 1 << 20;
/// Pieces at least this large skip the buffer (one copy fewer for the patch engine's chunks).
const DIRECT_WRITE_BYTES: usize = 64 << 10;

/// What a tensor will be: name, dims in ggml order (`dims[0]` = row length) and type.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// Tensor name (under 64 bytes).
    pub name: String,
    /// Dims in ggml order, 1 to 4 entries, none zero; `dims[0]` a multiple of the type's block size.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
}

/// Writer settings.
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions {
    /// `fsync` the data and the folder before and after the final rename (default true): a crash right
    /// after `finish` then cannot leave an empty or partial file under the target name.
    pub sync: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { sync: true }
    }
}

/// A GGUF file being written. See the module documentation for the protocol.
pub struct GgufWriter {
    out: AtomicFile,
    options: WriteOptions,
    alignment: u64,
    specs: Vec<(TensorSpec, u64)>,
    buffer: Vec<u8>,
    current: usize,
    written_in_current: u64,
}

impl GgufWriter {
    /// Validates `metadata` and `tensors`, creates the temporary output next to `path` and writes the header.
    /// `general.alignment`, if present, must be UINT32 (a power of two, multiple of 8).
    pub fn create(
        path: impl AsRef<Path>,
        metadata: &[(String, Value)],
        tensors: Vec<TensorSpec>,
        options: WriteOptions,
    ) -> Result<GgufWriter> {
        let path = path.as_ref();
        let (header, alignment, specs) = encode_header(metadata, tensors).map_err(|e| e.in_file(path))?;
        let out = AtomicFile::create(path)?;
        let mut writer = GgufWriter {
            out,
            options,
            alignment,
            specs,
            buffer: Vec::with_capacity(BUFFER_BYTES),
            current: 0,
            written_in_current: 0,
        };
        writer.write_out(&header)?;
        Ok(writer)
    }

    /// The tensors, with their data sizes in bytes, in the order their data must be written.
    pub fn tensors(&self) -> impl Iterator<Item = (&TensorSpec, u64)> {
        self.specs.iter().map(|(s, n)| (s, *n))
    }

    /// Index of the tensor whose data is expected next (== number of tensors once all are complete).
    pub fn current_tensor(&self) -> usize {
        self.current
    }

    /// Appends `chunk` to the data of the current tensor. When a tensor's data is complete it is padded and
    /// the next tensor becomes current. Writing more bytes than the tensor holds is an error.
    pub fn write_data(&mut self, chunk: &[u8]) -> Result<()> {
        self.check_room(chunk.len() as u64)?;
        self.write_out(chunk)?;
        self.advance(chunk.len() as u64)
    }

    /// Appends `len` bytes of `src` starting at byte `offset` to the current tensor, copied by the kernel
    /// (`copy_file_range` where available) without passing through this process's memory.
    pub fn copy_from_file(&mut self, src: &std::fs::File, offset: u64, len: u64) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        self.check_room(len)?;
        self.flush_buffer()?;
        let temp = self.out.temp_path().to_path_buf();
        let mut reader = src.try_clone().map_err(|e| Error::io(&temp, e))?;
        reader.seek(SeekFrom::Start(offset)).map_err(|e| Error::io(&temp, e))?;
        let copied = std::io::copy(&mut reader.take(len), self.out.file()).map_err(|e| Error::io(&temp, e))?;
        if copied != len {
            return Err(Error::io(
                &temp,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("source file ended after {copied} of {len} bytes at offset {offset}"),
                ),
            ));
        }
        self.advance(len)
    }

    fn check_room(&self, len: u64) -> Result<()> {
        let Some((spec, nbytes)) = self.specs.get(self.current) else {
            return Err(Error::WriterState(format!(
                "{len} bytes of data after all {} tensors are complete",
                self.specs.len()
            )));
        };
        let left = nbytes - self.written_in_current;
        if len > left {
            return Err(Error::InvalidTensor {
                name: spec.name.clone(),
                reason: format!("{len} bytes of data given, only {left} of its {nbytes} bytes remain"),
            }
            .in_file(self.out.target()));
        }
        Ok(())
    }

    /// Accounts for `len` bytes of the current tensor; pads and moves on when it is complete.
    fn advance(&mut self, len: u64) -> Result<()> {
        self.written_in_current += len;
        let nbytes = self.specs[self.current].1;
        if self.written_in_current == nbytes {
            let padding = align_up(nbytes, self.alignment).unwrap_or(nbytes) - nbytes;
            self.write_out(&vec![0u8; padding as usize])?;
            self.current += 1;
            self.written_in_current = 0;
        }
        Ok(())
    }

    /// Writes the complete data of the current tensor, which must be called `name`.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        match self.specs.get(self.current) {
            Some((spec, nbytes)) if spec.name == name && self.written_in_current == 0 => {
                if data.len() as u64 != *nbytes {
                    return Err(Error::InvalidTensor {
                        name: name.to_owned(),
                        reason: format!("data is {} bytes, expected {nbytes}", data.len()),
                    }
                    .in_file(self.out.target()));
                }
                self.write_data(data)
            }
            Some((spec, _)) => Err(Error::WriterState(format!(
                "data for tensor {name:?} given while tensor {:?} is expected",
                spec.name
            ))),
            None => Err(Error::WriterState(format!("data for tensor {name:?} after all tensors are complete"))),
        }
    }

    /// Checks that every tensor is complete, then flushes and renames the file into place.
    pub fn finish(self) -> Result<PathBuf> {
        let sync = self.options.sync;
        self.finish_unrenamed()?.commit(sync)
    }

    /// Checks that every tensor is complete and flushes the buffer, but leaves the file under its temporary
    /// name: the caller commits it, with others that belong to it ([`crate::atomic::commit_all`]).
    pub fn finish_unrenamed(mut self) -> Result<AtomicFile> {
        if self.current != self.specs.len() {
            let (spec, nbytes) = &self.specs[self.current];
            return Err(Error::WriterState(format!(
                "finish() with tensor {:?} incomplete ({} of {nbytes} bytes written, {} tensors left)",
                spec.name,
                self.written_in_current,
                self.specs.len() - self.current
            )));
        }
        self.flush_buffer()?;
        Ok(self.out)
    }

    /// Whether `fsync` was asked for.
    pub fn sync(&self) -> bool {
        self.options.sync
    }

    fn write_out(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.len() >= DIRECT_WRITE_BYTES {
            // Buffered bytes go first: output order is file order.
            self.flush_buffer()?;
            let temp = self.out.temp_path().to_path_buf();
            return self.out.file().write_all(bytes).map_err(|e| Error::io(temp, e));
        }
        if self.buffer.len() + bytes.len() > BUFFER_BYTES {
            self.flush_buffer()?;
        }
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }

    fn flush_buffer(&mut self) -> Result<()> {
        if !self.buffer.is_empty() {
            let temp = self.out.temp_path().to_path_buf();
            self.out.file().write_all(&self.buffer).map_err(|e| Error::io(temp, e))?;
            self.buffer.clear();
        }
        Ok(())
    }
}

type EncodedHeader = (Vec<u8>, u64, Vec<(TensorSpec, u64)>);

/// Validates and encodes everything before the tensor data, padding included.
fn encode_header(metadata: &[(String, Value)], tensors: Vec<TensorSpec>) -> Result<EncodedHeader> {
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut keys = HashSet::with_capacity(metadata.len());
    for (key, value) in metadata {
        let invalid = |reason: String| Error::InvalidMetadata { key: key.clone(), reason };
        if key.is_empty() {
            return Err(invalid("empty key".into()));
        }
        if !keys.insert(key.as_str()) {
            return Err(invalid("duplicate key".into()));
        }
        check_value(value, true).map_err(invalid)?;
        if key == ALIGNMENT_KEY {
            alignment = match value {
                Value::U32(a) if a.is_power_of_two() && a % 8 == 0 => u64::from(*a),
                Value::U32(a) => return Err(invalid(format!("alignment {a} is not a power of two multiple of 8"))),
                other => return Err(invalid(format!("must be UINT32, got {}", other.value_type()))),
            };
        }
    }

    let mut names = HashSet::with_capacity(tensors.len());
    let mut specs = Vec::with_capacity(tensors.len());
    for spec in tensors {
        let invalid = |reason: String| Error::InvalidTensor { name: spec.name.clone(), reason };
        if spec.name.len() >= MAX_NAME_LENGTH {
            return Err(invalid(format!("name is {} bytes long, ggml allows at most 63", spec.name.len())));
        }
        if !names.insert(spec.name.clone()) {
            return Err(invalid("duplicate tensor name".into()));
        }
        // The reader's own check, so what is written is exactly what ggml accepts; its message names the tensor.
        let nbytes = tensor_nbytes(&spec.name, &spec.dims, spec.ty).map_err(Error::InvalidTensorInfo)?;
        specs.push((spec, nbytes));
    }

    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(&GGUF_MAGIC);
    out.extend_from_slice(&WRITE_VERSION.to_le_bytes());
    out.extend_from_slice(&(specs.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        encode_string(key.as_bytes(), &mut out);
        out.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
        value.encode(&mut out);
    }
    let mut offset: u64 = 0;
    for (spec, nbytes) in &specs {
        encode_string(spec.name.as_bytes(), &mut out);
        out.extend_from_slice(&(spec.dims.len() as u32).to_le_bytes());
        for d in &spec.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&spec.ty.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset = align_up(offset + nbytes, alignment).ok_or_else(|| Error::InvalidTensor {
            name: spec.name.clone(),
            reason: "file would exceed 2^64 bytes".into(),
        })?;
    }
    if !specs.is_empty() {
        let padded = align_up(out.len() as u64, alignment).unwrap_or(out.len() as u64);
        out.resize(padded as usize, 0);
    }
    Ok((out, alignment, specs))
}

/// Checks a value a ggml reader would accept: no nested arrays, homogeneous arrays, lengths under ggml's caps.
fn check_value(value: &Value, top_level: bool) -> std::result::Result<(), String> {
    match value {
        Value::String(bytes) if bytes.len() as u64 > MAX_STRING_LENGTH => {
            Err(format!("string of {} bytes exceeds ggml's limit of {MAX_STRING_LENGTH}", bytes.len()))
        }
        Value::Array(array) => {
            if !top_level || array.elem_type == ValueType::Array {
                return Err("nested arrays are not accepted by ggml's loader".into());
            }
            if array.items.len() as u64 > MAX_ARRAY_ELEMENTS {
                return Err(format!("array of {} elements exceeds ggml's limit", array.items.len()));
            }
            for (i, item) in array.items.iter().enumerate() {
                if item.value_type() != array.elem_type {
                    return Err(format!(
                        "array element {i} has type {}, the array's type is {}",
                        item.value_type(),
                        array.elem_type
                    ));
                }
                check_value(item, false)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Array, GgufFile, GgufHeader};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ggml-lora-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn spec(name: &str, dims: &[u64], ty: GgmlType) -> TensorSpec {
        TensorSpec { name: name.into(), dims: dims.to_vec(), ty }
    }

    #[test]
    fn round_trip_with_alignment_and_streamed_chunks() {
        let path = scratch("rt.gguf");
        let metadata = vec![
            ("general.architecture".to_string(), Value::string("llama")),
            (ALIGNMENT_KEY.to_string(), Value::U32(64)),
            (
                "tokens".to_string(),
                Value::Array(Array {
                    elem_type: ValueType::String,
                    items: vec![Value::string("a"), Value::string("")],
                }),
            ),
            ("flag".to_string(), Value::Bool(true)),
            ("big".to_string(), Value::U64(u64::MAX)),
        ];
        let tensors = vec![spec("a", &[3, 2], GgmlType::F32), spec("b", &[32], GgmlType::Q8_0)];
        let mut w = GgufWriter::create(&path, &metadata, tensors, WriteOptions { sync: false }).unwrap();
        let a: Vec<u8> = (0..24).collect();
        w.write_data(&a[..5]).unwrap();
        w.write_data(&a[5..]).unwrap();
        w.write_tensor("b", &[7u8; 34]).unwrap();
        w.finish().unwrap();

        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.header().version, 3);
        assert_eq!(f.header().alignment, 64);
        assert_eq!(f.header().metadata, metadata);
        assert_eq!(f.header().data_offset % 64, 0);
        assert_eq!(f.tensor_data(0), &a[..]);
        assert_eq!(f.tensor_data(1), &[7u8; 34][..]);
        assert_eq!(f.tensors()[1].relative_offset, 64);
        // The last tensor is padded too.
        assert_eq!(f.bytes().len() as u64, f.header().data_offset + 128);
    }

    #[test]
    fn refuses_what_ggml_refuses() {
        let nested = Value::Array(Array {
            elem_type: ValueType::Array,
            items: vec![Value::Array(Array { elem_type: ValueType::U8, items: vec![] })],
        });
        let cases: Vec<(Vec<(String, Value)>, Vec<TensorSpec>, &str)> = vec![
            (vec![("k".into(), nested)], vec![], "nested arrays"),
            (vec![(ALIGNMENT_KEY.into(), Value::U64(32))], vec![], "must be UINT32"),
            (vec![(ALIGNMENT_KEY.into(), Value::U32(48))], vec![], "power of two"),
            (vec![("k".into(), Value::U8(1)), ("k".into(), Value::U8(2))], vec![], "duplicate key"),
            (vec![], vec![spec("t", &[33], GgmlType::Q4_0)], "not a multiple"),
            (vec![], vec![spec("t", &[32, 0], GgmlType::F32)], "size 0"),
            (vec![], vec![spec("t", &[1, 1, 1, 1, 1], GgmlType::F32)], "dimensions"),
            (vec![], vec![spec(&"x".repeat(64), &[1], GgmlType::F32)], "at most 63"),
            (vec![], vec![spec("t", &[1], GgmlType::F32), spec("t", &[1], GgmlType::F32)], "duplicate tensor"),
        ];
        for (metadata, tensors, expected) in cases {
            let path = scratch("refused.gguf");
            let err = GgufWriter::create(&path, &metadata, tensors, WriteOptions::default()).err().unwrap();
            assert!(err.to_string().contains(expected), "{err} should mention {expected:?}");
            assert!(!path.exists());
        }
    }

    #[test]
    fn out_of_order_and_incomplete_writes_leave_no_file() {
        let path = scratch("incomplete.gguf");
        let tensors = vec![spec("a", &[4], GgmlType::F32), spec("b", &[4], GgmlType::F32)];
        let mut w = GgufWriter::create(&path, &[], tensors.clone(), WriteOptions::default()).unwrap();
        assert!(w.write_tensor("b", &[0; 16]).is_err());
        assert!(w.write_data(&[0; 17]).is_err());
        w.write_tensor("a", &[0; 16]).unwrap();
        let err = w.finish().err().unwrap();
        assert!(err.to_string().contains("\"b\" incomplete"), "{err}");
        assert!(!path.exists());

        let w = GgufWriter::create(&path, &[], tensors, WriteOptions::default()).unwrap();
        drop(w);
        assert!(!path.exists());
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("incomplete.gguf"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn empty_file_has_no_padding() {
        let path = scratch("empty.gguf");
        GgufWriter::create(&path, &[], vec![], WriteOptions::default()).unwrap().finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 24);
        let h = GgufHeader::parse(&bytes).unwrap();
        assert!(h.tensors.is_empty() && h.metadata.is_empty());
    }
}
