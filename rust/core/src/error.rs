//! The one error type of the core. Every failure has its own variant with the facts a user needs
//! (what, where, expected vs found); the Python binding maps variants to exceptions in one place.

use std::io;
use std::path::PathBuf;

use crate::paths::FileKind;
use crate::types::GgmlType;

/// Result alias used throughout the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on `path` (open, map, write, rename, ...).
    #[error("{path}: {source}")]
    Io {
        /// The file the operation was about.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A path that names a device, FIFO, socket or directory where a regular file is needed: refused before
    /// an input is opened, or before any work for an output (which is then never replaced).
    #[error(
        "{} is {kind}; {}",
        path.display(),
        if *output { "the output must be a regular file or a new name" } else { "an input must be a regular file" }
    )]
    NotRegularFile {
        /// The path as given.
        path: PathBuf,
        /// What it names.
        kind: FileKind,
        /// Whether it was given as an output (else as an input).
        output: bool,
    },

    /// An error that happened while handling `path`; `source` says what.
    #[error("{path}: {source}")]
    InFile {
        /// The file being read or written.
        path: PathBuf,
        /// What went wrong.
        source: Box<Error>,
    },

    /// A torch `.bin` (a `torch.save` zip, or a file that is not one) refused by [`crate::torch_bin`]: malformed,
    /// hostile, or over one of the reader's limits. `member` is the zip member (`"zip directory"` for the
    /// archive's structure, `"pickle"` for a file that is not a zip); `offset` is the byte offset within it.
    #[error("{member}, byte {offset}: {kind}")]
    TorchBin {
        /// The zip member, or what part of the file.
        member: String,
        /// Byte offset within the member (within the inflated bytes for a compressed member).
        offset: u64,
        /// What is wrong.
        kind: TorchBin,
    },

    /// A PEFT `rank_pattern` / `alpha_pattern` key that cannot be matched as PEFT matches it (see
    /// [`crate::patterns`]).
    #[error("pattern key {key:?}: {reason}")]
    PatternKey {
        /// The key, as written in the config (cut to 200 characters).
        key: String,
        /// Why it is refused.
        reason: String,
    },

    /// A factor of a PEFT adapter that does not fit the plan made for it (see [`crate::peft`]): absent from the
    /// weights file, not 2-D, ranks that disagree, a magnitude vector of the wrong length.
    #[error("tensor {tensor:?}: {what}: expected {expected}, found {found}")]
    Factor {
        /// The tensor (its key in the weights file).
        tensor: String,
        /// What does not fit.
        what: &'static str,
        /// What the plan needs.
        expected: String,
        /// What the file holds.
        found: String,
    },

    /// A file's bytes break the format at byte `offset` (absolute, from the start of the file).
    #[error("malformed {format} file at byte {offset}: {kind}")]
    Malformed {
        /// "GGUF", "ggla", ...
        format: &'static str,
        /// Absolute byte offset of the offending field.
        offset: u64,
        /// What is wrong.
        kind: Malformed,
    },

    /// Quantization input holds NaN or ±inf, which ggml would turn into garbage blocks.
    #[error("cannot quantize to {ty}: element {index} is {value} (non-finite input)")]
    NonFinite {
        /// Target type.
        ty: GgmlType,
        /// Flat element index of the first non-finite value.
        index: usize,
        /// The value itself.
        value: f32,
    },

    /// Importance-matrix weights that do not fit the rows being quantized: the wrong count, or a value that is
    /// negative or not finite (`index` is then the first such weight).
    #[error("importance matrix for {ty}: {reason}")]
    Imatrix {
        /// Target type.
        ty: GgmlType,
        /// What is wrong, with expected vs found.
        reason: String,
    },

    /// A row length that is not a multiple of the type's block size.
    #[error("row length {row_len} is not a multiple of the {ty} block size {block}")]
    RowLength {
        /// The type.
        ty: GgmlType,
        /// Elements per row.
        row_len: usize,
        /// The type's block size.
        block: usize,
    },

    /// A buffer whose size does not fit the operation.
    #[error("{what}: expected {expected} bytes/elements, found {found}")]
    BufferSize {
        /// Which buffer.
        what: &'static str,
        /// Required size.
        expected: usize,
        /// Actual size.
        found: usize,
    },

    /// An operation this project does not implement for a type (e.g. quantizing to an i-quant).
    #[error("{op} is not supported for type {ty}")]
    UnsupportedType {
        /// "quantize" or "dequantize".
        op: &'static str,
        /// The type.
        ty: GgmlType,
    },

    /// Metadata handed to the writer that a ggml reader would refuse.
    #[error("metadata key {key:?}: {reason}")]
    InvalidMetadata {
        /// The key.
        key: String,
        /// Why it cannot be written.
        reason: String,
    },

    /// A tensor handed to the writer that a ggml reader would refuse, or whose data does not match its info.
    #[error("tensor {name:?}: {reason}")]
    InvalidTensor {
        /// The tensor name.
        name: String,
        /// Why it cannot be written.
        reason: String,
    },

    /// Inputs that do not belong together (architecture, shapes, missing tensors, types): a patch refused
    /// before anything is written.
    #[error("{0}")]
    Incompatible(Incompatible),

    /// An error while processing one tensor.
    #[error("tensor {name:?}: {source}")]
    InTensor {
        /// The tensor.
        name: String,
        /// What went wrong.
        source: Box<Error>,
    },

    /// The operation was cancelled (e.g. Ctrl-C from a progress callback); nothing was written.
    #[error("cancelled: {0}")]
    Cancelled(String),

    /// Tensor dims or type handed to the writer that a ggml reader would refuse (the message names the tensor).
    #[error("{0}")]
    InvalidTensorInfo(Malformed),

    /// The writer was driven out of order (e.g. data for tensor 2 before tensor 1 was complete).
    #[error("GGUF writer used out of order: {0}")]
    WriterState(String),

    /// An importance-matrix file whose container reads fine but whose contents `llama-quantize` would refuse
    /// or turn into garbage weights (byte-level damage to a legacy `.dat` file is [`Error::Malformed`]).
    #[error("malformed importance matrix: {0}")]
    BadImatrix(BadImatrix),

    /// A split model (llama.cpp's gguf-split shards) whose set is incomplete or inconsistent; `shard` is the
    /// file at fault (for a missing shard, the path where it was expected).
    #[error("{}: {problem}", shard.display())]
    ShardSet {
        /// The shard at fault.
        shard: PathBuf,
        /// What is wrong with the set.
        problem: ShardProblem,
    },
}

/// The ways a set of gguf-split shards can be incomplete or inconsistent (see [`Error::ShardSet`]). Shard
/// numbers in messages are 1-based, as in the file names; the `split.no` values are 0-based, as on disk.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShardProblem {
    /// The file says it is a shard, but its name does not follow llama.cpp's scheme, so its siblings cannot be
    /// found.
    #[error(
        "the file says it is shard {} of {count} (split.no = {no}), but its name does not end in \
         -{:05}-of-{count:05}.gguf, so its sibling shards cannot be found; rename the shards as \
         llama-gguf-split names them (PREFIX-NNNNN-of-MMMMM.gguf)",
        *no as u32 + 1,
        *no as u32 + 1
    )]
    BadName {
        /// `split.no` of the file (0-based).
        no: u16,
        /// `split.count` of the file.
        count: u16,
    },
    /// A shard of the set is not there.
    #[error("shard {} of {count} is missing (the set is incomplete)", *no as u32 + 1)]
    Missing {
        /// The missing shard's number (0-based).
        no: u16,
        /// Shards in the set.
        count: u16,
    },
    /// A file with a shard's name that carries no `split.no`: not a shard.
    #[error("named as shard {} of {count}, but it is not a shard (no split.no key)", *no as u32 + 1)]
    NotAShard {
        /// The number its name gives (0-based).
        no: u16,
        /// Shards in the set.
        count: u16,
    },
    /// A split key of the wrong type (llama.cpp reads `split.no` and `split.count` as UINT16 and
    /// `split.tensors.count` as INT32, and refuses other types).
    #[error("metadata key {key} is {found}, expected {expected}")]
    KeyType {
        /// The key.
        key: &'static str,
        /// Its type in the file.
        found: String,
        /// The type llama.cpp requires.
        expected: &'static str,
    },
    /// A split key llama.cpp requires is missing.
    #[error("metadata key {key} is missing (llama.cpp requires it in a split model)")]
    MissingKey {
        /// The key.
        key: &'static str,
    },
    /// `split.no` not below `split.count`.
    #[error("split.no is {no}, but split.count is {count} (shard numbers run from 0 to split.count - 1)")]
    NumberOutOfRange {
        /// `split.no`.
        no: u16,
        /// `split.count`.
        count: u16,
    },
    /// The shard's `split.no` differs from the number its name gives: a copied, duplicated or misnamed shard.
    #[error(
        "split.no is {found} (shard {}), but the file is named as shard {} of the set (a duplicated or \
         misnamed shard)",
        *found as u32 + 1,
        *expected as u32 + 1
    )]
    WrongNumber {
        /// `split.no` in the file.
        found: u16,
        /// The number its name gives (0-based).
        expected: u16,
    },
    /// The shard's `split.count` differs from the first shard's.
    #[error("split.count is {found}, but the first shard says the set has {expected} shards")]
    CountMismatch {
        /// `split.count` in this shard.
        found: u16,
        /// `split.count` in the first shard.
        expected: u16,
    },
    /// The shard's `split.tensors.count` differs from the first shard's.
    #[error("split.tensors.count is {found}, but the first shard says {expected}")]
    TensorCountMismatch {
        /// In this shard.
        found: i64,
        /// In the first shard.
        expected: i64,
    },
    /// A tensor name found in two shards.
    #[error("tensor {name:?} is also in {} (each tensor must be in exactly one shard)", other.display())]
    DuplicateTensor {
        /// The tensor.
        name: String,
        /// The other shard holding it.
        other: PathBuf,
    },
    /// The shards' tensors do not add up to `split.tensors.count`.
    #[error("the {count} shards hold {found} tensors in all, but split.tensors.count says {expected}")]
    TensorTotal {
        /// Shards in the set.
        count: u16,
        /// Tensors found.
        found: u64,
        /// `split.tensors.count` of the first shard.
        expected: i64,
    },
}

/// Why a torch `.bin` is refused. Messages never show an untrusted structure, only type names, counts and
/// strings cut short.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TorchBin {
    /// One of the reader's hard limits (`constant` names it in [`crate::torch_bin`]) is exceeded.
    #[error("{what} is {found}, over the limit of {limit} ({constant})")]
    Limit {
        /// What is counted or measured.
        what: &'static str,
        /// The value found (for running counts: the first value over the limit).
        found: u64,
        /// The largest accepted.
        limit: u64,
        /// The name of the limit's constant.
        constant: &'static str,
    },
    /// A pickle global outside the allow-list, refused by name before anything is built from it.
    #[error(
        "refusing to load pickle global '{module}.{name}'{python3} - only torch tensor rebuild functions, storage \
         types and collections.OrderedDict are allowed (the file may be hostile; nothing was executed)"
    )]
    RefusedGlobal {
        /// The module, as written in the pickle (cut to 200 characters).
        module: String,
        /// The name, as written (cut to 200 characters).
        name: String,
        /// `" (Python 3: 'builtins.eval')"` when the pickle spells a Python 3 name the Python 2 way, else empty.
        python3: String,
    },
    /// A pickle stream that is malformed or uses what a tensor state dict never needs.
    #[error("{0}")]
    Pickle(String),
    /// A zip archive that is malformed, or a member that breaks what torch writes.
    #[error("{0}")]
    Zip(String),
    /// A tensor whose view (offset, size, stride) does not fit its storage, or whose dtype contradicts it.
    #[error("tensor {tensor:?}: {reason}")]
    Tensor {
        /// The state-dict key (empty while the pickle is still being read).
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// torch's legacy (pre-1.6) format: recognised by its magic number, then refused.
    #[error(
        "legacy (pre-zip) torch serialization is not supported; re-save the adapter with safetensors (PEFT \
         save_pretrained(safe_serialization=True))"
    )]
    Legacy,
    /// A file that is neither a zip nor torch's legacy format.
    #[error("not a torch zip archive (torch.save format); plain pickles are not supported")]
    PlainPickle,
    /// An allocation the file asks for that the process cannot make (refused rather than aborting).
    #[error("cannot allocate {bytes} bytes for {what} (out of memory)")]
    OutOfMemory {
        /// What the memory was for.
        what: String,
        /// How much was asked.
        bytes: u64,
    },
}

/// The ways a file can break its format. Each names the field and the values involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Malformed {
    /// The first four bytes are not the format's magic.
    #[error("bad magic {found:02x?}, expected {expected:?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
        /// The magic expected, as text.
        expected: &'static str,
    },
    /// The version field reads as a byte-swapped small number: the file was written big-endian.
    #[error("the file is big-endian (version field {raw:#010x}); only little-endian GGUF is supported")]
    BigEndian {
        /// The raw little-endian reading of the version field.
        raw: u32,
    },
    /// A version this reader does not support.
    #[error("unsupported version {version} ({hint})")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
        /// What is supported.
        hint: &'static str,
    },
    /// The file ends before a field does.
    #[error("file ends inside {what}: needs {needed} more bytes, {available} left")]
    Truncated {
        /// The field being read.
        what: String,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// A count beyond what the file can hold or what ggml accepts.
    #[error("{what} is {count}, more than the limit {limit}")]
    TooMany {
        /// What is counted.
        what: String,
        /// The count found.
        count: u64,
        /// The largest accepted.
        limit: u64,
    },
    /// A key or tensor name that is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which string.
        what: String,
    },
    /// A metadata key of length zero.
    #[error("empty metadata key")]
    EmptyKey,
    /// A metadata key that appears twice.
    #[error("duplicate metadata key {key:?}")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// A metadata value type id outside 0..=12.
    #[error("unknown metadata value type {id} for key {key:?}")]
    UnknownValueType {
        /// The key.
        key: String,
        /// The id found.
        id: u32,
    },
    /// A bool that is neither 0 nor 1.
    #[error("bool value {value} for key {key:?} (must be 0 or 1)")]
    InvalidBool {
        /// The key.
        key: String,
        /// The byte found.
        value: u8,
    },
    /// `general.alignment` with the wrong type or a value that is not a power of two.
    #[error("general.alignment {reason}")]
    BadAlignment {
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor with more than 4 dimensions or none.
    #[error("tensor {name:?} has {n_dims} dimensions (1 to 4 allowed)")]
    BadDimCount {
        /// The tensor.
        name: String,
        /// Dimensions found.
        n_dims: u32,
    },
    /// A tensor with a zero-sized dimension.
    #[error("tensor {name:?} has dimension {index} of size 0")]
    ZeroDim {
        /// The tensor.
        name: String,
        /// Which dimension (ggml order).
        index: usize,
    },
    /// A tensor whose element count or byte size overflows.
    #[error("tensor {name:?} with dims {dims:?} is too large (element count overflows)")]
    SizeOverflow {
        /// The tensor.
        name: String,
        /// Its dims (ggml order).
        dims: Vec<u64>,
    },
    /// A tensor type id that ggml does not define.
    #[error("tensor {name:?} has unknown ggml type id {id}")]
    UnknownTensorType {
        /// The tensor.
        name: String,
        /// The id found.
        id: u32,
    },
    /// A tensor whose row length is not a multiple of its type's block size.
    #[error("tensor {name:?}: row length {row_len} is not a multiple of the {ty} block size {block}")]
    RowNotBlockMultiple {
        /// The tensor.
        name: String,
        /// Its type.
        ty: GgmlType,
        /// ne[0].
        row_len: u64,
        /// Block size of the type.
        block: usize,
    },
    /// A tensor name of 64 bytes or more (`GGML_MAX_NAME`).
    #[error("tensor name {name:?} is {len} bytes long (ggml allows at most 63)")]
    NameTooLong {
        /// The name.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// Two tensors with the same name.
    #[error("duplicate tensor name {name:?}")]
    DuplicateTensor {
        /// The name.
        name: String,
    },
    /// A tensor whose data offset is not where ggml requires it (dense, in info order, each padded).
    #[error("tensor {name:?} has data offset {found}, expected {expected} (tensors must be stored densely in order)")]
    TensorOffset {
        /// The tensor.
        name: String,
        /// Offset required by the layout.
        expected: u64,
        /// Offset in the file.
        found: u64,
    },
    /// A tensor whose data runs past the end of the file.
    #[error("tensor {name:?} data [{start}, {end}) lies beyond the end of the file ({file_len} bytes)")]
    TensorOutOfFile {
        /// The tensor.
        name: String,
        /// Absolute start of its data.
        start: u64,
        /// Absolute end of its data.
        end: u64,
        /// File length.
        file_len: u64,
    },
    /// A LoRA pair whose rank differs from the rank a ggla header states (the scale `alpha / r` uses the header's).
    #[error(
        "tensor {tensor:?} has rank {found}, but the header states r = {header} (the scale alpha/r would be wrong)"
    )]
    RankMismatch {
        /// The tensor (the pair's `.loraA`).
        tensor: String,
        /// The header's rank.
        header: i64,
        /// The tensor's rank.
        found: u64,
    },
    /// An adapter without a single LoRA pair: nothing would be applied.
    #[error("the adapter holds no LoRA tensor pairs ({detail})")]
    NoTensors {
        /// What the file holds instead.
        detail: String,
    },
    /// A quantized tensor of a legacy model whose block layout changed after the file's container version, so its
    /// bytes cannot be copied into a GGUF as they are.
    #[error(
        "tensor {name:?} is {ty} in a {container} file, but {ty}'s block layout changed in {changed_in} and this \
         file predates that: its bytes cannot be read as {ty} today; convert the model again from its f16/f32 \
         weights with a current llama.cpp (or find it as ggjt v3 or GGUF)"
    )]
    LegacyLayoutChanged {
        /// The tensor (its legacy name).
        name: String,
        /// Its type.
        ty: GgmlType,
        /// The container and version, e.g. "ggjt v2".
        container: String,
        /// The container version that changed the layout.
        changed_in: &'static str,
    },
    /// A safetensors file refused by the `safetensors` crate or by the checks [`crate::peft_weights`] adds.
    #[error("{0}")]
    Safetensors(SafetensorsProblem),
    /// Anything else, described in words.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Attaches the file path to an error, unless it already names one.
    pub fn in_file(self, path: impl Into<PathBuf>) -> Error {
        match self {
            Error::Io { .. } | Error::InFile { .. } | Error::NotRegularFile { .. } => self,
            other => Error::InFile { path: path.into(), source: Box::new(other) },
        }
    }

    /// The innermost error, past any [`Error::InFile`] wrappers (used to choose a Python exception class).
    pub fn root(&self) -> &Error {
        match self {
            Error::InFile { source, .. } | Error::InTensor { source, .. } => source.root(),
            other => other,
        }
    }

    /// Shorthand for an I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }
}

/// Why a model, a base and adapters cannot be patched together. Each names the files and tensors involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Incompatible {
    /// `general.architecture` differs between two inputs.
    #[error("architecture mismatch: {model_file} is {model:?} but {other_file} is {other:?}")]
    Architecture {
        /// The model file.
        model_file: String,
        /// Its architecture.
        model: String,
        /// The other file (base or adapter).
        other_file: String,
        /// Its architecture.
        other: String,
    },
    /// A tensor needed from a file is not in it.
    #[error("{file} has no tensor {name:?} ({needed_by})")]
    MissingTensor {
        /// The file that lacks it.
        file: String,
        /// The tensor name.
        name: String,
        /// Why it is needed.
        needed_by: String,
    },
    /// Two tensors that must have the same shape do not.
    #[error(
        "shape mismatch for {name:?}: {expected_what} is {expected:?} but {found_what} is {found:?} (numpy order)"
    )]
    Shape {
        /// The tensor.
        name: String,
        /// What the expected shape comes from.
        expected_what: String,
        /// Expected shape.
        expected: Vec<u64>,
        /// What the found shape comes from.
        found_what: String,
        /// Found shape.
        found: Vec<u64>,
    },
    /// Patched tensors whose output type this project cannot quantize (it may still read that type).
    #[error(
        "cannot write the patched tensors in their output type: this project cannot quantize to {types} ({tensors}); \
         choose an output type for these tensors that it can write ({writable}; q8_0 loses the least of the \
         quantized ones)"
    )]
    CannotQuantize {
        /// The unwritable types, comma-separated ("iq4_nl, iq2_xs").
        types: String,
        /// The tensors by type: "iq4_nl: a, b; iq2_xs: c" (long lists end with "and N more").
        tensors: String,
        /// The types this project can write, comma-separated.
        writable: String,
    },
    /// A patched tensor whose source type this project cannot dequantize.
    #[error(
        "cannot read tensor {name:?} of {file}: dequantizing {ty} is not supported; give a base model in \
         f16/f32/bf16/q8_0/q4_0"
    )]
    CannotDequantize {
        /// The file.
        file: String,
        /// The tensor.
        name: String,
        /// Its type.
        ty: GgmlType,
    },
    /// An adapter's user scale that is NaN or infinite.
    #[error("scale {scale} for adapter {adapter} is not finite")]
    Scale {
        /// The adapter's source.
        adapter: String,
        /// The scale given.
        scale: f32,
    },
    /// An intermediate rounding type other than f32, f16 or bf16.
    #[error("intermediate type must be f32, f16 or bf16, not {ty}")]
    IntermediateType {
        /// The type given.
        ty: GgmlType,
    },
    /// A per-tensor output type pattern that is not a regular expression.
    #[error("tensor type pattern {pattern:?} is not a valid regular expression: {reason}")]
    TensorTypePattern {
        /// The pattern.
        pattern: String,
        /// The regex compiler's explanation.
        reason: String,
    },
    /// A keep-LoRA share outside 0..=1.
    #[error("the share of the LoRA change to keep must be between 0 and 1, not {share}")]
    KeepShare {
        /// The share given.
        share: f64,
    },
    /// A tensor patched by a DoRA adapter and by other adapters in the same run.
    #[error(
        "tensor {tensor:?} is patched by a DoRA adapter and other adapters ({adapters}): DoRA rescales the whole \
         merged row, so it must be the only adapter on a tensor; patch in two runs"
    )]
    DoraNotAlone {
        /// The tensor.
        tensor: String,
        /// The adapters on it, comma-separated.
        adapters: String,
    },
    /// A patched tensor whose row length is not a whole number of its output type's blocks.
    #[error("tensor {tensor:?}: row length {row_len} is not a multiple of the {ty} block size {block}")]
    RowLength {
        /// The tensor.
        tensor: String,
        /// Its row length (ggml `ne[0]`).
        row_len: u64,
        /// Its output type.
        ty: GgmlType,
        /// That type's block size.
        block: usize,
    },
    /// An importance matrix none of whose entries names a tensor of the model.
    #[error("importance matrix {source_name}: none of its {entries} entries names a tensor of {model} (is it for another model?)")]
    ImatrixForAnotherModel {
        /// Where the importance matrix came from.
        source_name: String,
        /// Its number of entries.
        entries: usize,
        /// The model file.
        model: String,
    },
    /// An importance-matrix entry for a patched tensor without one weight per column.
    #[error(
        "importance matrix {source_name}: entry {tensor:?} has {found} weights, expected {expected} (one per column \
         of the tensor)"
    )]
    ImatrixEntryLength {
        /// Where the importance matrix came from.
        source_name: String,
        /// The tensor (the entry's name).
        tensor: String,
        /// Weights in the entry.
        found: usize,
        /// The tensor's row length.
        expected: u64,
    },
    /// The output path is one of the inputs.
    #[error("refusing to write the output onto an input file: {path}")]
    OutputIsInput {
        /// The path.
        path: String,
    },
    /// An output name that cannot be used for the output's shards (or a shard name for a single file).
    #[error("output {path}: {reason}")]
    OutputName {
        /// The name given.
        path: String,
        /// Why it cannot be used and what to give instead.
        reason: String,
    },
    /// Anything else, in words.
    #[error("{0}")]
    Other(String),
}

/// Why an importance matrix cannot be used. Each names the entry (the weight tensor) or the key involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BadImatrix {
    /// A GGUF file whose `general.type` says it is something else (e.g. a model given by mistake).
    #[error("general.type is {found:?}, expected \"imatrix\" (is this a model rather than an importance matrix?)")]
    NotImatrix {
        /// The `general.type` found (its type name when it is not a string).
        found: String,
    },
    /// One of the metadata keys `llama-imatrix` always writes (and `llama-quantize` requires) is missing.
    #[error("metadata key {key} is missing (llama-quantize refuses an imatrix GGUF without it)")]
    MissingKey {
        /// The key.
        key: &'static str,
    },
    /// A metadata key of the wrong type.
    #[error("metadata key {key} is {found}, expected {expected}")]
    KeyType {
        /// The key.
        key: &'static str,
        /// The type required.
        expected: &'static str,
        /// The type found.
        found: String,
    },
    /// A file without a single entry.
    #[error("no entries ({detail})")]
    NoEntries {
        /// What the file holds instead.
        detail: String,
    },
    /// An `<name>.in_sum2` tensor without its `<name>.counts` or the reverse.
    #[error("entry {name:?} has a tensor {present:?} but no {missing:?}")]
    Unpaired {
        /// The entry (weight tensor) name.
        name: String,
        /// The tensor that is there.
        present: String,
        /// The tensor that is not.
        missing: String,
    },
    /// A tensor name holding a NUL byte (ggml would cut the name there, so no weight could ever match it).
    #[error("tensor name {tensor:?} holds a NUL byte")]
    NulInName {
        /// The name.
        tensor: String,
    },
    /// An `.in_sum2` or `.counts` tensor that is not f32.
    #[error("tensor {tensor:?} is {ty}, expected f32")]
    TensorType {
        /// The tensor.
        tensor: String,
        /// Its type.
        ty: GgmlType,
    },
    /// An entry whose number of sums is not a multiple of its number of counts (one count per expert).
    #[error(
        "entry {name:?}: {sums} sums (in_sum2 shape {sums_shape:?}) do not divide into {counts} counts \
         (counts shape {counts_shape:?}); expected in_sum2 of shape (n, row_len) with counts of shape (n, 1)"
    )]
    Shape {
        /// The entry.
        name: String,
        /// Elements of `.in_sum2`.
        sums: u64,
        /// Its shape (numpy order).
        sums_shape: Vec<u64>,
        /// Elements of `.counts`.
        counts: u64,
        /// Its shape (numpy order).
        counts_shape: Vec<u64>,
    },
    /// A count (GGUF `.counts` element) that is negative, not finite, or too large for llama-quantize's int64.
    #[error("entry {name:?}: count {index} is {value}, expected a finite number >= 0")]
    BadCount {
        /// The entry.
        name: String,
        /// Index of the count (the expert).
        index: usize,
        /// The value found.
        value: f32,
    },
    /// A weight that is negative or not finite after normalisation.
    #[error(
        "entry {name:?}: weight {index} is {value} after normalisation (sum {sum} / count {count}), \
         expected a finite number >= 0"
    )]
    BadWeight {
        /// The entry.
        name: String,
        /// Flat index of the weight.
        index: usize,
        /// The normalised weight.
        value: f32,
        /// The raw sum it came from.
        sum: f32,
        /// The count it was divided by (1 when none was applied).
        count: f32,
    },
}

/// What is wrong with a safetensors file (see [`crate::peft_weights`] for which checks are the crate's).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SafetensorsProblem {
    /// The 8-byte header length is missing, over the crate's 100 MB limit, or beyond the end of the file.
    #[error("{}", match length {
        None => format!("not a safetensors file (shorter than 8 bytes: {file_len})"),
        Some(n) => format!("header length {n} is implausible for a file of {file_len} bytes (at most 100000000 \
                            and within the file)"),
    })]
    HeaderLength {
        /// The length the file gives, if it has 8 bytes.
        length: Option<u64>,
        /// Bytes in the file.
        file_len: u64,
    },
    /// The header is not UTF-8 JSON of the expected form (too deep, a number out of range, ...): the crate's
    /// (`serde_json`'s) words, with line and column.
    #[error("{0}")]
    Header(String),
    /// One tensor name given twice (the `safetensors` crate would silently keep the last).
    #[error("safetensors header: tensor {name:?} appears twice")]
    Duplicate {
        /// The name.
        name: String,
    },
    /// One entry's own problem: a field of the wrong type, an unknown dtype name, a shape that overflows or
    /// whose bytes differ from its data range.
    #[error("tensor {name:?}: {reason}")]
    Entry {
        /// The tensor.
        name: String,
        /// What is wrong, in the crate's words.
        reason: String,
    },
    /// A dtype that LoRA factors cannot have.
    #[error("tensor {name:?} has dtype {dtype}; LoRA factors must be one of F32, F16, BF16, F64")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// More dimensions than any factor has.
    #[error("tensor {name:?} has {dims} dimensions (at most 8)")]
    TooManyDims {
        /// The tensor.
        name: String,
        /// Its number of dimensions.
        dims: usize,
    },
    /// A tensor whose data range overlaps the previous one (in offset order) or leaves a gap after it.
    #[error(
        "tensor {name:?}: data_offsets {offsets:?} {} {}, which ends at {previous_end}; tensor data must be laid \
         end to end",
        if offsets[0] < *previous_end { "overlap" } else { "leave a gap after" },
        previous.as_ref().map_or("the start of the data".to_owned(), |p| format!("tensor {p:?}"))
    )]
    Offsets {
        /// The tensor.
        name: String,
        /// Its `[begin, end]`, relative to the data section.
        offsets: [u64; 2],
        /// The tensor before it in offset order, if any.
        previous: Option<String>,
        /// Where that one ends (0 for the start of the data).
        previous_end: u64,
    },
    /// The tensors' data does not end where the file does.
    #[error(
        "the tensors' data ends at byte {end} of the data section but the file holds {data_len} bytes of data \
         (truncated, or bytes no tensor accounts for)"
    )]
    DataEnd {
        /// End of the last tensor's range.
        end: u64,
        /// Bytes after the header.
        data_len: u64,
    },
}

/// The facts of an error as values, for code that handles it rather than a person reading the message (the
/// Python binding sets them as attributes of the exception). Fields that do not apply are `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorDetails {
    /// A short stable slug naming the problem, e.g. `"truncated"`, `"shape_mismatch"`, `"missing_shard"`.
    pub kind: &'static str,
    /// The file at fault (the outermost file named by the error).
    pub path: Option<PathBuf>,
    /// Absolute byte offset in `path` (from the start of the file).
    pub offset: Option<u64>,
    /// The tensor at fault.
    pub tensor: Option<String>,
    /// What was expected, as text (a number, a shape, a type name...).
    pub expected: Option<String>,
    /// What was found instead, as text.
    pub found: Option<String>,
}

impl ErrorDetails {
    fn new(kind: &'static str) -> ErrorDetails {
        ErrorDetails { kind, ..ErrorDetails::default() }
    }
    fn tensor(mut self, name: &str) -> ErrorDetails {
        self.tensor.get_or_insert_with(|| name.to_owned());
        self
    }
    fn path(mut self, path: impl Into<PathBuf>) -> ErrorDetails {
        self.path.get_or_insert_with(|| path.into());
        self
    }
    fn found(mut self, found: impl ToString) -> ErrorDetails {
        self.found = Some(found.to_string());
        self
    }
    fn expected_found(mut self, expected: impl ToString, found: impl ToString) -> ErrorDetails {
        self.expected = Some(expected.to_string());
        self.found = Some(found.to_string());
        self
    }
}

impl Error {
    /// The error's facts as values (see [`ErrorDetails`]): wrappers ([`Error::InFile`], [`Error::InTensor`])
    /// contribute the file and the tensor, the innermost error the kind and the rest.
    pub fn details(&self) -> ErrorDetails {
        match self {
            Error::InFile { path, source } => {
                let mut d = source.details();
                d.path = Some(path.clone());
                d
            }
            Error::InTensor { name, source } => {
                let mut d = source.details();
                d.tensor = Some(name.clone());
                d
            }
            Error::Io { path, source } => ErrorDetails::new(io_kind(source.kind())).path(path.clone()),
            Error::NotRegularFile { path, kind, .. } => {
                ErrorDetails::new("not_regular_file").path(path.clone()).expected_found("a regular file", kind)
            }
            Error::Malformed { offset, kind, .. } => {
                let mut d = kind.details();
                d.offset = Some(*offset);
                d
            }
            Error::NonFinite { index, value, .. } => {
                ErrorDetails::new("non_finite").expected_found("finite", format!("{value} at element {index}"))
            }
            Error::Imatrix { .. } => ErrorDetails::new("imatrix_weights"),
            Error::RowLength { row_len, block, .. } => {
                ErrorDetails::new("row_length").expected_found(format!("a multiple of {block}"), row_len)
            }
            Error::BufferSize { expected, found, .. } => {
                ErrorDetails::new("buffer_size").expected_found(expected, found)
            }
            Error::UnsupportedType { ty, .. } => {
                ErrorDetails::new("unsupported_type").expected_found("a supported type", ty)
            }
            Error::InvalidMetadata { .. } => ErrorDetails::new("invalid_metadata"),
            Error::InvalidTensor { name, .. } => ErrorDetails::new("invalid_tensor").tensor(name),
            Error::Incompatible(i) => i.details(),
            Error::Cancelled(_) => ErrorDetails::new("cancelled"),
            Error::InvalidTensorInfo(m) => m.details(),
            Error::WriterState(_) => ErrorDetails::new("writer_state"),
            Error::BadImatrix(b) => b.details(),
            Error::ShardSet { shard, problem } => problem.details().path(shard.clone()),
            // The offset is within a zip member (inflated), not in the file: not an `offset` in this sense.
            Error::TorchBin { kind, .. } => kind.details(),
            Error::PatternKey { .. } => ErrorDetails::new("pattern_key"),
            Error::Factor { tensor, expected, found, .. } => {
                ErrorDetails::new("factor_shape").tensor(tensor).expected_found(expected, found)
            }
        }
    }
}

/// The kind slug of an OS error.
fn io_kind(kind: io::ErrorKind) -> &'static str {
    match kind {
        io::ErrorKind::NotFound => "not_found",
        io::ErrorKind::PermissionDenied => "permission_denied",
        io::ErrorKind::AlreadyExists => "already_exists",
        io::ErrorKind::IsADirectory => "is_a_directory",
        io::ErrorKind::StorageFull => "storage_full",
        _ => "os_error",
    }
}

impl Malformed {
    fn details(&self) -> ErrorDetails {
        use Malformed as M;
        match self {
            M::BadMagic { found, expected } => {
                ErrorDetails::new("bad_magic").expected_found(expected, format!("{found:02x?}"))
            }
            M::BigEndian { .. } => ErrorDetails::new("big_endian"),
            M::UnsupportedVersion { version, .. } => {
                ErrorDetails::new("unsupported_version").expected_found("a supported version", version)
            }
            M::Truncated { needed, available, .. } => {
                ErrorDetails::new("truncated").expected_found(format!("{needed} bytes"), format!("{available} bytes"))
            }
            M::TooMany { count, limit, .. } => {
                ErrorDetails::new("too_many").expected_found(format!("at most {limit}"), count)
            }
            M::InvalidUtf8 { .. } => ErrorDetails::new("invalid_utf8"),
            M::EmptyKey => ErrorDetails::new("empty_key"),
            M::DuplicateKey { .. } => ErrorDetails::new("duplicate_key"),
            M::UnknownValueType { id, .. } => {
                ErrorDetails::new("unknown_value_type").expected_found("a GGUF value type", id)
            }
            M::InvalidBool { value, .. } => ErrorDetails::new("invalid_bool").expected_found("0 or 1", value),
            M::BadAlignment { .. } => ErrorDetails::new("bad_alignment"),
            M::BadDimCount { name, n_dims } => {
                ErrorDetails::new("bad_dim_count").tensor(name).expected_found("1 to 4", n_dims)
            }
            M::ZeroDim { name, .. } => ErrorDetails::new("zero_dim").tensor(name),
            M::SizeOverflow { name, .. } => ErrorDetails::new("size_overflow").tensor(name),
            M::UnknownTensorType { name, id } => {
                ErrorDetails::new("unknown_tensor_type").tensor(name).expected_found("a ggml type id", id)
            }
            M::RowNotBlockMultiple { name, row_len, block, .. } => {
                ErrorDetails::new("row_length").tensor(name).expected_found(format!("a multiple of {block}"), row_len)
            }
            M::NameTooLong { name, len } => {
                ErrorDetails::new("name_too_long").tensor(name).expected_found("at most 63 bytes", len)
            }
            M::DuplicateTensor { name } => ErrorDetails::new("duplicate_tensor").tensor(name),
            M::TensorOffset { name, expected, found } => {
                ErrorDetails::new("tensor_offset").tensor(name).expected_found(expected, found)
            }
            M::TensorOutOfFile { name, end, file_len, .. } => {
                ErrorDetails::new("tensor_out_of_file").tensor(name).expected_found(format!("at most {file_len}"), end)
            }
            M::RankMismatch { tensor, header, found } => {
                ErrorDetails::new("rank_mismatch").tensor(tensor).expected_found(header, found)
            }
            M::NoTensors { .. } => ErrorDetails::new("no_tensors"),
            M::LegacyLayoutChanged { name, ty, container, .. } => ErrorDetails::new("legacy_layout_changed")
                .tensor(name)
                .expected_found(format!("{ty} in ggjt v3"), container),
            M::Safetensors(p) => p.details(),
            M::Other(_) => ErrorDetails::new("malformed"),
        }
    }
}

impl Incompatible {
    fn details(&self) -> ErrorDetails {
        use Incompatible as I;
        match self {
            I::Architecture { model, other, other_file, .. } => {
                ErrorDetails::new("architecture_mismatch").path(other_file.clone()).expected_found(model, other)
            }
            I::MissingTensor { file, name, .. } => ErrorDetails::new("missing_tensor").path(file.clone()).tensor(name),
            I::Shape { name, expected, found, .. } => ErrorDetails::new("shape_mismatch")
                .tensor(name)
                .expected_found(format!("{expected:?}"), format!("{found:?}")),
            I::CannotQuantize { writable, types, .. } => {
                ErrorDetails::new("cannot_quantize").expected_found(writable, types)
            }
            I::CannotDequantize { file, name, ty } => ErrorDetails::new("cannot_dequantize")
                .path(file.clone())
                .tensor(name)
                .expected_found("a readable type", ty),
            I::Scale { scale, .. } => ErrorDetails::new("bad_scale").expected_found("a finite scale", scale),
            I::IntermediateType { ty } => ErrorDetails::new("intermediate_type").expected_found("f32, f16 or bf16", ty),
            I::TensorTypePattern { pattern, .. } => {
                ErrorDetails::new("tensor_type_pattern").expected_found("a regular expression", pattern)
            }
            I::KeepShare { share } => ErrorDetails::new("keep_share").expected_found("a share in 0..1", share),
            I::DoraNotAlone { tensor, .. } => ErrorDetails::new("dora_not_alone").tensor(tensor),
            I::RowLength { tensor, row_len, ty, block } => ErrorDetails::new("row_length")
                .tensor(tensor)
                .expected_found(format!("a multiple of {block} ({ty})"), row_len),
            I::ImatrixForAnotherModel { source_name, .. } => {
                ErrorDetails::new("imatrix_for_another_model").path(source_name.clone())
            }
            I::ImatrixEntryLength { source_name, tensor, found, expected } => ErrorDetails::new("imatrix_entry_length")
                .path(source_name.clone())
                .tensor(tensor)
                .expected_found(expected, found),
            I::OutputIsInput { path } => ErrorDetails::new("output_is_input").path(path.clone()),
            I::OutputName { path, .. } => ErrorDetails::new("output_name").path(path.clone()),
            I::Other(_) => ErrorDetails::new("incompatible"),
        }
    }
}

impl BadImatrix {
    fn details(&self) -> ErrorDetails {
        use BadImatrix as B;
        match self {
            B::NotImatrix { found } => ErrorDetails::new("not_imatrix").expected_found("imatrix", found),
            B::MissingKey { .. } => ErrorDetails::new("missing_key"),
            B::KeyType { expected, found, .. } => ErrorDetails::new("key_type").expected_found(expected, found),
            B::NoEntries { .. } => ErrorDetails::new("no_entries"),
            B::Unpaired { name, .. } => ErrorDetails::new("unpaired").tensor(name),
            B::NulInName { tensor } => ErrorDetails::new("nul_in_name").tensor(tensor),
            B::TensorType { tensor, ty } => ErrorDetails::new("tensor_type").tensor(tensor).expected_found("f32", ty),
            B::Shape { name, sums_shape, counts_shape, .. } => ErrorDetails::new("imatrix_shape")
                .tensor(name)
                .expected_found(format!("{sums_shape:?}"), format!("{counts_shape:?}")),
            B::BadCount { name, value, .. } => {
                ErrorDetails::new("bad_count").tensor(name).expected_found("a positive count", value)
            }
            B::BadWeight { name, value, .. } => {
                ErrorDetails::new("bad_weight").tensor(name).expected_found("a finite non-negative weight", value)
            }
        }
    }
}

impl TorchBin {
    fn details(&self) -> ErrorDetails {
        match self {
            TorchBin::Limit { found, limit, .. } => {
                ErrorDetails::new("limit").expected_found(format!("at most {limit}"), found)
            }
            TorchBin::RefusedGlobal { module, name, .. } => ErrorDetails::new("refused_global")
                .expected_found("a torch tensor-rebuild global", format!("{module}.{name}")),
            TorchBin::Pickle(_) => ErrorDetails::new("pickle"),
            TorchBin::Zip(_) => ErrorDetails::new("zip"),
            TorchBin::Tensor { tensor, .. } => ErrorDetails::new("tensor").tensor(tensor),
            TorchBin::Legacy => ErrorDetails::new("legacy_torch_format"),
            TorchBin::PlainPickle => ErrorDetails::new("plain_pickle"),
            TorchBin::OutOfMemory { bytes, .. } => ErrorDetails::new("out_of_memory").found(bytes),
        }
    }
}

impl SafetensorsProblem {
    fn details(&self) -> ErrorDetails {
        use SafetensorsProblem as P;
        match self {
            P::HeaderLength { length, file_len } => ErrorDetails::new("header_length")
                .expected_found(format!("at most {}", file_len.saturating_sub(8)), format!("{length:?}")),
            P::Header(_) => ErrorDetails::new("safetensors_header"),
            P::Duplicate { name } => ErrorDetails::new("duplicate_tensor").tensor(name),
            P::Entry { name, .. } => ErrorDetails::new("safetensors_entry").tensor(name),
            P::Dtype { name, dtype } => {
                ErrorDetails::new("tensor_dtype").tensor(name).expected_found("F32, F16, BF16 or F64", dtype)
            }
            P::TooManyDims { name, dims } => {
                ErrorDetails::new("bad_dim_count").tensor(name).expected_found("at most 8", dims)
            }
            P::Offsets { name, offsets, previous_end, .. } => {
                ErrorDetails::new("tensor_offset").tensor(name).expected_found(previous_end, offsets[0])
            }
            P::DataEnd { end, data_len } => ErrorDetails::new("data_end").expected_found(data_len, end),
        }
    }
}

impl ShardProblem {
    fn details(&self) -> ErrorDetails {
        use ShardProblem as S;
        match self {
            S::BadName { .. } => ErrorDetails::new("shard_name"),
            S::Missing { .. } => ErrorDetails::new("missing_shard"),
            S::NotAShard { .. } => ErrorDetails::new("not_a_shard"),
            S::KeyType { expected, found, .. } => ErrorDetails::new("key_type").expected_found(expected, found),
            S::MissingKey { .. } => ErrorDetails::new("missing_key"),
            S::NumberOutOfRange { no, count } => {
                ErrorDetails::new("shard_number").expected_found(format!("below {count}"), no)
            }
            S::WrongNumber { found, expected } => ErrorDetails::new("shard_number").expected_found(expected, found),
            S::CountMismatch { found, expected } => ErrorDetails::new("shard_count").expected_found(expected, found),
            S::TensorCountMismatch { found, expected } => {
                ErrorDetails::new("tensor_count").expected_found(expected, found)
            }
            S::DuplicateTensor { name, .. } => ErrorDetails::new("duplicate_tensor").tensor(name),
            S::TensorTotal { found, expected, .. } => ErrorDetails::new("tensor_count").expected_found(expected, found),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_take_the_file_from_the_wrapper_and_the_rest_from_the_innermost_error() {
        let inner = Error::Malformed {
            format: "GGUF",
            offset: 8,
            kind: Malformed::Truncated { what: "tensor count".into(), needed: 8, available: 3 },
        };
        let err = Error::InTensor { name: "blk.0.attn_q.weight".into(), source: Box::new(inner) }.in_file("m.gguf");
        let d = err.details();
        assert_eq!(d.kind, "truncated");
        assert_eq!(d.path.as_deref(), Some(std::path::Path::new("m.gguf")));
        assert_eq!(d.offset, Some(8));
        assert_eq!(d.tensor.as_deref(), Some("blk.0.attn_q.weight"));
        assert_eq!((d.expected.as_deref(), d.found.as_deref()), (Some("8 bytes"), Some("3 bytes")));
    }

    #[test]
    fn shape_and_shard_details() {
        let shape = Error::Incompatible(Incompatible::Shape {
            name: "w".into(),
            expected_what: "model".into(),
            expected: vec![4, 8],
            found_what: "adapter".into(),
            found: vec![4, 9],
        });
        let d = shape.details();
        assert_eq!((d.kind, d.tensor.as_deref()), ("shape_mismatch", Some("w")));
        assert_eq!((d.expected.as_deref(), d.found.as_deref()), (Some("[4, 8]"), Some("[4, 9]")));
        assert_eq!(d.offset, None);
        let shard = Error::ShardSet {
            shard: "m-00002-of-00003.gguf".into(),
            problem: ShardProblem::Missing { no: 1, count: 3 },
        };
        let d = shard.details();
        assert_eq!((d.kind, d.path.as_deref()), ("missing_shard", Some(std::path::Path::new("m-00002-of-00003.gguf"))));
    }
}
