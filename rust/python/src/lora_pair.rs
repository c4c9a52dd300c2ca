//! The summary of one LoRA pair of an adapter, as `Adapter.pairs()` returns it.

use pyo3::prelude::*;
use pyo3::types::PyString;

/// Adds the class to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LoraPair>()
}

/// One LoRA pair of an adapter: the model tensor it changes, by `scale · (left @ right)`.
#[pyclass(module = "ggml_lora._native", frozen, get_all)]
pub struct LoraPair {
    /// The model tensor it patches, e.g. `blk.0.attn_q.weight`.
    pub target: String,
    /// Rows of the patched tensor (numpy `shape[0]`).
    pub rows: usize,
    /// Columns of the patched tensor (numpy `shape[1]`, the row length).
    pub cols: usize,
    /// Inner dimension of the product.
    pub rank: usize,
    /// The scale applied at a user scale of 1 (`alpha / rank`, or 1 without alpha).
    pub scale: f32,
    /// Whether it is a DoRA pair (a magnitude vector rescales each row after the add).
    pub dora: bool,
}

#[pymethods]
impl LoraPair {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "LoraPair(target={}, rows={}, cols={}, rank={}, scale={}, dora={})",
            PyString::new(py, &self.target).repr()?,
            self.rows,
            self.cols,
            self.rank,
            self.scale.into_pyobject(py)?.repr()?,
            if self.dora { "True" } else { "False" },
        ))
    }
}
