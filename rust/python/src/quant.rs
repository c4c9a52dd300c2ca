//! Quantization kernels for Python. Arrays arrive C-contiguous (the Python wrapper ensures it).

use ggml_lora_core::{quant, Error, GgmlType};
use numpy::{Element, PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::IntoPyResult;
use crate::gguf::ggml_type;

/// Adds the kernel functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize_rows, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_rows, m)?)?;
    m.add_function(wrap_pyfunction!(type_table, m)?)?;
    m.add_class::<TypeInfo>()?;
    Ok(())
}

/// Quantizes a C-contiguous float32 array, rows of `row_len`, to a flat uint8 array (rows in parallel,
/// GIL released); into `out` (flat, C-contiguous, exactly the right size) when given, else a new array.
#[pyfunction]
#[pyo3(signature = (x, type_name, row_len, out = None, imatrix = None))]
fn quantize_rows<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    type_name: &str,
    row_len: usize,
    out: Option<Bound<'py, PyArray1<u8>>>,
    imatrix: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let ty = ggml_type(type_name)?;
    let src = x.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?;
    let weights = match &imatrix {
        Some(w) => Some(w.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?),
        None => None,
    };
    if row_len == 0 || src.len() % row_len != 0 {
        return Err(PyValueError::new_err(format!("{} elements do not form rows of {row_len}", src.len())));
    }
    let row_bytes =
        ty.row_bytes(row_len as u64).ok_or(Error::RowLength { ty, row_len, block: ty.block_size() }).py_err()? as usize;
    let n = src.len() / row_len * row_bytes;
    fill_or_allocate(py, out, n, |dst| quant::quantize_rows_par(ty, src, row_len, dst, weights))
}

/// Dequantizes a C-contiguous uint8 array holding rows of `row_len` elements of `type_name` to a flat
/// float32 array (rows in parallel, GIL released); into `out` when given, else a new array.
#[pyfunction]
#[pyo3(signature = (data, type_name, row_len, out = None))]
fn dequantize_rows<'py>(
    py: Python<'py>,
    data: PyReadonlyArrayDyn<'py, u8>,
    type_name: &str,
    row_len: usize,
    out: Option<Bound<'py, PyArray1<f32>>>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let ty = ggml_type(type_name)?;
    let src = data.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?;
    let row_bytes = ty
        .row_bytes(row_len as u64)
        .filter(|&b| b > 0)
        .ok_or(Error::RowLength { ty, row_len, block: ty.block_size() })
        .py_err()? as usize;
    if src.len() % row_bytes != 0 {
        return Err(Error::BufferSize {
            what: "quantized data (a whole number of rows)",
            expected: (src.len() / row_bytes + 1) * row_bytes,
            found: src.len(),
        })
        .py_err();
    }
    let n = src.len() / row_bytes * row_len;
    fill_or_allocate(py, out, n, |dst| quant::dequantize_rows_par(ty, src, row_len, dst))
}

/// Runs `kernel` (GIL released) into `out` when given (it must hold exactly `n` elements), else into a new array.
fn fill_or_allocate<'py, T: Element + Default + Clone + Send>(
    py: Python<'py>,
    out: Option<Bound<'py, PyArray1<T>>>,
    n: usize,
    kernel: impl Fn(&mut [T]) -> Result<(), Error> + Send + Sync,
) -> PyResult<Bound<'py, PyArray1<T>>> {
    match out {
        Some(out) => {
            {
                let mut dst = out.try_readwrite().map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
                let dst = dst.as_slice_mut().map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
                check_out_len(dst.len(), n)?;
                py.detach(|| kernel(dst)).py_err()?;
            }
            Ok(out)
        }
        None => {
            let values = py
                .detach(|| {
                    let mut dst = vec![T::default(); n];
                    kernel(&mut dst).map(|_| dst)
                })
                .py_err()?;
            Ok(PyArray1::from_vec(py, values))
        }
    }
}

fn check_out_len(found: usize, expected: usize) -> PyResult<()> {
    if found != expected {
        return Err(PyValueError::new_err(format!("out has {found} elements, expected {expected}")));
    }
    Ok(())
}

/// One ggml type (the public `ggml_lora.TypeInfo`): what it is on disk and what this package can do with it.
#[pyclass(module = "ggml_lora._native", frozen, get_all, eq, hash)]
#[derive(PartialEq, Eq, Hash)]
pub struct TypeInfo {
    /// Lower-case name as gguf-py spells it ("f32", "q4_0", "q6_k", "iq2_xxs", ...).
    name: &'static str,
    /// The on-disk id (`enum ggml_type`, gguf-py's `GGMLQuantizationType` value).
    id: u32,
    /// Elements per block (1 for plain element types).
    block_size: usize,
    /// Bytes per block.
    type_size: usize,
    /// Whether `quantize` can write it.
    can_quantize: bool,
    /// Whether `dequantize` can read it.
    can_dequantize: bool,
}

#[pymethods]
impl TypeInfo {
    fn __repr__(&self) -> String {
        format!(
            "TypeInfo(name='{}', id={}, block_size={}, type_size={}, can_quantize={}, can_dequantize={})",
            self.name,
            self.id,
            self.block_size,
            self.type_size,
            if self.can_quantize { "True" } else { "False" },
            if self.can_dequantize { "True" } else { "False" },
        )
    }
}

/// Every ggml type llama.cpp defines, in id order.
#[pyfunction]
fn type_table() -> Vec<TypeInfo> {
    GgmlType::ALL
        .iter()
        .map(|&t| TypeInfo {
            name: t.name(),
            id: t.id(),
            block_size: t.block_size(),
            type_size: t.block_bytes(),
            can_quantize: quant::can_quantize(t),
            can_dequantize: quant::can_dequantize(t),
        })
        .collect()
}
