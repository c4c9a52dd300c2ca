"""A small built-in example model, so the tool can be tried (and tested) without downloading anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .gguf import GGUFValueType, MetadataValue, PathLike, TensorValue, write
from .quants import quantize


def example_model_tensors(
    n_embd: int = 128, n_ff: int = 256, n_layer: int = 2, n_vocab: int = 256, seed: int = 0
) -> dict[str, np.ndarray]:
    """float32 weights of a tiny llama-shaped model, named as llama.cpp names them (seeded normal(0, 0.02))."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {"token_embd.weight": rng.normal(0, 0.02, (n_vocab, n_embd))}
    for i in range(n_layer):
        p = f"blk.{i}"
        tensors[f"{p}.attn_norm.weight"] = 1 + rng.normal(0, 0.1, n_embd)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors[f"{p}.{name}.weight"] = rng.normal(0, 0.02, (n_embd, n_embd))
        tensors[f"{p}.ffn_norm.weight"] = 1 + rng.normal(0, 0.1, n_embd)
        tensors[f"{p}.ffn_gate.weight"] = rng.normal(0, 0.02, (n_ff, n_embd))
        tensors[f"{p}.ffn_up.weight"] = rng.normal(0, 0.02, (n_ff, n_embd))
        tensors[f"{p}.ffn_down.weight"] = rng.normal(0, 0.02, (n_embd, n_ff))
    tensors["output_norm.weight"] = 1 + rng.normal(0, 0.1, n_embd)
    tensors["output.weight"] = rng.normal(0, 0.02, (n_vocab, n_embd))
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def example_metadata(n_embd: int = 128, n_ff: int = 256, n_layer: int = 2, n_vocab: int = 256) -> dict:
    """llama-style metadata for :func:`example_model_tensors` (types as llama.cpp expects them)."""
    u32 = GGUFValueType.UINT32
    return {
        "general.architecture": "llama",
        "general.name": "ggml-lora example",
        "llama.block_count": MetadataValue(n_layer, u32),
        "llama.context_length": MetadataValue(256, u32),
        "llama.embedding_length": MetadataValue(n_embd, u32),
        "llama.feed_forward_length": MetadataValue(n_ff, u32),
        "llama.attention.head_count": MetadataValue(4, u32),
        "llama.attention.head_count_kv": MetadataValue(4, u32),
        "llama.attention.layer_norm_rms_epsilon": MetadataValue(1e-5, GGUFValueType.FLOAT32),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [f"<t{i}>" for i in range(n_vocab)],
    }


def write_example_model(path: PathLike, ggml_type: str = "q4_0", seed: int = 0) -> Path:
    """Write the example model with 2-D weights in ``ggml_type`` ("q4_0", "q8_0", "f16", "f32") and 1-D
    norms in f32, as llama-quantize would lay it out."""
    file_types = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}
    metadata = example_metadata()
    metadata["general.file_type"] = MetadataValue(file_types[ggml_type], GGUFValueType.UINT32)
    tensors: dict[str, TensorValue] = {}
    for name, w in example_model_tensors(seed=seed).items():
        if w.ndim == 1 or ggml_type == "f32":
            tensors[name] = w
        elif ggml_type == "f16":
            tensors[name] = w.astype(np.float16)
        else:
            tensors[name] = (quantize(w, ggml_type), ggml_type, w.shape)
    return write(path, metadata, tensors)


def write_example_adapter(
    path: PathLike, rank: int = 8, alpha: float = 16.0, relative_size: float = 0.04, seed: int = 1
) -> Path:
    """Write a llama.cpp GGUF LoRA adapter for the example model: every attention and MLP projection, with
    factors drawn so that ‖alpha/rank · B@A‖ is about ``relative_size`` of ‖W‖."""
    rng = np.random.default_rng(seed)
    weights = example_model_tensors()
    tensors: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        if w.ndim != 2 or not name.startswith("blk."):
            continue
        n_out, n_in = w.shape
        a = rng.normal(0, 1, (rank, n_in)).astype(np.float32)
        b = rng.normal(0, 1, (n_out, rank)).astype(np.float32)
        delta = (alpha / rank) * (b @ a)
        b *= relative_size * np.linalg.norm(w) / np.linalg.norm(delta)
        tensors[f"{name}.lora_a"] = a
        tensors[f"{name}.lora_b"] = b
    metadata = {
        "general.architecture": "llama",
        "general.type": "adapter",
        "adapter.type": "lora",
        "adapter.lora.alpha": MetadataValue(alpha, GGUFValueType.FLOAT32),
        "general.name": "ggml-lora example adapter",
    }
    return write(path, metadata, tensors)
