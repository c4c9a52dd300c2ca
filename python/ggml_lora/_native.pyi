"""Type stubs of the Rust extension ``ggml_lora._native`` (checked against it by the tests)."""

from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, final

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
    "WeightInfo",
    "PeftWeights",
    "PatternKeys",
    "GGUFFile",
    "write_gguf",
    "GGUFStreamWriter",
    "copy_model",
    "read_imatrix",
    "quantize_rows",
    "dequantize_rows",
    "type_table",
    "Adapter",
    "patch",
    "TensorReport",
    "__version__",
]

__version__: str

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
    def shards(self) -> list[tuple[Path, int]]:
        """The model's files in shard order, as ``(path, number of tensors)``."""
    def metadata(self) -> list[tuple[str, str, str | None, Any]]:
        """Metadata as ``(key, type name, element type name or None, value)`` tuples in file order."""
    def tensors(self) -> list[tuple[str, list[int], str, int, int, int]]:
        """Tensor infos as ``(name, dims in ggml order, type name, absolute data offset in its file, nbytes,
        shard)`` in model order."""
    def raw(self, index: int) -> npt.NDArray[np.uint8]:
        """The raw bytes of tensor ``index`` as a read-only uint8 array viewing the memory map (no copy)."""
    def to_numpy(self, index: int) -> npt.NDArray[np.float32]:
        """Tensor ``index`` dequantized to a flat float32 array."""

def write_gguf(
    path: str | PathLike[str],
    metadata: list[tuple[str, str, str | None, Any]],
    tensors: list[tuple[str, list[int], str, npt.NDArray[np.uint8]]],
    sync: bool = True,
    written: list[str] | None = None,
) -> str:
    """Writes a GGUF file atomically. ``metadata``: ``(key, type name, element type name or None, value)``;
    ``tensors``: ``(name, dims in ggml order, type name, C-contiguous uint8 data)``; ``written`` gets the path
    appended once it is in place."""

@final
class GGUFStreamWriter:
    """A GGUF file whose tensor data is streamed in, in chunks of any size: for files larger than memory. The
    header is written by the constructor; nothing appears under ``path`` before ``finish``, and a writer dropped
    or aborted unfinished leaves no file behind."""

    def __new__(
        cls,
        path: str | PathLike[str],
        metadata: list[tuple[str, str, str | None, Any]],
        tensors: list[tuple[str, list[int], str]],
        sync: bool = True,
    ) -> GGUFStreamWriter: ...
    def tensors(self) -> list[tuple[str, int]]:
        """``(name, data bytes)`` of every tensor, in the order their data is expected."""
    def current_tensor(self) -> int:
        """Index of the tensor whose data comes next (the number of tensors once all are complete)."""
    def write_data(self, chunk: npt.NDArray[np.uint8]) -> None:
        """Appends the bytes of ``chunk`` (C-contiguous uint8) to the data, tensor after tensor."""
    def finish(self, written: list[str] | None = None) -> Path:
        """Checks every tensor is complete, flushes and renames the file into place; returns its path, also
        appended to ``written``. The writer is closed whatever the outcome."""
    def abort(self) -> None:
        """Drops the unfinished file (its temporary file is removed); nothing is written under ``path``."""

def read_imatrix(
    path: str | PathLike[str],
) -> tuple[str, list[tuple[str, npt.NDArray[np.float32]]], list[str], int, bool]:
    """Reads and normalises the importance matrix at ``path`` (llama-imatrix's GGUF or legacy ``.dat``); returns
    ``(source, [(name, float32 weights)], datasets, chunk_count, legacy)``."""
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
def type_table() -> list[tuple[str, int, int, int, bool, bool]]:
    """Every ggml type as ``(name, id, block size, bytes per block, can quantize, can dequantize)``."""
def copy_model(
    model: str | PathLike[str],
    out: str | PathLike[str],
    *,
    split: tuple[str, int] | None = None,
    extra_metadata: list[tuple[str, str, str | None, Any]] = ...,
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
    def pairs(self) -> list[tuple[str, int, int, int, float, bool]]:
        """``(target tensor, rows, cols, rank, scale at user scale 1, DoRA)`` per pair."""

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
    extra_metadata: list[tuple[str, str, str | None, Any]] = ...,
    progress: Callable[[int, int, str, int, int], object] | None = None,
    tensor_types: list[tuple[str, str]] = ...,
    imatrix: tuple[str, list[tuple[str, list[float]]]] | None = None,
    keep_lora: float | None = None,
    split: tuple[str, int] | None = None,
    written: list[str] | None = None,
) -> tuple[list[Path], list[TensorReport], int, int, float, list[str]]:
    """Runs a patch; returns ``(output paths in shard order, per-tensor reports, tensors copied, bytes written,
    seconds, notes)``. ``written`` gets the output paths appended as soon as they are in place."""

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
