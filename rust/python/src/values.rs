//! GGUF metadata values to and from Python objects.
//!
//! Types cross as gguf-py's `GGUFValueType` ids (ints), never as names. Python → core: a mapping from key to
//! any object with `value`, `type` and `sub_type` attributes (the package's `MetadataValue`, whose types are an
//! `IntEnum` of those ids). Core → Python: [`MetadataField`] objects; the package turns them into its
//! `MetadataValue`s.

use ggml_lora_core::gguf::{Array, Value, ValueType};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

/// One metadata key of a file, with its exact GGUF type (core → Python).
#[pyclass(module = "ggml_lora._native", frozen, get_all)]
pub struct MetadataField {
    /// The key.
    key: String,
    /// The value's type as gguf-py's `GGUFValueType` id (4 = UINT32, 8 = STRING, 9 = ARRAY, ...).
    #[pyo3(name = "type")]
    ty: u32,
    /// For an ARRAY, the type id of its elements (9 for nested arrays); `None` for scalars.
    sub_type: Option<u32>,
    /// The value: int, float, bool, str (bytes when not UTF-8), or a list of those (lists of lists for nested
    /// arrays).
    value: Py<PyAny>,
}

#[pymethods]
impl MetadataField {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let ty = ValueType::from_id(self.ty).map_or("?", ValueType::name);
        let ty = match self.sub_type.and_then(ValueType::from_id) {
            Some(sub) => format!("{ty}[{}]", sub.name()),
            None => ty.to_string(),
        };
        let key = PyString::new(py, &self.key).repr()?;
        Ok(format!("MetadataField(key={key}, type={ty}, value={})", self.value.bind(py).repr()?))
    }
}

/// The metadata of a file as [`MetadataField`]s in file order.
pub fn fields_to_py(py: Python<'_>, metadata: &[(String, Value)]) -> PyResult<Vec<MetadataField>> {
    metadata
        .iter()
        .map(|(key, value)| {
            Ok(MetadataField {
                key: key.clone(),
                ty: value.value_type() as u32,
                sub_type: match value {
                    Value::Array(array) => Some(array.elem_type as u32),
                    _ => None,
                },
                value: value_to_py(py, value)?.unbind(),
            })
        })
        .collect()
}

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

/// A metadata value as Python hands it over (Python → core): the attributes of the package's `MetadataValue`.
#[derive(FromPyObject)]
struct TypedValue<'py> {
    #[pyo3(attribute)]
    value: Bound<'py, PyAny>,
    #[pyo3(attribute("type"))]
    ty: u32,
    #[pyo3(attribute)]
    sub_type: Option<u32>,
}

/// A value type from its gguf-py `GGUFValueType` id.
fn value_type_of_id(id: u32) -> PyResult<ValueType> {
    ValueType::from_id(id).ok_or_else(|| PyValueError::new_err(format!("unknown GGUF value type id {id}")))
}

/// Converts a mapping from key to `MetadataValue` (in insertion order) into metadata values; errors name the key.
pub fn metadata_from_py(metadata: &Bound<'_, PyDict>) -> PyResult<Vec<(String, Value)>> {
    let mut values = Vec::with_capacity(metadata.len());
    for (key, typed) in metadata.iter() {
        let key: String = key.extract()?;
        let value = typed_value_from_py(&typed)
            .map_err(|e| PyValueError::new_err(format!("metadata key {key:?}: {}", e.value(typed.py()))))?;
        values.push((key, value));
    }
    Ok(values)
}

/// Converts one `MetadataValue` into a metadata value.
fn typed_value_from_py(typed: &Bound<'_, PyAny>) -> PyResult<Value> {
    let typed: TypedValue<'_> = typed.extract().map_err(|e: PyErr| {
        PyValueError::new_err(format!(
            "expected a MetadataValue whose type and sub_type are GGUFValueType ids ({})",
            e.value(typed.py())
        ))
    })?;
    let sub_type = typed.sub_type.map(value_type_of_id).transpose()?;
    value_from_py(&typed.value, value_type_of_id(typed.ty)?, sub_type)
}

/// Converts a Python object to a value of type `ty` (arrays: of `element_type`), checking ranges.
fn value_from_py(obj: &Bound<'_, PyAny>, ty: ValueType, element_type: Option<ValueType>) -> PyResult<Value> {
    let value = match ty {
        ValueType::U8 => obj.extract().map(Value::U8),
        ValueType::I8 => obj.extract().map(Value::I8),
        ValueType::U16 => obj.extract().map(Value::U16),
        ValueType::I16 => obj.extract().map(Value::I16),
        ValueType::U32 => obj.extract().map(Value::U32),
        ValueType::I32 => obj.extract().map(Value::I32),
        ValueType::U64 => obj.extract().map(Value::U64),
        ValueType::I64 => obj.extract().map(Value::I64),
        ValueType::F32 => obj.extract::<f64>().map(|v| Value::F32(v as f32)),
        ValueType::F64 => obj.extract().map(Value::F64),
        ValueType::Bool => obj.extract().map(Value::Bool),
        ValueType::String => match obj.cast::<PyBytes>() {
            Ok(bytes) => Ok(Value::String(bytes.as_bytes().to_vec())),
            Err(_) => obj.extract::<String>().map(Value::string),
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
            return Ok(Value::Array(Array { elem_type, items }));
        }
    };
    value.map_err(|e| {
        PyValueError::new_err(format!(
            "cannot store {} as {ty}: {e}",
            obj.repr().map_or_else(|_| "?".into(), |r| r.to_string())
        ))
    })
}
