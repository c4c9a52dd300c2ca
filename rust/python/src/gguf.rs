//! GGUF reading and writing for Python.

use std::path::PathBuf;

use ggml_lora_core::gguf::{self, GgufWriter, SplitRule, WriteOptions};
use ggml_lora_core::model::ModelFile;
use ggml_lora_core::{quant, Error, GgmlType};
use numpy::ndarray::ArrayView1;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::errors::{to_py, IntoPyResult};
use crate::values::{fields_to_py, metadata_from_py, MetadataField};

/// Adds the GGUF functions and classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeGgufFile>()?;
    m.add_class::<TensorInfo>()?;
    m.add_class::<Shard>()?;
    m.add_class::<PySplitRule>()?;
    m.add_class::<TensorSpec>()?;
    m.add_class::<MetadataField>()?;
    m.add_function(wrap_pyfunction!(write_gguf, m)?)?;
    m.add_class::<NativeGgufStreamWriter>()?;
    m.add_function(wrap_pyfunction!(copy_model, m)?)?;
    Ok(())
}

/// Parses a ggml type name ("q4_0", "F16", ...).
pub fn ggml_type(name: &str) -> PyResult<GgmlType> {
    GgmlType::from_name(name).ok_or_else(|| PyValueError::new_err(format!("unknown ggml type {name:?}")))
}

/// `(a, b, c)` as Python prints a tuple of ints (`(a,)` for one).
fn tuple_repr(items: impl Iterator<Item = u64>) -> String {
    let items: Vec<String> = items.map(|d| d.to_string()).collect();
    match items.len() {
        1 => format!("({},)", items[0]),
        _ => format!("({})", items.join(", ")),
    }
}

/// Python's `repr` of a string.
fn str_repr(py: Python<'_>, text: &str) -> PyResult<String> {
    Ok(PyString::new(py, text).repr()?.to_string())
}

/// Where a tensor of a model lives and what it holds (the public `ggml_lora.TensorInfo`).
///
/// `offset` is absolute, from the start of the tensor's file, like every offset this project reports (the
/// GGUF header stores it relative to the data section; the core calls that one `relative_offset`).
#[pyclass(module = "ggml_lora._native", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TensorInfo {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    offset: u64,
    nbytes: u64,
    shard: u16,
}

#[pymethods]
impl TensorInfo {
    /// A tensor info from its fields (`shape` in numpy order, `type` a ggml type name).
    #[new]
    #[pyo3(signature = (name, shape, r#type, offset, nbytes, shard = 0))]
    fn new(name: String, shape: Vec<u64>, r#type: &str, offset: u64, nbytes: u64, shard: u16) -> PyResult<Self> {
        let dims = shape.into_iter().rev().collect();
        Ok(TensorInfo { name, dims, ty: ggml_type(r#type)?, offset, nbytes, shard })
    }

    /// The tensor's name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Dimensions in numpy order: `shape[-1]` is ggml's ne[0], the row length.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.dims.iter().rev())
    }

    /// Dimensions in ggml order (ne[0] first).
    #[getter]
    fn dims<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.dims)
    }

    /// The ggml type's lower-case name ("f16", "q4_k", ...).
    #[getter]
    fn r#type(&self) -> &'static str {
        self.ty.name()
    }

    /// Absolute byte offset of the tensor's data in its file (the shard `shard`).
    #[getter]
    fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes of data (without padding).
    #[getter]
    fn nbytes(&self) -> u64 {
        self.nbytes
    }

    /// Index of the file holding the tensor in `GGUFFile.shards` (0 unless the model is split).
    #[getter]
    fn shard(&self) -> u16 {
        self.shard
    }

    /// Number of elements.
    #[getter]
    fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The arguments of `__new__` that make an equal object (pickling and `copy`).
    #[allow(clippy::type_complexity)]
    fn __getnewargs__(&self) -> (String, Vec<u64>, &'static str, u64, u64, u16) {
        let shape = self.dims.iter().rev().copied().collect();
        (self.name.clone(), shape, self.ty.name(), self.offset, self.nbytes, self.shard)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "TensorInfo(name={}, shape={}, type='{}', offset={}, nbytes={}, shard={})",
            str_repr(py, &self.name)?,
            tuple_repr(self.dims.iter().rev().copied()),
            self.ty.name(),
            self.offset,
            self.nbytes,
            self.shard
        ))
    }
}

/// One file of a model: its path and how many of the model's tensors it holds.
#[pyclass(module = "ggml_lora._native", frozen, get_all)]
pub struct Shard {
    /// The file.
    path: PathBuf,
    /// Number of tensors in it.
    n_tensors: usize,
}

#[pymethods]
impl Shard {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let path = str_repr(py, &self.path.to_string_lossy())?;
        Ok(format!("Shard(path={path}, n_tensors={})", self.n_tensors))
    }
}

/// A tensor to be written (Python → core): name, shape in numpy order and ggml type. Nothing is checked until
/// a writer receives it, except that the type exists.
#[pyclass(module = "ggml_lora._native", frozen)]
pub struct TensorSpec {
    spec: gguf::TensorSpec,
}

#[pymethods]
impl TensorSpec {
    /// A spec from the tensor's name, shape (numpy order) and ggml type name.
    #[new]
    fn new(name: String, shape: Vec<u64>, r#type: &str) -> PyResult<Self> {
        let dims = shape.into_iter().rev().collect();
        Ok(TensorSpec { spec: gguf::TensorSpec { name, dims, ty: ggml_type(r#type)? } })
    }

    /// The tensor's name.
    #[getter]
    fn name(&self) -> &str {
        &self.spec.name
    }

    /// Dimensions in numpy order.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.spec.dims.iter().rev())
    }

    /// The ggml type's lower-case name.
    #[getter]
    fn r#type(&self) -> &'static str {
        self.spec.ty.name()
    }

    /// Bytes of data the tensor takes (without padding); `ValueError` if its shape and type are invalid.
    #[getter]
    fn nbytes(&self) -> PyResult<u64> {
        gguf::tensor_nbytes(&self.spec.name, &self.spec.dims, self.spec.ty)
            .map_err(|e| to_py(Error::InvalidTensorInfo(e)))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "TensorSpec(name={}, shape={}, type='{}')",
            str_repr(py, &self.spec.name)?,
            tuple_repr(self.spec.dims.iter().rev().copied()),
            self.spec.ty.name()
        ))
    }
}

/// The core's specs of `tensors`.
fn specs_of(tensors: &[Bound<'_, TensorSpec>]) -> Vec<gguf::TensorSpec> {
    tensors.iter().map(|t| t.get().spec.clone()).collect()
}

/// An open, memory-mapped model: one GGUF file, a split model opened from any shard, or a legacy GGML/GGJT file.
#[pyclass(name = "GGUFFile", module = "ggml_lora._native", frozen)]
pub struct NativeGgufFile {
    file: ModelFile,
}

impl NativeGgufFile {
    fn index(&self, index: usize) -> PyResult<usize> {
        if index < self.file.tensors().len() {
            Ok(index)
        } else {
            Err(PyIndexError::new_err(format!("tensor index {index} out of range")))
        }
    }
}

#[pymethods]
impl NativeGgufFile {
    /// Opens and validates `path` (the GIL is released while the headers are parsed).
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let file = py.detach(|| ModelFile::open(&path)).py_err()?;
        Ok(NativeGgufFile { file })
    }

    /// GGUF version (2 or 3) of the (first) file; a legacy file's container version.
    #[getter]
    fn version(&self) -> u32 {
        self.file.version()
    }

    /// Data alignment in bytes (of the first file).
    #[getter]
    fn alignment(&self) -> u64 {
        self.file.alignment()
    }

    /// Absolute offset of the (first) file's data section.
    #[getter]
    fn data_offset(&self) -> u64 {
        self.file.data_offset()
    }

    /// Bytes of all the model's files.
    #[getter]
    fn file_size(&self) -> u64 {
        self.file.file_size()
    }

    /// The container, e.g. "GGUF v3", "GGUF v3, split into 3 shards", "legacy ggjt v3".
    #[getter]
    fn container(&self) -> String {
        self.file.container().to_string()
    }

    /// The model's files in shard order.
    fn shards(&self) -> Vec<Shard> {
        self.file.shards().into_iter().map(|(p, n)| Shard { path: p.to_path_buf(), n_tensors: n }).collect()
    }

    /// Metadata in file order, each key with its exact type.
    fn metadata(&self, py: Python<'_>) -> PyResult<Vec<MetadataField>> {
        fields_to_py(py, self.file.metadata())
    }

    /// Where each tensor lives and what it holds, in model order.
    fn tensors(&self) -> Vec<TensorInfo> {
        self.file
            .tensors()
            .iter()
            .enumerate()
            .map(|(i, t)| TensorInfo {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
                offset: self.file.tensor_source(i).1.start,
                nbytes: t.nbytes,
                shard: self.file.shard_of(i),
            })
            .collect()
    }

    /// The raw bytes of tensor `index` as a read-only uint8 array viewing the memory map (no copy).
    fn raw<'py>(slf: Bound<'py, Self>, index: usize) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let this = slf.get();
        let index = this.index(index)?;
        let view = ArrayView1::from(this.file.tensor_data(index));
        // SAFETY: the view points into the read-only memory map owned by `slf`, which numpy keeps alive as the
        // array's base object; the map is never remapped or unmapped while the object lives. The array is made
        // non-writeable below, before Python can see it, because the pages are mapped read-only.
        let array = unsafe { PyArray1::borrow_from_array(&view, slf.clone().into_any()) };
        array.readwrite().make_nonwriteable();
        Ok(array)
    }

    /// Tensor `index` dequantized to a flat float32 array (the GIL is released while converting).
    fn to_numpy<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let index = self.index(index)?;
        let info = &self.file.tensors()[index];
        let data = self.file.tensor_data(index);
        let row_len = info.row_len() as usize;
        let n = info.n_elements() as usize;
        let ty = info.ty;
        let values = py
            .detach(|| {
                let mut out = vec![0f32; n];
                quant::dequantize_rows_par(ty, data, row_len, &mut out).map(|_| out)
            })
            .map_err(|e| e.in_file(self.file.path()))
            .py_err()?;
        Ok(PyArray1::from_vec(py, values))
    }
}

/// Writes a GGUF file atomically. `metadata`: key → `MetadataValue`, in order; `tensors`: the tensors in data
/// order, `data` for each the C-contiguous uint8 array of its exact bytes; `written`: a list to which the path is
/// appended once it is in place (see `patch`).
#[pyfunction]
#[pyo3(signature = (path, metadata, tensors, data, sync = true, written = None))]
fn write_gguf(
    py: Python<'_>,
    path: PathBuf,
    metadata: Bound<'_, PyDict>,
    tensors: Vec<Bound<'_, TensorSpec>>,
    data: Vec<PyReadonlyArrayDyn<'_, u8>>,
    sync: bool,
    written: Option<Bound<'_, PyList>>,
) -> PyResult<PathBuf> {
    let values = metadata_from_py(&metadata)?;
    if data.len() != tensors.len() {
        return Err(PyValueError::new_err(format!("{} tensors but {} data arrays", tensors.len(), data.len())));
    }
    let specs = specs_of(&tensors);
    let mut bytes: Vec<&[u8]> = Vec::with_capacity(tensors.len());
    for (spec, array) in specs.iter().zip(&data) {
        let name = &spec.name;
        if !array.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("tensor {name:?}: data must be C-contiguous")));
        }
        bytes.push(array.as_slice().map_err(|e| PyValueError::new_err(format!("tensor {name:?}: {e}")))?);
    }
    let out = py
        .detach(|| {
            let mut writer = GgufWriter::create(&path, &values, specs.clone(), WriteOptions { sync })?;
            for (spec, bytes) in specs.iter().zip(&bytes) {
                writer.write_tensor(&spec.name, bytes)?;
            }
            writer.finish()
        })
        .py_err()?;
    if let Some(list) = written {
        list.append(out.as_os_str())?;
    }
    Ok(out)
}

/// A GGUF file whose tensor data is streamed in, in chunks of any size (the core's `GgufWriter`): for files
/// larger than memory. The header is written by the constructor; nothing appears under `path` before `finish`,
/// and a writer dropped or aborted unfinished leaves no file behind.
#[pyclass(name = "GGUFStreamWriter", module = "ggml_lora._native")]
pub struct NativeGgufStreamWriter {
    /// `None` once finished or aborted.
    writer: Option<GgufWriter>,
}

impl NativeGgufStreamWriter {
    fn open(&mut self) -> PyResult<&mut GgufWriter> {
        self.writer.as_mut().ok_or_else(closed)
    }
}

/// The error of a call on a finished or aborted writer.
fn closed() -> PyErr {
    to_py(Error::WriterState("the writer is already finished or aborted".into()))
}

#[pymethods]
impl NativeGgufStreamWriter {
    /// Validates the metadata and tensors, creates the temporary file beside `path` and writes the header.
    /// `metadata` as for `write_gguf`; `tensors` in data order.
    #[new]
    #[pyo3(signature = (path, metadata, tensors, sync = true))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        metadata: Bound<'_, PyDict>,
        tensors: Vec<Bound<'_, TensorSpec>>,
        sync: bool,
    ) -> PyResult<Self> {
        let values = metadata_from_py(&metadata)?;
        let specs = specs_of(&tensors);
        let writer = py.detach(|| GgufWriter::create(&path, &values, specs, WriteOptions { sync })).py_err()?;
        Ok(NativeGgufStreamWriter { writer: Some(writer) })
    }

    /// Every tensor, in the order its data is expected.
    fn tensors(&mut self) -> PyResult<Vec<TensorSpec>> {
        Ok(self.open()?.tensors().map(|(spec, _)| TensorSpec { spec: spec.clone() }).collect())
    }

    /// Index of the tensor whose data comes next (the number of tensors once all are complete).
    fn current_tensor(&mut self) -> PyResult<usize> {
        Ok(self.open()?.current_tensor())
    }

    /// Appends the bytes of `chunk` (C-contiguous uint8) to the data, tensor after tensor (GIL released).
    fn write_data(&mut self, py: Python<'_>, chunk: PyReadonlyArrayDyn<'_, u8>) -> PyResult<()> {
        let bytes = chunk.as_slice().map_err(|e| PyValueError::new_err(format!("data must be C-contiguous: {e}")))?;
        let writer = self.open()?;
        py.detach(|| writer.write_data(bytes)).py_err()
    }

    /// Checks every tensor is complete, flushes (fsyncs if asked) and renames the file into place; returns its
    /// path, also appended to `written` once in place. The writer is closed whatever the outcome.
    #[pyo3(signature = (written = None))]
    fn finish(&mut self, py: Python<'_>, written: Option<Bound<'_, PyList>>) -> PyResult<PathBuf> {
        let writer = self.writer.take().ok_or_else(closed)?;
        let out = py.detach(|| writer.finish()).py_err()?;
        if let Some(list) = written {
            list.append(out.as_os_str())?;
        }
        Ok(out)
    }

    /// Drops the unfinished file (its temporary file is removed); nothing is written under `path`.
    fn abort(&mut self) {
        self.writer = None;
    }
}

/// Parses a split rule: `("keep" | "merge" | "max_tensors" | "max_bytes", limit)`.
/// How an output is divided into shards (the core's `SplitRule`), made by its named constructors.
#[pyclass(name = "SplitRule", module = "ggml_lora._native", frozen, eq)]
#[derive(Clone, Copy, PartialEq)]
pub struct PySplitRule {
    /// The rule.
    pub rule: SplitRule,
}

#[pymethods]
impl PySplitRule {
    /// As the model is: the same shards, each tensor in the same shard.
    #[staticmethod]
    fn keep() -> Self {
        PySplitRule { rule: SplitRule::Keep }
    }

    /// One file.
    #[staticmethod]
    fn merge() -> Self {
        PySplitRule { rule: SplitRule::Merge }
    }

    /// At most `n` tensors per shard (`llama-gguf-split --split-max-tensors`).
    #[staticmethod]
    fn max_tensors(n: u64) -> Self {
        PySplitRule { rule: SplitRule::MaxTensors(n) }
    }

    /// At most `n` bytes of tensor data per shard (`llama-gguf-split --split-max-size`).
    #[staticmethod]
    fn max_bytes(n: u64) -> Self {
        PySplitRule { rule: SplitRule::MaxBytes(n) }
    }

    /// `"keep"`, `"merge"`, `"max_tensors"` or `"max_bytes"`.
    #[getter]
    fn kind(&self) -> &'static str {
        match self.rule {
            SplitRule::Keep => "keep",
            SplitRule::Merge => "merge",
            SplitRule::MaxTensors(_) => "max_tensors",
            SplitRule::MaxBytes(_) => "max_bytes",
        }
    }

    /// The limit of `max_tensors`/`max_bytes` (None for the others).
    #[getter]
    fn limit(&self) -> Option<u64> {
        match self.rule {
            SplitRule::MaxTensors(n) | SplitRule::MaxBytes(n) => Some(n),
            SplitRule::Keep | SplitRule::Merge => None,
        }
    }

    /// `SplitRule.max_bytes(4000000000)`, `SplitRule.merge()`, ...
    fn __repr__(&self) -> String {
        match self.limit() {
            Some(n) => format!("SplitRule.{}({n})", self.kind()),
            None => format!("SplitRule.{}()", self.kind()),
        }
    }
}

/// Writes the model at `model` (any shard of a split model, or a legacy file) as GGUF with every tensor copied
/// as it is, divided by `split` (default: one file); `extra_metadata` (as `metadata` for `write_gguf`) adds or
/// replaces keys.
/// Returns the files written; `written` gets them appended once they are in place.
#[pyfunction]
#[pyo3(signature = (model, out, *, split = None, extra_metadata = None, sync = true, written = None))]
fn copy_model(
    py: Python<'_>,
    model: PathBuf,
    out: PathBuf,
    split: Option<PyRef<'_, PySplitRule>>,
    extra_metadata: Option<Bound<'_, PyDict>>,
    sync: bool,
    written: Option<Bound<'_, PyList>>,
) -> PyResult<Vec<PathBuf>> {
    let rule = split.map_or(SplitRule::Merge, |s| s.rule);
    let values = extra_metadata.as_ref().map(metadata_from_py).transpose()?.unwrap_or_default();
    let outputs =
        py.detach(|| ModelFile::open(&model)?.write_copy(&out, rule, &values, WriteOptions { sync })).py_err()?;
    if let Some(list) = written {
        for path in &outputs {
            list.append(path.as_os_str())?;
        }
    }
    Ok(outputs)
}
