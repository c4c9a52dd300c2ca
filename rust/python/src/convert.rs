//! The converter's readers and writers for Python: PEFT weights files, torch `.bin` state dicts, PEFT pattern
//! keys and scales, the ggla writer (argument conversion only).

use std::path::PathBuf;
use std::sync::Arc;

use ggml_lora_core::ggla;
use ggml_lora_core::patterns::PatternKeys;
use ggml_lora_core::peft_weights::PeftWeights;
use ggml_lora_core::{scale, torch_bin};
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::errors::IntoPyResult;
use crate::patch::NativeAdapter;

/// Adds the converter functions and classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_torch_bin, m)?)?;
    m.add_function(wrap_pyfunction!(write_ggla, m)?)?;
    m.add_function(wrap_pyfunction!(peft_scale, m)?)?;
    m.add_function(wrap_pyfunction!(llama_scale, m)?)?;
    m.add_class::<NativePatternKeys>()?;
    m.add_class::<NativePeftWeights>()?;
    m.add_class::<NativeWeightInfo>()?;
    Ok(())
}

/// A PEFT adapter's weights file, open: `adapter_model.safetensors` memory-mapped (only its header read), or a
/// torch `.bin` materialised.
#[pyclass(name = "PeftWeights", module = "ggml_lora._native", frozen)]
pub struct NativePeftWeights {
    /// The core's weights file, shared with the adapters built from it.
    pub inner: Arc<PeftWeights>,
}

#[pymethods]
impl NativePeftWeights {
    /// Maps and validates a safetensors file (through the `safetensors` crate).
    #[staticmethod]
    fn open_safetensors(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| PeftWeights::open_safetensors(&path)).py_err()?;
        Ok(NativePeftWeights { inner: Arc::new(inner) })
    }

    /// Reads a torch `.bin` state dict without executing anything.
    #[staticmethod]
    fn open_torch_bin(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| PeftWeights::open_torch_bin(&path)).py_err()?;
        Ok(NativePeftWeights { inner: Arc::new(inner) })
    }

    /// The file.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    /// The tensors (name, dtype, shape), in the file's order.
    #[getter]
    fn tensors(&self) -> Vec<NativeWeightInfo> {
        self.inner
            .tensors()
            .iter()
            .map(|t| NativeWeightInfo { name: t.name.clone(), dtype: t.dtype.name(), shape: t.shape.clone() })
            .collect()
    }

    fn __repr__(&self) -> String {
        format!("PeftWeights({:?}, {} tensors)", self.inner.path(), self.inner.tensors().len())
    }
}

/// One tensor of a weights file: its name, dtype name (`"F32"`, `"F16"`, `"BF16"`, `"F64"`, or torch's name of
/// a non-floating type) and shape (numpy order).
#[pyclass(name = "WeightInfo", module = "ggml_lora._native", frozen, get_all)]
pub struct NativeWeightInfo {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
}

#[pymethods]
impl NativeWeightInfo {
    fn __repr__(&self) -> String {
        format!("WeightInfo(name={:?}, dtype={:?}, shape={:?})", self.name, self.dtype, self.shape)
    }
}

/// PEFT's scale of one module: `alpha / sqrt(r)` with rsLoRA, else `alpha / r`.
#[pyfunction]
fn peft_scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    scale::peft_scale(alpha, r, use_rslora)
}

/// llama.cpp's scale of a pair: `user_scale * alpha / rank`, or `user_scale` when alpha is 0 (absent).
#[pyfunction]
fn llama_scale(alpha: f32, rank: usize, user_scale: f32) -> f32 {
    scale::llama_scale(alpha, rank, user_scale)
}

/// One tensor: `(name, numpy dtype name, shape, little-endian bytes as a uint8 array)`.
type TorchTensor<'py> = (String, &'static str, Vec<u64>, Bound<'py, PyArray1<u8>>);

/// Reads the torch `.bin` state dict at `path` without executing anything (GIL released while it is read);
/// returns its tensors in file order (bfloat16 already widened to float32).
#[pyfunction]
fn read_torch_bin(py: Python<'_>, path: PathBuf) -> PyResult<Vec<TorchTensor<'_>>> {
    let tensors = py.detach(|| torch_bin::read_torch_bin(&path)).py_err()?;
    Ok(tensors.into_iter().map(|t| (t.name, t.dtype.output_name(), t.shape, PyArray1::from_vec(py, t.data))).collect())
}

/// Writes `adapter` as a legacy ggla file, atomically (see `ggla::write_adapter`); `written` gets the path
/// appended once it is in place.
#[pyfunction]
#[pyo3(signature = (path, adapter, a_as_f16, written = None))]
fn write_ggla(
    py: Python<'_>,
    path: PathBuf,
    adapter: PyRef<'_, NativeAdapter>,
    a_as_f16: bool,
    written: Option<Bound<'_, PyList>>,
) -> PyResult<PathBuf> {
    let inner = Arc::clone(&adapter.inner);
    let out = py.detach(|| ggla::write_adapter(&path, &inner, a_as_f16)).py_err()?;
    if let Some(list) = written {
        list.append(out.as_os_str())?;
    }
    Ok(out)
}

/// PEFT `rank_pattern` / `alpha_pattern` keys compiled for linear-time matching.
#[pyclass(name = "PatternKeys", module = "ggml_lora._native", frozen)]
pub struct NativePatternKeys {
    keys: PatternKeys,
}

#[pymethods]
impl NativePatternKeys {
    /// Compiles the keys in order; a key the matcher cannot run exactly as Python's `re` would raises
    /// `ValueError` naming it.
    #[new]
    fn new(keys: Vec<String>) -> PyResult<Self> {
        Ok(NativePatternKeys { keys: PatternKeys::new(&keys).py_err()? })
    }

    /// The index of the key PEFT's `get_pattern_key` chooses for `module`, or `None`.
    fn first_match(&self, module: &str) -> Option<usize> {
        self.keys.first_match(module)
    }
}
