"""Independent oracles shared by several test modules. Nothing here imports ``ggml_lora``: files are read with
gguf-py (``GGUFReader`` + ``gguf.quants.dequantize``), arithmetic is numpy float64, and llama.cpp's transforms
are restated from its sources. No tests here."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def reader_f32(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized by gguf-py, in numpy shape (float32)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = values.reshape(tuple(int(d) for d in reversed(t.shape)))
    return out


def adapter_factors(path: Path, user_scale: float = 1.0) -> dict[str, tuple[float, np.ndarray, np.ndarray]]:
    """``{target: (s, left, right)}`` of a llama.cpp GGUF adapter read by gguf-py, with delta = s · left @ right
    in the numpy layout of the target (llama.cpp's scale s = user_scale · alpha / rank, or user_scale when
    alpha is 0; token_embd's flipped layout: left = lora_a, right = lora_b.T). Factors are float64."""
    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields["adapter.lora.alpha"].contents()) if "adapter.lora.alpha" in reader.fields else 0.0
    tensors = reader_f32(path)
    out = {}
    for name in tensors:
        if not name.endswith(".lora_a"):
            continue
        target = name[: -len(".lora_a")]
        a = tensors[name].astype(np.float64)
        b = tensors[target + ".lora_b"].astype(np.float64)
        rank = b.shape[1]  # ggml lora_b->ne[0] in both layouts
        scale = user_scale * alpha / rank if alpha else user_scale
        out[target] = (scale, a, b.T) if target.startswith("token_embd") else (scale, b, a)
    return out


def adapter_deltas(path: Path, user_scale: float = 1.0) -> dict[str, np.ndarray]:
    """s·(B @ A) per target in float64 (see :func:`adapter_factors`)."""
    return {t: s * (left @ right) for t, (s, left, right) in adapter_factors(path, user_scale).items()}


def hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (restated): rows (head, half, i) -> (head, i, half).
    ``n_head`` is the head count of the projection (n_head_kv for k_proj), as llama.cpp passes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
