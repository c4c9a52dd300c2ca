//! The one place where core errors become Python exceptions.
//!
//! - malformed files (including importance matrices and incomplete or inconsistent shard sets) → `GGUFError` (a
//!   `ValueError`)
//! - a refused torch `.bin` or PEFT pattern key → `ValueError` (the converter raises its `ConversionError`)
//! - missing files → `FileNotFoundError`, other OS errors → `OSError` (with errno)
//! - bad arguments (non-finite input, row length, unsupported type, invalid metadata/tensors) → `ValueError`
//! - inputs that cannot be patched together → `PatchError` (a `ValueError`)
//! - writer misuse, cancellation → `RuntimeError`
//! - a device, FIFO or socket where a regular file is needed (input or output) → `SpecialFileError` (a
//!   `ValueError`); a directory there → `IsADirectoryError`

use std::io::ErrorKind;

use ggml_lora_core::paths::FileKind;
use ggml_lora_core::Error;
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyOSError, PyPermissionError, PyRuntimeError,
    PyValueError,
};
use pyo3::prelude::*;

pyo3::create_exception!(
    ggml_lora,
    GGUFError,
    PyValueError,
    "A GGUF (or other model/adapter) file is malformed. The message names the file, the byte offset and the problem."
);

pyo3::create_exception!(
    ggml_lora,
    PatchError,
    PyValueError,
    "A model, base and adapters that cannot be patched together (architecture, missing tensor, shape, type, \
     output path). Raised before anything is written."
);

pyo3::create_exception!(
    ggml_lora,
    SpecialFileError,
    PyValueError,
    "A path names a device, FIFO (named pipe) or socket where a regular file is needed: an input that would \
     block or read a device, or an output that would replace one. Raised before anything is read or written; \
     the message names the path and what it is."
);

/// The attributes every exception from the core carries (class-level `None` defaults; set per instance).
const DETAIL_ATTRIBUTES: [&str; 6] = ["kind", "path", "offset", "tensor", "expected", "found"];

/// Adds the exception classes to the module, each with the detail attributes defaulting to `None`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    for (name, class) in [
        ("GGUFError", py.get_type::<GGUFError>()),
        ("PatchError", py.get_type::<PatchError>()),
        ("SpecialFileError", py.get_type::<SpecialFileError>()),
    ] {
        for attribute in DETAIL_ATTRIBUTES {
            class.setattr(attribute, py.None())?;
        }
        m.add(name, class)?;
    }
    Ok(())
}

/// Converts a core error into the matching Python exception; the message is the error's full `Display`, and
/// the exception carries the error's facts as attributes (`kind`, `path`, `offset`, `tensor`, `expected`,
/// `found`; `None` where they do not apply; see `ErrorDetails`).
pub fn to_py(err: Error) -> PyErr {
    let details = err.details();
    let exception = exception_for(&err);
    Python::attach(|py| {
        let value = exception.value(py);
        let path = details.path.as_ref().map(|p| p.to_string_lossy().into_owned());
        let set = |name: &str, v: Option<String>| value.setattr(name, v);
        let attributes = value
            .setattr("kind", details.kind)
            .and_then(|_| set("path", path))
            .and_then(|_| value.setattr("offset", details.offset))
            .and_then(|_| set("tensor", details.tensor))
            .and_then(|_| set("expected", details.expected))
            .and_then(|_| set("found", details.found));
        // Builtin exceptions (OSError...) accept attributes too; if one ever refused, the message still says it all.
        drop(attributes);
    });
    exception
}

/// The Python exception type and message for a core error.
fn exception_for(err: &Error) -> PyErr {
    let message = err.to_string();
    match err.root() {
        Error::Io { source, .. } => {
            let errno = source.raw_os_error().unwrap_or(0);
            match source.kind() {
                ErrorKind::NotFound => PyFileNotFoundError::new_err((errno, message)),
                ErrorKind::PermissionDenied => PyPermissionError::new_err((errno, message)),
                ErrorKind::AlreadyExists => PyFileExistsError::new_err((errno, message)),
                ErrorKind::IsADirectory => PyIsADirectoryError::new_err((libc_eisdir(errno), message)),
                _ => PyOSError::new_err((errno, message)),
            }
        }
        Error::NotRegularFile { kind: FileKind::Directory, .. } => PyIsADirectoryError::new_err((21, message)),
        Error::NotRegularFile { .. } => SpecialFileError::new_err(message),
        Error::Malformed { .. } | Error::BadImatrix(_) | Error::ShardSet { .. } => GGUFError::new_err(message),
        Error::Incompatible(_) => PatchError::new_err(message),
        Error::WriterState(_) | Error::Cancelled(_) => PyRuntimeError::new_err(message),
        Error::InFile { .. }
        | Error::InTensor { .. }
        | Error::NonFinite { .. }
        | Error::Imatrix { .. }
        | Error::RowLength { .. }
        | Error::BufferSize { .. }
        | Error::UnsupportedType { .. }
        | Error::InvalidMetadata { .. }
        | Error::InvalidTensor { .. }
        | Error::InvalidTensorInfo(_)
        | Error::TorchBin { .. }
        | Error::PatternKey { .. }
        | Error::Factor { .. } => PyValueError::new_err(message),
    }
}

/// `.map_err(to_py)` in short.
pub trait IntoPyResult<T> {
    /// Converts the error, if any.
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// EISDIR (21 on Linux and macOS) when the error came from our own check rather than the OS.
fn libc_eisdir(errno: i32) -> i32 {
    if errno != 0 {
        errno
    } else {
        21
    }
}
