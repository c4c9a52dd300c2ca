//! The converter's readers for Python: torch `.bin` state dicts and PEFT pattern keys (argument conversion only).

use std::path::PathBuf;

use ggml_lora_core::ggla::{self, GglaPair};
use ggml_lora_core::patterns::PatternKeys;
use ggml_lora_core::torch_bin;
use numpy::{PyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::errors::IntoPyResult;

/// Adds the converter functions and classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_torch_bin, m)?)?;
    m.add_function(wrap_pyfunction!(write_ggla, m)?)?;
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

/// Writes a legacy ggla adapter atomically (see `ggla::write_ggla`): `pairs` are `(model tensor name, A of
/// shape (r, n_in), B of shape (n_out, r))` as float32, scaled by llama.cpp's rule with `alpha`; `written` gets
/// the path appended once it is in place.
#[pyfunction]
#[pyo3(signature = (path, pairs, alpha, a_as_f16, written = None))]
#[allow(clippy::type_complexity)]
fn write_ggla(
    py: Python<'_>,
    path: PathBuf,
    pairs: Vec<(String, PyReadonlyArray2<'_, f32>, PyReadonlyArray2<'_, f32>)>,
    alpha: f64,
    a_as_f16: bool,
    written: Option<Bound<'_, PyList>>,
) -> PyResult<PathBuf> {
    let mut views = Vec::with_capacity(pairs.len());
    for (name, a, b) in &pairs {
        let (shape_a, shape_b) = (a.shape(), b.shape());
        let not_contiguous =
            |e: numpy::AsSliceError| PyValueError::new_err(format!("tensor {name:?}: {e} (need C-contiguous)"));
        views.push(GglaPair {
            name,
            a: a.as_slice().map_err(not_contiguous)?,
            b: b.as_slice().map_err(not_contiguous)?,
            rank: shape_a[0],
            n_in: shape_a[1],
            n_out: shape_b[0],
        });
    }
    let out = py.detach(|| ggla::write_ggla(&path, &views, alpha, a_as_f16)).py_err()?;
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
