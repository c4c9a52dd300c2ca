//! Importance matrices (`llama-imatrix` output): per-column weights that steer the quantizers of most types.
//!
//! Two file formats exist and both are read ([`Imatrix::open`], or [`Imatrix::parse`] on bytes); a file that
//! starts with the GGUF magic is the GGUF one, anything else the legacy one.
//!
//! - **GGUF** (what `llama-imatrix` writes unless told `--output-format dat`): read through the crate's
//!   validating GGUF reader.
//!   `general.type` must be `"imatrix"` when present; `imatrix.datasets` (array of strings),
//!   `imatrix.chunk_count` and `imatrix.chunk_size` (u32) must be there, as `llama-quantize` requires. Each
//!   weight tensor `<name>` has two f32 tensors: `<name>.in_sum2` (ne `[row_len, n_expert]`, the raw sums of
//!   squared activations) and `<name>.counts` (ne `[1, n_expert]`, tokens seen per expert); tensors with other
//!   names are ignored, as `llama-quantize` does.
//! - **Legacy `.dat`**, little-endian: `i32 n_entries`, then per entry `i32 len, u8 name[len], i32 ncall,
//!   i32 nval, f32 sums[nval]` (sums already divided by the token count and multiplied by `ncall`), then
//!   optionally `i32 chunk_count` and optionally after it `i32 len, u8 dataset[len]`. Nothing may follow.
//!
//! Weights are normalised exactly as `llama-quantize`'s `load_imatrix` does before it hands them to ggml, in f32:
//! GGUF: per expert `j`, `count = (float) lround(counts[j])`, weights `in_sum2 / count` when `count > 0`, else
//! all 1; legacy: `sums / (float) ncall` when `ncall > 0`, else the raw sums.
//!
//! Stricter than llama.cpp, which would read garbage or abort on these (each a typed error naming the file, the
//! entry or key, and for legacy files the byte offset): a GGUF without the metadata keys or with keys of the
//! wrong type, unpaired or non-f32 tensors, sums that do not divide into the counts, counts that are negative or
//! not finite; a legacy file whose counts or lengths are negative or zero or run past the end, whose names are
//! not UTF-8, that repeats a name, or that has bytes after the dataset name; and in both formats names holding a
//! NUL, no entries, or a weight that is negative or not finite after normalisation. Dataset names are provenance
//! only and are read lossily (invalid UTF-8 becomes U+FFFD; a legacy one ends at its first NUL, as in llama.cpp).

use std::collections::BTreeMap;
use std::path::Path;

use memmap2::Mmap;

use crate::error::{BadImatrix, Error, Malformed, Result};
use crate::gguf::{GgufHeader, TensorInfo, Value, ValueType, GGUF_MAGIC};
use crate::types::GgmlType;

/// `general.type` of an imatrix GGUF.
pub const GGUF_TYPE: &str = "imatrix";
/// Metadata key of the dataset list (array of strings).
pub const DATASETS_KEY: &str = "imatrix.datasets";
/// Metadata key of the number of chunks the matrix was computed on (u32).
pub const CHUNK_COUNT_KEY: &str = "imatrix.chunk_count";
/// Metadata key of the chunk size in tokens (u32).
pub const CHUNK_SIZE_KEY: &str = "imatrix.chunk_size";
/// Suffix of the tensor holding an entry's raw sums.
pub const SUMS_SUFFIX: &str = ".in_sum2";
/// Suffix of the tensor holding an entry's per-expert token counts.
pub const COUNTS_SUFFIX: &str = ".counts";

/// The normalised weights of an importance matrix, by the name of the weight tensor they belong to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Imatrix {
    /// Where it came from (a path, for messages and provenance).
    pub source: String,
    /// Weight tensor name -> weights; for a 2-D weight one per column (its row length), for stacked experts
    /// `n_expert * row_len`.
    pub entries: BTreeMap<String, Vec<f32>>,
    /// The datasets it was computed on, as the file records them (may be empty).
    pub datasets: Vec<String>,
    /// The number of chunks it was computed on (0 when the file does not say).
    pub chunk_count: u32,
    /// Whether it came from a legacy `.dat` file.
    pub legacy: bool,
}

impl Imatrix {
    /// An importance matrix made in memory (tests, converters).
    pub fn from_entries(source: impl Into<String>, entries: BTreeMap<String, Vec<f32>>) -> Imatrix {
        Imatrix { source: source.into(), entries, ..Imatrix::default() }
    }

    /// The weights for tensor `name`, if the matrix has them.
    pub fn weights(&self, name: &str) -> Option<&[f32]> {
        self.entries.get(name).map(Vec::as_slice)
    }

    /// Reads and normalises the importance matrix at `path`, in either format. Errors name the file.
    ///
    /// The file is memory-mapped, so a large file given by mistake (a model) costs only what is read of it.
    pub fn open(path: impl AsRef<Path>) -> Result<Imatrix> {
        let path = path.as_ref();
        let file = crate::paths::open_input(path)?;
        // SAFETY: a read-only private map, as in `GgufFile::open` (whose comment explains the accepted risk of
        // another process truncating the file meanwhile); the map does not outlive this call.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Imatrix::parse(&map, &path.display().to_string()).map_err(|e| e.in_file(path))
    }

    /// Parses and normalises a complete importance-matrix file held in `bytes`; `source` becomes
    /// [`Imatrix::source`]. Never panics, and allocates at most about the size of `bytes` for the entries.
    pub fn parse(bytes: &[u8], source: &str) -> Result<Imatrix> {
        let mut imatrix = if bytes.starts_with(&GGUF_MAGIC) { parse_gguf(bytes)? } else { parse_legacy(bytes)? };
        imatrix.source = source.to_owned();
        Ok(imatrix)
    }
}

fn bad(kind: BadImatrix) -> Error {
    Error::BadImatrix(kind)
}

/// The type of a metadata value as gguf-py spells it ("UINT32", "ARRAY of STRING").
fn type_words(value: &Value) -> String {
    match value {
        Value::Array(a) => format!("ARRAY of {}", a.elem_type.name()),
        other => other.value_type().name().to_owned(),
    }
}

fn required<'h>(header: &'h GgufHeader, key: &'static str) -> Result<&'h Value> {
    header.get(key).ok_or_else(|| bad(BadImatrix::MissingKey { key }))
}

fn required_u32(header: &GgufHeader, key: &'static str) -> Result<u32> {
    match required(header, key)? {
        Value::U32(v) => Ok(*v),
        other => Err(bad(BadImatrix::KeyType { key, expected: "UINT32", found: type_words(other) })),
    }
}

/// Reads little-endian f32s (any alignment).
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Checks one normalised weight (`llama-quantize` would hand a negative or non-finite one to ggml as is).
fn check_weight(name: &str, index: usize, value: f32, sum: f32, count: f32) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(bad(BadImatrix::BadWeight { name: name.to_owned(), index, value, sum, count }))
    }
}

/// The largest count `lround` maps to an int64 (2^63, exclusive).
const MAX_COUNT: f32 = 9_223_372_036_854_775_808.0;

fn parse_gguf(bytes: &[u8]) -> Result<Imatrix> {
    let header = GgufHeader::parse(bytes)?;
    match header.get("general.type") {
        None => {}
        Some(Value::String(s)) if s.as_slice() == GGUF_TYPE.as_bytes() => {}
        Some(Value::String(s)) => {
            return Err(bad(BadImatrix::NotImatrix { found: String::from_utf8_lossy(s).into_owned() }))
        }
        Some(other) => {
            return Err(bad(BadImatrix::KeyType { key: "general.type", expected: "STRING", found: type_words(other) }))
        }
    }

    // Pair the tensors by entry name: (in_sum2, counts).
    let mut pairs: BTreeMap<&str, (Option<usize>, Option<usize>)> = BTreeMap::new();
    for (i, t) in header.tensors.iter().enumerate() {
        if t.name.contains('\0') {
            return Err(bad(BadImatrix::NulInName { tensor: t.name.clone() }));
        }
        if let Some(name) = t.name.strip_suffix(SUMS_SUFFIX) {
            pairs.entry(name).or_default().0 = Some(i);
        } else if let Some(name) = t.name.strip_suffix(COUNTS_SUFFIX) {
            pairs.entry(name).or_default().1 = Some(i);
        }
    }
    if pairs.is_empty() {
        return Err(bad(BadImatrix::NoEntries {
            detail: format!(
                "none of its {} tensors is named <weight>{SUMS_SUFFIX} or <weight>{COUNTS_SUFFIX}",
                header.tensors.len()
            ),
        }));
    }

    let datasets = match required(&header, DATASETS_KEY)? {
        Value::Array(a) if a.elem_type == ValueType::String => a
            .items
            .iter()
            .map(|v| match v {
                Value::String(s) => String::from_utf8_lossy(s).into_owned(),
                _ => unreachable!("the GGUF reader checks every array element against the array's type"),
            })
            .collect(),
        other => {
            return Err(bad(BadImatrix::KeyType {
                key: DATASETS_KEY,
                expected: "ARRAY of STRING",
                found: type_words(other),
            }))
        }
    };
    let chunk_count = required_u32(&header, CHUNK_COUNT_KEY)?;
    required_u32(&header, CHUNK_SIZE_KEY)?;

    // The f32 values of tensor `index` (the reader checked that its data lies inside `bytes`).
    let data = |index: usize| -> Result<(&TensorInfo, Vec<f32>)> {
        let t = &header.tensors[index];
        if t.ty != GgmlType::F32 {
            return Err(bad(BadImatrix::TensorType { tensor: t.name.clone(), ty: t.ty }));
        }
        let range = header.tensor_range(index);
        Ok((t, f32s(&bytes[range.start as usize..range.end as usize])))
    };
    let mut entries = BTreeMap::new();
    for (name, pair) in pairs {
        let (s, c) = match pair {
            (Some(s), Some(c)) => (s, c),
            (Some(_), None) | (None, Some(_)) => {
                let (present, missing) =
                    if pair.0.is_some() { (SUMS_SUFFIX, COUNTS_SUFFIX) } else { (COUNTS_SUFFIX, SUMS_SUFFIX) };
                return Err(bad(BadImatrix::Unpaired {
                    name: name.to_owned(),
                    present: format!("{name}{present}"),
                    missing: format!("{name}{missing}"),
                }));
            }
            (None, None) => unreachable!("an entry is made by one of its tensors"),
        };
        let (sums_t, sums) = data(s)?;
        let (counts_t, counts) = data(c)?;
        // Tensors have at least one element (the reader refuses zero dimensions).
        if sums.len() % counts.len() != 0 {
            return Err(bad(BadImatrix::Shape {
                name: name.to_owned(),
                sums: sums.len() as u64,
                sums_shape: sums_t.shape(),
                counts: counts.len() as u64,
                counts_shape: counts_t.shape(),
            }));
        }
        let row_len = sums.len() / counts.len();
        let mut weights = Vec::with_capacity(sums.len());
        for (j, (&raw, row)) in counts.iter().zip(sums.chunks_exact(row_len)).enumerate() {
            if !(0.0..MAX_COUNT).contains(&raw) {
                return Err(bad(BadImatrix::BadCount { name: name.to_owned(), index: j, value: raw }));
            }
            // `(float) lround(raw)`: lround rounds half away from zero like `f32::round`, and every f32 of at
            // least 2^23 is already an integer, so the int64 round trip changes nothing.
            let count = raw.round();
            for (i, &sum) in row.iter().enumerate() {
                let (value, divisor) = if count > 0.0 { (sum / count, count) } else { (1.0, 0.0) };
                check_weight(name, j * row_len + i, value, sum, divisor)?;
                weights.push(value);
            }
        }
        entries.insert(name.to_owned(), weights);
    }
    Ok(Imatrix { source: String::new(), entries, datasets, chunk_count, legacy: false })
}

/// A bounds-checked little-endian cursor over a legacy file; every error carries the absolute offset.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn error(&self, offset: usize, kind: Malformed) -> Error {
        Error::Malformed { format: "legacy imatrix", offset: offset as u64, kind }
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(self.error(
                self.pos,
                Malformed::Truncated { what: what(), needed: n as u64, available: self.left() as u64 },
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn i32(&mut self, what: &dyn Fn() -> String) -> Result<i32> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads an i32 that must be at least `min` (which is not negative).
    fn at_least(&mut self, min: i32, what: &dyn Fn() -> String) -> Result<usize> {
        let at = self.pos;
        let v = self.i32(what)?;
        if v < min {
            return Err(self.error(at, Malformed::Other(format!("{} is {v}, expected at least {min}", what()))));
        }
        Ok(v as usize)
    }
}

fn parse_legacy(bytes: &[u8]) -> Result<Imatrix> {
    let mut c = Cursor { bytes, pos: 0 };
    let n_entries = c.at_least(0, &|| "entry count".into())?;
    if n_entries == 0 {
        return Err(bad(BadImatrix::NoEntries { detail: "the legacy header's entry count is 0".into() }));
    }
    // Nothing is allocated by the entry count: entries are read one at a time, each checked against the bytes
    // left, so a count larger than the file holds ends in a truncation error naming the entry.
    let mut entries = BTreeMap::new();
    for e in 0..n_entries {
        let len = c.at_least(1, &|| format!("name length of entry {e}"))?;
        let name_at = c.pos;
        let raw = c.take(len, &|| format!("name of entry {e}"))?;
        if raw.contains(&0) {
            return Err(c.error(name_at, Malformed::Other(format!("name of entry {e} holds a NUL byte"))));
        }
        let name = std::str::from_utf8(raw)
            .map_err(|_| c.error(name_at, Malformed::InvalidUtf8 { what: format!("name of entry {e}") }))?;
        let what = |field: &str| format!("{field} of entry {e} ({name:?})");
        let ncall = c.at_least(0, &|| what("call count"))?;
        let nval = c.at_least(1, &|| what("value count"))?;
        let sums = f32s(c.take(nval.saturating_mul(4), &|| what("values"))?);
        let mut weights = Vec::with_capacity(nval);
        for (i, &sum) in sums.iter().enumerate() {
            let (value, divisor) = if ncall > 0 { (sum / ncall as f32, ncall as f32) } else { (sum, 1.0) };
            check_weight(name, i, value, sum, divisor)?;
            weights.push(value);
        }
        if entries.insert(name.to_owned(), weights).is_some() {
            return Err(c.error(name_at, Malformed::DuplicateTensor { name: name.to_owned() }));
        }
    }

    // Optional trailer: the chunk count, then optionally the dataset name.
    let mut chunk_count = 0;
    let mut datasets = Vec::new();
    if c.left() > 0 {
        chunk_count = c.at_least(0, &|| "chunk count after the entries".into())? as u32;
    }
    if c.left() > 0 {
        let len = c.at_least(0, &|| "dataset name length".into())?;
        let raw = c.take(len, &|| "dataset name".into())?;
        let raw = raw.split(|&b| b == 0).next().unwrap_or_default();
        if !raw.is_empty() {
            datasets.push(String::from_utf8_lossy(raw).into_owned());
        }
    }
    if c.left() > 0 {
        let n = c.left();
        return Err(c.error(c.pos, Malformed::Other(format!("{n} bytes of trailing garbage after the dataset name"))));
    }
    Ok(Imatrix { source: String::new(), entries, datasets, chunk_count, legacy: true })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{encode_string, Array};

    // ---- hand-built legacy files ----

    fn legacy(entries: &[(&[u8], i32, &[f32])], trailer: &[u8]) -> Vec<u8> {
        let mut out = (entries.len() as i32).to_le_bytes().to_vec();
        for (name, ncall, sums) in entries {
            out.extend((name.len() as i32).to_le_bytes());
            out.extend(*name);
            out.extend(ncall.to_le_bytes());
            out.extend((sums.len() as i32).to_le_bytes());
            for s in *sums {
                out.extend(s.to_le_bytes());
            }
        }
        out.extend(trailer);
        out
    }

    fn trailer(chunks: i32, dataset: &[u8]) -> Vec<u8> {
        let mut t = chunks.to_le_bytes().to_vec();
        t.extend((dataset.len() as i32).to_le_bytes());
        t.extend(dataset);
        t
    }

    fn malformed_at(err: Error) -> (u64, String) {
        match err {
            Error::Malformed { format: "legacy imatrix", offset, kind } => (offset, kind.to_string()),
            other => panic!("expected a legacy Malformed error, got {other:?}"),
        }
    }

    fn bad_kind(err: Error) -> BadImatrix {
        match err {
            Error::BadImatrix(kind) => kind,
            other => panic!("expected BadImatrix, got {other:?}"),
        }
    }

    #[test]
    fn legacy_normalises_by_ncall_in_f32() {
        let sums = [3.0f32, 0.1, 7.5, 0.0];
        let bytes = legacy(
            &[(b"blk.0.attn_q.weight", 3, &sums), (b"output.weight", 0, &[2.5, 4.0])],
            &trailer(10, b"wiki.txt"),
        );
        let m = Imatrix::parse(&bytes, "x.dat").unwrap();
        assert!(m.legacy);
        assert_eq!(m.source, "x.dat");
        assert_eq!(m.chunk_count, 10);
        assert_eq!(m.datasets, ["wiki.txt"]);
        let want: Vec<f32> = sums.iter().map(|s| s / 3.0f32).collect();
        assert_eq!(m.weights("blk.0.attn_q.weight").unwrap(), want.as_slice());
        assert_eq!(m.weights("output.weight").unwrap(), [2.5, 4.0], "ncall 0 keeps the raw sums");
    }

    #[test]
    fn legacy_trailer_is_optional_in_parts() {
        let e: &[(&[u8], i32, &[f32])] = &[(b"w", 1, &[1.0])];
        let none = Imatrix::parse(&legacy(e, &[]), "").unwrap();
        assert_eq!((none.chunk_count, none.datasets.len()), (0, 0));
        let count_only = Imatrix::parse(&legacy(e, &7i32.to_le_bytes()), "").unwrap();
        assert_eq!((count_only.chunk_count, count_only.datasets.len()), (7, 0));
        let empty_name = Imatrix::parse(&legacy(e, &trailer(5, b"")), "").unwrap();
        assert_eq!((empty_name.chunk_count, empty_name.datasets.len()), (5, 0));
        let nul = Imatrix::parse(&legacy(e, &trailer(5, b"ab\0cd")), "").unwrap();
        assert_eq!(nul.datasets, ["ab"], "a dataset name ends at its NUL, as in llama.cpp");
    }

    #[test]
    fn legacy_errors_carry_offsets() {
        let e: &[(&[u8], i32, &[f32])] = &[(b"w", 1, &[1.0, 2.0])];
        let good = legacy(e, &trailer(1, b"d"));
        // Cut anywhere but at the two optional trailer boundaries: an error at or before the cut.
        let entries_end = good.len() - 9;
        for cut in 0..good.len() {
            if cut == entries_end || cut == entries_end + 4 {
                assert!(Imatrix::parse(&good[..cut], "").is_ok(), "cut {cut}");
                continue;
            }
            let err = Imatrix::parse(&good[..cut], "").unwrap_err();
            if let Error::Malformed { offset, .. } = &err {
                assert!(*offset <= cut as u64, "cut {cut}: {err}");
            } else {
                panic!("cut {cut}: {err:?}");
            }
        }
        // Trailing garbage.
        let mut long = good.clone();
        long.push(0);
        let (off, msg) = malformed_at(Imatrix::parse(&long, "").unwrap_err());
        assert_eq!(off, good.len() as u64);
        assert!(msg.contains("1 bytes of trailing garbage"), "{msg}");
        // Zero and negative lengths.
        let mut zero_len = good.clone();
        zero_len[4..8].copy_from_slice(&0i32.to_le_bytes());
        let (off, msg) = malformed_at(Imatrix::parse(&zero_len, "").unwrap_err());
        assert_eq!((off, msg.as_str()), (4, "name length of entry 0 is 0, expected at least 1"));
        let mut neg_nval = good.clone();
        neg_nval[13..17].copy_from_slice(&(-2i32).to_le_bytes());
        let (off, msg) = malformed_at(Imatrix::parse(&neg_nval, "").unwrap_err());
        assert_eq!(off, 13);
        assert!(msg.contains("value count of entry 0 (\"w\") is -2"), "{msg}");
        let mut neg_ncall = good.clone();
        neg_ncall[9..13].copy_from_slice(&(-1i32).to_le_bytes());
        assert_eq!(malformed_at(Imatrix::parse(&neg_ncall, "").unwrap_err()).0, 9);
        // A huge entry count reads on until the file ends (the trailer is taken for entry 1 here: name length 1,
        // name 0x01, ncall from the last 4 bytes; its value count is missing).
        let mut many = good.clone();
        many[0..4].copy_from_slice(&i32::MAX.to_le_bytes());
        let (off, msg) = malformed_at(Imatrix::parse(&many, "").unwrap_err());
        assert_eq!(off, 34);
        assert!(msg.contains("file ends inside value count of entry 1"), "{msg}");
        // A huge value count is a truncation, not an allocation.
        let mut huge = good.clone();
        huge[13..17].copy_from_slice(&i32::MAX.to_le_bytes());
        let (_, msg) = malformed_at(Imatrix::parse(&huge, "").unwrap_err());
        assert!(msg.contains("needs 8589934588 more bytes"), "{msg}");
    }

    #[test]
    fn legacy_names_must_be_utf8_without_nul_and_unique() {
        let (off, msg) = malformed_at(Imatrix::parse(&legacy(&[(b"a\xffb", 1, &[1.0])], &[]), "").unwrap_err());
        assert_eq!(off, 8);
        assert!(msg.contains("not valid UTF-8"), "{msg}");
        let (off, msg) = malformed_at(Imatrix::parse(&legacy(&[(b"a\0b", 1, &[1.0])], &[]), "").unwrap_err());
        assert_eq!(off, 8);
        assert!(msg.contains("NUL"), "{msg}");
        let dup = legacy(&[(b"w", 1, &[1.0]), (b"w", 1, &[2.0])], &[]);
        let (_, msg) = malformed_at(Imatrix::parse(&dup, "").unwrap_err());
        assert!(msg.contains("duplicate tensor name \"w\""), "{msg}");
    }

    #[test]
    fn legacy_empty_and_bad_weights() {
        assert!(matches!(bad_kind(Imatrix::parse(&0i32.to_le_bytes(), "").unwrap_err()), BadImatrix::NoEntries { .. }));
        for v in [-1.0f32, f32::NAN, f32::INFINITY] {
            let err = bad_kind(Imatrix::parse(&legacy(&[(b"w", 2, &[1.0, v])], &[]), "").unwrap_err());
            assert!(matches!(err, BadImatrix::BadWeight { index: 1, .. }), "{v}: {err:?}");
        }
    }

    // ---- hand-built GGUF files ----

    /// A GGUF v3 file: metadata and f32 (or other) tensors, laid out densely at 32-byte alignment.
    fn gguf(kv: &[(&str, Value)], tensors: &[(&str, &[u64], GgmlType, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kv.len() as u64).to_le_bytes());
        for (k, v) in kv {
            encode_string(k.as_bytes(), &mut out);
            out.extend((v.value_type() as u32).to_le_bytes());
            v.encode(&mut out);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in tensors {
            encode_string(name.as_bytes(), &mut out);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                out.extend(d.to_le_bytes());
            }
            out.extend((*ty as u32).to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in tensors {
            out.extend(data);
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }

    fn le(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn meta() -> Vec<(&'static str, Value)> {
        vec![
            ("general.type", Value::string("imatrix")),
            (DATASETS_KEY, Value::Array(Array { elem_type: ValueType::String, items: vec![Value::string("a.txt")] })),
            (CHUNK_COUNT_KEY, Value::U32(4)),
            (CHUNK_SIZE_KEY, Value::U32(512)),
        ]
    }

    #[test]
    fn gguf_normalises_per_expert_with_lround_counts() {
        let sums = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        // Three experts of row length 2: counts 2.5 (lround 3), 0 (weights 1), 0.4 (lround 0: weights 1).
        let bytes = gguf(
            &meta(),
            &[
                ("blk.0.ffn_up_exps.weight.counts", &[1, 3], GgmlType::F32, le(&[2.5, 0.0, 0.4])),
                ("blk.0.ffn_up_exps.weight.in_sum2", &[2, 3], GgmlType::F32, le(&sums)),
                ("blk.0.attn_q.weight.in_sum2", &[3, 1], GgmlType::F32, le(&[0.3, 0.6, 0.9])),
                ("blk.0.attn_q.weight.counts", &[1, 1], GgmlType::F32, le(&[7.0])),
                ("unrelated", &[1], GgmlType::F32, le(&[0.0])),
            ],
        );
        let m = Imatrix::parse(&bytes, "m.gguf").unwrap();
        assert!(!m.legacy);
        assert_eq!((m.chunk_count, m.datasets.as_slice()), (4, ["a.txt".to_owned()].as_slice()));
        assert_eq!(m.entries.len(), 2);
        assert_eq!(m.weights("blk.0.ffn_up_exps.weight").unwrap(), [1.0 / 3.0, 2.0 / 3.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(m.weights("blk.0.attn_q.weight").unwrap(), [0.3f32 / 7.0, 0.6f32 / 7.0, 0.9f32 / 7.0]);
    }

    #[test]
    fn gguf_refusals() {
        let pair = |sums: Vec<u8>, counts: Vec<u8>| -> Vec<(&'static str, &'static [u64], GgmlType, Vec<u8>)> {
            vec![("w.in_sum2", &[2, 1], GgmlType::F32, sums), ("w.counts", &[1, 1], GgmlType::F32, counts)]
        };
        let ok = pair(le(&[1.0, 2.0]), le(&[1.0]));
        assert!(Imatrix::parse(&gguf(&meta(), &ok), "").is_ok());

        let mut model = meta();
        model[0].1 = Value::string("model");
        assert_eq!(
            bad_kind(Imatrix::parse(&gguf(&model, &ok), "").unwrap_err()),
            BadImatrix::NotImatrix { found: "model".into() }
        );
        for key in [DATASETS_KEY, CHUNK_COUNT_KEY, CHUNK_SIZE_KEY] {
            let kv: Vec<_> = meta().into_iter().filter(|(k, _)| *k != key).collect();
            assert_eq!(bad_kind(Imatrix::parse(&gguf(&kv, &ok), "").unwrap_err()), BadImatrix::MissingKey { key });
        }
        let mut wrong = meta();
        wrong[2].1 = Value::I32(4);
        let err = bad_kind(Imatrix::parse(&gguf(&wrong, &ok), "").unwrap_err());
        assert_eq!(err, BadImatrix::KeyType { key: CHUNK_COUNT_KEY, expected: "UINT32", found: "INT32".into() });

        let err = bad_kind(Imatrix::parse(&gguf(&meta(), &ok[..1]), "").unwrap_err());
        assert_eq!(
            err,
            BadImatrix::Unpaired { name: "w".into(), present: "w.in_sum2".into(), missing: "w.counts".into() }
        );
        let err = bad_kind(Imatrix::parse(&gguf(&meta(), &ok[1..]), "").unwrap_err());
        assert!(matches!(err, BadImatrix::Unpaired { ref missing, .. } if missing == "w.in_sum2"), "{err:?}");

        let mut f16 = ok.clone();
        f16[1] = ("w.counts", &[1, 1], GgmlType::F16, vec![0, 0x3c]);
        let err = bad_kind(Imatrix::parse(&gguf(&meta(), &f16), "").unwrap_err());
        assert_eq!(err, BadImatrix::TensorType { tensor: "w.counts".into(), ty: GgmlType::F16 });

        let shape = vec![
            ("w.in_sum2", &[3u64, 1][..], GgmlType::F32, le(&[1.0, 2.0, 3.0])),
            ("w.counts", &[1u64, 2][..], GgmlType::F32, le(&[1.0, 1.0])),
        ];
        let err = bad_kind(Imatrix::parse(&gguf(&meta(), &shape), "").unwrap_err());
        assert!(matches!(err, BadImatrix::Shape { sums: 3, counts: 2, .. }), "{err:?}");

        for c in [-1.0f32, f32::NAN, f32::INFINITY, 1e19] {
            let err = bad_kind(Imatrix::parse(&gguf(&meta(), &pair(le(&[1.0, 2.0]), le(&[c]))), "").unwrap_err());
            assert!(matches!(err, BadImatrix::BadCount { index: 0, .. }), "{c}: {err:?}");
        }
        let err = bad_kind(Imatrix::parse(&gguf(&meta(), &pair(le(&[1.0, -2.0]), le(&[2.0]))), "").unwrap_err());
        assert_eq!(err, BadImatrix::BadWeight { name: "w".into(), index: 1, value: -1.0, sum: -2.0, count: 2.0 });

        let nul = vec![("w\0x.in_sum2", &[2u64, 1][..], GgmlType::F32, le(&[1.0, 2.0]))];
        let err = bad_kind(Imatrix::parse(&gguf(&meta(), &nul), "").unwrap_err());
        assert_eq!(err, BadImatrix::NulInName { tensor: "w\0x.in_sum2".into() });

        let none = vec![("token_embd.weight", &[2u64, 1][..], GgmlType::F32, le(&[1.0, 2.0]))];
        assert!(matches!(
            bad_kind(Imatrix::parse(&gguf(&meta(), &none), "").unwrap_err()),
            BadImatrix::NoEntries { .. }
        ));
        // A broken container is the GGUF reader's error.
        let mut cut = gguf(&meta(), &ok);
        cut.truncate(40);
        assert!(matches!(Imatrix::parse(&cut, "").unwrap_err(), Error::Malformed { format: "GGUF", .. }));
    }

    #[test]
    fn open_names_the_file() {
        let dir = std::env::temp_dir().join(format!("imatrix-open-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.dat");
        std::fs::write(&path, [1u8, 0, 0]).unwrap();
        let msg = Imatrix::open(&path).unwrap_err().to_string();
        assert!(msg.starts_with(&path.display().to_string()), "{msg}");
        let good = dir.join("good.dat");
        std::fs::write(&good, legacy(&[(b"w", 1, &[1.0])], &[])).unwrap();
        assert_eq!(Imatrix::open(&good).unwrap().source, good.display().to_string());
        let err = Imatrix::open(&dir).unwrap_err();
        assert!(matches!(err, Error::NotRegularFile { kind: crate::paths::FileKind::Directory, output: false, .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
