//! Importance matrices for Python: reading either llama-imatrix format (argument conversion only).

use std::path::PathBuf;

use ggml_lora_core::imatrix::Imatrix;
use numpy::PyArray1;
use pyo3::prelude::*;

use crate::errors::IntoPyResult;

/// Adds the imatrix functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_imatrix, m)?)?;
    Ok(())
}

/// The entries of an imatrix as `(name, float32 weights)` in name order.
type Entries<'py> = Vec<(String, Bound<'py, PyArray1<f32>>)>;

/// Reads and normalises the importance matrix at `path` (GIL released while it is read); returns
/// `(source, entries, datasets, chunk_count, legacy)`.
#[pyfunction]
fn read_imatrix(py: Python<'_>, path: PathBuf) -> PyResult<(String, Entries<'_>, Vec<String>, u32, bool)> {
    let m = py.detach(|| Imatrix::open(&path)).py_err()?;
    let entries = m.entries.into_iter().map(|(name, w)| (name, PyArray1::from_vec(py, w))).collect();
    Ok((m.source, entries, m.datasets, m.chunk_count, m.legacy))
}
