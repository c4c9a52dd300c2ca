"""Writers: llama.cpp's GGUF LoRA adapter and the legacy 'ggla' adapter file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _native, _written
from ..gguf import GGUFValueType, MetadataValue, write
from ..quants import quantize
from .errors import ConversionError

if TYPE_CHECKING:
    from . import LoraTensors

GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
GGLA_OUTTYPES = ("f32", "f16")


def _to_f16(name: str, x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        y = x.astype(np.float16)
    if not np.isfinite(y).all():
        raise ConversionError(f"tensor {name!r}: values exceed the f16 range; use --outtype f32 or bf16")
    return y


def _encode(name: str, x: np.ndarray, out_type: str) -> Any:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out_type == "f32":
        return x
    if out_type == "f16":
        return _to_f16(name, x)
    if out_type == "bf16":
        return (quantize(x, "bf16"), "bf16", x.shape)
    if out_type == "q8_0":
        if x.shape[-1] % 32 != 0:
            # like llama.cpp's converters (gguf QuantError -> "falling back to F16"): rows of r elements
            # (lora_b, r not a multiple of 32) cannot be q8_0 blocks.
            return _to_f16(name, x)
        return (quantize(x, "q8_0"), "q8_0", x.shape)
    raise ConversionError(f"unknown out_type {out_type!r}; choose one of {', '.join(GGUF_OUTTYPES)}")


def gguf_metadata(lora: LoraTensors) -> dict[str, Any]:
    """The KV metadata of llama.cpp's adapter GGUF for ``lora``."""
    meta: dict[str, Any] = {
        "general.architecture": lora.architecture,
        "general.type": "adapter",
        "adapter.type": "lora",
        "adapter.lora.alpha": MetadataValue(float(lora.alpha), GGUFValueType.FLOAT32),
    }
    for key, value in lora.metadata.items():
        if key not in meta:
            meta[key] = value
    meta.setdefault("general.quantization_version", MetadataValue(2, GGUFValueType.UINT32))
    return meta


def write_gguf(lora: LoraTensors, out: Path, out_type: str = "f32") -> Path:
    """Write ``lora`` as llama.cpp's GGUF LoRA adapter (``out_type`` f32, f16, bf16 or q8_0)."""
    if out_type not in GGUF_OUTTYPES:
        raise ConversionError(f"unknown out_type {out_type!r} for GGUF; choose one of {', '.join(GGUF_OUTTYPES)}")
    tensors = [(name, _encode(name, array, out_type)) for name, array in lora.tensors.items()]
    return write(out, gguf_metadata(lora), tensors)


def write_ggla(lora: LoraTensors, out: Path, out_type: str = "f32") -> Path:
    """Write the legacy 'ggla' adapter of llama.cpp's convert-lora-to-ggml.py (GGUF-era tensor names).

    The format and its scale rule live in the core (``ggla::write_ggla``): ``<name>.loraA`` holds Aᵀ in
    ``out_type``, ``<name>.loraB`` holds B in f32; the header's alpha / r carries the scale when it can (one rank,
    an integral alpha), otherwise each pair's scale is folded into its loraB. The file appears only when complete.
    """
    if out_type not in GGLA_OUTTYPES:
        raise ConversionError(f"out_type {out_type!r} is not available for the ggla format (only f32 and f16)")
    if not any(name.endswith(".lora_a") for name in lora.tensors):
        raise ConversionError("the adapter has no LoRA tensors to write")
    # The core reads llama.cpp's layout (token_embd's included) into its pairs, and writes ggla from the pairs.
    tensors = []
    for name, array in lora.tensors.items():
        data = np.ascontiguousarray(array, dtype=np.float32)
        tensors.append((name, [int(d) for d in reversed(data.shape)], "f32", data.reshape(-1).view(np.uint8)))
    try:
        adapter = _native.Adapter.from_tensors("converted", lora.architecture, float(lora.alpha), tensors)
        return Path(_native.write_ggla(os.fspath(out), adapter, out_type == "f16", _written.current()))
    except OSError:
        raise
    except ValueError as exc:
        raise ConversionError.wrapping(exc) from None
