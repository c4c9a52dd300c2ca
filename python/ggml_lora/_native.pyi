"""Type stubs of the Rust extension ``ggml_lora._native`` (checked against it by the tests)."""

from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from .convert.core import PeftPlan

__all__ = [
    "GGUFError",
    "PatchError",
    "SpecialFileError",
    "check_output_path",
    "check_input_path",
    "read_torch_bin",
    "write_ggla",
    "refuse_output_onto_inputs",
    "peft_scale",
    "llama_scale",
    "WeightInfo",
    "PeftWeights",
    "PatternKeys",
    "GGUFFile",
    "TensorInfo",
    "Shard",
    "SplitRule",
    "MetadataField",
    "TensorSpec",
    "write_gguf",
    "GGUFStreamWriter",
    "copy_model",
    "read_imatrix",
    "ImatrixData",
    "quantize_rows",
    "dequantize_rows",
    "type_table",
    "TypeInfo",
    "Adapter",
    "LoraPair",
    "patch",
    "TensorReport",
    "PatchNote",
    "PatchOutcome",
    "PatchProgress",
    "__version__",
]

__version__: str

class _TypedValue(Protocol):
    """What crosses the seam for a metadata value, Python → core: any object with these attributes (the package's
    ``MetadataValue``, whose types are a ``GGUFValueType`` ``IntEnum``)."""

    @property
    def value(self) -> Any:
        """int, float, bool, str or bytes (STRING), or a sequence of them (ARRAY)."""
    @property
    def type(self) -> int:
        """The GGUF value type id, as gguf-py's ``GGUFValueType`` numbers them (4 = UINT32, 9 = ARRAY, ...)."""
    @property
    def sub_type(self) -> int | None:
        """For an ARRAY, the element type id (nested arrays cannot be written); else ``None``."""

class _Details:
    """The facts every exception raised by the core carries, as attributes (``None`` where they do not apply);
    OSError subclasses from the core carry them too."""

    #: A short stable slug naming the problem: ``"truncated"``, ``"bad_magic"``, ``"shape_mismatch"``,
    #: ``"missing_tensor"``, ``"missing_shard"``, ``"not_found"``, ...
    kind: str | None
    #: The file at fault.
    path: str | None
    #: Absolute byte offset in ``path`` (from the start of the file), for malformed files.
    offset: int | None
    #: The tensor at fault.
    tensor: str | None
    #: What was expected, as text (a number, a shape, a type name, ...).
    expected: str | None
    #: What was found instead, as text.
    found: str | None

class GGUFError(_Details, ValueError):
    """A malformed GGUF (or other model/adapter) file; the message names the file, byte offset and problem."""

class PatchError(_Details, ValueError):
    """Inputs that cannot be patched together; raised before anything is written."""

class SpecialFileError(_Details, ValueError):
    """A device, FIFO or socket where a regular file is needed; raised before anything is read or written."""

def check_output_path(path: str | PathLike[str]) -> None:
    """Refuses an output path that names a device, FIFO, socket (``SpecialFileError``) or directory
    (``IsADirectoryError``); a regular file or a new name passes."""
def check_input_path(path: str | PathLike[str]) -> None:
    """Refuses, without opening it, an input path that names a device, FIFO, socket (``SpecialFileError``) or
    directory (``IsADirectoryError``); a regular file or a missing path passes."""
def read_torch_bin(path: str | PathLike[str]) -> list[tuple[str, str, list[int], npt.NDArray[np.uint8]]]:
    """Reads the torch ``.bin`` state dict at ``path`` without executing anything (bounded pickle and zip readers);
    returns ``(name, numpy dtype name, shape, little-endian bytes)`` per tensor in file order (bfloat16 widened
    to float32)."""
def write_ggla(
    path: str | PathLike[str],
    adapter: Adapter,
    a_as_f16: bool,
    written: list[str] | None = None,
) -> Path:
    """Writes ``adapter`` as a legacy ggla file, atomically: per pair ``<target>.loraA`` = Aᵀ (f16 when
    ``a_as_f16``) and ``<target>.loraB`` = B, with llama.cpp's scale in the header when it can carry it and folded
    into B otherwise; the path is appended to ``written`` once it is in place."""
def refuse_output_onto_inputs(out: str | PathLike[str], inputs: Sequence[str | PathLike[str]]) -> None:
    """Refuses (``PatchError``, kind ``output_is_input``) an output path that names one of ``inputs`` (the same
    file, by device and inode, or the same path): the project's one output-is-input check."""
def peft_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scale of one module: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r`` (the core's one scale rule)."""

def llama_scale(alpha: float, rank: int, user_scale: float) -> float:
    """llama.cpp's scale of a pair, in f32: ``user_scale * alpha / rank``, or ``user_scale`` when alpha is 0."""

@final
class WeightInfo:
    """One tensor of a PEFT weights file."""
    @property
    def name(self) -> str:
        """The state-dict key."""
    @property
    def dtype(self) -> str:
        """``"F32"``, ``"F16"``, ``"BF16"``, ``"F64"``, or torch's name of a non-floating type (``.bin`` only)."""
    @property
    def shape(self) -> list[int]:
        """Shape, numpy order."""

@final
class PeftWeights:
    """A PEFT adapter's weights file, open in the core: ``adapter_model.safetensors`` memory-mapped and validated
    by the ``safetensors`` crate (only its header read), or a torch ``.bin`` materialised. Tensor values are read
    by the adapters built from it (:meth:`Adapter.from_peft`), one pair at a time."""
    @staticmethod
    def open_safetensors(path: str | PathLike[str]) -> PeftWeights:
        """Maps and validates a safetensors file; refusals are ``GGUFError`` naming the file and tensor."""
    @staticmethod
    def open_torch_bin(path: str | PathLike[str]) -> PeftWeights:
        """Reads a torch ``.bin`` state dict without executing anything."""
    @property
    def path(self) -> Path:
        """The file."""
    @property
    def tensors(self) -> list[WeightInfo]:
        """The tensors, in the file's order."""

@final
class PatternKeys:
    """PEFT ``rank_pattern`` / ``alpha_pattern`` keys compiled for linear-time matching (Rust's ``regex``); a key
    the matcher cannot run exactly as Python's ``re`` would raises ``ValueError`` naming it."""
    def __new__(cls, keys: Sequence[str]) -> PatternKeys: ...
    def first_match(self, module: str) -> int | None:
        """The index of the key PEFT's ``get_pattern_key`` chooses for ``module`` (first key, in order, that
        matches), or ``None``."""

@final
class GGUFFile:
    """An open, memory-mapped model: one GGUF file, a split model opened from any shard, or a legacy GGML/GGJT file."""
    def __new__(cls, path: str | PathLike[str]) -> GGUFFile: ...
    @property
    def version(self) -> int:
        """GGUF version (2 or 3) of the (first) file; a legacy file's container version."""
    @property
    def alignment(self) -> int:
        """Data alignment in bytes (of the first file)."""
    @property
    def data_offset(self) -> int:
        """Absolute byte offset of the (first) file's data section."""
    @property
    def file_size(self) -> int:
        """Bytes of all the model's files."""
    @property
    def container(self) -> str:
        """The container, e.g. ``"GGUF v3"``, ``"GGUF v3, split into 3 shards"``, ``"legacy ggjt v3"``."""
    def shards(self) -> list[Shard]:
        """The model's files in shard order."""
    def metadata(self) -> list[MetadataField]:
        """Metadata in file order, each key with its exact type."""
    def tensors(self) -> list[TensorInfo]:
        """Where each tensor lives and what it holds, in model order."""
    def raw(self, index: int) -> npt.NDArray[np.uint8]:
        """The raw bytes of tensor ``index`` as a read-only uint8 array viewing the memory map (no copy)."""
    def to_numpy(self, index: int) -> npt.NDArray[np.float32]:
        """Tensor ``index`` dequantized to a flat float32 array."""

@final
class TensorInfo:
    """Where a tensor of a model lives and what it holds (the public ``ggml_lora.TensorInfo``). ``offset`` is
    absolute, from the start of the tensor's file, like every offset this package reports; the GGUF header
    stores it relative to the data section (the core's ``relative_offset``)."""
    def __new__(
        cls, name: str, shape: Sequence[int], type: str, offset: int, nbytes: int, shard: int = 0
    ) -> TensorInfo: ...
    @property
    def name(self) -> str:
        """The tensor's name."""
    @property
    def shape(self) -> tuple[int, ...]:
        """Dimensions in numpy order: ``shape[-1]`` is ggml's ne[0], the row length."""
    @property
    def dims(self) -> tuple[int, ...]:
        """Dimensions in ggml order (ne[0] first)."""
    @property
    def type(self) -> str:
        """The ggml type's lower-case name (``"f16"``, ``"q4_k"``, ...)."""
    @property
    def offset(self) -> int:
        """Absolute byte offset of the tensor's data in its file (the shard ``shard``)."""
    @property
    def nbytes(self) -> int:
        """Bytes of data (without padding)."""
    @property
    def shard(self) -> int:
        """Index of the file holding the tensor in ``GGUFFile.shards`` (0 unless the model is split)."""
    @property
    def n_elements(self) -> int:
        """Number of elements."""

@final
class SplitRule:
    """How an output is divided into shards; made by the named constructors. Equal rules compare equal."""
    @staticmethod
    def keep() -> SplitRule:
        """As the model is: the same shards, each tensor in the same shard."""
    @staticmethod
    def merge() -> SplitRule:
        """One file."""
    @staticmethod
    def max_tensors(n: int) -> SplitRule:
        """At most ``n`` tensors per shard (``llama-gguf-split --split-max-tensors``)."""
    @staticmethod
    def max_bytes(n: int) -> SplitRule:
        """At most ``n`` bytes of tensor data per shard (``llama-gguf-split --split-max-size``)."""
    @property
    def kind(self) -> str:
        """``"keep"``, ``"merge"``, ``"max_tensors"`` or ``"max_bytes"``."""
    @property
    def limit(self) -> int | None:
        """The limit of ``max_tensors``/``max_bytes`` (None for the others)."""

@final
class Shard:
    """One file of a model: its path and how many of the model's tensors it holds."""
    @property
    def path(self) -> Path:
        """The file."""
    @property
    def n_tensors(self) -> int:
        """Number of tensors in it."""

@final
class MetadataField:
    """One metadata key of a file, with its exact GGUF type (core → Python; the package makes a
    ``MetadataValue`` of it)."""
    @property
    def key(self) -> str:
        """The key."""
    @property
    def type(self) -> int:
        """The value's type as gguf-py's ``GGUFValueType`` id (4 = UINT32, 8 = STRING, 9 = ARRAY, ...)."""
    @property
    def sub_type(self) -> int | None:
        """For an ARRAY, the type id of its elements (9 for nested arrays); ``None`` for scalars."""
    @property
    def value(self) -> Any:
        """int, float, bool, str (bytes when not UTF-8), or a list of those (lists of lists for nested arrays)."""

@final
class TensorSpec:
    """A tensor to be written (Python → core): name, shape in numpy order and ggml type. Nothing is checked until a
    writer receives it, except that the type exists."""
    def __new__(cls, name: str, shape: Sequence[int], type: str) -> TensorSpec: ...
    @property
    def name(self) -> str:
        """The tensor's name."""
    @property
    def shape(self) -> tuple[int, ...]:
        """Dimensions in numpy order."""
    @property
    def type(self) -> str:
        """The ggml type's lower-case name."""
    @property
    def nbytes(self) -> int:
        """Bytes of data the tensor takes (without padding); ``ValueError`` if its shape and type are invalid."""

def write_gguf(
    path: str | PathLike[str],
    metadata: Mapping[str, _TypedValue],
    tensors: Sequence[TensorSpec],
    data: Sequence[npt.NDArray[np.uint8]],
    sync: bool = True,
    written: list[str] | None = None,
) -> str:
    """Writes a GGUF file atomically. ``metadata``: key → typed value, in order; ``tensors`` in data order, ``data``
    for each the C-contiguous uint8 array of its exact bytes; ``written`` gets the path appended once it is in
    place."""

@final
class GGUFStreamWriter:
    """A GGUF file whose tensor data is streamed in, in chunks of any size: for files larger than memory. The
    header is written by the constructor; nothing appears under ``path`` before ``finish``, and a writer dropped
    or aborted unfinished leaves no file behind."""

    def __new__(
        cls,
        path: str | PathLike[str],
        metadata: Mapping[str, _TypedValue],
        tensors: Sequence[TensorSpec],
        sync: bool = True,
    ) -> GGUFStreamWriter: ...
    def tensors(self) -> list[TensorSpec]:
        """Every tensor, in the order its data is expected."""
    def current_tensor(self) -> int:
        """Index of the tensor whose data comes next (the number of tensors once all are complete)."""
    def write_data(self, chunk: npt.NDArray[np.uint8]) -> None:
        """Appends the bytes of ``chunk`` (C-contiguous uint8) to the data, tensor after tensor."""
    def finish(self, written: list[str] | None = None) -> Path:
        """Checks every tensor is complete, flushes and renames the file into place; returns its path, also
        appended to ``written``. The writer is closed whatever the outcome."""
    def abort(self) -> None:
        """Drops the unfinished file (its temporary file is removed); nothing is written under ``path``."""

@final
class ImatrixData:
    """An importance matrix as read and normalised by the core."""
    @property
    def source(self) -> str:
        """The path read."""
    @property
    def entries(self) -> dict[str, npt.NDArray[np.float32]]:
        """Tensor name → float32 weights, in name order."""
    @property
    def datasets(self) -> list[str]:
        """The dataset names the file records."""
    @property
    def chunk_count(self) -> int:
        """Chunks it was computed on (0 when the file does not say)."""
    @property
    def legacy(self) -> bool:
        """Whether it is a legacy ``.dat`` file (else GGUF)."""

def read_imatrix(path: str | PathLike[str]) -> ImatrixData:
    """Reads and normalises the importance matrix at ``path`` (llama-imatrix's GGUF or legacy ``.dat``)."""
def quantize_rows(
    x: npt.NDArray[np.float32],
    type_name: str,
    row_len: int,
    out: npt.NDArray[np.uint8] | None = None,
    imatrix: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.uint8]:
    """Quantizes a C-contiguous float32 array, rows of ``row_len``, to ggml ``type_name`` bytes (rows in parallel);
    into ``out`` when given, else a new array; ``imatrix`` one weight per column."""
def dequantize_rows(
    data: npt.NDArray[np.uint8], type_name: str, row_len: int, out: npt.NDArray[np.float32] | None = None
) -> npt.NDArray[np.float32]:
    """Dequantizes rows of ``row_len`` elements of ``type_name`` to float32; into ``out`` when given, else a new
    array."""
@final
class TypeInfo:
    """One ggml type (the public ``ggml_lora.TypeInfo``): what it is on disk and what this package can do with it."""
    @property
    def name(self) -> str:
        """Lower-case name as gguf-py spells it (``"f32"``, ``"q4_0"``, ``"q6_k"``, ``"iq2_xxs"``, ...)."""
    @property
    def id(self) -> int:
        """The on-disk id (``enum ggml_type``, gguf-py's ``GGMLQuantizationType`` value)."""
    @property
    def block_size(self) -> int:
        """Elements per block (1 for plain element types)."""
    @property
    def type_size(self) -> int:
        """Bytes per block."""
    @property
    def can_quantize(self) -> bool:
        """Whether ``quantize`` can write it."""
    @property
    def can_dequantize(self) -> bool:
        """Whether ``dequantize`` can read it."""

def type_table() -> list[TypeInfo]:
    """Every ggml type llama.cpp defines, in id order."""
def copy_model(
    model: str | PathLike[str],
    out: str | PathLike[str],
    *,
    split: SplitRule | None = None,
    extra_metadata: Mapping[str, _TypedValue] | None = None,
    sync: bool = True,
    written: list[str] | None = None,
) -> list[Path]:
    """Writes the model at ``model`` (any shard of a split model, or a legacy file) as GGUF with every tensor copied
    as it is, divided by ``split`` (default one file); ``extra_metadata`` adds or replaces keys. Returns the
    files written."""

@final
class Adapter:
    """A loaded LoRA adapter (GGUF, ggla, or tensors from the PEFT converter)."""
    @staticmethod
    def open(path: str | PathLike[str]) -> Adapter:
        """Loads a llama.cpp GGUF LoRA adapter or a legacy ggla file (chosen by its magic)."""
    @staticmethod
    def from_tensors(
        source: str,
        architecture: str | None,
        alpha: float,
        tensors: list[tuple[str, list[int], str, npt.NDArray[np.uint8]]],
    ) -> Adapter:
        """Builds an adapter from ``(name, dims in ggml order, type name, raw uint8 data)`` tensors in llama.cpp's
        adapter naming and layout."""
    @staticmethod
    def from_peft(weights: PeftWeights, plan: PeftPlan) -> Adapter:
        """Builds a PEFT folder's adapter from its weights and a plan (``ggml_lora.convert.core.PeftPlan``): per
        target the factor names, PEFT's r and alpha, the q/k row permutation, embedding or linear. Factor shapes
        are checked now; values are read, transformed and scaled when a pair is used."""
    def gguf_tensors(self) -> list[tuple[str, npt.NDArray[np.float32]]]:
        """Every pair in llama.cpp's GGUF adapter layout: ``<target>.lora_a`` / ``.lora_b`` (and ``.dora_m``)."""
    @property
    def source(self) -> str:
        """Where the adapter came from."""
    @property
    def architecture(self) -> str | None:
        """``general.architecture`` of the adapter, if it says."""
    @property
    def alpha(self) -> float:
        """LoRA alpha (0 = absent)."""
    @property
    def skipped(self) -> list[str]:
        """Tensors ignored as llama.cpp ignores them (1-D norm vectors)."""
    def pairs(self) -> list[LoraPair]:
        """Every pair of the adapter."""

@final
class LoraPair:
    """One LoRA pair of an adapter: the model tensor it changes, by ``scale · (left @ right)``."""
    @property
    def target(self) -> str:
        """The model tensor it patches, e.g. ``blk.0.attn_q.weight``."""
    @property
    def rows(self) -> int:
        """Rows of the patched tensor (numpy ``shape[0]``)."""
    @property
    def cols(self) -> int:
        """Columns of the patched tensor (numpy ``shape[1]``, the row length)."""
    @property
    def rank(self) -> int:
        """Inner dimension of the product."""
    @property
    def scale(self) -> float:
        """The scale applied at a user scale of 1 (``alpha / rank``, or 1 without alpha)."""
    @property
    def dora(self) -> bool:
        """Whether it is a DoRA pair (a magnitude vector rescales each row after the add)."""

def patch(
    model: str | PathLike[str],
    adapters: list[tuple[Adapter, float]],
    base: str | PathLike[str] | None,
    out: str | PathLike[str],
    *,
    out_type: str | None = None,
    intermediate: str | None = None,
    threads: int | None = None,
    sync: bool = True,
    extra_metadata: Mapping[str, _TypedValue] | None = None,
    progress: Callable[[PatchProgress], object] | None = None,
    tensor_types: list[tuple[str, str]] = ...,
    imatrix: tuple[str, list[tuple[str, list[float]]]] | None = None,
    keep_lora: float | None = None,
    split: SplitRule | None = None,
    written: list[str] | None = None,
) -> PatchOutcome:
    """Runs a patch. ``extra_metadata``: keys to add or replace in the output, as ``MetadataValue``s (read by
    attribute; types are ``GGUFValueType`` ids). ``written`` gets the output paths appended as soon as they are
    in place."""

@final
class PatchProgress:
    """Where a running patch is: tensors and output bytes done out of the totals (the progress callback's
    argument; public as ``ggml_lora.PatchProgress``)."""
    @property
    def tensors_done(self) -> int:
        """Tensors written so far (copied or patched)."""
    @property
    def tensors_total(self) -> int:
        """Tensors in the output."""
    @property
    def tensor(self) -> str:
        """The tensor being worked on (the last one written when ``tensors_done == tensors_total``)."""
    @property
    def bytes_done(self) -> int:
        """Output bytes written so far."""
    @property
    def bytes_total(self) -> int:
        """Output bytes in all."""

@final
class PatchOutcome:
    """What a finished patch did."""
    @property
    def outputs(self) -> list[Path]:
        """The output files, in shard order (one file unless the output is split)."""
    @property
    def tensors(self) -> list[TensorReport]:
        """One report per patched tensor, in file order."""
    @property
    def copied(self) -> int:
        """Tensors copied from the model unchanged."""
    @property
    def bytes_written(self) -> int:
        """Bytes written, every output file together."""
    @property
    def seconds(self) -> float:
        """Wall time of the patch, in seconds."""
    @property
    def notes(self) -> list[PatchNote]:
        """Things worth knowing about the result."""

@final
class PatchNote:
    """Something worth knowing about a finished patch that is not an error: its ``kind`` and facts, which the
    caller puts into words. Fields that do not belong to the kind are ``None`` (``tensors`` empty)."""
    @property
    def kind(self) -> str:
        """``"imatrix_missing_entries"``: the importance matrix given has no entry for ``tensors`` (patched, with
        output types that take one), which are quantized without; ``"model_imatrix_not_applied"``: the model was
        quantized with an importance matrix (``file``, its ``quantize.imatrix.file``), none was given, and the
        ``requantized`` patched tensors are quantized without it."""
    @property
    def source(self) -> str | None:
        """``imatrix_missing_entries``: where the importance matrix came from."""
    @property
    def tensors(self) -> list[str]:
        """``imatrix_missing_entries``: the patched tensors it has no entry for, in file order."""
    @property
    def file(self) -> str | None:
        """``model_imatrix_not_applied``: the model's ``quantize.imatrix.file`` (``None`` when it does not say)."""
    @property
    def requantized(self) -> int | None:
        """``model_imatrix_not_applied``: how many patched tensors are requantized (output type not f32/f16/bf16)."""

@final
class TensorReport:
    """One patched tensor of a finished patch, with its quality metrics (W the source tensor, ΔW the LoRA change, Q
    the written tensor)."""
    @property
    def name(self) -> str:
        """The patched tensor."""
    @property
    def model_type(self) -> str:
        """Its type in the model."""
    @property
    def out_type(self) -> str:
        """Its type in the output."""
    @property
    def from_base(self) -> bool:
        """Whether its source values came from the base (``--lora-base``) rather than the model."""
    @property
    def n_adapters(self) -> int:
        """How many adapters changed it."""
    @property
    def relative_change(self) -> float:
        """‖ΔW‖ / ‖W‖: the size of the LoRA change relative to the tensor."""
    @property
    def retained(self) -> float:
        """⟨Q − W_model, ΔW⟩ / ‖ΔW‖²: the share of the change present in the output Q compared with the model."""
    @property
    def cosine(self) -> float:
        """cos(Q − W_src, ΔW): whether the written change points where the adapter wanted."""
    @property
    def error_ratio(self) -> float:
        """‖Q − W'‖ / ‖ΔW‖ (W' = W_src + ΔW): the requantization error relative to the change."""
    @property
    def used_imatrix(self) -> bool:
        """Whether an importance matrix weighted its quantization."""
    @property
    def promoted_from(self) -> str | None:
        """The type it would have had, when ``keep_lora`` moved it to a larger one."""
    @property
    def retained_before_promotion(self) -> float | None:
        """``retained`` in the type it would have had, when promoted."""
    @property
    def extra_bytes(self) -> int:
        """Bytes the promotion added (0 when not promoted)."""
