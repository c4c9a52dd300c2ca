"""Read a torch ``.bin`` state dict (``torch.save`` zip format) without importing torch.

The file is read by the Rust core (``rust/core/src/torch_bin``), which never executes anything:

- the zip: stored and deflate members only, each read in bounded chunks and inflated exactly to the size
  expected of it (``data.pkl`` at most 64 MiB, ``byteorder`` 16 bytes, each storage ``numel x element size``
  as its persistent id promises), CRC-32 checked;
- ``data.pkl``: a pickle machine that builds only None/bool/int/float/str/bytes/tuple/list/dict (str and int
  keys) and resolves only the globals a tensor state dict needs: the tensor-rebuild functions of
  ``torch._utils``, the storage classes (``torch.FloatStorage`` ...), the dtype objects ``_rebuild_tensor_v3``
  takes, and ``collections.OrderedDict``. Any other global (``os.system``, ``builtins.eval``, ...) is refused by
  name before anything is built from it. Hard limits on opcodes, memo entries, objects, nesting depth and
  string sizes; nothing untrusted is hashed (dict keys are str or int) or walked to build a message;
- tensors: each view (offset, size, stride) checked inside its storage, and all of them together at most four
  times the bytes of the storages they use.

The legacy (pre-1.6, non-zip) torch format is not supported: its first pickle is still read by the same
machine (so a hostile global is reported by name), then the file is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import _native
from .errors import ConversionError


def open_torch_bin(path: str | Path) -> _native.PeftWeights:
    """Read a ``torch.save`` state dict into the core as a PEFT weights file (its tensors materialised there).
    Refusals as :func:`load_torch_bin`'s."""
    path = Path(path)
    try:
        return _native.PeftWeights.open_torch_bin(path)
    except OSError:
        raise
    except ValueError as exc:
        raise ConversionError.wrapping(exc) from None
    except MemoryError:
        raise ConversionError(f"{path}: torch file needs more memory than is available") from None


def load_torch_bin(path: str | Path) -> dict[str, np.ndarray]:
    """Load a ``torch.save`` state dict as numpy arrays (bf16 becomes float32, exactly; other dtypes keep theirs).

    Every refusal is a :class:`ConversionError` naming the file, the zip member, the byte offset and the problem
    (or the limit exceeded); an OSError from the operating system passes through as it is. A FIFO or device is
    refused before it is opened.
    """
    path = Path(path)
    try:
        return _load_torch_bin(path)
    except OSError:
        raise
    except ValueError as exc:  # the core's refusals (a ValueError per the binding's errors.rs)
        raise ConversionError.wrapping(exc) from None
    except MemoryError:
        raise ConversionError(f"{path}: torch file needs more memory than is available") from None


def _load_torch_bin(path: Path) -> dict[str, np.ndarray]:
    return {
        name: raw.view(np.dtype(dtype).newbyteorder("<")).reshape(shape)
        for name, dtype, shape, raw in _native.read_torch_bin(path)
    }
