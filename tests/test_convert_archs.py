"""Converter: architectures without a shared fixture (gemma, gemma3, Gemma3 multimodal wrapper naming), built from
an HF config.json; names via gguf-py's TensorNameMap, no row permutation (NEOX rope in llama.cpp)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_convert_helpers import ARCH, write_safetensors

from ggml_lora.convert import ConversionError, peft_to_lora

PROJ = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}


def hf_dir(tmp_path, cls, *, nested=False, tied=True):
    d = tmp_path / cls
    d.mkdir()
    text = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "num_hidden_layers": 3,
            "tie_word_embeddings": tied}
    cfg = {"architectures": [cls], "text_config": text} if nested else {"architectures": [cls], **text}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def adapter(tmp_path, prefix="model.", n_layers=3, r=4, alpha=8):
    d = tmp_path / "peft"
    d.mkdir()
    rng = np.random.default_rng(5)
    tensors = {}
    for i in range(n_layers):
        for proj in PROJ:
            tensors[f"base_model.model.{prefix}layers.{i}.{proj}.lora_A.weight"] = rng.normal(size=(r, 64)).astype(
                np.float32)
            tensors[f"base_model.model.{prefix}layers.{i}.{proj}.lora_B.weight"] = rng.normal(size=(32, r)).astype(
                np.float32)
    write_safetensors(d / "adapter_model.safetensors", tensors)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha}))
    return d, tensors


@pytest.mark.parametrize("cls, arch, prefix, nested", [
    ("GemmaForCausalLM", "gemma", "model.", False),
    ("Gemma2ForCausalLM", "gemma2", "model.", False),
    ("Gemma3ForCausalLM", "gemma3", "model.", False),
    ("Gemma3ForConditionalGeneration", "gemma3", "model.language_model.", True),   # transformers >= 4.52
    ("Gemma3ForConditionalGeneration", "gemma3", "language_model.model.", True),   # older checkpoints
    ("Qwen2ForCausalLM", "qwen2", "model.", False),
    ("Qwen3ForCausalLM", "qwen3", "model.", False),
])
def test_unpermuted_archs_from_hf_config(tmp_path, cls, arch, prefix, nested):
    peft, tensors = adapter(tmp_path, prefix)
    lora = peft_to_lora(peft, hf_dir(tmp_path, cls, nested=nested))
    assert lora.architecture == arch and lora.alpha == 8.0
    assert len(lora.tensors) == len(tensors)
    for i in range(3):
        for proj, gguf_name in PROJ.items():
            key = f"base_model.model.{prefix}layers.{i}.{proj}"
            assert np.array_equal(lora.tensors[f"blk.{i}.{gguf_name}.weight.lora_a"], tensors[key + ".lora_A.weight"])
            assert np.array_equal(lora.tensors[f"blk.{i}.{gguf_name}.weight.lora_b"], tensors[key + ".lora_B.weight"])


def test_llama_from_hf_config_permutes_q_and_k_with_their_own_head_counts(tmp_path):
    peft, tensors = adapter(tmp_path)
    lora = peft_to_lora(peft, hf_dir(tmp_path, "LlamaForCausalLM"))
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]  # 32 rows
    q = lora.tensors["blk.0.attn_q.weight.lora_b"]
    k = lora.tensors["blk.0.attn_k.weight.lora_b"]
    # n_head = 4: rows are (head, half, i) -> (head, i, half); k uses n_head_kv = 1
    assert np.array_equal(q, b.reshape(4, 2, 4, -1).swapaxes(1, 2).reshape(b.shape))
    bk = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    assert np.array_equal(k, bk.reshape(1, 2, 16, -1).swapaxes(1, 2).reshape(bk.shape))
    assert not np.array_equal(q, b)
    v = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert np.array_equal(lora.tensors["blk.0.attn_v.weight.lora_b"], v)


def test_block_beyond_model_refused(tmp_path):
    peft, _ = adapter(tmp_path, n_layers=3)
    d = hf_dir(tmp_path, "Qwen2ForCausalLM")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="layers.2"):
        peft_to_lora(peft, d)


def test_vision_tower_lora_refused(tmp_path):
    peft, tensors = adapter(tmp_path, "model.language_model.", n_layers=1)
    tensors["base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = \
        np.ones((4, 64), np.float32)
    tensors["base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = \
        np.ones((32, 4), np.float32)
    write_safetensors(peft / "adapter_model.safetensors", tensors)
    with pytest.raises(ConversionError, match="vision_tower"):
        peft_to_lora(peft, hf_dir(tmp_path, "Gemma3ForConditionalGeneration", nested=True))


@pytest.mark.fixtures
def test_phi3_fused_and_gpt2_conv1d_names():
    # covered numerically by test_convert_fixtures; here: the fused/Conv1D modules map to one GGUF tensor each
    lora = peft_to_lora(ARCH / "phi3/peft-a", ARCH / "phi3/hf")
    assert "blk.0.attn_qkv.weight.lora_b" in lora.tensors and "blk.0.ffn_up.weight.lora_b" in lora.tensors
    assert lora.tensors["blk.0.attn_qkv.weight.lora_b"].shape == (256, 8)   # q 128 + k 64 + v 64 rows
    assert lora.tensors["blk.0.ffn_up.weight.lora_b"].shape == (512, 8)     # gate 256 + up 256 rows
