"""Writers: llama.cpp's GGUF LoRA adapter and the legacy 'ggla' adapter file."""

from __future__ import annotations

import os
import struct
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
GGLA_MAGIC = b"algg"  # b"ggla"[::-1]: u32 LE 0x67676c61
GGLA_VERSION = 1


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


def _pairs(lora: LoraTensors) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(base name, P, Q) with delta = P @ Q in the numpy layout of the base tensor."""
    out = []
    for name in lora.tensors:
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        a = lora.tensors[name]
        b = lora.tensors[base + ".lora_b"]
        if base.startswith("token_embd"):
            out.append((base, a, np.ascontiguousarray(b.T)))
        else:
            out.append((base, b, a))
    return out


def write_ggla(lora: LoraTensors, out: Path, out_type: str = "f32") -> Path:
    """Write the legacy 'ggla' adapter of llama.cpp's convert-lora-to-ggml.py (GGUF-era tensor names).

    Header ``b"algg"``, i32 version 1, i32 r, i32 alpha; per tensor i32 n_dims, name_len, ftype, ne[], name,
    zero padding to a 32-byte file offset, data. ``<name>.loraA`` holds A.T (ne [r, n_in]) in ``out_type``,
    ``<name>.loraB`` holds B (ne [r, n_out]) in f32, as the original script wrote them. The old loader scales by
    header alpha / header r: when that is exact for every tensor (one rank, integral alpha) the factors are
    written unscaled; otherwise each tensor's scale is folded into loraB and the header says alpha = r.
    """
    if out_type not in GGLA_OUTTYPES:
        raise ConversionError(f"out_type {out_type!r} is not available for the ggla format (only f32 and f16)")
    pairs = _pairs(lora)
    if not pairs:
        raise ConversionError("the adapter has no LoRA tensors to write")
    ranks = {q.shape[0] for _, _, q in pairs}
    alpha = float(lora.alpha)
    if alpha != 0 and len(ranks) == 1 and alpha.is_integer() and alpha < 2**31:
        r_hdr = ranks.pop()
        alpha_hdr = int(alpha)
        scales = {base: 1.0 for base, _, _ in pairs}
    else:
        r_hdr = max(ranks)
        alpha_hdr = r_hdr
        scales = {base: (alpha / q.shape[0] if alpha else 1.0) for base, _, q in pairs}
    ftype_a = 0 if out_type == "f32" else 1
    out = Path(out)
    # A device, FIFO, socket or directory at ``out`` is refused and never replaced (checked again before the
    # rename). The temporary file is named by the Rust writer's rule (atomic.rs: marker, pid, counter, within
    # NAME_MAX), so a leftover from a killed process is recognisable; created with the usual permissions (0666
    # minus the umask).
    _native.check_output_path(os.fspath(out))
    tmp_name = os.fspath(_native.temp_path(os.fspath(out)))
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(GGLA_MAGIC)
            f.write(struct.pack("<iii", GGLA_VERSION, r_hdr, alpha_hdr))
            for base, p, q in pairs:
                lora_a = np.ascontiguousarray(q.T, dtype=np.float32)  # numpy (n_in, r): ne [r, n_in]
                if ftype_a:
                    lora_a = _to_f16(base, lora_a)
                lora_b = p.astype(np.float64) * scales[base] if scales[base] != 1.0 else p
                lora_b = np.ascontiguousarray(lora_b, dtype=np.float32)  # numpy (n_out, r): ne [r, n_out]
                for suffix, array, ftype in ((".loraA", lora_a, ftype_a), (".loraB", lora_b, 0)):
                    name = (base + suffix).encode("utf-8")
                    ne = list(reversed(array.shape))
                    f.write(struct.pack(f"<iii{len(ne)}i", len(ne), len(name), ftype, *ne))
                    f.write(name)
                    pad = (-f.tell()) % 32
                    f.write(b"\0" * pad)
                    f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        _native.check_output_path(os.fspath(out))
        os.replace(tmp_name, out)
        _record(out)
    except BaseException:
        if os.path.lexists(tmp_name):
            os.unlink(tmp_name)
        else:  # renamed into place, then interrupted before it was recorded: the output is complete
            _record(out)
        raise
    return out


def _record(out: Path) -> None:
    written = _written.current()
    if written is not None and os.fspath(out) not in written:
        written.append(os.fspath(out))
