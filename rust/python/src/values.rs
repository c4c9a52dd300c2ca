//! GGUF metadata values to and from Python objects.
//!
//! Python sees `(key, type_name, element_type_name | None, value)` tuples, type names as gguf-py's
//! `GGUFValueType` spells them; the Python package turns these into its dict and `MetadataValue` objects.

use ggml_lora_core::gguf::{Array, Value, ValueType};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};

/// Converts a value to a Python object: int, float, bool, str (bytes when not UTF-8) or list.
pub fn value_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::U8(v) => v.into_pyobject(py)?.into_any(),
        Value::I8(v) => v.into_pyobject(py)?.into_any(),
        Value::U16(v) => v.into_pyobject(py)?.into_any(),
        Value::I16(v) => v.into_pyobject(py)?.into_any(),
        Value::U32(v) => v.into_pyobject(py)?.into_any(),
        Value::I32(v) => v.into_pyobject(py)?.into_any(),
        Value::U64(v) => v.into_pyobject(py)?.into_any(),
        Value::I64(v) => v.into_pyobject(py)?.into_any(),
        Value::F32(v) => v.into_pyobject(py)?.into_any(),
        Value::F64(v) => v.into_pyobject(py)?.into_any(),
        Value::Bool(v) => v.into_pyobject(py)?.to_owned().into_any(),
        Value::String(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => PyString::new(py, text).into_any(),
            Err(_) => PyBytes::new(py, bytes).into_any(),
        },
        Value::Array(array) => {
            let items = array.items.iter().map(|item| value_to_py(py, item)).collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
    })
}

/// The element type name of an array value, `None` for scalars.
pub fn element_type_name(value: &Value) -> Option<&'static str> {
    match value {
        Value::Array(array) => Some(array.elem_type.name()),
        _ => None,
    }
}

/// Parses a value type name ("UINT32", "string", ...).
pub fn value_type(name: &str) -> PyResult<ValueType> {
    ValueType::from_name(name).ok_or_else(|| PyValueError::new_err(format!("unknown GGUF value type {name:?}")))
}

/// Converts a Python object to a value of type `ty` (arrays: of `element_type`), checking ranges.
pub fn value_from_py(obj: &Bound<'_, PyAny>, ty: ValueType, element_type: Option<ValueType>) -> PyResult<Value> {
    Ok(match ty {
        ValueType::U8 => Value::U8(obj.extract()?),
        ValueType::I8 => Value::I8(obj.extract()?),
        ValueType::U16 => Value::U16(obj.extract()?),
        ValueType::I16 => Value::I16(obj.extract()?),
        ValueType::U32 => Value::U32(obj.extract()?),
        ValueType::I32 => Value::I32(obj.extract()?),
        ValueType::U64 => Value::U64(obj.extract()?),
        ValueType::I64 => Value::I64(obj.extract()?),
        ValueType::F32 => Value::F32(obj.extract::<f64>()? as f32),
        ValueType::F64 => Value::F64(obj.extract()?),
        ValueType::Bool => Value::Bool(obj.extract()?),
        ValueType::String => match obj.cast::<PyBytes>() {
            Ok(bytes) => Value::String(bytes.as_bytes().to_vec()),
            Err(_) => Value::string(obj.extract::<String>()?),
        },
        ValueType::Array => {
            let elem_type =
                element_type.ok_or_else(|| PyValueError::new_err("an ARRAY value needs an element type"))?;
            if elem_type == ValueType::Array {
                // The writer refuses them too; Python gives no element type to convert them with.
                return Err(PyValueError::new_err("nested arrays cannot be written: ggml's loader refuses them"));
            }
            let mut items = Vec::new();
            for item in obj.try_iter()? {
                items.push(value_from_py(&item?, elem_type, None)?);
            }
            Value::Array(Array { elem_type, items })
        }
    })
}
