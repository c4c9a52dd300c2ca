"""Read a torch ``.bin`` state dict (``torch.save`` zip format) without importing torch.

``data.pkl`` is unpickled by a restricted unpickler that resolves only the globals a tensor state dict needs:
the tensor-rebuild functions of ``torch._utils``, the typed storage classes (``torch.FloatStorage`` ...), the
dtype objects ``_rebuild_tensor_v3`` takes, and ``collections.OrderedDict``. Any other global (``os.system``,
``builtins.eval``, ``subprocess.Popen``, ...) raises :class:`ConversionError` naming it *before* it is
resolved, so nothing in the file is ever executed. Storages are read with numpy from the zip's ``data/<key>``
entries; each tensor is rebuilt from its storage offset, size and stride, with bounds checks.

The legacy (pre-1.6, non-zip) torch format is not supported: its first pickle is still unpickled with the
restricted unpickler (so a hostile global is reported by name), then the file is refused.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _native
from .errors import ConversionError

# storage class name -> (numpy dtype of one element, is bfloat16)
_STORAGE_DTYPES: dict[str, tuple[np.dtype, bool]] = {
    "FloatStorage": (np.dtype("<f4"), False),
    "DoubleStorage": (np.dtype("<f8"), False),
    "HalfStorage": (np.dtype("<f2"), False),
    "BFloat16Storage": (np.dtype("<u2"), True),
    "ByteStorage": (np.dtype("u1"), False),
    "CharStorage": (np.dtype("i1"), False),
    "ShortStorage": (np.dtype("<i2"), False),
    "IntStorage": (np.dtype("<i4"), False),
    "LongStorage": (np.dtype("<i8"), False),
    "BoolStorage": (np.dtype("?"), False),
}
# torch dtype name -> storage class name (for _rebuild_tensor_v3 and UntypedStorage)
_DTYPE_STORAGE = {
    "float32": "FloatStorage", "float": "FloatStorage", "float64": "DoubleStorage", "double": "DoubleStorage",
    "float16": "HalfStorage", "half": "HalfStorage", "bfloat16": "BFloat16Storage", "uint8": "ByteStorage",
    "int8": "CharStorage", "int16": "ShortStorage", "short": "ShortStorage", "int32": "IntStorage",
    "int": "IntStorage", "int64": "LongStorage", "long": "LongStorage", "bool": "BoolStorage",
}
_MAX_DIMS = 8


@dataclass(frozen=True)
class _StorageType:
    """Stands in for ``torch.<X>Storage``: only ever used as a tag in a persistent id."""

    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ConversionError(f"torch pickle: refusing to call storage class torch.{self.name}")


@dataclass(frozen=True)
class _Dtype:
    """Stands in for a ``torch.<dtype>`` object."""

    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ConversionError(f"torch pickle: refusing to call torch.{self.name}")


@dataclass
class _Storage:
    key: str
    storage: str  # storage class name
    numel: int
    data: np.ndarray  # 1-D, numel elements, little-endian (bf16 as uint16)


class _Loader:
    def __init__(self, zf: zipfile.ZipFile | None, prefix: str, big_endian: bool, path: Path) -> None:
        self.zf = zf
        self.prefix = prefix
        self.big_endian = big_endian
        self.path = path
        self.storages: dict[str, _Storage] = {}

    # -- storages -------------------------------------------------------------------------------------
    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
            raise ConversionError(f"{self.path}: unsupported persistent id in torch pickle: {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        if isinstance(storage_type, _Dtype):  # UntypedStorage-era pickles may pass a dtype
            storage_type = _StorageType(_DTYPE_STORAGE[storage_type.name])
        if not isinstance(storage_type, _StorageType):
            raise ConversionError(f"{self.path}: torch pickle storage type is not a known storage class: "
                                  f"{storage_type!r:.200}")
        if not isinstance(key, str) or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise ConversionError(f"{self.path}: malformed storage reference {pid!r:.200}")
        if key in self.storages:
            return self.storages[key]
        if self.zf is None:
            raise ConversionError(f"{self.path}: storages outside a zip archive are not supported")
        name = f"{self.prefix}data/{key}"
        dtype, _ = _STORAGE_DTYPES[storage_type.name]
        if self.big_endian:
            dtype = dtype.newbyteorder(">")
        need = numel * dtype.itemsize
        try:
            with self.zf.open(name) as entry:
                raw = entry.read(need)  # never more than the storage needs (no zip-bomb reads)
        except KeyError:
            raise ConversionError(f"{self.path}: torch zip has no storage entry {name!r}") from None
        if len(raw) < need:
            raise ConversionError(f"{self.path}: storage {name!r} holds {len(raw)} bytes, needs {need}")
        data = np.frombuffer(raw, dtype=dtype, count=numel)
        if self.big_endian:
            data = data.astype(dtype.newbyteorder("<"))
        storage = _Storage(key, storage_type.name, numel, data)
        self.storages[key] = storage
        return storage

    # -- tensors --------------------------------------------------------------------------------------
    def rebuild(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> np.ndarray:
        if not isinstance(storage, _Storage):
            raise ConversionError(f"{self.path}: tensor rebuild without a storage ({type(storage).__name__})")
        ints = [offset, *size, *stride] if isinstance(size, tuple) and isinstance(stride, tuple) else None
        if ints is None or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints):
            raise ConversionError(f"{self.path}: malformed tensor geometry offset={offset!r:.80} "
                                  f"size={size!r:.80} stride={stride!r:.80}")
        if len(size) != len(stride) or len(size) > _MAX_DIMS:
            raise ConversionError(f"{self.path}: malformed tensor geometry size={size} stride={stride}")
        n = int(np.prod(size, dtype=np.int64)) if size else 1
        if n > 0:
            last = offset + sum((s - 1) * st for s, st in zip(size, stride))
            if last >= storage.numel:
                raise ConversionError(f"{self.path}: tensor (offset {offset}, size {size}, stride {stride}) "
                                      f"reads past its storage of {storage.numel} elements")
        data = storage.data
        itemsize = data.dtype.itemsize
        if n == 0:
            out = np.zeros(size, dtype=data.dtype)
        else:
            out = np.lib.stride_tricks.as_strided(
                data[offset:], shape=size, strides=[st * itemsize for st in stride], writeable=False
            ).copy()
        if _STORAGE_DTYPES[storage.storage][1]:  # bfloat16 -> float32, exact
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    def rebuild_v2(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                   backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
        return self.rebuild(storage, offset, size, stride)

    def rebuild_v3(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                   backward_hooks: Any = None, dtype: Any = None, metadata: Any = None) -> np.ndarray:
        if isinstance(dtype, _Dtype) and isinstance(storage, _Storage):
            want = _DTYPE_STORAGE.get(dtype.name)
            if want != storage.storage:
                raise ConversionError(f"{self.path}: tensor dtype torch.{dtype.name} does not match its storage "
                                      f"torch.{storage.storage}")
        return self.rebuild(storage, offset, size, stride)

    def rebuild_parameter(self, data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                          *rest: Any) -> np.ndarray:
        if not isinstance(data, np.ndarray):
            raise ConversionError(f"{self.path}: parameter rebuild without a tensor")
        return data

    def globals(self) -> dict[tuple[str, str], Any]:
        table: dict[tuple[str, str], Any] = {
            ("torch._utils", "_rebuild_tensor"): self.rebuild,
            ("torch._utils", "_rebuild_tensor_v2"): self.rebuild_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self.rebuild_v3,
            ("torch._utils", "_rebuild_parameter"): self.rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self.rebuild_parameter,
            ("collections", "OrderedDict"): collections.OrderedDict,
        }
        for name in _STORAGE_DTYPES:
            table[("torch", name)] = _StorageType(name)
        for name in _DTYPE_STORAGE:
            table[("torch", name)] = _Dtype(name)
        return table


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, loader: _Loader) -> None:
        super().__init__(file)
        self._loader = loader
        self._globals = loader.globals()

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle hook
        try:
            return self._globals[(module, name)]
        except (KeyError, TypeError):
            shown = f"'{module}.{name}'"
            # protocol 0-2 pickles spell Python 3 names the Python 2 way (builtins -> __builtin__, ...)
            py3 = _compat_pickle.NAME_MAPPING.get((module, name))
            if py3 is None and module in _compat_pickle.IMPORT_MAPPING:
                py3 = (_compat_pickle.IMPORT_MAPPING[module], name)
            if py3 is not None and py3 != (module, name):
                shown += f" (Python 3: '{py3[0]}.{py3[1]}')"
            raise ConversionError(
                f"{self._loader.path}: refusing to load pickle global {shown} - only torch tensor "
                "rebuild functions, storage types and collections.OrderedDict are allowed (the file may be "
                "hostile; nothing was executed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - pickle hook
        return self._loader.persistent_load(pid)


def _unpickle(data: bytes, loader: _Loader) -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), loader).load()
    except ConversionError:
        raise
    except RecursionError:
        raise ConversionError(f"{loader.path}: torch pickle is nested too deeply") from None
    except Exception as exc:  # malformed pickle streams raise all sorts of things
        raise ConversionError(f"{loader.path}: cannot read torch pickle: {type(exc).__name__}: {exc}") from None


def _flatten(obj: Any, path: Path) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict (a dict of tensors), got {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ConversionError(f"{path}: state dict key of type {type(key).__name__} is not a string")
        if not isinstance(value, np.ndarray):
            raise ConversionError(f"{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def load_torch_bin(path: str | Path) -> dict[str, np.ndarray]:
    """Load a ``torch.save`` state dict as numpy arrays (bf16 becomes float32; other dtypes keep theirs).

    Every failure to read the file is a :class:`ConversionError` naming it (an OSError from the operating system
    passes through as it is): Python's own limits (``RecursionError``, ``MemoryError``) and the zip module's
    errors included, so a hostile file never surfaces as a traceback.
    """
    path = Path(path)
    _native.check_input_path(path)  # a FIFO or device is refused before it is opened
    try:
        return _load_torch_bin(path)
    except (ConversionError, OSError):
        raise
    except RecursionError:
        raise ConversionError(f"{path}: torch file is nested too deeply") from None
    except MemoryError:
        raise ConversionError(f"{path}: torch file needs more memory than is available (a decompression or "
                              "pickle bomb?)") from None
    except Exception as exc:  # zipfile.BadZipFile, zlib.error, EOFError, ... from a malformed archive
        raise ConversionError(f"{path}: cannot read torch file: {type(exc).__name__}: {str(exc)[:200]}") from None


def _load_torch_bin(path: Path) -> dict[str, np.ndarray]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise ConversionError(f"{path}: not a torch zip archive (expected one '<name>/data.pkl', "
                                      f"found {len(pkls)})")
            prefix = pkls[0][: -len("data.pkl")]
            big_endian = False
            if f"{prefix}byteorder" in names:
                order = zf.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
                if order not in ("little", "big"):
                    raise ConversionError(f"{path}: unknown byteorder {order!r}")
                big_endian = order == "big"
            loader = _Loader(zf, prefix, big_endian, path)
            return _flatten(_unpickle(zf.read(pkls[0]), loader), path)
    # Not a zip: a plain pickle or torch's legacy format. Unpickle the first object restrictedly (a hostile
    # global is refused by name), then refuse the format.
    loader = _Loader(None, "", False, path)
    first = _unpickle(path.read_bytes(), loader)
    if first == 0x1950A86A20F9469CFC6C:
        raise ConversionError(f"{path}: legacy (pre-zip) torch serialization is not supported; re-save the "
                              "adapter with safetensors (PEFT save_pretrained(safe_serialization=True))")
    raise ConversionError(f"{path}: not a torch zip archive (torch.save format); plain pickles are not supported")
