"""Type stubs of the Rust extension ``ggml_lora._native`` (checked against it by the tests)."""

from os import PathLike
from pathlib import Path
from typing import Any, Callable, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "GGUFError",
    "PatchError",
    "SpecialFileError",
    "check_output_path",
    "check_input_path",
    "temp_path",
    "GgufFile",
    "write_gguf",
    "GgufStreamWriter",
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

class GGUFError(ValueError):
    """A malformed GGUF (or other model/adapter) file; the message names the file, byte offset and problem."""

class PatchError(ValueError):
    """Inputs that cannot be patched together; raised before anything is written."""

class SpecialFileError(ValueError):
    """A device, FIFO or socket where a regular file is needed; raised before anything is read or written."""

def check_output_path(path: str | PathLike[str]) -> None: ...
def check_input_path(path: str | PathLike[str]) -> None: ...
def temp_path(target: str | PathLike[str]) -> Path: ...

@final
class GgufFile:
    def __new__(cls, path: str | PathLike[str]) -> GgufFile: ...
    @property
    def version(self) -> int: ...
    @property
    def alignment(self) -> int: ...
    @property
    def data_offset(self) -> int: ...
    @property
    def file_size(self) -> int: ...
    @property
    def container(self) -> str: ...
    def shards(self) -> list[tuple[Path, int]]: ...
    def metadata(self) -> list[tuple[str, str, str | None, Any]]: ...
    def tensors(self) -> list[tuple[str, list[int], str, int, int, int]]: ...
    def raw(self, index: int) -> npt.NDArray[np.uint8]: ...
    def to_numpy(self, index: int) -> npt.NDArray[np.float32]: ...

def write_gguf(
    path: str | PathLike[str],
    metadata: list[tuple[str, str, str | None, Any]],
    tensors: list[tuple[str, list[int], str, npt.NDArray[np.uint8]]],
    sync: bool = True,
    written: list[str] | None = None,
) -> str: ...
@final
class GgufStreamWriter:
    def __new__(
        cls,
        path: str | PathLike[str],
        metadata: list[tuple[str, str, str | None, Any]],
        tensors: list[tuple[str, list[int], str]],
        sync: bool = True,
    ) -> GgufStreamWriter: ...
    def tensors(self) -> list[tuple[str, int]]: ...
    def current_tensor(self) -> int: ...
    def write_data(self, chunk: npt.NDArray[np.uint8]) -> None: ...
    def finish(self, written: list[str] | None = None) -> Path: ...
    def abort(self) -> None: ...

def read_imatrix(
    path: str | PathLike[str],
) -> tuple[str, list[tuple[str, npt.NDArray[np.float32]]], list[str], int, bool]: ...
def quantize_rows(
    x: npt.NDArray[np.float32],
    type_name: str,
    row_len: int,
    out: npt.NDArray[np.uint8] | None = None,
    imatrix: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.uint8]: ...
def dequantize_rows(
    data: npt.NDArray[np.uint8], type_name: str, row_len: int, out: npt.NDArray[np.float32] | None = None
) -> npt.NDArray[np.float32]: ...
def type_table() -> list[tuple[str, int, int, int, bool, bool]]: ...
def copy_model(
    model: str | PathLike[str],
    out: str | PathLike[str],
    *,
    split: tuple[str, int] | None = None,
    extra_metadata: list[tuple[str, str, str | None, Any]] = ...,
    sync: bool = True,
    written: list[str] | None = None,
) -> list[Path]: ...

@final
class Adapter:
    @staticmethod
    def open(path: str | PathLike[str]) -> Adapter: ...
    @staticmethod
    def from_tensors(
        source: str,
        architecture: str | None,
        alpha: float,
        tensors: list[tuple[str, list[int], str, npt.NDArray[np.uint8]]],
    ) -> Adapter: ...
    @property
    def source(self) -> str: ...
    @property
    def architecture(self) -> str | None: ...
    @property
    def alpha(self) -> float: ...
    @property
    def skipped(self) -> list[str]: ...
    def pairs(self) -> list[tuple[str, int, int, int, float, bool]]: ...

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
) -> tuple[list[Path], list[TensorReport], int, int, float, list[str]]: ...

@final
class TensorReport:
    @property
    def name(self) -> str: ...
    @property
    def model_type(self) -> str: ...
    @property
    def out_type(self) -> str: ...
    @property
    def from_base(self) -> bool: ...
    @property
    def n_adapters(self) -> int: ...
    @property
    def relative_change(self) -> float: ...
    @property
    def retained(self) -> float: ...
    @property
    def cosine(self) -> float: ...
    @property
    def error_ratio(self) -> float: ...
    @property
    def used_imatrix(self) -> bool: ...
    @property
    def promoted_from(self) -> str | None: ...
    @property
    def retained_before_promotion(self) -> float | None: ...
    @property
    def extra_bytes(self) -> int: ...
