"""Weight transforms of llama.cpp's model converters, applied to LoRA factors so that the factors' product
matches the converted base tensor.

- **Rotary q/k row permutation** (``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py``) for
  llama-family architectures: the rows of attn_q (with ``n_head``) and attn_k (with ``n_head_kv``) are
  reordered; a LoRA delta ``B @ A`` gets the same reordering by permuting the rows of ``lora_B``.
- **Conv1D / ``fan_in_fan_out``** (GPT-2): PEFT's delta in the HF layout is ``(B @ A).T`` because Conv1D stores
  its weight as (in, out); llama.cpp's GPT-2 converter transposes those weights to (out, in), so in GGUF layout
  the delta is ``B @ A`` and the factors are written as PEFT stored them. (llama.cpp's ``convert_lora_to_gguf.py``
  transposes each factor instead, which writes the transpose of the delta; see the README.)
- **Fused tensors** (phi3 ``qkv_proj`` -> ``attn_qkv``, ``gate_up_proj`` -> ``ffn_up``): llama.cpp keeps them
  fused, so the LoRA of the fused module is the LoRA of the fused GGUF tensor, unchanged.
- **Token embedding**: PEFT's embedding delta is ``(B @ A).T`` with ``lora_embedding_A`` (r, n_vocab) and
  ``lora_embedding_B`` (n_embd, r); llama.cpp stores ``token_embd.weight.lora_a`` = A.T (numpy (n_vocab, r)) and
  ``lora_b`` = B (numpy (n_embd, r)) and computes the delta as ``lora_a @ lora_b.T``.
"""

from __future__ import annotations

import numpy as np

from .errors import ConversionError


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp ``LlamaModel.permute`` on the rows of ``w`` (numpy (rows, ...))."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = w.shape[0]
    if n_head <= 0 or rows % (2 * n_head) != 0:
        raise ConversionError(f"cannot apply the rotary row permutation: {rows} rows are not a multiple of "
                              f"2 x {n_head} heads")
    return np.ascontiguousarray(
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def permute_lora_b(lora_b: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Permute the rows of ``lora_B`` (n_out, r) exactly as the base tensor's rows were permuted."""
    return llama_permute(lora_b, n_head, n_head_kv)


def linear_factors(lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF ``(lora_a, lora_b)`` of a linear (or Conv1D) module: PEFT's (r, n_in) and (n_out, r), as stored."""
    return lora_a, lora_b


def embedding_factors(lora_embedding_a: np.ndarray, lora_embedding_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF ``(lora_a, lora_b)`` of ``token_embd.weight``: (n_vocab, r) = A.T and (n_embd, r) = B."""
    return np.ascontiguousarray(lora_embedding_a.T), lora_embedding_b


def delta(name: str, lora_a: np.ndarray, lora_b: np.ndarray) -> np.ndarray:
    """The (unscaled) delta, in numpy layout of the GGUF tensor, that a GGUF ``lora_a``/``lora_b`` pair encodes."""
    a = lora_a.astype(np.float64)
    b = lora_b.astype(np.float64)
    if name.startswith("token_embd"):
        return a @ b.T
    return b @ a
