//! torch `.bin` state dicts (`torch.save`'s zip format, e.g. PEFT's `adapter_model.bin`), read without torch and
//! without executing anything, within hard limits.
//!
//! - [`zip`]: the archive: central directory, stored/deflate members read in bounded chunks, each inflated only
//!   to the size expected of it (CRC-32 checked).
//! - [`pickle`]: `data.pkl`: a non-executing pickle machine with an allow-list of globals and hard limits.
//!
//! The file's memory budget is tied to what its pickle declares: `data.pkl` at most [`MAX_PICKLE_BYTES`], the
//! `byteorder` member at most [`MAX_BYTEORDER_BYTES`], each storage exactly `numel × element size` bytes (its
//! zip entry must say so, and its stream must end there), only the storages the state dict's tensors use are
//! read, and the tensors materialised from them at most [`VIEW_BUDGET_FACTOR`] times those bytes (plus
//! [`VIEW_BUDGET_SLACK`]), so a stride-0 view cannot blow up. Large buffers are reserved fallibly: an
//! allocation the process cannot make is an error, not an abort.
//!
//! Not a zip: torch's legacy (pre-1.6) format, or a plain pickle. Its first pickle is read by the same machine
//! (so a hostile global is refused by name), then the file is refused either way.

pub mod pickle;
#[cfg(test)]
mod tests;
pub mod zip;

use std::path::Path;

use crate::error::{Error, Result, TorchBin};
use pickle::{Object, Value};
use zip::{Archive, FileSource, Source};

/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 8;
/// Largest `data.pkl` (inflated), and the most bytes of a file that is not a zip read as a pickle.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Largest `byteorder` member ("little" or "big").
pub const MAX_BYTEORDER_BYTES: u64 = 16;
/// The tensors of a file may hold at most this many times the bytes of the storages they view (views of one
/// storage normally partition it; a tied weight saved twice doubles it).
pub const VIEW_BUDGET_FACTOR: u64 = 4;
/// Bytes of tensors allowed beyond [`VIEW_BUDGET_FACTOR`] × storage bytes (tiny files, empty storages).
pub const VIEW_BUDGET_SLACK: u64 = 1 << 20;

/// The element types of torch storages this reader accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// float32
    F32,
    /// float64
    F64,
    /// float16
    F16,
    /// bfloat16 (materialised as float32, exactly)
    BF16,
    /// uint8
    U8,
    /// int8
    I8,
    /// int16
    I16,
    /// int32
    I32,
    /// int64
    I64,
    /// bool (one byte)
    Bool,
}

const DTYPES: [(Dtype, &str, &str, u64); 10] = [
    (Dtype::F32, "FloatStorage", "float32", 4),
    (Dtype::F64, "DoubleStorage", "float64", 8),
    (Dtype::F16, "HalfStorage", "float16", 2),
    (Dtype::BF16, "BFloat16Storage", "bfloat16", 2),
    (Dtype::U8, "ByteStorage", "uint8", 1),
    (Dtype::I8, "CharStorage", "int8", 1),
    (Dtype::I16, "ShortStorage", "int16", 2),
    (Dtype::I32, "IntStorage", "int32", 4),
    (Dtype::I64, "LongStorage", "int64", 8),
    (Dtype::Bool, "BoolStorage", "bool", 1),
];

impl Dtype {
    fn row(self) -> &'static (Dtype, &'static str, &'static str, u64) {
        DTYPES.iter().find(|r| r.0 == self).unwrap_or(&DTYPES[0])
    }

    /// Bytes per element in the storage.
    pub fn size(self) -> u64 {
        self.row().3
    }

    /// torch's legacy storage class name (`FloatStorage`, ...).
    pub fn storage_class(self) -> &'static str {
        self.row().1
    }

    /// torch's dtype name (`float32`, ...).
    pub fn torch_name(self) -> &'static str {
        self.row().2
    }

    /// The numpy dtype name of the materialised array: the torch name, except bfloat16 → float32.
    pub fn output_name(self) -> &'static str {
        if self == Dtype::BF16 {
            "float32"
        } else {
            self.torch_name()
        }
    }

    /// Bytes per element of the materialised array.
    pub fn output_size(self) -> u64 {
        if self == Dtype::BF16 {
            4
        } else {
            self.size()
        }
    }

    fn from_storage_class(name: &str) -> Option<Dtype> {
        DTYPES.iter().find(|r| r.1 == name).map(|r| r.0)
    }

    fn from_torch_name(name: &str) -> Option<Dtype> {
        let canonical = match name {
            "float" => "float32",
            "double" => "float64",
            "half" => "float16",
            "short" => "int16",
            "int" => "int32",
            "long" => "int64",
            other => other,
        };
        DTYPES.iter().find(|r| r.2 == canonical).map(|r| r.0)
    }
}

/// A storage named by a persistent id: zip member `data/<key>`, `numel` elements of `dtype`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    /// The key (the member name under `data/`).
    pub key: String,
    /// Element type.
    pub dtype: Dtype,
    /// Element count.
    pub numel: u64,
}

impl StorageRef {
    /// Size in bytes, `None` when it overflows.
    pub fn nbytes(&self) -> Option<u64> {
        self.numel.checked_mul(self.dtype.size())
    }
}

/// A tensor as a view of a storage: element offset, shape and strides (in elements, numpy order).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorView {
    /// Index into the storages of the pickle.
    pub storage: usize,
    /// Offset of element 0, in elements.
    pub offset: u64,
    /// Shape.
    pub shape: Vec<u64>,
    /// Stride of each dimension, in elements.
    pub strides: Vec<u64>,
}

impl TensorView {
    /// Element count, `None` when it overflows.
    pub fn numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
    }

    /// Every element the view reaches lies inside `storage` (checked arithmetic throughout).
    fn check_bounds(&self, storage: &StorageRef) -> Result<(), String> {
        let numel = self.numel().ok_or_else(|| format!("size {:?} overflows", self.shape))?;
        if numel == 0 {
            return Ok(());
        }
        let last = self
            .shape
            .iter()
            .zip(&self.strides)
            .try_fold(self.offset, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x)));
        match last {
            Some(last) if last < storage.numel => Ok(()),
            _ => Err(format!(
                "tensor (offset {}, size {:?}, stride {:?}) reads past its storage of {} elements",
                self.offset, self.shape, self.strides, storage.numel
            )),
        }
    }
}

/// A materialised tensor: contiguous little-endian bytes of [`Dtype::output_name`], in numpy (C) order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The state-dict key.
    pub name: String,
    /// The storage's element type (bfloat16 data is already widened to float32).
    pub dtype: Dtype,
    /// Shape (numpy order).
    pub shape: Vec<u64>,
    /// `numel × dtype.output_size()` bytes.
    pub data: Vec<u8>,
}

/// Reads a torch `.bin` state dict from `path` (refused without blocking when it is not a regular file).
/// Errors name the file.
pub fn read_torch_bin(path: &Path) -> Result<Vec<Tensor>> {
    let file = crate::paths::open_input(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let source = FileSource { file, len, path: path.to_path_buf() };
    read_source(&source).map_err(|e| e.in_file(path))
}

/// [`read_torch_bin`] over bytes in memory (tests, fuzzing).
pub fn read_torch_bin_bytes(bytes: &[u8]) -> Result<Vec<Tensor>> {
    read_source(bytes)
}

fn err(member: &str, offset: u64, kind: TorchBin) -> Error {
    Error::TorchBin { member: member.to_string(), offset, kind }
}

fn read_source<S: Source + ?Sized>(source: &S) -> Result<Vec<Tensor>> {
    let Some(archive) = Archive::open(source)? else {
        return refuse_non_zip(source);
    };
    let pickles: Vec<&zip::Member> =
        archive.members().iter().filter(|m| m.name.ends_with("data.pkl") && m.name.matches('/').count() == 1).collect();
    let [pkl] = pickles[..] else {
        return Err(err(
            "zip directory",
            0,
            TorchBin::Zip(format!("not a torch zip archive (expected one '<name>/data.pkl', found {})", pickles.len())),
        ));
    };
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    let big_endian = match archive.member(&format!("{prefix}byteorder")) {
        None => false,
        Some(m) => {
            if m.size > MAX_BYTEORDER_BYTES {
                return Err(zip::limit(
                    &m.name,
                    0,
                    "byteorder size",
                    m.size,
                    MAX_BYTEORDER_BYTES,
                    "MAX_BYTEORDER_BYTES",
                ));
            }
            let raw = archive.read_exact(m, m.size)?;
            match String::from_utf8_lossy(&raw).trim() {
                "little" => false,
                "big" => true,
                other => {
                    return Err(err(
                        &m.name,
                        0,
                        TorchBin::Zip(format!("unknown byteorder {:?}", pickle::cut(other, 20))),
                    ))
                }
            }
        }
    };
    if pkl.size > MAX_PICKLE_BYTES {
        return Err(zip::limit(&pkl.name, 0, "data.pkl size", pkl.size, MAX_PICKLE_BYTES, "MAX_PICKLE_BYTES"));
    }
    let data = archive.read_exact(pkl, pkl.size)?;
    let unpickled = pickle::unpickle(&data, &pkl.name, true)?;
    let entries = state_dict(&unpickled, &pkl.name)?;
    materialise(&archive, prefix, &unpickled, &entries, big_endian)
}

/// The `(key, tensor index)` entries of the root dict; anything else is refused.
fn state_dict(u: &pickle::Unpickled, member: &str) -> Result<Vec<(String, usize)>> {
    let fail = |what: String| err(member, 0, TorchBin::Pickle(what));
    let Value::Obj(root) = &u.root else {
        return Err(fail(format!(
            "expected a state dict (a dict of tensors), got {}",
            pickle::type_name(&u.objects, &u.root)
        )));
    };
    let Some(Object::Dict(dict)) = u.objects.get(*root as usize) else {
        return Err(fail(format!(
            "expected a state dict (a dict of tensors), got {}",
            pickle::type_name(&u.objects, &u.root)
        )));
    };
    let mut out = Vec::with_capacity(dict.entries.len());
    for (key, value) in &dict.entries {
        let pickle::Key::Str(name) = key else {
            return Err(fail("state dict key of type int is not a string".into()));
        };
        match value {
            Value::Obj(id) if matches!(u.objects.get(*id as usize), Some(Object::Tensor(_))) => {
                if let Some(Object::Tensor(t)) = u.objects.get(*id as usize) {
                    out.push((name.to_string(), *t));
                }
            }
            other => {
                return Err(fail(format!(
                    "state dict entry {:?} is a {}, not a tensor",
                    pickle::cut(name, 200),
                    pickle::type_name(&u.objects, other)
                )))
            }
        }
    }
    Ok(out)
}

fn materialise<S: Source + ?Sized>(
    archive: &Archive<'_, S>,
    prefix: &str,
    u: &pickle::Unpickled,
    entries: &[(String, usize)],
    big_endian: bool,
) -> Result<Vec<Tensor>> {
    let member_of = |key: &str| format!("{prefix}data/{key}");
    // the budget: the storages the state dict uses, and the tensors' bytes against them
    let mut used = vec![false; u.storages.len()];
    let (mut storage_bytes, mut tensor_bytes) = (0u64, 0u64);
    for (name, t) in entries {
        let view = &u.tensors[*t];
        let storage = &u.storages[view.storage];
        let too_big = || {
            err(&member_of(&storage.key), 0, TorchBin::Tensor { tensor: name.clone(), reason: "size overflows".into() })
        };
        if !used[view.storage] {
            used[view.storage] = true;
            storage_bytes = storage.nbytes().and_then(|b| b.checked_add(storage_bytes)).ok_or_else(too_big)?;
        }
        let bytes = view.numel().and_then(|n| n.checked_mul(storage.dtype.output_size())).ok_or_else(too_big)?;
        tensor_bytes = tensor_bytes.checked_add(bytes).ok_or_else(too_big)?;
    }
    let budget = storage_bytes.saturating_mul(VIEW_BUDGET_FACTOR).saturating_add(VIEW_BUDGET_SLACK);
    if tensor_bytes > budget {
        return Err(zip::limit(
            "zip directory",
            0,
            "bytes of tensors (views of the storages)",
            tensor_bytes,
            budget,
            "VIEW_BUDGET_FACTOR",
        ));
    }
    let mut storages: Vec<Option<Vec<u8>>> = vec![None; u.storages.len()];
    for (i, storage) in u.storages.iter().enumerate() {
        if !used[i] {
            continue;
        }
        let name = member_of(&storage.key);
        let member = archive.member(&name).ok_or_else(|| {
            err(&name, 0, TorchBin::Zip("the pickle references this storage but the zip has no such member".into()))
        })?;
        let nbytes = storage.nbytes().unwrap_or(u64::MAX);
        storages[i] = Some(archive.read_exact(member, nbytes)?);
    }
    let mut out = Vec::with_capacity(entries.len());
    for (name, t) in entries {
        let view = &u.tensors[*t];
        let storage = &u.storages[view.storage];
        let bytes = storages[view.storage].as_deref().unwrap_or(&[]);
        let data = gather(view, storage.dtype, bytes, big_endian).ok_or_else(|| {
            err(
                &member_of(&storage.key),
                0,
                TorchBin::OutOfMemory {
                    what: format!("tensor {:?}", pickle::cut(name, 200)),
                    bytes: view.numel().unwrap_or(0) * storage.dtype.output_size(),
                },
            )
        })?;
        out.push(Tensor { name: name.clone(), dtype: storage.dtype, shape: view.shape.clone(), data });
    }
    Ok(out)
}

/// The view's elements in C order as little-endian bytes of the output dtype (`None`: allocation failed). The
/// caller has checked the view against the storage ([`TensorView::check_bounds`]).
fn gather(view: &TensorView, dtype: Dtype, storage: &[u8], big_endian: bool) -> Option<Vec<u8>> {
    let numel = view.numel()? as usize;
    let (size, out_size) = (dtype.size() as usize, dtype.output_size() as usize);
    let mut out = Vec::new();
    out.try_reserve_exact(numel.checked_mul(out_size)?).ok()?;
    if numel == 0 {
        return Some(out);
    }
    let contiguous = {
        let mut expect = 1u64;
        let mut ok = true;
        for (&d, &st) in view.shape.iter().zip(&view.strides).rev() {
            ok &= d == 1 || st == expect;
            expect *= d;
        }
        ok
    };
    let start = view.offset as usize * size;
    if contiguous && !big_endian && dtype != Dtype::BF16 {
        out.extend_from_slice(&storage[start..start + numel * size]);
        return Some(out);
    }
    let dims = view.shape.len();
    let mut index = vec![0u64; dims];
    let mut element = [0u8; 8];
    for _ in 0..numel {
        let at = view.offset + index.iter().zip(&view.strides).map(|(i, s)| i * s).sum::<u64>();
        let start = at as usize * size;
        element[..size].copy_from_slice(&storage[start..start + size]);
        if big_endian {
            element[..size].reverse();
        }
        if dtype == Dtype::BF16 {
            // bfloat16 is the high half of a float32: exact
            let bits = u32::from(u16::from_le_bytes([element[0], element[1]])) << 16;
            out.extend_from_slice(&bits.to_le_bytes());
        } else {
            out.extend_from_slice(&element[..size]);
        }
        // next index in C order
        for d in (0..dims).rev() {
            index[d] += 1;
            if index[d] < view.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Some(out)
}

/// A file that is not a zip: read its first pickle (a hostile global is refused by name), then refuse the file,
/// saying whether it is torch's legacy format.
fn refuse_non_zip<S: Source + ?Sized>(source: &S) -> Result<Vec<Tensor>> {
    let n = source.len().min(MAX_PICKLE_BYTES);
    let mut data = vec![0u8; n as usize];
    source.read_at(0, &mut data).map_err(|e| err("pickle", 0, TorchBin::Zip(format!("read failed: {e}"))))?;
    let first = pickle::unpickle(&data, "pickle", false)?;
    let legacy = matches!(&first.root, Value::BigInt(b) if **b == pickle::LEGACY_MAGIC);
    Err(err("pickle", 0, if legacy { TorchBin::Legacy } else { TorchBin::PlainPickle }))
}
