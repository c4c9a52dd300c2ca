//! Importance matrices for Python: reading either llama-imatrix format (argument conversion only).

use std::path::PathBuf;

use ggml_lora_core::imatrix::Imatrix;
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::errors::IntoPyResult;

/// Adds the imatrix functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_imatrix, m)?)?;
    m.add_class::<ImatrixData>()?;
    Ok(())
}

/// An importance matrix as read and normalised by the core (core → Python).
#[pyclass(module = "ggml_lora._native", frozen, get_all)]
pub struct ImatrixData {
    /// The path read.
    source: String,
    /// Tensor name → float32 weights, in name order.
    entries: Py<PyDict>,
    /// The dataset names the file records.
    datasets: Vec<String>,
    /// Chunks it was computed on (0 when the file does not say).
    chunk_count: u32,
    /// Whether it is a legacy `.dat` file (else GGUF).
    legacy: bool,
}

#[pymethods]
impl ImatrixData {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "ImatrixData(source={}, entries=<{} entries>, datasets={}, chunk_count={}, legacy={})",
            PyString::new(py, &self.source).repr()?,
            self.entries.bind(py).len(),
            self.datasets.clone().into_pyobject(py)?.repr()?,
            self.chunk_count,
            if self.legacy { "True" } else { "False" },
        ))
    }
}

/// Reads and normalises the importance matrix at `path` (GIL released while it is read).
#[pyfunction]
fn read_imatrix(py: Python<'_>, path: PathBuf) -> PyResult<ImatrixData> {
    let m = py.detach(|| Imatrix::open(&path)).py_err()?;
    let entries = PyDict::new(py);
    for (name, weights) in m.entries {
        entries.set_item(name, PyArray1::from_vec(py, weights))?;
    }
    Ok(ImatrixData {
        source: m.source,
        entries: entries.unbind(),
        datasets: m.datasets,
        chunk_count: m.chunk_count,
        legacy: m.legacy,
    })
}
