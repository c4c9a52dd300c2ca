//! GGUF metadata values.

use std::fmt;

macro_rules! value_types {
    ($( $variant:ident = $id:literal, $name:literal; )*) => {
        /// A GGUF metadata value type (`enum gguf_type`); discriminants are the on-disk ids.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum ValueType {
            $(
                #[doc = concat!("`", $name, "`")]
                $variant = $id,
            )*
        }

        impl ValueType {
            /// The type with on-disk id `id`, if any.
            pub fn from_id(id: u32) -> Option<ValueType> {
                match id {
                    $($id => Some(ValueType::$variant),)*
                    _ => None,
                }
            }

            /// Upper-case name as gguf-py's `GGUFValueType` spells it ("UINT32", "STRING", ...).
            pub fn name(self) -> &'static str {
                match self {
                    $(ValueType::$variant => $name,)*
                }
            }

            /// Parses a name as [`ValueType::name`] prints it (case-insensitive).
            pub fn from_name(name: &str) -> Option<ValueType> {
                let upper = name.to_ascii_uppercase();
                match upper.as_str() {
                    $($name => Some(ValueType::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

value_types! {
    U8 = 0, "UINT8";
    I8 = 1, "INT8";
    U16 = 2, "UINT16";
    I16 = 3, "INT16";
    U32 = 4, "UINT32";
    I32 = 5, "INT32";
    F32 = 6, "FLOAT32";
    Bool = 7, "BOOL";
    String = 8, "STRING";
    Array = 9, "ARRAY";
    U64 = 10, "UINT64";
    I64 = 11, "INT64";
    F64 = 12, "FLOAT64";
}

impl ValueType {
    /// Size in bytes of a fixed-size value, `None` for STRING and ARRAY.
    pub fn fixed_size(self) -> Option<usize> {
        Some(match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 => 8,
            ValueType::String | ValueType::Array => return None,
        })
    }

    /// The smallest number of bytes one value of this type takes on disk (GGUF v2/v3), used to bound
    /// allocations by the bytes left in the file before trusting a count.
    pub fn min_encoded_size(self) -> usize {
        match self {
            ValueType::String => 8,
            ValueType::Array => 4 + 8,
            fixed => fixed.fixed_size().unwrap_or(1),
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A typed GGUF array: the element type and the values (all of that type).
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// Type of every element.
    pub elem_type: ValueType,
    /// The elements.
    pub items: Vec<Value>,
}

/// One GGUF metadata value. Strings are kept as raw bytes: GGUF does not promise UTF-8, and a file must be
/// rewritable byte for byte.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(Vec<u8>),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// A string value from text.
    pub fn string(s: impl Into<String>) -> Value {
        Value::String(s.into().into_bytes())
    }

    /// The text of a STRING value that is valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }

    /// Any integer value (of any width or signedness) as i128; `None` for other types.
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any numeric value as f64 (integers converted); `None` for strings, bools and arrays.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }

    /// Appends the GGUF v3 little-endian encoding of the value (without its type tag) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Bool(v) => out.push(u8::from(*v)),
            Value::String(bytes) => encode_string(bytes, out),
            Value::Array(array) => {
                out.extend_from_slice(&(array.elem_type as u32).to_le_bytes());
                out.extend_from_slice(&(array.items.len() as u64).to_le_bytes());
                for item in &array.items {
                    item.encode(out);
                }
            }
            Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

/// Appends a GGUF string (u64 length, then the bytes, no NUL) to `out`.
pub fn encode_string(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}
