"""Reading and writing GGUF files.

``open(path)`` maps a file and parses its header in Rust; tensor bytes are zero-copy numpy views of the map.
``write(path, metadata, tensors)`` streams a new file to a temporary name and renames it into place when
complete, so a failure never leaves a partial file and never touches an existing file of the same name.
"""

from __future__ import annotations

import os
import re
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence, Union

import numpy as np
import numpy.typing as npt

from . import _native, _written
from ._types import type_info

PathLike = Union[str, "os.PathLike[str]"]


class GGUFValueType(IntEnum):
    """GGUF metadata value types, with gguf-py's names and on-disk ids."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


class MetadataValue(NamedTuple):
    """A metadata value with its exact GGUF type (and element type, for arrays).

    ``GGUFFile.fields`` returns these; pass them to :func:`write` to control the type written (plain Python
    values get gguf-py's default types: int -> INT32, float -> FLOAT32, ...).
    """

    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


#: Where a tensor lives and what it holds: ``name``; ``shape`` in numpy order (``shape[-1]`` is ggml's ne[0],
#: the row length) and ``dims`` in ggml order; ``type``, the lower-case ggml type name; ``offset``, the absolute
#: byte offset of the data in its file (like every offset this package reports, e.g. ``GGUFError.offset``; the
#: GGUF header stores it relative to the data section); ``nbytes``, its size; ``shard``, the file it is in
#: (0-based index into :attr:`GGUFFile.shards`; always 0 unless the model is split); ``n_elements``.
TensorInfo = _native.TensorInfo


class GGUFFile:
    """An open GGUF model (v2 or v3, little-endian). Use as a context manager or call :meth:`close`.

    Any shard of a split model (``name-00001-of-00003.gguf``, as ``llama-gguf-split`` writes them) opens the
    whole set as one model: the set must be complete and consistent, ``metadata`` is the first shard's without
    the ``split.*`` keys, and ``shards`` lists the files. A legacy GGML/GGMF/GGJT model (``ggml-model-q4_0.bin``)
    opens as the GGUF model ``convert_llama_ggml_to_gguf.py`` would make of it (GGUF tensor names, ``llama.*``
    and ``tokenizer.ggml.*`` metadata); ``container`` says which it was.

    Malformed files raise :class:`ggml_lora.GGUFError` naming the file, the problem and its byte offset.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._native: _native.GGUFFile | None = _native.GGUFFile(os.fspath(path))
        native = self._native
        self.version: int = native.version
        self.alignment: int = native.alignment
        self.data_offset: int = native.data_offset
        self.file_size: int = native.file_size
        #: "GGUF v3", "GGUF v3, split into 3 shards" or "legacy ggjt v3".
        self.container: str = native.container
        #: The model's files in shard order, as ``(path, number of tensors)``.
        self.shards: list[tuple[Path, int]] = [(s.path, s.n_tensors) for s in native.shards()]
        self.tensors: dict[str, TensorInfo] = {}
        self._index: dict[str, int] = {}
        for i, info in enumerate(native.tensors()):
            self.tensors[info.name] = info
            self._index[info.name] = i
        self._fields: dict[str, MetadataValue] | None = None

    def _open(self) -> _native.GGUFFile:
        if self._native is None:
            raise ValueError(f"{self.path}: file is closed")
        return self._native

    @property
    def fields(self) -> dict[str, MetadataValue]:
        """Metadata with exact types, in file order (read once, then cached)."""
        if self._fields is None:
            self._fields = {
                field.key: MetadataValue(
                    field.value,
                    GGUFValueType(field.type),
                    GGUFValueType(field.sub_type) if field.sub_type is not None else None,
                )
                for field in self._open().metadata()
            }
        return self._fields

    @property
    def metadata(self) -> dict[str, Any]:
        """Metadata as plain Python values (int, float, bool, str, list), in file order."""
        return {key: field.value for key, field in self.fields.items()}

    def _tensor_index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> npt.NDArray[np.uint8]:
        """The tensor's bytes as a read-only uint8 array viewing the file's memory map (no copy)."""
        return self._open().raw(self._tensor_index(name))

    def to_numpy(self, name: str) -> npt.NDArray[np.float32]:
        """The tensor dequantized to a float32 array of its ``shape``."""
        index = self._tensor_index(name)
        info = self.tensors[name]
        return self._open().to_numpy(index).reshape(info.shape)

    def close(self) -> None:
        """Release the file. Arrays returned by :meth:`raw` stay valid (they keep the map alive)."""
        self._native = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, version={self.version}, tensors={len(self.tensors)})"


def open(path: PathLike) -> GGUFFile:  # noqa: A001 - mirrors the builtin on purpose, like gzip.open
    """Open a model for reading (memory-mapped): a GGUF file, any shard of a split model, or a legacy GGML file."""
    return GGUFFile(path)


_SIZE = re.compile(r"^\s*(?P<n>\d+)\s*(?P<unit>[MG]?)\s*$")


def parse_split_size(size: int | str) -> int:
    """Bytes for a ``--split-max-size`` value: ``llama-gguf-split``'s ``N M`` (10^6 bytes) and ``N G`` (10^9),
    or a plain number of bytes. Must be positive."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = _SIZE.match(str(size))
        if m is None:
            raise ValueError(f"split size {size!r}: expected a number of bytes, or N followed by M (10^6 bytes) or "
                             "G (10^9 bytes), as llama-gguf-split takes it (e.g. 4G)")
        n = int(m.group("n")) * {"": 1, "M": 1000**2, "G": 1000**3}[m.group("unit")]
    if n <= 0:
        raise ValueError(f"split size {size!r} must be positive")
    return n


def split_rule(
    merge_shards: bool = False, split_max_size: int | str | None = None, split_max_tensors: int | None = None
) -> _native.SplitRule | None:
    """The engine's split rule for the output options (at most one may be given); ``None`` keeps the model's."""
    given = [name for name, value in (("merge_shards", merge_shards), ("split_max_size", split_max_size),
                                      ("split_max_tensors", split_max_tensors)) if value not in (None, False)]
    if len(given) > 1:
        raise ValueError(f"give at most one of {', '.join(given)}")
    if merge_shards:
        return _native.SplitRule.merge()
    if split_max_size is not None:
        return _native.SplitRule.max_bytes(parse_split_size(split_max_size))
    if split_max_tensors is not None:
        if isinstance(split_max_tensors, bool) or int(split_max_tensors) != split_max_tensors or split_max_tensors < 1:
            raise ValueError(f"split_max_tensors must be a positive integer, not {split_max_tensors!r}")
        return _native.SplitRule.max_tensors(int(split_max_tensors))
    return None



def convert_model(
    model: PathLike,
    out: PathLike,
    *,
    context_length: int | None = None,
    rms_eps: float | None = None,
    merge_shards: bool = True,
    split_max_size: int | str | None = None,
    split_max_tensors: int | None = None,
    sync: bool = True,
) -> list[Path]:
    """Write ``model`` as GGUF with every tensor copied as it is (no requantization); returns the files written.

    For a legacy GGML/GGMF/GGJT file this is llama.cpp's ``convert_llama_ggml_to_gguf.py``: the same tensors
    under their GGUF names and the metadata that script writes (``llama.*`` hyperparameters, the vocabulary as
    ``tokenizer.ggml.*``); ``context_length`` (default 2048) and ``rms_eps`` (default 5e-6) are its
    ``--context-length`` and ``--eps``. The KV head count is read from the attention tensors' shapes (the script
    needs ``--gqa`` for that). A split GGUF model is merged into one file by default, or re-split with
    ``split_max_size`` / ``split_max_tensors`` (as ``llama-gguf-split``); the output appears only when complete.
    """
    extra: dict[str, MetadataValue] = {}
    if context_length is not None:
        extra["llama.context_length"] = MetadataValue(int(context_length), GGUFValueType.UINT32)
    if rms_eps is not None:
        extra["llama.attention.layer_norm_rms_epsilon"] = MetadataValue(float(rms_eps), GGUFValueType.FLOAT32)
    rule = split_rule(False, split_max_size, split_max_tensors) or (
        _native.SplitRule.merge() if merge_shards else _native.SplitRule.keep())
    paths = _native.copy_model(os.fspath(model), os.fspath(out), split=rule, extra_metadata=_typed_all(extra),
                               sync=sync, written=_written.current())
    return [Path(p) for p in paths]


# ---------------------------------------------------------------------------------------------------------
# writing

_INT_TYPES = [
    (GGUFValueType.INT32, -(2**31), 2**31 - 1),
    (GGUFValueType.INT64, -(2**63), 2**63 - 1),
    (GGUFValueType.UINT64, 0, 2**64 - 1),
]
_NUMPY_VALUE_TYPES = {
    np.dtype(np.uint8): GGUFValueType.UINT8,
    np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16,
    np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32,
    np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.float32): GGUFValueType.FLOAT32,
    np.dtype(np.bool_): GGUFValueType.BOOL,
    np.dtype(np.uint64): GGUFValueType.UINT64,
    np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float64): GGUFValueType.FLOAT64,
}
#: Keys whose type ggml prescribes, whatever Python type the value has.
_KEY_TYPES = {"general.alignment": GGUFValueType.UINT32}


def _scalar_type(key: str, value: Any) -> GGUFValueType:
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, np.generic) and value.dtype in _NUMPY_VALUE_TYPES:
        return _NUMPY_VALUE_TYPES[value.dtype]
    if isinstance(value, int):
        for vtype, lo, hi in _INT_TYPES:
            if lo <= value <= hi:
                return vtype
        raise ValueError(f"metadata key {key!r}: integer {value} does not fit in 64 bits")
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, (str, bytes)):
        return GGUFValueType.STRING
    raise ValueError(f"metadata key {key!r}: cannot store a {type(value).__name__} in GGUF")


def _typed(key: str, value: Any) -> MetadataValue:
    """``value`` as a :class:`MetadataValue` with its exact GGUF type: as given, or chosen as gguf-py would."""
    if isinstance(value, MetadataValue):
        vtype = GGUFValueType[value.type] if isinstance(value.type, str) else GGUFValueType(value.type)
        sub = value.sub_type
        sub_type = (GGUFValueType[sub] if isinstance(sub, str) else GGUFValueType(sub)) if sub is not None else None
        if vtype == GGUFValueType.ARRAY and sub_type is None:
            raise ValueError(f"metadata key {key!r}: an ARRAY MetadataValue needs a sub_type")
        return MetadataValue(value.value, vtype, sub_type)
    if key in _KEY_TYPES:
        return MetadataValue(value, _KEY_TYPES[key])
    if isinstance(value, np.ndarray):
        if value.dtype not in _NUMPY_VALUE_TYPES:
            raise ValueError(f"metadata key {key!r}: cannot store a {value.dtype} array in GGUF")
        return MetadataValue(value.reshape(-1).tolist(), GGUFValueType.ARRAY, _NUMPY_VALUE_TYPES[value.dtype])
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, tuple, np.ndarray)) for v in value):
            raise ValueError(f"metadata key {key!r}: nested arrays cannot be written (ggml's loader refuses them)")
        if not value:
            return MetadataValue([], GGUFValueType.ARRAY, GGUFValueType.INT32)
        types = {_scalar_type(key, v) for v in value}
        if len(types) == 1:
            sub = types.pop()
        elif types <= {t for t, _, _ in _INT_TYPES}:
            sub = max(types, key=[t for t, _, _ in _INT_TYPES].index)
        elif types <= {GGUFValueType.INT32, GGUFValueType.INT64, GGUFValueType.FLOAT32}:
            sub = GGUFValueType.FLOAT32
        else:
            raise ValueError(f"metadata key {key!r}: array mixes {sorted(t.name for t in types)}")
        return MetadataValue(list(value), GGUFValueType.ARRAY, sub)
    return MetadataValue(value, _scalar_type(key, value))


def _typed_all(metadata: Mapping[str, Any]) -> dict[str, MetadataValue]:
    """Every value of ``metadata`` typed (see :func:`_typed`), in order: what the native writers take."""
    return {key: _typed(key, value) for key, value in metadata.items()}


_ARRAY_TYPES = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float16): "f16",
    np.dtype(np.float64): "f64",
    np.dtype(np.int8): "i8",
    np.dtype(np.int16): "i16",
    np.dtype(np.int32): "i32",
    np.dtype(np.int64): "i64",
}

TensorValue = Union[npt.NDArray[Any], "tuple[npt.ArrayLike, object, Sequence[int]]"]


def _tensor_entry(name: str, value: Any) -> tuple[_native.TensorSpec, npt.NDArray[np.uint8]]:
    """The spec of tensor ``name`` and its data as flat little-endian bytes."""
    if isinstance(value, tuple):
        if len(value) != 3:
            raise ValueError(f"tensor {name!r}: expected (raw uint8 data, type, shape), got a {len(value)}-tuple")
        data, ggml_type, shape = value
        try:
            info = type_info(ggml_type)
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
        raw = np.ascontiguousarray(data)
        if raw.dtype != np.uint8:
            raise ValueError(f"tensor {name!r}: raw data must be uint8, got {raw.dtype}")
        return _native.TensorSpec(name, [int(d) for d in shape], info.name), raw.reshape(-1)
    array = np.asarray(value)
    if array.dtype.byteorder not in ("=", "|", "<" if np.little_endian else ">"):
        # Non-native byte order (e.g. ">f4"): the lookup below compares dtypes including their byte order, so
        # convert first; GGUF data is little-endian.
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype not in _ARRAY_TYPES:
        raise ValueError(
            f"tensor {name!r}: cannot write a {array.dtype} array; use float32/float16 (or int8..int64, float64), "
            "or a (raw uint8, type, shape) triple"
        )
    if array.ndim == 0:
        raise ValueError(f"tensor {name!r}: 0-dimensional arrays cannot be written (GGUF tensors have 1-4 dims)")
    type_name = _ARRAY_TYPES[array.dtype]
    array = np.ascontiguousarray(array)
    if not np.little_endian and array.dtype.itemsize > 1:  # GGUF data is little-endian
        array = array.astype(array.dtype.newbyteorder("<"))
    return _native.TensorSpec(name, list(array.shape), type_name), array.reshape(-1).view(np.uint8)


def write(
    path: PathLike,
    metadata: Mapping[str, Any],
    tensors: Mapping[str, TensorValue] | Iterable[tuple[str, TensorValue]],
    *,
    sync: bool = True,
) -> Path:
    """Write a GGUF v3 file atomically and return its path.

    ``metadata`` maps keys to plain values (typed like gguf-py: int -> INT32, float -> FLOAT32, str, bool,
    lists -> ARRAY) or :class:`MetadataValue` for an exact type; ``general.alignment`` is always UINT32.
    ``tensors`` maps names (in the order to write) to a float32/float16 numpy array (written as f32/f16) or a
    ``(raw_uint8, type, shape)`` triple with ``shape`` in numpy order. The file is written to a temporary name
    in the target folder and renamed into place when complete; ``sync`` fsyncs it first. ``path`` must be a
    regular file or a new name: a device, FIFO or socket raises ``SpecialFileError`` (a ``ValueError``), a
    directory ``IsADirectoryError``, before anything is written.
    """
    _native.check_output_path(os.fspath(path))
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    entries = [_tensor_entry(name, value) for name, value in items]
    return Path(_native.write_gguf(os.fspath(path), _typed_all(metadata), [spec for spec, _ in entries],
                                   [data for _, data in entries], sync, _written.current()))


class GGUFStreamWriter:
    """A GGUF v3 file written with its tensor data streamed in, for files larger than memory.

    ``tensors`` maps names (in data order) to ``(type, shape)`` with ``shape`` in numpy order; ``metadata`` is
    typed as for :func:`write`. The header is written on construction; then :meth:`write` appends bytes to the
    tensor data in chunks of any size that stay within one tensor (each tensor is padded to the alignment when
    its last byte arrives), and
    :meth:`close` checks every tensor is complete and renames the file into place. As a context manager it
    closes on success and aborts on an exception. Nothing appears under ``path`` before :meth:`close`; an
    aborted (or unclosed and collected) writer leaves no file behind.

    ::

        with GGUFStreamWriter("big.gguf", meta, {"w": ("q4_k", (n_out, n_in))}) as w:
            for rows in chunks_of_quantized_rows():
                w.write(rows)
    """

    def __init__(
        self,
        path: PathLike,
        metadata: Mapping[str, Any],
        tensors: Mapping[str, tuple[object, Sequence[int]]],
        *,
        sync: bool = True,
    ) -> None:
        _native.check_output_path(os.fspath(path))
        specs = []
        for name, (ggml_type, shape) in tensors.items():
            try:
                info = type_info(ggml_type)
            except ValueError as exc:
                raise ValueError(f"tensor {name!r}: {exc}") from None
            specs.append(_native.TensorSpec(name, [int(d) for d in shape], info.name))
        self._native = _native.GGUFStreamWriter(os.fspath(path), _typed_all(metadata), specs, sync)
        self.path = Path(path)

    @property
    def tensors(self) -> list[tuple[str, int]]:
        """``(name, data bytes)`` of every tensor, in data order."""
        return [(spec.name, spec.nbytes) for spec in self._native.tensors()]

    @property
    def current_tensor(self) -> int:
        """Index of the tensor whose data comes next (the number of tensors once all are complete)."""
        return self._native.current_tensor()

    def write(self, data: npt.ArrayLike) -> None:
        """Appends the bytes of ``data`` (any numpy array, written as its little-endian bytes; uint8 for
        quantized blocks) to the data of the current tensor. More bytes than it has left raise ``ValueError`` (and
        write nothing)."""
        array = np.ascontiguousarray(data)
        if array.dtype.itemsize > 1 and array.dtype.byteorder == (">" if np.little_endian else "<"):
            array = array.astype(array.dtype.newbyteorder("<"))
        self._native.write_data(array.reshape(-1).view(np.uint8))

    def close(self) -> Path:
        """Checks that every tensor is complete (``RuntimeError`` if not; the file is then discarded) and puts
        the file in place. Returns its path."""
        return Path(self._native.finish(_written.current()))

    def abort(self) -> None:
        """Discards the file being written."""
        self._native.abort()

    def __enter__(self) -> GGUFStreamWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
