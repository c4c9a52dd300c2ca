//! GGUF: the memory-mapped reader ([`GgufFile`]), header parsing ([`GgufHeader`]) and the streaming,
//! atomic writer ([`GgufWriter`]); split models ([`split`]: shard names, sets of shards, [`ShardedWriter`]). Layout and rules: ggml's `gguf.cpp`, summarised in the project's
//! docs/FORMATS.md §1.

mod file;
mod header;
pub mod split;
mod value;
mod writer;

pub use file::GgufFile;
pub use header::{
    align_up, tensor_nbytes, GgufHeader, TensorInfo, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_ELEMENTS,
    MAX_ARRAY_NESTING, MAX_DIMS, MAX_METADATA_MEMORY, MAX_NAME_LENGTH, MAX_STRING_LENGTH,
};
pub use split::{ShardedWriter, SplitRule};
pub use value::{encode_string, Array, Value, ValueType};
pub use writer::{GgufWriter, TensorSpec, WriteOptions};
