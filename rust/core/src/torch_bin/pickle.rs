//! A non-executing pickle reader for torch state dicts: a stack machine over the opcodes of protocols 0–5 that
//! builds a small value tree and never calls anything.
//!
//! Values are `None`, bools, ints, floats, str, bytes, and containers (tuple, list, dict with str/int keys)
//! kept in an arena and referred to by index, so that no structure is ever walked recursively: dropping, hashing
//! or describing a value is flat, however deep or shared (a memo DAG of 2^100 leaves is 100 arena entries).
//! The only globals are the few a state dict needs ([`Global`]); any other is refused by name at the opcode
//! that names it, before anything is built from it. "Calls" of the allowed globals are interpreted here:
//! `OrderedDict()` makes an empty dict, the tensor-rebuild functions make a [`TensorView`] whose geometry is
//! checked against its storage, a storage class is only ever a tag inside a persistent id.
//!
//! Hard limits (each a constant below, each error naming member, byte offset and limit): opcodes executed,
//! memo entries, objects built, nesting depth, stack and mark depth, the size of one str/bytes/int.

use std::collections::HashMap;
use std::rc::Rc;

use crate::error::{Error, TorchBin};

use super::{Dtype, StorageRef, TensorView, MAX_DIMS};

/// Most opcodes one pickle may execute (a state dict needs about 30 per tensor).
pub const MAX_OPCODES: u64 = 1 << 23;
/// Most memo entries.
pub const MAX_MEMO: u64 = 1 << 20;
/// Most objects built (containers, strings, storages, tensors), including those later dropped.
pub const MAX_OBJECTS: u64 = 1 << 21;
/// Deepest nesting of containers (a state dict needs 4: dict, rebuild arguments, size tuple, ...). Computed as
/// each container is built or grows; a container that grows after it was put inside another does not raise its
/// parents' recorded depth, which is harmless: nothing here recurses, the limit refuses absurd files early.
pub const MAX_DEPTH: u64 = 64;
/// Most values on the stack, and most open marks.
pub const MAX_STACK: u64 = 1 << 20;
/// Largest str or bytes value, in bytes (state-dict keys are short).
pub const MAX_STRING_BYTES: u64 = 1 << 20;
/// Largest integer, in bytes of two's complement (torch's legacy magic number needs 10).
pub const MAX_INT_BYTES: u64 = 64;

/// torch's legacy (pre-1.6) format starts with a pickle of this number (little-endian bytes).
pub const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// An index into the arena of built objects.
pub type ObjId = u32;

/// A value on the stack or in a container. Containers are arena indices, so cloning is cheap and flat.
#[derive(Debug, Clone)]
pub enum Value {
    /// Python's None.
    None,
    /// A bool.
    Bool(bool),
    /// An int that fits 64 bits.
    Int(i64),
    /// A larger int: little-endian two's complement, minimal length.
    BigInt(Rc<[u8]>),
    /// A float.
    Float(f64),
    /// A str.
    Str(Rc<str>),
    /// A bytes (or bytearray) object.
    Bytes(Rc<[u8]>),
    /// One of the allowed globals.
    Global(Global),
    /// A container, storage or tensor in the arena.
    Obj(ObjId),
}

/// A dict key: only strings and ints are ever hashed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A str key.
    Str(Rc<str>),
    /// An int key.
    Int(i64),
}

/// A dict in insertion order (Python's dict and OrderedDict alike).
#[derive(Debug, Default)]
pub struct Dict {
    /// Entries in insertion order; a repeated key replaces its value in place, as in Python.
    pub entries: Vec<(Key, Value)>,
    index: HashMap<Key, usize>,
}

/// What an arena entry holds.
#[derive(Debug)]
pub enum Object {
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict or OrderedDict.
    Dict(Dict),
    /// A storage from a persistent id (an index into [`Unpickled::storages`]).
    Storage(usize),
    /// A rebuilt tensor (an index into [`Unpickled::tensors`]).
    Tensor(usize),
}

/// The globals a torch state dict may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `torch._utils._rebuild_tensor` (1), `_rebuild_tensor_v2` (2), `_rebuild_tensor_v3` (3).
    RebuildTensor(u8),
    /// `torch._utils._rebuild_parameter` and `_rebuild_parameter_with_state`.
    RebuildParameter,
    /// `collections.OrderedDict`.
    OrderedDict,
    /// `torch.<X>Storage`: a tag in a persistent id.
    StorageClass(Dtype),
    /// `torch.<dtype>`.
    DtypeObject(Dtype),
}

impl Global {
    fn lookup(module: &str, name: &str) -> Option<Global> {
        match (module, name) {
            ("torch._utils", "_rebuild_tensor") => Some(Global::RebuildTensor(1)),
            ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensor(2)),
            ("torch._utils", "_rebuild_tensor_v3") => Some(Global::RebuildTensor(3)),
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => Some(Global::RebuildParameter),
            ("collections", "OrderedDict") => Some(Global::OrderedDict),
            ("torch", name) => Dtype::from_storage_class(name)
                .map(Global::StorageClass)
                .or_else(|| Dtype::from_torch_name(name).map(Global::DtypeObject)),
            _ => None,
        }
    }

    fn describe(self) -> String {
        match self {
            Global::RebuildTensor(1) => "torch._utils._rebuild_tensor".into(),
            Global::RebuildTensor(v) => format!("torch._utils._rebuild_tensor_v{v}"),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::StorageClass(d) => format!("storage class torch.{}", d.storage_class()),
            Global::DtypeObject(d) => format!("torch.{}", d.torch_name()),
        }
    }
}

/// What a pickle produced: its root value, the arena, and the storages and tensors it declared.
#[derive(Debug)]
pub struct Unpickled {
    /// The value STOP returned.
    pub root: Value,
    /// Every object built.
    pub objects: Vec<Object>,
    /// Storages referenced by persistent ids, one per key.
    pub storages: Vec<StorageRef>,
    /// Tensors rebuilt, in the order they were built.
    pub tensors: Vec<TensorView>,
}

/// Python 2 module names that Python's unpickler maps to Python 3 ones (`_compat_pickle.IMPORT_MAPPING`, the
/// part an attacker's pickle is likely to use), to show both in a refusal.
const PY2_MODULES: &[(&str, &str)] = &[
    ("__builtin__", "builtins"),
    ("copy_reg", "copyreg"),
    ("cPickle", "pickle"),
    ("commands", "subprocess"),
    ("exceptions", "builtins"),
    ("UserDict", "collections"),
    ("cStringIO", "io"),
    ("StringIO", "io"),
    ("urllib2", "urllib.request"),
    ("httplib", "http.client"),
    ("Tkinter", "tkinter"),
];

/// Cuts untrusted text to `max` characters for a message.
pub(crate) fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

struct Machine<'a> {
    data: &'a [u8],
    member: &'a str,
    pos: usize,
    /// Offset of the opcode being executed (for errors).
    at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objects: Vec<Object>,
    depths: Vec<u16>,
    built: u64,
    storages: Vec<StorageRef>,
    storage_by_key: HashMap<Rc<str>, usize>,
    tensors: Vec<TensorView>,
    protocol: u8,
}

/// Runs the pickle in `data` (the bytes of `member`) up to its STOP opcode. `storage_bytes` says, per storage
/// key, whether a persistent id may name it (`None` for a file that is not a zip: any persistent id is refused).
pub fn unpickle(data: &[u8], member: &str, storages_allowed: bool) -> Result<Unpickled, Error> {
    let mut m = Machine {
        data,
        member,
        pos: 0,
        at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objects: Vec::new(),
        depths: Vec::new(),
        built: 0,
        storages: Vec::new(),
        storage_by_key: HashMap::new(),
        tensors: Vec::new(),
        protocol: 0,
    };
    let root = m.run(storages_allowed)?;
    Ok(Unpickled { root, objects: m.objects, storages: m.storages, tensors: m.tensors })
}

/// A short description of a value's type, never of its content.
pub fn type_name(objects: &[Object], v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::Int(_) | Value::BigInt(_) => "int",
        Value::Float(_) => "float",
        Value::Str(_) => "str",
        Value::Bytes(_) => "bytes",
        Value::Global(_) => "global",
        Value::Obj(id) => match objects.get(*id as usize) {
            Some(Object::Tuple(_)) => "tuple",
            Some(Object::List(_)) => "list",
            Some(Object::Dict(_)) => "dict",
            Some(Object::Storage(_)) => "storage",
            Some(Object::Tensor(_)) => "tensor",
            None => "object",
        },
    }
}

impl<'a> Machine<'a> {
    fn err(&self, what: impl Into<String>) -> Error {
        Error::TorchBin { member: self.member.to_string(), offset: self.at as u64, kind: TorchBin::Pickle(what.into()) }
    }

    fn limit(&self, what: &'static str, found: u64, limit: u64, constant: &'static str) -> Error {
        super::zip::limit(self.member, self.at as u64, what, found, limit, constant)
    }

    fn tensor_err(&self, reason: String) -> Error {
        Error::TorchBin {
            member: self.member.to_string(),
            offset: self.at as u64,
            kind: TorchBin::Tensor { tensor: String::new(), reason },
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(self.err(format!("pickle ends inside an opcode's argument ({n} bytes needed)")));
        };
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A text argument up to its newline (protocol 0 opcodes), at most [`MAX_STRING_BYTES`].
    fn line(&mut self) -> Result<&'a [u8], Error> {
        let rest = &self.data[self.pos..];
        let window = &rest[..rest.len().min(MAX_STRING_BYTES as usize + 1)];
        match window.iter().position(|&b| b == b'\n') {
            Some(n) => {
                let line = &rest[..n];
                self.pos += n + 1;
                Ok(line)
            }
            None if window.len() > MAX_STRING_BYTES as usize => {
                Err(self.limit("text argument length", window.len() as u64, MAX_STRING_BYTES, "MAX_STRING_BYTES"))
            }
            None => Err(self.err("pickle ends inside a text argument (no newline)")),
        }
    }

    fn sized(&mut self, n: u64) -> Result<&'a [u8], Error> {
        if n > MAX_STRING_BYTES {
            return Err(self.limit("str/bytes length", n, MAX_STRING_BYTES, "MAX_STRING_BYTES"));
        }
        self.take(n as usize)
    }

    fn count_object(&mut self) -> Result<(), Error> {
        self.built += 1;
        if self.built > MAX_OBJECTS {
            return Err(self.limit("objects built", self.built, MAX_OBJECTS, "MAX_OBJECTS"));
        }
        Ok(())
    }

    fn str_value(&mut self, bytes: &[u8]) -> Result<Value, Error> {
        let text = std::str::from_utf8(bytes).map_err(|_| self.err("str is not valid UTF-8"))?;
        self.count_object()?;
        Ok(Value::Str(Rc::from(text)))
    }

    /// protocol 0-2 "strings" are bytes that Python decodes as ASCII
    fn ascii_value(&mut self, bytes: &[u8]) -> Result<Value, Error> {
        if !bytes.is_ascii() {
            return Err(self.err("protocol 0-2 string is not ASCII"));
        }
        self.str_value(bytes)
    }

    fn bytes_value(&mut self, bytes: &[u8]) -> Result<Value, Error> {
        self.count_object()?;
        Ok(Value::Bytes(Rc::from(bytes)))
    }

    fn depth_of(&self, v: &Value) -> u64 {
        match v {
            Value::Obj(id) => u64::from(self.depths[*id as usize]),
            _ => 0,
        }
    }

    fn new_object(&mut self, object: Object, depth: u64) -> Result<Value, Error> {
        self.count_object()?;
        if depth > MAX_DEPTH {
            return Err(self.limit("nesting depth", depth, MAX_DEPTH, "MAX_DEPTH"));
        }
        let id = self.objects.len() as ObjId;
        self.objects.push(object);
        self.depths.push(depth as u16);
        Ok(Value::Obj(id))
    }

    fn container(&mut self, items: Vec<Value>, tuple: bool) -> Result<Value, Error> {
        let depth = 1 + items.iter().map(|v| self.depth_of(v)).max().unwrap_or(0);
        self.new_object(if tuple { Object::Tuple(items) } else { Object::List(items) }, depth)
    }

    fn push(&mut self, v: Value) -> Result<(), Error> {
        if self.stack.len() as u64 >= MAX_STACK {
            return Err(self.limit("stack size", self.stack.len() as u64 + 1, MAX_STACK, "MAX_STACK"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, Error> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> Result<&Value, Error> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        self.stack.last().ok_or_else(|| self.err("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, Error> {
        let mark = self.marks.pop().ok_or_else(|| self.err("no MARK before an opcode that needs one"))?;
        Ok(self.stack.split_off(mark))
    }

    fn memo_put(&mut self, index: u32) -> Result<(), Error> {
        let v = self.top()?.clone();
        if !self.memo.contains_key(&index) && self.memo.len() as u64 >= MAX_MEMO {
            return Err(self.limit("memo entries", self.memo.len() as u64 + 1, MAX_MEMO, "MAX_MEMO"));
        }
        self.memo.insert(index, v);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<(), Error> {
        let v = self.memo.get(&index).cloned().ok_or_else(|| self.err(format!("memo has no entry {index}")))?;
        self.push(v)
    }

    fn key(&self, v: Value) -> Result<Key, Error> {
        match v {
            Value::Str(s) => Ok(Key::Str(s)),
            Value::Int(i) => Ok(Key::Int(i)),
            other => Err(self.err(format!(
                "dict key of type {} (only str and int keys are accepted)",
                type_name(&self.objects, &other)
            ))),
        }
    }

    fn set_items(&mut self, target: &Value, items: Vec<Value>) -> Result<(), Error> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of values"));
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut depth = 0;
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            depth = depth.max(1 + self.depth_of(&v));
            pairs.push((self.key(k)?, v));
        }
        let id = match target {
            Value::Obj(id) if matches!(self.objects.get(*id as usize), Some(Object::Dict(_))) => *id as usize,
            other => return Err(self.err(format!("SETITEM(S) on a {}, not a dict", type_name(&self.objects, other)))),
        };
        let Some(Object::Dict(dict)) = self.objects.get_mut(id) else {
            return Err(self.err("SETITEM(S) on something that is not a dict"));
        };
        for (k, v) in pairs {
            match dict.index.get(&k) {
                Some(&i) => dict.entries[i].1 = v,
                None => {
                    dict.index.insert(k.clone(), dict.entries.len());
                    dict.entries.push((k, v));
                }
            }
        }
        self.raise_depth(id, depth)
    }

    fn raise_depth(&mut self, id: usize, depth: u64) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(self.limit("nesting depth", depth, MAX_DEPTH, "MAX_DEPTH"));
        }
        let d = &mut self.depths[id];
        *d = (*d).max(depth as u16);
        Ok(())
    }

    fn append(&mut self, target: &Value, items: Vec<Value>) -> Result<(), Error> {
        let depth = 1 + items.iter().map(|v| self.depth_of(v)).max().unwrap_or(0);
        let id = match target {
            Value::Obj(id) if matches!(self.objects.get(*id as usize), Some(Object::List(_))) => *id as usize,
            other => return Err(self.err(format!("APPEND(S) on a {}, not a list", type_name(&self.objects, other)))),
        };
        if let Some(Object::List(list)) = self.objects.get_mut(id) {
            list.extend(items);
        }
        self.raise_depth(id, depth)
    }

    fn global(&self, module: &str, name: &str) -> Result<Value, Error> {
        // Python's unpickler maps Python 2 names before resolving them (protocol < 3); only for the message here,
        // since no allowed name has a Python 2 spelling
        let py3 = PY2_MODULES.iter().find(|(old, _)| *old == module).map(|(_, new)| *new);
        if let Some(g) = Global::lookup(py3.unwrap_or(module), name) {
            return Ok(Value::Global(g));
        }
        let python3 = py3.map(|m| format!(" (Python 3: '{}.{}')", m, cut(name, 200))).unwrap_or_default();
        Err(Error::TorchBin {
            member: self.member.to_string(),
            offset: self.at as u64,
            kind: TorchBin::RefusedGlobal { module: cut(module, 200), name: cut(name, 200), python3 },
        })
    }

    fn global_from_lines(&mut self) -> Result<Value, Error> {
        let module = self.line()?;
        let name = self.line()?;
        let module = std::str::from_utf8(module).map_err(|_| self.err("global module name is not UTF-8"))?;
        let name = std::str::from_utf8(name).map_err(|_| self.err("global name is not UTF-8"))?;
        self.global(module, name)
    }

    fn tuple_items(&self, v: &Value) -> Option<&[Value]> {
        match v {
            Value::Obj(id) => match self.objects.get(*id as usize) {
                Some(Object::Tuple(items)) => Some(items),
                _ => None,
            },
            _ => None,
        }
    }

    /// Calls an allowed global with `args` (REDUCE, NEWOBJ, OBJ, INST): interpreted, never executed.
    fn call(&mut self, callable: Value, args: Value) -> Result<Value, Error> {
        let Value::Global(g) = callable else {
            return Err(self.err(format!("call of a {}, not an allowed global", type_name(&self.objects, &callable))));
        };
        let Some(items) = self.tuple_items(&args).map(<[Value]>::to_vec) else {
            return Err(self.err(format!(
                "arguments of {} are a {}, not a tuple",
                g.describe(),
                type_name(&self.objects, &args)
            )));
        };
        match g {
            Global::OrderedDict if items.is_empty() => self.new_object(Object::Dict(Dict::default()), 1),
            Global::OrderedDict => Err(self.err("collections.OrderedDict called with arguments")),
            Global::RebuildParameter => match items.first() {
                Some(v @ Value::Obj(id)) if matches!(self.objects.get(*id as usize), Some(Object::Tensor(_))) => {
                    Ok(v.clone())
                }
                _ => Err(self.err("torch._utils._rebuild_parameter without a tensor")),
            },
            Global::RebuildTensor(version) => self.rebuild_tensor(version, &items),
            Global::StorageClass(_) | Global::DtypeObject(_) => {
                Err(self.err(format!("refusing to call {}", g.describe())))
            }
        }
    }

    fn non_negative(&self, v: &Value, what: &str) -> Result<u64, Error> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            _ => Err(self.tensor_err(format!("{what} is a {}, not a non-negative int", type_name(&self.objects, v)))),
        }
    }

    fn int_tuple(&self, v: &Value, what: &str) -> Result<Vec<u64>, Error> {
        let Some(items) = self.tuple_items(v) else {
            return Err(self.tensor_err(format!("{what} is a {}, not a tuple", type_name(&self.objects, v))));
        };
        if items.len() > MAX_DIMS {
            return Err(self.tensor_err(format!("{what} has {} dimensions (at most {MAX_DIMS})", items.len())));
        }
        items.iter().map(|x| self.non_negative(x, what)).collect()
    }

    fn rebuild_tensor(&mut self, version: u8, args: &[Value]) -> Result<Value, Error> {
        let (min, max) = match version {
            1 => (4, 4),
            2 => (6, 7),
            _ => (7, 8),
        };
        if args.len() < min || args.len() > max {
            return Err(self.tensor_err(format!(
                "{} takes {min} to {max} arguments, got {}",
                Global::RebuildTensor(version).describe(),
                args.len()
            )));
        }
        let storage = match &args[0] {
            Value::Obj(id) => match self.objects.get(*id as usize) {
                Some(Object::Storage(s)) => *s,
                _ => {
                    return Err(self.tensor_err(format!(
                        "tensor rebuild without a storage ({})",
                        type_name(&self.objects, &args[0])
                    )))
                }
            },
            other => {
                return Err(
                    self.tensor_err(format!("tensor rebuild without a storage ({})", type_name(&self.objects, other)))
                )
            }
        };
        let offset = self.non_negative(&args[1], "storage offset")?;
        let shape = self.int_tuple(&args[2], "size")?;
        let strides = self.int_tuple(&args[3], "stride")?;
        if shape.len() != strides.len() {
            return Err(self.tensor_err(format!(
                "size has {} dimensions but stride has {}",
                shape.len(),
                strides.len()
            )));
        }
        let s = &self.storages[storage];
        if version == 3 {
            match args[6] {
                Value::Global(Global::DtypeObject(d)) if d == s.dtype => {}
                Value::Global(Global::DtypeObject(d)) => {
                    return Err(self.tensor_err(format!(
                        "tensor dtype torch.{} does not match its storage torch.{}",
                        d.torch_name(),
                        s.dtype.storage_class()
                    )))
                }
                ref other => {
                    return Err(self.tensor_err(format!("dtype argument is a {}", type_name(&self.objects, other))))
                }
            }
        }
        let view = TensorView { storage, offset, shape, strides };
        view.check_bounds(s).map_err(|reason| self.tensor_err(reason))?;
        self.tensors.push(view);
        let id = self.tensors.len() - 1;
        self.new_object(Object::Tensor(id), 1)
    }

    fn persistent_load(&mut self, pid: Value, allowed: bool) -> Result<Value, Error> {
        let Some(items) = self.tuple_items(&pid).map(<[Value]>::to_vec) else {
            return Err(self.err(format!(
                "persistent id is a {}, expected ('storage', storage class, key, location, numel)",
                type_name(&self.objects, &pid)
            )));
        };
        let shape_ok = items.len() == 5 && matches!(&items[0], Value::Str(s) if &**s == "storage");
        if !shape_ok {
            return Err(self.err(format!(
                "persistent id is a tuple of {} items, expected ('storage', storage class, key, location, numel)",
                items.len()
            )));
        }
        let dtype = match &items[1] {
            // UntypedStorage-era pickles may give the dtype itself
            Value::Global(Global::StorageClass(d) | Global::DtypeObject(d)) => *d,
            other => {
                return Err(self.err(format!(
                    "storage type in a persistent id is a {}, not a known storage class",
                    type_name(&self.objects, other)
                )))
            }
        };
        let Value::Str(key) = &items[2] else {
            return Err(self.err(format!("storage key is a {}, not a str", type_name(&self.objects, &items[2]))));
        };
        let numel = match items[4] {
            Value::Int(n) if n >= 0 => n as u64,
            ref other => {
                return Err(
                    self.err(format!("storage size is a {}, not a non-negative int", type_name(&self.objects, other)))
                )
            }
        };
        if !allowed {
            return Err(self.err("storages outside a zip archive are not supported"));
        }
        let index = match self.storage_by_key.get(key) {
            Some(&i) => {
                let s = &self.storages[i];
                if s.dtype != dtype || s.numel != numel {
                    return Err(self.err(format!(
                        "storage {:?} is declared twice, as {} x {} and as {} x {}",
                        cut(key, 80),
                        s.numel,
                        s.dtype.storage_class(),
                        numel,
                        dtype.storage_class()
                    )));
                }
                i
            }
            None => {
                self.storages.push(StorageRef { key: key.to_string(), dtype, numel });
                self.storage_by_key.insert(key.clone(), self.storages.len() - 1);
                self.storages.len() - 1
            }
        };
        self.new_object(Object::Storage(index), 1)
    }

    fn int_from_le(&mut self, bytes: &[u8]) -> Result<Value, Error> {
        if bytes.len() as u64 > MAX_INT_BYTES {
            return Err(self.limit("int size in bytes", bytes.len() as u64, MAX_INT_BYTES, "MAX_INT_BYTES"));
        }
        if bytes.is_empty() {
            return Ok(Value::Int(0));
        }
        if bytes.len() <= 8 {
            let fill = if bytes[bytes.len() - 1] & 0x80 != 0 { 0xFF } else { 0 };
            let mut a = [fill; 8];
            a[..bytes.len()].copy_from_slice(bytes);
            return Ok(Value::Int(i64::from_le_bytes(a)));
        }
        // minimal length, so equal ints compare equal
        let mut v = bytes.to_vec();
        while v.len() > 8 {
            let (last, prev) = (v[v.len() - 1], v[v.len() - 2]);
            if (last == 0 && prev & 0x80 == 0) || (last == 0xFF && prev & 0x80 != 0) {
                v.pop();
            } else {
                break;
            }
        }
        if v.len() <= 8 {
            return self.int_from_le(&v);
        }
        self.count_object()?;
        Ok(Value::BigInt(Rc::from(v)))
    }

    /// A protocol-0 decimal int (INT, LONG), any size up to [`MAX_INT_BYTES`].
    fn decimal(&mut self, text: &[u8]) -> Result<Value, Error> {
        let text = text.strip_suffix(b"L").unwrap_or(text);
        let (negative, digits) = match text.first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(self.err("malformed decimal integer"));
        }
        if digits.len() as u64 > MAX_INT_BYTES * 2 {
            return Err(self.limit("decimal integer digits", digits.len() as u64, MAX_INT_BYTES * 2, "MAX_INT_BYTES"));
        }
        // little-endian magnitude, base 256
        let mut mag: Vec<u8> = vec![0];
        for &d in digits {
            let mut carry = u32::from(d - b'0');
            for byte in mag.iter_mut() {
                let x = u32::from(*byte) * 10 + carry;
                *byte = (x & 0xFF) as u8;
                carry = x >> 8;
            }
            if carry > 0 {
                mag.push(carry as u8);
            }
        }
        mag.push(0); // sign byte
        if negative {
            // two's complement
            let mut carry = 1u16;
            for byte in mag.iter_mut() {
                let x = u16::from(!*byte) + carry;
                *byte = (x & 0xFF) as u8;
                carry = x >> 8;
            }
        }
        self.int_from_le(&mag)
    }

    fn run(&mut self, storages_allowed: bool) -> Result<Value, Error> {
        let mut opcodes = 0u64;
        loop {
            self.at = self.pos;
            opcodes += 1;
            if opcodes > MAX_OPCODES {
                return Err(self.limit("opcodes executed", opcodes, MAX_OPCODES, "MAX_OPCODES"));
            }
            let Some(&op) = self.data.get(self.pos) else {
                return Err(self.err("pickle ends before its STOP opcode"));
            };
            self.pos += 1;
            match op {
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                0x80 => {
                    self.protocol = self.u8()?;
                    if self.protocol > 5 {
                        return Err(self.err(format!("pickle protocol {} (at most 5 is known)", self.protocol)));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: an advisory length, the bytes follow in place
                }
                b'(' => {
                    if self.marks.len() as u64 >= MAX_STACK {
                        return Err(self.limit("open marks", self.marks.len() as u64 + 1, MAX_STACK, "MAX_STACK"));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                // constants and numbers
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(i64::from(v)))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(i64::from(v)))?
                }
                0x8a => {
                    let n = self.u8()?;
                    let b = self.take(usize::from(n))?;
                    let v = self.int_from_le(b)?;
                    self.push(v)?
                }
                0x8b => {
                    let n = self.u32()?;
                    if u64::from(n) > MAX_INT_BYTES {
                        return Err(self.limit("int size in bytes", u64::from(n), MAX_INT_BYTES, "MAX_INT_BYTES"));
                    }
                    let b = self.take(n as usize)?;
                    let v = self.int_from_le(b)?;
                    self.push(v)?
                }
                b'I' => {
                    let line = self.line()?;
                    let v = match line {
                        b"01" => Value::Bool(true),
                        b"00" => Value::Bool(false),
                        _ => self.decimal(line)?,
                    };
                    self.push(v)?
                }
                b'L' => {
                    let line = self.line()?;
                    let v = self.decimal(line)?;
                    self.push(v)?
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)))?
                }
                b'F' => {
                    let line = self.line()?;
                    let v = std::str::from_utf8(line).ok().and_then(|t| t.trim().parse::<f64>().ok());
                    let v = v.ok_or_else(|| self.err("malformed FLOAT"))?;
                    self.push(Value::Float(v))?
                }
                // strings and bytes
                b'X' => {
                    let n = self.u32()?;
                    let b = self.sized(u64::from(n))?;
                    let v = self.str_value(b)?;
                    self.push(v)?
                }
                0x8c => {
                    let n = self.u8()?;
                    let b = self.sized(u64::from(n))?;
                    let v = self.str_value(b)?;
                    self.push(v)?
                }
                0x8d => {
                    let n = self.u64()?;
                    let b = self.sized(n)?;
                    let v = self.str_value(b)?;
                    self.push(v)?
                }
                b'V' => {
                    let line = self.line()?;
                    let text = raw_unicode_escape(line).ok_or_else(|| self.err("malformed UNICODE argument"))?;
                    let v = self.str_value(text.as_bytes())?;
                    self.push(v)?
                }
                b'S' => {
                    let line = self.line()?;
                    let text = python_string_literal(line).ok_or_else(|| self.err("malformed STRING argument"))?;
                    let v = self.ascii_value(&text)?;
                    self.push(v)?
                }
                b'T' => {
                    let n = self.u32()?;
                    let b = self.sized(u64::from(n))?;
                    let v = self.ascii_value(b)?;
                    self.push(v)?
                }
                b'U' => {
                    let n = self.u8()?;
                    let b = self.sized(u64::from(n))?;
                    let v = self.ascii_value(b)?;
                    self.push(v)?
                }
                b'B' => {
                    let n = self.u32()?;
                    let b = self.sized(u64::from(n))?;
                    let v = self.bytes_value(b)?;
                    self.push(v)?
                }
                b'C' => {
                    let n = self.u8()?;
                    let b = self.sized(u64::from(n))?;
                    let v = self.bytes_value(b)?;
                    self.push(v)?
                }
                0x8e | 0x96 => {
                    let n = self.u64()?;
                    let b = self.sized(n)?;
                    let v = self.bytes_value(b)?;
                    self.push(v)?
                }
                // containers
                b')' => {
                    let v = self.container(Vec::new(), true)?;
                    self.push(v)?
                }
                b']' => {
                    let v = self.container(Vec::new(), false)?;
                    self.push(v)?
                }
                b'}' => {
                    let v = self.new_object(Object::Dict(Dict::default()), 1)?;
                    self.push(v)?
                }
                b't' | b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.container(items, op == b't')?;
                    self.push(v)?
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.container(items, true)?;
                    self.push(v)?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let v = self.new_object(Object::Dict(Dict::default()), 1)?;
                    self.set_items(&v, items)?;
                    self.push(v)?
                }
                b'a' => {
                    let item = self.pop()?;
                    let target = self.top()?.clone();
                    self.append(&target, vec![item])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append(&target, items)?
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, vec![key, value])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, items)?
                }
                // memo
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(u32::from(i))?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                b'p' => {
                    let line = self.line()?;
                    let i = std::str::from_utf8(line).ok().and_then(|t| t.parse::<u32>().ok());
                    let i = i.ok_or_else(|| self.err("malformed PUT index"))?;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len()).map_err(|_| self.err("memo index overflow"))?;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()?;
                    self.memo_get(u32::from(i))?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                b'g' => {
                    let line = self.line()?;
                    let i = std::str::from_utf8(line).ok().and_then(|t| t.parse::<u32>().ok());
                    let i = i.ok_or_else(|| self.err("malformed GET index"))?;
                    self.memo_get(i)?
                }
                // globals and calls
                b'c' => {
                    let g = self.global_from_lines()?;
                    self.push(g)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(self.err("STACK_GLOBAL with a module or name that is not a str"));
                    };
                    let g = self.global(module, name)?;
                    self.push(g)?
                }
                b'i' => {
                    let class = self.global_from_lines()?;
                    let items = self.pop_mark()?;
                    let args = self.container(items, true)?;
                    let v = self.call(class, args)?;
                    self.push(v)?
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err(self.err("OBJ without a class"));
                    }
                    let class = items.remove(0);
                    let args = self.container(items, true)?;
                    let v = self.call(class, args)?;
                    self.push(v)?
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args)?;
                    self.push(v)?
                }
                0x92 => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let empty_kwargs = match &kwargs {
                        Value::Obj(id) => {
                            matches!(self.objects.get(*id as usize), Some(Object::Dict(d)) if d.entries.is_empty())
                        }
                        _ => false,
                    };
                    if !empty_kwargs {
                        return Err(self.err("NEWOBJ_EX with keyword arguments"));
                    }
                    let v = self.call(class, args)?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD: only an (Ordered)Dict's instance state (torch's `_metadata`), which is ignored
                    let state = self.pop()?;
                    let target = self.top()?.clone();
                    let target_is_dict = matches!(&target, Value::Obj(id) if matches!(self.objects.get(*id as usize), Some(Object::Dict(_))));
                    let state_ok = match &state {
                        Value::None => true,
                        Value::Obj(id) => {
                            matches!(self.objects.get(*id as usize), Some(Object::Dict(_) | Object::Tuple(_)))
                        }
                        _ => false,
                    };
                    if !target_is_dict || !state_ok {
                        return Err(self.err(format!(
                            "BUILD of a {} with a {} state (only a dict's attributes are accepted)",
                            type_name(&self.objects, &target),
                            type_name(&self.objects, &state)
                        )));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid, storages_allowed)?;
                    self.push(v)?
                }
                b'P' => {
                    self.line()?;
                    return Err(
                        self.err("persistent id is a str, expected ('storage', storage class, key, location, numel)")
                    );
                }
                0x82..=0x84 => return Err(self.err("extension registry opcodes (EXT1/2/4) are not supported")),
                0x8f..=0x91 => return Err(self.err("sets are not supported in a state dict")),
                0x97 | 0x98 => return Err(self.err("out-of-band buffers are not supported")),
                other => return Err(self.err(format!("unknown pickle opcode {other:#04x}"))),
            }
        }
    }
}

/// Decodes a protocol-0 STRING argument: a quoted Python literal with backslash escapes (as `codecs.escape_decode`).
fn python_string_literal(line: &[u8]) -> Option<Vec<u8>> {
    let q = *line.first()?;
    if line.len() < 2 || (q != b'\'' && q != b'"') || *line.last()? != q {
        return None;
    }
    let body = &line[1..line.len() - 1];
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let e = *body.get(i)?;
        i += 1;
        match e {
            b'\\' | b'\'' | b'"' => out.push(e),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'\n' => {}
            b'x' => {
                let hex = std::str::from_utf8(body.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match body.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xFF) as u8);
            }
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    Some(out)
}

/// Decodes a protocol-0 UNICODE argument (Python's raw-unicode-escape: `\uXXXX`, `\UXXXXXXXX`, other bytes latin-1).
fn raw_unicode_escape(line: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let c = line[i];
        let digits = match (c, line.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        if digits == 0 {
            out.push(char::from(c));
            i += 1;
            continue;
        }
        let hex = std::str::from_utf8(line.get(i + 2..i + 2 + digits)?).ok()?;
        out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
        i += 2 + digits;
    }
    Some(out)
}
