//! Split GGUF models (llama.cpp's `llama-gguf-split`): shard names, opening and checking a set of shards, the
//! re-split rule, and writing a set of shards that appears only when complete.
//!
//! Rules restated from llama.cpp (`src/llama.cpp` `llama_split_path` / `llama_split_prefix`,
//! `src/llama-model-loader.cpp`, `tools/gguf-split/gguf-split.cpp`):
//! - shard `no` (0-based) of `count` is named `PREFIX-{no+1:05}-of-{count:05}.gguf`;
//! - every shard carries `split.no` (UINT16, 0-based), `split.count` (UINT16) and `split.tensors.count` (INT32,
//!   the tensors of the whole model); the first carries the model's metadata, the others only those keys;
//! - the loader opens the first shard, derives the prefix from its name, opens the others by name, requires
//!   each one's `split.no` to match its place, no tensor in two shards, and the tensors to add up;
//! - `--split-max-tensors N` starts a new shard at every N-th tensor; `--split-max-size B` starts one when the
//!   shard's tensors, each padded to 32 bytes, would exceed B.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::file::GgufFile;
use super::value::Value;
use super::writer::{GgufWriter, TensorSpec, WriteOptions};
use crate::error::{Error, Result, ShardProblem};

/// Key of a shard's number in its set (UINT16, 0-based).
pub const SPLIT_NO: &str = "split.no";
/// Key of the number of shards in the set (UINT16).
pub const SPLIT_COUNT: &str = "split.count";
/// Key of the number of tensors in the whole model (INT32).
pub const SPLIT_TENSORS_COUNT: &str = "split.tensors.count";
/// The padding `llama-gguf-split` counts each tensor with when splitting by size (`GGUF_DEFAULT_ALIGNMENT`).
const SPLIT_SIZE_ALIGNMENT: u64 = 32;

/// True for the keys that describe a file's place in a split set (they are rewritten per shard on output).
pub fn is_split_key(key: &str) -> bool {
    key == SPLIT_NO || key == SPLIT_COUNT || key == SPLIT_TENSORS_COUNT
}

/// The name suffix of shard `no` (0-based) of `count`: `-00002-of-00003.gguf` for `no` = 1, `count` = 3.
fn suffix(no: u16, count: u16) -> String {
    format!("-{:05}-of-{:05}.gguf", u32::from(no) + 1, count)
}

/// The path of shard `no` (0-based) of `count` for `prefix`, as `llama_split_path` builds it.
pub fn shard_path(prefix: &Path, no: u16, count: u16) -> PathBuf {
    let mut name: OsString = prefix.as_os_str().to_owned();
    name.push(suffix(no, count));
    PathBuf::from(name)
}

/// The prefix of `path` if its name ends in shard `no`'s suffix of `count` (`llama_split_prefix`), else `None`.
pub fn shard_prefix(path: &Path, no: u16, count: u16) -> Option<PathBuf> {
    let bytes = path.as_os_str().as_encoded_bytes();
    let suffix = suffix(no, count);
    if bytes.len() <= suffix.len() || !bytes.ends_with(suffix.as_bytes()) {
        return None;
    }
    Some(path_from_prefix_bytes(path, bytes.len() - suffix.len()))
}

/// Any shard name: `(prefix, no (0-based), count)` when the name ends in `-NNNNN-of-MMMMM.gguf` with
/// 1 <= NNNNN <= MMMMM <= 65535.
pub fn parse_shard_name(path: &Path) -> Option<(PathBuf, u16, u16)> {
    let bytes = path.as_os_str().as_encoded_bytes();
    let tail_len = "-00001-of-00001.gguf".len();
    if bytes.len() <= tail_len {
        return None;
    }
    let tail = std::str::from_utf8(&bytes[bytes.len() - tail_len..]).ok()?;
    let digits = |s: &str| (s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<u32>().ok())?;
    let rest = tail.strip_prefix('-')?.strip_suffix(".gguf")?;
    let (no, count) = rest.split_once("-of-")?;
    let (no, count) = (digits(no)?, digits(count)?);
    if no == 0 || no > count || count > u32::from(u16::MAX) {
        return None;
    }
    Some((path_from_prefix_bytes(path, bytes.len() - tail_len), (no - 1) as u16, count as u16))
}

/// `path` cut to its first `len` bytes; `len` is where an ASCII suffix starts, so the cut is a valid boundary.
fn path_from_prefix_bytes(path: &Path, len: usize) -> PathBuf {
    let bytes = &path.as_os_str().as_encoded_bytes()[..len];
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
    }
    #[cfg(not(unix))]
    {
        PathBuf::from(String::from_utf8_lossy(bytes).into_owned())
    }
}

/// A file's place in a split set, read from its split keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitKeys {
    /// `split.no` (0-based).
    pub no: Option<u16>,
    /// `split.count`.
    pub count: Option<u16>,
    /// `split.tensors.count`.
    pub tensors: Option<i64>,
}

impl SplitKeys {
    /// Reads the split keys of `file`, checking their types as llama.cpp does.
    pub fn of(file: &GgufFile) -> Result<SplitKeys> {
        let shard_error = |problem| Error::ShardSet { shard: file.path().to_path_buf(), problem };
        let u16_key = |key: &'static str| match file.header().get(key) {
            None => Ok(None),
            Some(Value::U16(v)) => Ok(Some(*v)),
            Some(other) => Err(shard_error(ShardProblem::KeyType {
                key,
                found: other.value_type().name().to_owned(),
                expected: "UINT16",
            })),
        };
        let tensors = match file.header().get(SPLIT_TENSORS_COUNT) {
            None => None,
            Some(Value::I32(v)) => Some(i64::from(*v)),
            Some(other) => {
                return Err(shard_error(ShardProblem::KeyType {
                    key: SPLIT_TENSORS_COUNT,
                    found: other.value_type().name().to_owned(),
                    expected: "INT32",
                }))
            }
        };
        Ok(SplitKeys { no: u16_key(SPLIT_NO)?, count: u16_key(SPLIT_COUNT)?, tensors })
    }

    /// Whether the file is part of a set of more than one shard (`split.count` > 1; gguf-split's merge writes
    /// 0 and a one-shard set is one file).
    pub fn is_split(&self) -> bool {
        self.count.is_some_and(|c| c > 1)
    }
}

/// Opens the whole set `file` belongs to and checks it is complete and consistent; returns the shards in
/// order (just `file` when it is not split). Each problem names the shard at fault ([`Error::ShardSet`]).
pub fn open_set(file: GgufFile) -> Result<Vec<GgufFile>> {
    let keys = SplitKeys::of(&file)?;
    let Some(count) = keys.count.filter(|_| keys.is_split()) else {
        return Ok(vec![file]);
    };
    let given_path = file.path().to_path_buf();
    let shard_error = |shard: &Path, problem| Error::ShardSet { shard: shard.to_path_buf(), problem };
    let no = keys.no.ok_or_else(|| shard_error(&given_path, ShardProblem::MissingKey { key: SPLIT_NO }))?;
    if no >= count {
        return Err(shard_error(&given_path, ShardProblem::NumberOutOfRange { no, count }));
    }
    let prefix = shard_prefix(&given_path, no, count)
        .ok_or_else(|| shard_error(&given_path, ShardProblem::BadName { no, count }))?;

    let mut given_file = Some(file);
    let mut shards: Vec<GgufFile> = Vec::with_capacity(count as usize);
    for k in 0..count {
        let given_here = if k == no { given_file.take() } else { None };
        let shard = match given_here {
            Some(f) => f,
            None => {
                let path = shard_path(&prefix, k, count);
                match GgufFile::open(&path) {
                    Ok(f) => f,
                    Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                        return Err(shard_error(&path, ShardProblem::Missing { no: k, count }))
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let s = SplitKeys::of(&shard)?;
        let path = shard.path();
        match s.no {
            None => return Err(shard_error(path, ShardProblem::NotAShard { no: k, count })),
            Some(found) if found != k => {
                return Err(shard_error(path, ShardProblem::WrongNumber { found, expected: k }))
            }
            Some(_) => {}
        }
        match s.count {
            Some(c) if c == count => {}
            Some(found) => return Err(shard_error(path, ShardProblem::CountMismatch { found, expected: count })),
            None => return Err(shard_error(path, ShardProblem::MissingKey { key: SPLIT_COUNT })),
        }
        shards.push(shard);
    }

    let first = SplitKeys::of(&shards[0])?;
    let expected = first
        .tensors
        .ok_or_else(|| shard_error(shards[0].path(), ShardProblem::MissingKey { key: SPLIT_TENSORS_COUNT }))?;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut total: u64 = 0;
    for (k, shard) in shards.iter().enumerate() {
        if let Some(found) = SplitKeys::of(shard)?.tensors.filter(|&t| t != expected) {
            return Err(shard_error(shard.path(), ShardProblem::TensorCountMismatch { found, expected }));
        }
        for t in shard.tensors() {
            if let Some(&other) = seen.get(t.name.as_str()) {
                return Err(shard_error(
                    shard.path(),
                    ShardProblem::DuplicateTensor { name: t.name.clone(), other: shards[other].path().to_path_buf() },
                ));
            }
            seen.insert(&t.name, k);
        }
        total += shard.tensors().len() as u64;
    }
    if total as i64 != expected {
        return Err(shard_error(shards[0].path(), ShardProblem::TensorTotal { count, found: total, expected }));
    }
    Ok(shards)
}

/// How an output is divided into shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SplitRule {
    /// As the model is: the same number of shards, each tensor in the same shard (one file for one file).
    #[default]
    Keep,
    /// One file.
    Merge,
    /// At most this many tensors per shard (`llama-gguf-split --split-max-tensors`).
    MaxTensors(u64),
    /// At most this many bytes of tensor data per shard, each tensor counted padded to 32 bytes
    /// (`llama-gguf-split --split-max-size`); a tensor larger than that gets a shard of its own.
    MaxBytes(u64),
}

/// The shard of each tensor (0-based, non-decreasing) under `rule`, for tensors of `sizes` bytes; `keep` is the
/// model's own assignment (used by [`SplitRule::Keep`]). Refuses what `llama-gguf-split` refuses: a limit of 0,
/// a first tensor larger than the size limit (it would leave the first shard empty), more than 65535 shards.
pub fn assign_shards(sizes: &[u64], rule: SplitRule, keep: &[u16]) -> Result<Vec<u16>> {
    let refuse = |what: String| Error::Incompatible(crate::error::Incompatible::Other(what));
    let mut assignment: Vec<u32> = Vec::with_capacity(sizes.len());
    match rule {
        SplitRule::Keep => return Ok(keep.to_vec()),
        SplitRule::Merge => assignment.resize(sizes.len(), 0),
        SplitRule::MaxTensors(0) | SplitRule::MaxBytes(0) => {
            return Err(refuse("the split limit (tensors or bytes per shard) must be at least 1".into()))
        }
        SplitRule::MaxTensors(n) => assignment.extend((0..sizes.len() as u64).map(|i| (i / n) as u32)),
        SplitRule::MaxBytes(max) => {
            let (mut shard, mut current) = (0u32, 0u64);
            for (i, &size) in sizes.iter().enumerate() {
                let padded = size.div_ceil(SPLIT_SIZE_ALIGNMENT) * SPLIT_SIZE_ALIGNMENT;
                let next = current.saturating_add(padded);
                if next > max {
                    if i == 0 {
                        return Err(refuse(format!(
                            "the first tensor takes {padded} bytes, more than the split size {max}: the first \
                             shard would be empty (llama-gguf-split refuses this too); give a larger size"
                        )));
                    }
                    shard += 1;
                    current = padded;
                } else {
                    current = next;
                }
                assignment.push(shard);
            }
        }
    }
    if assignment.last().is_some_and(|&s| s > u32::from(u16::MAX) - 1) {
        return Err(refuse(format!(
            "the split would make {} shards; GGUF split sets hold at most 65535",
            assignment.last().map_or(0, |s| s + 1)
        )));
    }
    Ok(assignment.into_iter().map(|s| s as u16).collect())
}

/// The file names for an output of `count` shards given the user's name `out`:
/// - one shard: `out` itself, unless it is a shard name (`…-00001-of-00003.gguf` would promise a set);
/// - several: `out` may be the first shard's name (`PREFIX-00001-of-0000N.gguf`, with N = `count`) or a prefix
///   without the `.gguf` extension (`PREFIX`, as `llama-gguf-split` takes it); a name ending in `.gguf` that is
///   not the first shard's is refused as ambiguous (it cannot be one file of a set), naming what to give.
pub fn output_paths(out: &Path, count: u16) -> Result<Vec<PathBuf>> {
    let refuse = |reason: String| {
        Error::Incompatible(crate::error::Incompatible::OutputName { path: out.display().to_string(), reason })
    };
    let parsed = parse_shard_name(out);
    if count <= 1 {
        if let Some((_, no, n)) = parsed {
            return Err(refuse(format!(
                "the output is one file, but this is the name of shard {} of {n} of a split model; give a \
                 name without -NNNNN-of-MMMMM",
                u32::from(no) + 1
            )));
        }
        return Ok(vec![out.to_path_buf()]);
    }
    let prefix = match parsed {
        Some((prefix, 0, n)) if n == count => prefix,
        Some((prefix, no, n)) => {
            return Err(refuse(format!(
                "the output has {count} shards, but this names shard {} of {n}; give the first shard's name {} \
                 or the prefix {}",
                u32::from(no) + 1,
                shard_path(&prefix, 0, count).display(),
                prefix.display()
            )))
        }
        None => {
            let name = out.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
            if let Some(stem) = name.strip_suffix(".gguf") {
                let prefix = out.with_file_name(&out.file_name().unwrap_or_default().to_string_lossy()[..stem.len()]);
                return Err(refuse(format!(
                    "the output is split into {count} shards, and a single .gguf name is ambiguous; give the first \
                     shard's name {} or a prefix without .gguf ({}), or merge the shards into one file",
                    shard_path(&prefix, 0, count).display(),
                    prefix.display()
                )));
            }
            out.to_path_buf()
        }
    };
    Ok((0..count).map(|k| shard_path(&prefix, k, count)).collect())
}

/// Writes a model as a set of shards (or one file) that appears only when every shard is complete.
///
/// Tensor data is given in model order, as to a [`GgufWriter`]; the writer moves to the next shard when one is
/// complete. [`ShardedWriter::finish`] commits all shards together ([`crate::atomic::commit_all`]): until then
/// every shard is a temporary file, and a failure or a drop removes them all.
pub struct ShardedWriter {
    writers: Vec<GgufWriter>,
    current: usize,
}

impl ShardedWriter {
    /// Creates the shards at `paths` (one per shard; one path = an unsplit file). `metadata` is the model's
    /// (split keys are dropped from it); `assignment[i]` is tensor i's shard (non-decreasing). With several
    /// shards, the first carries `metadata` and every shard gets its split keys, as `llama-gguf-split` writes.
    pub fn create(
        paths: &[PathBuf],
        metadata: &[(String, Value)],
        tensors: Vec<TensorSpec>,
        assignment: &[u16],
        options: WriteOptions,
    ) -> Result<ShardedWriter> {
        let count = paths.len();
        if assignment.len() != tensors.len()
            || assignment.windows(2).any(|w| w[0] > w[1])
            || assignment.iter().any(|&s| s as usize >= count.max(1))
        {
            return Err(Error::WriterState(format!("tensor-to-shard assignment does not fit {count} shards in order")));
        }
        let model_metadata: Vec<(String, Value)> = metadata.iter().filter(|(k, _)| !is_split_key(k)).cloned().collect();
        let mut per_shard: Vec<Vec<TensorSpec>> = vec![Vec::new(); count];
        for (spec, &shard) in tensors.into_iter().zip(assignment) {
            per_shard[shard as usize].push(spec);
        }
        let n_tensors = per_shard.iter().map(Vec::len).sum::<usize>();
        let mut writers = Vec::with_capacity(count);
        for (k, (path, specs)) in paths.iter().zip(per_shard).enumerate() {
            let mut shard_metadata = if k == 0 { model_metadata.clone() } else { Vec::new() };
            if count > 1 {
                shard_metadata.push((SPLIT_NO.into(), Value::U16(k as u16)));
                shard_metadata.push((SPLIT_COUNT.into(), Value::U16(count as u16)));
                shard_metadata.push((SPLIT_TENSORS_COUNT.into(), Value::I32(n_tensors as i32)));
            }
            writers.push(GgufWriter::create(path, &shard_metadata, specs, options)?);
        }
        Ok(ShardedWriter { writers, current: 0 })
    }

    /// The output tensors with their data sizes, in the order their data must be given.
    pub fn tensors(&self) -> impl Iterator<Item = (&TensorSpec, u64)> {
        self.writers.iter().flat_map(|w| w.tensors())
    }

    /// The writer of the next tensor's shard, past the shards already complete.
    fn writer(&mut self) -> &mut GgufWriter {
        while self.current + 1 < self.writers.len()
            && self.writers[self.current].current_tensor() == self.writers[self.current].tensors().count()
        {
            self.current += 1;
        }
        &mut self.writers[self.current]
    }

    /// Appends `chunk` to the current tensor (see [`GgufWriter::write_data`]).
    pub fn write_data(&mut self, chunk: &[u8]) -> Result<()> {
        self.writer().write_data(chunk)
    }

    /// Appends `len` bytes of `src` from `offset` to the current tensor (see [`GgufWriter::copy_from_file`]).
    pub fn copy_from_file(&mut self, src: &std::fs::File, offset: u64, len: u64) -> Result<()> {
        self.writer().copy_from_file(src, offset, len)
    }

    /// Checks every shard is complete and renames them all into place; returns their paths in shard order.
    pub fn finish(self) -> Result<Vec<PathBuf>> {
        let sync = self.writers.first().is_some_and(GgufWriter::sync);
        let mut files = Vec::with_capacity(self.writers.len());
        for w in self.writers {
            files.push(w.finish_unrenamed()?);
        }
        crate::atomic::commit_all(files, sync)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_split_path() {
        let first = shard_path(Path::new("/m/model-q4"), 0, 3);
        assert_eq!(first, PathBuf::from("/m/model-q4-00001-of-00003.gguf"));
        assert_eq!(shard_prefix(&first, 0, 3), Some(PathBuf::from("/m/model-q4")));
        assert_eq!(shard_prefix(&first, 1, 3), None);
        assert_eq!(parse_shard_name(&first), Some((PathBuf::from("/m/model-q4"), 0, 3)));
        assert_eq!(parse_shard_name(Path::new("x-00004-of-00003.gguf")), None);
        assert_eq!(parse_shard_name(Path::new("x-00000-of-00003.gguf")), None);
        assert_eq!(parse_shard_name(Path::new("-00001-of-00003.gguf")), None);
    }

    #[test]
    fn output_names() {
        let out = |name: &str, n| output_paths(Path::new(name), n).map_err(|e| e.to_string());
        assert_eq!(out("a.gguf", 1).unwrap(), vec![PathBuf::from("a.gguf")]);
        assert_eq!(out("a", 2).unwrap()[1], PathBuf::from("a-00002-of-00002.gguf"));
        assert_eq!(out("a-00001-of-00002.gguf", 2).unwrap()[0], PathBuf::from("a-00001-of-00002.gguf"));
        assert!(out("a.gguf", 2).unwrap_err().contains("ambiguous"));
        assert!(out("a.GGUF", 2).unwrap_err().contains("a-00001-of-00002.gguf"));
        assert!(out("a-00002-of-00002.gguf", 2).unwrap_err().contains("names shard 2 of 2"));
        assert!(out("a-00001-of-00002.gguf", 1).unwrap_err().contains("one file"));
    }

    #[test]
    fn assignment_rules_match_llama_gguf_split() {
        let keep = [0, 0, 1];
        assert_eq!(assign_shards(&[1, 1, 1], SplitRule::Keep, &keep).unwrap(), keep);
        assert_eq!(assign_shards(&[1; 5], SplitRule::MaxTensors(2), &[]).unwrap(), [0, 0, 1, 1, 2]);
        // Sizes count padded to 32: 40 -> 64; 64 + 64 > 100 starts a shard; a tensor larger than the limit
        // after the first gets a shard of its own.
        assert_eq!(assign_shards(&[40, 40, 200, 10], SplitRule::MaxBytes(100), &[]).unwrap(), [0, 1, 2, 3]);
        assert_eq!(assign_shards(&[10, 10, 10], SplitRule::MaxBytes(64), &[]).unwrap(), [0, 0, 1]);
        assert!(assign_shards(&[200], SplitRule::MaxBytes(100), &[]).is_err());
        assert!(assign_shards(&[1], SplitRule::MaxTensors(0), &[]).is_err());
    }
}
