//! GGUF reading and writing for Python.

use std::path::PathBuf;

use ggml_lora_core::gguf::{GgufWriter, SplitRule, TensorSpec, Value, WriteOptions};
use ggml_lora_core::model::ModelFile;
use ggml_lora_core::{quant, Error, GgmlType};
use numpy::ndarray::ArrayView1;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::errors::{to_py, IntoPyResult};
use crate::values::{element_type_name, value_from_py, value_to_py, value_type};

/// Adds the GGUF functions and classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeGgufFile>()?;
    m.add_function(wrap_pyfunction!(write_gguf, m)?)?;
    m.add_class::<NativeGgufStreamWriter>()?;
    m.add_function(wrap_pyfunction!(copy_model, m)?)?;
    Ok(())
}

/// Parses a ggml type name ("q4_0", "F16", ...).
pub fn ggml_type(name: &str) -> PyResult<GgmlType> {
    GgmlType::from_name(name).ok_or_else(|| PyValueError::new_err(format!("unknown ggml type {name:?}")))
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

    /// The model's files in shard order, as `(path, number of tensors)`.
    fn shards(&self) -> Vec<(PathBuf, usize)> {
        self.file.shards().into_iter().map(|(p, n)| (p.to_path_buf(), n)).collect()
    }

    /// Metadata as `(key, type name, element type name or None, value)` tuples in file order.
    #[allow(clippy::type_complexity)]
    fn metadata<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Vec<(&str, &'static str, Option<&'static str>, Bound<'py, PyAny>)>> {
        self.file
            .metadata()
            .iter()
            .map(|(k, v)| Ok((k.as_str(), v.value_type().name(), element_type_name(v), value_to_py(py, v)?)))
            .collect()
    }

    /// Tensor infos as `(name, dims in ggml order, type name, absolute data offset in its file, nbytes, shard)`
    /// in model order.
    #[allow(clippy::type_complexity)]
    fn tensors(&self) -> Vec<(&str, Vec<u64>, &'static str, u64, u64, u16)> {
        self.file
            .tensors()
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let start = self.file.tensor_source(i).1.start;
                (t.name.as_str(), t.dims.clone(), t.ty.name(), start, t.nbytes, self.file.shard_of(i))
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

/// Writes a GGUF file atomically. `metadata`: `(key, type name, element type name or None, value)`;
/// `tensors`: `(name, dims in ggml order, type name, C-contiguous uint8 array of the exact data)`;
/// `written`: a list to which the path is appended once it is in place (see `patch`).
#[pyfunction]
#[pyo3(signature = (path, metadata, tensors, sync = true, written = None))]
#[allow(clippy::type_complexity)]
fn write_gguf(
    py: Python<'_>,
    path: PathBuf,
    metadata: Vec<(String, String, Option<String>, Bound<'_, PyAny>)>,
    tensors: Vec<(String, Vec<u64>, String, PyReadonlyArrayDyn<'_, u8>)>,
    sync: bool,
    written: Option<Bound<'_, PyList>>,
) -> PyResult<PathBuf> {
    let values = metadata_values(metadata)?;
    let mut specs = Vec::with_capacity(tensors.len());
    let mut data: Vec<&[u8]> = Vec::with_capacity(tensors.len());
    for (name, dims, ty, array) in &tensors {
        specs.push(TensorSpec { name: name.clone(), dims: dims.clone(), ty: ggml_type(ty)? });
        if !array.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("tensor {name:?}: data must be C-contiguous")));
        }
        data.push(array.as_slice().map_err(|e| PyValueError::new_err(format!("tensor {name:?}: {e}")))?);
    }
    let out = py
        .detach(|| {
            let mut writer = GgufWriter::create(&path, &values, specs.clone(), WriteOptions { sync })?;
            for (spec, bytes) in specs.iter().zip(&data) {
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

/// Converts `(key, type name, element type name or None, value)` tuples into metadata values.
#[allow(clippy::type_complexity)]
fn metadata_values(
    metadata: Vec<(String, String, Option<String>, Bound<'_, PyAny>)>,
) -> PyResult<Vec<(String, Value)>> {
    let mut values: Vec<(String, Value)> = Vec::with_capacity(metadata.len());
    for (key, ty, elem, obj) in metadata {
        let elem = elem.as_deref().map(value_type).transpose()?;
        let value = value_from_py(&obj, value_type(&ty)?, elem)
            .map_err(|e| PyValueError::new_err(format!("metadata key {key:?}: cannot store {obj} as {ty}: {e}")))?;
        values.push((key, value));
    }
    Ok(values)
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
    /// `metadata` as for `write_gguf`; `tensors`: `(name, dims in ggml order, type name)` in data order.
    #[new]
    #[pyo3(signature = (path, metadata, tensors, sync = true))]
    #[allow(clippy::type_complexity)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        metadata: Vec<(String, String, Option<String>, Bound<'_, PyAny>)>,
        tensors: Vec<(String, Vec<u64>, String)>,
        sync: bool,
    ) -> PyResult<Self> {
        let values = metadata_values(metadata)?;
        let specs = tensors
            .into_iter()
            .map(|(name, dims, ty)| Ok(TensorSpec { name, dims, ty: ggml_type(&ty)? }))
            .collect::<PyResult<Vec<_>>>()?;
        let writer = py.detach(|| GgufWriter::create(&path, &values, specs, WriteOptions { sync })).py_err()?;
        Ok(NativeGgufStreamWriter { writer: Some(writer) })
    }

    /// `(name, data bytes)` of every tensor, in the order their data is expected.
    fn tensors(&mut self) -> PyResult<Vec<(String, u64)>> {
        Ok(self.open()?.tensors().map(|(spec, nbytes)| (spec.name.clone(), nbytes)).collect())
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
pub fn split_rule(rule: Option<(String, u64)>) -> PyResult<SplitRule> {
    Ok(match rule {
        None => SplitRule::Keep,
        Some((kind, n)) => match kind.as_str() {
            "keep" => SplitRule::Keep,
            "merge" => SplitRule::Merge,
            "max_tensors" => SplitRule::MaxTensors(n),
            "max_bytes" => SplitRule::MaxBytes(n),
            other => return Err(PyValueError::new_err(format!("unknown split rule {other:?}"))),
        },
    })
}

/// Writes the model at `model` (any shard of a split model, or a legacy file) as GGUF with every tensor copied
/// as it is, divided by `split` (default: one file); `extra_metadata` as for `write_gguf` adds or replaces keys.
/// Returns the files written; `written` gets them appended once they are in place.
#[pyfunction]
#[pyo3(signature = (model, out, *, split = None, extra_metadata = Vec::new(), sync = true, written = None))]
#[allow(clippy::type_complexity)]
fn copy_model(
    py: Python<'_>,
    model: PathBuf,
    out: PathBuf,
    split: Option<(String, u64)>,
    extra_metadata: Vec<(String, String, Option<String>, Bound<'_, PyAny>)>,
    sync: bool,
    written: Option<Bound<'_, PyList>>,
) -> PyResult<Vec<PathBuf>> {
    let rule = match split {
        None => SplitRule::Merge,
        some => split_rule(some)?,
    };
    let mut values: Vec<(String, Value)> = Vec::with_capacity(extra_metadata.len());
    for (key, ty, elem, obj) in extra_metadata {
        let elem = elem.as_deref().map(value_type).transpose()?;
        values.push((key, value_from_py(&obj, value_type(&ty)?, elem)?));
    }
    let outputs =
        py.detach(|| ModelFile::open(&model)?.write_copy(&out, rule, &values, WriteOptions { sync })).py_err()?;
    if let Some(list) = written {
        for path in &outputs {
            list.append(path.as_os_str())?;
        }
    }
    Ok(outputs)
}
