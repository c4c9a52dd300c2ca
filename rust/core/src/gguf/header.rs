//! Parsing and validating a GGUF header (everything before the tensor data) from untrusted bytes.
//!
//! Every count and length is checked against the bytes left in the file before anything is allocated, so a
//! small hostile file cannot make the parser allocate much more than its own size. The checks mirror ggml's
//! `gguf_init_from_file_impl` (`ggml/src/gguf.cpp`), so a file accepted here is accepted by llama.cpp.

use std::collections::HashSet;

use super::value::{Array, Value, ValueType};
use crate::error::{Error, Malformed, Result};
use crate::types::GgmlType;

/// The four magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Key of the alignment value (must be UINT32, a power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Longest string ggml accepts (`GGUF_MAX_STRING_LENGTH`), in bytes.
pub const MAX_STRING_LENGTH: u64 = 1 << 30;
/// Most elements ggml accepts in one array (`GGUF_MAX_ARRAY_ELEMENTS`).
pub const MAX_ARRAY_ELEMENTS: u64 = 1 << 30;
/// Most dimensions of a tensor (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Tensor names must be shorter than this many bytes (`GGML_MAX_NAME`).
pub const MAX_NAME_LENGTH: usize = 64;
/// Deepest nesting of arrays in arrays this reader follows (ggml accepts none; the spec allows them).
pub const MAX_ARRAY_NESTING: usize = 8;
/// Most memory the decoded metadata values may take (estimated: one `Value` slot per array element plus the
/// bytes of every string). A decoded one-byte array element takes 32 bytes, so without this cap a hostile file
/// of N bytes could make the parser allocate ~32 N (a 16 MB file holding one UINT8 array took 490 MB). Real
/// models stay far below: a 262k-token vocabulary (tokens, scores, types) decodes to about 35 MB.
pub const MAX_METADATA_MEMORY: u64 = 512 << 20;

/// Where a tensor lives and what it holds, as read from its tensor info.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, at most 63 bytes of UTF-8.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` (ne[0]) is the row length; 1 to 4 entries, none zero.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section (a multiple of the alignment), as the file stores
    /// it. Every other "offset" in this project is absolute (from the start of the file); this one is not, and
    /// its name says so.
    pub relative_offset: u64,
    /// Size of the data in bytes (without padding).
    pub nbytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Elements per row (ne[0]).
    pub fn row_len(&self) -> u64 {
        self.dims[0]
    }

    /// Number of rows (product of ne[1..]).
    pub fn n_rows(&self) -> u64 {
        self.dims[1..].iter().product()
    }

    /// The shape in numpy order (the reverse of `dims`).
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// Computes the byte size of a tensor from its dims and type, validating it the way ggml does.
pub fn tensor_nbytes(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, Malformed> {
    if dims.is_empty() || dims.len() > MAX_DIMS as usize {
        return Err(Malformed::BadDimCount { name: name.to_owned(), n_dims: dims.len() as u32 });
    }
    if let Some(index) = dims.iter().position(|&d| d == 0) {
        return Err(Malformed::ZeroDim { name: name.to_owned(), index });
    }
    let overflow = || Malformed::SizeOverflow { name: name.to_owned(), dims: dims.to_vec() };
    let mut n_elements: u64 = 1;
    for &d in dims {
        n_elements = n_elements.checked_mul(d).ok_or_else(overflow)?;
    }
    if n_elements > i64::MAX as u64 {
        return Err(overflow());
    }
    let row_bytes = ty.row_bytes(dims[0]).ok_or_else(|| Malformed::RowNotBlockMultiple {
        name: name.to_owned(),
        ty,
        row_len: dims[0],
        block: ty.block_size(),
    })?;
    let n_rows = n_elements / dims[0];
    row_bytes.checked_mul(n_rows).filter(|&b| b <= i64::MAX as u64).ok_or_else(overflow)
}

/// Rounds `offset` up to a multiple of `alignment` (a power of two), or `None` on overflow.
pub fn align_up(offset: u64, alignment: u64) -> Option<u64> {
    offset.checked_add(alignment - 1).map(|o| o & !(alignment - 1))
}

/// A parsed and validated GGUF header.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Data alignment in bytes (from `general.alignment`, default 32).
    pub alignment: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensor infos in file order; their data is dense and in this order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

impl GgufHeader {
    /// The metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Absolute byte range of tensor `index`'s data.
    pub fn tensor_range(&self, index: usize) -> std::ops::Range<u64> {
        let t = &self.tensors[index];
        let start = self.data_offset + t.relative_offset;
        start..start + t.nbytes
    }

    /// Parses and validates the header of a GGUF file whose complete contents are `bytes`. Tensor data is
    /// not read, only checked to lie inside `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<GgufHeader> {
        Parser { bytes, pos: 0, decoded: 0 }.header()
    }
}

/// A cursor over untrusted bytes that reports the absolute offset of every failure.
struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Estimated bytes of decoded metadata so far (see [`MAX_METADATA_MEMORY`]).
    decoded: u64,
}

impl<'a> Parser<'a> {
    fn error_at(&self, offset: usize, kind: Malformed) -> Error {
        Error::Malformed { format: "GGUF", offset: offset as u64, kind }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error_at(
                self.pos,
                Malformed::Truncated { what: what(), needed: n as u64, available: self.remaining() as u64 },
            ));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let slice = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Reads a count and checks that `count` items of at least `min_item_size` bytes each fit in what is left
    /// of the file (and under `limit`), so that allocating `count` slots is safe.
    fn count(&mut self, what: &dyn Fn() -> String, min_item_size: usize, limit: u64) -> Result<usize> {
        let at = self.pos;
        let count = self.u64(what)?;
        let fits = (self.remaining() / min_item_size.max(1)) as u64;
        let bound = limit.min(fits);
        if count > bound {
            return Err(self.error_at(at, Malformed::TooMany { what: what(), count, limit: bound }));
        }
        Ok(count as usize)
    }

    /// Accounts for `bytes` more of decoded metadata, refusing the file (before allocating) past the cap.
    fn charge(&mut self, at: usize, bytes: u64, what: &dyn Fn() -> String) -> Result<()> {
        self.decoded = self.decoded.saturating_add(bytes);
        if self.decoded > MAX_METADATA_MEMORY {
            return Err(self.error_at(
                at,
                Malformed::TooMany {
                    what: format!("bytes of decoded metadata (at {})", what()),
                    count: self.decoded,
                    limit: MAX_METADATA_MEMORY,
                },
            ));
        }
        Ok(())
    }

    fn string_bytes(&mut self, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > MAX_STRING_LENGTH {
            return Err(self.error_at(at, Malformed::TooMany { what: what(), count: len, limit: MAX_STRING_LENGTH }));
        }
        self.take(len as usize, what)
    }

    fn utf8_string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let bytes = self.string_bytes(what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error_at(at, Malformed::InvalidUtf8 { what: what() }))
    }

    fn header(mut self) -> Result<GgufHeader> {
        let magic: [u8; 4] = self.array(&|| "magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(self.error_at(0, Malformed::BadMagic { found: magic, expected: "GGUF" }));
        }
        let version = self.u32(&|| "version".into())?;
        match version {
            2 | 3 => {}
            0 => return Err(self.error_at(4, Malformed::UnsupportedVersion { version, hint: "only GGUF v2 and v3" })),
            v if v & 0xFFFF == 0 => return Err(self.error_at(4, Malformed::BigEndian { raw: v })),
            1 => {
                return Err(self.error_at(
                    4,
                    Malformed::UnsupportedVersion {
                        version,
                        hint: "GGUF v1 (2023) is not supported; re-convert the model with a current llama.cpp",
                    },
                ))
            }
            _ => {
                return Err(self.error_at(
                    4,
                    Malformed::UnsupportedVersion { version, hint: "newer than v3; only GGUF v2 and v3 are supported" },
                ))
            }
        }

        // A tensor info takes at least 8 (name length) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset).
        let n_tensors = self.count(&|| "tensor count".into(), 32, i64::MAX as u64)?;
        // A key/value takes at least 8 (key length) + 4 (type) + 1 (value).
        let n_kv = self.count(&|| "metadata key/value count".into(), 13, i64::MAX as u64)?;

        let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv);
        let mut keys = HashSet::with_capacity(n_kv);
        let mut alignment = DEFAULT_ALIGNMENT;
        for i in 0..n_kv {
            let key_at = self.pos;
            let key = self.utf8_string(&|| format!("key of metadata entry {i}"))?;
            if key.is_empty() {
                return Err(self.error_at(key_at, Malformed::EmptyKey));
            }
            if !keys.insert(key.clone()) {
                return Err(self.error_at(key_at, Malformed::DuplicateKey { key }));
            }
            let type_at = self.pos;
            let ty = self.value_type(&key)?;
            let value = self.value(ty, &key, 0)?;
            if key == ALIGNMENT_KEY {
                alignment = match value {
                    Value::U32(a) if a.is_power_of_two() => a.into(),
                    Value::U32(a) => {
                        return Err(self.error_at(
                            type_at,
                            Malformed::BadAlignment { reason: format!("is {a}, not a power of two") },
                        ))
                    }
                    ref other => {
                        return Err(self.error_at(
                            type_at,
                            Malformed::BadAlignment {
                                reason: format!("has type {}, must be UINT32", other.value_type()),
                            },
                        ))
                    }
                };
            }
            metadata.push((key, value));
        }

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors);
        let mut names = HashSet::with_capacity(n_tensors);
        let mut expected_offset: u64 = 0;
        let mut offsets_at = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name_at = self.pos;
            let name = self.utf8_string(&|| format!("name of tensor {i}"))?;
            if name.len() >= MAX_NAME_LENGTH {
                return Err(self.error_at(name_at, Malformed::NameTooLong { len: name.len(), name }));
            }
            if !names.insert(name.clone()) {
                return Err(self.error_at(name_at, Malformed::DuplicateTensor { name }));
            }
            let dims_at = self.pos;
            let n_dims = self.u32(&|| format!("dimension count of tensor {name:?}"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(self.error_at(dims_at, Malformed::BadDimCount { name, n_dims }));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for j in 0..n_dims {
                dims.push(self.u64(&|| format!("dimension {j} of tensor {name:?}"))?);
            }
            let type_at = self.pos;
            let type_id = self.u32(&|| format!("type of tensor {name:?}"))?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| {
                self.error_at(type_at, Malformed::UnknownTensorType { name: name.clone(), id: type_id })
            })?;
            let nbytes = tensor_nbytes(&name, &dims, ty).map_err(|kind| self.error_at(dims_at, kind))?;
            offsets_at.push(self.pos);
            let offset = self.u64(&|| format!("data offset of tensor {name:?}"))?;
            if offset != expected_offset {
                return Err(self.error_at(
                    self.pos - 8,
                    Malformed::TensorOffset { name, expected: expected_offset, found: offset },
                ));
            }
            expected_offset =
                align_up(offset.saturating_add(nbytes), alignment).filter(|&o| o <= i64::MAX as u64).ok_or_else(
                    || self.error_at(dims_at, Malformed::SizeOverflow { name: name.clone(), dims: dims.clone() }),
                )?;
            tensors.push(TensorInfo { name, dims, ty, relative_offset: offset, nbytes });
        }

        // ggml pads to the alignment only when there are tensors.
        let data_offset =
            if tensors.is_empty() { self.pos as u64 } else { align_up(self.pos as u64, alignment).unwrap_or(u64::MAX) };
        let file_len = self.bytes.len() as u64;
        for (t, &at) in tensors.iter().zip(&offsets_at) {
            let start = data_offset.saturating_add(t.relative_offset);
            let end = start.saturating_add(t.nbytes);
            if end > file_len {
                return Err(
                    self.error_at(at, Malformed::TensorOutOfFile { name: t.name.clone(), start, end, file_len })
                );
            }
        }
        Ok(GgufHeader { version, alignment, metadata, tensors, data_offset })
    }

    fn value_type(&mut self, key: &str) -> Result<ValueType> {
        let at = self.pos;
        let id = self.u32(&|| format!("value type of key {key:?}"))?;
        ValueType::from_id(id).ok_or_else(|| self.error_at(at, Malformed::UnknownValueType { key: key.to_owned(), id }))
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value> {
        let what = || format!("value of key {key:?}");
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array(&what)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(&what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.array::<1>(&what)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    value => return Err(self.error_at(at, Malformed::InvalidBool { key: key.to_owned(), value })),
                }
            }
            ValueType::String => {
                let at = self.pos;
                let bytes = self.string_bytes(&what)?;
                self.charge(at, bytes.len() as u64, &what)?;
                Value::String(bytes.to_vec())
            }
            ValueType::Array => {
                let at = self.pos;
                if depth >= MAX_ARRAY_NESTING {
                    return Err(self.error_at(
                        at,
                        Malformed::TooMany {
                            what: format!("array nesting depth of key {key:?}"),
                            count: depth as u64 + 1,
                            limit: MAX_ARRAY_NESTING as u64,
                        },
                    ));
                }
                let elem_type = self.value_type(key)?;
                let count = self.count(
                    &|| format!("element count of array {key:?}"),
                    elem_type.min_encoded_size(),
                    MAX_ARRAY_ELEMENTS,
                )?;
                // Every element becomes one `Value` slot, allocated up front: charge them before allocating.
                self.charge(at, (count as u64).saturating_mul(std::mem::size_of::<Value>() as u64), &what)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(elem_type, key, depth + 1)?);
                }
                Value::Array(Array { elem_type, items })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds GGUF bytes field by field, so each test can break exactly one thing.
    #[derive(Default)]
    struct Bytes(Vec<u8>);

    impl Bytes {
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn str(self, s: &str) -> Self {
            self.u64(s.len() as u64).raw(s.as_bytes())
        }
        fn header(n_tensors: u64, n_kv: u64) -> Self {
            Bytes::default().raw(b"GGUF").u32(3).u64(n_tensors).u64(n_kv)
        }
        fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
            let mut b = self.str(name).u32(dims.len() as u32);
            for &d in dims {
                b = b.u64(d);
            }
            b.u32(ty).u64(offset)
        }
        fn pad_to(mut self, n: usize) -> Self {
            self.0.resize(n, 0);
            self
        }
    }

    fn kind(bytes: &[u8]) -> (u64, Malformed) {
        match GgufHeader::parse(bytes) {
            Err(Error::Malformed { offset, kind, .. }) => (offset, kind),
            other => panic!("expected a Malformed error, got {other:?}"),
        }
    }

    #[test]
    fn minimal_file_with_one_tensor() {
        let bytes = Bytes::header(1, 1).str("a.b").u32(4).u32(7).tensor("t", &[4, 2], 0, 0);
        let len = bytes.0.len();
        let bytes = bytes.pad_to(len.div_ceil(32) * 32 + 32);
        let h = GgufHeader::parse(&bytes.0).unwrap();
        assert_eq!(h.metadata, vec![("a.b".to_string(), Value::U32(7))]);
        assert_eq!(h.tensors[0].shape(), vec![2, 4]);
        assert_eq!(h.tensors[0].nbytes, 32);
        assert_eq!(h.data_offset % 32, 0);
    }

    #[test]
    fn magic_version_and_endianness() {
        assert!(matches!(kind(b"GGML\x03\0\0\0").1, Malformed::BadMagic { .. }));
        let be = Bytes::default().raw(b"GGUF").raw(&3u32.to_be_bytes()).u64(0).u64(0);
        let (offset, k) = kind(&be.0);
        assert_eq!(offset, 4);
        assert!(k.to_string().contains("big-endian"), "{k}");
        let v1 = Bytes::default().raw(b"GGUF").u32(1).u32(0).u32(0);
        assert!(kind(&v1.0).1.to_string().contains("v1"));
        assert!(matches!(kind(&Bytes::header(0, 0).0[..4]).1, Malformed::Truncated { .. }));
        let v4 = Bytes::default().raw(b"GGUF").u32(4).u64(0).u64(0);
        assert!(matches!(kind(&v4.0).1, Malformed::UnsupportedVersion { version: 4, .. }));
        let v2 = Bytes::default().raw(b"GGUF").u32(2).u64(0).u64(0);
        assert_eq!(GgufHeader::parse(&v2.0).unwrap().version, 2);
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let (offset, k) = kind(&Bytes::header(u64::MAX, 0).0);
        assert_eq!(offset, 8);
        assert!(matches!(k, Malformed::TooMany { .. }), "{k}");
        assert!(matches!(kind(&Bytes::header(0, 1 << 40).0).1, Malformed::TooMany { .. }));
        let long_key = Bytes::header(0, 1).u64(u64::MAX).raw(b"xxxxxxxxxxxxxxxxxxxxxxxxxxx");
        assert!(matches!(kind(&long_key.0).1, Malformed::TooMany { .. }));
        let long_string = Bytes::header(0, 1).str("k").u32(8).u64(1 << 20).raw(b"abc");
        assert!(matches!(kind(&long_string.0).1, Malformed::Truncated { .. }));
        let big_array = Bytes::header(0, 1).str("k").u32(9).u32(10).u64(1 << 40).raw(&[0; 64]);
        let (offset, k) = kind(&big_array.0);
        assert_eq!(offset, 24 + 9 + 4 + 4);
        assert!(matches!(k, Malformed::TooMany { .. }), "{k}");
    }

    #[test]
    fn decoded_metadata_memory_is_capped() {
        // 20 M one-byte elements would decode to 640 MB of `Value`s: refused before allocating.
        let n = 20_000_000u64;
        let big = Bytes::header(0, 1).str("k").u32(9).u32(0).u64(n).pad_to(24 + 9 + 4 + 4 + 8 + n as usize);
        let (offset, k) = kind(&big.0);
        assert_eq!(offset, 24 + 9 + 4);
        assert!(matches!(k, Malformed::TooMany { limit: MAX_METADATA_MEMORY, .. }), "{k}");
        assert!(k.to_string().contains("decoded metadata"), "{k}");
        // 1 M elements (32 MB decoded) are fine.
        let ok = Bytes::header(0, 1).str("k").u32(9).u32(0).u64(1 << 20).pad_to(24 + 9 + 4 + 4 + 8 + (1 << 20));
        GgufHeader::parse(&ok.0).unwrap();
    }

    #[test]
    fn metadata_errors_name_key_and_offset() {
        let dup = Bytes::header(0, 2).str("k").u32(0).raw(&[1]).str("k").u32(0).raw(&[2]);
        assert_eq!(kind(&dup.0), (24 + 9 + 4 + 1, Malformed::DuplicateKey { key: "k".into() }));
        let empty = Bytes::header(0, 1).str("").u32(0).raw(&[1]);
        assert_eq!(kind(&empty.0).1, Malformed::EmptyKey);
        let bad_type = Bytes::header(0, 1).str("k").u32(13).raw(&[1]);
        assert_eq!(kind(&bad_type.0).1, Malformed::UnknownValueType { key: "k".into(), id: 13 });
        let bad_bool = Bytes::header(0, 1).str("k").u32(7).raw(&[2]);
        assert!(matches!(kind(&bad_bool.0).1, Malformed::InvalidBool { value: 2, .. }));
        let align_type = Bytes::header(0, 1).str(ALIGNMENT_KEY).u32(10).u64(32);
        assert!(kind(&align_type.0).1.to_string().contains("UINT32"));
        let align_value = Bytes::header(0, 1).str(ALIGNMENT_KEY).u32(4).u32(48);
        assert!(kind(&align_value.0).1.to_string().contains("power of two"));
        let bad_utf8 = Bytes::header(0, 1).u64(2).raw(&[0xff, 0xfe]).u32(0).raw(&[1]);
        assert!(matches!(kind(&bad_utf8.0).1, Malformed::InvalidUtf8 { .. }));
    }

    #[test]
    fn nested_arrays_are_read_but_depth_is_bounded() {
        let nested = Bytes::header(0, 1).str("k").u32(9).u32(9).u64(1).u32(4).u64(2).u32(5).u32(6);
        let h = GgufHeader::parse(&nested.0).unwrap();
        let Value::Array(outer) = &h.metadata[0].1 else { panic!() };
        assert_eq!(
            outer.items[0],
            Value::Array(Array { elem_type: ValueType::U32, items: vec![Value::U32(5), Value::U32(6)] })
        );
        let mut deep = Bytes::header(0, 1).str("k").u32(9);
        for _ in 0..20 {
            deep = deep.u32(9).u64(1);
        }
        assert!(matches!(kind(&deep.0).1, Malformed::TooMany { .. }));
    }

    #[test]
    fn tensor_info_errors() {
        let file = |b: Bytes| b.pad_to(4096).0;
        let cases: Vec<(Vec<u8>, fn(&Malformed) -> bool)> = vec![
            (file(Bytes::header(1, 0).tensor("t", &[0, 2], 0, 0)), |k| {
                matches!(k, Malformed::ZeroDim { index: 0, .. })
            }),
            (file(Bytes::header(1, 0).tensor("t", &[1, 1, 1, 1, 1], 0, 0)), |k| {
                matches!(k, Malformed::BadDimCount { n_dims: 5, .. })
            }),
            (file(Bytes::header(1, 0).tensor("t", &[32], 4, 0)), |k| {
                matches!(k, Malformed::UnknownTensorType { id: 4, .. })
            }),
            (file(Bytes::header(1, 0).tensor("t", &[33], 2, 0)), |k| {
                matches!(k, Malformed::RowNotBlockMultiple { .. })
            }),
            (file(Bytes::header(1, 0).tensor("t", &[u64::MAX, 4], 0, 0)), |k| {
                matches!(k, Malformed::SizeOverflow { .. })
            }),
            (file(Bytes::header(1, 0).tensor(&"n".repeat(64), &[1], 0, 0)), |k| {
                matches!(k, Malformed::NameTooLong { len: 64, .. })
            }),
            (file(Bytes::header(2, 0).tensor("t", &[1], 0, 0).tensor("t", &[1], 0, 32)), |k| {
                matches!(k, Malformed::DuplicateTensor { .. })
            }),
            (file(Bytes::header(1, 0).tensor("t", &[1], 0, 32)), |k| {
                matches!(k, Malformed::TensorOffset { expected: 0, found: 32, .. })
            }),
            (file(Bytes::header(2, 0).tensor("a", &[1], 0, 0).tensor("b", &[1], 0, 4)), |k| {
                matches!(k, Malformed::TensorOffset { expected: 32, found: 4, .. })
            }),
            (file(Bytes::header(1, 0).tensor("t", &[1 << 20], 0, 0)), |k| {
                matches!(k, Malformed::TensorOutOfFile { .. })
            }),
        ];
        for (bytes, check) in cases {
            let (_, k) = kind(&bytes);
            assert!(check(&k), "unexpected error: {k}");
        }
    }

    #[test]
    fn every_truncation_of_a_valid_file_is_an_error_not_a_panic() {
        let bytes = Bytes::header(2, 2)
            .str("general.alignment")
            .u32(4)
            .u32(32)
            .str("tok")
            .u32(9)
            .u32(8)
            .u64(2)
            .str("a")
            .str("bc")
            .tensor("x", &[32, 2], 8, 0)
            .tensor("y", &[3], 0, 96);
        let len = bytes.0.len().div_ceil(32) * 32 + 96 + 12;
        let full = bytes.pad_to(len).0;
        GgufHeader::parse(&full).unwrap();
        for cut in 0..full.len() {
            assert!(GgufHeader::parse(&full[..cut]).is_err(), "truncation at {cut} accepted");
        }
    }
}
