//! Path rules for Python: the core's checks of input and output paths.

use std::path::PathBuf;

use ggml_lora_core::paths;
use pyo3::prelude::*;

use crate::errors::IntoPyResult;

/// Adds the path functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(check_output_path, m)?)?;
    m.add_function(wrap_pyfunction!(check_input_path, m)?)?;
    m.add_function(wrap_pyfunction!(refuse_output_onto_inputs, m)?)?;
    Ok(())
}

/// Refuses an output path that names a device, FIFO, socket (`SpecialFileError`) or directory
/// (`IsADirectoryError`); a regular file or a new name passes.
#[pyfunction]
fn check_output_path(path: PathBuf) -> PyResult<()> {
    paths::check_output(&path).py_err()
}

/// Refuses, without opening it, an input path that names a device, FIFO, socket (`SpecialFileError`) or
/// directory (`IsADirectoryError`); a regular file or a missing path passes.
#[pyfunction]
fn check_input_path(path: PathBuf) -> PyResult<()> {
    paths::check_input(&path).py_err()
}

/// Refuses (`PatchError`, kind `output_is_input`) an output path that names one of `inputs` (the same file, by
/// device and inode, or the same path).
#[pyfunction]
fn refuse_output_onto_inputs(out: PathBuf, inputs: Vec<PathBuf>) -> PyResult<()> {
    paths::refuse_output_onto_inputs(&out, &inputs).py_err()
}
