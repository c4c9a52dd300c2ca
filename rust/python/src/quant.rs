//! Quantization kernels for Python. Arrays arrive C-contiguous (the Python wrapper ensures it).

use ggml_lora_core::{quant, GgmlType};
use numpy::{PyArray1, PyReadonlyArrayDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::IntoPyResult;
use crate::gguf::ggml_type;

/// Adds the kernel functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize_rows, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_rows, m)?)?;
    m.add_function(wrap_pyfunction!(type_table, m)?)?;
    Ok(())
}

/// Quantizes a C-contiguous float32 array, rows of `row_len`, to a flat uint8 array (rows in parallel,
/// GIL released).
#[pyfunction]
fn quantize_rows<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    type_name: &str,
    row_len: usize,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let ty = ggml_type(type_name)?;
    let src = x.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?;
    if row_len == 0 || src.len() % row_len != 0 {
        return Err(PyValueError::new_err(format!("{} elements do not form rows of {row_len}", src.len())));
    }
    let out = py
        .detach(|| {
            let row_bytes = ty.row_bytes(row_len as u64).ok_or(ggml_lora_core::Error::RowLength {
                ty,
                row_len,
                block: ty.block_size(),
            })?;
            let mut out = vec![0u8; src.len() / row_len * row_bytes as usize];
            quant::quantize_rows_par(ty, src, row_len, &mut out).map(|_| out)
        })
        .py_err()?;
    Ok(PyArray1::from_vec(py, out))
}

/// Dequantizes a C-contiguous uint8 array holding rows of `row_len` elements of `type_name` to a flat
/// float32 array (rows in parallel, GIL released).
#[pyfunction]
fn dequantize_rows<'py>(
    py: Python<'py>,
    data: PyReadonlyArrayDyn<'py, u8>,
    type_name: &str,
    row_len: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let ty = ggml_type(type_name)?;
    let src = data.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?;
    let out = py
        .detach(|| {
            let row_bytes = ty.row_bytes(row_len as u64).filter(|&b| b > 0).ok_or(ggml_lora_core::Error::RowLength {
                ty,
                row_len,
                block: ty.block_size(),
            })? as usize;
            if src.len() % row_bytes != 0 {
                return Err(ggml_lora_core::Error::BufferSize {
                    what: "quantized data (a whole number of rows)",
                    expected: (src.len() / row_bytes + 1) * row_bytes,
                    found: src.len(),
                });
            }
            let mut out = vec![0f32; src.len() / row_bytes * row_len];
            quant::dequantize_rows_par(ty, src, row_len, &mut out).map(|_| out)
        })
        .py_err()?;
    Ok(PyArray1::from_vec(py, out))
}

/// Every ggml type as `(name, id, block size, bytes per block, can quantize, can dequantize)`.
#[pyfunction]
fn type_table() -> Vec<(&'static str, u32, usize, usize, bool, bool)> {
    GgmlType::ALL
        .iter()
        .map(|&t| (t.name(), t.id(), t.block_size(), t.block_bytes(), quant::can_quantize(t), quant::can_dequantize(t)))
        .collect()
}
