//! `ggml_lora._native`: the PyO3 binding of `ggml-lora-core`. No logic lives here: each function converts
//! arguments, releases the GIL around the core call, and converts the result. Errors become Python
//! exceptions in one place, [`errors`].
#![deny(missing_docs)]

mod convert;
mod errors;
mod gguf;
mod imatrix;
mod lora_pair;
mod patch;
mod paths;
mod quant;
mod values;

use pyo3::prelude::*;

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    convert::register(m)?;
    gguf::register(m)?;
    imatrix::register(m)?;
    lora_pair::register(m)?;
    quant::register(m)?;
    patch::register(m)?;
    paths::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
