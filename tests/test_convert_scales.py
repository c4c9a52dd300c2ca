"""Converter: exact PEFT scales (rslora, rank_pattern, alpha_pattern), f16/bf16 inputs, embedding and lm_head
LoRA, built with numpy + json on the arch/mistral model (llama arch, GQA: q/k rows permuted).

Oracle: PEFT's scaling rule restated in ``test_convert_helpers.peft_scale``, llama.cpp's tensor names from
gguf-py's own ``TensorNameMap`` (what convert_lora_to_gguf.py uses), its q/k row permutation restated from
convert_hf_to_gguf's ``LlamaModel.permute`` (``_helpers.hf_permute``) with the head counts read from the
fixture's ``hf/config.json``, and float64 numpy for the deltas. Nothing from ``ggml_lora`` builds an expected
value: the converter's output is only ever the thing compared."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from _helpers import hf_permute
from test_convert_helpers import ARCH, implied_delta, make_adapter, peft_scale

from ggml_lora.convert import peft_to_lora
from conftest import skip_module_without_fixtures

skip_module_without_fixtures()

MISTRAL = ARCH / "mistral"
BASE = MISTRAL / "base-f16.gguf"
_CONFIG = json.loads((MISTRAL / "hf" / "config.json").read_text())
N_HEAD, N_HEAD_KV = _CONFIG["num_attention_heads"], _CONFIG["num_key_value_heads"]
NAMES = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, _CONFIG["num_hidden_layers"])


def expected_delta(module: str, a: np.ndarray, b: np.ndarray, scale: float) -> tuple[str, np.ndarray]:
    """PEFT's delta for ``module`` in GGUF naming/layout (float64)."""
    name = NAMES.get_name(module + ".weight", try_suffixes=(".weight",))
    assert name is not None, module
    if module.endswith("embed_tokens"):
        return name, scale * (b.astype(np.float64) @ a.astype(np.float64)).T
    d = scale * (b.astype(np.float64) @ a.astype(np.float64))
    if module.endswith("q_proj"):
        d = hf_permute(d, N_HEAD)
    elif module.endswith("k_proj"):
        d = hf_permute(d, N_HEAD_KV)
    return name, d


def check_all(lora, cfg, factors, rtol=2e-6):
    names = set()
    for module, (a, b) in factors.items():
        name, want = expected_delta(module, a, b, peft_scale(cfg, module))
        got = implied_delta(lora, name)
        assert got.shape == want.shape, module
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=module)
        names.add(name)
    assert {k.rsplit(".", 1)[0] for k in lora.tensors} == names


def test_plain_adapter_keeps_alpha(tmp_path):
    folder, cfg, factors = make_adapter(tmp_path / "a", {"r": 8, "lora_alpha": 16})
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 16.0
    # unscaled factors: lora_b (before the q/k permutation) is PEFT's lora_B
    assert np.array_equal(lora.tensors["blk.1.attn_v.weight.lora_b"], factors["model.layers.1.self_attn.v_proj"][1])
    check_all(lora, cfg, factors)


def test_rslora_is_folded(tmp_path):
    folder, cfg, factors = make_adapter(tmp_path / "a", {"r": 8, "lora_alpha": 16, "use_rslora": True})
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 0.0  # 16/sqrt(8) is not alpha/8 for any f32 alpha -> folded into lora_b
    check_all(lora, cfg, factors)
    # llama.cpp's convert_lora_to_gguf.py would write alpha 16 -> scale 2 instead of 5.657: off by sqrt(8)
    v = factors["model.layers.0.self_attn.v_proj"]
    np.testing.assert_allclose(lora.tensors["blk.0.attn_v.weight.lora_b"], v[1] * (16 / np.sqrt(8)), rtol=1e-6)


def test_rslora_with_square_rank_keeps_an_alpha(tmp_path):
    folder, cfg, factors = make_adapter(tmp_path / "a", {"r": 16, "lora_alpha": 8, "use_rslora": True})
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 32.0  # 8/sqrt(16) == 2 == 32/16
    check_all(lora, cfg, factors)


def test_rank_pattern_alone_keeps_alpha(tmp_path):
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 4, "model.layers.1.mlp.down_proj": 2}}
    ranks = {"model.layers.0.self_attn.v_proj": 4, "model.layers.1.self_attn.v_proj": 4,
             "model.layers.1.mlp.down_proj": 2}
    folder, cfg, factors = make_adapter(tmp_path / "a", cfg, ranks=ranks)
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 16.0  # llama.cpp's alpha / (tensor rank) is PEFT's alpha / r for every tensor
    assert lora.tensors["blk.1.ffn_down.weight.lora_b"].shape == (128, 2)
    check_all(lora, cfg, factors)


def test_rank_pattern_first_key_wins(tmp_path):
    # PEFT get_pattern_key: the first key in dict order whose regex matches "(.*\.)?(key)$"
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"layers.0.self_attn.q_proj": 4, "q_proj": 2}}
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.q_proj": 2}
    folder, cfg, factors = make_adapter(tmp_path / "a", cfg, ranks=ranks)
    check_all(peft_to_lora(folder, BASE), cfg, factors)


def test_alpha_pattern_is_folded(tmp_path):
    cfg = {"r": 8, "lora_alpha": 16, "alpha_pattern": {"o_proj": 4, r"layers\.1\.self_attn\.q_proj": 64}}
    folder, cfg, factors = make_adapter(tmp_path / "a", cfg)
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 0.0
    check_all(lora, cfg, factors)
    assert peft_scale(cfg, "model.layers.1.self_attn.q_proj") == 8.0
    assert peft_scale(cfg, "model.layers.0.self_attn.q_proj") == 2.0
    assert peft_scale(cfg, "model.layers.0.self_attn.o_proj") == 0.5


def test_alpha_pattern_uniform_keeps_alpha(tmp_path):
    # every converted module gets the same alpha through the patterns -> one adapter.lora.alpha is still exact
    cfg = {"r": 8, "lora_alpha": 16, "alpha_pattern": {"q_proj": 32, "up_proj": 32, "proj": 1}}
    folder, cfg, factors = make_adapter(tmp_path / "a", cfg, modules=["model.layers.0.self_attn.q_proj",
                                                                        "model.layers.1.mlp.up_proj"])
    assert peft_scale(cfg, "model.layers.0.self_attn.q_proj") == 4.0  # "proj" never matches: '.' boundary
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 32.0
    check_all(lora, cfg, factors)


def test_pattern_does_not_match_partial_names(tmp_path):
    # "_proj" style keys only match at a '.' boundary: "up_proj" must not catch "gate_up_proj" etc.
    cfg = {"r": 8, "lora_alpha": 16, "alpha_pattern": {"p_proj": 1}}
    folder, cfg, factors = make_adapter(tmp_path / "a", cfg, modules=["model.layers.0.mlp.up_proj"])
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 16.0
    check_all(lora, cfg, factors)


def test_lora_alpha_zero(tmp_path):
    folder, cfg, factors = make_adapter(tmp_path / "a", {"lora_alpha": 0}, modules=["model.layers.0.mlp.up_proj"])
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 0.0
    assert not lora.tensors["blk.0.ffn_up.weight.lora_b"].any()  # PEFT's delta is zero; so is ours


def test_fractional_alpha(tmp_path):
    folder, cfg, factors = make_adapter(tmp_path / "a", {"r": 8, "lora_alpha": 12.5})
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 12.5
    check_all(lora, cfg, factors)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_safetensors(tmp_path, dtype):
    folder, cfg, factors = make_adapter(tmp_path / "a", {"r": 8, "lora_alpha": 16}, dtype=dtype)
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 16.0
    for arr in lora.tensors.values():
        assert arr.dtype == np.float32
    # f16/bf16 -> f32 is exact: the unpermuted factors equal the rounded inputs bit for bit
    a, b = factors["model.layers.0.mlp.down_proj"]
    assert np.array_equal(lora.tensors["blk.0.ffn_down.weight.lora_a"], a)
    assert np.array_equal(lora.tensors["blk.0.ffn_down.weight.lora_b"], b)
    check_all(lora, cfg, factors)


def test_bf16_with_rslora(tmp_path):
    folder, cfg, factors = make_adapter(tmp_path / "a", {"r": 8, "lora_alpha": 16, "use_rslora": True},
                                        dtype="BF16")
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 0.0
    check_all(lora, cfg, factors)


def test_embedding_and_lm_head_lora_untied(tmp_path):
    folder, cfg, factors = make_adapter(tmp_path / "a", {"r": 8, "lora_alpha": 16},
                                        modules=["model.layers.0.self_attn.q_proj"], embedding_rank=8,
                                        lm_head_rank=8)
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 16.0
    # llama.cpp's token_embd layout: lora_a ne [r, n_vocab] (numpy (512, 8)), lora_b ne [r, n_embd] ((128, 8))
    assert lora.tensors["token_embd.weight.lora_a"].shape == (512, 8)
    assert lora.tensors["token_embd.weight.lora_b"].shape == (128, 8)
    assert lora.tensors["output.weight.lora_a"].shape == (8, 128)
    assert lora.tensors["output.weight.lora_b"].shape == (512, 8)
    check_all(lora, cfg, factors)


def test_embedding_lora_with_rslora_folds(tmp_path):
    folder, cfg, factors = make_adapter(tmp_path / "a", {"r": 8, "lora_alpha": 16, "use_rslora": True},
                                        modules=[], embedding_rank=8)
    lora = peft_to_lora(folder, BASE)
    assert lora.alpha == 0.0
    check_all(lora, cfg, factors)


def test_hf_config_base_equals_gguf_base(tmp_path):
    folder, cfg, factors = make_adapter(tmp_path / "a", {"alpha_pattern": {"k_proj": 3}})
    a = peft_to_lora(folder, BASE)
    b = peft_to_lora(folder, MISTRAL / "hf")
    assert a.alpha == b.alpha == 0.0
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_metadata(tmp_path):
    folder, _, _ = make_adapter(tmp_path / "my-adapter", modules=["model.layers.0.mlp.up_proj"])
    lora = peft_to_lora(folder, BASE)
    assert lora.architecture == "llama"
    assert lora.metadata["general.name"] == "my-adapter"
    json.dumps({k: str(v) for k, v in lora.metadata.items()})
