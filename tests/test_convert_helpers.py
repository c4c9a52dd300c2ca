"""Shared helpers for the converter tests (numpy + safetensors + json only; no torch, no network). No tests here."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from conftest import FIXTURES

LLAMA_GQA = FIXTURES / "llama-gqa"
ARCH = FIXTURES / "arch"
GPT2 = FIXTURES / "gpt2-tiny"
ARCHS = ["mistral", "qwen2", "qwen3", "gemma2", "phi3", "llama-tied"]


def f16_ulp_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|ordered(x) - ordered(y)| for float16 arrays (ulps; +0 and -0 are the same)."""

    def ordered(v: np.ndarray) -> np.ndarray:
        i = np.ascontiguousarray(v, dtype=np.float16).view(np.int16).astype(np.int32)
        return np.where(i < 0, -(i & 0x7FFF), i)

    return np.abs(ordered(x) - ordered(y))


def implied_delta(lora: Any, name: str) -> np.ndarray:
    """The delta llama.cpp applies to base tensor ``name`` for ``lora`` (a LoraTensors), float64, numpy layout:
    s * B @ A (token_embd: s * A @ B.T) with s = alpha / rank, or 1 when alpha == 0."""
    a = lora.tensors[name + ".lora_a"].astype(np.float64)
    b = lora.tensors[name + ".lora_b"].astype(np.float64)
    rank = b.shape[1]  # ggml b->ne[0]
    s = lora.alpha / rank if lora.alpha else 1.0
    return s * (a @ b.T if name.startswith("token_embd") else b @ a)


def peft_pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def peft_scale(config: dict[str, Any], module: str) -> float:
    """PEFT's scaling for ``module`` (independent re-statement of peft's LoraModel/LoraLayer rule)."""
    r = config.get("r", 8)
    alpha = config.get("lora_alpha", 8)
    k = peft_pattern_key(config.get("rank_pattern") or {}, module)
    if k is not None:
        r = config["rank_pattern"][k]
    k = peft_pattern_key(config.get("alpha_pattern") or {}, module)
    if k is not None:
        alpha = config["alpha_pattern"][k]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


BASE_CONFIG: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 8,
    "lora_alpha": 16,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "base_model_name_or_path": "tiny-random-mistral",
}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Write a safetensors file by hand (so BF16 can be written without torch). Arrays are float32/64 in."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        x = np.asarray(tensors[name], dtype=np.float32)
        if dtype == "F32":
            raw = x.astype("<f4").tobytes()
        elif dtype == "F16":
            raw = x.astype("<f2").tobytes()
        elif dtype == "BF16":
            bits = x.view(np.uint32)
            raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()  # round to nearest even
        else:
            raise ValueError(dtype)
        header[name] = {"dtype": dtype, "shape": list(x.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * ((-len(head)) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def bf16_round(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


# Module shapes (n_out, n_in) of the arch/mistral fixture model (hidden 128, 4 heads, 2 kv heads, ff 256,
# vocab 512, 2 layers, untied output head).
MISTRAL_SHAPES = {
    "self_attn.q_proj": (128, 128),
    "self_attn.k_proj": (64, 128),
    "self_attn.v_proj": (64, 128),
    "self_attn.o_proj": (128, 128),
    "mlp.gate_proj": (256, 128),
    "mlp.up_proj": (256, 128),
    "mlp.down_proj": (128, 256),
}


def make_adapter(
    folder: Path,
    config: dict[str, Any] | None = None,
    *,
    ranks: dict[str, int] | None = None,
    modules: list[str] | None = None,
    extra: dict[str, np.ndarray] | None = None,
    dtype: str = "F32",
    embedding_rank: int | None = None,
    lm_head_rank: int | None = None,
    seed: int = 0,
) -> tuple[Path, dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A random PEFT LoRA adapter for the arch/mistral model. ``ranks`` maps full module names to their rank
    (default: config r). Returns (folder, config, {module: (A, B)}) with A/B as stored (after dtype rounding)."""
    cfg = dict(BASE_CONFIG)
    cfg.update(config or {})
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ranks = ranks or {}
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    tensors: dict[str, np.ndarray] = {}
    wanted = modules if modules is not None else [f"model.layers.{i}.{m}" for i in range(2) for m in MISTRAL_SHAPES]
    for module in wanted:
        n_out, n_in = MISTRAL_SHAPES[module.split(".", 3)[3]]
        r = ranks.get(module, cfg["r"])
        a = rng.normal(0, 1 / math.sqrt(n_in), (r, n_in)).astype(np.float32)
        b = rng.normal(0, 0.01, (n_out, r)).astype(np.float32)
        factors[module] = (a, b)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    if embedding_rank:
        a = rng.normal(0, 1, (embedding_rank, 512)).astype(np.float32)
        b = rng.normal(0, 0.01, (128, embedding_rank)).astype(np.float32)
        factors["model.embed_tokens"] = (a, b)
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = a
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = b
    if lm_head_rank:
        a = rng.normal(0, 1 / math.sqrt(128), (lm_head_rank, 128)).astype(np.float32)
        b = rng.normal(0, 0.01, (512, lm_head_rank)).astype(np.float32)
        factors["lm_head"] = (a, b)
        tensors["base_model.model.lm_head.lora_A.weight"] = a
        tensors["base_model.model.lm_head.lora_B.weight"] = b
    tensors.update(extra or {})
    write_safetensors(folder / "adapter_model.safetensors", tensors, dtype)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    if dtype == "F16":
        factors = {k: (a.astype(np.float16).astype(np.float32), b.astype(np.float16).astype(np.float32))
                   for k, (a, b) in factors.items()}
    elif dtype == "BF16":
        factors = {k: (bf16_round(a), bf16_round(b)) for k, (a, b) in factors.items()}
    return folder, cfg, factors


def read_ggla(path: Path) -> tuple[int, int, dict[str, tuple[int, list[int], np.ndarray, int]]]:
    """A tiny reader of the legacy ggla file: (r, alpha, {name: (ftype, ne, numpy array, data offset)})."""
    data = path.read_bytes()
    assert data[:4] == b"algg"
    version, r, alpha = struct.unpack_from("<iii", data, 4)
    assert version == 1
    pos = 16
    out = {}
    while pos < len(data):
        n_dims, name_len, ftype = struct.unpack_from("<iii", data, pos)
        pos += 12
        ne = list(struct.unpack_from(f"<{n_dims}i", data, pos))
        pos += 4 * n_dims
        name = data[pos: pos + name_len].decode()
        pos += name_len
        pad = (-pos) % 32
        assert data[pos: pos + pad] == b"\0" * pad
        pos += pad
        dtype = np.dtype("<f4") if ftype == 0 else np.dtype("<f2")
        count = int(np.prod(ne))
        array = np.frombuffer(data, dtype=dtype, count=count, offset=pos).reshape(list(reversed(ne)))
        out[name] = (ftype, ne, array, pos)
        pos += count * dtype.itemsize
    return r, alpha, out
