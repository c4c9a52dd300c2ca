"""Block quantization of numpy arrays, bit-exact with ggml's reference quantizers."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import numpy.typing as npt

from . import _native
from ._types import GGML_TYPES, type_info


def _check_row_length(row_len: int, info_name: str, block_size: int) -> None:
    if row_len % block_size != 0:
        raise ValueError(
            f"cannot use {info_name}: the last dimension ({row_len}) must be a multiple of its block size {block_size}"
        )


def _check_out(out: np.ndarray, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """A flat view of a caller-provided output array, which must match exactly (no silent copies)."""
    if not isinstance(out, np.ndarray) or out.dtype != dtype or out.shape != shape or not out.flags.c_contiguous:
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out must be a C-contiguous {np.dtype(dtype)} array of shape {shape}, got {got}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    return out.reshape(-1)


def _supported(flag: str) -> str:
    return ", ".join(t.name for t in GGML_TYPES.values() if (t.can_quantize if flag == "quantize" else t.can_dequantize))


def quantize(
    x: npt.ArrayLike,
    type: object,
    *,
    imatrix: npt.ArrayLike | None = None,
    out: npt.NDArray[np.uint8] | None = None,
) -> npt.NDArray[np.uint8]:
    """Quantize ``x`` (converted to float32) row by row to ggml ``type``.

    Returns a uint8 array of shape ``x.shape[:-1] + (bytes_per_row,)`` holding the exact bytes ggml's
    ``quantize_<type>`` writes (what llama-quantize writes). ``x.shape[-1]`` must be a multiple of the type's block
    size. NaN or infinite input raises ``ValueError``. Rows are quantized in parallel with the GIL released.

    ``imatrix``: one importance weight per column (length ``x.shape[-1]``, finite and non-negative), as
    llama-imatrix computes them; types whose ggml quantizer takes an importance matrix then quantize as
    ``llama-quantize --imatrix`` does, the others (q8_0, f16, bf16, f32) ignore it, as ggml does.
    ``out``, a C-contiguous uint8 array of the result's shape, is filled and returned instead of allocating.
    """
    info = type_info(type)
    # np.asarray first: np.ascontiguousarray turns a 0-d array into a 1-d one, which would hide the check below.
    # Values beyond the float32 range become inf here and are refused by the kernels as non-finite input.
    with np.errstate(over="ignore"):
        array = np.asarray(x, dtype=np.float32)
    if array.ndim == 0:
        raise ValueError("cannot quantize a 0-dimensional array: rows need at least one dimension")
    array = np.ascontiguousarray(array)
    if not info.can_quantize:
        raise ValueError(f"quantizing to {info.name} is not supported (supported: {_supported('quantize')})")
    row_len = array.shape[-1]
    _check_row_length(row_len, info.name, info.block_size)
    row_bytes = row_len // info.block_size * info.type_size
    result_shape = array.shape[:-1] + (row_bytes,)
    flat_out = _check_out(out, np.uint8, result_shape) if out is not None else None
    weights = None
    if imatrix is not None:
        weights = np.ascontiguousarray(imatrix, dtype=np.float32)
        if weights.shape != (row_len,):
            raise ValueError(f"imatrix must hold one weight per column: shape ({row_len},), got {weights.shape}")
    if array.size == 0:
        return out if out is not None else np.zeros(result_shape, dtype=np.uint8)
    if out is None:
        # numpy's allocator maps large arrays with huge pages; filling an array allocated here is several times
        # faster than faulting in a fresh buffer the extension allocates 4 KiB at a time.
        out = np.empty(result_shape, dtype=np.uint8)
        flat_out = out.reshape(-1)
    _native.quantize_rows(array.reshape(-1), info.name, row_len, flat_out, weights)
    return out


def dequantize(
    data: npt.ArrayLike, type: object, shape: Sequence[int], *, out: npt.NDArray[np.float32] | None = None
) -> npt.NDArray[np.float32]:
    """Dequantize raw ggml ``type`` bytes into a float32 array of ``shape`` (numpy order), exactly as ggml's
    ``dequantize_row_*`` does. ``data`` must hold exactly the bytes of that shape. ``out``, a C-contiguous
    float32 array of ``shape``, is filled and returned instead of allocating (fresh memory is slow to touch)."""
    info = type_info(type)
    shape = tuple(int(d) for d in shape)
    if not shape or any(d < 0 for d in shape):
        raise ValueError(f"invalid shape {shape}")
    if not info.can_dequantize:
        raise ValueError(f"dequantizing {info.name} is not supported (supported: {_supported('dequantize')})")
    raw = np.ascontiguousarray(data)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8) if raw.flags.c_contiguous else np.ascontiguousarray(raw).view(np.uint8)
    raw = raw.reshape(-1)
    row_len = shape[-1]
    _check_row_length(row_len, info.name, info.block_size)
    n_rows = math.prod(shape[:-1])
    expected = n_rows * (row_len // info.block_size) * info.type_size
    if raw.size != expected:
        raise ValueError(f"{info.name} data of shape {shape} takes {expected} bytes, got {raw.size}")
    flat_out = _check_out(out, np.float32, shape) if out is not None else None
    if expected == 0:
        return out if out is not None else np.zeros(shape, dtype=np.float32)
    if out is None:
        out = np.empty(shape, dtype=np.float32)  # see quantize: faster to fill than a buffer made by the extension
        flat_out = out.reshape(-1)
    _native.dequantize_rows(raw, info.name, row_len, flat_out)
    return out
