//! The converter's readers for Python: torch `.bin` state dicts and PEFT pattern keys (argument conversion only).

use std::path::PathBuf;

use ggml_lora_core::patterns::PatternKeys;
use ggml_lora_core::torch_bin;
use numpy::PyArray1;
use pyo3::prelude::*;

use crate::errors::IntoPyResult;

/// Adds the converter functions and classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_torch_bin, m)?)?;
    m.add_class::<NativePatternKeys>()?;
    Ok(())
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
